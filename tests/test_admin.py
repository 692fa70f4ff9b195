"""
The admin API (/api/admin on the admin listener) and C{hoopgw admin}:
operators signed in with their own tokens toggle addons, pause and resume
connections, end sessions and reload the file; every action, and every
refusal, is in the record with who did it; SIGHUP is recorded as the local
operator.
"""

import io
import json
import os
import signal

import treq
import yaml
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from hoopgw import cli
from tests.support import AdminGatewayHarness, human_token, in_thread, psql, token

PAN = "4111111111111111"


def operator_token(subject="carol"):
    return human_token(subject, groups=("sre",))


class AdminTests(unittest.TestCase):
    """
    Operators act on a running gateway through the API.
    """

    def setUp(self):
        self.gateway = AdminGatewayHarness(
            self, addons=["identity", "record"], admin={"approver_groups": ["dba"], "admin_groups": ["sre"]}
        )
        self.token = token()

    @defer.inlineCallbacks
    def api(self, method, path, who, body=None):
        headers = {"Authorization": ["Bearer " + who]} if who else {}
        response = yield treq.request(
            method,
            self.gateway.admin_url + "/api/admin" + path,
            headers=headers,
            json=body,
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        answer = yield response.json()
        return response.code, answer

    @defer.inlineCallbacks
    def live_sessions(self, count=1):
        for _ in range(200):
            code, answer = yield self.api("GET", "/sessions", operator_token())
            if len(answer["sessions"]) >= count:
                return answer["sessions"]
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("no live session")

    @defer.inlineCallbacks
    def test_toggle_addon_recorded(self):
        """
        An operator turns mask on for one connection: the next session's
        card number comes back masked, and the record's chain.changed names
        the operator's subject, the reason and the chain before and after;
        turned off again, the card number is in clear and that change is
        recorded too.
        """
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT '%s'" % (PAN,), password=self.token)
        self.assertEqual(out.strip(), PAN, err)
        code, answer = yield self.api(
            "POST", "/connections/payments/addons/mask/enable", operator_token(), {"reason": "CHG-9 mask cards"}
        )
        self.assertEqual((code, [step["name"] for step in answer["chain"]]), (200, ["identity", "mask", "record"]), answer)
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT '%s'" % (PAN,), password=self.token)
        self.assertEqual(out.strip(), "411111******1111", err)
        (changed,) = self.gateway.events("chain.changed")
        self.assertEqual((changed["by"]["subject"], changed["by"]["kind"]), ("carol", "oidc"))
        self.assertEqual((changed["action"], changed["addon"], changed["reason"]), ("addon.enable", "mask", "CHG-9 mask cards"))
        self.assertEqual([step["name"] for step in changed["before"]["chain"]], ["identity", "record"])
        self.assertEqual([step["name"] for step in changed["after"]["chain"]], ["identity", "mask", "record"])
        code, answer = yield self.api(
            "POST", "/connections/payments/addons/mask/disable", operator_token("dave"), {"reason": "CHG-10"}
        )
        self.assertEqual((code, answer["disabled"]), (200, ["mask"]), answer)
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT '%s'" % (PAN,), password=self.token)
        self.assertEqual(out.strip(), PAN, err)
        changes = self.gateway.events("chain.changed")
        self.assertEqual([(event["by"]["subject"], event["action"]) for event in changes],
                         [("carol", "addon.enable"), ("dave", "addon.disable")])

    @defer.inlineCallbacks
    def test_options_changed(self):
        """
        An operator replaces an addon's options at run time: block with a
        rule denies DROP for new sessions; bad options are refused with the
        key path and change nothing.
        """
        code, answer = yield self.api(
            "POST", "/connections/payments/addons/block/enable", operator_token(),
            {"reason": "CHG-11", "options": {"rules": [{"name": "no-drop", "kinds": ["DROP"]}]}},
        )
        self.assertEqual(code, 200, answer)
        out, err, code = yield psql(self.gateway.dsn(), "-c", "DROP TABLE IF EXISTS admin_nothing", password=self.token)
        self.assertIn("no-drop", err)
        code, answer = yield self.api(
            "POST", "/connections/payments/addons/block/options", operator_token(),
            {"reason": "CHG-12", "options": {"rulez": []}},
        )
        self.assertEqual(code, 400, answer)
        self.assertIn("connections.payments.addons.block", answer["error"])
        self.assertEqual(len(self.gateway.events("chain.changed")), 1)

    @defer.inlineCallbacks
    def test_refused_without_admin_group(self):
        """
        A valid token without an admin group is refused (403) and the
        refusal is recorded with its subject; so is a token that does not
        verify (401), and nothing changes.
        """
        code, answer = yield self.api(
            "POST", "/connections/payments/addons/mask/enable", human_token("mallory", groups=("dba",)), {"reason": "x"}
        )
        self.assertEqual(code, 403, answer)
        self.assertIn("not in any admin group", answer["error"])
        code, answer = yield self.api("GET", "/sessions", "not-a-token")
        self.assertEqual(code, 401, answer)
        refusals = self.gateway.events("admin.refused")
        self.assertEqual(
            [(event["by"] and event["by"]["subject"], event["request"]) for event in refusals],
            [("mallory", "POST /api/admin/connections/payments/addons/mask/enable"), (None, "GET /api/admin/sessions")],
        )
        self.assertIn("not in any admin group", refusals[0]["reason"])
        self.assertEqual(self.gateway.events("chain.changed"), [])

    @defer.inlineCallbacks
    def test_pause_resume(self):
        """
        A paused connection holds a new session until an operator resumes
        it, then the session runs; with wait 0 a new session is refused at
        once, naming the pause, and the refusal is recorded.  Both actions
        are recorded with the operator.
        """
        code, answer = yield self.api("POST", "/connections/payments/pause", operator_token(), {"reason": "failover", "wait": "30s"})
        self.assertEqual((code, answer["paused"]["wait"]), (200, 30.0), answer)
        running = psql(self.gateway.dsn(), "-c", "SELECT 'resumed'", password=self.token)
        pause = self.gateway.gateway.monitors["payments"].gate
        for _ in range(200):
            if pause.waiting:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(pause.waiting), 1)
        self.assertFalse(running.called)
        code, answer = yield self.api("POST", "/connections/payments/resume", operator_token("dave"), {"reason": "done"})
        self.assertEqual((code, answer["paused"]), (200, None), answer)
        out, err, code = yield running
        self.assertEqual((code, out.strip()), (0, "resumed"), err)
        actions = [(event["action"], event["by"]["subject"]) for event in self.gateway.events("admin.action")]
        self.assertEqual(actions, [("connection.pause", "carol"), ("connection.resume", "dave")])
        self.assertEqual(self.gateway.events("admin.action")[1]["after"]["released"], 1)

        code, answer = yield self.api("POST", "/connections/payments/pause", operator_token(), {"reason": "maintenance", "wait": 0})
        self.assertEqual(code, 200, answer)
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT 1", password=self.token)
        self.assertNotEqual(code, 0)
        self.assertIn("paused by an operator (maintenance)", err)
        (refused,) = self.gateway.events("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "paused")

    @defer.inlineCallbacks
    def test_end_session(self):
        """
        The live session is listed with who, commands and bytes; an
        operator ends it: the client is disconnected, the session's end in
        the record says who ended it and why, and the action is recorded.
        """
        running = psql(self.gateway.dsn(), "-c", "SELECT 1", "-c", "SELECT pg_sleep(60)", password=self.token)
        (live,) = yield self.live_sessions()
        self.assertEqual((live["subject"], live["connection"], live["protocol"]), ("ci-bot", "payments", "postgres"))
        self.assertGreater(live["bytes_from_client"], 0)
        code, answer = yield self.api("POST", "/sessions/%s/end" % (live["id"],), operator_token(), {"reason": "runaway"})
        self.assertEqual((code, answer), (200, {"ended": True, "session": live["id"]}))
        out, err, code = yield running
        self.assertNotEqual(code, 0)
        self.assertIn("hoopgw: carol ended this session: runaway", err)
        (end,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(end["reason"], "ended by carol: runaway")
        (action,) = self.gateway.events("admin.action")
        self.assertEqual((action["action"], action["session"], action["by"]["subject"]), ("session.end", live["id"], "carol"))
        code, answer = yield self.api("GET", "/sessions", operator_token())
        self.assertEqual(answer["sessions"], [])

    @defer.inlineCallbacks
    def test_reload_and_sighup(self):
        """
        A reload through the API and one by SIGHUP each apply the edited
        file; the first chain.changed names the operator, the second the
        local operator (signal and uid).
        """
        document = self.gateway.document
        document["connections"]["payments"]["addons"] = ["identity", "mask", "record"]
        with open(self.gateway.config_path, "w") as handle:
            yaml.safe_dump(document, handle)
        code, answer = yield self.api("POST", "/reload", operator_token(), {"reason": "CHG-20"})
        self.assertEqual((code, answer["changed"]), (200, ["payments"]), answer)
        document["connections"]["payments"]["addons"] = ["identity", "record"]
        with open(self.gateway.config_path, "w") as handle:
            yaml.safe_dump(document, handle)
        previous = signal.signal(signal.SIGHUP, self.gateway.gateway._hangup)
        self.addCleanup(signal.signal, signal.SIGHUP, previous)
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(200):
            changes = self.gateway.events("chain.changed")
            if len(changes) == 2:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(changes[0]["by"]["subject"], "carol")
        by = changes[1]["by"]
        self.assertEqual((by["kind"], by["signal"], by["uid"]), ("local", "SIGHUP", os.getuid()))
        (action,) = self.gateway.events("admin.action")
        self.assertEqual((action["action"], action["reason"]), ("config.reload", "CHG-20"))

    @defer.inlineCallbacks
    def test_command_line(self):
        """
        C{hoopgw admin} lists connections, turns an addon off with a
        reason and lists it as off, signed in with the operator's token.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write(operator_token())
        common = ["admin", "--url", self.gateway.admin_url, "--token-file", path]

        def run(*arguments):
            out = io.StringIO()
            code = cli.main(common + list(arguments), out)
            return code, out.getvalue()

        code, out = yield in_thread(run, "addon", "payments", "record", "off", "--reason", "CHG-30")
        self.assertEqual(code, 0, out)
        code, out = yield in_thread(run, "connections")
        self.assertEqual(code, 0, out)
        self.assertIn("chain identity (off: record)", out)
        code, out = yield in_thread(run, "--json", "sessions")
        self.assertEqual((code, json.loads(out)), (0, {"sessions": []}))
        (changed,) = self.gateway.events("chain.changed")
        self.assertEqual((changed["by"]["subject"], changed["reason"]), ("carol", "CHG-30"))


class SSHAdminTests(unittest.TestCase):
    """
    The same actions on an SSH connection.
    """

    def setUp(self):
        from tests.ssh_support import SSHGateway

        self.gateway = SSHGateway(self, admin={"admin_groups": ["sre"], "approver_groups": ["dba"]})

    @defer.inlineCallbacks
    def api(self, method, path, who, body=None):
        response = yield treq.request(
            method,
            self.gateway.admin_url + "/api/admin" + path,
            headers={"Authorization": ["Bearer " + who]},
            json=body,
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        answer = yield response.json()
        return response.code, answer

    @defer.inlineCallbacks
    def test_end_ssh_session(self):
        """
        A running SSH exec's session is listed (ssh, its identity, bytes
        both ways, the exec counted once finished) and ended by an
        operator: ssh exits, the session's end names the operator; the
        metrics count the session under the ssh protocol.
        """
        from hoopgw import metrics

        started = metrics.sessions_started.labels("deploy", "ssh").value
        running = self.gateway.ssh("sleep 60")
        for _ in range(200):
            code, answer = yield self.api("GET", "/sessions", operator_token())
            if answer["sessions"]:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        (live,) = answer["sessions"]
        self.assertEqual((live["protocol"], live["subject"]), ("ssh", "deploy-bot"))
        self.assertGreater(live["bytes_from_client"], 0)
        self.assertGreater(live["bytes_to_client"], 0)
        code, answer = yield self.api("POST", "/sessions/%s/end" % (live["id"],), operator_token(), {"reason": "stuck deploy"})
        self.assertEqual(code, 200, answer)
        out, err, code = yield running
        self.assertNotEqual(code, 0)
        self.assertIn("hoopgw: carol ended this session: stuck deploy", err)
        (end,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(end["reason"], "ended by carol: stuck deploy")
        self.assertEqual(metrics.sessions_started.labels("deploy", "ssh").value - started, 1)
        self.assertEqual(metrics.sessions_active.labels("deploy", "ssh").value, 0)
