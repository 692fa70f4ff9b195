"""
A target is as untrusted as a client: a hostile PostgreSQL target
(L{tests.hostile_target}) answers the gateway with malformed messages, card
numbers in its texts, a login that never ends or one that breaks SCRAM's
order, and the gateway ends the session with a clear error, an event, and
nothing of the bad message passed on.  Also PostgreSQL's own answer to a
Bind whose format codes do not match its values, against the real server.
"""

import socket
import struct
import threading

from twisted.internet import defer
from twisted.trial import unittest

from hoopgw.postgres import auth, wire
from hoopgw.postgres.frontend import DENIAL_SQL
from tests import support
from tests.hostile_target import (
    MASKED_PAN,
    command_complete,
    PAN,
    HostileTargetFactory,
    authentication,
    data_row,
    listen,
    raw_data_row,
    result,
    row_description,
    trust_login,
)
from tests.support import GatewayHarness, in_thread, token
from tests.test_postgres_protocol import RawClient, bind, execute, parse, sync


def read_all(client):
    """
    Every message the gateway sends until it closes the connection.
    """
    messages = []
    while True:
        try:
            messages.append(client.read())
        except EOFError:
            return messages


def fatal(messages):
    """
    The fields of the last message, which must be a FATAL error.
    """
    kind, payload = messages[-1]
    assert kind == b"E", messages[-1]
    fields = wire.parse_fields(payload)
    assert fields["severity"] == "FATAL", fields
    return fields


class HostileTargetCase(unittest.TestCase):
    """
    A gateway whose target is a L{HostileTargetFactory}.
    """

    addons = ("identity", "mask", "record")
    target_settings = {}

    def start(self, factory, **target):
        port = listen(self, factory)
        settings = {"host": "127.0.0.1", "port": port, "tls": "disable", "ca": None, "password": None}
        settings.update(self.target_settings)
        settings.update(target)
        self.factory = factory
        self.gateway = GatewayHarness(
            self, addons=list(self.addons), target=settings, allow_plaintext_password=True
        )
        return self.gateway

    def client(self):
        client = RawClient(self.gateway.port, password=token())
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def query_until_closed(self, reply, sql="SELECT x"):
        """
        Log in, send C{sql}, which the target answers with C{reply}, and
        read until the gateway closes the connection.

        @return: C{(every byte received after login, the messages)}.
        """
        self.factory.replies[sql] = reply

        def run():
            client = self.client()
            client.startup()
            client.send(wire.query(sql))
            messages = read_all(client)
            return messages

        messages = yield in_thread(run)
        return messages

    @defer.inlineCallbacks
    def assertRefused(self, reply, sentence):
        """
        The target's C{reply} ends the session: the client's last message
        is FATAL C{sentence}, nothing it received holds the card number,
        the record's session.end gives the reason, the statement ends
        interrupted, and the record holds no card number either.
        """
        messages = yield self.query_until_closed(reply)
        fields = fatal(messages)
        self.assertEqual((fields["code"], fields["message"]), ("08P01", sentence + "; the session is closed"))
        received = b"".join(kind + payload for kind, payload in messages)
        self.assertNotIn(PAN.encode(), received)
        (ended,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(ended["reason"], sentence)
        (finished,) = self.gateway.events("command.end")
        self.assertEqual(finished["outcome"]["status"], "interrupted")
        self.assertNotIn(PAN.encode(), self.gateway.raw_store())
        return messages


class MalformedRepliesTests(HostileTargetCase):
    """
    Each malformed message the issue reproduced ends the session; nothing
    of it reaches the client.
    """

    def setUp(self):
        self.start(HostileTargetFactory())

    def test_bytes_after_fields(self):
        """
        A DataRow holding one field "x" and then 16 more digits inside the
        message (44 00 00 00 1b 00 01 00 00 00 01 78 + PAN) is malformed.
        """
        row = bytes.fromhex("440000001b0001000000017" "8") + PAN.encode()
        return self.assertRefused(row_description("x") + row, "the target sent a malformed DataRow")

    def test_huge_negative_length(self):
        """
        A field length of -2147483647 is not NULL: the row is malformed.
        """
        row = raw_data_row(1, struct.pack("!i", -2147483647) + PAN.encode())
        return self.assertRefused(row_description("x") + row, "the target sent a malformed DataRow")

    def test_length_minus_two(self):
        """
        A field length of -2 is malformed.
        """
        row = raw_data_row(1, struct.pack("!i", -2) + PAN.encode())
        return self.assertRefused(row_description("x") + row, "the target sent a malformed DataRow")

    def test_length_past_the_message(self):
        """
        A field longer than what is left of its message is malformed.
        """
        row = raw_data_row(1, struct.pack("!i", 100) + PAN.encode())
        return self.assertRefused(row_description("x") + row, "the target sent a malformed DataRow")

    def test_more_fields_than_described(self):
        """
        A row with more fields than its RowDescription is refused.
        """
        row = data_row("1", PAN)
        return self.assertRefused(
            row_description("x") + row, "the target sent a DataRow with more or fewer fields than its RowDescription"
        )

    def test_one_bad_row_among_many(self):
        """
        In a run of rows long enough to be checked with vectorised
        operations, one bad row (the last) refuses the whole run: the
        valid rows before it, which hold card numbers, are not sent either.
        """
        rows = data_row(PAN) * 400 + raw_data_row(1, struct.pack("!i", 17) + PAN.encode())
        return self.assertRefused(row_description("x") + rows, "the target sent a malformed DataRow")

    def test_unknown_type(self):
        """
        A message of a type the protocol does not have ("?") is refused by
        its type byte, never its contents.
        """
        return self.assertRefused(
            wire.message(b"?", PAN.encode()) + result(data_row("1")), "the target sent a message of unknown type 0x3f"
        )

    def test_type_zero(self):
        """
        A message of type 0x00 is refused too.
        """
        return self.assertRefused(
            wire.message(b"\x00", PAN.encode()) + result(data_row("1")), "the target sent a message of unknown type 0x00"
        )

    def test_row_outside_a_result(self):
        """
        A DataRow with no RowDescription before it (in the simple query
        protocol) is out of place.
        """
        return self.assertRefused(data_row(PAN) + result(data_row("1")), "the target sent a DataRow outside a result")

    def test_copy_data_outside_copy(self):
        """
        CopyData when no COPY TO runs is out of place.
        """
        return self.assertRefused(
            wire.message(b"d", PAN.encode()) + result(data_row("1")), "the target sent a CopyData outside a COPY TO"
        )

    def test_malformed_copy_out_response(self):
        """
        A CopyOutResponse whose column count does not match its formats is
        malformed.
        """
        return self.assertRefused(
            wire.message(b"H", b"\x00\x00\x02\x00\x00"), "the target sent a malformed CopyOutResponse"
        )

    def test_malformed_function_result(self):
        """
        A FunctionCallResponse whose value's length is not what follows it
        is malformed.
        """
        return self.assertRefused(
            wire.message(b"V", struct.pack("!i", 3) + PAN.encode()), "the target sent a malformed FunctionCallResponse"
        )

    def test_malformed_notification(self):
        """
        A NotificationResponse with bytes after its payload is malformed.
        """
        body = wire.int32(7) + wire.cstring("channel") + wire.cstring("x") + PAN.encode()
        return self.assertRefused(wire.message(b"A", body), "the target sent a malformed NotificationResponse")

    def test_malformed_error(self):
        """
        An ErrorResponse whose last field has no terminator is malformed.
        """
        return self.assertRefused(wire.message(b"E", b"M" + PAN.encode()), "the target sent a malformed ErrorResponse")

    def test_authentication_after_login(self):
        """
        An authentication request after login has no place.
        """
        return self.assertRefused(authentication(3), "the target sent an Authentication after login")


class WithoutMaskTests(MalformedRepliesTests):
    """
    The same checks when no addon looks at results (rows pass straight
    through): malformed messages are refused all the same.
    """

    addons = ("identity", "record")


class TargetTextTests(HostileTargetCase):
    """
    What the target says in words is masked like rows.
    """

    def setUp(self):
        self.start(HostileTargetFactory())

    @defer.inlineCallbacks
    def test_texts_masked(self):
        """
        A notice, a ParameterStatus and a notification carrying a card
        number, then a well-formed row holding one: the client sees each
        masked and the session goes on.
        """
        reply = (
            wire.notice_response("card %s seen" % (PAN,))
            + wire.parameter_status("application_name", PAN)
            + wire.notification(7, "payments", "paid with %s" % (PAN,))
            + result(data_row(PAN), columns=("card",))
        )
        self.factory.replies["SELECT card"] = reply

        def run():
            client = self.client()
            client.startup()
            first = client.query("SELECT card")
            return first, client.query("SELECT 1")

        first, second = yield in_thread(run)
        received = b"".join(kind + payload for kind, payload in first)
        self.assertNotIn(PAN.encode(), received)
        self.assertEqual(received.count(MASKED_PAN.encode()), 4)
        self.assertEqual([kind for kind, _ in first], [b"N", b"S", b"A", b"T", b"D", b"C", b"Z"])
        self.assertEqual(second[-1], (b"Z", b"I"))


class LoginStatusTests(HostileTargetCase):
    """
    The target's ParameterStatus messages during login are passed on as
    the gateway's own, masked.
    """

    def setUp(self):
        login = trust_login().replace(
            wire.parameter_status("application_name", "hoopgw"), wire.parameter_status("application_name", PAN)
        )
        self.start(HostileTargetFactory(login=login))

    @defer.inlineCallbacks
    def test_login_status_masked(self):
        """
        A card number in a setting's value at login reaches the client
        masked, and the session goes on.
        """

        def run():
            client = self.client()
            return client.startup(), client.query("SELECT 1")

        login, after = yield in_thread(run)
        statuses = dict(
            tuple(value.decode() for value in payload.rstrip(b"\x00").split(b"\x00")) for kind, payload in login if kind == b"S"
        )
        self.assertEqual(statuses["application_name"], MASKED_PAN)
        self.assertEqual(after[-1], (b"Z", b"I"))


class CancelToGoneTargetTests(HostileTargetCase):
    @defer.inlineCallbacks
    def test_target_not_listening(self):
        """
        A client's CancelRequest the gateway cannot pass on (the target no
        longer listens) is recorded, and the failure to reach the target is
        a warning line in the gateway's log, not an unhandled error; the
        session goes on.
        """
        import gc

        from twisted.internet import reactor, task
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        self.start(HostileTargetFactory(default=b""))
        client = self.client()
        login = yield in_thread(client.startup)
        (key,) = [payload for kind, payload in login if kind == b"K"]
        yield in_thread(client.send, wire.query("SELECT slow"))
        for _ in range(200):
            if (b"Q", b"SELECT slow\x00") in self.factory.received:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield self.factory.listening.stopListening()

        def cancel():
            with socket.create_connection(("127.0.0.1", self.gateway.port), timeout=20) as canceller:
                canceller.sendall(wire.cancel_request(*struct.unpack("!II", key)))

        with capturedLogs() as logged:
            yield in_thread(cancel)
            (cancelled,) = yield self.gateway.wait_for("command.cancel")
            (command,) = self.gateway.events("command")
            self.assertEqual((cancelled["command"], command["text"]), (command["command"], "SELECT slow"))
            for _ in range(100):
                warnings = [formatEvent(event) for event in logged
                            if event["log_level"] == LogLevel.warn and "cancel request on to its target" in formatEvent(event)]
                if warnings:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("Connection refused", warnings[0])
        gc.collect()
        # The session is still there: the target's answer reaches the client.
        self.factory.connections[0].transport.write(result(data_row("1")))
        answer = yield in_thread(client.until, b"Z")
        self.assertEqual([kind for kind, _ in answer], [b"T", b"D", b"C", b"Z"])


class TargetLoginTests(HostileTargetCase):
    """
    The gateway's login to a hostile target is bounded and checked.
    """

    @defer.inlineCallbacks
    def refused_login(self, login=None, factory=None, **target):
        """
        Start a gateway in front of a target that logs in with C{login}
        (or as C{factory} does), and connect a client.

        @return: the client's FATAL error fields and the session.end event.
        """
        self.start(factory or HostileTargetFactory(login=login), **target)

        def run():
            client = self.client()
            client.send(wire.startup_message({"user": "ci-bot", "database": "payments"}))
            client.read()
            client.send(wire.password_message(wire.cstring(client.password)))
            return read_all(client)

        messages = yield in_thread(run)
        (ended,) = yield self.gateway.wait_for("session.end")
        return fatal(messages), ended

    @defer.inlineCallbacks
    def test_login_error_masked(self):
        """
        The target's FATAL during login quoting a card number reaches the
        client and the record's session.end masked.
        """
        refusal = wire.error_response("28000", "no pg_hba.conf entry for %s" % (PAN,), severity="FATAL")
        fields, ended = yield self.refused_login(refusal)
        self.assertIn("no pg_hba.conf entry for " + MASKED_PAN, fields["message"])
        self.assertEqual(fields["code"], "28000")
        self.assertIn(MASKED_PAN, ended["reason"])
        self.assertNotIn(PAN.encode(), self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_silent_target(self):
        """
        A target that accepts the connection and never answers the startup
        packet is given up after connect_timeout: the client gets a clear
        error and the record the reason.
        """
        fields, ended = yield self.refused_login(None, connect_timeout="1s")
        expected = "the target did not complete the gateway's login within 1 seconds (connect_timeout)"
        self.assertEqual(fields["message"], "hoopgw could not open the target session: " + expected)
        self.assertEqual(ended["reason"], "target unavailable: " + expected)

    @defer.inlineCallbacks
    def test_sasl_continue_first(self):
        """
        SASLContinue before SASL started is refused with a sentence (no
        AttributeError).
        """
        fields, ended = yield self.refused_login(authentication(11, b"r=x,s=c2FsdA==,i=4096"))
        self.assertIn("the target sent SASLContinue out of order", fields["message"])
        self.assertIn("SASLContinue out of order", ended["reason"])

    @defer.inlineCallbacks
    def test_sasl_final_first(self):
        """
        SASLFinal before SASL started is refused with a sentence.
        """
        fields, _ = yield self.refused_login(authentication(12, b"v=AAAA"))
        self.assertIn("the target sent SASLFinal out of order", fields["message"])

    @defer.inlineCallbacks
    def test_ok_without_scram_proof(self):
        """
        AuthenticationOk in the middle of SCRAM (the target never proved it
        knows the password) is refused.
        """
        factory = scram_target(4096, then=authentication(0))
        fields, _ = yield self.refused_login(factory=factory, password={"file": support.password_file()})
        self.assertIn("without proving it knows the password", fields["message"])

    @defer.inlineCallbacks
    def test_iterations_capped(self):
        """
        A target asking for more SCRAM iterations than max_scram_iterations
        is refused before any is computed.
        """
        factory = scram_target(2**31 - 1)
        fields, ended = yield self.refused_login(factory=factory, password={"file": support.password_file()})
        self.assertIn(
            "the target asks for 2147483647 SCRAM iterations, more than the gateway computes "
            "(max_scram_iterations: 100000)",
            fields["message"],
        )
        self.assertEqual(fields["code"], "28000")
        self.assertIn("max_scram_iterations", ended["reason"])

    @defer.inlineCallbacks
    def test_proof_computed_in_a_thread(self):
        """
        The SCRAM proof (PBKDF2) is computed off the reactor's thread, then
        sent to the target.
        """
        threads_seen = []
        original = auth.ScramClient.final_message

        def recording(client, *args):
            threads_seen.append(threading.current_thread())
            return original(client, *args)

        self.patch(auth.ScramClient, "final_message", recording)
        refusal = wire.error_response("28P01", "password authentication failed for user \"app\"", severity="FATAL")
        factory = scram_target(4096, then=refusal)
        fields, _ = yield self.refused_login(factory=factory, password={"file": support.password_file()})
        self.assertIn("password authentication failed", fields["message"])
        self.assertEqual(len(threads_seen), 1)
        self.assertIsNot(threads_seen[0], threading.main_thread())
        proofs = [payload for kind, payload in self.factory.received if kind == b"p" and b"p=" in payload]
        self.assertEqual(len(proofs), 1)


def scram_target(iterations, then=b""):
    """
    A target that starts SCRAM-SHA-256 asking for C{iterations}, and
    answers the client's proof with C{then}.
    """
    factory = HostileTargetFactory(login=authentication(10, b"SCRAM-SHA-256\x00\x00"))

    def answer(target, kind, payload):
        if kind != b"p":
            return
        if b"n,," in payload:
            nonce = payload.split(b"r=", 1)[1]
            target.transport.write(authentication(11, b"r=" + nonce + b"server,s=c2FsdHNhbHQ=,i=%d" % (iterations,)))
        else:
            target.transport.write(then)

    factory.answer = answer
    return factory


class RealTargetTests(unittest.TestCase):
    """
    Against the real PostgreSQL: a Bind whose format-code count does not
    match its values; copy data larger than a read, both ways.
    """

    def setUp(self):
        self.gateway = GatewayHarness(self, allow_plaintext_password=True)

    @defer.inlineCallbacks
    def test_error_then_skip_to_sync(self):
        """
        As PostgreSQL does: ERROR 08P01 "bind message has 2 parameter
        formats but 1 parameters", the messages up to Sync skipped, then
        ReadyForQuery, and the session goes on.
        """

        def run():
            client = RawClient(self.gateway.port, password=token())
            self.addCleanup(client.close)
            client.startup()
            body = wire.cstring("") + wire.cstring("") + struct.pack("!HHH", 2, 0, 0) + struct.pack("!H", 1)
            body += struct.pack("!i", 1) + b"1" + struct.pack("!H", 0)
            client.send(parse("", "SELECT $1::int") + wire.message(b"B", body) + execute("") + sync())
            answered = client.until(b"Z")
            return answered, client.query("SELECT 41 + 1")

        answered, after = yield in_thread(run)
        kinds = [kind for kind, _ in answered]
        self.assertEqual(kinds, [b"1", b"E", b"Z"])
        fields = wire.parse_fields(answered[1][1])
        self.assertEqual(
            (fields["severity"], fields["code"], fields["message"]),
            ("ERROR", "08P01", "bind message has 2 parameter formats but 1 parameters"),
        )
        self.assertEqual(answered[-1], (b"Z", b"I"))
        self.assertIn((b"D", struct.pack("!HI", 1, 2) + b"42"), after)
        self.assertEqual(self.gateway.events("session.end"), [])


    def test_large_copy_data_both_ways(self):
        """
        One CopyData message of 3 MiB from the client (COPY FROM STDIN) and
        one from the target (COPY TO STDOUT) are relayed exact, though each
        arrives in many reads; the client's is passed on as it was read,
        the target's handed to the hooks (mask, record) in parts of about
        1 MiB, each sent on as a CopyData of its own: the client gets the
        same bytes in the same order.
        """
        return self.large_copy(self.gateway)

    def test_large_copy_data_without_hooks(self):
        """
        With no addon looking at results, the target's large CopyData is
        passed on as it was read too.
        """
        return self.large_copy(GatewayHarness(self, addons=["identity"], allow_plaintext_password=True))

    @defer.inlineCallbacks
    def test_large_copy_data_masked(self):
        """
        A row of 3 MiB holding a card number every 100 KiB, copied out of
        the real server through the mask addon: its one CopyData reaches
        the hooks in parts, and the client gets every byte but the card
        numbers' middle digits, none of them in clear, in order.
        """
        gateway = GatewayHarness(self, addons=["identity", "mask", "record"], allow_plaintext_password=True)
        chunk = b"x" * (100 * 1024 - 17) + b" " + PAN.encode()
        value = chunk * 30
        _, copied, _ = yield in_thread(copy_round_trip, self, gateway, value)
        data = [payload for kind, payload in copied if kind == b"d"]
        self.assertGreaterEqual(len(data), 3)
        self.assertEqual(b"".join(data), value.replace(PAN.encode(), MASKED_PAN.encode()) + b"\n")

    @defer.inlineCallbacks
    def large_copy(self, gateway):
        value = (b"0123456789abcdef" * (3 * 65536))[: 3 * 1024 * 1024 - 1]
        splits = []
        original = wire.split_pieces

        def split_pieces(pieces, size):
            splits.append(size)
            return original(pieces, size)

        self.patch(wire, "split_pieces", split_pieces)
        loaded, copied, length = yield in_thread(copy_round_trip, self, gateway, value)
        self.assertIn((b"C", b"COPY 1\x00"), loaded)
        data = [payload for kind, payload in copied if kind == b"d"]
        self.assertEqual(b"".join(data), value + b"\n")
        if gateway is self.gateway:
            self.assertGreaterEqual(len(data), 3)
        else:
            self.assertEqual(len(data), 1)
        self.assertIn((b"D", struct.pack("!HI", 1, 7) + str(len(value)).encode()), length)
        # Both messages took the path that never joins them.
        self.assertEqual(splits, [len(value) + 6, len(value) + 6])


def copy_round_trip(test, gateway, value):
    """
    Through C{gateway}, load C{value} as one row with one CopyData (COPY
    FROM STDIN), copy it out again (COPY TO STDOUT) and ask its length.

    @return: the messages answering each: C{(loaded, copied, length)}.
    """
    client = RawClient(gateway.port, password=token())
    test.addCleanup(client.close)
    client.startup()
    client.query("DROP TABLE IF EXISTS large_copy; CREATE TABLE large_copy (value text)")
    client.send(wire.query("COPY large_copy FROM STDIN"))
    client.until(b"G")
    client.send(wire.message(b"d", value + b"\n") + wire.message(b"c"))
    loaded = client.until(b"Z")
    copied = client.query("COPY large_copy TO STDOUT")
    length = client.query("SELECT length(value) FROM large_copy")
    client.query("DROP TABLE large_copy")
    return loaded, copied, length


class ExtendedTargetFactory(HostileTargetFactory):
    """
    A hostile target that also answers the extended protocol's Parse,
    Bind and Sync as PostgreSQL does.
    """

    def answer(self, target, kind, payload):
        if kind == b"P":
            target.transport.write(wire.message(b"1"))
        elif kind == b"B":
            target.transport.write(wire.message(b"2"))
        elif kind == b"S":
            target.transport.write(wire.ready_for_query(b"I"))
        else:
            HostileTargetFactory.answer(self, target, kind, payload)


class DenialStandInTests(HostileTargetCase):
    """
    A denied statement is replaced on the target by one that must fail
    (L{DENIAL_SQL}), whose error the gateway replaces by the denial.  A
    target that lies, answering it with rows or a CommandComplete, gets
    nothing of its answer to the client, and the client gets the denial.
    """

    addons = ("identity", "block", "mask", "record")

    def lie(self, answer):
        self.start(ExtendedTargetFactory(replies={DENIAL_SQL: answer}))

    def assertDenied(self, messages):
        self.assertEqual([kind for kind, _ in messages], [b"E", b"Z"])
        fields = wire.parse_fields(messages[0][1])
        self.assertEqual(fields["severity"], "ERROR")
        self.assertTrue(fields["message"].startswith("hoopgw denied this statement: "), fields)
        self.assertNotIn(PAN.encode(), b"".join(payload for _, payload in messages))

    @defer.inlineCallbacks
    def check(self, answer):
        """
        A statement the block addon denies (it does not parse), by the
        simple and the extended protocol; then an allowed one, answered
        as usual.
        """
        self.lie(answer)

        def run():
            client = self.client()
            client.startup()
            simple = client.query("SELECT 1 'x")
            client.send(parse("", "SELECT 2 'x") + bind("", "") + execute("") + sync())
            extended = client.until(b"Z")
            return simple, extended, client.query("SELECT x")

        simple, extended, after = yield in_thread(run)
        self.assertDenied(simple)
        # The target parsed and bound the statement; its Execute was denied.
        self.assertEqual([kind for kind, _ in extended[:2]], [b"1", b"2"])
        self.assertDenied(extended[2:])
        self.assertEqual([kind for kind, _ in after], [b"T", b"D", b"C", b"Z"])
        yield self.gateway.wait_for("command.end", 3)
        self.assertNotIn(PAN.encode(), self.gateway.raw_store())
        self.assertEqual(self.gateway.events("session.end"), [])

    def test_rows_instead_of_error(self):
        """
        Rows holding a card number, CommandComplete and ReadyForQuery in
        answer to the stand-in: the client sees only the denial.
        """
        return self.check(result(data_row(PAN), columns=("hoopgw_statement_denied",)))

    def test_command_complete_instead_of_error(self):
        """
        Only CommandComplete and ReadyForQuery: the client still gets the
        denial.
        """
        return self.check(command_complete("SELECT 0") + wire.ready_for_query(b"I"))

    def test_error_then_rows(self):
        """
        The error, then rows anyway: rows outside any result end the
        session, none of them passed on.
        """
        return self.closed(
            wire.error_response("22012", "division by zero") + data_row(PAN) + wire.ready_for_query(b"I"),
            "the target sent a DataRow outside a result",
        )

    def test_copy_instead_of_error(self):
        """
        A COPY in answer to the stand-in ends the session: the client gets
        a FATAL error and nothing of the copy.
        """
        return self.closed(
            wire.message(b"H", b"\x00\x00\x00") + wire.message(b"d", PAN.encode() + b"\n"),
            "the target sent a CopyOutResponse in answer to a statement the gateway denied",
        )

    @defer.inlineCallbacks
    def closed(self, answer, sentence):
        self.lie(answer)

        def run():
            client = self.client()
            client.startup()
            client.send(wire.query("SELECT 1 'x"))
            return read_all(client)

        messages = yield in_thread(run)
        fields = fatal(messages)
        self.assertEqual(fields["message"], sentence + "; the session is closed")
        self.assertNotIn(PAN.encode(), b"".join(payload for _, payload in messages))
        (ended,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(ended["reason"], sentence)
        self.assertNotIn(PAN.encode(), self.gateway.raw_store())


class StoreFailureTextTests(unittest.SynchronousTestCase):
    """
    Store failures shown to clients do not say where the audit database is.
    """

    def test_without_address(self):
        """
        libpq's reasons (PostgreSQL 15 and older wordings) lose their host
        names, addresses, socket paths and ports; the rest stays readable.
        """
        from hoopgw.store.postgres import without_address

        cases = {
            'connection to server at "audit-db.internal" (10.1.2.3), port 5433 failed: Connection refused\n'
            "\tIs the server running on that host and accepting TCP/IP connections?":
            "connection to server at [withheld] failed: Connection refused\n"
            "\tIs the server running on that host and accepting TCP/IP connections?",
            'could not connect to server: Connection refused\n\tIs the server running on host "10.1.2.3" and '
            "accepting\n\tTCP/IP connections on port 5432?":
            "could not connect to server: Connection refused\n\tIs the server running on host [withheld] and "
            "accepting\n\tTCP/IP connections?",
            'connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: No such file or directory':
            "connection to server on socket [withheld] failed: No such file or directory",
            "server closed the connection unexpectedly (10.1.2.3:5432)":
            "server closed the connection unexpectedly ([withheld])",
        }
        for reason, shown in cases.items():
            self.assertEqual(without_address(reason), shown)

    def test_unreachable_error(self):
        """
        The error an unreachable store answers appends with is the one a
        refused client reads: it carries the reason without the address.
        """
        from hoopgw.store.postgres import PostgresStore

        store = PostgresStore.__new__(PostgresStore)
        store.outage = {"reason": 'connection to server at "10.9.8.7", port 6543 failed: timeout expired'}
        text = str(store._unreachable())
        self.assertNotIn("10.9.8.7", text)
        self.assertNotIn("6543", text)
        self.assertIn("the PostgreSQL store is unreachable (connection to server at [withheld] failed: timeout expired)", text)
