"""
Rules on commands that are not SQL, by their facts, with shell-style
patterns: what an SSH exec or a C{kubectl exec} runs (programs, commands
with their arguments, pipelines), sftp operations and the SSH login, and
Kubernetes requests as RBAC names them (verbs, resources with their
subresources, API groups, namespaces, resource names); and any fact by
name.  A rule's SQL keys are read by L{hoopgw.rules}, which combines
them with these.

A pattern may hold alternatives in braces, as a shell expands them:
C{"{curl,wget} | {sh,bash}"} is four pipeline patterns.
"""

import fnmatch
import itertools
import re

import attr

from hoopgw import options as o
from hoopgw.commandline import program_name
from hoopgw.options import ConfigError, join


_BRACES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern):
    """
    The patterns C{pattern} stands for, its brace groups expanded
    (C{"rm {/,/[*]}"} is C{["rm /", "rm /[*]"]}).
    """
    pieces = _BRACES.split(pattern)
    choices = [[piece] if index % 2 == 0 else piece.split(",") for index, piece in enumerate(pieces)]
    return ["".join(parts) for parts in itertools.product(*choices)]


def _patterns(allow_empty=False):
    """
    A pattern or a list of patterns, braces expanded.
    """

    def validate(value, path):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ConfigError(path, "expected a pattern or a non-empty list of patterns")
        found = []
        for index, item in enumerate(items):
            where = path if isinstance(value, str) else join(path, index)
            if not isinstance(item, str) or (not item and not allow_empty):
                raise ConfigError(where, "expected a non-empty string pattern, got %r" % (item,))
            found.extend(expand_braces(item))
        return tuple(found)

    return validate


def _matches(value, patterns):
    return value is not None and any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


@attr.s(frozen=True)
class CommandPattern:
    """
    A program pattern, then argument patterns that must each match one of
    the command's arguments, in any order (C{"rm -*r* /"}).  The program
    pattern meets the program's name (C{rm}) or, if it has a slash, the
    word as written (C{/usr/bin/rm}).
    """

    text = attr.ib()
    program = attr.ib()
    arguments = attr.ib()

    @classmethod
    def parse(cls, text, path):
        words = text.split()
        if not words:
            raise ConfigError(path, "a command pattern names at least a program, e.g. \"rm -*r* /\"")
        return cls(text, words[0], tuple(words[1:]))

    def match(self, argv):
        if not argv:
            return False
        word = argv[0]
        name = program_name(word)
        if not fnmatch.fnmatchcase(word if "/" in self.program else name, self.program):
            return False
        arguments = argv[1:]
        return all(any(fnmatch.fnmatchcase(argument, pattern) for argument in arguments) for pattern in self.arguments)


@attr.s(frozen=True)
class PipelinePattern:
    """
    Program patterns separated by C{|} (C{"curl | sh"}): a pipeline with
    stages running these programs, in this order (other stages may come
    between).
    """

    text = attr.ib()
    stages = attr.ib()

    @classmethod
    def parse(cls, text, path):
        stages = tuple(stage.strip() for stage in text.split("|"))
        if len(stages) < 2 or not all(stages) or any(" " in stage for stage in stages):
            raise ConfigError(path, "a pipeline pattern is two or more program patterns separated by |, e.g. \"curl | sh\"")
        return cls(text, stages)

    def match(self, pipeline):
        position = 0
        for stage in pipeline:
            if any(fnmatch.fnmatchcase(program, self.stages[position]) for program in stage):
                position += 1
                if position == len(self.stages):
                    return True
        return False


def _command_patterns(value, path):
    return tuple(CommandPattern.parse(item, path) for item in _patterns()(value, path))


def _pipeline_patterns(value, path):
    return tuple(PipelinePattern.parse(item, path) for item in _patterns()(value, path))


def _fact_patterns(value, path):
    """
    C{{name: pattern or [patterns]}}, for any command's facts.
    """
    value = o.mapping(value, path)
    patterns = []
    for name, raw in sorted(value.items()):
        patterns.append((name, _patterns(allow_empty=True)(raw, join(path, name))))
    if not patterns:
        raise ConfigError(path, "name at least one fact, e.g. {verb: delete}")
    return tuple(patterns)


# What each key matches, in the facts the front ends give.
OPTIONS = (
    o.Option(
        "programs",
        _patterns(),
        None,
        "Programs run anywhere in an SSH exec or kubectl exec command line (sudo, su, *sh), also "
        "behind wrappers (sudo, env, timeout, xargs ...), in sh -c strings and substitutions.",
    ),
    o.Option(
        "commands",
        _command_patterns,
        None,
        "Commands: a program pattern, then argument patterns that must each match one argument, in any "
        "order (\"rm -*r* /\").",
    ),
    o.Option(
        "pipelines",
        _pipeline_patterns,
        None,
        "Pipelines: program patterns separated by | (\"{curl,wget} | {sh,bash}\"), in order; a "
        "substitution (bash <(curl ...)) feeds the command around it as a pipe would.",
    ),
    o.Option("logins", _patterns(), None, "SSH logins on the target (root, deploy)."),
    o.Option("operations", _patterns(), None, "sftp operations: open, list, remove, rename, mkdir, rmdir, setstat, symlink, ..."),
    o.Option("transfers", _patterns(), None, "sftp transfers: upload (an open for writing) or download."),
    o.Option("paths", _patterns(), None, "Paths of sftp operations (either path of a rename or link)."),
    o.Option("verbs", _patterns(), None, "Kubernetes verbs: get, list, watch, create, update, patch, delete, deletecollection."),
    o.Option(
        "resources",
        _patterns(),
        None,
        "Kubernetes resources as RBAC writes them: pods, pods/exec, */log, * (a resource alone does "
        "not match its subresources).",
    ),
    o.Option("api_groups", _patterns(allow_empty=True), None, "Kubernetes API groups (\"\" is the core group, apps, rbac.authorization.k8s.io)."),
    o.Option("namespaces", _patterns(allow_empty=True), None, "Kubernetes namespaces (\"\" for cluster-wide requests)."),
    o.Option("resource_names", _patterns(), None, "Names of the Kubernetes objects requested."),
    o.Option(
        "facts",
        _fact_patterns,
        None,
        "Facts of any command by name, each with shell-style patterns: {verb: delete, namespace: prod-*} "
        "for a Kubernetes request, {protocol: extended} for SQL.",
    ),
)
KEYS = tuple(option.name for option in OPTIONS)
# Keys of commands that are not SQL statements.
COMMAND_KEYS = KEYS[:-1]


def _qualified_resource(facts):
    resource = facts.get("resource")
    if not resource:
        return None
    subresource = facts.get("subresource")
    return "%s/%s" % (resource, subresource) if subresource else resource


@attr.s(frozen=True)
class CommandMatcher:
    """
    The command facts a rule requires: every key given must match (and
    within a key, any pattern).  A command without the fact a key needs
    does not match.
    """

    programs = attr.ib(default=None)
    commands = attr.ib(default=None)
    pipelines = attr.ib(default=None)
    logins = attr.ib(default=None)
    operations = attr.ib(default=None)
    transfers = attr.ib(default=None)
    paths = attr.ib(default=None)
    verbs = attr.ib(default=None)
    resources = attr.ib(default=None)
    api_groups = attr.ib(default=None)
    namespaces = attr.ib(default=None)
    resource_names = attr.ib(default=None)
    facts = attr.ib(default=None)

    @classmethod
    def from_values(cls, values):
        """
        The matcher for the keys given in C{values} (parsed options), or
        None if none is.
        """
        given = {key: values[key] for key in KEYS if values.get(key) is not None}
        return cls(**given) if given else None

    @property
    def commands_only(self):
        """
        Whether this matcher names facts only commands that are not SQL
        have.
        """
        return any(getattr(self, key) is not None for key in COMMAND_KEYS)

    def match(self, command):
        """
        @return: a list of sentences saying what matched, or None.
        """
        facts = command.facts
        why = []
        for key, check in _CHECKS:
            patterns = getattr(self, key)
            if patterns is None:
                continue
            found = check(facts, patterns)
            if found is None:
                return None
            why.append(found)
        if self.facts is not None:
            for name, patterns in self.facts:
                value = facts.get(name)
                values = value if isinstance(value, (list, tuple)) else [value]
                found = [str(item) for item in values if item is not None and _matches(str(item), patterns)]
                if not found:
                    return None
                why.append("%s %s" % (name, ", ".join(found)))
        return why


def _fact(name, noun, qualify=None):
    """
    A check of one fact holding one value.
    """

    def check(facts, patterns):
        value = qualify(facts) if qualify is not None else facts.get(name)
        if value is None or not isinstance(value, str) or not _matches(value, patterns):
            return None
        return "%s %s" % (noun, value if value else '""')

    return check


def _programs(facts, patterns):
    found = sorted({program for program in facts.get("programs") or () if _matches(program, patterns)})
    return "program %s" % (", ".join(found),) if found else None


def _commands(facts, patterns):
    for argv in facts.get("commands") or ():
        for pattern in patterns:
            if pattern.match(argv):
                return "command %r matches %r" % (" ".join(argv), pattern.text)
    return None


def _pipelines(facts, patterns):
    for pipeline in facts.get("pipelines") or ():
        for pattern in patterns:
            if pattern.match(pipeline):
                return "pipeline %s" % (" | ".join("+".join(stage) for stage in pipeline),)
    return None


def _paths(facts, patterns):
    found = [value for value in (facts.get("path"), facts.get("target")) if isinstance(value, str) and _matches(value, patterns)]
    return "path %s" % (", ".join(found),) if found else None


def _api_group(facts):
    # Only requests for resources have a group ("" is the core group).
    return facts.get("apiGroup") if facts.get("resource") else None


_CHECKS = (
    ("programs", _programs),
    ("commands", _commands),
    ("pipelines", _pipelines),
    ("logins", _fact("login", "login")),
    ("operations", _fact("operation", "sftp operation")),
    ("transfers", _fact("transfer", "transfer")),
    ("paths", _paths),
    ("verbs", _fact("verb", "verb")),
    ("resources", _fact("resource", "resource", _qualified_resource)),
    ("api_groups", _fact("apiGroup", "API group", _api_group)),
    ("namespaces", _fact("namespace", "namespace")),
    ("resource_names", _fact("name", "name")),
)
