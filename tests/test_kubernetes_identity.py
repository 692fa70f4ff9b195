"""
Identity on the Kubernetes front end beyond bearer JWTs: client
certificates (mutual TLS, checked against the connection's tls.client_ca
in the handshake and mapped by a certificate provider, SPIFFE IDs
included), alone or agreeing with a token, and SAML assertions in a
header or as the bearer token; with the real kubectl (a kubeconfig's
client-certificate and client-key) and the Python kubernetes client, and
the record they leave.
"""

import base64
import datetime
import logging
import os
import re

from jose import jwt
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from hoopgw import config as configuration
from testbed import pki
from hoopgw.identity import whoami
from testbed.standin import StandinAPIServer
from hoopgw.options import ConfigError
from tests import identity_fixtures as fixtures
from tests import support
from tests.support import in_thread, token
from tests.test_identity_certificates import provider_config as certificate_provider
from tests.test_kubernetes_gateway import GATEWAY_TOKEN, Cluster, api_certificates

SPIFFE_ID = "spiffe://example.org/ns/payments/sa/ci-bot"
SAML_HEADER = "X-Hoopgw-Saml"


class _Harness(support.GatewayHarness):
    """
    A gateway with one Kubernetes connection, C{cluster}, and the
    identity providers the tests use: the test OIDC issuer (C{test}), the
    run's client CA (C{bots}, mapping SPIFFE IDs and common names) and
    the run's SAML IdP (C{idp}).
    """

    def __init__(self, test, connection):
        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        providers = {"test": fixtures.test_provider(), "bots": certificate_provider(), "idp": fixtures.saml_provider()}
        self.start(test, support.configuration_document(self.directory, {"cluster": connection}, providers=providers))


class LogCapture:
    """
    Everything the gateway process logs while a test runs, at every
    level: Twisted's log events (hoopgw's own, and mitmproxy's, which the
    engine hands over; mitmproxy's logger is lowered to DEBUG for the
    test) and the standard library's records (the root logger lowered to
    DEBUG, so that a library's debug output counts too).  The clients'
    own loggers (the Python kubernetes client, urllib3) are left out: they
    are not the gateway.
    """

    CLIENTS = ("kubernetes", "urllib3")

    def __init__(self, test):
        self.texts = []
        globalLogPublisher.addObserver(self._event)
        test.addCleanup(globalLogPublisher.removeObserver, self._event)
        handler = logging.Handler(logging.DEBUG)
        handler.emit = self._record
        for name in ("", "mitmproxy"):
            logger = logging.getLogger(name)
            test.addCleanup(logger.setLevel, logger.level)
            logger.setLevel(logging.DEBUG)
        root = logging.getLogger()
        root.addHandler(handler)
        test.addCleanup(root.removeHandler, handler)

    def _event(self, event):
        texts = [formatEvent(event), repr(event)]
        failure = event.get("log_failure")
        if failure is not None:
            texts.append(failure.getTraceback())
        self.texts.extend(texts)

    def _record(self, record):
        if record.name.split(".")[0] in self.CLIENTS:
            return
        try:
            self.texts.append(record.getMessage())
        except Exception:
            self.texts.append("%r %r" % (record.msg, record.args))

    def assert_kept(self, test, *secrets):
        """
        Something was logged, and none of C{secrets} is in it.
        """
        test.assertTrue(self.texts, "nothing was logged: the capture does not work")
        logged = "\n".join(self.texts)
        for secret in secrets:
            test.assertNotIn(secret, logged)


class MutualCluster(Cluster):
    """
    L{Cluster} with client certificates asked for (the run's client CA as
    tls.client_ca) and the identity addon's options as given.
    """

    def __init__(self, test, identity, client_ca=True):
        certificate, key, ca, _, _, token_path = api_certificates()
        self.api = StandinAPIServer(reactor, token=GATEWAY_TOKEN)
        self.api.listen(certificate, key)
        test.addCleanup(self.api.stop)
        self.port = support.free_port()
        gateway_certificate, gateway_key, _ = support.gateway_certificate()
        tls = {"certificate": gateway_certificate, "key": gateway_key}
        if client_ca:
            tls["client_ca"] = fixtures.client_ca()[1]
        connection = {
            "protocol": "kubernetes",
            "listen": "tcp:%d:interface=127.0.0.1" % (self.port,),
            "tls": tls,
            "target": {
                "server": "https://127.0.0.1:%d" % (self.api.port.getHost().port,),
                "ca": ca,
                "token": {"file": token_path},
            },
            "allowed_groups": ["payments-bots"],
            "addons": [{"identity": identity}, "record"],
        }
        self.harness = _Harness(test, connection)
        self.service = self.harness.gateway.factories["cluster"]
        self.directory = self.harness.directory
        self.home = os.path.join(self.directory, "home")
        os.makedirs(self.home)
        self.kubeconfig = None

    def config(self, name, user_token=None, certificate=None, key=None):
        """
        A kubeconfig for the gateway with a token, a client certificate,
        or both.
        """
        if certificate:
            return self.write_kubeconfig(name, user_token, **{"client-certificate": certificate, "client-key": key})
        return self.write_kubeconfig(name, user_token)

    def python_client(self, certificate=None, key=None, user_token=None, headers=None):
        """
        A Python kubernetes client (use it off the reactor thread) with a
        client certificate, a bearer token and extra headers as given.
        """
        from kubernetes import client

        _, _, gateway_ca = support.gateway_certificate()
        configuration = client.Configuration()
        configuration.host = "https://127.0.0.1:%d" % (self.port,)
        configuration.ssl_ca_cert = gateway_ca
        # One attempt: a refused handshake is an answer, not a hiccup.
        configuration.retries = False
        if certificate:
            configuration.cert_file = certificate
            configuration.key_file = key
        if user_token:
            configuration.api_key = {"authorization": "Bearer %s" % (user_token,)}
        api_client = client.ApiClient(configuration)
        for name, value in (headers or {}).items():
            api_client.set_default_header(name, value)
        return api_client


def list_namespaces(api_client):
    """
    List the namespaces: C{(status, names or the error's text)}.
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    try:
        namespaces = client.CoreV1Api(api_client).list_namespace()
    except ApiException as error:
        return error.status, error.body
    except Exception as error:
        return None, "%s: %s" % (type(error).__name__, error)
    finally:
        api_client.close()
    return 200, [namespace.metadata.name for namespace in namespaces.items]


def signature_value(assertion):
    """
    The start of an assertion's SignatureValue (base64, as in the XML).
    """
    match = re.search(rb"SignatureValue[^>]*>\s*([A-Za-z0-9+/=]{40})", base64.b64decode(assertion))
    return match.group(1).decode("ascii")


def spiffe_certificate(stem="k8s-ci-bot", authority=None, uri=SPIFFE_ID):
    """
    A client certificate with a SPIFFE ID, written to disk:
    C{(Issued, certificate path, key path)}.
    """
    return fixtures.client_certificate(stem, "workload", authority=authority, uris=[uri])


class CertificateTests(unittest.TestCase):
    """
    Client certificates on the Kubernetes front end, with a connection
    that takes a certificate alone (require_token: false).
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = MutualCluster(self, {"certificates": ["bots"], "require_token": False})
        self.cluster.api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})
        yield self.cluster.ready()

    @defer.inlineCallbacks
    def test_certificate_alone_kubectl(self):
        """
        kubectl with a kubeconfig's client-certificate and client-key (a
        SPIFFE ID) and no token gets in as the identity the SPIFFE ID
        maps to; the session's provenance names the certificate by
        fingerprint and SPIFFE ID; the API server sees the gateway's token.
        """
        cluster = self.cluster
        issued, certificate, key = spiffe_certificate()
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=cluster.config("mtls", certificate=certificate, key=key))
        self.assertEqual(code, 0, err)
        self.assertIn("web-1", out)
        start = (yield cluster.harness.wait_for("session.start"))[0]
        identity = start["identity"]
        self.assertEqual((identity["subject"], identity["method"]), ("ci-bot", "mtls"))
        self.assertEqual(identity["groups"], ["k8s-payments", "payments-bots"])
        provenance = identity["provenance"]
        self.assertEqual(provenance["certificate_fingerprint"], pki.fingerprint(issued.certificate))
        self.assertEqual(provenance["spiffe_id"], SPIFFE_ID)
        self.assertEqual(provenance["provider"], "bots")
        # The session holds as long as the certificate does.
        self.assertEqual(provenance["expires_at"], int(issued.certificate.not_valid_after_utc.timestamp()))
        (end,) = yield cluster.wait_for_end("list", "pods")
        user = end["outcome"]["audit"]["user"]
        self.assertEqual((user["username"], user["groups"]), ("ci-bot", ["k8s-payments", "payments-bots"]))
        self.assertEqual(user["extra"]["hoopgw.io/method"], ["mtls"])
        self.assertEqual(set(cluster.api.authorizations), {"Bearer %s" % (GATEWAY_TOKEN,)})

    @defer.inlineCallbacks
    def test_certificate_alone_python_client(self):
        """
        The Python client's cert_file and key_file work the same way.
        """
        cluster = self.cluster
        issued, certificate, key = spiffe_certificate("k8s-py-bot")
        status, names = yield in_thread(list_namespaces, cluster.python_client(certificate, key))
        self.assertEqual((status, names), (200, ["default", "kube-system"]))
        start = (yield cluster.harness.wait_for("session.start"))[0]
        self.assertEqual(start["identity"]["provenance"]["certificate_fingerprint"], pki.fingerprint(issued.certificate))

    @defer.inlineCallbacks
    def test_certificate_and_token_agree(self):
        """
        A certificate and a token for the same subject: the method says
        both, the groups of both count, the record names the certificate
        beside the token's key id, and the identity ends when the first of
        the two does; the token is not in the record.
        """
        cluster = self.cluster
        issued, certificate, key = spiffe_certificate()
        user_token = token(groups=["auditors"])
        config = cluster.config("both", user_token, certificate, key)
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=config)
        self.assertEqual(code, 0, err)
        start = (yield cluster.harness.wait_for("session.start"))[0]
        identity = start["identity"]
        self.assertEqual((identity["subject"], identity["method"]), ("ci-bot", "oidc+mtls"))
        self.assertEqual(identity["groups"], ["auditors", "k8s-payments", "payments-bots"])
        self.assertEqual(identity["provenance"]["kid"], "test-1")
        self.assertEqual(identity["provenance"]["certificate"]["certificate_fingerprint"], pki.fingerprint(issued.certificate))
        # The identity holds while both credentials do: here the token ends first.
        token_end = jwt.get_unverified_claims(user_token)["exp"]
        self.assertLess(token_end, int(issued.certificate.not_valid_after_utc.timestamp()))
        self.assertEqual(identity["provenance"]["expires_at"], token_end)
        cluster.assert_token_kept(self, user_token)

    @defer.inlineCallbacks
    def test_certificate_and_token_disagree(self):
        """
        A certificate for ci-bot with a token for deploy-bot is refused
        with 401; the refusal records both subjects and the certificate's
        fingerprint, never the token, and nothing reaches the API server.
        """
        cluster = self.cluster
        issued, certificate, key = spiffe_certificate()
        user_token = token(subject="deploy-bot")
        config = cluster.config("disagree", user_token, certificate, key)
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=config)
        self.assertNotEqual(code, 0)
        self.assertIn("You must be logged in to the server", err)
        self.assertEqual(cluster.api.requests, [])
        refused = (yield cluster.harness.wait_for("session.refused"))[0]
        self.assertIn("the client certificate proves 'ci-bot' but the token is for 'deploy-bot'", refused["refusal"]["reason"])
        attributes = refused["attributes"]
        self.assertEqual(attributes["identity_refused"], "certificate-mismatch")
        self.assertEqual(attributes["identity_evidence"]["token_subject"], "deploy-bot")
        self.assertEqual(attributes["identity_evidence"]["certificate_fingerprint"], pki.fingerprint(issued.certificate))
        self.assertEqual(cluster.harness.events("session.start"), [])
        self.assertNotIn(user_token.encode(), cluster.harness.raw_store())

    @defer.inlineCallbacks
    def test_wrong_ca_kubectl(self):
        """
        kubectl offers its kubeconfig's certificate whatever CA names the
        gateway lists.  One from another CA (an unrelated one, or one that
        bears the trusted CA's name) is not verified by the connection's
        TLS: as the API server would, the gateway completes the handshake
        and answers 401, here even with a valid token; kubectl prints the
        reason and what to do (a Warning header); the refusal is recorded
        with the certificate's fingerprint and OpenSSL's reason; nothing
        reaches the API server.
        """
        cluster = self.cluster
        for name in ("an unrelated CA", "hoopgw test client CA"):
            issued, certificate, key = spiffe_certificate("k8s-impostor", authority=pki.make_ca(name))
            config = cluster.config("impostor", token(), certificate, key)
            out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=config)
            self.assertNotEqual(code, 0)
            self.assertIn("You must be logged in to the server", err)
            self.assertIn("Warning: hoopgw refused the session: the client certificate was refused", err)
            self.assertIn("present one issued by a CA this connection trusts", err)
            self.assertEqual(cluster.api.requests, [])
            yield cluster.harness.wait_for("session.refused")
            (refused, *_) = [
                event for event in cluster.harness.events("session.refused")
                if event["attributes"]["identity_evidence"].get("certificate_fingerprint") == pki.fingerprint(issued.certificate)
            ]
            self.assertIn("the client certificate was refused (unable to get local issuer certificate", refused["refusal"]["reason"])
            self.assertEqual(refused["attributes"]["identity_refused"], "certificate-untrusted")
        self.assertEqual(cluster.harness.events("session.start"), [])

    @defer.inlineCallbacks
    def test_tokens_not_logged(self):
        """
        Tokens presented beside a certificate (agreeing, disagreeing, and
        beside a certificate of another CA) are not in what the gateway
        logged at any level, whole or their signature, nor in the record.
        """
        cluster = self.cluster
        capture = LogCapture(self)
        _, certificate, key = spiffe_certificate()
        _, impostor, impostor_key = spiffe_certificate("k8s-log-impostor", authority=pki.make_ca("an unrelated CA"))
        tokens = [token(), token(subject="deploy-bot"), token()]
        codes = []
        for name, (user_token, presented) in enumerate(zip(tokens, [(certificate, key), (certificate, key), (impostor, impostor_key)])):
            _, err, code = yield cluster.kubectl("get", "pods", kubeconfig=cluster.config("log-%d" % (name,), user_token, *presented))
            codes.append(code == 0)
        self.assertEqual(codes, [True, False, False])
        secrets = tokens + [user_token.rsplit(".", 1)[1] for user_token in tokens]
        capture.assert_kept(self, *secrets)
        raw = cluster.harness.raw_store()
        for secret in secrets:
            self.assertNotIn(secret.encode(), raw)

    @defer.inlineCallbacks
    def test_wrong_ca_python_client(self):
        """
        The Python client (OpenSSL) offers its certificate whatever CA
        names the gateway lists; one from a CA the connection does not
        trust is refused with 401 and a sentence saying what to do.
        """
        cluster = self.cluster
        _, certificate, key = spiffe_certificate("k8s-py-impostor", authority=pki.make_ca("somebody else's CA"))
        status, body = yield in_thread(list_namespaces, cluster.python_client(certificate, key, user_token=token()))
        self.assertEqual(status, 401, body)
        self.assertIn("present one issued by a CA this connection trusts", body)
        self.assertEqual(cluster.api.requests, [])
        self.assertEqual(cluster.harness.events("session.start"), [])

    @defer.inlineCallbacks
    def test_expired_certificate(self):
        """
        An expired certificate from the trusted CA is refused the same way.
        """
        cluster = self.cluster
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
        _, certificate, key = fixtures.client_certificate(
            "k8s-expired", "workload", uris=[SPIFFE_ID], not_before=past, not_after=past + datetime.timedelta(days=1)
        )
        status, body = yield in_thread(list_namespaces, cluster.python_client(certificate, key))
        self.assertEqual(status, 401, body)
        self.assertIn("certificate has expired", body)
        self.assertEqual(cluster.api.requests, [])

    @defer.inlineCallbacks
    def test_unmapped_certificate(self):
        """
        A certificate from the trusted CA that no rule maps is refused by
        the identity addon (401, recorded with its fingerprint), even with
        a valid token: a presented certificate must prove something.
        """
        cluster = self.cluster
        issued, certificate, key = fixtures.client_certificate("k8s-unmapped", "someone.example.com")
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=cluster.config("unmapped", token(), certificate, key))
        self.assertNotEqual(code, 0)
        refused = (yield cluster.harness.wait_for("session.refused"))[0]
        self.assertEqual(refused["attributes"]["identity_refused"], "certificate-unmapped")
        self.assertEqual(refused["attributes"]["identity_evidence"]["certificate_fingerprint"], pki.fingerprint(issued.certificate))
        self.assertEqual(cluster.api.requests, [])

    @defer.inlineCallbacks
    def test_whoami(self):
        """
        C{hoopgw whoami}'s evaluation admits the certificate on this
        Kubernetes connection, and says why another CA's would not be
        verified by its TLS.
        """
        config = configuration.load(self.cluster.harness.config_path)
        issued, _, _ = spiffe_certificate("k8s-whoami")
        (entry,) = yield whoami.evaluate(config, reactor, certificate=issued.certificate_pem())
        self.assertTrue(entry["allowed"], entry)
        self.assertEqual((entry["protocol"], entry["identity"]["method"]), ("kubernetes", "mtls"))
        self.assertNotIn("login_as", entry)
        impostor, _, _ = spiffe_certificate("k8s-whoami-impostor", authority=pki.make_ca("somebody else's CA"))
        (entry,) = yield whoami.evaluate(config, reactor, certificate=impostor.certificate_pem())
        self.assertFalse(entry["allowed"])
        self.assertIn("this connection's TLS would not verify it", entry["certificate_ignored"])

    @defer.inlineCallbacks
    def test_whoami_command(self):
        """
        The real C{hoopgw whoami --certificate} on this configuration says
        the certificate's identity may use the Kubernetes connection, how
        it was proven (the certificate's fingerprint) and why.
        """
        from tests.test_identity_whoami import whoami as run_whoami

        issued, certificate, _ = spiffe_certificate("k8s-whoami-cli")
        out, err, code = yield run_whoami("--config", self.cluster.harness.config_path, "--certificate", certificate)
        self.assertEqual(code, 0, err)
        self.assertIn("cluster (kubernetes): may connect: ci-bot is in payments-bots", out)
        self.assertIn("proven by mtls", out)
        self.assertIn(pki.fingerprint(issued.certificate), out)


class RequiredCertificateTests(unittest.TestCase):
    """
    A connection that requires a certificate (and a token).
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = MutualCluster(self, {"certificates": ["bots"], "require_certificate": True})
        yield self.cluster.ready()

    @defer.inlineCallbacks
    def test_token_without_certificate(self):
        """
        A valid token without a certificate is refused (401), recorded,
        with a sentence saying what to do.
        """
        cluster = self.cluster
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=cluster.config("token-only", token()))
        self.assertNotEqual(code, 0)
        refused = (yield cluster.harness.wait_for("session.refused"))[0]
        self.assertEqual(refused["attributes"]["identity_refused"], "no-certificate")
        self.assertIn("client-certificate and client-key (kubeconfig)", refused["refusal"]["reason"])
        self.assertEqual(cluster.api.requests, [])

    @defer.inlineCallbacks
    def test_certificate_and_token(self):
        """
        With both, the request goes through.
        """
        cluster = self.cluster
        _, certificate, key = spiffe_certificate()
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=cluster.config("both", token(), certificate, key))
        self.assertEqual(code, 0, err)
        start = (yield cluster.harness.wait_for("session.start"))[0]
        self.assertEqual(start["identity"]["method"], "oidc+mtls")


class SAMLTests(unittest.TestCase):
    """
    SAML assertions on the Kubernetes front end: in the X-Hoopgw-Saml
    header, or as the bearer token.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = MutualCluster(self, {}, client_ca=False)
        self.cluster.api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})
        yield self.cluster.ready()

    def assert_kept(self, assertion):
        """
        Neither the assertion nor its signature is in the record, and the
        header never reached the API server.
        """
        raw = self.cluster.harness.raw_store()
        self.assertNotIn(assertion.encode(), raw)
        self.assertNotIn(assertion[:64].encode(), raw)
        self.assertNotIn(SAML_HEADER.lower(), set().union(*self.cluster.api.header_names))
        self.assertEqual(set(self.cluster.api.authorizations), {"Bearer %s" % (GATEWAY_TOKEN,)})

    @defer.inlineCallbacks
    def test_header(self):
        """
        A signed assertion in the header proves the identity; the record
        names the IdP and the assertion's ID, never the assertion.
        """
        cluster = self.cluster
        assertion = fixtures.assertion()
        status, names = yield in_thread(list_namespaces, cluster.python_client(headers={SAML_HEADER: assertion}))
        self.assertEqual((status, names), (200, ["default", "kube-system"]))
        start = (yield cluster.harness.wait_for("session.start"))[0]
        identity = start["identity"]
        self.assertEqual((identity["subject"], identity["method"]), ("ci-bot", "saml"))
        self.assertEqual(identity["provenance"]["idp"], fixtures.IDP_ENTITY)
        self.assertEqual(identity["provenance"]["provider"], "idp")
        self.assertTrue(identity["token_id"].startswith("_"))
        self.assert_kept(assertion)

    @defer.inlineCallbacks
    def test_tampered(self):
        """
        An assertion whose subject was changed after signing is refused
        (401), recorded as a bad signature, and kept out of the record.
        """
        cluster = self.cluster
        xml = base64.b64decode(fixtures.assertion(subject="ci-bot"))
        self.assertIn(b">ci-bot<", xml)
        tampered = base64.b64encode(xml.replace(b">ci-bot<", b">db-admin<")).decode()
        status, body = yield in_thread(list_namespaces, cluster.python_client(headers={SAML_HEADER: tampered}))
        self.assertEqual(status, 401, body)
        self.assertIn("signature is not valid", body)
        refused = (yield cluster.harness.wait_for("session.refused"))[0]
        self.assertEqual(refused["attributes"]["identity_refused"], "saml-signature")
        self.assertEqual(refused["attributes"]["identity_evidence"]["idp"], fixtures.IDP_ENTITY)
        self.assertEqual(cluster.api.requests, [])
        self.assertNotIn(tampered[:64].encode(), cluster.harness.raw_store())

    @defer.inlineCallbacks
    def test_bearer_kubectl(self):
        """
        kubectl carries an assertion as its kubeconfig token (the bearer
        token) just as well.
        """
        cluster = self.cluster
        assertion = fixtures.assertion()
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=cluster.config("saml", assertion))
        self.assertEqual(code, 0, err)
        self.assertIn("web-1", out)
        start = (yield cluster.harness.wait_for("session.start"))[0]
        self.assertEqual(start["identity"]["method"], "saml")
        self.assert_kept(assertion)

    @defer.inlineCallbacks
    def test_header_and_bearer(self):
        """
        An assertion in the header and a bearer token at once are one
        credential too many: 400, with what to do, and nothing forwarded.
        """
        cluster = self.cluster
        bearer, assertion = token(), fixtures.assertion()
        client = cluster.python_client(user_token=bearer, headers={SAML_HEADER: assertion})
        status, body = yield in_thread(list_namespaces, client)
        self.assertEqual(status, 400, body)
        self.assertIn("send one credential", body)
        self.assertEqual(cluster.api.requests, [])
        # A failed access attempt, in the record without either credential.
        refused = (yield cluster.harness.wait_for("session.refused"))[0]
        self.assertEqual(refused["attributes"]["identity_refused"], "ambiguous-credentials")
        self.assertEqual(refused["refusal"]["rule"], "identity:ambiguous-credentials")
        raw = cluster.harness.raw_store()
        self.assertNotIn(bearer.encode(), raw)
        self.assertNotIn(assertion[:64].encode(), raw)

    @defer.inlineCallbacks
    def test_secrets_not_logged(self):
        """
        Assertions accepted (in the header, as kubectl's bearer token) and
        refused (tampered; beside a bearer token), and that bearer token:
        none of them, nor an assertion's SignatureValue, nor the token's
        signature, is in what the gateway logged at any level, nor in the
        record.
        """
        cluster = self.cluster
        capture = LogCapture(self)
        in_header, as_bearer, beside_token = fixtures.assertion(), fixtures.assertion(), fixtures.assertion()
        tampered = base64.b64encode(base64.b64decode(fixtures.assertion()).replace(b">ci-bot<", b">db-admin<")).decode()
        user_token = token()
        status, _ = yield in_thread(list_namespaces, cluster.python_client(headers={SAML_HEADER: in_header}))
        self.assertEqual(status, 200)
        status, _ = yield in_thread(list_namespaces, cluster.python_client(headers={SAML_HEADER: tampered}))
        self.assertEqual(status, 401)
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=cluster.config("saml", as_bearer))
        self.assertEqual(code, 0, err)
        client = cluster.python_client(user_token=user_token, headers={SAML_HEADER: beside_token})
        status, _ = yield in_thread(list_namespaces, client)
        self.assertEqual(status, 400)
        secrets = [user_token, user_token.rsplit(".", 1)[1]]
        for assertion in (in_header, tampered, as_bearer, beside_token):
            secrets += [assertion, assertion[:64], signature_value(assertion)]
        capture.assert_kept(self, *secrets)
        raw = cluster.harness.raw_store()
        for secret in secrets:
            self.assertNotIn(secret.encode(), raw)


class ConfigurationTests(unittest.TestCase):
    """
    The Kubernetes connection's client_ca and saml_header settings are
    checked when the configuration is loaded.
    """

    def parse(self, **settings):
        from hoopgw.kubernetes.settings import parse_connection

        certificate, key, _ = support.gateway_certificate()
        raw = {
            "target": {"server": "https://127.0.0.1:6443", "insecure_skip_verify": True, "token": {"env": "T"}},
            "tls": {"certificate": certificate, "key": key},
        }
        raw.update(settings)
        return parse_connection(raw, "connections.cluster", "tcp:16443:interface=127.0.0.1")

    def test_saml_header(self):
        """
        The header defaults to X-Hoopgw-Saml, may be turned off, and must
        be a header name of its own.
        """
        self.assertEqual(self.parse().saml_header, SAML_HEADER)
        self.assertIsNone(self.parse(saml_header=None).saml_header)
        error = self.assertRaises(ConfigError, self.parse, saml_header="X Saml")
        self.assertIn("connections.cluster.saml_header", str(error))
        error = self.assertRaises(ConfigError, self.parse, saml_header="Authorization")
        self.assertIn("choose a header of its own", str(error))

    def test_client_ca_not_a_certificate(self):
        """
        A client_ca file without a PEM certificate is refused when the
        front end's TLS is built.
        """
        from hoopgw.kubernetes import tls

        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("not a certificate\n")
        certificate, key, _ = support.gateway_certificate()
        settings = self.parse(tls={"certificate": certificate, "key": key, "client_ca": path})
        error = self.assertRaises(ConfigError, tls.client_context, settings.tls)
        self.assertIn("tls.client_ca", str(error))


def _handshake(context, issued):
    """
    A TLS handshake in memory between a client presenting C{issued} (or
    no certificate) and a server connection from C{context}.

    @return: the server's C{SSL.Connection}, the handshake done.
    """
    from OpenSSL import SSL

    from hoopgw.kubernetes import tls

    server = tls.accept(context)
    client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if issued is not None:
        client_context.use_certificate(issued.certificate)
        client_context.use_privatekey(issued.key)
    client = SSL.Connection(client_context)
    client.set_connect_state()
    for _ in range(10):
        for one, other in ((client, server), (server, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(one.bio_read(65536))
            except SSL.WantReadError:
                pass
    # TLS 1.3: the server has the client's certificate once it read its Finished.
    client.sendall(b"x")
    server.bio_write(client.bio_read(65536))
    server.recv(1)
    return server


class VerdictTests(unittest.TestCase):
    """
    L{hoopgw.kubernetes.tls.client_certificate}: the certificate a client
    presented and why OpenSSL did not verify it against tls.client_ca.
    """

    def setUp(self):
        from hoopgw.kubernetes import tls
        from hoopgw.options import ClientTLS

        certificate, key, _ = support.gateway_certificate()
        self.authority, ca_path = fixtures.client_ca()
        self.context = tls.client_context(ClientTLS(certificate, key, ca_path))

    def verdict(self, issued):
        from hoopgw.kubernetes import tls

        certificate, problem = tls.client_certificate(_handshake(self.context, issued))
        if issued is not None:
            self.assertEqual(certificate.to_cryptography(), issued.certificate)
        return certificate, problem

    def test_verdicts(self):
        """
        A certificate of the CA passes; another CA's, an expired one and
        one not meant for client authentication are named with OpenSSL's
        reason; without a certificate there is nothing to judge.
        """
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
        cases = [
            (self.authority.issue("ok", client=True, server=False), None),
            (pki.make_ca("hoopgw test client CA").issue("x", client=True, server=False), "unable to get local issuer certificate"),
            (self.authority.issue("x", client=True, server=False, not_before=past, not_after=past + datetime.timedelta(days=1)),
             "certificate has expired"),
            (self.authority.issue("x", client=False, server=True), "unsuitable certificate purpose"),
        ]
        for issued, reason in cases:
            _, problem = self.verdict(issued)
            if reason is None:
                self.assertIsNone(problem)
            else:
                self.assertIn(reason, problem or "")
        self.assertEqual(self.verdict(None), (None, None))
