"""
The PostgreSQL login phase and its limits (hoopgw.postgres.startup): what
a client sends before it is logged in is parsed without recursion or
copies, bounded in size, time and number, and every refused attempt is
answered and recorded; a flood of refusals is summarised, not silenced.
Property-based tests feed the parser arbitrary bytes; the rest run a real
gateway against the run's throwaway PostgreSQL.
"""

import os
import socket
import struct
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hoopgw.chain import AddonChain
from hoopgw.postgres import wire
from hoopgw.postgres.frontend import PostgresFactory
from hoopgw.postgres.settings import PostgresSettings, Target
from hoopgw.postgres.startup import CLOSED, PASSWORD, STARTUP
from hoopgw.refusals import SUMMARY, RefusalFloods
from hoopgw.model import Credentials, Decision, Session
from hoopgw.store import events
from tests import support
from tests.support import GatewayHarness, configuration_document, free_port, in_thread, psql, token
from tests.test_postgres_protocol import RawClient


GSSENC = struct.pack("!II", 8, wire.GSSENC_REQUEST)
SSL = struct.pack("!II", 8, wire.SSL_REQUEST)


class _Connection:
    name = "payments"

    def __init__(self, settings):
        self.settings = settings


class _Refusals:
    """
    An addon that keeps the sessions the chain ends as refused.
    """

    def __init__(self):
        self.refused = []

    def session_ended(self, session):
        self.refused.append(session)


def _settings(**overrides):
    target = Target(
        host="127.0.0.1",
        port=5432,
        database="payments",
        user="app",
        password=None,
        tls="disable",
        ca=None,
        server_name=None,
        connect_timeout=5.0,
    )
    values = dict(target=target, tls=None, allow_plaintext_password=True, max_message_bytes=1024 * 1024)
    values.update(overrides)
    return PostgresSettings(**values)


def _frontend(**overrides):
    """
    A front end on a StringTransport, its chain holding only L{_Refusals}.
    """
    refusals = _Refusals()
    clock = task.Clock()
    factory = PostgresFactory(_Connection(_settings(**overrides)), None, AddonChain([("refusals", refusals)]), reactor=clock)
    frontend = factory.buildProtocol(None)
    transport = StringTransport()
    frontend.makeConnection(transport)
    return frontend, transport, refusals, clock


def _answers(data):
    """
    The single-byte answers to negotiation requests and the typed messages
    after them.
    """
    bytes_, messages = b"", []
    position = 0
    while position < len(data) and data[position : position + 1] in (b"N", b"S"):
        bytes_ += data[position : position + 1]
        position += 1
    while position + 5 <= len(data):
        length = wire.unpack_int32(data, position + 1)
        messages.append((data[position : position + 1], data[position + 5 : position + 1 + length]))
        position += 1 + length
    return bytes_, messages


class StartupPacketTests(unittest.SynchronousTestCase):
    def test_two_thousand_gssenc_requests(self):
        """
        Two thousand GSSENCRequests in one write (a RecursionError before)
        get one "N", then FATAL 0A000 for the duplicate, and one recorded
        refusal.
        """
        frontend, transport, refusals, _ = _frontend()
        frontend.dataReceived(GSSENC * 2000)
        answers, messages = _answers(transport.value())
        self.assertEqual(answers, b"N")
        (kind, payload), = messages
        fields = wire.parse_fields(payload)
        self.assertEqual((kind, fields["severity"], fields["code"]), (b"E", "FATAL", "0A000"))
        self.assertIn("duplicate GSS negotiation request", fields["message"])
        self.assertEqual(frontend._state, CLOSED)
        (refused,) = refusals.refused
        self.assertEqual(refused.refusal.rule, "postgres:duplicate-negotiation")

    def test_gss_then_ssl(self):
        """
        libpq's gssencmode=prefer sends a GSSENCRequest, then an SSLRequest:
        one of each is allowed.
        """
        frontend, transport, refusals, _ = _frontend()
        frontend.dataReceived(GSSENC + SSL + wire.startup_message({"user": "ci-bot", "database": "payments"}))
        answers, messages = _answers(transport.value())
        self.assertEqual((answers, messages), (b"NN", [(b"R", wire.int32(3))]))
        self.assertEqual(frontend._state, PASSWORD)
        self.assertEqual(refusals.refused, [])

    def test_byte_by_byte(self):
        """
        A startup packet sent one byte at a time is read once it is whole.
        """
        frontend, transport, _, _ = _frontend()
        for byte in wire.startup_message({"user": "ci-bot", "database": "payments"}):
            frontend.dataReceived(bytes([byte]))
        self.assertEqual(frontend._state, PASSWORD)
        self.assertEqual(transport.value(), wire.authentication_cleartext_password())

    def test_refusals_recorded(self):
        """
        Each startup refusal is a FATAL with PostgreSQL's SQLSTATE and a
        refused session with a rule naming the reason.
        """
        cases = [
            (struct.pack("!II", 20000, wire.PROTOCOL_3_0), "08P01", "postgres:startup-length"),
            (struct.pack("!II", 8, 2 << 16), "0A000", "postgres:protocol-version"),
            (struct.pack("!II", 9, wire.PROTOCOL_3_0) + b"x", "08P01", "postgres:startup-layout"),
            (wire.startup_message({"database": "payments"}), "28000", "postgres:no-user"),
            (wire.startup_message({"user": "u", "database": "other"}), "3D000", "postgres:database"),
            (wire.startup_message({"user": "u", "replication": "true"}), "0A000", "postgres:replication"),
            (struct.pack("!II", 12, wire.CANCEL_REQUEST) + b"abcd", "08P01", "postgres:cancel-length"),
            (struct.pack("!II", 12, wire.SSL_REQUEST) + b"abcd", "08P01", "postgres:negotiation-length"),
        ]
        for data, sqlstate, rule in cases:
            frontend, transport, refusals, _ = _frontend()
            frontend.dataReceived(data)
            _, messages = _answers(transport.value())
            fields = wire.parse_fields(messages[-1][1])
            self.assertEqual((fields["severity"], fields["code"]), ("FATAL", sqlstate), rule)
            (refused,) = refusals.refused
            self.assertEqual((refused.refusal.rule, refused.refusal.sqlstate), (rule, sqlstate))
            self.assertEqual(refused.identity, None)

    def test_tls_required(self):
        """
        A client without TLS on a connection that requires it (sslmode=
        disable) is refused with 28000 and recorded with the user it claimed.
        """
        frontend, transport, refusals, _ = _frontend(allow_plaintext_password=False)
        frontend.dataReceived(wire.startup_message({"user": "ci-bot", "database": "payments"}))
        _, messages = _answers(transport.value())
        self.assertIn("accepts tokens over TLS only", wire.parse_fields(messages[-1][1])["message"])
        (refused,) = refusals.refused
        self.assertEqual(refused.refusal.rule, "postgres:tls-required")
        self.assertEqual(refused.attributes["user"], "ci-bot")

    def test_unknown_cancel_key(self):
        """
        A CancelRequest naming no session closes without an answer (as
        PostgreSQL does) and is recorded.
        """
        frontend, transport, refusals, _ = _frontend()
        frontend.dataReceived(wire.cancel_request(1, 2))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        (refused,) = refusals.refused
        self.assertEqual(refused.refusal.rule, "postgres:cancel-unknown-key")

    def test_startup_timeout(self):
        """
        A client that has not logged in when startup_timeout runs out gets
        FATAL 57014 and is disconnected; the attempt is recorded.
        """
        frontend, transport, refusals, clock = _frontend(startup_timeout=60.0)
        frontend.dataReceived(b"\x00")
        clock.advance(59)
        self.assertEqual(frontend._state, STARTUP)
        clock.advance(1)
        _, messages = _answers(transport.value())
        fields = wire.parse_fields(messages[-1][1])
        self.assertEqual((fields["code"], frontend._state), ("57014", CLOSED))
        (refused,) = refusals.refused
        self.assertEqual(refused.refusal.rule, "postgres:startup-timeout")

    def test_unauthenticated_limits(self):
        """
        Connections not logged in are limited per source and in total; the
        one over the limit is refused at once with 53300, and a slot frees
        when a connection leaves.
        """
        refusals = _Refusals()
        factory = PostgresFactory(
            _Connection(_settings(max_unauthenticated=3, max_unauthenticated_per_source=2)),
            None,
            AddonChain([("refusals", refusals)]),
            reactor=task.Clock(),
        )

        def connect(host):
            frontend = factory.buildProtocol(None)
            transport = StringTransport(peerAddress=_Address(host))
            frontend.makeConnection(transport)
            return frontend, transport

        first, _ = connect("10.0.0.1")
        connect("10.0.0.1")
        third, transport = connect("10.0.0.1")
        self.assertIn(b"53300", transport.value())
        self.assertEqual(refusals.refused[-1].refusal.rule, "postgres:too-many-unauthenticated-per-source")
        connect("10.0.0.2")
        _, transport = connect("10.0.0.3")
        self.assertEqual(refusals.refused[-1].refusal.rule, "postgres:too-many-unauthenticated")
        first.connectionLost(None)
        _, transport = connect("10.0.0.3")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(factory.admission.total, 3)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.binary(max_size=64), max_size=12), st.booleans())
    def test_any_bytes(self, chunks, framed):
        """
        Whatever bytes arrive, in whatever pieces, the login phase either
        waits for more, asks for the token, or refuses with a FATAL and one
        recorded refusal; it never raises.
        """
        frontend, transport, refusals, _ = _frontend()
        if framed and chunks:
            # Mostly well-framed packets, so the parser gets past the length.
            chunks = [struct.pack("!I", len(chunk) + 8) + chunk[:4].ljust(4, b"\x00") + chunk for chunk in chunks]
        for chunk in chunks:
            frontend.dataReceived(chunk)
        self.assertIn(frontend._state, (STARTUP, PASSWORD, CLOSED, 2))
        self.assertLessEqual(len(refusals.refused), 1)
        if frontend._state == CLOSED and refusals.refused and refusals.refused[0].refusal.rule != "postgres:cancel-unknown-key":
            _, messages = _answers(transport.value())
            self.assertEqual(messages[-1][0], b"E")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2048))
    def test_parse_startup(self, payload):
        """
        The startup packet's parameters are parsed, or refused with a
        StartupError; nothing else escapes.
        """
        try:
            parameters = wire.parse_startup(payload)
        except wire.StartupError as error:
            self.assertEqual(error.sqlstate, "08P01")
            return
        self.assertTrue(payload.endswith(b"\x00"))
        for name, value in parameters.items():
            self.assertIsInstance(name, str)
            self.assertIsInstance(value, str)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=64), st.integers(min_value=0, max_value=64))
    def test_read_startup_packet(self, data, position):
        """
        A startup-phase packet is read whole, reported incomplete, or its
        length refused.
        """
        position = min(position, len(data))
        try:
            packet = wire.read_startup_packet(data, position)
        except wire.StartupError as error:
            self.assertEqual(error.rule, "postgres:startup-length")
            return
        if packet is not None:
            code, body, end = packet
            self.assertEqual(end - position, wire.unpack_int32(data, position))
            self.assertEqual(len(body), end - position - 8)


class _Address:
    def __init__(self, host):
        self.host = host
        self.port = 5432


class EscapeTests(unittest.SynchronousTestCase):
    @given(st.binary(max_size=256))
    def test_round_trip(self, data):
        """
        Any bytes, decoded as the front end decodes SQL, are written
        escaped and read back exactly, and an event with them is sealed.
        """
        text = data.decode("utf-8", "surrogateescape")
        event = {"type": "command", "text": text, "facts": {"statement_type": "select"}}
        line = events.seal(event, 1, events.GENESIS)
        import orjson

        written = orjson.loads(line)
        if "text" in written.get("escaped", ()):
            self.assertEqual(events.unescape_text(written["text"]), data)
        else:
            self.assertEqual(written["text"].encode("utf-8"), data)
        self.assertEqual(events.digest(written), written["hash"])

    def test_backslash_unambiguous(self):
        """
        A literal backslash-x in valid text is not escaped and not listed;
        in escaped text it is doubled, so the two never read alike.
        """
        plain = events.seal({"type": "command", "text": "\\xff"}, 1, events.GENESIS)
        self.assertNotIn(b'"escaped"', plain)
        mixed = {"type": "command", "text": "\\xff" + b"\xff".decode("utf-8", "surrogateescape")}
        events.seal(mixed, 1, events.GENESIS)
        self.assertEqual(mixed["escaped"], ["text"])
        self.assertEqual(mixed["text"], "\\\\xff\\xff")


def _refused_session(host="10.1.1.1", rule="identity:invalid-token", user="mallory", protocol="postgres"):
    session = Session(
        connection="payments", protocol=protocol, client_address="%s:4000" % (host,), credentials=Credentials(user=user, password="secret-token")
    )
    session.refusal = Decision.deny("no", rule=rule, addon="identity")
    return session


class FloodTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.written = []
        self.floods = RefusalFloods(self.clock, lambda event: self.written.append(event), in_full=3, interval=60.0, max_sources=2)

    def test_first_in_full_rest_summarised(self):
        """
        The first in_full refusals per address and reason are recorded in
        full; the rest are counted in one summary when the interval ends.
        """
        admitted = [self.floods.admit(_refused_session()) for _ in range(10)]
        self.assertEqual(admitted, [True] * 3 + [False] * 7)
        self.assertTrue(self.floods.admit(_refused_session(rule="postgres:no-user")))
        self.assertEqual(self.written, [])
        self.clock.advance(60)
        (summary,) = self.written
        self.assertEqual(summary["type"], SUMMARY)
        self.assertEqual((summary["client"], summary["refused"]), ("10.1.1.1", 7))
        self.assertEqual(summary["by_reason"], {"identity:invalid-token": 7})
        self.assertEqual(summary["recorded_in_full"], {"identity:invalid-token": 3, "postgres:no-user": 1})
        self.assertEqual(summary["identities"], ["mallory"])
        self.assertNotIn("secret-token", repr(summary))
        self.assertTrue(self.floods.admit(_refused_session()))

    def test_flush(self):
        """
        flush (the gateway stopping) writes every open summary at once.
        """
        for _ in range(5):
            self.floods.admit(_refused_session(protocol="ssh"))
        self.floods.flush()
        (summary,) = self.written
        self.assertEqual((summary["refused"], summary["protocols"]), (2, {"ssh": 2}))
        self.clock.advance(60)
        self.assertEqual(len(self.written), 1)

    def test_many_sources_bounded(self):
        """
        Beyond max_sources addresses, refusals are counted together.
        """
        for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
            for _ in range(4):
                self.floods.admit(_refused_session(host=host))
        self.floods.flush()
        clients = {summary["client"]: summary["refused"] for summary in self.written}
        self.assertEqual(clients, {"10.0.0.1": 1, "10.0.0.2": 1, "(other addresses)": 5})


class FloodGateway(GatewayHarness):
    """
    A gateway whose refusals settings a test chooses.
    """

    def __init__(self, test, refusals=None, **connection_settings):
        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        connections = {"payments": support.postgres_connection(self.port, **connection_settings)}
        gateway = {"refusals": refusals} if refusals else None
        self.start(test, configuration_document(self.directory, connections, gateway=gateway))


class GatewayTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_plaintext_refusal_recorded(self):
        """
        sslmode=disable against a connection that needs TLS is refused and
        the attempt recorded with its reason and the user claimed.
        """
        gateway = FloodGateway(self)
        out, err, code = yield psql(gateway.dsn(sslmode="disable"), "-c", "SELECT 1", password=token())
        self.assertNotEqual(code, 0)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "postgres:tls-required")
        self.assertEqual(refused["attributes"]["user"], "ci-bot")
        self.assertTrue(refused["client"].startswith("127.0.0.1:"))

    @defer.inlineCallbacks
    def test_statement_not_utf8(self):
        """
        A statement whose text is not UTF-8 gets its command and
        command.end events, the text escaped losslessly and marked, and
        the session goes on.
        """
        gateway = FloodGateway(self, allow_plaintext_password=True)
        bearer = token()

        def run_raw():
            client = RawClient(gateway.port, password=bearer)
            try:
                client.startup()
                client.send(wire.message(b"Q", b"SELECT '\xff\xfe' AS x\x00"))
                first = client.until(b"Z")
                return first, client.query("SELECT 2")
            finally:
                client.close()

        first, second = yield in_thread(run_raw)
        self.assertIn(b"C", [kind for kind, _ in first] + [kind for kind, _ in second])
        (command, _) = yield gateway.wait_for("command", 2)
        self.assertEqual(command["escaped"], ["text"])
        self.assertEqual(events.unescape_text(command["text"]), b"SELECT '\xff\xfe' AS x")
        ends = yield gateway.wait_for("command.end", 2)
        self.assertEqual(ends[0]["command"], command["command"])

    @defer.inlineCallbacks
    def test_flood_bounded_while_session_works(self):
        """
        Many refused logins from one address write a few events in full
        and one summary (at the latest when the gateway stops), while a
        legitimate session on the same connection works meanwhile.
        """
        gateway = FloodGateway(self, refusals={"in_full": 3, "interval": "1h"})
        attempts = 200

        def flood():
            for _ in range(attempts):
                connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
                connection.sendall(wire.startup_message({"database": "payments"}))
                while connection.recv(4096):
                    pass
                connection.close()

        flooding = in_thread(flood)
        out, err, code = yield psql(gateway.dsn(), "-A", "-t", "-c", "SELECT 40 + 2", password=token())
        self.assertEqual((out.strip(), code), ("42", 0), err)
        yield flooding
        for _ in range(200):
            if sum(1 for event in gateway.events("session.refused")) >= 3:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        size_before_stop = len(gateway.raw_store())
        yield gateway.stop()
        refused = gateway.events("session.refused")
        self.assertEqual(len(refused), 3)
        (summary,) = gateway.events(SUMMARY)
        self.assertEqual(summary["by_reason"], {"postgres:no-user": attempts - 3})
        self.assertEqual(summary["client"], "127.0.0.1")
        kinds = [event["type"] for event in gateway.events()]
        self.assertLess(kinds.index(SUMMARY), kinds.index("gateway.stop"))
        # A few kilobytes for two hundred attempts, not two hundred events.
        self.assertLess(size_before_stop, 20000)
        from hoopgw.store.verify import verify_store

        self.assertIsNone(verify_store(gateway.store_path).problem)

    @defer.inlineCallbacks
    def test_slow_client_closed(self):
        """
        A client sending its startup packet a byte at a time is closed by
        the startup timeout with 57014 while a normal session works.
        """
        gateway = FloodGateway(self, startup_timeout=1.0, allow_plaintext_password=True)

        def slow():
            connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
            received = b""
            try:
                for byte in wire.startup_message({"user": "ci-bot", "database": "payments"}):
                    connection.sendall(bytes([byte]))
                    time.sleep(0.2)
            except OSError:
                pass
            while True:
                piece = connection.recv(4096)
                if not piece:
                    return received
                received += piece

        slowly = in_thread(slow)
        out, err, code = yield psql(gateway.dsn(sslmode="disable"), "-A", "-t", "-c", "SELECT 7", password=token())
        self.assertEqual((out.strip(), code), ("7", 0), err)
        received = yield slowly
        fields = wire.parse_fields(_answers(received)[1][-1][1])
        self.assertEqual((fields["severity"], fields["code"]), ("FATAL", "57014"))
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "postgres:startup-timeout")

    @defer.inlineCallbacks
    def test_malformed_message_in_session_end(self):
        """
        A logged-in client that sends a malformed message is closed with
        08P01, and its session's end in the record says why.
        """
        gateway = FloodGateway(self, allow_plaintext_password=True)
        bearer = token()

        def run():
            client = RawClient(gateway.port, password=bearer)
            try:
                client.startup()
                client.send(wire.message(b"B", b"\x00\x00\xff\xff"))
                return client.until(b"E")
            finally:
                client.close()

        messages = yield in_thread(run)
        self.assertEqual(wire.parse_fields(messages[-1][1])["code"], "08P01")
        (end,) = yield gateway.wait_for("session.end")
        self.assertIn("protocol violation: a 'B' message from the client is malformed", end["reason"])


class UnserialisableTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_file_store_refuses_and_goes_on(self):
        """
        An event JSON cannot carry fails its append with a sentence (no
        exception escapes append), takes no place in the chain, and the
        next event is written and verifies.
        """
        from hoopgw.store.file import FileStore
        from hoopgw.store.verify import verify_store

        path = os.path.abspath(self.mktemp())
        store = FileStore(path, reactor)
        store.open()
        failed = store.append({"type": "command", "text": object()})
        error = yield self.assertFailure(failed, events.UnserialisableEvent)
        self.assertIn("a command event cannot be written as JSON", str(error))
        written = yield store.append({"type": "command", "text": b"\xff".decode("utf-8", "surrogateescape")})
        self.assertEqual((written["seq"], written["escaped"]), (1, ["text"]))
        yield store.close()
        report = verify_store(path)
        self.assertIsNone(report.problem, report)

    @defer.inlineCallbacks
    def test_record_addon_fails_command_closed(self):
        """
        When the store cannot take a command's event, the record addon's
        hook fails (the chain then refuses the command) and logs a sentence.
        """
        from twisted.logger import globalLogPublisher

        from hoopgw.addons.record import Record
        from hoopgw.model import Command
        from hoopgw.testing import FakeContext, FakeGateway

        class Refusing:
            def append(self, event, urgent=True):
                raise events.UnserialisableEvent("a command event cannot be written as JSON: test")

        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        record = Record({"result_rows": 0, "result_bytes": 0}, FakeContext(gateway=FakeGateway(store=Refusing())))
        session = _refused_session()
        command = Command(kind="sql", text="SELECT 1", redacted="SELECT 1", facts={})
        command.decision = Decision.allow()
        yield self.assertFailure(record.command_received(session, command), events.UnserialisableEvent)
        errors = [event for event in logged if event.get("log_level") is not None and event["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertNotIn("log_failure", errors[0])


class LimitOptionTests(unittest.SynchronousTestCase):
    def parse(self, **options):
        from hoopgw.postgres.settings import parse_connection

        raw = {
            "target": {"host": "db", "database": "payments", "user": "app", "tls": "disable"},
            "allow_plaintext_password": True,
        }
        raw.update(options)
        return parse_connection(raw, "connections.payments", "tcp:5432:interface=127.0.0.1")

    def test_defaults(self):
        """
        Without options, the limits before login are PostgreSQL-like.
        """
        settings = self.parse()
        self.assertEqual(
            (settings.startup_timeout, settings.max_unauthenticated, settings.max_unauthenticated_per_source, settings.max_startup_bytes),
            (60.0, 100, 10, 10000),
        )

    def test_refused(self):
        """
        A limit out of range is refused naming the key.
        """
        from hoopgw.options import ConfigError

        for options, key in (
            ({"startup_timeout": 0}, "connections.payments.startup_timeout"),
            ({"max_startup_bytes": 20000}, "connections.payments.max_startup_bytes"),
            ({"max_unauthenticated": 0}, "connections.payments.max_unauthenticated"),
        ):
            error = self.assertRaises(ConfigError, self.parse, **options)
            self.assertIn(key, str(error))
        self.assertEqual(self.parse(startup_timeout="5s").startup_timeout, 5.0)


class TLSRefusalTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_failed_handshake_recorded(self):
        """
        A client that answers the gateway's "S" with something other than a
        TLS handshake is disconnected and the attempt recorded, with the
        negotiation it made.
        """
        gateway = FloodGateway(self)

        def run():
            connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=20)
            try:
                connection.sendall(SSL)
                answer = connection.recv(1)
                connection.sendall(b"GET / HTTP/1.1\r\nHost: gateway\r\n\r\n")
                while connection.recv(4096):
                    pass
                return answer
            finally:
                connection.close()

        answer = yield in_thread(run)
        self.assertEqual(answer, b"S")
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "postgres:tls")
        self.assertIn("TLS with the client failed", refused["refusal"]["reason"])
        self.assertEqual((refused["attributes"]["negotiated"], refused["attributes"]["tls"]), (["SSL"], False))
