"""
The PostgreSQL front end at the wire level: what no ordinary client sends
(malformed, oversized, out of order), denials in the middle of
transactions and pipelines, function calls, and back-pressure.  A small raw
client speaks the protocol over plain TCP on loopback
(C{allow_plaintext_password}) from a thread.
"""

import os
import socket
import struct
import textwrap

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from hoopgw.postgres import wire
from tests import support
from tests.support import GatewayHarness, in_thread, psql, token


DENY_ADDON = textwrap.dedent(
    '''
    """A test addon: deny any statement that mentions forbidden_table."""
    from hoopgw import AddonFactory, Decision


    class DenyForbidden:
        name = "deny_forbidden"
        options = ()

        def __init__(self, options, context):
            pass

        def command_received(self, session, command):
            if "forbidden_table" in command.text:
                return Decision.deny("forbidden_table is off limits", rule="test:forbidden", sqlstate="42501")
            if "explode" in command.text:
                raise RuntimeError("the addon blew up")
            return None


    deny_forbidden = AddonFactory(DenyForbidden)
    '''
)


class RawClient:
    """
    A blocking PostgreSQL client that sends exactly the messages it is told
    to, for use in a thread.
    """

    def __init__(self, port, user="ci-bot", password=None, database="payments"):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.buffer = b""
        self.user, self.password, self.database = user, password, database

    def send(self, data):
        self.socket.sendall(data)

    def startup(self):
        self.send(wire.startup_message({"user": self.user, "database": self.database}))
        kind, payload = self.read()
        assert (kind, wire.unpack_int32(payload)) == (b"R", 3), (kind, payload)
        self.send(wire.password_message(wire.cstring(self.password)))
        return self.until(b"Z")

    def read(self):
        while True:
            if len(self.buffer) >= 5:
                length = wire.unpack_int32(self.buffer, 1)
                if len(self.buffer) >= length + 1:
                    kind, payload = self.buffer[:1], self.buffer[5 : length + 1]
                    self.buffer = self.buffer[length + 1 :]
                    return kind, payload
            data = self.socket.recv(65536)
            if not data:
                raise EOFError("the gateway closed the connection")
            self.buffer += data

    def read_raw(self, count):
        while len(self.buffer) < count:
            data = self.socket.recv(65536)
            if not data:
                raise EOFError("the gateway closed the connection")
            self.buffer += data
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def until(self, kind):
        """
        Every message up to and including the first of type C{kind}.
        """
        seen = []
        while True:
            message = self.read()
            seen.append(message)
            if message[0] == kind:
                return seen

    def query(self, sql):
        self.send(wire.query(sql))
        return self.until(b"Z")

    def close(self):
        self.socket.close()


def parse(name, sql):
    return wire.message(b"P", wire.cstring(name) + wire.cstring(sql) + struct.pack("!H", 0))


def bind(portal, statement, parameters=()):
    body = wire.cstring(portal) + wire.cstring(statement) + struct.pack("!H", 0) + struct.pack("!H", len(parameters))
    for value in parameters:
        body += struct.pack("!i", len(value)) + value
    return wire.message(b"B", body + struct.pack("!H", 0))


def execute(portal):
    return wire.message(b"E", wire.cstring(portal) + struct.pack("!I", 0))


def sync():
    return wire.message(b"S")


def errors(messages):
    return [wire.parse_fields(payload) for kind, payload in messages if kind == b"E"]


def tags(messages):
    return [payload.rstrip(b"\x00").decode() for kind, payload in messages if kind == b"C"]


class ProtocolTests(unittest.TestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        addon = os.path.join(directory, "deny_forbidden.py")
        with open(addon, "w") as handle:
            handle.write(DENY_ADDON)
        self.gateway = GatewayHarness(
            self,
            addons=["identity", {"path": addon}, "record"],
            allow_plaintext_password=True,
            max_message_bytes=1024 * 1024,
        )
        self.token = token()
        support.cluster().psql(
            "DROP TABLE IF EXISTS forbidden_table, ledger; CREATE TABLE forbidden_table(a int); "
            "CREATE TABLE ledger(a int)",
            dbname="payments",
            user="app",
            password=support.APP_PASSWORD,
        )

    def client(self):
        client = RawClient(self.gateway.port, password=self.token)
        self.addCleanup(client.close)
        return client

    def ledger(self):
        return support.cluster().psql(
            "SELECT count(*) FROM ledger", dbname="payments", user="app", password=support.APP_PASSWORD
        ).strip()

    @defer.inlineCallbacks
    def test_denied_in_transaction_aborts_it(self):
        """
        BEGIN; INSERT; a denied statement; COMMIT: the client gets the
        denial (42501, naming the rule), the transaction is aborted exactly
        as if the statement had failed at the target, and COMMIT rolls back.
        """

        def run():
            client = self.client()
            client.startup()
            client.query("BEGIN")
            client.query("INSERT INTO ledger VALUES (1)")
            denied = client.query("SELECT * FROM forbidden_table")
            after = client.query("SELECT 1")
            commit = client.query("COMMIT")
            return denied, after, commit

        denied, after, commit = yield in_thread(run)
        (error,) = errors(denied)
        self.assertEqual(error["code"], "42501")
        self.assertIn("forbidden_table is off limits", error["message"])
        self.assertEqual(error["detail"], "rule: test:forbidden")
        self.assertEqual(denied[-1], (b"Z", b"E"))
        self.assertEqual(errors(after)[0]["code"], "25P02")
        self.assertEqual(tags(commit), ["ROLLBACK"])
        self.assertEqual(self.ledger(), "0")
        (command,) = [c for c in self.gateway.events("command.end") if "forbidden_table" in c.get("text", "")]
        self.assertEqual(command["decision"]["rule"], "test:forbidden")
        self.assertEqual(command["outcome"]["status"], "denied")

    @defer.inlineCallbacks
    def test_multi_statement_with_one_denied_runs_nothing(self):
        """
        A simple query whose second statement is denied runs none of them.
        """

        def run():
            client = self.client()
            client.startup()
            return client.query("INSERT INTO ledger VALUES (1); SELECT * FROM forbidden_table; INSERT INTO ledger VALUES (2)")

        messages = yield in_thread(run)
        self.assertEqual(errors(messages)[0]["code"], "42501")
        self.assertEqual(tags(messages), [])
        self.assertEqual(self.ledger(), "0")
        statuses = [e["outcome"]["status"] for e in self.gateway.events("command.end")]
        self.assertEqual(statuses, ["denied", "denied", "denied"])

    @defer.inlineCallbacks
    def test_denied_in_pipeline_rolls_back_the_pipeline(self):
        """
        An extended-protocol pipeline INSERT, denied statement, INSERT, Sync:
        the first INSERT is rolled back (the implicit transaction fails as it
        would at the target), the rest is skipped until Sync, and the session
        goes on.
        """

        def run():
            client = self.client()
            client.startup()
            client.send(
                parse("", "INSERT INTO ledger VALUES (1)") + bind("", "") + execute("")
                + parse("", "SELECT * FROM forbidden_table") + bind("", "") + execute("")
                + parse("", "INSERT INTO ledger VALUES (2)") + bind("", "") + execute("")
                + sync()
            )
            pipeline = client.until(b"Z")
            return pipeline, client.query("SELECT 42")

        pipeline, after = yield in_thread(run)
        self.assertEqual([kind for kind, _ in pipeline], [b"1", b"2", b"C", b"1", b"2", b"E", b"Z"])
        self.assertEqual(errors(pipeline)[0]["code"], "42501")
        self.assertEqual(pipeline[-1], (b"Z", b"I"))
        self.assertEqual(self.ledger(), "0")
        self.assertIn((b"D", struct.pack("!HI", 1, 2) + b"42"), after)

    @defer.inlineCallbacks
    def test_failing_addon_denies(self):
        """
        An addon that raises denies the statement (fail closed): the client
        is told which addon failed, the target never sees the statement, and
        the record has the failure as the decision.
        """

        def run():
            client = self.client()
            client.startup()
            return client.query("INSERT INTO ledger SELECT 1 WHERE 'explode' <> ''"), client.query("SELECT 1")

        failed, after = yield in_thread(run)
        error = errors(failed)[0]
        self.assertEqual(error["code"], "42501")
        self.assertIn("the deny_forbidden addon failed (RuntimeError: the addon blew up)", error["message"])
        self.assertEqual(tags(after), ["SELECT 1"])
        self.assertEqual(self.ledger(), "0")
        (end,) = [e for e in self.gateway.events("command.end") if "explode" in e.get("text", "")]
        self.assertEqual(end["decision"]["rule"], "deny_forbidden:error")

    @defer.inlineCallbacks
    def test_unknown_portal_refused(self):
        """
        An Execute naming a portal the gateway never saw bound is refused
        (26000) instead of being passed on; the session recovers at Sync.
        """

        def run():
            client = self.client()
            client.startup()
            client.send(execute("never-bound") + sync())
            refused = client.until(b"Z")
            return refused, client.query("SELECT 1")

        refused, after = yield in_thread(run)
        self.assertEqual(errors(refused)[0]["code"], "26000")
        self.assertEqual(tags(after), ["SELECT 1"])
        (end,) = [e for e in self.gateway.events("command.end") if e["decision"].get("rule") == "unknown-portal"]
        self.assertEqual(end["outcome"]["status"], "denied")

    @defer.inlineCallbacks
    def test_oversized_message(self):
        """
        A message larger than max_message_bytes closes the session with
        54000 before the gateway buffers it.
        """

        def run():
            client = self.client()
            client.startup()
            client.send(b"Q" + struct.pack("!I", 50 * 1024 * 1024))
            return client.until(b"E")

        messages = yield in_thread(run)
        fields = wire.parse_fields(messages[-1][1])
        self.assertEqual((fields["severity"], fields["code"]), ("FATAL", "54000"))

    @defer.inlineCallbacks
    def test_gssenc_declined(self):
        """
        A GSSENCRequest is answered "N" and the client carries on with a
        StartupMessage.
        """

        def run():
            client = self.client()
            client.send(struct.pack("!II", 8, wire.GSSENC_REQUEST))
            answer = client.read_raw(1)
            return answer, client.startup()

        answer, ready = yield in_thread(run)
        self.assertEqual(answer, b"N")
        self.assertEqual(ready[-1][0], b"Z")

    @defer.inlineCallbacks
    def test_data_after_ssl_request_refused(self):
        """
        Bytes sent after an SSLRequest and before the TLS handshake (the
        injection of CVE-2021-23214) close the connection.
        """
        self.gateway.gateway.stopService()
        gateway = GatewayHarness(self)

        def run():
            client = RawClient(gateway.port)
            self.addCleanup(client.close)
            client.send(struct.pack("!II", 8, wire.SSL_REQUEST) + wire.query("SELECT 1"))
            return client.until(b"E")

        messages = yield in_thread(run)
        self.assertIn("unencrypted data after the SSL request", wire.parse_fields(messages[-1][1])["message"])

    @defer.inlineCallbacks
    def test_failed_handshake_closes(self):
        """
        A client that answers the gateway's "S" with something other than a
        TLS handshake is disconnected without an answer, and the gateway
        goes on serving others.
        """
        self.gateway.gateway.stopService()
        gateway = GatewayHarness(self)

        def run():
            client = RawClient(gateway.port)
            self.addCleanup(client.close)
            client.send(struct.pack("!II", 8, wire.SSL_REQUEST))
            answer = client.read_raw(1)
            client.send(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
            received = b""
            while True:
                piece = client.socket.recv(4096)
                if not piece:
                    return answer, received
                received += piece

        answer, received = yield in_thread(run)
        self.assertEqual(answer, b"S")
        self.assertEqual(received, b"")
        out, err, code = yield psql(gateway.dsn(), "-A", "-t", "-c", "SELECT 41 + 1", password=token())
        self.assertEqual((out.strip(), code), ("42", 0), err)

    @defer.inlineCallbacks
    def test_function_call(self):
        """
        libpq's large-object API uses the FunctionCall message: psql's
        \\lo_import goes through, and each call is a recorded command.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as handle:
            handle.write(b"large object content")
        out, err, code = yield psql(
            self.gateway.dsn(sslmode="disable"),
            password=self.token,
            stdin=("BEGIN;\n\\lo_import %s\nSELECT lo_unlink(:LASTOID);\nCOMMIT;\n" % (path,)).encode(),
        )
        self.assertEqual(code, 0, err)
        calls = [c for c in self.gateway.events("command") if c["kind"] == "function-call"]
        self.assertGreater(len(calls), 2)
        self.assertTrue(all(c["facts"]["function_oid"] > 0 for c in calls))

    @defer.inlineCallbacks
    def test_back_pressure(self):
        """
        A client that stops reading makes the gateway stop reading from the
        target: the gateway's output buffer stays bounded while a 150 MB
        result waits, and everything arrives once the client reads again.
        """
        rows = 150000
        client = RawClient(self.gateway.port, password=self.token)
        self.addCleanup(client.close)
        yield in_thread(client.startup)
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        client.send(wire.query("SELECT repeat('x', 1000) FROM generate_series(1, %d)" % (rows,)))
        yield task.deferLater(reactor, 1.5, lambda: None)
        (frontend,) = [f for f in self.gateway.gateway.factories["payments"].active.values()]
        self.assertTrue(frontend.upstream_valve.paused)
        buffered = len(frontend.transport.dataBuffer) + sum(len(piece) for piece in frontend.transport._tempDataBuffer)
        self.assertLess(buffered, 16 * 1024 * 1024)

        def drain():
            count = 0
            while True:
                kind, payload = client.read()
                if kind == b"D":
                    count += 1
                elif kind == b"Z":
                    return count

        self.assertEqual((yield in_thread(drain)), rows)


class RunEndTests(unittest.TestCase):
    """
    L{wire.run_end} finds where a run of rows ends, vectorised or not, as a
    walk one message at a time would.
    """

    def walk(self, buffer, position, end, maximum):
        kind = buffer[position]
        while end - position >= 5 and buffer[position] == kind:
            length = struct.unpack_from("!I", buffer, position + 1)[0]
            if position + 1 + length > end or not 4 <= length <= maximum:
                break
            position += 1 + length
        return position

    def row(self, generator):
        """
        A DataRow whose values are sometimes made of bytes that look like
        the start of a DataRow.
        """
        values = []
        for _ in range(generator.randrange(1, 5)):
            if generator.random() < 0.3:
                fake = wire.message(b"D", struct.pack("!H", 1) + struct.pack("!I", generator.randrange(0, 40)))
                values.append(fake * generator.randrange(1, 3))
            else:
                values.append(bytes(generator.randrange(32, 127) for _ in range(generator.randrange(0, 30))))
        return wire.message(b"D", struct.pack("!H", len(values)) + b"".join(struct.pack("!I", len(v)) + v for v in values))

    def test_matches_a_walk(self):
        """
        Runs of rows long enough to be vectorised, followed by another
        message, a torn message, a message of an impossible length, or
        nothing: the end is the one a plain walk finds.
        """
        import random

        generator = random.Random(7)
        for case in range(300):
            buffer = b"".join(self.row(generator) for _ in range(generator.randrange(1, 200)))
            tail = generator.choice(
                [b"", wire.message(b"C", b"SELECT 3\x00"), b"D\x00\x00", b"D\x00\x00\x00\x02xx", b"D\xff\xff\xff\xffabcd"]
            )
            buffer = b"Z" * (case % 3) + buffer + tail + self.row(generator)
            start = case % 3
            end = len(buffer) - generator.randrange(0, 3)
            expected = self.walk(buffer, start, end, 1 << 20)
            self.assertEqual(wire.run_end(buffer, start, end, 1 << 20), expected, case)
            self.assertEqual(wire.run_end(buffer, start, end, 64), self.walk(buffer, start, end, 64), case)

    def test_vectorised(self):
        """
        The runs above are long enough to take the vectorised path.
        """
        self.assertGreater(len(b"".join(self.row(__import__("random").Random(1)) for _ in range(400))), wire.VECTOR_RUN)


class ReloadTests(unittest.TestCase):
    """
    Operators turn addons on and off per connection at run time (SIGHUP,
    L{Gateway.reload}); every change is in the record.
    """

    @defer.inlineCallbacks
    def test_chain_change_applies_to_new_sessions(self):
        """
        Adding an addon to the chain in the file and reloading: a new
        session is held to it, a session already open keeps its chain, and
        the record has the chain before and after.
        """
        import yaml

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        addon = os.path.join(directory, "deny_forbidden.py")
        with open(addon, "w") as handle:
            handle.write(DENY_ADDON)
        gateway = GatewayHarness(self, allow_plaintext_password=True)
        support.cluster().psql(
            "CREATE TABLE IF NOT EXISTS forbidden_table(a int)", dbname="payments", user="app", password=support.APP_PASSWORD
        )
        bot = token()
        old = RawClient(gateway.port, password=bot)
        self.addCleanup(old.close)
        yield in_thread(old.startup)

        document = gateway.document
        document["connections"]["payments"]["addons"] = ["identity", {"path": addon}, "record"]
        with open(gateway.config_path, "w") as handle:
            yaml.safe_dump(document, handle)
        changed = yield gateway.gateway.reload()
        self.assertEqual(changed, ["payments"])

        new = RawClient(gateway.port, password=bot)
        self.addCleanup(new.close)
        yield in_thread(new.startup)
        refused = yield in_thread(new.query, "SELECT * FROM forbidden_table")
        self.assertEqual(errors(refused)[0]["code"], "42501")
        allowed = yield in_thread(old.query, "SELECT * FROM forbidden_table")
        self.assertEqual(errors(allowed), [])
        (change,) = gateway.events("chain.changed")
        self.assertEqual([step["name"] for step in change["before"]["chain"]], ["identity", "record"])
        self.assertEqual([step["name"] for step in change["after"]["chain"]], ["identity", "deny_forbidden", "record"])

    @defer.inlineCallbacks
    def test_restart_only_changes_refused(self):
        """
        A reload that would move a listener changes nothing and is recorded
        as refused, saying that a restart is needed.
        """
        import yaml

        gateway = GatewayHarness(self)
        document = gateway.document
        document["connections"]["payments"]["listen"] = "tcp:%d:interface=127.0.0.1" % (support.free_port(),)
        with open(gateway.config_path, "w") as handle:
            yaml.safe_dump(document, handle)
        changed = yield gateway.gateway.reload()
        self.assertEqual(changed, [])
        (refused,) = gateway.events("config.reload_refused")
        self.assertIn("restart the gateway", refused["reason"])


class SkipToSyncTests(unittest.TestCase):
    """
    An error in the extended protocol makes PostgreSQL skip every message
    up to the next Sync; the gateway must expect no answer for what it
    sends in that stretch, even when part of it goes out after the error
    came back (a decision held it).
    """

    def setUp(self):
        from tests import untrusted_addons

        del untrusted_addons.HELD[:]
        self.held = untrusted_addons
        path = os.path.abspath(untrusted_addons.__file__.replace(".pyc", ".py"))
        self.gateway = GatewayHarness(
            self,
            addons=["identity", {"path": path, "name": "test-hold"}, "record"],
            allow_plaintext_password=True,
        )
        self.token = token()

    @defer.inlineCallbacks
    def wait_held(self, count):
        for _ in range(400):
            if len(self.held.HELD) >= count:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("%d statement(s) held, not %d" % (len(self.held.HELD), count))

    @defer.inlineCallbacks
    def test_error_before_a_held_statement(self):
        """
        A pipeline, then Sync, in one write: a statement that fails at the
        target as it runs (1/0), then one whose decision is still held when that error
        comes back.  The client gets the error and one ReadyForQuery, the
        held statement ends not run, and the session goes on; before, the
        gateway waited for an answer PostgreSQL never sends (the session
        hung).
        """
        client = RawClient(self.gateway.port, password=self.token)
        self.addCleanup(client.close)
        yield in_thread(client.startup)
        client.send(
            parse("", "SELECT 1 / g FROM generate_series(0, 0) AS g") + bind("", "") + execute("")
            + parse("", "SELECT 2") + bind("", "") + execute("") + sync()
        )
        yield self.wait_held(1)
        self.held.allow(self.held.HELD[0][1])
        # The first statement reaches PostgreSQL and fails while the second waits.
        yield self.wait_held(2)
        for _ in range(100):
            if self.gateway.events("command.end"):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.held.allow(self.held.HELD[1][1])
        messages = yield in_thread(client.until, b"Z")
        self.assertEqual([fields["code"] for fields in errors(messages)], ["22012"])
        self.assertEqual([kind for kind, _ in messages].count(b"Z"), 1)
        client.send(wire.query("SELECT 3"))
        yield self.wait_held(3)
        self.held.allow(self.held.HELD[2][1])
        after = yield in_thread(client.until, b"Z")
        self.assertEqual(tags(after), ["SELECT 1"])
        ended = {event["command"]: event["outcome"]["status"] for event in self.gateway.events("command.end")}
        started = [event["command"] for event in self.gateway.events("command")]
        self.assertEqual([ended.get(command) for command in started[:2]], ["error", "not-run"])
