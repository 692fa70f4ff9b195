"""
A large CopyData from the target is handed to result hooks in parts, never
joined whole (hoopgw.postgres.replies): masking stays as strong as on a
message read at once.  A card number across the boundary of two parts is
masked wherever the boundary falls, in text and column-masked CSV COPY;
binary COPY output is never passed on.
"""

import collections

from twisted.trial import unittest

from hoopgw import masking, testing
from hoopgw.addons import mask
from hoopgw.postgres import replies, wire
from hoopgw.postgres.frontend import Pending

PAN = b"4111111111111111"
MASKED = b"411111******1111"
SPACED = b"4111 1111 1111 1111"
SPACED_MASKED = b"4111 11** **** 1111"
READ = 65536


class Transport:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)

    def writeSequence(self, pieces):
        self.written.extend(pieces)


class Valve:
    def pause(self, reason):
        pass

    def resume(self, reason):
        pass


class Settings:
    max_message_bytes = 64 << 20


class Recorder:
    """
    An addon after mask that keeps the size of every copy chunk it sees.
    """

    name = "recorder"

    def __init__(self):
        self.sizes = []

    def result_received(self, session, command, chunk):
        if chunk.kind == "stream" and not chunk.final:
            self.sizes.append(len(chunk.data))


class Frontend:
    """
    What the reply relay needs of a client connection, with a real chain.
    """

    def __init__(self, harness):
        self.chain = harness.chain
        self.session = harness.session
        self.settings = Settings()
        self._expected = collections.deque()
        self._portals = {}
        self._statements = {}
        self._result_hooks = True
        self.transport = Transport()
        self.upstream_valve = Valve()
        self.fatal = None

    def _fatal(self, sqlstate, text, code=None):
        self.fatal = (sqlstate, text)


def copy_out(format_code=0):
    return wire.message(b"H", bytes((format_code,)) + b"\x00\x00")


def reads(data, size=READ):
    return [data[offset : offset + size] for offset in range(0, len(data), size)]


def messages(written):
    """
    The messages the client got, as C{(kind, payload)}.
    """
    data = b"".join(written)
    found = []
    position = 0
    while position < len(data):
        length = wire.unpack_int32(data, position + 1)
        found.append((data[position : position + 1], data[position + 5 : position + 1 + length]))
        position += 1 + length
    return found


class LargeCopyMaskingTests(unittest.SynchronousTestCase):
    """
    One CopyData of more than a part, read 64 KiB at a time, through the
    mask addon.
    """

    def relay(self, data, format_code=0, verdict=None):
        recorder = Recorder()
        harness = testing.ChainHarness([(mask.factory, {}), recorder])
        command = testing.sql_command("COPY cards TO STDOUT")
        if verdict is not None:
            command.metadata["mask.verdict"] = verdict
        frontend = Frontend(harness)
        frontend._expected.append(Pending("query", [command]))
        relay = replies.TargetReplies(frontend, lambda: frontend.fatal is not None)
        relay.data_received(copy_out(format_code))
        for piece in reads(wire.message(b"d", data)):
            relay.data_received(piece)
        relay.data_received(wire.message(b"c"))
        return frontend, recorder

    def copied(self, frontend):
        found = messages(frontend.transport.written)
        self.assertEqual([kind for kind, _ in found][0], b"H")
        self.assertEqual([kind for kind, _ in found][-1], b"c")
        return b"".join(payload for kind, payload in found if kind == b"d")

    def test_card_number_across_parts(self):
        """
        A card number (plain, and in groups) whose digits straddle the end
        of the first part, at every offset from wholly before it to wholly
        after it, reaches the client masked, and every other byte exact;
        the hooks saw the message as several parts, the first ending where
        the test says (the reads that make 1 MiB, less the message's
        header: 17 reads).
        """
        boundary = 17 * READ - 5
        for number, masked in ((PAN, MASKED), (SPACED, SPACED_MASKED)):
            for start in range(boundary - len(number) - 1, boundary + 2):
                data = bytearray(b"row\n" * (8 * READ))
                data[start - 1 : start + len(number) + 1] = b" " + number + b"\n"
                data = bytes(data)
                frontend, recorder = self.relay(data)
                self.assertIsNone(frontend.fatal)
                self.assertEqual(self.copied(frontend), data.replace(number, masked), (number, start))
                self.assertGreaterEqual(len(recorder.sizes), 2)
                # The mask addon holds a possible card number back, so the
                # first part's output ends at the boundary or before it.
                self.assertLessEqual(recorder.sizes[0], boundary)
                self.assertGreaterEqual(recorder.sizes[0], boundary - len(number) - 1)

    def test_many_card_numbers_one_message(self):
        """
        A card number every few kilobytes of a 3 MiB message: all masked,
        none in clear, wherever the reads and parts cut them.
        """
        line = b"x" * 4000 + b" " + PAN + b"\n"
        data = line * (3 * (1 << 20) // len(line))
        frontend, _ = self.relay(data)
        copied = self.copied(frontend)
        self.assertNotIn(PAN, copied)
        self.assertEqual(copied.count(MASKED), data.count(PAN))
        self.assertEqual(len(copied), len(data))

    def test_csv_columns_across_parts(self):
        """
        A COPY TO in CSV whose columns the analysis knows (card number,
        CVV) is masked column by column across parts: a row that straddles
        the boundary, a quoted field holding a newline included, is
        masked as a whole row is.
        """
        verdict = Verdict({0: "pan", 1: "sad"}, {"format": "csv"})
        boundary = 17 * READ - 5
        row = b'4000000000000002,123,"a\nb"\n'
        # Rows of no card data (an empty CVV stays empty): masked, they
        # keep their length.
        filler = b"x" * 1000 + b",,y\n"
        for start in range(boundary - len(row) + 1, boundary + 1, 2):
            data = filler * ((start - 2000) // len(filler))
            data += b"x,," + b"y" * (start - len(data) - 4) + b"\n"
            self.assertEqual(len(data), start)
            data += row + b"4111111111111111,321,z\n" * 10
            frontend, recorder = self.relay(data, verdict=verdict)
            self.assertIsNone(frontend.fatal)
            # The first part ended inside the row (or just before it),
            # which the masker held back whole.
            self.assertEqual(recorder.sizes[0], start)
            copied = self.copied(frontend)
            for clear in (b"4000000000000002", b"4111111111111111", b"5555555555554444", b",123,", b",321,"):
                self.assertNotIn(clear, copied, start)
            self.assertIn(b'400000******0002,***,"a\nb"\n', copied)

    def test_binary_copy_withheld(self):
        """
        Binary COPY output cannot be checked: a large one holding a card
        number ends the session and none of it reaches the client.
        """
        data = b"PGCOPY\n\xff\r\n\x00" + b"\x00" * (2 * (1 << 20)) + PAN
        frontend, _ = self.relay(data, format_code=1)
        self.assertEqual(frontend.fatal[0], "XX000")
        self.assertIn("binary copy stream cannot be checked", frontend.fatal[1])
        self.assertNotIn(PAN, b"".join(frontend.transport.written))
        self.assertEqual([kind for kind, _ in messages(frontend.transport.written)], [b"H"])


class WaitingHookTests(unittest.SynchronousTestCase):
    """
    A hook that answers a part of a large CopyData with a Deferred holds
    the rest of the message, and what follows it, until it fires.
    """

    def test_parts_in_order(self):
        """
        The second part waits on the hook: the client has the first part
        only; once the hook is done, the second, the rest and CopyDone
        follow in order, the bytes exact.
        """
        from twisted.internet import defer

        waiting = defer.Deferred()

        class Slow:
            name = "slow"
            seen = 0

            def result_received(self, session, command, chunk):
                if chunk.kind == "stream" and not chunk.final:
                    self.seen += 1
                    if self.seen == 2:
                        return waiting
                return None

        harness = testing.ChainHarness([Slow()])
        frontend = Frontend(harness)
        frontend._expected.append(Pending("query", [testing.sql_command("COPY cards TO STDOUT")]))
        relay = replies.TargetReplies(frontend, lambda: frontend.fatal is not None)
        relay.data_received(copy_out())
        data = bytes(range(256)) * (3 * (1 << 12))
        for piece in reads(wire.message(b"d", data)):
            relay.data_received(piece)
        relay.data_received(wire.message(b"c"))
        before = messages(frontend.transport.written)
        self.assertEqual([kind for kind, _ in before], [b"H", b"d"])
        self.assertEqual(before[1][1], data[: len(before[1][1])])
        waiting.callback(None)
        after = messages(frontend.transport.written)
        self.assertEqual([kind for kind, _ in after], [b"H"] + [b"d"] * (len(after) - 2) + [b"c"])
        self.assertGreaterEqual(len(after), 4)
        self.assertEqual(b"".join(payload for kind, payload in after if kind == b"d"), data)


class Verdict:
    """
    What the column analysis says of a COPY TO (the parts of
    L{hoopgw.columnpolicy} the mask addon reads).
    """

    def __init__(self, positions, copy):
        self.positions = positions
        self.copy = copy

    def result_positions(self, count):
        return self.positions


class CopyColumnMaskerPiecesTests(unittest.SynchronousTestCase):
    """
    The column masker reads each piece once and gives the same rows
    however the stream is cut.
    """

    def test_every_cut(self):
        """
        A CSV stream cut into two pieces at every offset, and into pieces of
        one byte, is masked exactly as when it arrives whole.
        """
        stream = b'h1,h2\n4000000000000002,"x,\n""y"""\n5555555555554444,plain\n'

        def run(pieces):
            masker = masking.CopyColumnMasker(masking.Masker(), {0: "pan"}, csv=True, header=True)
            out = [masker.feed(piece)[0] for piece in pieces]
            out.append(masker.feed(b"", final=True)[0])
            return b"".join(out)

        whole = run([stream])
        self.assertIn(b'400000******0002,"x,\n""y"""\n', whole)
        self.assertIn(b"555555******4444,plain\n", whole)
        for cut in range(len(stream) + 1):
            self.assertEqual(run([stream[:cut], stream[cut:]]), whole, cut)
        self.assertEqual(run([stream[index : index + 1] for index in range(len(stream))]), whole)

    def test_long_row_bounded(self):
        """
        A row that never ends is refused once it passes the bound, however
        small its pieces.
        """
        masker = masking.CopyColumnMasker(masking.Masker(), {0: "pan"})
        masker.MAX_ROW = 1000
        for _ in range(9):
            self.assertEqual(masker.feed(b"x" * 100), (b"", 0))
        self.assertEqual(masker.held, b"x" * 900)
        self.assertRaises(masking.MaskingError, masker.feed, b"x" * 101)
