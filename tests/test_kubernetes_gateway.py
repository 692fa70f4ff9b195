"""
The Kubernetes gateway end to end: the stand-in API server behind it, the
real kubectl and the Python kubernetes client in front, small real addons
in the chain, and the record it leaves.
"""

import base64
import json
import os
import time

import yaml
from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from hoopgw import pki
from hoopgw.kubernetes.standin import StandinAPIServer
from hoopgw.model import Decision
from tests import support
from tests.support import GatewayHarness, in_thread, token

KUBECTL = "/usr/bin/kubectl"
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

    def __init__(self, test, addons=("identity", "record"), credential="token", impersonate=None, subject="ci-bot"):
        certificate, key, ca, client_certificate, client_key, token_path = api_certificates()
        self.api = StandinAPIServer(reactor, token=GATEWAY_TOKEN if credential == "token" else None,
                                    client_ca=ca if credential == "certificate" else None)
        self.api.listen(certificate, key)
        test.addCleanup(self.api.stop)
        self.api_port = self.api.port.getHost().port
        port = support.free_port()
        target = {"server": "https://127.0.0.1:%d" % (self.api_port,), "ca": ca}
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
        self.harness = GatewayHarness(test, connections={"cluster": connection})
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

    def write_kubeconfig(self, name, user_token):
        _, _, gateway_ca = support.gateway_certificate()
        user = {"token": user_token} if user_token else {}
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
        if stdin is not None:
            d = support._run_with_stdin(KUBECTL, args, environment, stdin)
        else:
            d = getProcessOutputAndValue(KUBECTL, args, env=environment)
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
