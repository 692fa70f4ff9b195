"""
Client certificates as identities: checked against the configured CA
(signature, validity, key usage), mapped by rules on the subject and
subject alternative names (SPIFFE IDs included), and through the
PostgreSQL gateway with the real psql presenting sslcert/sslkey: alone,
with an agreeing token, with a disagreeing one, and from a CA the gateway
does not trust.
"""

import datetime

from OpenSSL import crypto
from twisted.internet import defer
from twisted.trial import unittest

from testbed import pki
from hoopgw.identity import certificates
from hoopgw.identity.errors import IdentityError
from hoopgw.options import ConfigError
from tests import identity_fixtures as fixtures
from tests import support
from tests.identity_fixtures import IdentityGateway
from tests.support import psql

SPIFFE_RULE = {
    "name": "workloads",
    "spiffe": r"spiffe://example\.org/ns/(?P<namespace>[a-z0-9-]+)/sa/(?P<account>[a-z0-9-]+)",
    "subject": "{account}",
    "groups": ["payments-bots", "k8s-{namespace}"],
}
CN_RULE = {
    "name": "bots",
    "common_name": r"(?P<bot>[a-z0-9-]+)\.bots\.example\.org",
    "subject": "{bot}",
    "groups": ["payments-bots"],
}


def provider_config(**overrides):
    # The CAs that sign client certificates: the client CA and an intermediate under it.
    _, ca_path = fixtures.issuing_cas()
    raw = {"type": "certificate", "ca": ca_path, "rules": [SPIFFE_RULE, CN_RULE]}
    raw.update(overrides)
    return raw


def make_provider(**overrides):
    raw = provider_config(**overrides)
    raw.pop("type")
    return certificates.parse_provider("bots", raw, "identity_providers.bots").build()


class MappingTests(unittest.TestCase):
    """
    L{certificates.CertificateProvider.identify}, as any front end calls it.
    """

    def setUp(self):
        self.provider = make_provider()
        self.authority, _ = fixtures.client_ca()

    def refused(self, certificate, reason):
        error = self.assertRaises(IdentityError, self.provider.identify, certificate)
        self.assertEqual(error.reason, reason, str(error))
        return error

    def test_spiffe(self):
        """
        An X509-SVID's SPIFFE ID maps to its service account, with groups
        built from the namespace; the provenance names the certificate by
        fingerprint.
        """
        issued = self.authority.issue("x", uris=["spiffe://example.org/ns/payments/sa/ci-bot"], client=True, server=False)
        identity = self.provider.identify(issued.certificate)
        self.assertEqual((identity.subject, identity.method, identity.kind), ("ci-bot", "mtls", "service"))
        self.assertEqual(identity.groups, {"payments-bots", "k8s-payments"})
        self.assertEqual(identity.provenance["certificate_fingerprint"], pki.fingerprint(issued.certificate))
        self.assertEqual(identity.provenance["spiffe_id"], "spiffe://example.org/ns/payments/sa/ci-bot")
        self.assertEqual(identity.provenance["rule"], "workloads")
        self.assertEqual(identity.issuer, self.authority.certificate.subject.rfc4514_string())

    def test_common_name(self):
        """
        A certificate without a SPIFFE ID falls through to the rule on its
        common name.  pyOpenSSL certificates (what a TLS transport hands
        over) and PEM are accepted as well.
        """
        issued = self.authority.issue("deploy-bot.bots.example.org", client=True, server=False)
        for form in (issued.certificate, crypto.X509.from_cryptography(issued.certificate), issued.certificate_pem()):
            self.assertEqual(self.provider.identify(form).subject, "deploy-bot")

    def test_two_uris_are_not_a_spiffe_id(self):
        """
        An X509-SVID carries exactly one URI SAN: with two, the SPIFFE rule
        does not match.
        """
        issued = self.authority.issue(
            "x", uris=["spiffe://example.org/ns/payments/sa/ci-bot", "spiffe://example.org/ns/admin/sa/root"], client=True
        )
        self.refused(issued.certificate, "certificate-unmapped")

    def test_wrong_ca(self):
        """
        A certificate from another CA, even with the same CA name, is not
        trusted.
        """
        impostor = pki.make_ca("hoopgw test client CA")
        issued = impostor.issue("x", uris=["spiffe://example.org/ns/payments/sa/ci-bot"], client=True, server=False)
        self.refused(issued.certificate, "certificate-untrusted")

    def test_expired(self):
        """
        An expired certificate is refused.
        """
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
        issued = self.authority.issue(
            "ci-bot.bots.example.org", client=True, server=False, not_before=past, not_after=past + datetime.timedelta(days=1)
        )
        self.refused(issued.certificate, "certificate-expired")

    def test_server_only_usage(self):
        """
        A certificate whose extended key usage is server authentication
        only cannot authenticate a client.
        """
        issued = self.authority.issue("ci-bot.bots.example.org", client=False, server=True)
        error = self.refused(issued.certificate, "certificate-usage")
        self.assertIn("clientAuth", str(error))

    def test_unmapped(self):
        """
        A trusted certificate no rule maps proves nothing.
        """
        issued = self.authority.issue("someone.example.com", client=True, server=False)
        self.refused(issued.certificate, "certificate-unmapped")

    def test_template_checked(self):
        """
        A rule whose templates use a name its patterns do not capture is a
        configuration error.
        """
        rule = dict(CN_RULE, subject="{robot}")
        error = self.assertRaises(ConfigError, make_provider, rules=[rule])
        self.assertIn("{robot} is not a named group", str(error))

    def test_spiffe_id_form(self):
        """
        Only well-formed SPIFFE IDs count as such.
        """
        self.assertTrue(certificates.is_spiffe_id("spiffe://example.org/ns/a/sa/b"))
        for bad in ("spiffe://Example.org/a", "spiffe://example.org/a/../b", "spiffe://example.org:8443/a", "https://example.org/a"):
            self.assertFalse(certificates.is_spiffe_id(bad), bad)


class GatewayTests(unittest.TestCase):
    """
    Mutual TLS through the PostgreSQL gateway, with psql's sslcert/sslkey.
    """

    def gateway(self, **identity):
        _, ca_path = fixtures.client_ca()
        certificate, key, _ = support.gateway_certificate()
        options = {"certificates": ["bots"], "require_token": False}
        options.update(identity)
        return IdentityGateway(
            self,
            providers={"bots": provider_config()},
            identity=options,
            tls={"certificate": certificate, "key": key, "client_ca": ca_path},
        )

    def client(self, stem="ci-bot", uri="spiffe://example.org/ns/payments/sa/ci-bot", authority=None):
        issued, certificate, key = fixtures.client_certificate(stem, "client", authority=authority, uris=[uri])
        return issued, {"sslcert": certificate, "sslkey": key}

    @defer.inlineCallbacks
    def test_certificate_alone(self):
        """
        A client certificate alone proves who the client is when the
        connection does not require a token (libpq still sends a password,
        which is ignored); the record names the certificate.
        """
        gateway = self.gateway()
        issued, files = self.client()
        out, err, code = yield psql(gateway.dsn(**files), "-c", "SELECT current_user", password="mtls")
        self.assertEqual((out.strip(), code), ("app", 0), err)
        (start,) = yield gateway.wait_for("session.start")
        identity = start["identity"]
        self.assertEqual((identity["subject"], identity["method"]), ("ci-bot", "mtls"))
        self.assertEqual(identity["provenance"]["certificate_fingerprint"], pki.fingerprint(issued.certificate))
        self.assertEqual(identity["groups"], ["k8s-payments", "payments-bots"])

    @defer.inlineCallbacks
    def test_certificate_through_intermediate(self):
        """
        A certificate issued by an intermediate CA is accepted when the
        client sends the intermediate with it (psql's sslcert holding both):
        TLS verifies the chain up to tls.client_ca (the root alone), the
        provider checks that a CA of its ca list (the intermediate) issued
        it.
        """
        gateway = self.gateway()
        issued, certificate, key = fixtures.chained_client_certificate(
            "ci-bot-chained", "client", uris=["spiffe://example.org/ns/payments/sa/ci-bot"]
        )
        out, err, code = yield psql(gateway.dsn(sslcert=certificate, sslkey=key), "-c", "SELECT current_user", password="mtls")
        self.assertEqual((out.strip(), code), ("app", 0), err)
        (start,) = yield gateway.wait_for("session.start")
        self.assertEqual(start["identity"]["subject"], "ci-bot")
        self.assertEqual(start["identity"]["provenance"]["certificate_fingerprint"], pki.fingerprint(issued.certificate))

    @defer.inlineCallbacks
    def test_certificate_and_token_agree(self):
        """
        A certificate and a token for the same subject: both are recorded,
        the method says so, and the groups of both count.
        """
        gateway = self.gateway()
        issued, files = self.client()
        out, err, code = yield psql(gateway.dsn(**files), "-c", "SELECT 1", password=support.token(groups=["auditors"]))
        self.assertEqual((out.strip(), code), ("1", 0), err)
        (start,) = yield gateway.wait_for("session.start")
        identity = start["identity"]
        self.assertEqual(identity["method"], "oidc+mtls")
        self.assertEqual(identity["provenance"]["kid"], "test-1")
        self.assertEqual(
            identity["provenance"]["certificate"]["certificate_fingerprint"], pki.fingerprint(issued.certificate)
        )
        self.assertEqual(identity["groups"], ["auditors", "k8s-payments", "payments-bots"])

    @defer.inlineCallbacks
    def test_mismatch_with_token(self):
        """
        A certificate for ci-bot with a token for deploy-bot is refused:
        a certificate identity and a token identity must agree.
        """
        gateway = self.gateway(match_user=False)
        _, files = self.client()
        out, err, code = yield psql(gateway.dsn(**files), "-c", "SELECT 1", password=support.token(subject="deploy-bot"))
        self.assertNotEqual(code, 0)
        self.assertIn("the client certificate proves 'ci-bot' but the token is for 'deploy-bot'", err)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["attributes"]["identity_refused"], "certificate-mismatch")
        self.assertEqual(refused["attributes"]["identity_evidence"]["certificate_subject"], "ci-bot")

    @defer.inlineCallbacks
    def test_wrong_ca_refused(self):
        """
        A certificate from a CA the gateway does not trust fails the TLS
        handshake: no session starts.
        """
        gateway = self.gateway()
        _, files = self.client(stem="impostor", authority=pki.make_ca("hoopgw test client CA"))
        out, err, code = yield psql(gateway.dsn(**files), "-c", "SELECT 1", password=support.token())
        self.assertNotEqual(code, 0)
        self.assertIn("SSL", err.upper())
        self.assertEqual(gateway.events("session.start"), [])

    @defer.inlineCallbacks
    def test_certificate_required(self):
        """
        With require_certificate, a valid token without a certificate is
        refused with a sentence saying what to do.
        """
        gateway = self.gateway(require_certificate=True, require_token=True)
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=support.token())
        self.assertNotEqual(code, 0)
        self.assertIn("requires a client certificate; connect with sslcert and sslkey", err)

    @defer.inlineCallbacks
    def test_token_required_by_default(self):
        """
        Unless the connection says a certificate suffices, a certificate
        with a password that is not a token is refused.
        """
        gateway = self.gateway(require_token=True)
        _, files = self.client()
        out, err, code = yield psql(gateway.dsn(**files), "-c", "SELECT 1", password="mtls")
        self.assertNotEqual(code, 0)
        self.assertIn("not a JSON Web Token", err)
