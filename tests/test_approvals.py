"""
Just-in-time approvals: the broker's rules (who may approve, how many,
how soon, for which statement), grants, and the whole path end to end:
psql waiting inside its session, approvers acting through the HTTP API and
the CLI with their own tokens, a webhook delivered to a real receiver, and
the record.
"""

import json
import os
import subprocess
import sys

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web import resource, server

from hoopgw.approvals import ApprovalError, ApprovalRule, Broker
from hoopgw.approvals.webhook import Webhook
from hoopgw.model import HUMAN, SERVICE
from hoopgw.testing import MemoryStore, identity, session, sql_command
from testbed.throwaway import free_port

from tests import support
from tests.support import AdminGatewayHarness, human_token, psql, token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def person(subject, groups=("dba",)):
    return identity(subject, groups=groups, kind=HUMAN, issuer="https://people.test")


def result_of(deferred):
    results = []
    deferred.addBoth(results.append)
    return results[0] if results else None


class BrokerTests(unittest.TestCase):
    """
    The broker alone, on a fake clock, with a memory store.
    """

    def setUp(self):
        self.clock = Clock()
        self.store = MemoryStore()
        self.broker = Broker(self.clock, self.store.append, clock=self.clock.seconds)
        self.rule = ApprovalRule(name="ddl", approvers={"dba"}, approvals=2, timeout=60)
        self.broker.register("test", self.rule)
        self.session = session()
        self.notices = []
        self.session.notifier = self.notices.append
        self.command = sql_command("DROP TABLE orders")
        self.waiting = self.broker.submit(self.session, self.command, self.rule)
        (self.request,) = self.broker.list()

    def refused(self, deferred, expected):
        failure = result_of(deferred)
        self.assertIsNotNone(failure)
        failure.trap(ApprovalError)
        self.assertIn(expected, str(failure.value))
        return failure.value

    def test_notice(self):
        """
        The client is told the request id and how to approve it.
        """
        (notice,) = self.notices
        self.assertIn(self.request.id, notice)
        self.assertIn("hoopgw approvals approve %s" % (self.request.id,), notice)
        self.assertEqual(self.store.of_type("approval.request")[0]["digest"], self.request.digest)

    def test_quorum(self):
        """
        With two approvals required, the first keeps the statement waiting
        and the second, from someone else, releases it with both approvers
        and reasons in the decision.
        """
        result_of(self.broker.approve(self.request.id, person("alice"), "CHG-1"))
        self.assertNoResult(self.waiting)
        result_of(self.broker.approve(self.request.id, person("bob"), "CHG-1 reviewed"))
        decision = self.successResultOf(self.waiting)
        self.assertEqual(decision.verdict, "approved")
        self.assertEqual([a["subject"] for a in decision.approval["approvers"]], ["alice", "bob"])
        self.assertEqual(decision.approval["digest"], self.request.digest)
        self.assertEqual(len(self.store.of_type("approval.vote")), 2)
        self.assertEqual(len(self.store.of_type("approval.approved")), 1)

    def test_reason_redacted(self):
        """
        A card number pasted into a reason is masked before it reaches the
        decision and the record.
        """
        result_of(self.broker.deny(self.request.id, person("alice"), "card 4111 1111 1111 1111 is a test card"))
        decision = self.successResultOf(self.waiting)
        self.assertIn("4111 11** **** 1111", decision.reason)
        self.assertNotIn("4111 1111 1111 1111", repr(self.store.events))

    def test_same_approver_twice(self):
        """
        One person cannot make a quorum of two alone.
        """
        result_of(self.broker.approve(self.request.id, person("alice"), "CHG-1"))
        self.refused(self.broker.approve(self.request.id, person("alice"), "again"), "already voted")
        self.assertNoResult(self.waiting)

    def test_refusals(self):
        """
        The requester, a service identity, someone outside the approver
        groups and an approval without a reason are refused, and each
        refusal is recorded.
        """
        self.refused(self.broker.approve(self.request.id, person("ci-bot"), "me"), "cannot approve their own request")
        service = identity("deploy-bot", groups=("dba",), kind=SERVICE)
        self.refused(self.broker.approve(self.request.id, service, "ok"), "is a service identity")
        self.refused(self.broker.approve(self.request.id, person("mallory", ("devs",)), "ok"), "not in the approver groups")
        self.refused(self.broker.approve(self.request.id, person("alice"), "  "), "give a reason")
        self.assertEqual(len(self.store.of_type("approval.refused")), 4)
        self.assertEqual(self.request.approvals, [])

    def test_digest_binding(self):
        """
        An approval naming another statement's digest is refused; the
        digest binds statement, parameters, identity and connection.
        """
        other = sql_command("DROP TABLE customers")
        from hoopgw.approvals import approval_digest

        foreign = approval_digest(other, self.session.identity, "test")
        self.refused(self.broker.approve(self.request.id, person("alice"), "ok", digest=foreign), "is not this request's")
        self.assertNotEqual(approval_digest(self.command, identity("other-bot"), "test"), self.request.digest)
        self.assertNotEqual(approval_digest(self.command, self.session.identity, "other"), self.request.digest)
        with_parameters = sql_command("DROP TABLE orders", parameters=[b"1"])
        self.assertNotEqual(approval_digest(with_parameters, self.session.identity, "test"), self.request.digest)

    def test_deny(self):
        """
        One denial refuses the statement with the approver's reason.
        """
        result_of(self.broker.deny(self.request.id, person("alice"), "change freeze"))
        decision = self.successResultOf(self.waiting)
        self.assertEqual((decision.verdict, decision.rule), ("deny", "approve:ddl:denied"))
        self.assertIn("change freeze", decision.reason)
        self.refused(self.broker.approve(self.request.id, person("bob"), "late"), "is denied")

    def test_timeout(self):
        """
        Nobody approves in time: the statement is refused, and the record
        says it expired.
        """
        self.clock.advance(61)
        decision = self.successResultOf(self.waiting)
        self.assertEqual(decision.rule, "approve:ddl:timeout")
        self.assertEqual(self.request.status, "expired")
        self.assertEqual(len(self.store.of_type("approval.expired")), 1)

    def test_cancel(self):
        """
        A client that gives up cancels its request, which can then not be
        approved.
        """
        self.waiting.cancel()
        self.failureResultOf(self.waiting, defer.CancelledError)
        self.assertEqual(self.request.status, "cancelled")
        self.assertEqual(len(self.store.of_type("approval.cancelled")), 1)
        self.refused(self.broker.approve(self.request.id, person("alice"), "late"), "is cancelled")

    def test_grants(self):
        """
        A grant pre-approves one identity for one rule for a window: used
        and recorded while it lasts, gone once it expires or is revoked;
        nobody grants themselves, nor longer than the rule allows.
        """
        grant = result_of(self.broker.grant(person("alice"), "test", "ddl", "ci-bot", 3600, "nightly batch"))
        self.assertEqual(self.broker.active_grant("test", "ddl", self.session.identity), grant)
        decision = self.successResultOf(self.broker.use_grant(grant, self.session, self.command))
        self.assertEqual((decision.verdict, decision.approval["grant"]), ("approved", grant.id))
        self.assertEqual(self.store.of_type("grant.use")[0]["use"], 1)
        self.clock.advance(3601)
        self.assertIsNone(self.broker.active_grant("test", "ddl", self.session.identity))
        self.refused(self.broker.grant(person("alice"), "test", "ddl", "alice", 60, "me"), "cannot grant themselves")
        self.refused(self.broker.grant(person("alice"), "test", "ddl", "ci-bot", 10 * 86400, "long"), "at most 24h")
        self.refused(self.broker.grant(person("alice"), "test", "nope", "ci-bot", 60, "x"), "no approval rule")
        second = result_of(self.broker.grant(person("bob"), "test", "ddl", "ci-bot", 600, "rerun"))
        result_of(self.broker.revoke(second.id, person("alice"), "done early"))
        self.assertIsNone(self.broker.active_grant("test", "ddl", self.session.identity))
        self.assertEqual(len(self.store.of_type("grant.revoke")), 1)


class Receiver(resource.Resource):
    """
    A webhook receiver: records every POST, answers with the next code of
    C{codes} (then 200).
    """

    isLeaf = True

    def __init__(self, codes=()):
        resource.Resource.__init__(self)
        self.codes = list(codes)
        self.received = []
        self.arrived = defer.Deferred()

    def render_POST(self, request):
        self.received.append((dict(request.requestHeaders.getAllRawHeaders()), request.content.read()))
        code = self.codes.pop(0) if self.codes else 200
        request.setResponseCode(code)
        if code == 200 and not self.arrived.called:
            self.arrived.callback(None)
        return b"ok"


def app_psql(sql):
    return support.cluster().psql(sql, user="app", password=support.APP_PASSWORD, dbname="payments")


class ApprovalsEndToEndTests(unittest.TestCase):
    """
    psql waits in its session while people approve through the API, the
    CLI, or a grant.
    """

    def setUp(self):
        app_psql("DROP TABLE IF EXISTS approvals_t; CREATE TABLE approvals_t (id int); INSERT INTO approvals_t VALUES (1), (2), (3)")
        self.receiver = Receiver(codes=[503])
        self.receiver_port = free_port()
        self.listener = reactor.listenTCP(self.receiver_port, server.Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(self.listener.stopListening)
        rules = [
            {"name": "unfiltered-writes", "without_where": True, "approvers": ["dba"], "timeout": "30s"},
            {"name": "ddl", "kinds": ["DDL"], "approvers": ["dba"], "approvals": 2, "timeout": "30s"},
            {"name": "quick", "tables": ["approvals_quick"], "approvers": ["dba"], "timeout": "1s"},
        ]
        webhook = {"url": "http://127.0.0.1:%d/hook" % (self.receiver_port,), "backoff": "0.1s"}
        self.gateway = AdminGatewayHarness(
            self,
            addons=["identity", {"approve": {"rules": rules, "notify": [webhook]}}, "mask", "record"],
            admin={"approver_groups": ["dba", "sre"]},
        )
        self.broker = self.gateway.gateway.approvals
        self.token = token()

    def start(self, sql):
        """
        Run C{sql} with psql; it waits for its approval.
        """
        return psql(self.gateway.dsn(), "-c", sql, password=self.token)

    @defer.inlineCallbacks
    def pending(self, count=1):
        for _ in range(200):
            found = self.broker.list()
            if len(found) >= count:
                return found
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("no pending approval request")

    @defer.inlineCallbacks
    def api(self, method, path, who=None, body=None):
        headers = {}
        if who is not None:
            headers["Authorization"] = ["Bearer " + who]
        from twisted.web.client import HTTPConnectionPool

        response = yield treq.request(
            method,
            self.gateway.admin_url + path,
            headers=headers,
            json=body if body is not None else None,
            pool=HTTPConnectionPool(reactor, persistent=False),
        )
        answer = yield response.json()
        return response.code, answer

    @defer.inlineCallbacks
    def test_approved_runs(self):
        """
        An UPDATE without WHERE waits; psql is told the request id; an
        approver approves it through the API with their own token and a
        reason; the statement runs and its result comes back; the record
        holds the request, the vote and the outcome, and the command's
        decision carries the approval; the webhook was delivered after one
        retry.
        """
        running = self.start("UPDATE approvals_t SET id = id + 10")
        (request,) = yield self.pending()
        code, answer = yield self.api("GET", "/api/approvals", human_token("alice"))
        self.assertEqual((code, [item["id"] for item in answer["approvals"]]), (200, [request.id]))
        self.assertEqual(answer["approvals"][0]["statement"], "UPDATE approvals_t SET id = id + 10")
        code, answer = yield self.api(
            "POST", "/api/approvals/%s/approve" % (request.id,), human_token("alice"), {"reason": "CHG-7 backfill"}
        )
        self.assertEqual((code, answer["status"]), (200, "approved"), answer)
        out, err, code = yield running
        self.assertEqual(code, 0, err)
        self.assertIn("needs approval (rule unfiltered-writes", err)
        self.assertIn(request.id, err)
        self.assertEqual(app_psql("SELECT sum(id) FROM approvals_t").strip(), "36")
        (command,) = self.gateway.events("command")
        approval = command["decision"]["approval"]
        self.assertEqual((command["decision"]["verdict"], approval["id"]), ("approved", request.id))
        self.assertEqual(approval["approvers"][0]["subject"], "alice")
        self.assertEqual(approval["approvers"][0]["reason"], "CHG-7 backfill")
        kinds = [event["type"] for event in self.gateway.events() if event["type"].startswith("approval.")]
        self.assertEqual(kinds[:3], ["approval.request", "approval.vote", "approval.approved"])
        yield self.receiver.arrived
        for _ in range(100):
            notified = [event for event in self.gateway.events("approval.notified") if event["notice"] == "approval.request"]
            if notified:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        # The receiver failed the first delivery (503); the retry got through.
        self.assertEqual((notified[0]["delivered"], notified[0]["attempts"]), (True, 2))
        payloads = [json.loads(body) for _, body in self.receiver.received]
        requests = [payload for payload in payloads if payload["type"] == "approval.request"]
        self.assertEqual(len(requests), 2)
        self.assertEqual((requests[1]["id"], requests[1]["rule"], requests[1]["statement"]), (request.id, "unfiltered-writes", "UPDATE approvals_t SET id = id + 10"))
        self.assertIn("hoopgw approvals approve %s" % (request.id,), requests[1]["cli"])

    @defer.inlineCallbacks
    def test_extended_protocol(self):
        """
        psycopg 3 (Parse/Bind/Execute with a bound parameter) waits the same
        way; the request shows the redacted parameter, and the approval
        releases exactly that statement.
        """
        import psycopg

        def run():
            with psycopg.connect(self.gateway.dsn(password=self.token), autocommit=True) as connection:
                cursor = connection.execute("UPDATE approvals_t SET id = id + length(%s)", ("four",))
                return cursor.rowcount

        running = support.in_thread(run)
        (request,) = yield self.pending()
        self.assertEqual(request.text, "UPDATE approvals_t SET id = id + length($1)")
        self.assertEqual(request.parameters, ("four",))
        code, answer = yield self.api("POST", "/api/approvals/%s/approve" % (request.id,), human_token("alice"), {"reason": "CHG-8"})
        self.assertEqual(code, 200, answer)
        self.assertEqual((yield running), 3)
        self.assertEqual(app_psql("SELECT sum(id) FROM approvals_t").strip(), "18")

    @defer.inlineCallbacks
    def test_denied_through_cli(self):
        """
        An approver denies with the CLI (hoopgw approvals deny, calling the
        API with their token): psql gets SQLSTATE 42501 with the reason,
        and nothing ran.
        """
        running = self.start("DELETE FROM approvals_t")
        (request,) = yield self.pending()
        result = yield self.cli(human_token("bob", groups=["sre", "dba"]), "deny", request.id, "--reason", "not during the freeze")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("denied", result.stdout)
        out, err, code = yield running
        self.assertNotEqual(code, 0)
        self.assertIn("bob denied this statement: not during the freeze", err)
        self.assertEqual(app_psql("SELECT count(*) FROM approvals_t").strip(), "3")

    def cli(self, who, *arguments):
        environment = dict(os.environ, PYTHONPATH=ROOT, HOOPGW_TOKEN=who, HOOPGW_ADMIN_URL=self.gateway.admin_url)
        return support.in_thread(
            subprocess.run,
            [sys.executable, "-m", "hoopgw.cli", "approvals"] + list(arguments),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=environment,
        )

    @defer.inlineCallbacks
    def test_cli_list_show_approve(self):
        """
        The CLI lists the waiting request, shows its digest, and approves
        it naming that digest.
        """
        running = self.start("UPDATE approvals_t SET id = id")
        (request,) = yield self.pending()
        alice = human_token("alice")
        listed = yield self.cli(alice, "list")
        self.assertIn(request.id, listed.stdout)
        self.assertIn("UPDATE approvals_t SET id = id", listed.stdout)
        shown = yield self.cli(alice, "show", request.id)
        self.assertIn("digest     %s" % (request.digest,), shown.stdout)
        approved = yield self.cli(alice, "approve", request.id, "--reason", "no-op", "--digest", request.digest)
        self.assertEqual(approved.returncode, 0, approved.stderr)
        out, err, code = yield running
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_timeout(self):
        """
        Nobody approves within the rule's timeout: psql is refused.
        """
        out, err, code = yield self.start("SELECT * FROM approvals_quick")
        self.assertNotEqual(code, 0)
        self.assertIn("nobody approved this statement within 1s", err)
        self.assertEqual(self.gateway.events("approval.expired")[0]["rule"], "quick")

    @defer.inlineCallbacks
    def test_refused_approvers(self):
        """
        Through the API: no token and a forged token get 401; the requester
        approving their own request, a service identity and someone outside
        the approver groups get 403; a digest of another statement and a
        request already decided get 409 (no replay).
        """
        running = self.start("DELETE FROM approvals_t")
        (request,) = yield self.pending()
        path = "/api/approvals/%s/approve" % (request.id,)
        code, answer = yield self.api("POST", path, None, {"reason": "x"})
        self.assertEqual(code, 401)
        code, answer = yield self.api("POST", path, "not-a-token", {"reason": "x"})
        self.assertEqual(code, 401)
        code, answer = yield self.api("POST", path, human_token("ci-bot"), {"reason": "mine"})
        self.assertEqual(code, 403)
        self.assertIn("cannot approve their own request", answer["error"])
        code, answer = yield self.api("POST", path, token(subject="deploy-bot", groups=["dba"]), {"reason": "ok"})
        self.assertEqual(code, 403)
        code, answer = yield self.api("POST", path, human_token("mallory", groups=["sre"]), {"reason": "ok"})
        self.assertEqual(code, 403)
        self.assertIn("not in the approver groups of rule unfiltered-writes", answer["error"])
        code, answer = yield self.api("POST", path, human_token("alice"), {"reason": "ok", "digest": "0" * 64})
        self.assertEqual(code, 409)
        code, answer = yield self.api("POST", path, human_token("alice"), {"reason": "ok", "digest": request.digest})
        self.assertEqual(code, 200)
        out, err, code = yield running
        self.assertEqual(code, 0, err)
        # The same approval cannot release another statement, nor this one again.
        second = self.start("DELETE FROM approvals_t")
        requests = yield self.pending()
        code, answer = yield self.api("POST", path, human_token("bob"), {"reason": "again"})
        self.assertEqual(code, 409)
        self.assertIn("is approved", answer["error"])
        (waiting,) = requests
        self.assertNotEqual(waiting.id, request.id)
        yield self.api("POST", "/api/approvals/%s/deny" % (waiting.id,), human_token("bob"), {"reason": "once is enough"})
        out, err, code = yield second
        self.assertNotEqual(code, 0)
        refused = [event["approver"]["subject"] for event in self.gateway.events("approval.refused")]
        self.assertEqual(refused, ["ci-bot", "deploy-bot", "mallory", "alice", "bob"])

    @defer.inlineCallbacks
    def test_quorum_of_two(self):
        """
        DDL needs two approvers: after one it still waits; after a second
        person it runs.
        """
        running = self.start("ALTER TABLE approvals_t ADD COLUMN note text")
        (request,) = yield self.pending()
        code, answer = yield self.api("POST", "/api/approvals/%s/approve" % (request.id,), human_token("alice"), {"reason": "CHG-9"})
        self.assertEqual((code, answer["status"]), (200, "pending"))
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(running.called)
        code, answer = yield self.api("POST", "/api/approvals/%s/approve" % (request.id,), human_token("bob"), {"reason": "CHG-9 ok"})
        self.assertEqual((code, answer["status"]), (200, "approved"))
        out, err, code = yield running
        self.assertEqual(code, 0, err)
        self.assertIn("note", app_psql("SELECT column_name FROM information_schema.columns WHERE table_name = 'approvals_t'"))

    @defer.inlineCallbacks
    def test_grant(self):
        """
        An approver grants the bot a window for a rule: its statements
        matching the rule run at once, each use recorded; once revoked,
        they wait again.
        """
        code, grant = yield self.api(
            "POST",
            "/api/grants",
            human_token("alice"),
            {"connection": "payments", "rule": "unfiltered-writes", "subject": "ci-bot", "duration": "1h", "reason": "nightly batch"},
        )
        self.assertEqual(code, 200, grant)
        out, err, code = yield self.start("UPDATE approvals_t SET id = id * 2")
        self.assertEqual(code, 0, err)
        self.assertEqual(app_psql("SELECT sum(id) FROM approvals_t").strip(), "12")
        (use,) = self.gateway.events("grant.use")
        self.assertEqual((use["grant"], use["subject"]), (grant["id"], "ci-bot"))
        (command,) = self.gateway.events("command")
        self.assertEqual(command["decision"]["approval"]["grant"], grant["id"])
        code, _ = yield self.api("POST", "/api/grants/%s/revoke" % (grant["id"],), human_token("bob"), {"reason": "batch done"})
        self.assertEqual(code, 200)
        running = self.start("UPDATE approvals_t SET id = id * 2")
        (request,) = yield self.pending()
        yield self.api("POST", "/api/approvals/%s/deny" % (request.id,), human_token("bob"), {"reason": "grant over"})
        out, err, code = yield running
        self.assertNotEqual(code, 0)

    @defer.inlineCallbacks
    def test_store_unavailable(self):
        """
        An approval the store cannot record lets nothing run, and a grant it
        cannot record is not given (fail closed): the API answers 503 with
        the store's sentence, the waiting statement is refused, and the
        gateway logs a line, not a traceback.
        """
        running = self.start("UPDATE approvals_t SET id = id * 2")
        (request,) = yield self.pending()
        store = self.gateway.gateway.store
        while store._commit.syncing or store._commit.waiting:
            yield task.deferLater(reactor, 0.01, lambda: None)
        store._fail("a test broke the store")
        code, answer = yield self.api("POST", "/api/approvals/%s/approve" % (request.id,), human_token("alice"), {"reason": "CHG-1"})
        self.assertEqual(code, 503, answer)
        self.assertIn("a test broke the store", answer["error"])
        out, err, code = yield running
        self.assertNotEqual(code, 0)
        self.assertIn("could not be decided in the record", err)
        self.assertEqual(app_psql("SELECT sum(id) FROM approvals_t").strip(), "6")
        code, answer = yield self.api(
            "POST",
            "/api/grants",
            human_token("alice"),
            {"connection": "payments", "rule": "unfiltered-writes", "subject": "ci-bot", "duration": "1h", "reason": "batch"},
        )
        self.assertEqual(code, 503, answer)
        self.assertIn("a test broke the store", answer["error"])
        self.assertEqual(self.broker.grants_list(include_inactive=True), [])

    @defer.inlineCallbacks
    def test_client_disconnect_cancels(self):
        """
        A client that goes away while waiting cancels its request: it can
        no longer be approved, and the record says so.
        """
        from twisted.internet import protocol

        ended = defer.Deferred()

        class Quiet(protocol.ProcessProtocol):
            def processEnded(self, reason):
                ended.callback(None)

        process = reactor.spawnProcess(
            Quiet(),
            support.PSQL,
            [support.PSQL, "-X", "-c", "DELETE FROM approvals_t", self.gateway.dsn()],
            env={"PATH": os.environ["PATH"], "PGPASSWORD": self.token},
        )
        (request,) = yield self.pending()
        process.signalProcess("KILL")
        yield ended
        for _ in range(100):
            if request.status == "cancelled":
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(request.status, "cancelled")
        code, answer = yield self.api("POST", "/api/approvals/%s/approve" % (request.id,), human_token("alice"), {"reason": "late"})
        self.assertEqual(code, 409)
        self.assertEqual(len(self.gateway.events("approval.cancelled")), 1)
        self.assertEqual(app_psql("SELECT count(*) FROM approvals_t").strip(), "3")


class WebhookTests(unittest.TestCase):
    """
    The webhook on its own, against a real local receiver.
    """

    def setUp(self):
        self.receiver = Receiver()
        port = free_port()
        self.listener = reactor.listenTCP(port, server.Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(self.listener.stopListening)
        self.url = "http://127.0.0.1:%d/hook" % (port,)

    @defer.inlineCallbacks
    def test_slack_format_and_signature(self):
        """
        The Slack format posts {"text": ...} naming the request and how to
        approve it, signed with the shared secret.
        """
        import hashlib
        import hmac

        from hoopgw.options import SecretRef

        path = self.mktemp()
        with open(path, "w") as handle:
            handle.write("s3cret\n")
        hook = Webhook(self.url, format="slack", secret=SecretRef(file=path))
        outcome = yield hook.send(
            {
                "type": "approval.request",
                "id": "apr-1",
                "connection": "payments",
                "rule": "ddl",
                "requester": {"subject": "ci-bot"},
                "statement": "DROP TABLE x",
                "approvals_required": 1,
                "approver_groups": ["dba"],
                "digest": "ab" * 32,
                "cli": "hoopgw approvals approve apr-1 --reason '...'",
            }
        )
        self.assertEqual(outcome, {"delivered": True, "attempts": 1, "status": 200})
        headers, body = self.receiver.received[0]
        self.assertIn("apr-1", json.loads(body)["text"])
        expected = "sha256=" + hmac.new(b"s3cret\n", body, hashlib.sha256).hexdigest()
        self.assertEqual(headers[b"X-Hoopgw-Signature"], [expected.encode()])

    @defer.inlineCallbacks
    def test_gives_up(self):
        """
        A receiver that keeps failing is tried the configured number of
        times; the outcome says so (it never raises).
        """
        self.receiver.codes = [500, 500, 500]
        outcome = yield Webhook(self.url, attempts=3, backoff=0.01).send({"type": "approval.request"})
        self.assertEqual((outcome["delivered"], outcome["attempts"], outcome["status"]), (False, 3, 500))


class ConfigurationTests(unittest.TestCase):
    """
    What the configuration refuses about approvals.
    """

    def document(self, admin, addons):
        connection = support.postgres_connection(free_port(), addons=addons)
        return support.configuration_document(self.mktemp(), {"payments": connection}, gateway={"admin": admin} if admin else None)

    def test_approve_needs_admin(self):
        """
        The approve addon without an admin listener is refused: nobody could
        approve anything.
        """
        from hoopgw import config as configuration
        from hoopgw.options import ConfigError

        rules = {"approve": {"rules": [{"name": "ddl", "kinds": ["DDL"], "approvers": ["dba"]}]}}
        with self.assertRaises(ConfigError) as caught:
            configuration.parse(self.document(None, ["identity", rules, "record"]))
        self.assertIn("needs gateway.admin", str(caught.exception))
        config = configuration.parse(self.document({"listen": "tcp:8443:interface=127.0.0.1"}, ["identity", rules, "record"]))
        self.assertEqual([spec.name for spec in config.connections["payments"].addons], ["identity", "approve", "record"])

    def test_admin_plaintext_off_loopback(self):
        """
        An admin listener without TLS that is reachable from the network is
        refused: approvers' tokens would cross it in clear.
        """
        from hoopgw import config as configuration
        from hoopgw.options import ConfigError

        with self.assertRaises(ConfigError) as caught:
            configuration.parse(self.document({"listen": "tcp:8443"}, ["identity", "record"]))
        self.assertIn("gateway.admin.listen", str(caught.exception))

    def test_bad_rule(self):
        """
        An approval rule without approver groups is refused with its path.
        """
        from hoopgw import config as configuration
        from hoopgw.options import ConfigError

        rules = {"approve": {"rules": [{"name": "ddl", "kinds": ["DDL"]}]}}
        with self.assertRaises(ConfigError) as caught:
            configuration.parse(self.document({"listen": "tcp:8443:interface=127.0.0.1"}, ["identity", rules, "record"]))
        self.assertIn("approve.rules[0].approvers", str(caught.exception))
