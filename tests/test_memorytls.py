"""
hoopgw.memorytls: sending at once without losing Twisted's order and
buffering.
"""

import hashlib
import os

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest

from hoopgw.memorytls import send_now


class _Collect(protocol.Protocol):
    def __init__(self, expected):
        self.expected = expected
        self.received = []
        self.size = 0
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.received.append(data)
        self.size += len(data)
        if self.size >= self.expected and not self.done.called:
            self.done.callback(b"".join(self.received))


class SendNowTests(unittest.TestCase):
    @defer.inlineCallbacks
    def connected_pair(self, expected):
        server_side = defer.Deferred()

        class Accept(protocol.Protocol):
            def connectionMade(self):
                server_side.callback(self)

        port = yield endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Accept)
        )
        self.addCleanup(port.stopListening)
        collector = _Collect(expected)
        client = yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), collector
        )
        self.addCleanup(client.transport.loseConnection)
        sender = yield server_side
        self.addCleanup(sender.transport.loseConnection)
        return sender.transport, client.transport, collector

    @defer.inlineCallbacks
    def test_small_write_sent_at_once(self):
        """
        With nothing buffered, the bytes go to the socket in the call:
        Twisted's buffer stays empty.
        """
        transport, _, collector = yield self.connected_pair(5)
        send_now(transport, b"hello")
        self.assertEqual((transport._tempDataLen, transport.dataBuffer), (0, b""))
        self.assertEqual((yield collector.done), b"hello")

    @defer.inlineCallbacks
    def test_order_kept_when_the_socket_is_full(self):
        """
        A reader that does not read fills the socket: what it does not
        take is buffered by Twisted, later writes queue behind it, and
        everything arrives once, in order.
        """
        chunks = [os.urandom(256 * 1024) for _ in range(40)]
        total = b"".join(chunks)
        transport, client, collector = yield self.connected_pair(len(total))
        client.pauseProducing()
        for chunk in chunks:
            send_now(transport, chunk)
        self.assertGreater(transport._tempDataLen + len(transport.dataBuffer), 0)
        client.resumeProducing()
        received = yield collector.done
        self.assertEqual(len(received), len(total))
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(total).digest())

    def test_other_transports_written_to(self):
        """
        A transport without TCP's buffers (here a plain recorder) is simply
        written to.
        """
        written = []

        class Recorder:
            connected = True
            disconnecting = False

            def write(self, data):
                written.append(data)

        send_now(Recorder(), b"abc")
        self.assertEqual(written, [b"abc"])
