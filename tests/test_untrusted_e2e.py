"""
Regressions found by scripts/e2e-untrusted, the end-to-end run of hostile
clients and a hostile target against a gateway configured from the README:
each test keeps one of its findings fixed.
"""

import struct

from twisted.trial import unittest

from hoopgw.postgres import wire
from hoopgw.postgres.startup import CLOSED, STARTUP
from tests.test_postgres_startup import _answers, _frontend


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
