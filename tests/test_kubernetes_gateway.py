"""
The Kubernetes gateway end to end: the stand-in API server behind it, the
real kubectl and the Python kubernetes client in front, small real addons
in the chain, and the record it leaves.
"""

import base64
import hashlib
import io
import json
import os
import shutil
import time

import yaml
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.trial import unittest

from hoopgw import cast as casts
from hoopgw import cli
from testbed import pki
from testbed.standin import StandinAPIServer
from hoopgw.model import Decision
from hoopgw.store.verify import verify_store
from tests import support
from tests.replay_support import ReplayServer, play_session
from tests.support import AdminGatewayHarness, GatewayHarness, in_thread, token

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
GATEWAY_TOKEN = "gateway-sa-token-do-not-leak"
PAN = "4111 1111 1111 1111"
MASKED = "411111******1111"
ADDONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kubernetes_addons.py")
CONFIGMAP = "cm"

_shared = {}


def api_certificates():
    """
    C{(certificate, key, CA, client certificate, client key)} for the
    stand-in API server and the gateway's client certificate.
    """
    if "api" not in _shared:
        directory = os.path.join(support.workspace(), "kubernetes")
        os.makedirs(directory, exist_ok=True)
        authority = pki.make_ca("stand-in cluster CA")
        certificate, key = authority.issue("kube-apiserver", dns_names=["localhost"], ip_addresses=["127.0.0.1"]).write(
            directory, "apiserver"
        )
        client_certificate, client_key = authority.issue("hoopgw-gateway", client=True, server=False).write(
            directory, "gateway-client"
        )
        ca, _ = authority.write(directory, "cluster-ca")
        token_path = os.path.join(directory, "gateway.token")
        with open(token_path, "w") as handle:
            handle.write(GATEWAY_TOKEN + "\n")
        _shared["api"] = (certificate, key, ca, client_certificate, client_key, token_path)
    return _shared["api"]


def addon(name, options=None):
    entry = {"path": ADDONS, "name": name}
    if options:
        entry["options"] = options
    return entry


class Cluster:
    """
    A stand-in API server and a gateway in front of it, in the test's
    reactor, and a kubeconfig pointing kubectl at the gateway.
    """

    def __init__(self, test, addons=("identity", "record"), credential="token", impersonate=None, subject="ci-bot",
                 target_ca=None, admin=None):
        certificate, key, ca, client_certificate, client_key, token_path = api_certificates()
        self.api = StandinAPIServer(reactor, token=GATEWAY_TOKEN if credential == "token" else None,
                                    client_ca=ca if credential == "certificate" else None)
        self.api.listen(certificate, key)
        test.addCleanup(self.api.stop)
        self.api_port = self.api.port.getHost().port
        port = support.free_port()
        target = {"server": "https://127.0.0.1:%d" % (self.api_port,), "ca": target_ca or ca}
        if credential == "token":
            target["token"] = {"file": token_path}
        else:
            target.update(client_certificate=client_certificate, client_key=client_key)
        if impersonate is not None:
            target["impersonate"] = impersonate
        gateway_certificate, gateway_key, gateway_ca = support.gateway_certificate()
        connection = {
            "protocol": "kubernetes",
            "listen": "tcp:%d:interface=127.0.0.1" % (port,),
            "tls": {"certificate": gateway_certificate, "key": gateway_key},
            "target": target,
            "allowed_groups": ["payments-bots"],
            "addons": list(addons),
        }
        if admin is None:
            self.harness = GatewayHarness(test, connections={"cluster": connection})
        else:
            # The admin listener (approvals API) on, and the people issuer for approvers.
            self.harness = AdminGatewayHarness(test, connections={"cluster": connection}, admin=admin)
        self.port = port
        self.service = self.harness.gateway.factories["cluster"]
        self.directory = self.harness.directory
        self.home = os.path.join(self.directory, "home")
        os.makedirs(self.home)
        self.kubeconfig = self.write_kubeconfig("kubeconfig", token(subject))

    def ready(self):
        return self.service.listening

    def addon(self, name):
        return dict(self.harness.gateway.chains["cluster"].addons)[name]

    def write_kubeconfig(self, name, user_token, **credentials):
        """
        A kubeconfig for the gateway with C{user_token} (if any) and other
        kubeconfig user fields (C{client-certificate}, C{client-key}).
        """
        _, _, gateway_ca = support.gateway_certificate()
        user = {"token": user_token} if user_token else {}
        user.update(credentials)
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {"name": "gw", "cluster": {"server": "https://127.0.0.1:%d" % (self.port,), "certificate-authority": gateway_ca}}
            ],
            "users": [{"name": "bot", "user": user}],
            "contexts": [{"name": "gw", "context": {"cluster": "gw", "user": "bot", "namespace": "default"}}],
            "current-context": "gw",
        }
        path = os.path.join(self.directory, name)
        with open(path, "w") as handle:
            yaml.safe_dump(document, handle)
        return path

    def kubectl(self, *arguments, kubeconfig=None, stdin=None):
        """
        Run the real kubectl.  @return: a Deferred firing with C{(stdout,
        stderr, exit code)} as text.
        """
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.home,
            "KUBECONFIG": kubeconfig or self.kubeconfig,
        }
        args = ["--request-timeout=20s"] + list(arguments)
        # stdin is closed unless given: kubectl asks for a password on a terminal otherwise.
        d = support._run_with_stdin(KUBECTL, args, environment, stdin or b"")
        return d.addCallback(lambda result: (result[0].decode(), result[1].decode(), result[2]))

    def client(self, user_token=None):
        """
        A Python kubernetes client for the gateway (use it off the reactor thread).
        """
        from kubernetes import client

        _, _, gateway_ca = support.gateway_certificate()
        configuration = client.Configuration()
        configuration.host = "https://127.0.0.1:%d" % (self.port,)
        configuration.ssl_ca_cert = gateway_ca
        configuration.api_key = {"authorization": "Bearer %s" % (user_token or token(),)}
        return client.ApiClient(configuration)

    def ends(self, verb=None, resource=None):
        """
        The C{command.end} events of Kubernetes requests, optionally only
        those with this verb and resource.
        """
        found = []
        for event in self.harness.events("command.end"):
            audit = event.get("outcome", {}).get("audit")
            if audit is None:
                continue
            if verb is not None and audit["verb"] != verb:
                continue
            if resource is not None and audit.get("objectRef", {}).get("resource") != resource:
                continue
            found.append(event)
        return found

    @defer.inlineCallbacks
    def wait_for_end(self, verb, resource, count=1, timeout=10):
        for _ in range(int(timeout / 0.05)):
            found = self.ends(verb, resource)
            if len(found) >= count:
                return found
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("no %s %s request recorded: %r" % (verb, resource, self.ends()))

    def assert_token_kept(self, test, *client_tokens):
        """
        The API server saw only the gateway's credential, and neither it nor
        the client's token is in the record.
        """
        seen = set(self.api.authorizations)
        if self.api.token is not None:
            test.assertEqual(seen, {"Bearer %s" % (GATEWAY_TOKEN,)})
        raw = self.harness.raw_store()
        for client_token in client_tokens:
            for value in seen:
                test.assertNotIn(client_token, value or "")
            test.assertNotIn(client_token.encode(), raw)
        test.assertNotIn(GATEWAY_TOKEN.encode(), raw)


class KubectlTests(unittest.TestCase):
    """
    kubectl works unchanged through the gateway, with its own token, and the
    API server sees only the gateway's credential.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = Cluster(self)
        yield self.cluster.ready()

    @defer.inlineCallbacks
    def test_get_and_list(self):
        """
        C{kubectl get pods} and C{get namespaces} list what the API server
        holds; each request is recorded as a complete audit event with the
        identity, the object reference, the response code and the decision;
        the client's token never reaches the API server or the record.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})
        out, err, code = yield cluster.kubectl("get", "pods")
        self.assertEqual(code, 0, err)
        self.assertIn("web-1", out)
        out, err, code = yield cluster.kubectl("get", "namespaces", "-o", "name")
        self.assertEqual((code, sorted(out.split())), (0, ["namespace/default", "namespace/kube-system"]), err)
        (end,) = yield cluster.wait_for_end("list", "pods")
        audit = end["outcome"]["audit"]
        self.assertEqual(audit["kind"], "Event")
        self.assertEqual(audit["apiVersion"], "audit.k8s.io/v1")
        self.assertEqual(audit["stage"], "ResponseComplete")
        self.assertEqual(audit["user"]["username"], "ci-bot")
        self.assertEqual(audit["user"]["groups"], ["payments-bots"])
        self.assertEqual(audit["objectRef"], {"resource": "pods", "namespace": "default", "apiVersion": "v1"})
        self.assertEqual(audit["responseStatus"]["code"], 200)
        self.assertEqual(audit["annotations"]["authorization.k8s.io/decision"], "allow")
        self.assertTrue(audit["requestReceivedTimestamp"] <= audit["stageTimestamp"])
        self.assertEqual(audit["sourceIPs"], ["127.0.0.1"])
        self.assertIn("kubectl", audit["userAgent"])
        self.assertEqual(end["decision"]["verdict"], "allow")
        self.assertEqual(end["outcome"]["status"], "ok")
        (start,) = cluster.harness.events("session.start")[:1]
        self.assertEqual(start["protocol"], "kubernetes")
        self.assertEqual(start["identity"]["subject"], "ci-bot")
        commands = [event for event in cluster.harness.events("command") if event["facts"].get("verb") == "list"]
        self.assertTrue(commands, "the command was recorded before it ran")
        cluster.assert_token_kept(self, token())

    @defer.inlineCallbacks
    def test_apply_and_delete(self):
        """
        C{kubectl apply} creates and then patches a ConfigMap, C{kubectl
        delete} removes it; the API server holds what kubectl sent, and the
        record has create, patch and delete.
        """
        cluster = self.cluster
        manifest = os.path.join(cluster.directory, "cm.yaml")
        with open(manifest, "w") as handle:
            yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "a"}}, handle)
        out, err, code = yield cluster.kubectl("apply", "-f", manifest)
        self.assertEqual((out.strip(), code), ("configmap/settings created", 0), err)
        with open(manifest, "w") as handle:
            yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"mode": "b"}}, handle)
        out, err, code = yield cluster.kubectl("apply", "-f", manifest)
        self.assertEqual((out.strip(), code), ("configmap/settings configured", 0), err)
        self.assertEqual(cluster.api.get(("", "v1", "configmaps"), "default", "settings")["data"], {"mode": "b"})
        out, err, code = yield cluster.kubectl("delete", "configmap", "settings")
        self.assertEqual((out.strip(), code), ('configmap "settings" deleted', 0), err)
        self.assertIsNone(cluster.api.get(("", "v1", "configmaps"), "default", "settings"))
        for verb in ("create", "patch", "delete"):
            (end,) = yield cluster.wait_for_end(verb, "configmaps")
            self.assertEqual(end["outcome"]["audit"]["objectRef"]["resource"], "configmaps")
        (create,) = cluster.ends("create", "configmaps")
        self.assertEqual(create["outcome"]["code"], 201)
        (created,) = [event for event in cluster.harness.events("command") if event["command"] == create["command"]]
        self.assertTrue(created["parameters"][0].startswith("<body, "))
        cluster.assert_token_kept(self, token())


class KubectlWatchTests(unittest.TestCase):
    """
    kubectl get --watch through the gateway.
    """

    @defer.inlineCallbacks
    def test_watch(self):
        """
        C{kubectl get --watch} lists, then prints each change as the API
        server sends it, masked, until the request times out.
        """
        cluster = Cluster(self, addons=("identity", addon("mask-cards"), "record"))
        yield cluster.ready()
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "first"}})
        watching = cluster.kubectl("get", "configmaps", "--watch", "-o", "jsonpath={.metadata.name}={.data.pan}{\"\\n\"}",
                                   "--request-timeout=3s")
        for _ in range(200):
            if cluster.api.watchers:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "second"}, "data": {"pan": PAN}})
        out, err, code = yield watching
        self.assertEqual(out.split(), ["first=", "second=4111", "11**", "****", "1111"], err)
        (end,) = yield cluster.wait_for_end("watch", "configmaps")
        self.assertEqual(end["outcome"]["masked"], 1)


class PolicyTests(unittest.TestCase):
    """
    Denied and held requests as kubectl shows them.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = Cluster(self, addons=("identity", addon("deny-kubernetes"), addon("hold-deletes"), "record"))
        yield self.cluster.ready()

    @defer.inlineCallbacks
    def test_denied(self):
        """
        A denied request never reaches the API server; kubectl prints the
        gateway's Forbidden Status naming the rule, and the record has the
        denial with code 403.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "namespaces"), None, {"metadata": {"name": "payments"}})
        before = len(cluster.api.requests)
        out, err, code = yield cluster.kubectl("delete", "namespace", "payments")
        self.assertNotEqual(code, 0)
        self.assertIn("Error from server (Forbidden): hoopgw denied this request: namespaces may not be deleted", err)
        self.assertIn("(rule deny-delete-namespaces)", err)
        self.assertIsNotNone(cluster.api.get(("", "v1", "namespaces"), None, "payments"))
        self.assertNotIn(("DELETE", "/api/v1/namespaces/payments"), cluster.api.requests[before:])
        (end,) = yield cluster.wait_for_end("delete", "namespaces")
        self.assertEqual(end["decision"]["verdict"], "deny")
        self.assertEqual(end["decision"]["rule"], "deny-delete-namespaces")
        self.assertEqual(end["outcome"]["status"], "denied")
        audit = end["outcome"]["audit"]
        self.assertEqual(audit["responseStatus"]["code"], 403)
        self.assertEqual(audit["responseStatus"]["reason"], "Forbidden")
        self.assertEqual(audit["annotations"]["authorization.k8s.io/decision"], "forbid")
        # As the API server's request info: a namespace is its own namespace.
        self.assertEqual(
            audit["objectRef"], {"resource": "namespaces", "namespace": "payments", "name": "payments", "apiVersion": "v1"}
        )

    @defer.inlineCallbacks
    def test_exec_denied_in_prod(self):
        """
        kubectl exec (a WebSocket GET) is the verb create on pods/exec: the
        rule for prod stops it before any process starts, and kubectl says
        why.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "namespaces"), None, {"metadata": {"name": "prod"}})
        cluster.api.create(("", "v1", "pods"), "prod", {"metadata": {"name": "db-0"}})
        out, err, code = yield cluster.kubectl("exec", "-n", "prod", "db-0", "--", "touch", os.path.join(cluster.directory, "ran"))
        self.assertNotEqual(code, 0)
        self.assertIn("exec into pods of prod is not allowed", err)
        self.assertFalse(os.path.exists(os.path.join(cluster.directory, "ran")))
        # kubectl tries the WebSocket first, then falls back to SPDY (a POST): both are denied.
        ends = yield cluster.wait_for_end("create", "pods")
        self.assertIn(True, [end["facts"]["websocket"] for end in ends])
        for end in ends:
            self.assertEqual(end["decision"]["rule"], "deny-exec-prod")
            self.assertEqual(end["outcome"]["audit"]["objectRef"]["subresource"], "exec")
            self.assertEqual(end["facts"]["command"], ["touch", os.path.join(cluster.directory, "ran")])

    @defer.inlineCallbacks
    def test_held_then_approved(self):
        """
        A request whose decision is pending is held, unseen by the API
        server, until the decision comes; approved, it runs and kubectl
        reports success (and prints what the chain told it meanwhile as a
        warning); the approval is in the record.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "old"}})
        running = cluster.kubectl("delete", "configmap", "old", "--wait=false")
        hold = cluster.addon("hold-deletes")
        for _ in range(200):
            if hold.pending:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        ((command, waiting),) = hold.pending
        self.assertEqual((command.facts["verb"], command.facts["name"]), ("delete", "old"))
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(running.called)
        self.assertNotIn("DELETE", [method for method, _ in cluster.api.requests])
        waiting.callback(Decision.approved({"id": "ap-1", "approver": "alice"}, reason="change ticket 42"))
        out, err, code = yield running
        self.assertEqual((out.strip(), code), ('configmap "old" deleted', 0), err)
        self.assertIn("Warning: waiting for an approval of delete configmaps", err)
        self.assertIsNone(cluster.api.get(("", "v1", "configmaps"), "default", "old"))
        (end,) = yield cluster.wait_for_end("delete", "configmaps")
        self.assertEqual(end["decision"]["verdict"], "approved")
        self.assertIn("ap-1", end["outcome"]["audit"]["annotations"]["hoopgw.io/approval"])

    @defer.inlineCallbacks
    def test_held_then_refused(self):
        """
        A pending decision that ends in a denial answers kubectl with
        Forbidden and leaves the object alone.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "keep"}})
        running = cluster.kubectl("delete", "configmap", "keep")
        hold = cluster.addon("hold-deletes")
        for _ in range(200):
            if hold.pending:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        ((_, waiting),) = hold.pending
        waiting.callback(Decision.deny("nobody approved this in time", rule="approval-timeout"))
        out, err, code = yield running
        self.assertNotEqual(code, 0)
        self.assertIn("Error from server (Forbidden): hoopgw denied this request: nobody approved this in time", err)
        self.assertIsNotNone(cluster.api.get(("", "v1", "configmaps"), "default", "keep"))


class IdentityTests(unittest.TestCase):
    """
    Who gets through: a valid token of an allowed group, nobody else.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = Cluster(self)
        yield self.cluster.ready()

    @defer.inlineCallbacks
    def assertUnauthorized(self, user_token, reason, code_name="Unauthorized"):
        cluster = self.cluster
        config = cluster.write_kubeconfig("refused", user_token)
        before = len(cluster.api.requests)
        out, err, code = yield cluster.kubectl("get", "pods", kubeconfig=config)
        self.assertNotEqual(code, 0)
        self.assertEqual(cluster.api.requests[before:], [])
        refused = yield cluster.harness.wait_for("session.refused")
        self.assertIn(reason, refused[0]["refusal"]["reason"])
        self.assertEqual(cluster.harness.events("session.start"), [])
        if user_token:
            self.assertNotIn(user_token.encode(), cluster.harness.raw_store())
        return err

    @defer.inlineCallbacks
    def test_expired_token(self):
        """
        An expired token is refused with 401 (kubectl: you must be logged
        in), recorded as a refused session, and nothing reaches the API
        server.
        """
        err = yield self.assertUnauthorized(token(now=time.time() - 3600, lifetime=600), "the token has expired")
        self.assertIn("You must be logged in to the server", err)

    @defer.inlineCallbacks
    def test_no_token(self):
        """
        A kubeconfig without a token gets nowhere.
        """
        # kubectl asks for a user name on a 401 when it has no credential; its stdin is closed.
        yield self.assertUnauthorized(None, "no token was presented")

    @defer.inlineCallbacks
    def test_wrong_group(self):
        """
        A valid token of a group the connection does not allow is
        Forbidden, with the reason.
        """
        err = yield self.assertUnauthorized(token(groups=["other-team"]), "is not in any group allowed")
        self.assertIn("Forbidden", err)

    @defer.inlineCallbacks
    def test_client_impersonation_refused(self):
        """
        A client may not impersonate anyone through the gateway's
        credential: kubectl --as is refused before the API server sees it.
        """
        cluster = self.cluster
        out, err, code = yield cluster.kubectl("get", "pods", "--as", "system:admin")
        self.assertNotEqual(code, 0)
        self.assertIn("Forbidden", err)
        self.assertEqual(cluster.api.impersonations, [])
        ends = yield cluster.harness.wait_for("command.end")
        self.assertEqual({end["decision"]["rule"] for end in ends}, {"gateway:impersonation"})
        self.assertIn("may not carry Impersonate-* headers", ends[0]["decision"]["reason"])


def _masked_everywhere(test, text):
    """
    The card number is nowhere in C{text}, whatever separates its groups
    (spaces, nothing, dashes, or URL encodings of a space).
    """
    groups = PAN.split(" ")
    for separator in (" ", "", "-", "+", "%20"):
        test.assertNotIn(separator.join(groups), text)


class MaskingTests(unittest.TestCase):
    """
    A card number leaves the gateway masked wherever the API server puts
    it: ConfigMaps, Secrets (inside base64), logs, followed logs, exec
    output and the exec recording.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = Cluster(self, addons=("identity", addon("mask-cards"), "record"))
        yield self.cluster.ready()
        api = self.cluster.api
        api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})

    @defer.inlineCallbacks
    def test_configmap(self):
        """
        A PAN in a ConfigMap's data is masked in kubectl's output; the API
        server still holds it in full.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "cards"}, "data": {"pan": PAN}})
        out, err, code = yield cluster.kubectl("get", "configmap", "cards", "-o", "jsonpath={.data.pan}")
        self.assertEqual((out, code), (MASKED.replace("******", "** **** ").replace("411111", "4111 11"), 0), err)
        self.assertEqual(cluster.api.get(("", "v1", "configmaps"), "default", "cards")["data"]["pan"], PAN)
        (end,) = yield cluster.wait_for_end("get", "configmaps")
        self.assertEqual(end["outcome"]["masked"], 1)

    @defer.inlineCallbacks
    def test_uid_like_a_card_number(self):
        """
        The mask errs on the side of hiding: a uid whose digits and dashes
        hold a Luhn-valid run (about 3 random UUIDs in 1,000) is masked
        too, as the README says, and counted.
        """
        cluster = self.cluster
        created = cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "plain"}, "data": {"a": "b"}})
        created["metadata"]["uid"] = "e1d2519b-9806-4744-8344-4a3779762662"
        out, err, code = yield cluster.kubectl("get", "configmap", "plain", "-o", "jsonpath={.metadata.uid}")
        self.assertEqual((out, code), ("e1d2519b-9806-47**-*344-4a3779762662", 0), err)
        (end,) = yield cluster.wait_for_end("get", "configmaps")
        self.assertEqual(end["outcome"]["masked"], 1)

    @defer.inlineCallbacks
    def test_secret(self):
        """
        A PAN inside a Secret's base64 data (and inside the last-applied
        annotation kubectl apply leaves) is opened, masked and encoded
        again: the client decodes a masked number.
        """
        cluster = self.cluster
        manifest = os.path.join(cluster.directory, "secret.yaml")
        with open(manifest, "w") as handle:
            yaml.safe_dump(
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "card"},
                 "data": {"pan": base64.b64encode(PAN.replace(" ", "").encode()).decode(), "user": base64.b64encode(b"app").decode()}},
                handle,
            )
        out, err, code = yield cluster.kubectl("apply", "-f", manifest)
        self.assertEqual(code, 0, err)
        out, err, code = yield cluster.kubectl("get", "secret", "card", "-o", "json")
        self.assertEqual(code, 0, err)
        secret = json.loads(out)
        self.assertEqual(base64.b64decode(secret["data"]["pan"]).decode(), MASKED)
        self.assertEqual(base64.b64decode(secret["data"]["user"]).decode(), "app")
        applied = json.loads(secret["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])
        self.assertEqual(base64.b64decode(applied["data"]["pan"]).decode(), MASKED)
        _masked_everywhere(self, out)
        self.assertNotIn(base64.b64encode(PAN.replace(" ", "").encode()).decode(), out)
        stored = cluster.api.get(("", "v1", "secrets"), "default", "card")["data"]["pan"]
        self.assertEqual(base64.b64decode(stored).decode(), PAN.replace(" ", ""))
        out, err, code = yield cluster.kubectl("get", "secrets", "-o", "json")
        self.assertEqual(base64.b64decode(json.loads(out)["items"][0]["data"]["pan"]).decode(), MASKED)

    @defer.inlineCallbacks
    def test_logs(self):
        """
        A PAN in a pod's log is masked in C{kubectl logs}.
        """
        cluster = self.cluster
        cluster.api.add_log("default", "web-1", "charged %s ok" % (PAN,))
        out, err, code = yield cluster.kubectl("logs", "web-1")
        self.assertEqual((out, code), ("charged 4111 11** **** 1111 ok\n", 0), err)

    @defer.inlineCallbacks
    def test_logs_follow(self):
        """
        C{kubectl logs -f} streams: each line arrives as the pod writes it,
        masked, until the container stops.
        """
        cluster = self.cluster
        cluster.api.add_log("default", "web-1", "starting")
        following = cluster.kubectl("logs", "-f", "web-1")
        for _ in range(200):
            if cluster.api.followers.get(("default", "web-1")):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        cluster.api.add_log("default", "web-1", "card %s" % (PAN.replace(" ", ""),))
        yield task.deferLater(reactor, 0.2, lambda: None)
        cluster.api.add_log("default", "web-1", "done")
        cluster.api.end_log("default", "web-1")
        out, err, code = yield following
        self.assertEqual((out, code), ("starting\ncard 411111******1111\ndone\n", 0), err)
        ends = yield cluster.wait_for_end("get", "pods", count=2)
        (end,) = [end for end in ends if end["outcome"]["audit"]["objectRef"].get("subresource") == "log"]
        self.assertEqual(end["outcome"]["masked"], 1)

    @defer.inlineCallbacks
    def test_exec(self):
        """
        C{kubectl exec} (WebSocket, v5.channel.k8s.io) runs; its output is
        masked on the way to the client; the session is recorded as an
        asciicast v2 (masked) whose digest the exec's end event commits;
        the exit code comes back.  Each exec (a connection, so a session,
        of its own) leaves its recording; the record verifies with both
        checked, and C{hoopgw replay} and the replay web application (in
        Chromium) play each under its command.
        """
        cluster = self.cluster
        out, err, code = yield cluster.kubectl("exec", "web-1", "--", "echo", "paid with", PAN)
        self.assertEqual((out, code), ("paid with 4111 11** **** 1111\n", 0), err)
        (end,) = yield cluster.wait_for_end("create", "pods")
        outcome = end["outcome"]
        self.assertEqual(outcome["exit"], 0)
        self.assertEqual(outcome["masked"], 1)
        (command,) = [event for event in cluster.harness.events("command") if event["command"] == end["command"]]
        self.assertEqual(command["facts"]["command"], ["echo", "paid with", "4111 11** **** 1111"])
        cast = outcome["cast"]
        path = os.path.join(cluster.harness.store_path, "casts", cast["name"])
        with open(path, "rb") as handle:
            data = handle.read()
        self.assertEqual(hashlib.sha256(data).hexdigest(), cast["sha256"])
        recording = casts.parse(data)
        self.assertEqual(recording.header["command"], "echo 'paid with' '4111 11** **** 1111'")
        self.assertEqual([frame[1:] for frame in recording.frames], [("o", "paid with 4111 11** **** 1111\n")])
        _masked_everywhere(self, cluster.harness.raw_store().decode())
        out, err, code = yield cluster.kubectl("exec", "web-1", "--", "sh", "-c", "echo second; exit 3")
        self.assertEqual((out, code), ("second\n", 3), err)
        first, second = yield cluster.wait_for_end("create", "pods", count=2)
        self.assertNotEqual(first["outcome"]["cast"]["name"], second["outcome"]["cast"]["name"])
        yield cluster.harness.stop()
        report = verify_store(cluster.harness.store_path)
        self.assertTrue(report.ok, report.problem)
        self.assertEqual(report.casts, 2)
        for end, shown in ((first, "paid with 4111 11** **** 1111\n"), (second, "second\n")):
            replayed = io.StringIO()
            status = cli.main(["replay", "--store", cluster.harness.store_path, end["session"], "--speed", "1000"],
                              out=replayed)
            self.assertEqual(status, 0, replayed.getvalue())
            text = replayed.getvalue()
            recording = end["outcome"]["cast"]
            self.assertIn("   terminal recording: %s (sha256 %s" % (recording["name"], recording["sha256"]), text)
            played = text[text.index("--- playing #1 %s" % (end["outcome"]["cast"]["name"],)):]
            self.assertIn(shown, played)
            self.assertNotIn(PAN, text)
        server = ReplayServer(self, cluster.harness.store_path, cluster.harness.config_path)
        screenshot = os.path.abspath(self.mktemp()) + "-exec-session.png"
        seen = yield in_thread(play_session, server.base, first["session"], screenshot)
        yield server.stop()
        (player,) = seen["players"]
        self.assertEqual(player["command"], first["command"])
        self.assertEqual(player["screen"], "paid with 4111 11** **** 1111")
        self.assertIn("Record verified.", seen["verification"])

    @defer.inlineCallbacks
    def test_exec_stdin(self):
        """
        C{kubectl exec -i} passes stdin to the command (and closes it, v5);
        the recording keeps the input with card numbers redacted.
        """
        cluster = self.cluster
        out, err, code = yield cluster.kubectl("exec", "-i", "web-1", "--", "cat", stdin=("pay %s\n" % (PAN,)).encode())
        self.assertEqual((out, code), ("pay 4111 11** **** 1111\n", 0), err)
        (end,) = yield cluster.wait_for_end("create", "pods")
        path = os.path.join(cluster.harness.store_path, "casts", end["outcome"]["cast"]["name"])
        with open(path, "rb") as handle:
            recording = casts.parse(handle.read())
        self.assertEqual(recording.text("i"), "pay 4111 11** **** 1111\n")
        self.assertEqual(recording.text("o"), "pay 4111 11** **** 1111\n")


class PythonClientTests(unittest.TestCase):
    """
    The Python kubernetes client through the gateway: get, list, create,
    delete, watch and exec (v4.channel.k8s.io).
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = Cluster(self, addons=("identity", addon("mask-cards"), "record"))
        yield self.cluster.ready()

    @defer.inlineCallbacks
    def test_crud(self):
        """
        create, read, list and delete a ConfigMap with the Python client;
        the PAN it holds comes back masked.
        """
        from kubernetes import client

        api_client = self.cluster.client()

        def work():
            core = client.CoreV1Api(api_client)
            core.create_namespaced_config_map("default", {"metadata": {"name": "py"}, "data": {"pan": PAN}})
            read = core.read_namespaced_config_map("py", "default")
            listed = core.list_namespaced_config_map("default")
            core.delete_namespaced_config_map("py", "default")
            return read.data, [item.metadata.name for item in listed.items]

        data, names = yield in_thread(work)
        self.assertEqual(data, {"pan": "4111 11** **** 1111"})
        self.assertEqual(names, ["py"])
        self.assertIsNone(self.cluster.api.get(("", "v1", "configmaps"), "default", "py"))
        for verb in ("create", "get", "list", "delete"):
            yield self.cluster.wait_for_end(verb, "configmaps")
        self.cluster.assert_token_kept(self, token())

    @defer.inlineCallbacks
    def test_watch(self):
        """
        A watch streams events as they happen, each masked, Secrets'
        values included.
        """
        from kubernetes import client, watch

        cluster = self.cluster
        api_client = cluster.client()

        def stream():
            core = client.CoreV1Api(api_client)
            seen = []
            watcher = watch.Watch()
            for event in watcher.stream(core.list_namespaced_secret, "default", timeout_seconds=5):
                seen.append((event["type"], event["object"].metadata.name, event["object"].data))
                if len(seen) == 2:
                    watcher.stop()
            return seen

        watching = in_thread(stream)
        for _ in range(200):
            if cluster.api.watchers:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        encoded = base64.b64encode(PAN.encode()).decode()
        cluster.api.create(("", "v1", "secrets"), "default", {"metadata": {"name": "a"}, "data": {"pan": encoded}})
        cluster.api.create(("", "v1", "secrets"), "default", {"metadata": {"name": "b"}, "data": {"note": base64.b64encode(b"hi").decode()}})
        seen = yield watching
        self.assertEqual([(kind, name) for kind, name, _ in seen], [("ADDED", "a"), ("ADDED", "b")])
        self.assertEqual(base64.b64decode(seen[0][2]["pan"]).decode(), "4111 11** **** 1111")
        self.assertEqual(base64.b64decode(seen[1][2]["note"]).decode(), "hi")
        (end,) = yield cluster.wait_for_end("watch", "secrets")
        self.assertEqual(end["outcome"]["masked"], 1)

    @defer.inlineCallbacks
    def test_exec_v4(self):
        """
        The Python client's exec (v4.channel.k8s.io) works and is masked.
        """
        from kubernetes import client
        from kubernetes.stream import stream

        cluster = self.cluster
        cluster.api.create(("", "v1", "pods"), "default", {"metadata": {"name": "job-1"}})
        api_client = cluster.client()

        def run():
            core = client.CoreV1Api(api_client)
            return stream(core.connect_get_namespaced_pod_exec, "job-1", "default",
                          command=["echo", PAN], stderr=True, stdin=False, stdout=True, tty=False)

        out = yield in_thread(run)
        self.assertEqual(out.strip(), "4111 11** **** 1111")
        (end,) = yield cluster.wait_for_end("create", "pods")
        self.assertEqual(end["outcome"]["exit"], 0)
        self.assertIn("cast", end["outcome"])


class CredentialTests(unittest.TestCase):
    """
    The gateway's own credential towards the API server: a client
    certificate instead of a token, and impersonation of the client's
    identity.
    """

    @defer.inlineCallbacks
    def test_client_certificate(self):
        """
        With a client certificate as its credential the gateway sends no
        Authorization header at all; the API server accepts the certificate.
        """
        cluster = Cluster(self, credential="certificate")
        yield cluster.ready()
        out, err, code = yield cluster.kubectl("get", "namespaces", "-o", "name")
        self.assertEqual(code, 0, err)
        self.assertIn("namespace/default", out)
        self.assertEqual(set(cluster.api.authorizations), {None})

    @defer.inlineCallbacks
    def test_impersonation(self):
        """
        With impersonate configured, every request names the client's
        identity and groups in Impersonate-User / Impersonate-Group, and
        the audit event shows the impersonated user.
        """
        cluster = Cluster(self, impersonate={"user_prefix": "hoopgw:"})
        yield cluster.ready()
        out, err, code = yield cluster.kubectl("get", "pods")
        self.assertEqual(code, 0, err)
        self.assertEqual(set(map(lambda entry: (entry[0], tuple(entry[1])), cluster.api.impersonations)),
                         {("hoopgw:ci-bot", ("payments-bots",))})
        (end,) = yield cluster.wait_for_end("list", "pods")
        self.assertEqual(end["outcome"]["audit"]["impersonatedUser"], {"username": "hoopgw:ci-bot", "groups": ["payments-bots"]})
        cluster.assert_token_kept(self, token())


class FailClosedTests(unittest.TestCase):
    """
    An addon that fails on a result stops that result from reaching the
    client, whatever shape it has.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = Cluster(self, addons=("identity", addon("explode"), addon("hold-deletes"), "record"))
        yield self.cluster.ready()
        self.cluster.api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})

    @defer.inlineCallbacks
    def test_body_withheld(self):
        """
        A body the chain failed on is replaced by a 500 Status; the record
        says it was withheld.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "x"}, "data": {"a": "explode"}})
        out, err, code = yield cluster.kubectl("get", "configmap", "x", "-o", "yaml")
        self.assertNotEqual(code, 0)
        self.assertNotIn("explode", out)
        self.assertIn("hoopgw withheld the response because the explode addon failed", err)
        (end,) = yield cluster.wait_for_end("get", "configmaps")
        self.assertEqual(end["outcome"]["status"], "withheld")
        self.assertEqual(end["outcome"]["code"], 500)

    @defer.inlineCallbacks
    def test_watch_cut(self):
        """
        A watch event the chain failed on ends the stream: neither it nor
        anything after it reaches the client.
        """
        cluster = self.cluster
        from kubernetes import client, watch

        api_client = cluster.client()

        def stream():
            seen = []
            try:
                for event in watch.Watch().stream(client.CoreV1Api(api_client).list_namespaced_config_map, "default",
                                                  timeout_seconds=5):
                    seen.append(event["object"].metadata.name)
            except Exception as error:
                seen.append(type(error).__name__)
            return seen

        watching = in_thread(stream)
        for _ in range(200):
            if cluster.api.watchers:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "fine"}})
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "bad"}, "data": {"a": "explode"}})
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "after"}})
        seen = yield watching
        self.assertEqual(seen[0], "fine")
        self.assertNotIn("bad", seen)
        self.assertNotIn("after", seen)
        (end,) = yield cluster.wait_for_end("watch", "configmaps")
        self.assertEqual(end["outcome"]["status"], "withheld")

    @defer.inlineCallbacks
    def test_exec_output_cut(self):
        """
        Exec output the chain failed on is dropped and the session closed.
        """
        cluster = self.cluster
        out, err, code = yield cluster.kubectl("exec", "web-1", "--", "echo", "explode")
        self.assertNotEqual(code, 0)
        self.assertNotIn("explode", out)
        self.assertIn("hoopgw withheld the output because the explode addon failed", err)
        (end,) = yield cluster.wait_for_end("create", "pods")
        self.assertEqual(end["outcome"]["status"], "withheld")

    @defer.inlineCallbacks
    def test_client_gives_up(self):
        """
        A client that disconnects while its request waits for a decision
        calls the decision off; the request never runs, and the record
        says the client gave up.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "keep"}})
        from kubernetes import client

        api_client = cluster.client()

        def impatient():
            try:
                client.CoreV1Api(api_client).delete_namespaced_config_map("keep", "default", _request_timeout=1)
            except Exception as error:
                return type(error).__name__
            return None

        failed = yield in_thread(impatient)
        self.assertIsNotNone(failed)
        # The client retries its DELETE: each attempt is called off.
        ends = yield cluster.wait_for_end("delete", "configmaps")
        for end in ends:
            self.assertEqual(end["decision"]["rule"], "hold-deletes:cancelled")
            self.assertEqual(end["outcome"]["status"], "denied")
        self.assertIsNotNone(cluster.api.get(("", "v1", "configmaps"), "default", "keep"))
        self.assertNotIn("DELETE", [method for method, _ in cluster.api.requests])


class StopTests(unittest.TestCase):
    """
    A stopping gateway ends its Kubernetes sessions.
    """

    @defer.inlineCallbacks
    def test_stop_ends_watch(self):
        """
        Stopping the gateway closes an open watch and records the end of
        its session, with the reason, before gateway.stop.
        """
        cluster = Cluster(self)
        yield cluster.ready()
        from kubernetes import client, watch

        api_client = cluster.client()

        def stream():
            names = []
            try:
                for event in watch.Watch().stream(client.CoreV1Api(api_client).list_namespaced_config_map, "default",
                                                  timeout_seconds=20, _request_timeout=20):
                    names.append(event["object"].metadata.name)
            except Exception as error:
                names.append(type(error).__name__)
            return names

        watching = in_thread(stream)
        for _ in range(200):
            if cluster.api.watchers:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "seen"}})
        yield task.deferLater(reactor, 0.2, lambda: None)
        began = time.time()
        yield cluster.harness.stop()
        names = yield watching
        self.assertLess(time.time() - began, 10)
        self.assertEqual(names[0], "seen")
        types = [event["type"] for event in cluster.harness.events()]
        self.assertEqual(types[-1], "gateway.stop")
        ends = cluster.harness.events("session.end")
        self.assertEqual([end["reason"] for end in ends], ["the gateway is stopping"])
        (watch_end,) = cluster.ends("watch", "configmaps")
        self.assertLess(watch_end["seq"], ends[0]["seq"])


class StoppedAsItStartsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_stopped_before_serving(self):
        """
        A gateway stopped before its Kubernetes listener has begun serving
        (the listener starts in the asyncio loop) closes that listener once
        it would serve: the port refuses connections afterwards.
        """
        import socket

        cluster = Cluster(self)
        yield cluster.harness.stop()
        yield task.deferLater(reactor, 0.5, lambda: None)

        def connect():
            with socket.create_connection(("127.0.0.1", cluster.port), timeout=5):
                return True

        with self.assertRaises(ConnectionRefusedError):
            yield in_thread(connect)


class UpstreamTLSTests(unittest.TestCase):
    """
    The API server's certificate is checked against the configured CA.
    """

    @defer.inlineCallbacks
    def test_untrusted_api_server(self):
        """
        An API server whose certificate does not chain to the configured CA
        gets no request (nor the gateway's token); kubectl gets an error,
        mitmproxy's warning reaches Twisted's log, and the record has the
        failure.
        """
        from twisted.logger import globalLogPublisher

        directory = os.path.join(support.workspace(), "kubernetes")
        api_certificates()
        other, _ = pki.make_ca("some other CA").write(directory, "other-ca")
        logged = []
        observer = logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        cluster = Cluster(self, target_ca=other)
        yield cluster.ready()
        out, err, code = yield cluster.kubectl("get", "configmaps")
        self.assertNotEqual(code, 0)
        self.assertEqual(cluster.api.requests, [])
        self.assertEqual(cluster.api.authorizations, [])
        ends = yield cluster.harness.wait_for("command.end")
        self.assertEqual(ends[0]["outcome"]["status"], "error")
        self.assertIn("certificate verify failed", ends[0]["outcome"]["error"].lower())
        warnings = [event for event in logged if event.get("log_namespace", "").startswith("mitmproxy")]
        self.assertTrue(any("Server TLS handshake failed" in event.get("text", "") for event in warnings), warnings)


def _stream_frontend():
    """
    A front end with the built-in mask addon in its chain and no engine,
    enough to drive a log or watch stream callable as mitmproxy does, and
    the reasons it ended streams for.
    """
    from hoopgw import testing
    from hoopgw.addons import mask
    from hoopgw.kubernetes import frontend as frontends

    harness = testing.ChainHarness([(mask.factory, {})])
    front = frontends.Frontend.__new__(frontends.Frontend)
    front.chain = harness.chain
    front.engine = None
    front.broken = []
    front.stream_broken = lambda flow, exchange, reason, delay=None: (
        front.broken.append(reason), setattr(exchange, "broken", reason))
    return front, harness.session


def _drive(stream, pieces):
    """
    Feed C{pieces} to a stream callable as mitmproxy's HTTP layer does,
    then its end.  @return: the chunks written to the client, each as
    mitmproxy would write it, and the last (the end's) apart.
    """
    written = []
    for piece in pieces:
        returned = stream(piece)
        written.extend([returned] if isinstance(returned, bytes) else list(returned))
    last = stream(b"")
    return written, last


class StreamCutTests(unittest.TestCase):
    """
    Log and watch streams cut anywhere by the API server: the client gets
    every byte, masked, and never the empty chunk that would end its
    response early.
    """

    def _stream(self, kind, limit=64 * 1024 * 1024):
        from hoopgw import testing
        from hoopgw.kubernetes import streams
        from hoopgw.kubernetes.exchange import Exchange

        front, session = _stream_frontend()
        exchange = Exchange(time.time())
        exchange.session = session
        if kind == "log":
            exchange.command = testing.kubernetes_command("GET", "/api/v1/namespaces/default/pods/web-1/log?follow=true")
            return front, exchange, streams.LogStream(front, None, exchange)
        exchange.command = testing.kubernetes_command("GET", "/api/v1/namespaces/default/configmaps?watch=true")
        return front, exchange, streams.WatchStream(front, None, exchange, limit)

    def test_log_cut_everywhere(self):
        """
        A followed log cut at every byte position (and byte by byte) reaches
        the client whole, with its card numbers masked; no chunk written
        before the end is empty.
        """
        text = b"starting\ncard 4111111111111111 ok\nnext 5105 1051 0510 5100\n"
        expected = b"starting\ncard 411111******1111 ok\nnext 5105 10** **** 5100\n"
        cuts = [[text[:at], text[at:]] for at in range(1, len(text))]
        cuts.append([text[at:at + 1] for at in range(len(text))])
        for pieces in cuts:
            front, exchange, stream = self._stream("log")
            written, last = _drive(stream, pieces)
            self.assertNotIn(b"", written, pieces)
            self.assertEqual(b"".join(written) + last, expected, pieces)
            self.assertEqual(exchange.command.outcome["masked"], 2)
            self.assertEqual(front.broken, [])

    def test_log_digit_only_chunks(self):
        """
        Chunks that are only digits (held back by the masker until it knows
        whether they are part of a card number) keep the stream open, and
        what was held back is flushed, masked, when the stream ends.
        """
        front, exchange, stream = self._stream("log")
        written, last = _drive(stream, [b"card ", b"4111", b"1111", b"1111", b"1111", b" ok\n", b"id ", b"12345"])
        self.assertNotIn(b"", written)
        self.assertEqual(b"".join(written), b"card 411111******1111 ok\nid ")
        self.assertEqual(last, b"12345")

    def test_watch_cut_everywhere(self):
        """
        Watch events cut at every byte position (and byte by byte) reach the
        client as whole events, masked; no chunk written before the end is
        empty, and each chunk written holds whole events only.
        """
        events = [
            {"type": "ADDED", "object": {"kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"pan": "4111111111111111"}}},
            {"type": "MODIFIED", "object": {"kind": "ConfigMap", "metadata": {"name": "b"}, "data": {"pan": "5105105105105100"}}},
        ]
        text = b"".join(json.dumps(event).encode() + b"\n" for event in events)
        cuts = [[text[:at], text[at:]] for at in range(1, len(text))]
        cuts.append([text[at:at + 1] for at in range(len(text))])
        for pieces in cuts:
            front, exchange, stream = self._stream("watch")
            written, last = _drive(stream, pieces)
            self.assertNotIn(b"", written, pieces)
            for chunk in written:
                self.assertTrue(chunk.endswith(b"\n"), (pieces, chunk))
            received = [json.loads(line) for line in (b"".join(written) + last).splitlines()]
            self.assertEqual([event["object"]["data"]["pan"] for event in received],
                             ["411111******1111", "510510******5100"], pieces)
            self.assertEqual(exchange.command.outcome["masked"], 2)

    def test_watch_event_without_end(self):
        """
        An event the API server never ends (no newline) is read only up to
        the connection's limit: the stream ends with an ERROR event saying
        why, nothing of the oversized event reaches the client, and the
        front end records the stream as broken.
        """
        front, exchange, stream = self._stream("watch", limit=1024)
        good = json.dumps({"type": "ADDED", "object": {"kind": "ConfigMap", "metadata": {"name": "ok"}}}).encode() + b"\n"
        written = []
        for piece in [good, b'{"type":"ADDED","object":{"data":"4111111111111111' + b"x" * 600] + [b"y" * 300] * 10:
            returned = stream(piece)
            written.extend([returned] if isinstance(returned, bytes) else list(returned))
        self.assertNotIn(b"", written)
        lines = b"".join(written).splitlines()
        self.assertEqual(json.loads(lines[0])["object"]["metadata"]["name"], "ok")
        error = json.loads(lines[1])
        self.assertEqual(error["type"], "ERROR")
        self.assertIn("longer than the 1024 bytes", error["object"]["message"])
        self.assertEqual(len(lines), 2)
        self.assertNotIn(b"4111", b"".join(written))
        self.assertEqual(len(front.broken), 1)
        self.assertEqual(stream(b""), ())


class KubectlStreamCutTests(unittest.TestCase):
    """
    The real kubectl follows a log and watches through the gateway while
    the API server cuts its stream in odd places: both complete, every
    line arrives, and a card number cut across chunks arrives masked.
    """

    @defer.inlineCallbacks
    def setUp(self):
        self.cluster = Cluster(self, addons=("identity", "mask", "record"))
        yield self.cluster.ready()
        self.cluster.api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})

    @defer.inlineCallbacks
    def _pieces(self, write, pieces):
        for piece in pieces:
            write(piece)
            # Apart, so each reaches the gateway as a chunk of its own.
            yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def test_logs_follow(self):
        """
        C{kubectl logs -f} gets a card number cut in two chunks, one that is
        only digits, and a last chunk that ends with digits, masked, and
        exits 0 once the container stops.
        """
        cluster = self.cluster
        cluster.api.add_log("default", "web-1", "starting")
        following = cluster.kubectl("logs", "-f", "web-1")
        for _ in range(200):
            if cluster.api.followers.get(("default", "web-1")):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield self._pieces(
            lambda piece: cluster.api.write_log("default", "web-1", piece),
            [b"card 4111 11", b"11 1111 1111", b" ok\n", b"5105105105105100", b"\n", b"order 12345"],
        )
        cluster.api.end_log("default", "web-1")
        out, err, code = yield following
        self.assertEqual((out, code), ("starting\ncard 4111 11** **** 1111 ok\n510510******5100\norder 12345", 0), err)
        ends = yield cluster.wait_for_end("get", "pods", count=2)
        (end,) = [end for end in ends if end["outcome"]["audit"]["objectRef"].get("subresource") == "log"]
        self.assertEqual(end["outcome"]["masked"], 2)
        self.assertEqual(end["outcome"]["status"], "ok")

    @defer.inlineCallbacks
    def test_watch(self):
        """
        C{kubectl get --watch} gets an event cut in three chunks (in the
        middle of a card number) and the events after it, masked, until
        the API server ends the watch.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "first"}})
        watching = cluster.kubectl("get", "configmaps", "--watch", "-o", "jsonpath={.metadata.name}={.data.pan}{\"\\n\"}")
        for _ in range(200):
            if cluster.api.watchers:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        event = json.dumps({"type": "ADDED", "object": {
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "split", "namespace": "default", "resourceVersion": "900"},
            "data": {"pan": "4111111111111111"}}}).encode() + b"\n"
        at = event.index(b"41111111") + 5
        yield self._pieces(cluster.api.write_watches, [event[:20], event[20:at], event[at:]])
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "after"}, "data": {"pan": PAN}})
        yield task.deferLater(reactor, 0.2, lambda: None)
        cluster.api.end_watches()
        out, err, code = yield watching
        self.assertEqual(out.split(), ["first=", "split=411111******1111", "after=4111", "11**", "****", "1111"], err)
        (end,) = yield cluster.wait_for_end("watch", "configmaps")
        self.assertEqual(end["outcome"]["masked"], 2)


class _Raw(protocol.Protocol):
    """
    A client that sends what the test says (or nothing) and notes what the
    gateway answers, and when it closes the connection.
    """

    def __init__(self, greeting=b""):
        self.greeting = greeting
        self.received = b""
        self.closed = defer.Deferred()

    def connectionMade(self):
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(self.received)


def raw_connect(port, greeting=b"", source="127.0.0.1"):
    client = _Raw(greeting)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    return endpoints.connectProtocol(endpoint, client)


class BeforeLoginTests(unittest.TestCase):
    """
    The limits before login of a Kubernetes listener, and the event every
    connection leaves that never got a request in: silent, plaintext, a
    failed handshake, over a limit.
    """

    def refusals(self, cluster, rule=None):
        return [event for event in cluster.harness.events("session.refused")
                if rule is None or event["refusal"]["rule"] == rule]

    @defer.inlineCallbacks
    def wait_for_refusals(self, cluster, count):
        for _ in range(200):
            found = self.refusals(cluster)
            if len(found) >= count:
                return found
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("%d refusals expected: %r" % (count, self.refusals(cluster)))

    @defer.inlineCallbacks
    def test_handshake_and_login_timeouts(self):
        """
        A connection that never completes its TLS handshake is closed after
        tls_handshake_timeout; one that completes it but sends no request
        the chain lets in is closed after login_timeout; each is recorded
        with its reason code, stage and address.
        """
        cluster = Cluster(self)
        frontend = cluster.service.frontend
        frontend.settings = _with(frontend.settings, tls_handshake_timeout=0.5, login_timeout=1.5)
        yield cluster.ready()
        silent = yield raw_connect(cluster.port)

        def handshake_only():
            import socket
            import ssl

            _, _, gateway_ca = support.gateway_certificate()
            context = ssl.create_default_context(cafile=gateway_ca)
            with socket.create_connection(("127.0.0.1", cluster.port)) as sock:
                with context.wrap_socket(sock, server_hostname="127.0.0.1") as wrapped:
                    return wrapped.recv(100)

        idle = in_thread(handshake_only)
        yield silent.closed
        self.assertEqual((yield idle), b"")
        refused = yield self.wait_for_refusals(cluster, 2)
        rules = {event["refusal"]["rule"]: event for event in refused}
        self.assertEqual(sorted(rules), ["limit:login-timeout", "tls:handshake-timeout"])
        self.assertEqual(rules["tls:handshake-timeout"]["attributes"]["stage"], "tls")
        self.assertEqual(rules["limit:login-timeout"]["attributes"]["stage"], "request")
        self.assertIn("within 0.5 seconds (tls_handshake_timeout)", rules["tls:handshake-timeout"]["refusal"]["reason"])
        for event in refused:
            self.assertEqual(event["protocol"], "kubernetes")
            self.assertTrue(event["client"].startswith("127.0.0.1:"))

    @defer.inlineCallbacks
    def test_plaintext_and_bad_handshakes(self):
        """
        Plain HTTP to the TLS port and a client that rejects the gateway's
        certificate never reach the API server, and each leaves an event.
        """
        cluster = Cluster(self)
        yield cluster.ready()
        plain = yield raw_connect(cluster.port, b"GET /api/v1/namespaces/default/secrets HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = yield plain.closed
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        self.assertIn(b"this port speaks HTTPS only", answer)

        def untrusting():
            import socket
            import ssl

            context = ssl.create_default_context()
            try:
                with socket.create_connection(("127.0.0.1", cluster.port)) as sock:
                    with context.wrap_socket(sock, server_hostname="127.0.0.1"):
                        return "connected"
            except ssl.SSLError as error:
                return error.reason

        self.assertEqual((yield in_thread(untrusting)), "CERTIFICATE_VERIFY_FAILED")
        refused = yield self.wait_for_refusals(cluster, 2)
        self.assertEqual(len(refused), 2, refused)
        self.assertEqual(sorted(event["refusal"]["rule"] for event in refused), ["tls:handshake-failed", "tls:plaintext"])
        for event in refused:
            self.assertEqual(event["attributes"]["stage"], "tls")
        self.assertEqual([method for method, path in cluster.api.requests if "secrets" in path], [])

    @defer.inlineCallbacks
    def test_unauthenticated_limits(self):
        """
        Connections without a request let in are limited in total and per
        source address: one over a limit is closed at once and recorded
        with the limit's reason code; kubectl works again once the idle
        connections are gone.
        """
        cluster = Cluster(self)
        frontend = cluster.service.frontend
        admission = frontend.connections.admission
        admission.max_total, admission.max_per_source = 3, 2
        yield cluster.ready()
        idle = []
        for _ in range(2):
            idle.append((yield raw_connect(cluster.port)))
        other = yield raw_connect(cluster.port, source="127.0.0.2")
        over = yield raw_connect(cluster.port)
        yield over.closed
        other.transport.loseConnection()
        yield other.closed
        over = yield raw_connect(cluster.port)
        yield over.closed
        (total,) = self.refusals(cluster, "limit:unauthenticated-connections")
        (per_source,) = self.refusals(cluster, "limit:unauthenticated-per-source")
        self.assertIn("(max_unauthenticated)", total["refusal"]["reason"])
        self.assertIn("your address 127.0.0.1 already has 2", per_source["refusal"]["reason"])
        self.assertEqual(per_source["attributes"]["stage"], "connect")
        for connection in idle:
            connection.transport.loseConnection()
            yield connection.closed
        out, err, code = yield cluster.kubectl("get", "pods")
        self.assertEqual(code, 0, err)


def _with(settings, **changes):
    import attr

    return attr.evolve(settings, **changes)


class TargetWordsTests(unittest.TestCase):
    """
    What the API server says about a request (error Status messages, the
    headers of its answers) is masked like its data, before kubectl or
    the record sees it.
    """

    @defer.inlineCallbacks
    def test_error_status_and_warning_masked(self):
        """
        A NotFound naming a card number and a Warning header holding one
        reach kubectl masked; the record's failure message is masked too.
        """
        cluster = Cluster(self, addons=("identity", "mask", "record"))
        yield cluster.ready()
        cluster.api.extra_headers.append((b"warning", ('299 - "card %s on file"' % (PAN,)).encode()))
        out, err, code = yield cluster.kubectl("get", "configmap", PAN.replace(" ", ""))
        self.assertEqual(code, 1)
        self.assertIn('configmaps "411111******1111" not found', err)
        self.assertIn("Warning: card 4111 11** **** 1111 on file", err)
        _masked_everywhere(self, out + err)
        (end,) = yield cluster.wait_for_end("get", "configmaps")
        self.assertEqual(end["outcome"]["audit"]["responseStatus"]["message"], 'configmaps "411111******1111" not found')
        self.assertNotIn(PAN.replace(" ", "").encode(), cluster.harness.raw_store())


class UnreadableRequestTests(unittest.TestCase):
    """
    A request mitmproxy cannot read never reaches the chain: the client is
    answered by mitmproxy, and the attempt is recorded all the same.
    """

    @defer.inlineCallbacks
    def test_garbage_after_handshake(self):
        """
        Bytes that are not HTTP, sent over TLS, get a 400 and leave a
        session.refused event naming the connection's end.
        """
        cluster = Cluster(self)
        yield cluster.ready()

        def garbage():
            import socket
            import ssl

            _, _, gateway_ca = support.gateway_certificate()
            context = ssl.create_default_context(cafile=gateway_ca)
            with socket.create_connection(("127.0.0.1", cluster.port)) as sock:
                with context.wrap_socket(sock, server_hostname="127.0.0.1") as wrapped:
                    wrapped.sendall(b"\x00\x01 4111111111111111 nonsense\r\n\r\n")
                    received = b""
                    while True:
                        data = wrapped.recv(4096)
                        if not data:
                            return received
                        received += data

        answer = yield in_thread(garbage)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer)
        for _ in range(200):
            refused = cluster.harness.events("session.refused")
            if refused:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        (refused,) = refused
        self.assertEqual(refused["refusal"]["rule"], "kubernetes:closed-before-request")
        self.assertEqual(refused["attributes"]["stage"], "request")
        self.assertNotIn(b"4111111111111111", cluster.harness.raw_store())


class _Message:
    """
    What mitmproxy hands the front end of one WebSocket message.
    """

    def __init__(self, content, from_client=False):
        self.content = content
        self.from_client = from_client
        self.is_text = False
        self.dropped = False

    def drop(self):
        self.dropped = True


class HostileExecTests(unittest.TestCase):
    """
    Exec messages from an API server that does not keep to the channel
    protocol: nothing unread passes, its status is masked, and nothing
    raises.
    """

    def setUp(self):
        from hoopgw import testing
        from hoopgw.kubernetes.exchange import Exchange
        from hoopgw.kubernetes.terminal import Terminal

        self.front, session = _stream_frontend()
        self.front.result_hooks = True
        self.front.loop = None
        self.terminal = Terminal(self.front)
        self.exchange = Exchange(time.time())
        self.exchange.session = session
        self.exchange.command = testing.kubernetes_command(
            "GET", "/api/v1/namespaces/default/pods/web-1/exec?command=sh&stdout=true", websocket=True)
        self.exchange.subprotocol = "v5.channel.k8s.io"
        self.exchange.cast = casts.Recorder(term=None, title="test")

    def send(self, content):
        class Flow:
            metadata = {}

        message = _Message(content)
        result = self.terminal._message(Flow(), self.exchange, message)
        # Every hook answers at once here: the coroutine ends without waiting.
        with self.assertRaises(StopIteration):
            result.send(None)
        return message

    def test_unknown_channel_dropped(self):
        """
        Data on a channel the protocol does not have, or on stdin, from the
        API server is dropped; an empty frame that opens a channel passes.
        """
        self.assertTrue(self.send(bytes((9,)) + PAN.encode()).dropped)
        self.assertTrue(self.send(bytes((0,)) + PAN.encode()).dropped)
        self.assertFalse(self.send(bytes((0,))).dropped)

    def test_status_masked(self):
        """
        The status message that ends the exec reaches the client masked, and
        one that is not the Status shape it should be is read without
        failing.
        """
        status = {"kind": "Status", "status": "Failure", "message": "card %s declined" % (PAN.replace(" ", ""),),
                  "details": {"causes": [{"reason": "ExitCode", "message": "3"}]}}
        message = self.send(bytes((3,)) + json.dumps(status).encode())
        self.assertEqual(json.loads(message.content[1:])["message"], "card 411111******1111 declined")
        self.assertEqual(self.exchange.exit, 3)
        for odd in ([1, 2], {"details": "x"}, {"details": {"causes": ["x", 4]}}, "text"):
            self.exchange.released = False
            self.send(bytes((3,)) + json.dumps(odd).encode())
            self.assertIsNone(self.exchange.exit)


class WebSocketLimitTests(unittest.TestCase):
    """
    An exec message from the API server longer than the connection accepts.
    """

    @defer.inlineCallbacks
    def test_message_too_large(self):
        """
        A message longer than max_body_bytes ends the exec (close code
        1009) before mitmproxy has buffered more than that; nothing of it
        reaches kubectl, and the record says why.
        """
        from testbed import standin

        cluster = Cluster(self, addons=("identity", "mask", "record"))
        yield cluster.ready()
        cluster.api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})
        options = cluster.service.frontend.engine.master.options
        limit = options.body_size_limit
        options.update(body_size_limit="1m")
        self.addCleanup(lambda: options.update(body_size_limit=limit))
        started = standin._ExecSession.negotiationFinished

        def flood(session):
            session.transport.sendBytesMessage(bytes((standin.STDOUT,)) + b"x" * (3 * 1024 * 1024))
            started(session)

        self.patch(standin._ExecSession, "negotiationFinished", flood)
        out, err, code = yield cluster.kubectl("exec", "web-1", "--", "echo", "hi")
        self.assertNotEqual(code, 0)
        self.assertNotIn("xxxx", out)
        (end,) = yield cluster.wait_for_end("create", "pods")
        self.assertEqual(end["outcome"]["status"], "withheld")
        self.assertEqual(end["outcome"]["reason"],
                         "the API server sent a WebSocket message longer than 1048576 bytes (max_body_bytes)")
