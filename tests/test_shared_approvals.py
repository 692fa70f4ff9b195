"""
The approvals broker on the shared PostgreSQL store: real twistd gateway
processes on one store, a statement waiting on one gateway approved,
denied or covered by a grant through another (its API and the CLI), every
check of the single broker holding across gateways, each request decided
exactly once, requests of a gateway that died ended by the next one to
start, and the shared chain verified with the approvals next to the
statements they released.
"""

import io
import os
import signal
import subprocess
import sys

import psycopg2
import treq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from hoopgw import cli
from hoopgw.approvals import ApprovalError, ApprovalRule
from hoopgw.approvals.evidence import ApprovalsCheck, ApprovalsProblem
from hoopgw.approvals.shared import SharedBroker, channel
from hoopgw.model import HUMAN
from hoopgw.store import postgres as pgstore
from hoopgw.store import verify as verification
from hoopgw.store.file import FileStore
from hoopgw.store.errors import StoreError
from hoopgw.testing import exec_command, identity, session, sql_command
from testbed.throwaway import free_port
from tests import evidence_support as es
from tests import support
from tests.support import human_token, in_thread, psql, token
from tests.test_postgres_store import AUDIT_PASSWORD, GatewayProcess, source_for, store_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RULES = [
    {"name": "unfiltered-writes", "without_where": True, "approvers": ["dba"], "timeout": "60s"},
    {"name": "ddl", "kinds": ["DDL"], "approvers": ["dba"], "approvals": 2, "timeout": "60s"},
    {"name": "quick", "tables": ["shared_quick"], "approvers": ["dba"], "timeout": "1s"},
]


def approvals_document(process):
    """
    A gateway with the approve addon, its admin listener (the approvals
    API) and the people issuer for approvers.
    """
    process.admin_port = free_port()
    process.admin_url = "http://127.0.0.1:%d" % (process.admin_port,)
    connection = support.postgres_connection(
        process.port, addons=["identity", {"approve": {"rules": RULES}}, "mask", "record"]
    )
    return support.configuration_document(
        process.directory,
        {"payments": connection},
        providers=support.providers_with_people(),
        gateway={
            "admin": {
                "listen": "tcp:%d:interface=127.0.0.1" % (process.admin_port,),
                "approver_groups": ["dba", "sre"],
                # The sweep runs when the gateway starts, then not within a
                # test: a decision can only reach the waiting gateway by
                # LISTEN/NOTIFY.
                "reconcile_interval": "1h",
            }
        },
    )


# Without the wake-up by NOTIFY, a decision would reach the waiting gateway
# only at the rule's timeout (60s): the tests wait at most this long.
RELEASED_WITHIN = 30


def released(waiting):
    """
    C{waiting} (a client's statement), failing the test if the gateway
    holding it is not woken by the decision well before the rule's timeout.
    """
    return waiting.addTimeout(RELEASED_WITHIN, reactor)


def app_psql(sql):
    return support.cluster().psql(sql, user="app", password=support.APP_PASSWORD, dbname="payments")


def audit_owner(settings, sql):
    """
    Run SQL in the audit database as the store's own role (blocking).
    """
    connection = psycopg2.connect(settings["postgres"]["dsn"], password=AUDIT_PASSWORD)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql)
    finally:
        connection.close()


def store_dsn(settings):
    """
    The store's DSN as the evidence commands take it (password and schema
    in it).
    """
    return settings["postgres"]["dsn"] + " password=" + AUDIT_PASSWORD + " options='-c search_path=%s'" % (
        settings["postgres"]["schema"],
    )


def run_cli(*arguments):
    """
    C{hoopgw ...} in this process; @return: C{(exit status, output)}.
    """
    out = io.StringIO()
    status = cli.main(list(arguments), out=out)
    return status, out.getvalue()


def person(subject, groups=("dba",)):
    return identity(subject, groups=groups, kind=HUMAN, issuer="https://people.test")


class Member:
    """
    One gateway's share of the store, in the test's reactor: its own
    connection to the store (holding its gateway lock, as a running
    gateway's does) and its shared broker, whose time and timers the test
    moves by hand.
    """

    def __init__(self, test, config, now):
        self.instance = "g-test-" + os.urandom(4).hex()
        self.store = pgstore.PostgresStore(config, reactor)
        self.timers = task.Clock()
        self.broker = None
        self.now = now
        test.addCleanup(self.close)

    @defer.inlineCallbacks
    def start(self):
        yield self.store.append({"type": "gateway.start", "gateway": self.instance})
        self.broker = yield in_thread(
            SharedBroker, self.timers, self.store, self.store.append, clock=lambda: self.now[0], instance=self.instance
        )
        self.broker.register("test", RULE)
        self.broker.start()
        return self

    @defer.inlineCallbacks
    def close(self):
        if self.broker is not None:
            self.broker.close()
        if self.store._connection is not None:
            yield self.store.close()


RULE = ApprovalRule(name="ddl", approvers={"dba"}, approvals=1, timeout=60)


class ApprovalsEvidenceTests(unittest.TestCase):
    """
    verify checks what the record says of approvals, whoever wrote it: a
    chain intact but showing an approval the rules forbid is refused.
    """

    REQUEST = {
        "type": "approval.request",
        "approval": "apr-1",
        "session": "s-1",
        "subject": "ci-bot",
        "digest": "d" * 64,
        "approvals_required": 2,
    }

    def vote(self, subject, verdict="approve", kind=HUMAN):
        return {"type": "approval.vote", "approval": "apr-1", "approver": {"subject": subject, "kind": kind}, "verdict": verdict}

    def approved(self, digest="d" * 64):
        return {"type": "approval.approved", "approval": "apr-1", "outcome": {"verdict": "approved", "approval": {"id": "apr-1", "digest": digest}}}

    def statement(self, digest="d" * 64):
        return {
            "type": "command",
            "session": "s-1",
            "text": "DROP TABLE orders",
            "decision": {"verdict": "approved", "approval": {"id": "apr-1", "digest": digest}},
        }

    @defer.inlineCallbacks
    def verify(self, *events):
        """
        Write C{events} to a new file store, properly chained, and verify it.
        """
        directory = self.mktemp()
        store = FileStore(directory, reactor, fsync=False)
        store.open()
        for event in events:
            yield store.append(dict(event))
        yield store.close()
        return verification.verify_store(directory, checks=(ApprovalsCheck,))

    @defer.inlineCallbacks
    def test_approved_statement(self):
        """
        A request approved by two people other than the requester, then the
        statement it is bound to: verified, and summed up.
        """
        report = yield self.verify(self.REQUEST, self.vote("alice"), self.vote("bob"), self.approved(), self.statement())
        self.assertTrue(report.ok, report.problem)
        self.assertIn("approvals: 1 request(s) (1 approved), each decided at most once; 1 statement(s) ran approved", report.summary())

    @defer.inlineCallbacks
    def test_refused_approvals(self):
        """
        Decided twice, approved without the votes its rule requires, a vote
        by the requester or by a service, a statement run under another
        statement's approval or under a denial: each is named.
        """
        cases = [
            ((self.vote("alice"), self.vote("bob"), self.approved(), {"type": "approval.denied", "approval": "apr-1"}),
             "was decided twice"),
            ((self.vote("alice"), self.approved()), "with 1 approval(s) of the 2 its rule requires"),
            ((self.vote("ci-bot"),), "who may not approve it"),
            ((self.vote("deploy-bot", kind="service"),), "who may not approve it"),
            ((self.vote("alice"), self.vote("bob"), self.approved(), self.statement(digest="e" * 64)),
             "does not show approved for it"),
            ((self.vote("alice", verdict="deny"), {"type": "approval.denied", "approval": "apr-1"}, self.statement()),
             "does not show approved for it"),
            ((self.statement(),), "which is not in the record before it"),
        ]
        for events, phrase in cases:
            if events[0]["type"] != "command":
                events = (self.REQUEST,) + events
            report = yield self.verify(*events)
            self.assertEqual(report.kind, ApprovalsProblem.kind, (phrase, report.problem))
            self.assertIn(phrase, report.problem)


class BrokersOnOneStoreTests(unittest.TestCase):
    """
    Two shared brokers (two gateways' worth) on one real store, in the
    test's reactor: the edges that real processes cannot be steered into.
    """

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.settings = yield in_thread(store_settings)
        self.config = pgstore.parse_options(self.settings["postgres"], "gateway.store.postgres")
        yield in_thread(pgstore.prepare_schema, self.config)
        self.now = [1000.0]
        self.first = yield Member(self, self.config, self.now).start()
        self.second = yield Member(self, self.config, self.now).start()

    @defer.inlineCallbacks
    def events(self, kind):
        source = yield in_thread(source_for, self.settings)
        try:
            entries = yield in_thread(lambda: list(source.entries()))
        finally:
            source.close()
        return [event for _, _, event in entries if event["type"] == kind]

    @defer.inlineCallbacks
    def hold(self, member, sql="DROP TABLE orders"):
        """
        A statement held by C{member}'s broker; @return: its request (as
        the other broker reads it) and the Deferred the statement waits on.
        """
        waiting = member.broker.decide(session(connection="test"), sql_command(sql), RULE)
        for _ in range(200):
            found = yield self.second.broker.list()
            if found:
                return found[0], waiting
            yield task.deferLater(reactor, 0.02, lambda: None)
        raise AssertionError("the request was not recorded")

    @defer.inlineCallbacks
    def test_late_vote_loses_to_the_timeout(self):
        """
        An approval through the other gateway after the request's timeout,
        before the holding gateway's own timer has run, is refused; the
        request is recorded as expired exactly once, and the statement is
        refused by the timeout on the gateway holding it (woken by NOTIFY).
        """
        request, waiting = yield self.hold(self.first)
        self.now[0] += 61
        error = yield self.assertFailure(self.second.broker.approve(request.id, person("alice"), "late"), ApprovalError)
        self.assertEqual(error.code, 409)
        self.assertIn("is expired", str(error))
        decision = yield waiting
        self.assertEqual(decision.rule, "approve:ddl:timeout")
        # The holding gateway's timer now finds the request decided and changes nothing.
        self.first.timers.advance(61)
        self.assertEqual(len((yield self.events("approval.expired"))), 1)
        self.assertEqual([event["error"] for event in (yield self.events("approval.refused"))], [str(error)])

    @defer.inlineCallbacks
    def test_command_named_as_such_across_gateways(self):
        """
        An SSH command held on one gateway and denied through the other is
        refused as "this command", not "this statement": what the client
        asked for is carried in the request's record to the deciding
        gateway.
        """
        waiting = self.first.broker.decide(session(connection="test", protocol="ssh"), exec_command("rm -rf /srv"), RULE)
        for _ in range(200):
            found = yield self.second.broker.list()
            if found:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        (request,) = found
        self.assertEqual(request.noun, "command")
        yield self.second.broker.deny(request.id, person("alice"), "not on a Friday")
        decision = yield waiting
        self.assertEqual(decision.reason, "alice denied this command: not on a Friday")

    @defer.inlineCallbacks
    def test_lost_wake_up(self):
        """
        A gateway that missed the NOTIFY (it stopped listening) still learns
        of the decision at its next sweep.
        """
        request, waiting = yield self.hold(self.first)
        yield self.first.store._connection.runOperation('UNLISTEN "%s"' % (channel(self.config.schema),))
        yield self.second.broker.approve(request.id, person("alice"), "CHG-3")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertNoResult(waiting)
        self.first.timers.advance(self.first.broker.reconcile_interval)
        decision = yield waiting
        self.assertEqual((decision.verdict, decision.approval["id"]), ("approved", request.id))

    @defer.inlineCallbacks
    def test_dead_gateway(self):
        """
        When the gateway holding a statement dies (its connection to the
        store, and so its lock, is gone), the other gateway's sweep cancels
        its request, saying why; it can then not be approved.
        """
        request, _ = yield self.hold(self.first)
        self.first.broker.close()
        self.first.store._connection.close()
        self.first.store._connection = None
        for _ in range(100):
            self.second.timers.advance(self.second.broker.reconcile_interval)
            yield task.deferLater(reactor, 0.05, lambda: None)
            (found,) = yield self.second.broker.list(None)
            if found.status != "pending":
                break
        self.assertEqual(found.status, "cancelled")
        self.assertIn("stopped without deciding it", found.outcome["reason"])
        error = yield self.assertFailure(self.second.broker.approve(request.id, person("alice"), "late"), ApprovalError)
        self.assertIn("is cancelled", str(error))

    @defer.inlineCallbacks
    def test_client_gives_up_while_recording(self):
        """
        A client that goes away before its request is even committed leaves
        it cancelled in the record, not pending.
        """
        waiting = self.first.broker.decide(session(connection="test"), sql_command("DROP TABLE orders"), RULE)
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        for _ in range(100):
            cancelled = yield self.events("approval.cancelled")
            if cancelled:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        (event,) = cancelled
        self.assertEqual((yield self.second.broker.list()), [])
        self.assertEqual(event["outcome"]["reason"], "the client gave up waiting")

    @defer.inlineCallbacks
    def test_index_must_match_the_chain(self):
        """
        A row written into the approvals index by hand, pointing at an event
        that is not its request, is refused: the broker acts only on what
        the chain holds, and records nothing.
        """
        schema = self.config.schema

        def forge():
            connection = psycopg2.connect(self.config.dsn, password=AUDIT_PASSWORD)
            try:
                with connection, connection.cursor() as cursor:
                    cursor.execute(
                        "INSERT INTO {s}.approvals (id, kind, status, connection, rule, subject, expires, opened) "
                        "SELECT 'apr-forged', 'request', 'pending', 'test', 'ddl', 'ci-bot', 1e12, min(seq) "
                        "FROM {s}.events".format(s=schema)
                    )
            finally:
                connection.close()

        yield in_thread(forge)
        yield self.assertFailure(self.second.broker.get("apr-forged"), StoreError)
        yield self.assertFailure(self.second.broker.approve("apr-forged", person("alice"), "ok"), StoreError)
        self.assertEqual((yield self.events("approval.vote")), [])


class SharedApprovalsTests(unittest.TestCase):
    """
    Two gateway processes, one store, one set of approvals.
    """

    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        table = "shared_%s" % (os.urandom(3).hex(),)
        self.table = table
        yield in_thread(app_psql, "CREATE TABLE %s (id int); INSERT INTO %s VALUES (1), (2), (3)" % (table, table))
        self.settings = yield in_thread(store_settings)
        self.first = GatewayProcess(self, self.settings, document=approvals_document)
        self.second = GatewayProcess(self, self.settings, document=approvals_document)
        for process in (self.first, self.second):
            yield in_thread(process.wait_listening)
            yield in_thread(_wait_port, process, process.admin_port)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    @defer.inlineCallbacks
    def api(self, process, method, path, who=None, body=None):
        headers = {}
        if who is not None:
            headers["Authorization"] = ["Bearer " + who]
        response = yield treq.request(
            method, process.admin_url + path, headers=headers, json=body if body is not None else None, pool=self.pool
        )
        answer = yield response.json()
        return response.code, answer

    @defer.inlineCallbacks
    def pending(self, process, count=1, status="pending"):
        """
        The requests C{process}'s API lists, once there are C{count}.
        """
        for _ in range(300):
            code, answer = yield self.api(process, "GET", "/api/approvals?status=%s" % (status,), human_token("alice"))
            if code == 200 and len(answer["approvals"]) >= count:
                return answer["approvals"]
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("%s lists no %d %s approval requests: %r" % (process.admin_url, count, status, answer))

    def client(self, process, *statements):
        """
        Run C{statements} with psycopg2 through C{process} in a thread;
        @return: a Deferred firing with the rows of the last one.
        """

        def run():
            connection = psycopg2.connect(process.dsn(), password=token())
            try:
                connection.autocommit = True
                with connection.cursor() as cursor:
                    for statement in statements:
                        cursor.execute(statement)
                    return cursor.fetchall() if cursor.description else cursor.rowcount
            finally:
                connection.close()

        return in_thread(run)

    def approvals_cli(self, process, who, *arguments):
        environment = dict(os.environ, PYTHONPATH=ROOT, HOOPGW_TOKEN=who)
        return in_thread(
            subprocess.run,
            [sys.executable, "-m", "hoopgw.cli", "approvals", "--url", process.admin_url] + list(arguments),
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=environment,
        )

    @defer.inlineCallbacks
    def events(self):
        source = yield in_thread(source_for, self.settings)
        try:
            entries = yield in_thread(lambda: list(source.entries()))
        finally:
            source.close()
        return [event for _, _, event in entries]

    @defer.inlineCallbacks
    def test_decided_through_the_other_gateway(self):
        """
        A statement sent through gateway 1 waits; gateway 2's API lists it
        with its digest; an approver approves it with the CLI against
        gateway 2; it runs on gateway 1 and its rows reach the client.  It
        cannot be approved again through either gateway.  A DELETE waiting
        on gateway 1 is denied through gateway 2's API and refused with the
        approver's reason.  A grant given on gateway 2 lets gateway 1 run
        the bot's statements at once; revoked on gateway 1, they wait
        again.  After both stop, hoopgw verify passes over the shared
        chain and hoopgw replay shows the request, the decision, the
        approver and the reason next to each statement; the approvals index
        refuses to be rewritten.
        """
        table = self.table
        running = self.client(self.first, "UPDATE %s SET id = id + 10 RETURNING id" % (table,))
        (listed,) = yield self.pending(self.second)
        self.assertEqual(listed["statement"], "UPDATE %s SET id = id + 10 RETURNING id" % (table,))
        self.assertEqual(listed["requester"]["subject"], "ci-bot")
        approved = yield self.approvals_cli(
            self.second, human_token("alice"), "approve", listed["id"], "--reason", "CHG-1 backfill", "--digest", listed["digest"]
        )
        self.assertEqual(approved.returncode, 0, approved.stderr)
        rows = yield released(running)
        self.assertEqual(sorted(rows), [(11,), (12,), (13,)])
        for process, who in ((self.first, "bob"), (self.second, "bob")):
            code, answer = yield self.api(
                process, "POST", "/api/approvals/%s/approve" % (listed["id"],), human_token(who), {"reason": "again"}
            )
            self.assertEqual(code, 409, answer)
            self.assertIn("is approved", answer["error"])

        refused = psql(self.first.dsn(), "-c", "DELETE FROM %s" % (table,), password=token())
        (waiting,) = yield self.pending(self.second)
        code, answer = yield self.api(
            self.second, "POST", "/api/approvals/%s/deny" % (waiting["id"],), human_token("bob"), {"reason": "not during the freeze"}
        )
        self.assertEqual((code, answer["status"]), (200, "denied"), answer)
        out, err, code = yield released(refused)
        self.assertNotEqual(code, 0)
        self.assertIn("bob denied this statement: not during the freeze", err)
        self.assertIn(waiting["id"], err)
        self.assertEqual((yield in_thread(app_psql, "SELECT count(*) FROM %s" % (table,))).strip(), "3")

        code, grant = yield self.api(
            self.second,
            "POST",
            "/api/grants",
            human_token("alice"),
            {"connection": "payments", "rule": "unfiltered-writes", "subject": "ci-bot", "duration": "1h", "reason": "nightly batch"},
        )
        self.assertEqual(code, 200, grant)
        code, listed_grants = yield self.api(self.first, "GET", "/api/grants", human_token("bob"))
        self.assertEqual([item["id"] for item in listed_grants["grants"]], [grant["id"]])
        # Not held: under the grant the statement runs at once (held, it
        # would wait for the rule's 60s timeout and be refused).
        rows = yield released(self.client(self.first, "UPDATE %s SET id = id * 2 RETURNING id" % (table,)))
        self.assertEqual(sorted(rows), [(22,), (24,), (26,)])
        code, answer = yield self.api(
            self.first, "POST", "/api/grants/%s/revoke" % (grant["id"],), human_token("bob"), {"reason": "batch done"}
        )
        self.assertEqual((code, answer["revoked"]["by"]["subject"]), (200, "bob"), answer)
        again = psql(self.first.dsn(), "-c", "UPDATE %s SET id = 0" % (table,), password=token())
        (after_revoke,) = yield self.pending(self.second)
        yield self.api(
            self.second, "POST", "/api/approvals/%s/deny" % (after_revoke["id"],), human_token("alice"), {"reason": "grant over"}
        )
        out, err, code = yield released(again)
        self.assertNotEqual(code, 0)

        yield in_thread(self.first.stop)
        yield in_thread(self.second.stop)
        events = yield self.events()
        starts = {event["gateway"] for event in events if event["type"] == "gateway.start"}
        requests = {event["approval"]: event for event in events if event["type"] == "approval.request"}
        self.assertEqual(len(requests), 3)
        # Each request was held by gateway 1 and decided through gateway 2 (the grant's revocation through gateway 1).
        request = requests[listed["id"]]
        (vote,) = [event for event in events if event["type"] == "approval.vote" and event["approval"] == listed["id"]]
        self.assertEqual(len(starts), 2)
        self.assertIn(request["gateway"], starts)
        self.assertIn(vote["gateway"], starts - {request["gateway"]})
        # Each approval event says which replica wrote it, by host and
        # process, not only by the run id that changes at every restart.
        by_run = {event["gateway"]: event for event in events if event["type"] == "gateway.start"}
        for event in (request, vote):
            replica = event["replica"]
            start = by_run[replica["run"]]
            self.assertEqual((replica["host"], replica["pid"]), (start["host"], start["pid"]))
        self.assertEqual(vote["replica"]["run"], vote["gateway"])
        self.assertNotEqual(request["replica"]["pid"], vote["replica"]["pid"])
        outcomes = [event["type"] for event in events if event["type"] in ("approval.approved", "approval.denied")]
        self.assertEqual(sorted(outcomes), ["approval.approved", "approval.denied", "approval.denied"])
        (use,) = [event for event in events if event["type"] == "grant.use"]
        self.assertEqual((use["grant"], use["gateway"], use["use"]), (grant["id"], request["gateway"], 1))
        commands = [event for event in events if event["type"] == "command"]
        (ran,) = [event for event in commands if (event["decision"].get("approval") or {}).get("id") == listed["id"]]

        status, out = yield in_thread(run_cli, "verify", store_dsn(self.settings), "--key", es.signing_key()[1])
        self.assertEqual(status, 0, out)
        # One chain: both gateways' events in one run of sequence numbers.
        self.assertEqual([event["seq"] for event in events], list(range(1, len(events) + 1)))
        self.assertIn("OK: %d events, chain intact" % (len(events),), out)
        self.assertIn(
            "approvals: 3 request(s) (1 approved, 2 denied), each decided at most once; 1 statement(s) ran approved "
            "and 1 under a grant, each after its approval",
            out,
        )
        status, out = yield in_thread(run_cli, "replay", "--store", store_dsn(self.settings), ran["session"])
        self.assertEqual(status, 0, out)
        self.assertIn("UPDATE %s SET id = id + 10 RETURNING id" % (table,), out)
        self.assertIn("decision: APPROVED by approve:unfiltered-writes", out)
        self.assertIn("[approval %s; by alice" % (listed["id"],), out)
        self.assertIn("CHG-1 backfill", out)
        # A refused statement never reached the record addon: its end says what was asked.
        (denied,) = [
            event
            for event in events
            if event["type"] == "command.end" and (event.get("decision") or {}).get("rule") == "approve:unfiltered-writes:denied"
            and "DELETE" in event["text"]
        ]
        status, out = yield in_thread(run_cli, "replay", "--store", store_dsn(self.settings), denied["session"])
        self.assertIn("DELETE FROM %s" % (table,), out)
        self.assertIn("bob denied this statement: not during the freeze", out)

        schema = self.settings["postgres"]["schema"]
        for statement in (
            "UPDATE {s}.approvals SET status = 'pending', closed = NULL WHERE id = '%s'" % (listed["id"],),
            "DELETE FROM {s}.approvals",
            "TRUNCATE {s}.approvals",
        ):
            error = yield self.assertFailure(in_thread(audit_owner, self.settings, statement.format(s=schema)), psycopg2.Error)
            self.assertEqual(error.pgcode, "42501", str(error))

    @defer.inlineCallbacks
    def test_rules_hold_across_gateways(self):
        """
        DDL needs two approvers.  Through gateway 2, the requester, a
        service identity, someone outside the rule's approver groups, a
        vote without a reason and a digest of another statement are all
        refused, as on one gateway; one approval through gateway 1 leaves
        the statement waiting, the same person again through gateway 2 is
        refused, and a second person through gateway 2 releases it.
        """
        running = psql(self.first.dsn(), "-c", "ALTER TABLE %s ADD COLUMN note text" % (self.table,), password=token())
        (request,) = yield self.pending(self.second)
        path = "/api/approvals/%s/approve" % (request["id"],)
        refusals = [
            (human_token("ci-bot"), {"reason": "mine"}, 403, "cannot approve their own request"),
            (token(subject="deploy-bot", groups=["dba"]), {"reason": "ok"}, 403, "is a service identity"),
            (human_token("mallory", groups=["sre"]), {"reason": "ok"}, 403, "not in the approver groups of rule ddl"),
            (human_token("alice"), {"reason": " "}, 400, "give a reason"),
            (human_token("alice"), {"reason": "ok", "digest": "0" * 64}, 409, "is not this request's"),
        ]
        for who, body, status, phrase in refusals:
            code, answer = yield self.api(self.second, "POST", path, who, body)
            self.assertEqual(code, status, answer)
            self.assertIn(phrase, answer["error"])
        code, answer = yield self.api(self.first, "POST", path, human_token("alice"), {"reason": "CHG-9"})
        self.assertEqual((code, answer["status"], len(answer["approvals"])), (200, "pending", 1), answer)
        code, answer = yield self.api(self.second, "POST", path, human_token("alice"), {"reason": "CHG-9 again"})
        self.assertEqual(code, 409, answer)
        self.assertIn("already voted", answer["error"])
        self.assertFalse(running.called)
        code, answer = yield self.api(self.second, "POST", path, human_token("bob"), {"reason": "CHG-9 reviewed"})
        self.assertEqual((code, answer["status"]), (200, "approved"), answer)
        out, err, code = yield released(running)
        self.assertEqual(code, 0, err)
        columns = yield in_thread(
            app_psql, "SELECT column_name FROM information_schema.columns WHERE table_name = '%s'" % (self.table,)
        )
        self.assertIn("note", columns)
        events = yield self.events()
        refused = [event["approver"]["subject"] for event in events if event["type"] == "approval.refused"]
        self.assertEqual(refused, ["ci-bot", "deploy-bot", "mallory", "alice", "alice", "alice"])
        (outcome,) = [event for event in events if event["type"] == "approval.approved"]
        self.assertEqual([each["subject"] for each in outcome["outcome"]["approval"]["approvers"]], ["alice", "bob"])

    @defer.inlineCallbacks
    def test_decided_exactly_once(self):
        """
        An approval through gateway 1 and a denial through gateway 2 sent at
        the same moment: one of them decides, the other is refused as too
        late (409); the chain holds exactly one outcome, and the client got
        that outcome.
        """
        running = psql(self.first.dsn(), "-c", "UPDATE %s SET id = 7" % (self.table,), password=token())
        (request,) = yield self.pending(self.second)
        answers = yield defer.gatherResults(
            [
                self.api(self.first, "POST", "/api/approvals/%s/approve" % (request["id"],), human_token("alice"), {"reason": "go"}),
                self.api(self.second, "POST", "/api/approvals/%s/deny" % (request["id"],), human_token("bob"), {"reason": "stop"}),
            ]
        )
        codes = sorted(code for code, _ in answers)
        self.assertEqual(codes, [200, 409], answers)
        (winner,) = [answer for code, answer in answers if code == 200]
        out, err, code = yield released(running)
        events = yield self.events()
        outcomes = [event for event in events if event["type"] in ("approval.approved", "approval.denied")]
        self.assertEqual(len(outcomes), 1)
        self.assertEqual(outcomes[0]["type"], "approval.%s" % (winner["status"],))
        if winner["status"] == "approved":
            self.assertEqual(code, 0, err)
            self.assertEqual((yield in_thread(app_psql, "SELECT DISTINCT id FROM %s" % (self.table,))).strip(), "7")
        else:
            self.assertNotEqual(code, 0)
            self.assertIn("bob denied this statement: stop", err)

    @defer.inlineCallbacks
    def test_timeout_and_a_gateway_that_dies(self):
        """
        A statement nobody approves within its rule's timeout is refused on
        gateway 1, and gateway 2 lists it as expired.  A statement waiting
        on gateway 1 when that process is killed (-9) is not left pending:
        the next gateway to start on the store cancels it, saying why, and
        it can then no longer be approved through gateway 2.
        """
        out, err, code = yield psql(self.first.dsn(), "-c", "SELECT * FROM shared_quick", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn("nobody approved this statement within 1s", err)
        (expired,) = yield self.pending(self.second, status="expired")
        self.assertEqual(expired["rule"], "quick")

        orphaned = psql(self.first.dsn(), "-c", "DELETE FROM %s" % (self.table,), password=token())
        (request,) = yield self.pending(self.second)
        yield in_thread(self.first.stop, signal.SIGKILL)
        out, err, code = yield orphaned
        self.assertNotEqual(code, 0)
        third = GatewayProcess(self, self.settings, document=approvals_document)
        yield in_thread(third.wait_listening)
        (cancelled,) = yield self.pending(self.second, status="cancelled")
        self.assertEqual(cancelled["id"], request["id"])
        self.assertIn("stopped without deciding it", cancelled["outcome"]["reason"])
        code, answer = yield self.api(
            self.second, "POST", "/api/approvals/%s/approve" % (request["id"],), human_token("alice"), {"reason": "late"}
        )
        self.assertEqual(code, 409, answer)
        self.assertIn("is cancelled", answer["error"])
        self.assertEqual((yield in_thread(app_psql, "SELECT count(*) FROM %s" % (self.table,))).strip(), "3")

    @defer.inlineCallbacks
    def test_holding_gateway_stops(self):
        """
        A statement waiting on gateway 1 when it is stopped cleanly (SIGTERM)
        is refused to its client and its request is cancelled in the record
        by gateway 1 itself as it stops, without waiting for anyone's sweep:
        gateway 2 lists it as cancelled at once and refuses to approve it.
        """
        waiting = psql(self.first.dsn(), "-c", "DELETE FROM %s" % (self.table,), password=token())
        (request,) = yield self.pending(self.second)
        yield in_thread(self.first.stop)
        out, err, code = yield waiting
        self.assertNotEqual(code, 0)
        code, answer = yield self.api(self.second, "GET", "/api/approvals/%s" % (request["id"],), human_token("alice"))
        self.assertEqual((code, answer["status"]), (200, "cancelled"), answer)
        code, answer = yield self.api(
            self.second, "POST", "/api/approvals/%s/approve" % (request["id"],), human_token("alice"), {"reason": "late"}
        )
        self.assertEqual(code, 409, answer)
        events = yield self.events()
        # Cancelled by the stopping gateway itself (gateway 2 sweeps only
        # hourly here, and would say the holder stopped without deciding).
        (cancelled,) = [event for event in events if event["type"] == "approval.cancelled" and event["approval"] == request["id"]]
        self.assertEqual(cancelled["outcome"]["reason"], "the client gave up waiting")
        self.assertEqual((yield in_thread(app_psql, "SELECT count(*) FROM %s" % (self.table,))).strip(), "3")
        # The stopping gateway recorded its sessions' ends before its stop.
        (stop,) = [event for event in events if event["type"] == "gateway.stop"]
        ended = [event for event in events if event["type"] == "session.end" and event.get("gateway") == stop["gateway"]]
        self.assertTrue(ended)
        self.assertLess(max(event["seq"] for event in ended + [cancelled]), stop["seq"])


def _wait_port(process, port, timeout=30):
    import socket
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.process.poll() is not None:
            raise AssertionError("the gateway exited: %s" % (process.output(),))
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("the admin API does not listen: %s" % (process.output(),))

