"""
Regressions found by scripts/e2e-untrusted, the end-to-end run of hostile
clients and a hostile target against a gateway configured from the README:
each test keeps one of its findings fixed.
"""

import ssl
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from hoopgw.memorytls import MemoryTLS, server_context
from hoopgw.postgres import wire
from testbed import pki
from hoopgw.postgres.startup import CLOSED, STARTUP
from tests.hostile_target import MASKED_PAN, PAN, HostileTargetFactory, listen, row_description
from tests.support import GatewayHarness, in_thread
from tests.test_postgres_startup import _answers, _frontend
from tests.test_postgres_target import HostileTargetCase, read_all


class ShortStartupPacketTests(unittest.SynchronousTestCase):
    def test_length_under_eight_refused_at_once(self):
        """
        A whole startup packet whose length word says 7 (all 7 bytes sent)
        is refused at once with FATAL 08P01 "invalid length of startup
        packet", as docs/limits-and-attempts.rst says, rather than left
        waiting for an eighth byte until the startup timeout.
        """
        frontend, transport, refusals, clock = _frontend()
        frontend.dataReceived(struct.pack("!I", 7) + b"\x00\x03\x00")
        _, messages = _answers(transport.value())
        fields = wire.parse_fields(messages[-1][1])
        self.assertEqual((fields["severity"], fields["code"]), ("FATAL", "08P01"))
        self.assertIn("invalid length of startup packet", fields["message"])
        self.assertEqual(frontend._state, CLOSED)
        (refused,) = refusals.refused
        self.assertEqual(refused.refusal.rule, "postgres:startup-length")

    def test_length_word_alone_decides(self):
        """
        The four bytes of the length word are enough to refuse a length
        under 8 or over max_startup_bytes; fewer than four wait for more.
        """
        for length in (0, 4, 7, 10001, 0xFFFFFFFF):
            frontend, transport, refusals, _ = _frontend()
            frontend.dataReceived(struct.pack("!I", length))
            self.assertEqual(frontend._state, CLOSED, length)
            self.assertEqual([session.refusal.rule for session in refusals.refused], ["postgres:startup-length"])
        frontend, transport, refusals, _ = _frontend()
        frontend.dataReceived(b"\x00\x00\x00")
        self.assertEqual((frontend._state, transport.value(), refusals.refused), (STARTUP, b"", []))

    def test_valid_packet_in_pieces_after_length_word(self):
        """
        Waiting for the length word first does not change how a valid
        packet sent in pieces is read: it is read once it is whole.
        """
        packet = wire.startup_message({"user": "ci-bot", "database": "payments"})
        frontend, transport, refusals, _ = _frontend()
        for piece in (packet[:4], packet[4:6], packet[6:]):
            frontend.dataReceived(piece)
        self.assertEqual(transport.value(), wire.authentication_cleartext_password())
        self.assertEqual(refusals.refused, [])



class OversizedTargetMessageTests(HostileTargetCase):
    """
    The target's messages over max_message_bytes, with and without an
    addon looking at results.
    """

    addons = ("identity", "mask", "record")

    def start(self, factory, **target):
        port = listen(self, factory)
        settings = {"host": "127.0.0.1", "port": port, "tls": "disable", "ca": None, "password": None}
        settings.update(target)
        self.factory = factory
        self.gateway = GatewayHarness(
            self, addons=list(self.addons), target=settings, allow_plaintext_password=True,
            max_message_bytes=1024 * 1024,
        )
        return self.gateway

    @defer.inlineCallbacks
    def test_oversized_data_row_ends_session_at_its_length(self):
        """
        A DataRow whose length word says 2 MiB, over max_message_bytes
        (1 MiB), ends the session as soon as its length is read
        (docs/postgres-untrusted-target.rst), though the rest of the
        message never comes: the client is not left waiting.
        """
        self.start(HostileTargetFactory())
        reply = row_description("x") + b"D" + struct.pack("!I", 2 * 1024 * 1024) + PAN.encode() * 100
        yield self.assertRefused(reply, "the target sent a malformed or oversized DataRow")


class OversizedTargetMessageCoreChainTests(OversizedTargetMessageTests):
    """
    The same with no addon looking at results.
    """

    addons = ("identity", "record")


class CloseNotifyTests(unittest.SynchronousTestCase):
    def pair(self):
        """
        A client and a server L{MemoryTLS} over StringTransports, their
        handshake done.
        """
        directory = self.mktemp()
        import os

        os.makedirs(directory)
        authority = pki.make_ca("close_notify CA")
        certificate, key = authority.issue("localhost", dns_names=["localhost"]).write(directory, "server")
        client_context = ssl.create_default_context(cafile=authority.write(directory, "ca")[0])
        client = MemoryTLS(StringTransport(), client_context, server_hostname="localhost")
        server = MemoryTLS(StringTransport(), server_context(certificate, key), server_side=True)
        client.start()
        for _ in range(4):
            for source, sink in ((client, server), (server, client)):
                data = source.transport.value()
                source.transport.clear()
                if data:
                    sink.receive(data)
        self.assertTrue(client.handshake_done and server.handshake_done)
        return client, server

    def test_close_notify_closes(self):
        """
        A peer's close_notify (a target ending its session after a FATAL)
        closes the connection at once, after handing on what came before
        it: a target that sends the alert but keeps TCP open (asyncio does,
        up to 30 s) no longer leaves the session and its client waiting.
        """
        client, server = self.pair()
        server.write(b"E-FATAL")
        server.loseConnection()
        self.assertEqual(client.receive(server.transport.value()), b"E-FATAL")
        self.assertTrue(client.transport.disconnecting)

    def test_data_alone_keeps_connection(self):
        """
        Records without the alert leave the connection open.
        """
        client, server = self.pair()
        server.write(b"hello")
        self.assertEqual(client.receive(server.transport.value()), b"hello")
        self.assertFalse(client.transport.disconnecting)


class TargetFatalTests(HostileTargetCase):
    """
    A target's FATAL after login: nothing may follow it.
    """

    addons = ("identity", "mask", "record")

    @defer.inlineCallbacks
    def test_fatal_then_close(self):
        """
        A FATAL (with a card number) then the target closing: the client
        gets the FATAL masked and nothing after it, and the record says the
        target ended the session, with its SQLSTATE and not its text.
        """
        factory = HostileTargetFactory()
        self.start(factory)
        fatal_reply = wire.error_response("57P01", "terminating " + PAN, severity="FATAL")

        def answer(target, kind, payload):
            if kind == b"Q":
                target.transport.write(fatal_reply)
                target.transport.loseConnection()

        factory.answer = answer
        messages = yield self.query_until_closed(b"")
        texts = [wire.parse_fields(payload)["message"] for kind, payload in messages if kind == b"E"]
        self.assertEqual(texts, ["terminating " + MASKED_PAN])
        (ended,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(ended["reason"], "the target ended the session: FATAL 57P01")
        self.assertNotIn(PAN.encode(), self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_fatal_then_silence(self):
        """
        A FATAL after which the target keeps the connection open (no
        PostgreSQL does; a hostile target may): the session ends with the
        FATAL, rather than leave the client waiting for a ReadyForQuery
        that cannot come, and the client reads nothing more.
        """
        factory = HostileTargetFactory()
        self.start(factory)
        factory.replies["SELECT x"] = wire.error_response("57P01", "terminating " + PAN, severity="FATAL")

        def run():
            client = self.client()
            client.startup()
            client.send(wire.query("SELECT x"))
            client.socket.settimeout(5)
            return read_all(client)

        messages = yield in_thread(run)
        self.assertEqual([kind for kind, _ in messages], [b"E"])
        self.assertEqual(wire.parse_fields(messages[0][1])["message"], "terminating " + MASKED_PAN)
        (ended,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(ended["reason"], "the target ended the session: FATAL 57P01")
        (finished,) = self.gateway.events("command.end")
        self.assertEqual(finished["outcome"]["status"], "error")


class PipelinedDecisionTests(HostileTargetCase):
    """
    A client that keeps the gateway's inbox full (pipelining without
    pause) still has its decided statements sent to the target.
    """

    @defer.inlineCallbacks
    def test_decided_statement_sent_while_more_wait(self):
        """
        Three queries in one write, each held by an addon until the test
        decides it: once the first is allowed, it reaches the target at
        once, while the second still waits for its decision.  (Before, what
        was decided went out only when the inbox was next empty: a client
        that never let it empty had nothing run at all, its statements
        piling up unsent in the gateway's memory, and, the gateway not
        writing to it, its leaving went unnoticed.)
        """
        import os

        from tests import untrusted_addons

        del untrusted_addons.HELD[:]
        self.addons = ("identity", {"path": os.path.abspath(untrusted_addons.__file__.replace(".pyc", ".py")),
                                    "name": "test-hold"}, "record")
        factory = HostileTargetFactory()
        self.start(factory)
        client = self.client()
        yield in_thread(client.startup)
        client.send(wire.query("SELECT 1") + wire.query("SELECT 2") + wire.query("SELECT 3"))
        for _ in range(200):
            if untrusted_addons.HELD:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        (text, first), = untrusted_addons.HELD
        self.assertEqual(text, "SELECT 1")
        untrusted_addons.allow(first)
        for _ in range(200):
            if [kind for kind, _ in factory.received if kind == b"Q"] and len(untrusted_addons.HELD) == 2:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        queries = [payload for kind, payload in factory.received if kind == b"Q"]
        self.assertEqual(queries, [b"SELECT 1\x00"])
        self.assertEqual([text for text, _ in untrusted_addons.HELD], ["SELECT 1", "SELECT 2"])
        for _, decision in untrusted_addons.HELD[1:]:
            if not decision.called:
                untrusted_addons.allow(decision)
        for _ in range(200):
            if len(untrusted_addons.HELD) == 3:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        untrusted_addons.allow(untrusted_addons.HELD[2][1])

    @defer.inlineCallbacks
    def test_client_leaves_while_command_waits(self):
        """
        A client that leaves while its recorded statement waits for a
        decision (an approval, the record's write-ahead) leaves a
        command.end (interrupted) for it, before the session's end: no
        command in the record is left without its end.
        """
        import os

        from tests import untrusted_addons

        del untrusted_addons.HELD[:]
        # record before the holding addon: the command event is written, then the decision waits.
        self.addons = ("identity", "record", {"path": os.path.abspath(untrusted_addons.__file__.replace(".pyc", ".py")),
                                              "name": "test-hold"})
        self.start(HostileTargetFactory())
        client = self.client()
        yield in_thread(client.startup)
        client.send(wire.query("SELECT 1"))
        for _ in range(200):
            if untrusted_addons.HELD:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(untrusted_addons.HELD), 1)
        client.close()
        (ended,) = yield self.gateway.wait_for("session.end")
        (recorded,) = self.gateway.events("command")
        finished = [event for event in self.gateway.events("command.end") if event["command"] == recorded["command"]]
        self.assertEqual([event["outcome"]["status"] for event in finished], ["interrupted"])
        self.assertLess(finished[0]["seq"], ended["seq"])
