"""
The configuration file and the twistd plugin: a bad file is refused with the
key path and what is expected; a good one builds one listener per
connection.
"""

import io
import os

import yaml
from twisted.application import service
from twisted.trial import unittest

from hoopgw import cli
from hoopgw import config as configuration
from hoopgw.options import ConfigError
from tests import support


class ConfigErrorTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def document(self, **changes):
        connection = support.postgres_connection(15432)
        for dotted, value in changes.items():
            keys = dotted.split("__")
            target = connection
            for key in keys[:-1]:
                target = target[key]
            if value is None:
                del target[keys[-1]]
            else:
                target[keys[-1]] = value
        return support.configuration_document(self.directory, {"payments": connection})

    def refused(self, document, path, words):
        error = self.assertRaises(ConfigError, configuration.parse, document)
        self.assertEqual(error.path, path)
        self.assertIn(words, str(error))
        return error

    def test_valid(self):
        """
        The harness's configuration is valid and becomes frozen objects.
        """
        config = configuration.parse(self.document())
        connection = config.connections["payments"]
        self.assertEqual(connection.protocol, "postgres")
        self.assertEqual([spec.name for spec in connection.addons], ["identity", "record"])
        self.assertEqual(connection.settings.target.database, "payments")

    def test_inline_secret(self):
        """
        A password written inline is refused, saying where secrets go.
        """
        self.refused(
            self.document(target__password="hunter2"),
            "connections.payments.target.password",
            "give {file: PATH} or {env: VARIABLE}",
        )

    def test_unknown_addon(self):
        """
        An addon that does not exist is named, with the known ones.
        """
        error = self.refused(self.document(addons=["identity", "blok"]), "connections.payments.addons[1]", "'blok'")
        self.assertIn("known addons: ", str(error))

    def test_unknown_option(self):
        """
        An option the addon does not declare is refused with its path.
        """
        self.refused(
            self.document(addons=[{"record": {"rows": 3}}]),
            "connections.payments.addons[0].record.rows",
            "unknown option",
        )

    def test_bad_option_type(self):
        """
        A value of the wrong type says what was expected.
        """
        self.refused(
            self.document(addons=[{"record": {"result_rows": "many"}}]),
            "connections.payments.addons[0].record.result_rows",
            "expected a whole number",
        )

    def test_tls_required(self):
        """
        A PostgreSQL connection without client TLS is refused unless the
        loopback development switch is on.
        """
        self.refused(self.document(tls=None), "connections.payments.tls", "must not cross the network in clear")

    def test_plaintext_only_on_loopback(self):
        """
        The plaintext switch is refused on a listener open to the network.
        """
        self.refused(
            self.document(tls=None, allow_plaintext_password=True, listen="tcp:15432"),
            "connections.payments.allow_plaintext_password",
            "only allowed when the connection listens on loopback",
        )

    def test_allowed_groups_required(self):
        """
        A connection must say who may use it.
        """
        self.refused(self.document(allowed_groups=None), "connections.payments.allowed_groups", "is required")

    def test_verify_needs_ca(self):
        """
        verify-full to the target needs the CA to verify against.
        """
        self.refused(self.document(target__ca=None), "connections.payments.target.ca", "is required when tls is")

    def test_missing_file(self):
        """
        A certificate path that does not exist is named.
        """
        self.refused(
            self.document(tls={"certificate": "/nonexistent.crt", "key": "/nonexistent.key"}),
            "connections.payments.tls.certificate",
            "does not exist",
        )

    def test_check_config_command(self):
        """
        C{hoopgw check-config} prints a summary and exits 0 for a good file,
        and exits 1 naming the key for a bad one.
        """
        path = os.path.join(self.directory, "good.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(self.document(), handle)
        out = io.StringIO()
        self.assertEqual(cli.main(["check-config", path], out=out), 0)
        self.assertIn("payments: postgres on tcp:15432", out.getvalue())
        bad = os.path.join(self.directory, "bad.yaml")
        with open(bad, "w") as handle:
            handle.write("connections: [1, 2\n")
        self.assertEqual(cli.main(["check-config", bad], out=io.StringIO()), 1)

    def test_example_configuration_shape(self):
        """
        etc/hoopgw.yaml, the documented example, fails only on the files it
        names that this machine does not have (its structure is valid).
        """
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "hoopgw.yaml")
        error = self.assertRaises(ConfigError, configuration.load, path)
        self.assertIn("does not exist", str(error))


class TapTests(unittest.TestCase):
    """
    C{twistd hoopgw}: options parsed, the service built from the file.
    """

    def test_service(self):
        """
        makeService opens the store and gives one named listener per
        connection under a MultiService.
        """
        from hoopgw import tap

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        document = support.configuration_document(
            directory, {"payments": support.postgres_connection(support.free_port())}
        )
        path = os.path.join(directory, "hoopgw.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(document, handle)
        options = tap.Options()
        options.parseOptions(["--config", path])
        gateway = tap.makeService(options)
        self.addCleanup(gateway.store.close)
        self.assertIsInstance(gateway, service.MultiService)
        self.assertIsNotNone(gateway.getServiceNamed("connection:payments"))

    def test_bad_file_stops_twistd(self):
        """
        A bad configuration stops twistd with the file, the key path and the
        reason, as a sentence (SystemExit), not a traceback.
        """
        from hoopgw import tap

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "hoopgw.yaml")
        with open(path, "w") as handle:
            handle.write("gateway: {}\nconnections: {}\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        error = self.assertRaises(SystemExit, tap.makeService, options)
        self.assertIn("connections: is required", str(error))
        self.assertIn("hoopgw cannot start", str(error))
