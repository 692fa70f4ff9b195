"""
What a custom addon's result hook is told of each column, as the README's
addon guide describes it: C{kind_of}, C{decoder_of} and C{removed}, with
the front end's defaults and then through a real gateway and PostgreSQL,
text and binary results.
"""

import os
import textwrap

from twisted.internet import defer
from twisted.trial import unittest

from hoopgw.model import NUMBER, TEXT, ResultChunk
from tests import support
from tests.support import GatewayHarness, in_thread, psql, token

# A custom addon, as an author would write it from the README: a word, and
# numbers holding some digits, are taken out of every value that holds
# them, whatever form the value has.
ADDON = textwrap.dedent(
    '''
    from hoopgw import AddonFactory, Option
    from hoopgw.model import NUMBER, OPAQUE, TEXT


    class TakeOut:
        name = "take_out"
        options = (
            Option("word", lambda value, path: value, "secret", "the word to take out"),
            Option("digits", lambda value, path: value, "4242", "digits that take a number out"),
        )

        def __init__(self, options, context):
            self.word = options["word"].encode()
            self.digits = options["digits"]
            self.text_digits = self.digits.encode()

        def result_received(self, session, command, chunk):
            if chunk.kind != "rows":
                return
            rows = chunk.rows
            for row in rows:
                for index, value in enumerate(row):
                    if value is None:
                        continue
                    kind = chunk.kind_of(index)
                    if kind == TEXT and (self.word in value or self.text_digits in value):
                        row[index] = chunk.removed(index)
                    elif kind == NUMBER and self.digits in chunk.decoder_of(index)(value):
                        row[index] = chunk.removed(index)
                    elif kind == OPAQUE and chunk.decoder_of(index) is not None:
                        held = chunk.decoder_of(index)(value)
                        if isinstance(held, tuple) and self.word in held[0]:
                            text, encode = held
                            row[index] = encode(text.replace(self.word, b"X" * len(self.word)))
            chunk.rows = rows


    factory = AddonFactory(TakeOut)
    '''
)


class DefaultsTests(unittest.SynchronousTestCase):
    """
    A column the front end said nothing of is text, and removable as text.
    """

    def test_no_entries(self):
        """
        With no kinds, decoders or replaceable entries, C{kind_of} is
        C{TEXT}, C{decoder_of} None and C{removed} C{b"***"}.
        """
        chunk = ResultChunk("rows", columns=["a", "b"], rows=[[b"1", b"2"]])
        self.assertEqual([chunk.kind_of(0), chunk.kind_of(1)], [TEXT, TEXT])
        self.assertIsNone(chunk.decoder_of(1))
        self.assertEqual(chunk.removed(1), b"***")

    def test_short_entries(self):
        """
        Entries shorter than the row: the columns past them are text.
        """
        chunk = ResultChunk("rows", columns=["a", "b"], kinds=(NUMBER,), decoders=(bytes.decode,), replaceable=(False,))
        self.assertEqual((chunk.kind_of(0), chunk.kind_of(1)), (NUMBER, TEXT))
        self.assertEqual(chunk.decoder_of(0)(b"12"), "12")
        self.assertEqual((chunk.removed(0), chunk.removed(1)), (None, b"***"))


class ThroughTheGatewayTests(unittest.TestCase):
    """
    The addon above, loaded by path, between real clients and PostgreSQL.
    """

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "take_out.py")
        with open(path, "w") as handle:
            handle.write(ADDON)
        self.gateway = GatewayHarness(self, addons=["identity", {"path": path}, "record"])
        self.token = token()

    @defer.inlineCallbacks
    def test_text_results(self):
        """
        psql (text results): a character column's value becomes C{***}; an
        integer's, text on the wire but not a character column, becomes
        NULL; a bytea's hex is read as the bytes it encodes and rewritten
        at the same length.
        """
        out, err, code = yield psql(
            self.gateway.dsn(),
            "-F", "|", "-c",
            "SELECT 'a secret'::text, 'secret'::varchar(10), 4242::int, 17::int, 'the secret'::bytea, 'plain'::text",
            password=self.token,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out.strip(), "***|***||17|\\x74686520585858585858|plain")

    @defer.inlineCallbacks
    def test_binary_results(self):
        """
        psycopg 3 with binary results: text still text; a bigint and a
        numeric are numbers, read through their decoder and removed as
        NULL; other numbers pass.
        """
        import psycopg

        def run():
            with psycopg.connect(self.gateway.dsn(password=self.token)) as connection:
                cursor = connection.cursor(binary=True)
                cursor.execute("SELECT 'a secret'::text, 99424299::bigint, 1.4242::numeric, 17::bigint, 'plain'::text")
                return cursor.fetchone()

        self.assertEqual((yield in_thread(run)), ("***", None, None, 17, "plain"))

    @defer.inlineCallbacks
    def test_recorded_as_sent(self):
        """
        The record's result sample is what the client got, after the addon.
        """
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT 'a secret'::text AS t", password=self.token)
        self.assertEqual(code, 0, err)
        ended = yield self.gateway.wait_for("command.end")
        self.assertEqual(ended[-1]["results"]["rows"], [["***"]])


def setUpModule():
    support.cluster()
