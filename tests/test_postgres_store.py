"""
The shared PostgreSQL store: gateway processes (real twistd processes, and
gateways in the test's reactor) writing one hash chain with signed
checkpoints into one append-only table of a real PostgreSQL; verify over
the shared chain; the table refusing UPDATE, DELETE and TRUNCATE; a crashed
process noticed by the next one to start; tampering by someone who disables
the triggers, named by verify; NOTIFY between stores.
"""

import os
import signal
import socket
import sys
import time

import psycopg2
import yaml
from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from hoopgw import cli
from hoopgw.store import postgres as pgstore
from hoopgw.store import verify as verification
from hoopgw.store.errors import StoreError
from hoopgw.store.postgres import PostgresSource, PostgresStore, parse_options
from testbed.throwaway import free_port
from tests import evidence_support as es
from tests import support
from tests.support import in_thread, psql, token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUDIT_PASSWORD = "audit-secret-do-not-leak"
_shared = {}


def audit_database():
    """
    The database C{audit}, owned by the role C{audit_writer}, in the run's
    cluster.
    """
    if "audit" not in _shared:
        cluster = support.cluster()
        cluster.create_role("audit_writer", AUDIT_PASSWORD)
        cluster.create_database("audit", "audit_writer")
        path = os.path.join(support.workspace(), "audit.password")
        with open(path, "w") as handle:
            handle.write(AUDIT_PASSWORD + "\n")
        _shared["audit"] = path
    return _shared["audit"]


_schemas = iter(range(1, 10 ** 6))


def store_settings(schema=None):
    """
    C{gateway.store} settings for a fresh schema of the audit database.
    """
    password = audit_database()
    cluster = support.cluster()
    schema = schema or "t%d_%s" % (next(_schemas), os.urandom(3).hex())
    dsn = "host=127.0.0.1 port=%d dbname=audit user=audit_writer sslmode=verify-full sslrootcert=%s" % (
        cluster.port, cluster.ca_path)
    return {"backend": "postgres", "postgres": {"dsn": dsn, "password": {"file": password}, "schema": schema}}


def source_for(settings):
    postgres = settings["postgres"]
    return PostgresSource(postgres["dsn"], schema=postgres["schema"], password=AUDIT_PASSWORD)


def superuser(sql, params=None):
    """
    Run SQL as the cluster's superuser in the audit database (blocking).
    """
    cluster = support.cluster()
    connection = psycopg2.connect(cluster.dsn("postgres", dbname="audit"))
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else None
    finally:
        connection.close()


class GatewayProcess:
    """
    C{twistd --reactor=asyncio -n hoopgw} in its own process, on a
    configuration the test writes.
    """

    def __init__(self, test, store, document=None):
        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        if document is None:
            document = support.configuration_document(self.directory, {"payments": support.postgres_connection(self.port)})
        else:
            # The caller's configuration for this process (its folder and port are known now).
            document = document(self)
        document["gateway"]["store"] = dict(store, checkpoint_events=5)
        document["gateway"]["signing_key"] = {"file": es.signing_key()[0]}
        self.config = os.path.join(self.directory, "hoopgw.yaml")
        with open(self.config, "w") as handle:
            yaml.safe_dump(document, handle)
        self.log = open(os.path.join(self.directory, "twistd.log"), "wb")
        import subprocess

        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.process = subprocess.Popen(
            [twistd, "--reactor=asyncio", "-n", "--pidfile=", "hoopgw", "--config", self.config],
            cwd=self.directory,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        test.addCleanup(self.kill)

    def wait_listening(self, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError("the gateway exited: %s" % (self.output(),))
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError("the gateway does not listen: %s" % (self.output(),))

    def output(self):
        with open(os.path.join(self.directory, "twistd.log"), "rb") as handle:
            return handle.read().decode("utf-8", "replace")

    def stop(self, how=signal.SIGTERM, timeout=30):
        self.process.send_signal(how)
        self.process.wait(timeout)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.log.close()

    def dsn(self, user="ci-bot"):
        return "host=127.0.0.1 port=%d dbname=payments user=%s sslmode=require connect_timeout=10" % (self.port, user)


@defer.inlineCallbacks
def fresh_stores(test, count=1):
    """
    C{(settings, config, stores)}: C{count} stores of one fresh schema, as
    that many gateway processes would have, not yet started, closed when
    C{test} ends.
    """
    settings = yield in_thread(store_settings)
    config = parse_options(settings["postgres"], "gateway.store.postgres")
    yield in_thread(pgstore.prepare_schema, config)
    stores = [PostgresStore(config, reactor) for _ in range(count)]
    for store in stores:
        test.addCleanup(store.close)
    return settings, config, stores


@defer.inlineCallbacks
def two_stores(test):
    """
    C{(settings, listener, sender)}: two stores of one fresh schema, as two
    gateway processes would have, closed when C{test} ends.
    """
    settings, _, (listener, sender) = yield fresh_stores(test, 2)
    return settings, listener, sender


class SharedStoreTests(unittest.TestCase):
    """
    Several gateway processes, one chain.
    """

    timeout = 180

    @defer.inlineCallbacks
    def test_two_processes_one_chain(self):
        """
        Two twistd gateway processes on one PostgreSQL store serve psql
        sessions at the same time; their events interleave in ONE chain,
        without gaps, signed by both.  One stops cleanly, the other is
        killed (-9): verify names the killed run; a third gateway starting
        on the store records the crash, and the shared chain then verifies
        with the auditor's key.
        """
        settings = yield in_thread(store_settings)
        first = GatewayProcess(self, settings)
        second = GatewayProcess(self, settings)
        yield in_thread(first.wait_listening)
        yield in_thread(second.wait_listening)
        # Sessions alternate between the two processes, so their events
        # must interleave in the one chain (concurrent sessions would make
        # the order a matter of scheduling).
        for round_number in range(3):
            for process in (first, second):
                out, err, code = yield psql(
                    process.dsn(), "-c", "SELECT %d AS round" % (round_number,), "-c", "SELECT 2", password=token()
                )
                self.assertEqual(code, 0, err)
        yield in_thread(first.stop)
        source = yield in_thread(source_for, settings)
        events = [event for _, _, event in (yield in_thread(lambda: list(source.entries())))]
        self.assertEqual([event["seq"] for event in events], list(range(1, len(events) + 1)))
        gateways = {event["gateway"] for event in events if event["type"] == "gateway.start"}
        self.assertEqual(len(gateways), 2)
        sessions = [event for event in events if event["type"] == "session.start"]
        self.assertEqual(len(sessions), 6)
        self.assertEqual({event["gateway"] for event in sessions}, gateways)
        # Both processes' sessions interleave in the one chain.
        owners = [event["gateway"] for event in sessions]
        self.assertNotEqual(owners, sorted(owners))
        report = yield in_thread(verification.verify_source, source, es.signing.Verifier.from_file(es.signing_key()[1]))
        self.assertTrue(report.ok, report.problem)
        self.assertIn("is running", report.summary())

        # A session still open on the second when it is killed: its end is the crash.
        slow = psql(second.dsn(), "-c", "SELECT pg_sleep(30)", password=token())
        for _ in range(200):
            events = [event for _, _, event in (yield in_thread(lambda: list(source.entries())))]
            if any("pg_sleep" in (event.get("text") or "") for event in events):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield in_thread(second.stop, signal.SIGKILL)
        yield slow
        report = yield in_thread(verification.verify_source, source, es.signing.Verifier.from_file(es.signing_key()[1]))
        self.assertIn(report.kind, (verification.UNSIGNED_TAIL, verification.UNENDED), report.problem)

        third = es.SignedGateway(self, store=settings)
        out, err, code = yield psql(third.dsn(), "-c", "SELECT 3", password=token())
        self.assertEqual(code, 0, err)
        yield third.stop()
        events = [event for _, _, event in (yield in_thread(lambda: list(source.entries())))]
        (recovered,) = [event for event in events if event["type"] == "gateway.recovered"]
        self.assertEqual(len(recovered["crashed"]), 1)
        self.assertIn(recovered["crashed"][0], gateways)
        # It names the run recovering, and the events nobody had signed.
        self.assertEqual(recovered["by"], third.gateway.instance)
        if recovered["unsigned"] is None:
            # The killed run's checkpoint (one every 5 events) came just
            # before the kill: nothing was left unsigned.
            self.assertEqual(events[recovered["seq"] - 2]["type"], "checkpoint")
        else:
            self.assertEqual(recovered["unsigned"]["to"], recovered["seq"] - 1)
            self.assertLessEqual(recovered["unsigned"]["from"], recovered["unsigned"]["to"])
        report = yield in_thread(verification.verify_source, source, es.signing.Verifier.from_file(es.signing_key()[1]))
        self.assertTrue(report.ok, report.problem)
        self.assertEqual(report.sessions, 8)
        self.assertIn(
            "sessions: 8: 7 ended, 1 ended by the recorded crash of run %s" % (recovered["crashed"][0],), report.summary()
        )
        out = yield in_thread(_cli_verify, settings)
        self.assertIn("OK: %d events" % (len(events),), out)

    @defer.inlineCallbacks
    def test_append_only(self):
        """
        UPDATE, DELETE and TRUNCATE on the audit tables are refused, even for
        the superuser, with a sentence saying why.
        """
        settings = yield in_thread(store_settings)
        harness = es.SignedGateway(self, store=settings)
        yield harness.stop()
        schema = settings["postgres"]["schema"]
        for statement in (
            "UPDATE {s}.events SET line = '{{}}' WHERE seq = 1",
            "DELETE FROM {s}.events WHERE seq = 1",
            "TRUNCATE {s}.events",
            "DELETE FROM {s}.keys",
        ):
            error = yield self.assertFailure(in_thread(superuser, statement.format(s=schema)), psycopg2.Error)
            self.assertIn("is append-only", str(error))
        connection = yield in_thread(
            psycopg2.connect, settings["postgres"]["dsn"], password=AUDIT_PASSWORD
        )
        self.addCleanup(connection.close)

        def update_as_owner():
            with connection, connection.cursor() as cursor:
                cursor.execute("UPDATE {s}.events SET type = 'x'".format(s=schema))

        error = yield self.assertFailure(in_thread(update_as_owner), psycopg2.Error)
        self.assertEqual(error.pgcode, "42501")

    @defer.inlineCallbacks
    def test_notify_between_stores(self):
        """
        What one process sends with L{PostgresStore.notify} reaches another
        that L{PostgresStore.listen}s on the channel: the path approvals take
        between gateways.
        """
        settings, listener, sender = yield two_stores(self)
        received = defer.Deferred()
        yield listener.listen("hoopgw_approvals", received.callback)
        yield sender.notify("hoopgw_approvals", '{"approval": "a-1", "verdict": "approved"}')
        payload = yield received
        self.assertEqual(payload, '{"approval": "a-1", "verdict": "approved"}')


class OutageTests(unittest.TestCase):
    """
    The store's database goes away and comes back while a gateway runs.
    """

    timeout = 120

    def set_login(self, allowed):
        superuser("ALTER ROLE audit_writer %s" % ("LOGIN" if allowed else "NOLOGIN",))

    @defer.inlineCallbacks
    def drop_store(self, settings):
        """
        The database refuses the store's role from now on (until the test
        ends) and drops the store's connections.
        """
        yield in_thread(self.set_login, False)
        self.addCleanup(self.set_login, True)
        yield in_thread(
            superuser,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            ("hoopgw-store:" + settings["postgres"]["schema"],),
        )

    @defer.inlineCallbacks
    def test_outage_refuses_then_resumes(self):
        """
        While the store is unreachable every statement is refused (fail
        closed) with a sentence saying why; the store reconnects by itself,
        a session that stayed open goes on, and the record says what
        happened (store.reconnected: refused events, the session that ended
        meanwhile, the one still open), and verifies.
        """
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        settings = yield in_thread(store_settings)
        gateway = es.SignedGateway(self, store=settings)
        kept = yield in_thread(psycopg2.connect, gateway.dsn(password=token()))
        self.addCleanup(kept.close)
        ended = yield in_thread(psycopg2.connect, gateway.dsn(password=token()))
        for connection in (kept, ended):
            connection.autocommit = True
            yield in_thread(_query, connection, "SELECT 1")

        yield self.drop_store(settings)
        error = yield in_thread(_query_error, kept, "SELECT 2")
        self.assertIn("store", error)
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 3", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn("PostgreSQL store is unreachable", err)
        yield in_thread(ended.close)
        # Long enough for reconnection attempts to fail.
        yield task.deferLater(reactor, 1.5, lambda: None)

        yield in_thread(self.set_login, True)
        deadline = time.monotonic() + 60
        while True:
            out, err, code = yield psql(gateway.dsn(), "-A", "-t", "-c", "SELECT 4", password=token())
            if code == 0 or time.monotonic() > deadline:
                break
            yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual((out.strip(), code), ("4", 0), err)
        self.assertEqual((yield in_thread(_query, kept, "SELECT 5")), [(5,)])
        yield in_thread(kept.close)
        yield gateway.stop()

        source = yield in_thread(source_for, settings)
        events = [event for _, _, event in (yield in_thread(lambda: list(source.entries())))]
        (back,) = [event for event in events if event["type"] == "store.reconnected"]
        self.assertGreaterEqual(back["refused"], 2)
        self.assertGreaterEqual(back["seconds"], 1.5)
        self.assertIn("the connection to the store was lost", back["reason"])
        self.assertEqual(len(back["sessions_ended"]), 1)
        self.assertEqual(len(back["sessions_open"]), 1)
        (start,) = [event for event in events if event["type"] == "gateway.start"]
        self.assertEqual(back["gateway"], start["gateway"])
        # The kept session's end is recorded after the outage; the other's is not.
        ends = {event["session"] for event in events if event["type"] == "session.end"}
        self.assertIn(back["sessions_open"][0], ends)
        self.assertNotIn(back["sessions_ended"][0], ends)
        report = yield in_thread(verification.verify_source, source, es.signing.Verifier.from_file(es.signing_key()[1]))
        self.assertTrue(report.ok, report.problem)
        # The addons said, in the log, each time they could not record: a
        # line saying why, not a traceback.
        unrecorded = [formatEvent(event) for event in logged
                      if event.get("log_level") == LogLevel.warn and "addon failed in" in formatEvent(event)]
        self.assertTrue(unrecorded)
        for line in unrecorded:
            self.assertIn("store", line)


    @defer.inlineCallbacks
    def test_lost_before_the_first_event(self):
        """
        A store that reached its database, then lost it before writing any
        event, is in an outage, retried, not failed for good: once its role
        may log in again, it takes events.  (Under load, a gateway's
        readiness could be asked between the two.)
        """
        settings, _, (store,) = yield fresh_stores(self)
        yield store.start()
        self.assertEqual(store.seq, 0)
        yield self.drop_store(settings)
        for _ in range(200):
            if store.outage is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        error = yield self.assertFailure(store.append({"type": "checkpoint.test"}), StoreError)
        self.assertIn("unreachable", str(error))
        # Long enough for a reconnection attempt to be refused.
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assertIsNone(store._broken)
        yield in_thread(self.set_login, True)
        for _ in range(300):
            if store.outage is None:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        yield store.append({"type": "checkpoint.test"})
        self.assertGreaterEqual(store.seq, 1)


    @defer.inlineCallbacks
    def test_lost_mid_transaction(self):
        """
        A connection lost in the middle of a write cannot be rolled back
        either: the write is refused as an outage, the store takes events
        again once it has reconnected, and the gateway's log gets no
        traceback (txpostgres logs the failed rollback as an error of its
        own; trial fails a test on such a logged error).
        """
        _, _, (store,) = yield fresh_stores(self)
        yield store.start()
        yield store.append({"type": "checkpoint.test"})

        def cut(cursor, append):
            return cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        error = yield self.assertFailure(store.append_checked(cut), StoreError)
        self.assertIn("unreachable", str(error))
        for _ in range(300):
            if store.outage is None:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertIsNone(store.outage)
        yield store.append({"type": "checkpoint.test"})
        self.assertGreaterEqual(store.seq, 2)


    @defer.inlineCallbacks
    def test_read_lost(self):
        """
        A read whose connection is lost fails with the store's sentence (a
        StoreError, which callers log as a line), not the driver's error;
        the store reconnects and reads again.
        """
        _, _, (store,) = yield fresh_stores(self)
        yield store.start()

        def cut(cursor):
            return cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")

        error = yield self.assertFailure(store.read(cut), StoreError)
        self.assertIn("the PostgreSQL store could not be read (reading the PostgreSQL store failed: ", str(error))
        self.assertNotIn("RollbackFailed", str(error))
        self.assertNotIn(AUDIT_PASSWORD, str(error))

        def one(cursor):
            return cursor.execute("SELECT 1").addCallback(lambda _: cursor.fetchone()[0])

        for _ in range(300):
            if store.outage is None:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((yield store.read(one)), 1)


class CloseTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_closed_while_connecting(self):
        """
        A store closed while its connection is still being made (a gateway
        stopped as it starts) closes that connection once it is made: no
        connection is left open (trial fails a test on a reader left in the
        reactor), and the start fails with the store closed.
        """
        _, _, (store,) = yield fresh_stores(self)
        starting = store.start()
        yield store.close()
        error = yield self.assertFailure(starting, StoreError)
        self.assertIn("closed", str(error))


class ListenOutageTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_listening_resumes(self):
        """
        A store whose connection is killed while it only listens (the
        approvals channel between gateways) notices at once, reconnects,
        listens again, and records that it did: notifications reach it
        again.
        """
        settings, listener, sender = yield two_stores(self)
        received = []
        yield listener.listen("hoopgw_approvals", received.append)
        before = listener._connection.get_backend_pid()
        yield in_thread(superuser, "SELECT pg_terminate_backend(%s)", (before,))
        for _ in range(200):
            if listener.outage is None and listener._connection is not None and listener.seq:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertNotEqual(listener._connection.get_backend_pid(), before)
        yield sender.notify("hoopgw_approvals", "after the outage")
        for _ in range(100):
            if received:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(received, ["after the outage"])
        source = yield in_thread(source_for, settings)
        kinds = [event["type"] for _, _, event in (yield in_thread(lambda: list(source.entries())))]
        self.assertEqual(kinds, ["store.reconnected"])


def _query(connection, sql):
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _query_error(connection, sql):
    try:
        _query(connection, sql)
    except psycopg2.Error as error:
        return str(error)
    raise AssertionError("%s was not refused" % (sql,))


def _cli_verify(settings):
    import io

    out = io.StringIO()
    dsn = settings["postgres"]["dsn"] + " password=" + AUDIT_PASSWORD + " options='-c search_path=%s'" % (
        settings["postgres"]["schema"],)
    cli.main(["verify", dsn, "--key", es.signing_key()[1]], out=out)
    return out.getvalue()


_pristine = {}


@defer.inlineCallbacks
def pristine(test):
    """
    A schema holding a finished, signed record (made once per run).
    """
    if "settings" not in _pristine:
        settings = yield in_thread(store_settings)
        harness = es.SignedGateway(test, store=dict(settings, checkpoint_events=4))
        out, err, code = yield psql(harness.dsn(), "-c", "SELECT 41 + 1 AS answer", "-c", "SELECT 2", password=token())
        assert code == 0, err
        session = yield es.terminal_session(harness)
        yield harness.stop()
        _pristine.update(settings=settings, session=session.id)
    return _pristine["settings"]


def copy_schema(settings):
    """
    A copy of a store's schema (tables, triggers, rows) under a new name,
    its triggers disabled, as someone with the superuser's rights would
    prepare to tamper.
    """
    copy = store_settings()
    source, target = settings["postgres"]["schema"], copy["postgres"]["schema"]
    superuser(pgstore.schema_sql(target))
    for table in ("events", "attachments", "keys"):
        superuser("INSERT INTO {t}.{n} SELECT * FROM {s}.{n}".format(t=target, s=source, n=table))
        superuser("ALTER TABLE {t}.{n} DISABLE TRIGGER USER".format(t=target, n=table))
    superuser("GRANT USAGE ON SCHEMA {t} TO audit_writer; GRANT SELECT ON ALL TABLES IN SCHEMA {t} TO audit_writer".format(
        t=target))
    return copy


class TamperTests(unittest.TestCase):
    """
    Someone who can bypass the triggers (a superuser disabling them) changes
    the shared store: verify names each kind of change.
    """

    timeout = 120

    @defer.inlineCallbacks
    def tampered(self, *statements):
        settings = yield pristine(self)
        copy = yield in_thread(copy_schema, settings)
        schema = copy["postgres"]["schema"]
        for statement in statements:
            yield in_thread(superuser, statement.format(s=schema, session=_pristine["session"]))
        return copy

    @defer.inlineCallbacks
    def assertBroken(self, copy, kind, phrase, key=None):
        source = yield in_thread(source_for, copy)
        key = es.signing.Verifier.from_file(key or es.signing_key()[1])
        report = yield in_thread(verification.verify_source, source, key)
        source.close()
        self.assertEqual(report.kind, kind, report.problem)
        self.assertIn(phrase, report.problem)

    @defer.inlineCallbacks
    def test_intact_copy(self):
        """
        The copy, untouched, verifies: the tests below change only what they
        say.
        """
        copy = yield self.tampered()
        source = yield in_thread(source_for, copy)
        report = yield in_thread(verification.verify_source, source, es.signing.Verifier.from_file(es.signing_key()[1]))
        source.close()
        self.assertTrue(report.ok, report.problem)
        self.assertEqual(report.casts, 2)

    @defer.inlineCallbacks
    def test_edited(self):
        """
        A statement's text changed in its row: edited.
        """
        copy = yield self.tampered(
            "UPDATE {s}.events SET line = replace(line, '41 + 1', '40 + 2') WHERE line LIKE '%%41 + 1%%'"
        )
        yield self.assertBroken(copy, verification.EDITED, "was edited")

    @defer.inlineCallbacks
    def test_reordered(self):
        """
        Two rows' contents swapped: reordered.
        """
        copy = yield self.tampered(
            "UPDATE {s}.events e SET line = o.line FROM {s}.events o "
            "WHERE (e.seq, o.seq) IN ((3, 4), (4, 3))"
        )
        yield self.assertBroken(copy, verification.REORDERED, "reordered")

    @defer.inlineCallbacks
    def test_removed_event(self):
        """
        A row deleted: removed.
        """
        copy = yield self.tampered("DELETE FROM {s}.events WHERE line LIKE '%%41 + 1%%' AND type = 'command'")
        yield self.assertBroken(copy, verification.REMOVED, "was removed")

    @defer.inlineCallbacks
    def test_removed_session(self):
        """
        Every row of one session deleted: a whole session removed.
        """
        copy = yield self.tampered("DELETE FROM {s}.events WHERE session = '{session}'")
        yield self.assertBroken(copy, verification.REMOVED_SESSION, "a whole session was removed")

    @defer.inlineCallbacks
    def test_unsigned_tail(self):
        """
        The closing checkpoint deleted: unsigned tail.
        """
        copy = yield self.tampered("DELETE FROM {s}.events WHERE seq = (SELECT max(seq) FROM {s}.events)")
        yield self.assertBroken(copy, verification.UNSIGNED_TAIL, "unsigned tail")

    @defer.inlineCallbacks
    def test_wrong_key(self):
        """
        Verified with another key: wrong key.
        """
        copy = yield self.tampered()
        yield self.assertBroken(copy, verification.WRONG_KEY, "not by the key you gave", key=es.signing_key("other")[1])

    @defer.inlineCallbacks
    def test_edited_cast(self):
        """
        A recording's bytes changed in the attachments table: named.
        """
        copy = yield self.tampered(
            "UPDATE {s}.attachments SET data = data || '\\x0a'::bytea "
            "WHERE name = (SELECT max(name) FROM {s}.attachments)"
        )
        yield self.assertBroken(copy, verification.CAST_EDITED, "does not match the digest")

    @defer.inlineCallbacks
    def test_deleted_cast(self):
        """
        A recording's row deleted from the attachments table: named as
        missing.
        """
        copy = yield self.tampered("DELETE FROM {s}.attachments WHERE name = (SELECT min(name) FROM {s}.attachments)")
        yield self.assertBroken(copy, verification.CAST_MISSING, "is missing from the record")


class ReplayOnSharedStoreTests(unittest.TestCase):
    """
    The replay server over the PostgreSQL store records its views in the
    shared chain (which takes several writers).
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_views_join_the_shared_chain(self):
        """
        An auditor signs in and lists the sessions of a PostgreSQL store;
        the sign-in and the view are events of the shared chain, between
        the replay server's own start and stop, and the chain verifies.
        """
        import treq
        from twisted.web.client import HTTPConnectionPool
        from urllib.parse import urlencode

        from hoopgw.replay import tap

        settings = yield in_thread(store_settings)
        harness = es.SignedGateway(self, store=settings)
        out, err, code = yield psql(harness.dsn(), "-c", "SELECT 1", password=token())
        self.assertEqual(code, 0, err)
        yield harness.stop()
        port = free_port()
        options = tap.Options()
        options.parseOptions(["--config", harness.config_path, "--listen", "tcp:%d:interface=127.0.0.1" % (port,)])
        service = yield in_thread(tap.build, options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        pool = HTTPConnectionPool(reactor, persistent=False)
        base = "http://127.0.0.1:%d" % (port,)
        response = yield treq.post(
            base + "/signin",
            data=urlencode({"token": token(subject="auditor-bob", groups=["auditors"])}).encode(),
            headers={"content-type": ["application/x-www-form-urlencoded"]},
            allow_redirects=False,
            pool=pool,
        )
        yield response.content()
        self.assertEqual(response.code, 303)
        cookie = response.cookies()["hoopgw_replay"]
        response = yield treq.get(base + "/sessions", cookies={"hoopgw_replay": cookie}, pool=pool)
        body = yield response.text()
        self.assertEqual(response.code, 200)
        self.assertIn("ci-bot", body)
        self.assertIn("Record verified.", body)
        yield service.stopService()
        source = yield in_thread(source_for, settings)
        found = [event for _, _, event in (yield in_thread(lambda: list(source.entries())))]
        kinds = [(event["type"], event.get("role"), event.get("auditor")) for event in found]
        self.assertIn(("audit.signin", None, "auditor-bob"), kinds)
        self.assertIn(("audit.view", None, "auditor-bob"), kinds)
        self.assertIn(("gateway.stop", "replay", None), kinds)
        report = yield in_thread(verification.verify_source, source, es.signing.Verifier.from_file(es.signing_key()[1]))
        source.close()
        self.assertTrue(report.ok, report.problem)


class SpaceTests(unittest.TestCase):
    """
    The PostgreSQL store against its configured maximum size.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_low_room_refuses_new_sessions_then_admits(self):
        """
        With C{max_bytes} just above the database's size, the room left is
        below the low-water mark: C{store.low-space} is written once, a new
        session's start is refused (and its end not written) while a
        session in flight goes on; with a larger maximum the store admits
        sessions again and C{store.space-ok} counts what it refused.
        """
        import attr

        settings = yield in_thread(store_settings)
        config = parse_options(settings["postgres"], "gateway.store.postgres")
        yield in_thread(pgstore.prepare_schema, config)
        used = yield in_thread(superuser, "SELECT pg_database_size('audit')")
        store = PostgresStore(
            attr.evolve(config, max_bytes=used[0][0] + 64 * 1024), reactor, low_water=1024 * 1024,
            low_water_percent=100, space_check_interval=0,
        )
        self.addCleanup(store.close)
        yield store.start()
        self.assertEqual(store.state(), "low-space")
        yield store.append({"type": "command", "session": "s-in-flight"})
        refused = yield self.assertFailure(store.append({"type": "session.start", "session": "s-new"}), StoreError)
        self.assertIn("low on space", str(refused))
        yield store.append({"type": "session.end", "session": "s-new"})
        yield store.append({"type": "session.refused", "session": "s-login"})
        store.config = attr.evolve(store.config, max_bytes=used[0][0] * 100)
        yield store.check_space()
        self.assertEqual(store.state(), "ok")
        yield store.append({"type": "session.start", "session": "s-later"})
        source = yield in_thread(source_for, settings)
        events = [event for _, _, event in (yield in_thread(lambda: list(source.entries())))]
        self.assertEqual(
            [event["type"] for event in events], ["store.low-space", "command", "store.space-ok", "session.start"]
        )
        self.assertEqual((events[2]["refused_sessions"], events[2]["refused_attempts"]), (1, 1))
        self.assertGreater(events[0]["database_bytes"], 0)


class WitnessTests(unittest.TestCase):
    """
    The PostgreSQL store publishes its signed checkpoints to a witness.
    """

    timeout = 60

    @defer.inlineCallbacks
    def test_witness_catches_rows_cut_off(self):
        """
        Every checkpoint a store commits goes to the witness file; verify
        with the witness passes on the store, and fails on a copy whose
        last rows someone who can disable the triggers deleted.
        """
        from hoopgw.store.witness import FileWitness

        settings = yield in_thread(store_settings)
        config = parse_options(settings["postgres"], "gateway.store.postgres")
        yield in_thread(pgstore.prepare_schema, config)
        witness = os.path.join(os.path.abspath(self.mktemp()), "heads.jsonl")
        os.makedirs(os.path.dirname(witness))
        store = PostgresStore(config, reactor)
        store.use_signer(es.signing.Signer.from_pem(open(es.signing_key()[0], "rb").read()), every_events=3,
                         every_seconds=0)
        store.use_witness(FileWitness(witness))
        yield store.start()
        for number in range(7):
            yield store.append({"type": "test", "n": number})
        yield store.close()
        heads = verification.read_witness(witness)
        self.assertEqual(len(heads), 3)
        key = es.signing.Verifier.from_file(es.signing_key()[1])
        source = yield in_thread(source_for, settings)
        report = yield in_thread(verification.verify_source, source, key, verification.read_witness(witness, key))
        self.assertTrue(report.ok, report.problem)
        self.assertEqual(report.heads_checked, 3)

        copy = yield in_thread(copy_schema, settings)
        yield in_thread(superuser, "DELETE FROM {s}.events WHERE seq > 4".format(s=copy["postgres"]["schema"]))
        source = yield in_thread(source_for, copy)
        report = yield in_thread(verification.verify_source, source, key, verification.read_witness(witness, key))
        self.assertEqual(report.kind, verification.TRUNCATED, report.problem)
