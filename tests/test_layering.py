"""
The package's import graph, read from the source (imports inside
functions too): no module imports, through any path, a module that
imports it back, and the lower layers (the model and chain, the store, the
identity providers, the wire codecs) never reach up into what is built on
them.  The runtime package holds no test servers.
"""

import ast
import os

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "hoopgw")


def modules():
    """
    {module name: set of hoopgw modules it imports}.
    """
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
            if relative[-1] == "__init__":
                relative = relative[:-1]
            module = ".".join(relative)
            with open(path) as handle:
                tree = ast.parse(handle.read(), path)
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported.update(alias.name for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module)
                    imported.update("%s.%s" % (node.module, alias.name) for alias in node.names)
            found[module] = imported
    names = set(found)
    return {
        module: {name for name in imported if name in names and name != module and not module.startswith(name + ".")}
        for module, imported in found.items()
    }


def cycles(graph):
    """
    The strongly connected components of more than one module (Tarjan).
    """
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


# A module under the first prefix never imports one under the second.
FORBIDDEN = [
    ("hoopgw.model", "hoopgw."),
    ("hoopgw.chain", "hoopgw.addons"),
    ("hoopgw.chain", "hoopgw.postgres"),
    ("hoopgw.chain", "hoopgw.ssh"),
    ("hoopgw.chain", "hoopgw.kubernetes"),
    ("hoopgw.store", "hoopgw.approvals"),
    ("hoopgw.store", "hoopgw.replay"),
    ("hoopgw.store", "hoopgw.gateway"),
    ("hoopgw.identity", "hoopgw.gateway"),
    ("hoopgw.postgres.wire", "hoopgw.addons"),
    # An addon sees what every front end gives it, never a front end's
    # parts (mask asks PostgreSQL's column guard, which is no front end).
    ("hoopgw.addons", "hoopgw.postgres.frontend"),
    ("hoopgw.addons", "hoopgw.postgres.startup"),
    ("hoopgw.addons", "hoopgw.postgres.replies"),
    ("hoopgw.addons", "hoopgw.ssh"),
    ("hoopgw.addons", "hoopgw.kubernetes"),
    ("hoopgw.addons", "hoopgw.store.file"),
    ("hoopgw.addons", "hoopgw.store.segments"),
    ("hoopgw.addons", "hoopgw.store.commit"),
    ("hoopgw.addons", "hoopgw.store.postgres"),
    ("hoopgw", "hoopgw.testing"),
]
# Modules the rules above allow to import anything.
ALLOWED = {"hoopgw.testing", "hoopgw.model"}


class LayeringTests(unittest.TestCase):
    def test_no_import_circles(self):
        """
        No set of hoopgw modules imports itself round in a circle, even
        through imports made inside functions to hide one.
        """
        self.assertEqual(cycles(modules()), [])

    def test_no_upward_imports(self):
        """
        The store, the identity providers, the model and the chain import
        nothing built on them; nothing but tests imports hoopgw.testing.
        """
        found = []
        for module, imported in sorted(modules().items()):
            for lower, upper in FORBIDDEN:
                if not (module == lower or module.startswith(lower + ".")):
                    continue
                if module in ALLOWED and lower == "hoopgw":
                    continue
                for name in imported:
                    if name.startswith(upper) and not (lower == "hoopgw.model" and name == "hoopgw.model"):
                        found.append("%s imports %s" % (module, name))
        self.assertEqual(found, [])

    def test_no_test_servers_in_the_package(self):
        """
        Throwaway servers, the test PKI and the stand-in API server live in
        testbed/, not in the installed package.
        """
        for name in ("throwaway", "pki", "kubernetes.standin"):
            self.assertNotIn("hoopgw." + name, modules())
