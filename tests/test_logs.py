"""
hoopgw's own log lines: one per session start, end and refusal (from the
chain, so every front end's sessions), reload and limit hit, naming the
session id the record uses; JSON lines for log shippers; never a card
number or a token.
"""

import io
import json
import os
import signal
import subprocess

import yaml
from twisted.internet import defer
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from hoopgw import logs, testing
from hoopgw.chain import AddonChain
from hoopgw.model import Decision

from tests.test_packaging import BIN, environment, gateway_files, stop, wait_for_port


PAN = "4111111111111111"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjaS1ib3QifQ.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"


class Identify:
    """
    Says who the client is, as the identity addon would.
    """

    def __init__(self, identity=None, refusal=None):
        self.identity = identity
        self.refusal = refusal

    def session_started(self, session):
        if self.refusal is not None:
            return self.refusal
        session.identity = self.identity


class ChainLogTests(unittest.TestCase):
    def setUp(self):
        self.events = []
        observer = lambda event: self.events.append(event) if event.get("log_namespace") == "hoopgw" else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def lines(self):
        return [formatEvent(event) for event in self.events]

    def test_start_and_end(self):
        """
        An allowed session gives a start and an end line, each with the
        session's id, who and where, as fields and in the text.
        """
        chain = AddonChain([("identity", Identify(testing.identity("ci-bot")))], allowed_groups={"payments-bots"})
        session = testing.session()
        session.identity = None
        self.successResultOf(chain.start_session(session))
        session.attributes["end_reason"] = "client terminated the session"
        self.successResultOf(chain.end_session(session))
        self.assertEqual([event["event"] for event in self.events], ["session.start", "session.end"])
        for event in self.events:
            self.assertEqual(
                (event["session"], event["subject"], event["connection"], event["protocol"]),
                (session.id, "ci-bot", "test", "postgres"),
            )
        start, end = self.lines()
        self.assertIn("session %s started: ci-bot" % (session.id,), start)
        self.assertIn("client terminated the session", end)
        self.assertEqual(self.events[0]["log_level"], LogLevel.info)

    def test_refused(self):
        """
        A session outside the allowed groups gives one refusal line with the
        reason and the rule, and no end line.
        """
        chain = AddonChain([("identity", Identify(testing.identity("intruder", groups=("marketing",))))],
                           allowed_groups={"payments-bots"})
        session = testing.session()
        session.identity = None
        decision = self.successResultOf(chain.start_session(session))
        self.assertEqual(decision.verdict, "deny")
        self.assertEqual([event["event"] for event in self.events], ["session.refused"])
        self.assertEqual(self.events[0]["rule"], "allowed_groups")
        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)
        self.assertIn("session %s refused" % (session.id,), self.lines()[0])

    def test_front_end_refusal(self):
        """
        A refusal a front end makes before any addon ran goes through the
        same line.
        """
        chain = AddonChain([], allowed_groups={"payments-bots"})
        session = testing.session()
        self.successResultOf(chain.refuse_session(session, Decision.deny("two credentials", rule="credentials")))
        self.assertEqual([(event["event"], event["session"]) for event in self.events], [("session.refused", session.id)])

    def test_refusal_flood_is_bounded(self):
        """
        A hundred refused logins from one address in one interval give the
        first in_full refusal lines per reason (as many as the record
        keeps in full) and, when the interval ends, one summary line with
        the counts per reason; another address's refusals are logged in
        full on their own; the next interval starts afresh.
        """
        from twisted.internet import task

        from hoopgw.refusals import RefusalFloods

        clock = task.Clock()
        written = []
        floods = RefusalFloods(clock, written.append, in_full=3, interval=60.0)

        class Record:
            # What the record addon does with a session refused before it.
            def session_ended(self, session):
                if session.refusal is not None:
                    floods.admit(session)

        refusal = Decision.deny("the token is not valid", rule="identity:invalid-token")
        chain = AddonChain([("identity", Identify(refusal=refusal)), ("record", Record())], allowed_groups={"payments-bots"})

        def attempt(address, decision=None):
            session = testing.session()
            session.client_address = address
            if decision is None:
                return self.successResultOf(chain.start_session(session))
            return self.successResultOf(chain.refuse_session(session, decision))

        for number in range(100):
            attempt("203.0.113.9:%d" % (40000 + number,))
        for number in range(5):
            attempt("203.0.113.9:%d" % (41000 + number,), Decision.deny("two credentials", rule="credentials"))
        attempt("198.51.100.7:5000")
        refused = [event for event in self.events if event["event"] == "session.refused"]
        self.assertEqual(
            [(event["client"].rpartition(":")[0], event["rule"]) for event in refused],
            [("203.0.113.9", "identity:invalid-token")] * 3 + [("203.0.113.9", "credentials")] * 3
            + [("198.51.100.7", "identity:invalid-token")],
        )
        self.assertEqual([event for event in self.events if event["event"] == "session.refused.summary"], [])
        clock.advance(60)
        (summary,) = [event for event in self.events if event["event"] == "session.refused.summary"]
        self.assertEqual((summary["client"], summary["refused"]), ("203.0.113.9", 99))
        self.assertEqual(summary["reasons"], ["credentials", "identity:invalid-token"])
        line = formatEvent(summary)
        self.assertIn("99 more refused attempts from 203.0.113.9 since ", line)
        self.assertIn("credentials 2, identity:invalid-token 97", line)
        self.assertEqual(summary["log_level"], LogLevel.warn)
        # The record's summary event says the same.
        self.assertEqual([event["by_reason"] for event in written],
                         [{"identity:invalid-token": 97, "credentials": 2}])
        # A new interval: the next refusal is logged in full again.
        attempt("203.0.113.9:42000")
        self.assertEqual(len([event for event in self.events if event["event"] == "session.refused"]), len(refused) + 1)

    def test_no_secrets(self):
        """
        A reason quoting a token and a card number (an addon's sentence
        built from what the client sent) is logged without either, in text
        and in JSON.
        """
        refusal = Decision.deny("the token %s for card %s is not valid" % (TOKEN, PAN), rule="identity:bad-token")
        chain = AddonChain([("identity", Identify(refusal=refusal))], allowed_groups={"payments-bots"})
        session = testing.session()
        session.identity = None
        session.client_address = "127.0.0.1:5000 user=%s" % (PAN,)
        self.successResultOf(chain.start_session(session))
        text = "\n".join(self.lines())
        as_json = "".join(logs.format_json(event) for event in self.events)
        for output in (text, as_json):
            self.assertIn("session.refused" if output is as_json else "refused", output)
            self.assertNotIn(PAN, output)
            self.assertNotIn(TOKEN, output)
            self.assertNotIn(TOKEN.split(".")[2], output)

    def test_limit_and_reload_lines(self):
        """
        A limit hit names the session; reload lines say what changed or
        why nothing did.
        """
        session = testing.session()
        logs.limit_hit("terminal recording truncated", "64 bytes", session=session)
        logs.reload_applied(["payments"], "ab" * 32)
        logs.reload_refused("connections were added or removed: restart the gateway to apply that")
        self.assertEqual([event["event"] for event in self.events], ["limit", "config.reloaded", "config.reload_refused"])
        self.assertEqual(self.events[0]["session"], session.id)
        lines = self.lines()
        self.assertIn("limit hit in session %s: terminal recording truncated (limit 64 bytes)" % (session.id,), lines[0])
        self.assertIn("chain changed on payments", lines[1])
        self.assertEqual(self.events[2]["log_level"], LogLevel.error)

    def test_json_line(self):
        """
        The JSON formatter gives one object a line: time, level, namespace,
        the message, and the event's fields.
        """
        session = testing.session()
        session.identity = testing.identity("ci-bot")
        logs.session_started(session)
        stream = io.StringIO()
        logs.json(stream)(self.events[0])
        line = stream.getvalue()
        self.assertEqual(line.count("\n"), 1)
        record = json.loads(line)
        self.assertEqual(
            (record["level"], record["namespace"], record["event"], record["session"], record["subject"]),
            ("info", "hoopgw", "session.start", session.id, "ci-bot"),
        )
        self.assertTrue(record["time"].endswith("Z"))
        self.assertIn("started: ci-bot", record["message"])


class TwistdJsonLogTests(unittest.TestCase):
    """
    The gateway under twistd with C{--logger=hoopgw.logs.json}.
    """

    def test_refusal_and_reload(self):
        """
        A psql client whose login name is a card number and whose password
        is a token is refused: the gateway's output is JSON lines only, one
        of them the refusal with its session id, none holding the card
        number or the token; a SIGHUP gives a reload line.
        """
        directory = os.path.abspath(self.mktemp())
        config, port, _ = gateway_files(directory)
        process = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "--reactor=asyncio", "-n", "--pidfile=", "--logger=hoopgw.logs.json",
             "hoopgw", "--config", config],
            cwd=directory, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        wait_for_port(port, process)
        client = subprocess.run(
            ["psql", "-X", "host=127.0.0.1 port=%d dbname=p user=%s sslmode=require" % (port, PAN), "-c", "SELECT 1"],
            env=dict(os.environ, PGPASSWORD=TOKEN), capture_output=True, text=True, timeout=60,
        )
        self.assertNotEqual(client.returncode, 0)
        self.assertIn("hoopgw refused the session", client.stderr)
        with open(config) as handle:
            document = yaml.safe_load(handle)
        document["connections"]["payments"]["addons"] = ["identity", "mask", "record"]
        with open(config, "w") as handle:
            yaml.safe_dump(document, handle)
        process.send_signal(signal.SIGHUP)
        # The reload's record event and the stop's both come before exit.
        self.assertEqual(stop(process), 0)
        output = process.stdout.read()
        records = [json.loads(line) for line in output.splitlines()]
        refused = [record for record in records if record.get("event") == "session.refused"]
        self.assertEqual(len(refused), 1, output)
        self.assertTrue(refused[0]["session"].startswith("s-"))
        self.assertEqual(refused[0]["connection"], "payments")
        reloaded = [record for record in records if record.get("event") == "config.reloaded"]
        self.assertEqual([record["changed"] for record in reloaded], [["payments"]], output)
        self.assertNotIn(PAN, output)
        self.assertNotIn(TOKEN.split(".")[2], output)


class StoreStateLogTests(unittest.TestCase):
    """
    One C{store.state} line per change of the evidence store's state, on a
    real volume and a real PostgreSQL store, with no secret in it.
    """

    def setUp(self):
        self.events = []
        observer = lambda event: self.events.append(event) if event.get("log_namespace") == "hoopgw" else None
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def states(self):
        return [(event["state"], formatEvent(event)) for event in self.events if event.get("event") == "store.state"]

    def test_file_store(self):
        """
        On a small tmpfs: low on space, space again, the volume full
        (stalled), writing again (resumed), and a failure each give one
        line with the state and why; a secret in a failure's reason is
        redacted.
        """
        from hoopgw.store import space
        from hoopgw.store.errors import StoreError
        from hoopgw.store.file import FileStore
        from twisted.internet import reactor
        from tests.test_store_space import fill, small_volume

        volume = small_volume(self)
        store = FileStore(os.path.join(volume, "audit"), reactor, fsync=False, low_water=512 * 1024,
                          low_water_percent=100, reserve=128 * 1024, space_check_interval=0)
        os.makedirs(store.directory, exist_ok=True)
        store.open()
        store.start()
        self.addCleanup(store.close)
        self.successResultOf(store.append({"type": "session.start", "session": "s-1"}))
        self.assertEqual(self.states(), [])
        filler = fill(volume, 256 * 1024)
        self.failureResultOf(store.append({"type": "session.start", "session": "s-2"}), StoreError)
        self.failureResultOf(store.append({"type": "session.start", "session": "s-3"}), StoreError)
        os.unlink(filler)
        store.check_space()
        self.assertEqual([state for state, _ in self.states()], ["low-space", "space-ok"])
        self.assertIn("evidence store low-space: ", self.states()[0][1])

        filler = fill(volume, 0)
        text = "x" * 50000
        while store.state() != space.FAILED:
            d = store.append({"type": "command", "session": "s-1", "text": text})
            if store.state() == space.FAILED:
                self.failureResultOf(d, StoreError)
            else:
                self.successResultOf(d)
        os.unlink(filler)
        store._space._last_resume = None
        self.successResultOf(store.append({"type": "session.end", "session": "s-1"}))
        found = self.states()
        self.assertEqual([state for state, _ in found][2:], ["stalled", "resumed"])
        self.assertIn("No space left on device", found[2][1])
        self.assertIn("event(s) were refused meanwhile", found[3][1])

        store._fail("a test broke the store (password=hunter2)")
        state, line = self.states()[-1]
        self.assertEqual(state, "failed")
        self.assertIn("evidence store failed: a test broke the store", line)
        self.assertNotIn("hunter2", line)
        self.assertEqual(self.events[-1]["log_level"], LogLevel.critical)

    @defer.inlineCallbacks
    def test_postgres_store_lost_and_back(self):
        """
        A PostgreSQL store whose database drops it and refuses it logs one
        line when it is lost and one when it has reconnected (with how
        long and how many events were refused); the store's password is in
        neither.
        """
        from twisted.internet import reactor, task

        from hoopgw.store.errors import StoreError
        from hoopgw.store.postgres import PostgresStore, parse_options
        from hoopgw.store import postgres as pgstore
        from tests import test_postgres_store as shared
        from tests.support import in_thread

        settings = yield in_thread(shared.store_settings)
        config = parse_options(settings["postgres"], "gateway.store.postgres")
        yield in_thread(pgstore.prepare_schema, config)
        store = PostgresStore(config, reactor)
        self.addCleanup(store.close)
        yield store.start()
        yield store.append({"type": "test", "n": 1})
        yield in_thread(shared.superuser, "ALTER ROLE audit_writer NOLOGIN")
        self.addCleanup(shared.superuser, "ALTER ROLE audit_writer LOGIN")
        yield in_thread(
            shared.superuser,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            ("hoopgw-store:" + settings["postgres"]["schema"],),
        )
        for _ in range(400):
            if store.outage is not None:
                break
            yield store.append({"type": "test", "n": 2}).addErrback(lambda failure: failure.trap(StoreError))
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertIsNotNone(store.outage)
        yield store.append({"type": "test", "n": 3}).addErrback(lambda failure: failure.trap(StoreError))
        yield in_thread(shared.superuser, "ALTER ROLE audit_writer LOGIN")
        for _ in range(600):
            if store.outage is None:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertIsNone(store.outage)
        found = self.states()
        self.assertEqual([state for state, _ in found], ["unreachable", "reconnected"], found)
        self.assertIn("evidence store unreachable: lost its PostgreSQL database: ", found[0][1])
        self.assertRegex(found[1][1], r"evidence store reconnected: its PostgreSQL database is back after [0-9.]+ s; "
                                      r"[1-9][0-9]* event\(s\) were refused meanwhile")
        for _, line in found:
            self.assertNotIn(shared.AUDIT_PASSWORD, line)
