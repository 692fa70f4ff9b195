"""
Broken configurations: C{check-config} and a C{twistd} start report every
problem of a file at once, each with its key path, suggest the key a
misspelling meant, parse endpoints as twistd will, and check that secrets
are there; a start with a broken file ends in that message, never a
traceback.
"""

import copy
import io
import os
import subprocess
import sys

import yaml
from twisted.trial import unittest

from hoopgw import cli
from hoopgw import config as configuration
from hoopgw.options import ConfigError, ConfigErrors, flatten


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base_document():
    """
    A valid configuration whose files (made up by L{BrokenConfigurationTests})
    sit next to it: relative paths resolve against the file's folder.
    """
    return {
        "gateway": {
            "state_dir": "state",
            "store": {"path": "audit", "fsync": False},
            "signing_key": {"file": "signing.key"},
        },
        "identity_providers": {
            "ci": {
                "issuer": "https://issuer.example",
                "audience": "hoopgw",
                "jwks_file": "issuer.jwks.json",
                "algorithms": ["ES256"],
            }
        },
        "connections": {
            "payments": {
                "protocol": "postgres",
                "listen": "tcp:25432:interface=127.0.0.1",
                "tls": {"certificate": "gateway.crt", "key": "gateway.key"},
                "target": {
                    "host": "127.0.0.1",
                    "port": 5432,
                    "database": "payments",
                    "user": "app",
                    "password": {"file": "app.password"},
                    "tls": "verify-full",
                    "ca": "db-ca.crt",
                },
                "allowed_groups": ["payments-bots"],
                "addons": ["identity", {"block": {"presets": ["destructive"]}}, "mask", "record"],
            }
        },
    }


class BrokenConfigurationTests(unittest.TestCase):
    """
    Each test breaks the valid document in one or several ways and asserts
    the exact set of key paths reported, and a phrase of each message.
    """

    def setUp(self):
        from hoopgw.identity import dev
        from hoopgw.store import signing

        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        dev.generate_key(self.directory, kid="k1")
        os.rename(os.path.join(self.directory, "demo-issuer.jwks.json"), os.path.join(self.directory, "issuer.jwks.json"))
        signing.generate_key(self.directory, stem="signing")
        for name in ("gateway.crt", "gateway.key", "db-ca.crt"):
            with open(os.path.join(self.directory, name), "w") as handle:
                handle.write("not checked beyond existing\n")
        with open(os.path.join(self.directory, "app.password"), "w") as handle:
            handle.write("s3cret\n")
        self.document = base_document()

    def load(self, document):
        path = os.path.join(self.directory, "hoopgw.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(document, handle)
        return configuration.load(path)

    def refused(self, document, expected):
        """
        Loading C{document} fails with exactly the key paths of
        C{expected} (a dict of key path to a phrase its message holds).
        """
        error = self.assertRaises(ConfigError, self.load, document)
        found = {problem.path: problem.message for problem in flatten([error])}
        self.assertEqual(sorted(found), sorted(expected), "\n".join("%s: %s" % item for item in found.items()))
        for path, phrase in expected.items():
            self.assertIn(phrase, found[path], path)
        if len(expected) > 1:
            self.assertIsInstance(error, ConfigErrors)
        return found

    def broken(self, *changes):
        """
        The valid document with C{changes} applied: C{(dotted path, value)},
        a value of C{None} deleting the key.
        """
        document = copy.deepcopy(self.document)
        for dotted, value in changes:
            keys = dotted.split(".")
            target = document
            for key in keys[:-1]:
                target = target[int(key)] if isinstance(target, list) else target[key]
            if value is None:
                del target[keys[-1]]
            else:
                target[keys[-1]] = value
        return document

    def connection(self, *changes):
        return self.broken(*(("connections.payments." + dotted, value) for dotted, value in changes))

    def test_valid(self):
        """
        The document the other tests break is valid as it is.
        """
        config = self.load(self.document)
        self.assertEqual(
            [spec.name for spec in config.connections["payments"].addons], ["identity", "block", "mask", "record"]
        )

    def test_port_not_a_number(self):
        """
        C{tcp:notaport} is refused as twistd would refuse it.
        """
        self.refused(self.connection(("listen", "tcp:notaport")), {"connections.payments.listen": "is not a valid endpoint"})

    def test_unknown_endpoint_type(self):
        """
        An endpoint type Twisted does not know is named.
        """
        self.refused(
            self.connection(("listen", "bogus:15432")), {"connections.payments.listen": "Unknown endpoint type: 'bogus'"}
        )

    def test_misspelt_endpoint_parameter(self):
        """
        C{interfase=} is refused, naming the parameter.
        """
        self.refused(
            self.connection(("listen", "tcp:15432:interfase=127.0.0.1")),
            {"connections.payments.listen": "unexpected keyword argument 'interfase'"},
        )

    def test_interface_typo(self):
        """
        An interface that is neither an address nor a resolvable name
        (C{127.0.0.l}) is refused at check time rather than at bind time.
        """
        self.refused(
            self.connection(("listen", "tcp:15432:interface=127.0.0.l")),
            {"connections.payments.listen": "the interface '127.0.0.l' is neither an address nor a name"},
        )

    def test_port_out_of_range(self):
        """
        A port above 65535 is refused before anything listens.
        """
        self.refused(self.connection(("listen", "tcp:70000")), {"connections.payments.listen": "not between 0 and 65535"})

    def test_misspelt_required_key(self):
        """
        C{alowed_groups} is reported as unknown with the key it stands for,
        and not also as "allowed_groups is required".
        """
        document = self.connection(("allowed_groups", None), ("alowed_groups", ["payments-bots"]))
        self.refused(document, {"connections.payments.alowed_groups": "did you mean allowed_groups? (it is required)"})

    def test_misspelt_listen(self):
        """
        A misspelt C{listen} is one problem, not two.
        """
        document = self.connection(("listen", None), ("lisen", "tcp:15432"))
        self.refused(document, {"connections.payments.lisen": "did you mean listen?"})

    def test_missing_listen(self):
        """
        A connection without a listener says what to write.
        """
        self.refused(self.connection(("listen", None)), {"connections.payments.listen": "is required"})

    def test_missing_secret_file(self):
        """
        A password file that is not there is refused at check time, not at
        the first session.
        """
        self.refused(
            self.connection(("target.password", {"file": "gone.password"})),
            {"connections.payments.target.password": "cannot read the secret file"},
        )

    def test_unset_environment_variable(self):
        """
        A secret in an environment variable that is not set is refused.
        """
        os.environ.pop("HOOPGW_TEST_NEVER_SET", None)
        self.refused(
            self.connection(("target.password", {"env": "HOOPGW_TEST_NEVER_SET"})),
            {"connections.payments.target.password": "HOOPGW_TEST_NEVER_SET holding this secret is not set"},
        )

    def test_set_environment_variable(self):
        """
        The same variable, set, is accepted.
        """
        os.environ["HOOPGW_TEST_SET"] = "s3cret"
        self.addCleanup(os.environ.pop, "HOOPGW_TEST_SET")
        config = self.load(self.connection(("target.password", {"env": "HOOPGW_TEST_SET"})))
        self.assertEqual(config.connections["payments"].settings.target.password.read_text(), "s3cret")

    def test_empty_secret_file(self):
        """
        An empty secret file is refused: a secret written nowhere.
        """
        with open(os.path.join(self.directory, "empty.password"), "w"):
            pass
        self.refused(
            self.connection(("target.password", {"file": "empty.password"})),
            {"connections.payments.target.password": "is empty"},
        )

    def test_inline_secret(self):
        """
        A secret written inline is refused, saying where secrets go.
        """
        self.refused(
            self.connection(("target.password", "hunter2")),
            {"connections.payments.target.password": "{file: PATH} or {env: VARIABLE}"},
        )

    def test_misspelt_section(self):
        """
        A misspelt top-level section suggests the section; what the
        missing section leaves broken is reported in the same round.
        """
        document = self.broken()
        document["identity_provider"] = document.pop("identity_providers")
        self.refused(
            document,
            {
                "identity_provider": "did you mean identity_providers?",
                "connections.payments.addons[0]": "the identity addon needs at least one entry under identity_providers",
            },
        )

    def test_misspelt_provider_type(self):
        """
        A misspelt provider type is named as such, not as one more unknown
        option of an OIDC provider.
        """
        self.refused(
            self.broken(("identity_providers.ci.tpye", "oidc")),
            {"identity_providers.ci.tpye": "did you mean type?"},
        )

    def test_misspelt_store_option(self):
        """
        A misspelt store option suggests the option.
        """
        self.refused(
            self.broken(("gateway.store.fsynk", True)), {"gateway.store.fsynk": "did you mean fsync?"}
        )

    def test_unknown_addon(self):
        """
        An addon that does not exist is named with its index.
        """
        self.refused(
            self.connection(("addons", ["identity", "blok", "record"])),
            {"connections.payments.addons[1]": "there is no addon named 'blok'"},
        )

    def test_misspelt_addon_option(self):
        """
        A misspelt addon option suggests the option.
        """
        self.refused(
            self.connection(("addons", ["identity", {"record": {"result_row": 3}}])),
            {"connections.payments.addons[1].record.result_row": "did you mean result_rows?"},
        )

    def test_misspelt_preset(self):
        """
        A preset that does not exist suggests the closest one.
        """
        self.refused(
            self.connection(("addons", ["identity", {"block": {"presets": ["destructiv"]}}, "record"])),
            {"connections.payments.addons[1].block.presets": "did you mean destructive?"},
        )

    def test_addon_twice(self):
        """
        The same addon twice in a chain is refused.
        """
        self.refused(
            self.connection(("addons", ["identity", "record", "record"])),
            {"connections.payments.addons": "the addon 'record' appears twice"},
        )

    def test_misspelt_protocol(self):
        """
        An unknown protocol lists the known ones, and the protocol's own
        keys are not reported as unknown on top.
        """
        self.refused(self.connection(("protocol", "postgress")), {"connections.payments.protocol": "expected one of"})

    def test_two_connections_one_listener(self):
        """
        Two connections on one endpoint are refused at the second one in
        the file.
        """
        document = self.broken()
        document["connections"]["orders"] = copy.deepcopy(document["connections"]["payments"])
        # The file is written with its keys sorted: orders comes first.
        self.refused(document, {"connections.payments.listen": "the connection 'orders' already listens"})

    def test_every_problem_at_once(self):
        """
        Problems in every section are reported together, in the order of
        the file.
        """
        document = self.broken(
            ("gateway.signing_key", {"file": "nowhere.key"}),
            ("gateway.store.segment_bytes", 10),
            ("identity_providers.ci.jwks_file", "nowhere.json"),
            ("connections.payments.listen", "tcp:notaport"),
            ("connections.payments.target.ca", "nowhere-ca.crt"),
            ("connections.payments.addons", ["identity", "blok", {"record": {"rows": 1}}]),
        )
        found = self.refused(
            document,
            {
                "gateway.signing_key": "cannot read the secret file",
                "gateway.store.segment_bytes": "expected at least 4096",
                "identity_providers.ci.jwks_file": "does not exist",
                "connections.payments.listen": "not a valid endpoint",
                "connections.payments.target.ca": "does not exist",
                "connections.payments.addons[1]": "no addon named 'blok'",
                "connections.payments.addons[2].record.rows": "unknown option; this accepts result_bytes, result_rows",
            },
        )
        self.assertEqual(list(found)[0], "gateway.signing_key")

    def test_admin_listener(self):
        """
        The admin listener's endpoint is parsed too, and its section is
        checked alongside a broken store.
        """
        document = self.broken(
            ("gateway.admin", {"listen": "tcp:18443:interfase=127.0.0.1"}),
            ("gateway.store.backend", "sqlite"),
        )
        self.refused(
            document,
            {"gateway.admin.listen": "unexpected keyword argument", "gateway.store.backend": "expected one of file, postgres"},
        )

    def test_check_config_prints_every_problem(self):
        """
        C{hoopgw check-config} exits 1 and prints a count, then one line a
        problem with its key path.
        """
        path = os.path.join(self.directory, "broken.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(self.connection(("listen", "bogus:1"), ("alowed_groups", ["x"]), ("allowed_groups", None)), handle)
        error = io.StringIO()
        self.patch(sys, "stderr", error)
        self.assertEqual(cli.main(["check-config", path], out=io.StringIO()), 1)
        lines = error.getvalue().splitlines()
        self.assertEqual(lines[0], "%s: 2 problems" % (path,))
        self.assertTrue(lines[1].startswith("  connections.payments.alowed_groups: unknown key"), lines)
        self.assertTrue(lines[2].startswith("  connections.payments.listen: 'bogus:1' is not a valid endpoint"), lines)

    def test_skip_files(self):
        """
        C{check-config --skip-files} passes a file whose only problems are
        files and secrets this machine lacks, listing them, and still fails
        on anything else.
        """
        path = os.path.join(self.directory, "elsewhere.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(self.connection(("target.ca", "/nonexistent/db-ca.crt")), handle)
        out = io.StringIO()
        self.assertEqual(cli.main(["check-config", "--skip-files", path], out=out), 0)
        self.assertIn("skipped connections.payments.target.ca: the file /nonexistent/db-ca.crt does not exist", out.getvalue())
        with open(path, "w") as handle:
            yaml.safe_dump(self.connection(("target.ca", "/nonexistent/db-ca.crt"), ("listen", "tcp:x")), handle)
        error = io.StringIO()
        self.patch(sys, "stderr", error)
        self.assertEqual(cli.main(["check-config", "--skip-files", path], out=io.StringIO()), 1)
        self.assertIn("connections.payments.listen", error.getvalue())
        self.assertNotIn("target.ca", error.getvalue())


class TwistdStartTests(unittest.TestCase):
    """
    C{twistd hoopgw} with a broken file: the same message, a non-zero exit,
    no traceback.
    """

    def test_broken_file(self):
        """
        A file with an unparsable endpoint (which crashed twistd with a
        traceback before) and a misspelt key stops twistd with every problem
        and exit status 1.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "hoopgw.yaml")
        document = base_document()
        document["gateway"] = {"store": {"path": "audit"}, "state_dir": "state"}
        document["identity_providers"]["ci"]["jwks_file"] = os.path.join(directory, "nowhere.json")
        connection = document["connections"]["payments"]
        connection["listen"] = "bogus:15432"
        connection["alowed_groups"] = connection.pop("allowed_groups")
        with open(path, "w") as handle:
            yaml.safe_dump(document, handle)
        result = subprocess.run(
            [os.path.join(ROOT, ".venv", "bin", "twistd"), "-n", "--pidfile=", "hoopgw", "--config", path],
            cwd=directory,
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=120,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 1, output)
        self.assertNotIn("Traceback", output)
        self.assertIn("hoopgw cannot start: %s: " % (path,), output)
        for key in (
            "identity_providers.ci.jwks_file",
            "connections.payments.listen: 'bogus:15432' is not a valid endpoint",
            "connections.payments.alowed_groups: unknown key",
            "connections.payments.target.password",
        ):
            self.assertIn(key, output)
