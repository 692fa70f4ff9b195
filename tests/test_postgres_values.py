"""
What result hooks are told of PostgreSQL's values (hoopgw.postgres.values):
each column's kind (text, number, opaque) from its type and format, worked
out once per result description; what an error's detail quotes; and the
masking engine and the mask addon reading neither type OIDs nor formats.
"""

import ast
import os
import struct

from twisted.trial import unittest

from hoopgw import testing
from hoopgw.model import NUMBER, OPAQUE, TEXT
from hoopgw.postgres import replies, values, wire
from hoopgw.postgres.frontend import Pending
from tests.test_postgres_large_copy import Frontend, messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class KindsTests(unittest.SynchronousTestCase):
    """
    A column's type and format decide its kind.
    """

    def test_table(self):
        """
        Text format is text but for bytea (opaque: hex to be decoded);
        binary text types are text, binary int8, float8 and numeric are
        numbers, everything else binary is opaque.  Only character string
        columns (and values of no known type) take a text replacement.
        """
        cases = [
            ((25, 0), TEXT, True),
            ((23, 0), TEXT, False),
            ((3802, 0), TEXT, False),
            ((17, 0), OPAQUE, False),
            ((25, 1), TEXT, True),
            ((1043, 1), TEXT, True),
            ((3802, 1), TEXT, False),
            ((17, 1), OPAQUE, False),
            ((20, 1), NUMBER, False),
            ((701, 1), NUMBER, False),
            ((1700, 1), NUMBER, False),
            ((23, 1), OPAQUE, False),
            ((1009, 1), OPAQUE, False),
            ((0, 1), OPAQUE, True),
        ]
        for (type_oid, format_code), kind, replaceable in cases:
            found, decoder, free = values.column(type_oid, format_code)
            self.assertEqual((found, free), (kind, replaceable), (type_oid, format_code))
            self.assertEqual(decoder is None, kind == TEXT, (type_oid, format_code))

    def test_number_decoders(self):
        """
        A number's decoder gives its digits as text.
        """
        self.assertEqual(values.column(20, 1)[1](struct.pack("!q", -4111111111111111)), "4111111111111111")
        self.assertEqual(values.column(701, 1)[1](struct.pack("!d", 12.5)), "")
        numeric = struct.pack("!hhHh", 2, 0, 0, 2) + struct.pack("!2H", 12, 3400)
        self.assertEqual(values.column(1700, 1)[1](numeric), "12.3400")
        self.assertRaises(ValueError, values.column(20, 1)[1], b"\x00")

    def test_quotes(self):
        """
        A failing-row detail quotes a whole row; a key detail, its
        columns' values; any other detail nothing.
        """
        self.assertEqual(
            values.quotes({"detail": "Failing row contains (1, 123)."}),
            {"detail": (None, "Failing row contains (values withheld by hoopgw).")},
        )
        self.assertEqual(
            values.quotes({"detail": 'Key (pan, "Cvv")=(4111, 123) already exists.'}),
            {"detail": (("pan", "Cvv"), 'Key (pan, "Cvv")=(withheld by hoopgw) already exists.')},
        )
        self.assertIsNone(values.quotes({"detail": "nothing quoted"}))
        self.assertIsNone(values.quotes({"message": "no detail"}))


class Recorder:
    name = "recorder"

    def __init__(self):
        self.kinds = []

    def result_received(self, session, command, chunk):
        if chunk.kind == "rows":
            self.kinds.append(chunk.kinds)


class DescribedOnceTests(unittest.SynchronousTestCase):
    """
    The relay works a result's kinds out once per RowDescription, not for
    every batch of rows.
    """

    def test_once_per_description(self):
        """
        A result of a text, an int8 and a bytea column arriving in many
        reads reaches the hooks as many batches, each told the same kinds,
        worked out once; the same statement's next result (the same
        description) reuses them; a result of other columns has its own.
        """
        calls = []
        original = values.describe

        def describe(type_oids, formats):
            calls.append((tuple(type_oids), tuple(formats)))
            return original(type_oids, formats)

        self.patch(values, "describe", describe)
        recorder = Recorder()
        harness = testing.ChainHarness([recorder])
        frontend = Frontend(harness)
        relay = replies.TargetReplies(frontend, lambda: frontend.fatal is not None)

        def result(oids):
            description = struct.pack("!H", 3) + b"".join(
                wire.cstring(name) + struct.pack("!IhIhih", 0, 0, oid, -1, -1, 0) for name, oid in zip("abc", oids)
            )
            return (
                wire.message(b"T", description)
                + b"".join(wire.encode_data_rows([[b"x", b"1", b"\\x00"]]) for _ in range(50))
                + wire.message(b"C", wire.cstring("SELECT 50"))
                + wire.ready_for_query(b"I")
            )

        for oids in ((25, 20, 17), (25, 20, 17), (25, 25, 25)):
            frontend._expected.append(Pending("query", [testing.sql_command("SELECT a, b, c FROM t")]))
            data = result(oids)
            for offset in range(0, len(data), 97):
                relay.data_received(data[offset : offset + 97])
        self.assertIsNone(frontend.fatal)
        self.assertGreater(len(recorder.kinds), 20)
        self.assertEqual(set(recorder.kinds), {(TEXT, TEXT, OPAQUE), (TEXT, TEXT, TEXT)})
        self.assertEqual(calls, [((25, 20, 17), (0, 0, 0)), ((25, 25, 25), (0, 0, 0))])
        self.assertEqual(sum(1 for kind, _ in messages(frontend.transport.written) if kind == b"D"), 150)


class NoWireInMaskingTests(unittest.SynchronousTestCase):
    """
    The masking engine and the mask addon read kinds, never PostgreSQL's
    types or formats.
    """

    def test_no_oids_or_formats(self):
        """
        Neither masking.py nor addons/mask.py imports the PostgreSQL front
        end at module level or reads a chunk's formats or type OIDs, and a
        ResultChunk has no such attributes.
        """
        from hoopgw.model import ResultChunk

        self.assertFalse(hasattr(ResultChunk("rows"), "formats"))
        self.assertFalse(hasattr(ResultChunk("rows"), "type_oids"))
        for path in ("hoopgw/masking.py", "hoopgw/addons/mask.py"):
            with open(os.path.join(ROOT, path)) as handle:
                tree = ast.parse(handle.read())
            attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
            self.assertFalse(attributes & {"formats", "type_oids", "TEXT_TYPES", "BYTEA"}, path)
            for node in tree.body:
                if isinstance(node, ast.ImportFrom):
                    self.assertFalse((node.module or "").startswith("hoopgw.postgres"), path)
