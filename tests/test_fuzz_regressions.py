"""
What scripts/fuzz-postgres found, each kept fixed by a test, and a short
run of the fuzzer itself so CI exercises it.
"""

import os
import struct
import sys

from twisted.internet import defer, utils
from twisted.trial import unittest

from hoopgw import cards, sqlfacts, sqlpolicy
from hoopgw.sql import split_statements
from hoopgw.postgres import backend, wire
from tests.hostile_target import MASKED_PAN, PAN, HostileTargetFactory, data_row, result
from tests.support import in_thread
from tests.test_postgres_target import HostileTargetCase, fatal, read_all

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UnknownFieldTests(HostileTargetCase):
    """
    An ErrorResponse or NoticeResponse field of a type PostgreSQL does not
    define (a target may send any byte as a field code).
    """

    def setUp(self):
        self.start(HostileTargetFactory())

    @defer.inlineCallbacks
    def test_unknown_field_left_out(self):
        """
        A notice with a field coded '0' holding a card number reaches the
        client without that field (it used to raise KeyError in the relay
        and leave the session hanging), its known fields masked, and the
        session goes on.
        """
        notice = wire.message(
            b"N", b"SNOTICE\x00C00000\x00Mcard " + PAN.encode() + b"\x000" + PAN.encode() + b"\x00\xe9x\x00\x00"
        )
        self.factory.replies["SELECT card"] = notice + wire.ready_for_query(b"I")

        def run():
            client = self.client()
            client.startup()
            first = client.query("SELECT card")
            return first, client.query("SELECT 1")

        first, second = yield in_thread(run)
        self.assertEqual([kind for kind, _ in first], [b"N", b"Z"])
        fields = wire.parse_fields(first[0][1])
        self.assertEqual(fields, {"severity": "NOTICE", "code": "00000", "message": "card " + MASKED_PAN})
        self.assertEqual(second[-1], (b"Z", b"I"))
        self.assertNotIn(PAN.encode(), self.gateway.raw_store())


class PlainFieldTests(HostileTargetCase):
    """
    The fields PostgreSQL fills with its own words (severity, code,
    routine...) are the target's words all the same.
    """

    def setUp(self):
        self.start(HostileTargetFactory())

    @defer.inlineCallbacks
    def test_code_field_masked(self):
        """
        A notice whose code field ran into its message (the NUL between
        them flipped) carries a card number in the code: the client gets
        it masked (the code field used to be passed as it was).
        """
        notice = wire.message(b"N", b"SNOTICE\x00C00000\x10Mcard " + PAN.encode() + b"\x00Rr" + PAN.encode() + b"\x00\x00")
        self.factory.replies["SELECT card"] = notice + wire.ready_for_query(b"I")

        def run():
            client = self.client()
            client.startup()
            return client.query("SELECT card")

        messages = yield in_thread(run)
        self.assertEqual([kind for kind, _ in messages], [b"N", b"Z"])
        fields = wire.parse_fields(messages[0][1])
        self.assertEqual((fields["code"], fields["routine"]), ("00000\x10Mcard " + MASKED_PAN, "r" + MASKED_PAN))


class ShortLengthTests(HostileTargetCase):
    """
    A message whose length field is under 4, after login.
    """

    def setUp(self):
        self.start(HostileTargetFactory())

    @defer.inlineCallbacks
    def test_length_under_four(self):
        """
        The client gets FATAL 08P01 saying the length field is short (the
        sentence used to call a 0-byte message larger than the gateway
        accepts, with 54000), and the record's session.end says the same.
        """

        def run():
            client = self.client()
            client.startup()
            client.send(b"Q\x00\x00\x00\x02")
            return read_all(client)

        messages = yield in_thread(run)
        fields = fatal(messages)
        sentence = "a message's length field says 2 bytes, less than its own 4"
        self.assertEqual((fields["code"], fields["message"]), ("08P01", sentence))
        (ended,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(ended["reason"], "protocol violation: " + sentence)


class ParseErrorTextTests(HostileTargetCase):
    """
    The SQL parser's error quotes the statement; it is redacted like the
    statement.
    """

    addons = ("identity", "block", "mask", "record")

    def test_classification_error_masked(self):
        """
        The error of a statement that does not parse near a card number
        holds the masked number only, and so does the error of a simple
        query that cannot be split into statements.
        """
        statements, error = split_statements("SELECT 1; SELECT $%s" % (PAN,))
        self.assertIn("parameter number too large", error)
        self.assertNotIn(PAN, error)
        error = sqlpolicy.classify("SELECT 1 '%s'" % (PAN,)).error
        self.assertIn("syntax error", error)
        self.assertNotIn(PAN, error)
        self.assertIn(MASKED_PAN, error)

    @defer.inlineCallbacks
    def test_unparseable_refusal_masked(self):
        """
        The block addon refuses a statement that does not parse; the card
        number it quotes is in neither the client's error nor the record
        (the denial's reason used to hold it in clear).
        """
        # A denied statement is replaced by one that fails on the target;
        # this one fails as PostgreSQL's does.
        division = wire.error_response("22012", "division by zero") + wire.ready_for_query(b"I")
        self.start(HostileTargetFactory(replies={"SELECT 1/0 AS hoopgw_statement_denied": division}))

        def run():
            client = self.client()
            client.startup()
            return client.query("SELECT 1 '%s'" % (PAN,)), client.query("SELECT 1; SELECT $%s" % (PAN,))

        one, two = yield in_thread(run)
        for messages in (one, two):
            self.assertEqual([kind for kind, _ in messages], [b"E", b"Z"])
            self.assertNotIn(PAN.encode(), b"".join(payload for _, payload in messages))
        yield self.gateway.wait_for("command.end", 2)
        store = self.gateway.raw_store()
        self.assertIn(b"block:unparseable", store)
        self.assertNotIn(PAN.encode(), store)


class ShortFuzzTests(unittest.TestCase):
    """
    scripts/fuzz-postgres, a few thousand messages with a fixed seed.
    """

    timeout = 240

    @defer.inlineCallbacks
    def test_short_run(self):
        """
        The fuzzer's short run against a real gateway, PostgreSQL and the
        fake target finds no crash, traceback, hang or card number (it
        exits 1 when it finds one), and it did send what it was asked to.
        """
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable,
            [os.path.join(ROOT, "scripts", "fuzz-postgres"), "--messages", "3000", "--seed", "7", "--duration", "120",
             "--batch", "50", "--connections", "4"],
            env=dict(os.environ, PYTHONPATH=ROOT),
            path=ROOT,
        )
        report = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, report + err.decode("utf-8", "replace")[-3000:])
        self.assertIn("gateway alive after the run: yes", report)
        self.assertIn("tracebacks in the gateway log: 0; 'Unhandled' lines: 0", report)
        self.assertIn("card numbers in the clients' bytes: 0", report)
        self.assertIn("card numbers in the record: 0", report)
        sent = int(report.split(" frontend messages")[0].split()[-1])
        self.assertGreaterEqual(sent, 3000)


class MaskAgainTests(unittest.SynchronousTestCase):
    """
    Masking hides digits; what they touched is looked at again.
    """

    def test_tail_left_standing_masked(self):
        """
        A card number run into a longer digit group is not one, until
        the stars of the card number before it leave it standing alone:
        the text masker (what the record's redaction uses) masks it then
        too.
        """
        text = "5555-5555-5555-44444111 1111 1111 1111"
        masked, count = cards.mask_text(text)
        self.assertEqual(masked, "5555-5555-55**-****4111 11** **** 1111")
        self.assertEqual(count, 1)
        self.assertEqual(cards.mask_text(masked), (masked, 0))


class TailLeftStandingToClientTests(HostileTargetCase):
    """
    The same in what reaches the client: rows in small and large batches,
    and text the target sends outside rows.
    """

    def setUp(self):
        self.start(HostileTargetFactory())

    @defer.inlineCallbacks
    def test_rows_masked_again(self):
        """
        A value holding a card number run into a longer digit group, then
        a card number: no card number stands in the client's bytes, in a
        one-row answer (plain byte scan) and in one of many rows (the
        vectorised scan).
        """
        text = "5555-5555-5555-44444111 1111 1111 1111"
        self.factory.replies["SELECT one"] = result(data_row(text))
        self.factory.replies["SELECT many"] = result(*[data_row("row %04d filler" % (i,)) for i in range(300)] + [data_row(text)])

        def run(sql):
            client = self.client()
            client.startup()
            return client.query(sql)

        for sql in ("SELECT one", "SELECT many"):
            messages = yield in_thread(run, sql)
            rows = [payload for kind, payload in messages if kind == b"D"]
            received = b"".join(rows).decode("latin-1")
            masked, count = cards.mask_text(received)
            self.assertEqual(count, 0, "%s: a card number reached the client: %r" % (sql, rows[-1]))
            self.assertIn("4111", received)


class ColumnNameTests(HostileTargetCase):
    """
    A column's name is a text like any other the target sends.
    """

    def setUp(self):
        self.start(HostileTargetFactory())

    @defer.inlineCallbacks
    def test_card_number_as_column_name(self):
        """
        A RowDescription naming a column with a card number (an alias
        such as C{AS x5105105105105100}) reaches the client masked, and
        the record's result columns hold it masked too (both used to hold
        it in clear).
        """
        self.factory.replies["SELECT card"] = result(data_row("1"), columns=("x" + PAN,))

        def run():
            client = self.client()
            client.startup()
            return client.query("SELECT card")

        messages = yield in_thread(run)
        self.assertEqual([kind for kind, _ in messages], [b"T", b"D", b"C", b"Z"])
        self.assertEqual(backend.row_description(messages[0][1])[0][0], "x" + MASKED_PAN)
        (ended,) = yield self.gateway.wait_for("command.end")
        self.assertEqual(ended["results"]["columns"], ["x" + MASKED_PAN])
        self.assertNotIn(PAN.encode(), self.gateway.raw_store())


class FunctionAnswerTests(HostileTargetCase):
    """
    A FunctionCall is answered by one FunctionCallResponse.
    """

    def setUp(self):
        factory = HostileTargetFactory()

        def answer(target, kind, payload):
            if kind == b"F":
                response = wire.message(b"V", struct.pack("!i", 1) + b"7")
                target.transport.write(response + response + wire.ready_for_query(b"I"))

        factory.answer = answer
        self.start(factory)

    @defer.inlineCallbacks
    def test_second_answer_refused(self):
        """
        A target answering one FunctionCall twice ends the session with
        FATAL 08P01 and a sentence (the second answer used to raise
        AttributeError in the relay: a traceback and no answer).
        """

        def run():
            client = self.client()
            client.startup()
            client.send(wire.message(b"F", struct.pack("!IHHih", 177, 0, 0, -1, 0)))
            return read_all(client)

        messages = yield in_thread(run)
        fields = fatal(messages)
        sentence = "the target sent a FunctionCallResponse that answers no FunctionCall"
        self.assertEqual((fields["code"], fields["message"]), ("08P01", sentence + "; the session is closed"))
        (ended,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(ended["reason"], sentence)


class RecordedFactsTests(unittest.SynchronousTestCase):
    """
    The facts of a statement, as the record holds them.
    """

    def test_card_number_in_table_name(self):
        """
        A table or function named with a card number in it is recorded
        with the number masked (the names used to be recorded as written).
        """
        facts = sqlfacts.recorded_facts(sqlfacts.classify('SELECT x%s() FROM "cards%s"' % (PAN, PAN)))
        self.assertEqual(facts["tables"], ["cards" + MASKED_PAN])
        self.assertEqual(facts["functions"], ["x" + MASKED_PAN])
