"""
C{hoopgw whoami}, run as a real process: the identity and groups the
gateway would derive from a token or a client certificate, per connection
(with LDAP groups where a connection takes them), which connections it may
use and why; and the identity addon's configuration checks.
"""

import json
import os
import sys

import yaml
from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from hoopgw import config as configuration
from hoopgw.options import ConfigError
from tests import identity_fixtures as fixtures
from tests import support
from tests.test_identity_certificates import provider_config as certificate_provider

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(test, connections, providers):
    directory = os.path.abspath(test.mktemp())
    os.makedirs(directory)
    all_providers = {"test": fixtures.test_provider()}
    all_providers.update(providers)
    document = support.configuration_document(directory, connections, providers=all_providers)
    path = os.path.join(directory, "hoopgw.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(document, handle)
    return path


def connection(port, identity, allowed_groups):
    settings = support.postgres_connection(port, addons=[{"identity": identity}, "record"])
    settings["allowed_groups"] = list(allowed_groups)
    return settings


def whoami(*arguments):
    environment = dict(os.environ, PYTHONPATH=ROOT)
    d = getProcessOutputAndValue(
        sys.executable, ["-m", "hoopgw.cli", "whoami"] + list(arguments), env=environment, path=ROOT
    )
    return d.addCallback(lambda result: (result[0].decode(), result[1].decode(), result[2]))


def mtls(settings):
    """
    A connection's settings with client certificates asked for.
    """
    _, ca_path = fixtures.client_ca()
    settings["tls"] = dict(settings["tls"], client_ca=ca_path)
    return settings


class WhoamiTests(unittest.TestCase):
    """
    What C{hoopgw whoami} prints.
    """

    def setUp(self):
        _, ca_path = fixtures.client_ca()
        self.config = write_config(
            self,
            {
                "payments": connection(15001, {"providers": ["test"]}, ["payments-bots"]),
                "admin": connection(
                    15002, {"providers": ["test"], "groups_from": "corp-ldap", "groups_combine": "directory"}, ["db-admins"]
                ),
                "workloads": mtls(connection(15003, {"certificates": ["bots"], "require_token": False}, ["k8s-payments"])),
                "unasked": connection(15005, {"certificates": ["bots"], "require_token": False}, ["k8s-payments"]),
            },
            {"corp-ldap": fixtures.ldap_provider(), "bots": certificate_provider()},
        )
        self.token_file = os.path.abspath(self.mktemp())

    def token(self, **arguments):
        with open(self.token_file, "w") as handle:
            handle.write(support.token(**arguments))
        return self.token_file

    @defer.inlineCallbacks
    def test_token(self):
        """
        For a bot's token: the payments connection admits it by its token's
        group, the admin connection by the groups the directory gives it
        (nested), and the workloads connection wants a certificate.
        """
        out, err, code = yield whoami("--config", self.config, "--token-file", self.token(groups=["payments-bots"]))
        self.assertEqual(code, 0, err)
        self.assertIn("payments (postgres): may connect: ci-bot is in payments-bots", out)
        self.assertIn("admin (postgres): may connect: ci-bot is in db-admins", out)
        self.assertIn("from directory: db-admins, db-readers, payments-bots", out)
        self.assertIn("directory corp-ldap at ldap://127.0.0.1", out)
        self.assertIn("workloads (postgres): may NOT connect", out)
        self.assertIn("kid test-1", out)

    @defer.inlineCallbacks
    def test_refused_everywhere(self):
        """
        alice, in marketing, may use no connection; each line says why,
        and the exit status says so.
        """
        out, err, code = yield whoami(
            "--config", self.config, "--token-file", self.token(subject="alice", groups=["marketing"]), "--json"
        )
        self.assertEqual(code, 1, err)
        results = {entry["connection"]: entry for entry in json.loads(out)}
        self.assertFalse(any(entry["allowed"] for entry in results.values()))
        self.assertIn("not in any group allowed", results["admin"]["reason"])
        self.assertEqual(results["admin"]["identity"]["groups"], ["marketing"])

    @defer.inlineCallbacks
    def test_certificate(self):
        """
        For a client certificate: the workloads connection maps its SPIFFE
        ID and admits it; the token connections do not.
        """
        _, certificate_path, _ = fixtures.client_certificate(
            "whoami", "x", uris=["spiffe://example.org/ns/payments/sa/ci-bot"]
        )
        out, err, code = yield whoami("--config", self.config, "--certificate", certificate_path)
        self.assertEqual(code, 0, err)
        self.assertIn("workloads (postgres): may connect: ci-bot is in k8s-payments", out)
        self.assertIn("proven by mtls", out)
        self.assertIn("payments (postgres): may NOT connect: no token was presented", out)
        # Without tls.client_ca the gateway never asks for the certificate.
        self.assertIn("unasked (postgres): may NOT connect", out)
        self.assertIn("certificate not considered: this connection does not ask clients for certificates", out)

    @defer.inlineCallbacks
    def test_certificate_from_another_ca(self):
        """
        A certificate no CA of a connection's tls.client_ca issued would
        not be verified by its TLS: whoami says so and decides without it.
        """
        from testbed import pki

        _, certificate_path, _ = fixtures.client_certificate(
            "whoami-impostor", "x", authority=pki.make_ca("another client CA"),
            uris=["spiffe://example.org/ns/payments/sa/ci-bot"],
        )
        out, err, code = yield whoami("--config", self.config, "--certificate", certificate_path, "--connection", "workloads")
        self.assertEqual(code, 1, err)
        self.assertIn("workloads (postgres): may NOT connect", out)
        self.assertIn("this connection's TLS would not verify it", out)

    @defer.inlineCallbacks
    def test_certificate_through_intermediate(self):
        """
        A certificate from an intermediate CA, with the intermediate in the
        file as a client sends it, is verified as TLS verifies it and
        admitted; an expired one is not considered, and whoami says why.
        """
        import datetime

        _, bundle, _ = fixtures.chained_client_certificate(
            "whoami-chained", "x", uris=["spiffe://example.org/ns/payments/sa/ci-bot"]
        )
        out, err, code = yield whoami("--config", self.config, "--certificate", bundle, "--connection", "workloads")
        self.assertEqual(code, 0, err)
        self.assertIn("workloads (postgres): may connect: ci-bot is in k8s-payments", out)
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
        _, expired, _ = fixtures.client_certificate(
            "whoami-expired", "x", uris=["spiffe://example.org/ns/payments/sa/ci-bot"],
            not_before=past, not_after=past + datetime.timedelta(days=1),
        )
        out, err, code = yield whoami("--config", self.config, "--certificate", expired, "--connection", "workloads")
        self.assertEqual(code, 1, err)
        self.assertIn("this connection's TLS would not verify it: certificate has expired", out)


class ConfigurationTests(unittest.TestCase):
    """
    The identity addon's references to providers are checked when the
    configuration is loaded.
    """

    def load(self, identity, providers):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        all_providers = {"test": fixtures.test_provider()}
        all_providers.update(providers)
        document = support.configuration_document(
            directory, {"payments": connection(15004, identity, ["payments-bots"])}, providers=all_providers
        )
        return configuration.parse(document, os.path.join(directory, "hoopgw.yaml"))

    def test_groups_from_must_be_ldap(self):
        """
        groups_from must name an ldap provider.
        """
        error = self.assertRaises(ConfigError, self.load, {"groups_from": "test"}, {})
        self.assertIn("takes an ldap provider", str(error))
        error = self.assertRaises(ConfigError, self.load, {"groups_from": "nowhere"}, {})
        self.assertIn("there is no identity provider named 'nowhere'", str(error))

    def test_certificates_must_be_certificate_providers(self):
        """
        certificates must name certificate providers, and tokens providers
        must be oidc or saml.
        """
        error = self.assertRaises(ConfigError, self.load, {"certificates": ["test"]}, {})
        self.assertIn("takes certificate providers", str(error))
        error = self.assertRaises(ConfigError, self.load, {"providers": ["corp-ldap"]}, {"corp-ldap": fixtures.ldap_provider()})
        self.assertIn("takes oidc or saml providers", str(error))

    def test_bind_password_not_inline(self):
        """
        The directory's bind password is never accepted inline.
        """
        error = self.assertRaises(
            ConfigError, self.load, {}, {"corp-ldap": fixtures.ldap_provider(bind_password="secret")}
        )
        self.assertIn("secrets are not accepted inline", str(error))

    def test_example_configuration(self):
        """
        etc/identity.yaml, with its files made up, is a valid configuration.
        """
        from testbed import pki

        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "etc"))
        pem = pki.make_ca("example").certificate_pem()
        for name in ("corp-ca.crt", "adfs-signing.crt", "spire-ca.crt", "gateway.crt", "gateway.key", "db-ca.crt", "cluster-ca.crt"):
            with open(os.path.join(directory, "etc", name), "wb") as handle:
                handle.write(pem)
        with open(os.path.join(ROOT, "etc", "identity.yaml")) as handle:
            text = handle.read().replace("/etc/hoopgw/", directory + "/etc/").replace("/var/lib/hoopgw", directory + "/var")
        config = configuration.parse(yaml.safe_load(text), os.path.join(directory, "identity.yaml"))
        self.assertEqual(
            {name: provider.type for name, provider in config.identity_providers.items()},
            {"ci": "oidc", "corp": "oidc", "adfs": "saml", "workloads": "certificate", "corp-ldap": "ldap"},
        )
        cluster = config.connections["cluster"].settings
        self.assertEqual(cluster.tls.client_ca, os.path.join(directory, "etc", "spire-ca.crt"))
        self.assertEqual(cluster.saml_header, "X-Hoopgw-Saml")
