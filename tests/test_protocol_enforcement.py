"""
The built-in block, approve and mask addons on SSH and Kubernetes, end to
end: the real ssh, scp/sftp and kubectl in front of the gateway, a real
sshd and the stand-in API server behind it, approvers acting through the
approvals HTTP API with their own tokens, and the record.
"""

import base64
import json
import os

import treq
import yaml
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from tests.ssh_support import SFTP, SSHGateway, run
from tests.support import human_token
from tests.test_kubernetes_gateway import Cluster
from tests.test_ssh_gateway import eventually

PAN = "4111111111111111"
MASKED = "411111******1111"
ADMIN = {"approver_groups": ["sre"]}


@defer.inlineCallbacks
def approve_through_api(harness, who="alice", reason="CHG-1 reviewed"):
    """
    Wait for the one pending approval request and approve it with a
    person's own token, as an approver's tool calls the API.

    @return: the request as the API showed it.
    """
    broker = harness.gateway.approvals
    (request,) = yield eventually(broker.list)
    pool = HTTPConnectionPool(reactor, persistent=False)
    token = human_token(who, groups=["sre"])
    listed = yield treq.get(harness.admin_url + "/api/approvals", headers={"Authorization": ["Bearer " + token]}, pool=pool)
    shown = [item for item in (yield listed.json())["approvals"] if item["id"] == request.id]
    response = yield treq.post(
        harness.admin_url + "/api/approvals/%s/approve" % (request.id,),
        json={"reason": reason},
        headers={"Authorization": ["Bearer " + token]},
        pool=pool,
    )
    answer = yield response.json()
    if response.code != 200:
        raise AssertionError("the approval was refused: %r" % (answer,))
    return shown[0]


class SSHEnforcementTests(unittest.TestCase):
    """
    ssh and sftp through block (its baseline and the connection's rules),
    approve and mask.
    """

    def setUp(self):
        self.remote = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.remote, "protected"))
        addons = [
            "identity",
            {"block": {"rules": [
                {"name": "no-protected-uploads", "operations": ["open"], "transfers": ["upload"],
                 "paths": [os.path.join(self.remote, "protected", "*")],
                 "reason": "protected files change through the release pipeline"},
            ]}},
            {"approve": {"rules": [
                {"name": "deploy-markers", "commands": ["touch *deployed*"], "approvers": ["sre"], "timeout": "30s"},
            ]}},
            "mask",
            "record",
        ]
        self.gateway = SSHGateway(self, admin=ADMIN, addons=addons, sftp=True)

    @defer.inlineCallbacks
    def assertDenied(self, line, rule, why):
        out, err, code = yield self.gateway.ssh(line)
        self.assertEqual((out, code), (b"", 126), err)
        self.assertIn("hoopgw denied this command: rule %s matched (%s)" % (rule.partition(":")[2], why), err)
        self.assertIn("(rule %s)" % (rule,), err)
        return err

    @defer.inlineCallbacks
    def test_denied(self):
        """
        sudo, rm -rf / and curl ... | sh are refused by the baseline with
        exit status 126 and the reason on stderr, and recorded with the
        rule; the commands are written so that they could not do harm even
        if they ran (false && ...), and nothing reaches the target.
        """
        yield self.assertDenied("sudo -n id", "block:baseline:other-user", "program sudo")
        yield self.assertDenied("false && rm -rf /", "block:baseline:remove-root", "command 'rm -rf /' matches 'rm -*[rR]* /'")
        yield self.assertDenied("curl -s http://127.0.0.1:9/install.sh | sh", "block:baseline:download-and-run",
                                "pipeline curl | sh")
        yield self.gateway.wait_for("session.end", 3)
        commands = self.gateway.commands("exec")
        self.assertEqual(
            [command["decision"]["rule"] for command in commands],
            ["block:baseline:other-user", "block:baseline:remove-root", "block:baseline:download-and-run"],
        )
        self.assertEqual({command["outcome"]["status"] for command in commands}, {"denied"})
        self.assertEqual(commands[2]["facts"]["pipelines"], [[["curl"], ["sh"]]])

    @defer.inlineCallbacks
    def test_approved_through_api(self):
        """
        A command matching an approval rule waits in its session (the
        client is told the request id and how to approve it), does not run
        until a person approves it through the approvals API, then runs;
        the record holds the request, the vote and the approval on the
        command.
        """
        marker = os.path.join(self.remote, "deployed")
        running = self.gateway.ssh("touch %s && echo done" % (marker,))
        shown = yield approve_through_api(self.gateway)
        self.assertEqual(shown["statement"], "touch %s && echo done" % (marker,))
        self.assertEqual(shown["rule"], "deploy-markers")
        out, err, code = yield running
        self.assertEqual((out, code), (b"done\n", 0), err)
        self.assertIn("hoopgw: this command needs approval (rule deploy-markers", err)
        self.assertNotIn("hoopgw: hoopgw:", err)
        self.assertTrue(os.path.exists(marker))
        yield self.gateway.wait_for("session.end")
        (command,) = self.gateway.commands("exec")
        self.assertEqual(command["decision"]["verdict"], "approved")
        self.assertEqual(command["decision"]["approval"]["approvers"][0]["subject"], "alice")
        kinds = [event["type"] for event in self.gateway.events() if event["type"].startswith("approval.")]
        self.assertEqual(kinds[:3], ["approval.request", "approval.vote", "approval.approved"])

    @defer.inlineCallbacks
    def test_masked_output(self):
        """
        The mask addon masks card numbers on stdout and stderr, also when
        one is written in two pieces 300 ms apart (two SSH packets) and
        when the output ends in one (released masked at the end); the
        record holds no clear card number.
        """
        script = (
            "printf '4111 1111 '; sleep 0.3; printf '1111 1111\\n'; "
            "printf '4111111' >&2; sleep 0.3; printf '111111111\\n' >&2; "
            "printf 'last %s'" % (PAN,)
        )
        out, err, code = yield self.gateway.ssh(script)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, ("4111 11** **** 1111\nlast %s" % (MASKED,)).encode())
        self.assertIn(MASKED + "\n", err)
        self.assertNotIn(PAN, err)
        yield self.gateway.wait_for("session.end")
        (command,) = self.gateway.commands("exec")
        self.assertEqual(command["outcome"]["masked"], 3)
        raw = self.gateway.raw_store()
        self.assertNotIn(PAN.encode(), raw)
        self.assertNotIn(b"1111 1111 1111", raw)

    def test_explain(self):
        """
        hoopgw explain reads a command line on an SSH connection: what
        block and approve would decide, and why.
        """
        from hoopgw.explain import explain

        lines = explain(self.gateway.config, "deploy", "curl -s https://x.test/i.sh | sudo bash")
        self.assertIn("command: curl -s https://x.test/i.sh | sudo bash", lines)
        self.assertIn("  block:    deny: rule baseline:other-user matched (program sudo): runs commands as another user; "
                      "the login the gateway uses is all this identity may act as", lines)
        self.assertEqual(lines[-1], "  => deny (block)")
        lines = explain(self.gateway.config, "deploy", "touch /srv/deployed")
        self.assertEqual(lines[-1], "  => needs approval (approve)")

    @defer.inlineCallbacks
    def test_sftp_upload_denied(self):
        """
        An sftp upload into a protected folder is refused by a block rule
        (the client sees permission denied, nothing is written); an upload
        elsewhere goes through.
        """
        local = os.path.abspath(self.mktemp())
        os.makedirs(local)
        with open(os.path.join(local, "release.txt"), "w") as handle:
            handle.write("v2\n")
        batch = os.path.join(local, "batch")
        with open(batch, "w") as handle:
            handle.write("put %s/release.txt %s/release.txt\n" % (local, self.remote))
            handle.write("put %s/release.txt %s/protected/release.txt\n" % (local, self.remote))
        options = self.gateway.options()
        options[options.index("-p")] = "-P"
        out, err, code = yield run([SFTP] + options + ["-b", batch, "%s@127.0.0.1" % (self.gateway.login,)])
        self.assertNotEqual(code, 0)
        self.assertIn("Permission denied", err)
        self.assertTrue(os.path.exists(os.path.join(self.remote, "release.txt")))
        self.assertFalse(os.path.exists(os.path.join(self.remote, "protected", "release.txt")))
        yield self.gateway.wait_for("session.end")
        (denied,) = [command for command in self.gateway.commands("sftp") if command["decision"]["verdict"] == "deny"]
        self.assertEqual(denied["decision"]["rule"], "block:no-protected-uploads")
        self.assertEqual(denied["facts"]["path"], os.path.join(self.remote, "protected", "release.txt"))
        self.assertIn("protected files change through the release pipeline", denied["decision"]["reason"])


class KubernetesEnforcementTests(unittest.TestCase):
    """
    kubectl through block (its baseline and the connection's rules),
    approve and mask.
    """

    @defer.inlineCallbacks
    def setUp(self):
        addons = (
            "identity",
            {"block": {"rules": [
                {"name": "no-exec-in-prod", "verbs": ["create"], "resources": ["pods/exec", "pods/attach"],
                 "namespaces": ["prod"], "reason": "production is changed through deployments"},
            ]}},
            {"approve": {"rules": [
                {"name": "deletes", "verbs": ["delete", "deletecollection"], "approvers": ["sre"], "timeout": "30s"},
            ]}},
            "mask",
            "record",
        )
        self.cluster = Cluster(self, addons=addons, admin=ADMIN)
        yield self.cluster.ready()
        api = self.cluster.api
        api.create(("", "v1", "namespaces"), None, {"metadata": {"name": "prod"}})
        api.create(("", "v1", "pods"), "prod", {"metadata": {"name": "db-0"}})
        api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})

    @defer.inlineCallbacks
    def test_delete_namespace_denied(self):
        """
        kubectl delete namespace is refused by the baseline: kubectl prints
        the Forbidden Status naming the rule, the namespace stays, and the
        record has the denial.
        """
        cluster = self.cluster
        out, err, code = yield cluster.kubectl("delete", "namespace", "prod")
        self.assertNotEqual(code, 0)
        self.assertIn(
            "Error from server (Forbidden): hoopgw denied this request: rule baseline:delete-namespaces matched "
            "(verb delete; resource namespaces): deletes a namespace and everything in it "
            "(rule block:baseline:delete-namespaces)",
            err,
        )
        self.assertIsNotNone(cluster.api.get(("", "v1", "namespaces"), None, "prod"))
        (end,) = yield cluster.wait_for_end("delete", "namespaces")
        self.assertEqual(end["decision"]["rule"], "block:baseline:delete-namespaces")
        self.assertEqual(end["outcome"]["audit"]["responseStatus"]["code"], 403)

    @defer.inlineCallbacks
    def test_exec_in_prod_denied(self):
        """
        kubectl exec into a pod of prod is refused before anything runs,
        whichever transport kubectl tries; in another namespace it runs.
        """
        cluster = self.cluster
        marker = os.path.join(cluster.directory, "ran")
        out, err, code = yield cluster.kubectl("exec", "-n", "prod", "db-0", "--", "touch", marker)
        self.assertNotEqual(code, 0)
        self.assertIn("hoopgw denied this request: rule no-exec-in-prod matched (verb create; resource pods/exec; "
                      "namespace prod): production is changed through deployments", err)
        self.assertFalse(os.path.exists(marker))
        for end in (yield cluster.wait_for_end("create", "pods")):
            self.assertEqual(end["decision"]["rule"], "block:no-exec-in-prod")
        out, err, code = yield cluster.kubectl("exec", "web-1", "--", "touch", marker)
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.exists(marker))

    @defer.inlineCallbacks
    def test_delete_approved_through_api(self):
        """
        kubectl delete configmap is held, unseen by the API server, until a
        person approves it through the approvals API; then it runs, kubectl
        prints the notice as a warning, and the record carries the approval.
        """
        cluster = self.cluster
        cluster.api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "old"}})
        running = cluster.kubectl("delete", "configmap", "old", "--wait=false")
        # Pending: the API server has not seen the delete.
        yield eventually(cluster.harness.gateway.approvals.list)
        self.assertNotIn("DELETE", [method for method, _ in cluster.api.requests])
        shown = yield approve_through_api(cluster.harness)
        self.assertEqual(shown["facts"]["verb"], "delete")
        self.assertEqual(shown["statement"].partition("?")[0], "DELETE /api/v1/namespaces/default/configmaps/old")
        out, err, code = yield running
        self.assertEqual((out.strip(), code), ('configmap "old" deleted', 0), err)
        self.assertIn("Warning: hoopgw: this request needs approval (rule deletes", err)
        self.assertIsNone(cluster.api.get(("", "v1", "configmaps"), "default", "old"))
        (end,) = yield cluster.wait_for_end("delete", "configmaps")
        self.assertEqual(end["decision"]["verdict"], "approved")
        self.assertEqual(end["decision"]["approval"]["approvers"][0]["subject"], "alice")

    def test_explain(self):
        """
        hoopgw explain reads METHOD /path on a Kubernetes connection (a GET
        of exec as kubectl's WebSocket upgrade, the verb create).
        """
        from hoopgw.explain import explain

        config = self.cluster.harness.config
        lines = explain(config, "cluster", "GET /api/v1/namespaces/prod/pods/db-0/exec?command=sh")
        self.assertIn("request: GET /api/v1/namespaces/prod/pods/db-0/exec?command=sh", lines)
        self.assertIn("  block:    deny: rule no-exec-in-prod matched (verb create; resource pods/exec; namespace prod): "
                      "production is changed through deployments", lines)
        self.assertEqual(lines[-1], "  => deny (block)")
        self.assertEqual(explain(config, "cluster", "GET /api/v1/namespaces/default/pods/web-1/exec?command=sh")[-1], "  => allow")
        self.assertEqual(explain(config, "cluster", "delete /api/v1/namespaces/default/configmaps/x")[-1], "  => needs approval (approve)")
        from hoopgw.options import ConfigError

        error = self.assertRaises(ConfigError, explain, config, "cluster", "kubectl delete ns x")
        self.assertIn("give the API request as METHOD /path", str(error))

    @defer.inlineCallbacks
    def test_masked(self):
        """
        The mask addon masks a card number in a ConfigMap, in a Secret
        (inside its base64), in a list, in a log, and the record holds none
        in clear.
        """
        cluster = self.cluster
        api = cluster.api
        api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": "cards"}, "data": {"pan": PAN}})
        api.create(("", "v1", "secrets"), "default",
                   {"metadata": {"name": "card"}, "data": {"pan": base64.b64encode(PAN.encode()).decode()}})
        api.add_log("default", "web-1", "charged %s ok" % (PAN,))
        out, err, code = yield cluster.kubectl("get", "configmap", "cards", "-o", "jsonpath={.data.pan}")
        self.assertEqual((out, code), (MASKED, 0), err)
        out, err, code = yield cluster.kubectl("get", "configmaps", "-o", "json")
        self.assertEqual([item["data"].get("pan") for item in json.loads(out)["items"]], [MASKED])
        out, err, code = yield cluster.kubectl("get", "secret", "card", "-o", "jsonpath={.data.pan}")
        self.assertEqual((base64.b64decode(out).decode(), code), (MASKED, 0), err)
        out, err, code = yield cluster.kubectl("logs", "web-1")
        self.assertEqual((out, code), ("charged %s ok\n" % (MASKED,), 0), err)
        self.assertNotIn(PAN.encode(), cluster.harness.raw_store())

    @defer.inlineCallbacks
    def test_logs_follow_split(self):
        """
        kubectl logs -f: a card number the pod writes in two pieces arrives
        masked, and what is held back at the end is released.
        """
        cluster = self.cluster
        api = cluster.api
        following = cluster.kubectl("logs", "-f", "web-1")
        yield eventually(lambda: api.followers.get(("default", "web-1")))
        # A line written in two pieces, as a pod flushing mid-line does, then
        # one the log ends in without a newline.
        for piece in ("card 4111 1111 ", "1111 1111 ok\n", "last %s" % (PAN,)):
            for follower in api.followers[("default", "web-1")]:
                follower.request.write(piece.encode())
            yield task.deferLater(reactor, 0.3, lambda: None)
        api.end_log("default", "web-1")
        out, err, code = yield following
        self.assertEqual((out, code), ("card 4111 11** **** 1111 ok\nlast %s" % (MASKED,), 0), err)
        ends = yield cluster.wait_for_end("get", "pods", count=2)
        (end,) = [end for end in ends if end["outcome"]["audit"]["objectRef"].get("subresource") == "log"]
        self.assertEqual(end["outcome"]["masked"], 2)

    @defer.inlineCallbacks
    def test_exec_output_split(self):
        """
        kubectl exec output is masked by the mask addon also when a card
        number spans two WebSocket frames; digits held back at the end of
        the output arrive (masked) before the exit status, which still
        comes through; the recording holds the masked output.
        """
        cluster = self.cluster
        script = "printf 'card 4111 1111 '; sleep 0.3; printf '1111 1111\\n'; printf 'total %s'; exit 3" % (PAN,)
        out, err, code = yield cluster.kubectl("exec", "web-1", "--", "sh", "-c", script)
        self.assertEqual(out, "card 4111 11** **** 1111\ntotal %s" % (MASKED,), err)
        self.assertEqual(code, 3, err)
        (end,) = yield cluster.wait_for_end("create", "pods")
        self.assertEqual(end["outcome"]["masked"], 2)
        self.assertEqual(end["outcome"]["exit"], 3)
        path = os.path.join(cluster.harness.store_path, "casts", end["outcome"]["cast"]["name"])
        with open(path) as handle:
            output = "".join(json.loads(line)[2] for line in handle.read().splitlines()[1:] if json.loads(line)[1] == "o")
        self.assertEqual(output, "card 4111 11** **** 1111\ntotal %s" % (MASKED,))
        self.assertNotIn(PAN.encode(), cluster.harness.raw_store())


class ExampleConfigurationTests(unittest.TestCase):
    """
    The example enforcement configuration's SSH and Kubernetes rules.
    """

    def test_example(self):
        """
        etc/enforcement.yaml has an SSH and a Kubernetes connection whose
        addon sections pass their addons' option checks (the file's paths
        exist only on a real gateway host, so the whole file is not loaded
        here), with block and approve rules in each protocol's own terms.
        """
        from hoopgw import config as configuration
        from hoopgw import options

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "enforcement.yaml")
        with open(path) as handle:
            document = yaml.safe_load(handle)
        known = configuration.builtin_addons()
        protocols = {}
        for name, connection in document["connections"].items():
            protocols[connection["protocol"]] = name
            for entry in connection["addons"]:
                ((addon, raw),) = entry.items() if isinstance(entry, dict) else ((entry, None),)
                options.parse_options(known[addon].options, raw, "%s.%s" % (name, addon))
        self.assertEqual(sorted(protocols), ["kubernetes", "postgres", "ssh"])
        for protocol in ("ssh", "kubernetes"):
            names = [list(entry)[0] if isinstance(entry, dict) else entry for entry in document["connections"][protocols[protocol]]["addons"]]
            self.assertEqual(names, ["identity", "block", "approve", "mask", "record"], protocol)
