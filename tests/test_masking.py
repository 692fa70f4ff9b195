"""
The masking engine without a network: card numbers in text, rows (in
place and value by value, text and binary), streams cut anywhere and
message fields; sensitive columns; and the mask addon in a chain.
"""

import json
import random
import struct

from twisted.trial import unittest

from hoopgw import cards, masking
from hoopgw.addons.mask import factory as mask_factory
from hoopgw.model import TEXT, ResultChunk
from hoopgw.postgres import values, wire
from hoopgw.testing import ChainHarness, FakeContext, build, exec_command, kubernetes_command, sql_command


VISA = "4111111111111111"
MASTERCARD_SPACED = "5500 0000 0000 0004"
AMEX_DASHED = "3782-822463-10005"


def random_pan(generator, length=16):
    digits = [generator.randint(0, 9) for _ in range(length - 1)]
    for check in range(10):
        candidate = "".join(map(str, digits + [check]))
        if cards.luhn_valid(candidate):
            return candidate
    raise AssertionError("unreachable")


class CardsTests(unittest.TestCase):
    """
    What counts as a card number.
    """

    def test_formats(self):
        """
        PANs of 13 to 19 digits, together or with single spaces or dashes,
        show BIN and last four only; last4 shows the last four only.
        """
        self.assertEqual(cards.mask_text(VISA), ("411111******1111", 1))
        self.assertEqual(cards.mask_text(MASTERCARD_SPACED), ("5500 00** **** 0004", 1))
        self.assertEqual(cards.mask_text(AMEX_DASHED), ("3782-82****-*0005", 1))
        self.assertEqual(cards.mask_text(VISA, cards.LAST_FOUR), ("************1111", 1))

    def test_next_to_other_numbers(self):
        """
        A PAN written next to another number (an order number, a quantity)
        is still found: a run of digit groups is read group by group.
        """
        self.assertEqual(cards.mask_text("order 12 4111 1111 1111 1111")[0], "order 12 4111 11** **** 1111")
        self.assertEqual(cards.mask_text("1 4111111111111111 2")[0], "1 411111******1111 2")

    def test_not_cards(self):
        """
        Digit runs that fail Luhn, are too short or too long, or touch other
        digits are left alone.
        """
        for text in ("4111111111111112", "123456789012", "41111111111111111111", "x41111111111111112", "2024-01-01 12:00:00"):
            self.assertEqual(cards.mask_text(text), (text, 0), text)


class RowsTests(unittest.TestCase):
    """
    Rows: in place over the encoded batch, and value by value.
    """

    masker = masking.Masker()

    def test_in_place_matches_value_by_value(self):
        """
        Masking a batch of DataRows in place gives exactly what masking each
        value gives, however values and their framing bytes line up
        (lengths whose low bytes are digits, values starting with a PAN,
        empty strings, NULLs).
        """
        generator = random.Random(7)
        for _ in range(150):
            rows = []
            for _ in range(20):
                row = []
                for _ in range(3):
                    choice = generator.random()
                    if choice < 0.1:
                        row.append(None)
                        continue
                    if choice < 0.15:
                        row.append(b"")
                        continue
                    pan = random_pan(generator, generator.choice([13, 16, 19]))
                    separator = generator.choice(["", " ", "-"])
                    if separator:
                        pan = separator.join(pan[index : index + 4] for index in range(0, len(pan), 4))
                    pad = generator.choice([0, 30, 32, 40, 45, 250, 300, 12593 - len(pan)])
                    value = (pan + " " + "y" * pad) if generator.random() < 0.5 else ("x" * pad + " " + pan)
                    row.append(value.encode()[: generator.choice([len(value), 16, 45, 49, 57])])
                rows.append(row)
            data = wire.encode_data_rows(rows)
            expected = [[None if value is None else cards.mask_bytes(value)[0] for value in row] for row in rows]
            # Both ways of scanning a batch: plain byte searches (small
            # batches) and vectorised (large ones).
            plain = data.translate(masking._REGIONS)
            for masked, _ in (
                self.masker._rows_in_place_small(data, plain, wire.DataRowValues(data)),
                self.masker._rows_in_place_large(data, wire.DataRowValues(data)),
            ):
                self.assertEqual(wire.decode_data_rows(masked or data), expected)

    def binary(self, type_oid, value):
        """
        What the masker makes of a binary value of a PostgreSQL type, told
        as the front end tells it (L{values.column}).
        """
        kind, decoder, _ = values.column(type_oid, 1)
        return self.masker.value(value, kind, decoder)

    def rows(self, rows, formats, type_oids, replace=()):
        kinds, decoders, replaceable = values.describe(type_oids, formats)
        return self.masker.rows(rows, kinds, decoders, replaceable, replace)

    def test_binary_values(self):
        """
        Binary values: text types masked in place; an int8 or numeric that
        is a card number withheld; arrays and records of text masked inside;
        jsonb masked after its version byte; an unknown type that might hold
        a card number withheld.
        """
        binary = self.binary
        self.assertEqual(binary(25, VISA.encode()), (b"411111******1111", 1, 0))
        self.assertEqual(binary(20, struct.pack("!q", int(VISA))), (None, 0, 1))
        self.assertEqual(binary(20, struct.pack("!q", 42))[2], 0)
        numeric = struct.pack("!hhHh", 4, 3, 0, 0) + struct.pack("!4H", 4111, 1111, 1111, 1111)
        self.assertEqual(binary(1700, numeric), (None, 0, 1))
        self.assertEqual(binary(701, struct.pack("!d", float(VISA))), (None, 0, 1))
        element = VISA.encode()
        array = struct.pack("!iiIii", 1, 0, 25, 2, 1) + struct.pack("!i", len(element)) + element + struct.pack("!i", -1)
        value, count, withheld = binary(1009, array)
        self.assertEqual((count, withheld), (1, 0))
        self.assertIn(b"411111******1111", value)
        self.assertEqual(len(value), len(array))
        record = struct.pack("!i", 2) + struct.pack("!Ii", 23, 4) + struct.pack("!i", 7) + struct.pack("!Ii", 25, 16) + element
        value, count, _ = binary(16000, record)
        self.assertEqual(count, 1)
        self.assertNotIn(element, value)
        jsonb = b"\x01" + json.dumps({"pan": MASTERCARD_SPACED}).encode()
        self.assertIn(b"5500 00** **** 0004", binary(3802, jsonb)[0])
        self.assertEqual(binary(99999, b"\x00\x07" + element), (None, 0, 1))

    def test_binary_numbers_inside_arrays(self):
        """
        An int8 array whose element is a card number is withheld whole,
        though its bytes hold no digit a text scan would see; one of
        small numbers passes as it is.
        """
        def int8_array(*numbers):
            header = struct.pack("!iiIii", 1, 0, 20, len(numbers), 1)
            return header + b"".join(struct.pack("!iq", 8, number) for number in numbers)

        self.assertEqual(self.binary(1016, int8_array(7, int(VISA))), (None, 0, 1))
        small = int8_array(7, 42)
        self.assertEqual(self.binary(1016, small), (small, 0, 0))

    def test_bytea(self):
        """
        A bytea in text format is read as the bytes its hex encodes: a card
        number in them is masked and encoded again, even one whose hex
        holds no long run of digits (dashes encode as 2d); one in escape
        format is masked as text; bad hex is withheld.  In binary format
        its bytes are masked in place.
        """
        kind, decoder, replaceable = values.column(values.BYTEA, 0)
        self.assertFalse(replaceable)
        dashed = b"\\x" + b"4111-1111-1111-1111".hex().encode()
        value, count, withheld = self.masker.value(dashed, kind, decoder)
        self.assertEqual((value, count, withheld), (b"\\x" + b"4111-11**-****-1111".hex().encode(), 1, 0))
        self.assertEqual(self.masker.value(b"card " + element_text(), kind, decoder), (b"card 411111******1111", 1, 0))
        self.assertEqual(self.rows([[b"\\xzz"]], [0], [values.BYTEA]), (True, 0, 1))
        self.assertEqual(self.binary(values.BYTEA, b"x" + element_text()), (b"x411111******1111", 1, 0))

    def test_column_rules(self):
        """
        Values of sensitive columns are replaced whole (text with ***,
        other types with NULL) and counted.
        """
        rows = [[b"1", b"123", b"4111111111111111"], [b"2", None, b"none"]]
        changed, masked, withheld = self.rows(rows, [0, 0, 0], [23, 25, 25], replace={1})
        self.assertTrue(changed)
        self.assertEqual(rows, [[b"1", b"***", b"411111******1111"], [b"2", None, b"none"]])
        self.assertEqual((masked, withheld), (2, 0))
        rows = [[b"123", b"4"]]
        self.rows(rows, [0, 1], [23, 23], replace={0, 1})
        self.assertEqual(rows, [[None, None]])

    def test_failure_withholds(self):
        """
        A value the masker cannot read (a truncated binary numeric) is
        withheld, never passed through.
        """
        rows = [[b"\x00\x01"]]
        changed, masked, withheld = self.rows(rows, [1], [1700])
        self.assertEqual((changed, withheld, rows), (True, 1, [[None]]))


def element_text():
    return VISA.encode()


class StreamTests(unittest.TestCase):
    """
    Streams cut at any byte.
    """

    def test_cut_anywhere(self):
        """
        However a stream is cut into chunks, nothing a whole-stream masking
        hides is sent in clear, and no more than about one PAN's span is
        ever held back.
        """
        generator = random.Random(11)
        for _ in range(300):
            alphabet = generator.choice(["0123456789 -x", "0123456789  \n", "4111 -"])
            text = "".join(generator.choice(alphabet) for _ in range(generator.randint(10, 300)))
            for pan in (VISA, MASTERCARD_SPACED, AMEX_DASHED):
                position = generator.randint(0, len(text))
                text = text[:position] + pan + text[position:]
            whole = text.encode()
            # The stream reads each decided part once more after its stars
            # (what they leave standing alone), not the whole stream: it
            # hides at least what one reading of the whole stream hides.
            expected, _ = cards._mask_bytes_once(whole, cards.BIN_AND_LAST_FOUR)
            stream = masking.StreamMasker(masking.Masker())
            sent = b""
            position = 0
            while position < len(whole):
                size = generator.randint(1, 40)
                out, _ = stream.feed(whole[position : position + size])
                sent += out
                position += size
                self.assertLessEqual(len(stream.held), 2 * cards.MAX_SPAN)
            sent += stream.feed(b"", final=True)[0]
            self.assertEqual(len(sent), len(whole))
            for original, hidden, got in zip(whole, expected, sent):
                if hidden == 42:
                    self.assertEqual(got, 42, (whole, sent))

    def test_every_split(self):
        """
        Wherever a PAN is split, it is masked, and nothing else changes.
        """
        text = b"order 12345: card 4111-1111-1111-1111 exp 12/30\n"
        for cut in range(len(text)):
            stream = masking.StreamMasker()
            out = stream.feed(text[:cut])[0] + stream.feed(text[cut:])[0] + stream.feed(b"", final=True)[0]
            self.assertEqual(out, b"order 12345: card 4111-11**-****-1111 exp 12/30\n", cut)
            self.assertEqual(stream.masked, 1)

    def test_holds_only_what_may_continue(self):
        """
        Only trailing digit groups that could still grow into a PAN are
        held back: a run already too long for one is passed at once.
        """
        stream = masking.StreamMasker()
        self.assertEqual(stream.feed(b"total: 42"), (b"total: ", 0))
        self.assertEqual(stream.held, b"42")
        self.assertEqual(stream.feed(b"1" * 100), (b"42" + b"1" * 100, 0))
        self.assertEqual(stream.held, b"")
        self.assertEqual(stream.feed(b"4111 1111 "), (b"", 0))
        self.assertEqual(stream.feed(b"", final=True), (b"4111 1111 ", 0))

    def test_pan_split_in_two(self):
        """
        A PAN split between two chunks is masked, and counted once.
        """
        stream = masking.StreamMasker(masking.Masker())
        first, count1 = stream.feed(b"card 4111 1111 ")
        second, count2 = stream.feed(b"1111 1111 ok\n")
        self.assertEqual(first + second, b"card 4111 11** **** 1111 ok\n")
        self.assertEqual(count1 + count2, 1)


class FieldsTests(unittest.TestCase):
    """
    Error, notice and notification fields.
    """

    def test_fields(self):
        """
        Card numbers in any data-bearing field are masked; a failing-row
        detail and the key of a sensitive column are withheld; the
        server's own fields are untouched.
        """
        masker = masking.Masker()
        fields = {
            "severity": "ERROR",
            "code": "23505",
            "message": 'duplicate key value violates unique constraint "cards_pan_key"',
            "detail": "Key (pan)=(4111111111111111) already exists.",
            "where": "PL/pgSQL function f() line 3 at RAISE: 5500000000000004",
        }
        self.assertEqual(masker.fields(fields, values.quotes(fields)), 2)
        self.assertEqual(fields["detail"], "Key (pan)=(411111******1111) already exists.")
        self.assertNotIn("5500000000000004", fields["where"])
        self.assertEqual(fields["code"], "23505")
        row = {"detail": "Failing row contains (7, 123, secret)."}
        masker.fields(row, values.quotes(row))
        self.assertNotIn("123", row["detail"])
        key = {"detail": "Key (cvv)=(123) already exists."}
        masker.fields(key, values.quotes(key))
        self.assertEqual(key["detail"], "Key (cvv)=(withheld by hoopgw) already exists.")


class MaskAddonTests(unittest.TestCase):
    """
    The mask addon in a chain, as a front end drives it.
    """

    def harness(self, **options):
        return ChainHarness([(mask_factory, options)])

    def chunk(self, columns, rows):
        data = wire.encode_data_rows(rows)
        return ResultChunk(
            "rows",
            data=data,
            columns=columns,
            kinds=(TEXT,) * len(columns),
            decode=wire.decode_data_rows,
            locate=wire.DataRowValues(data),
        )

    def test_rows_and_aliases(self):
        """
        A PAN is masked in place and counted; a CVV column is replaced,
        also when the statement renames it.
        """
        harness = self.harness()
        command = sql_command("SELECT cvv AS x, pan FROM cards")
        harness.submit(command)
        chunk = harness.result(command, self.chunk(["x", "pan"], [[b"123", VISA.encode()]]))
        self.assertEqual(chunk.rows, [[b"***", b"411111******1111"]])
        self.assertEqual(chunk.masked, 2)

    def test_exempt(self):
        """
        An exempt group's results pass unmasked, and the command's outcome
        says how many card numbers left in clear.
        """
        harness = self.harness(exempt_groups=["payments-bots"])
        command = sql_command("SELECT pan FROM cards")
        harness.submit(command)
        chunk = harness.result(command, self.chunk(["pan"], [[VISA.encode()]]))
        self.assertEqual(chunk.rows, [[VISA.encode()]])
        self.assertEqual(command.outcome, {"unmasked": 1, "mask_exempt": "payments-bots"})

    def test_binary_copy_refused(self):
        """
        COPY ... TO STDOUT in binary format cannot be checked: refused
        before it runs.
        """
        decision = self.harness().submit(sql_command("COPY cards TO STDOUT (FORMAT binary)"))
        self.assertEqual((decision.verdict, decision.rule), ("deny", "mask:binary-copy"))

    def test_bad_option(self):
        """
        A column pattern that is not a regular expression is refused with
        its key path.
        """
        from hoopgw.options import ConfigError

        with self.assertRaises(ConfigError) as caught:
            build(mask_factory, {"columns": ["cvv("]}, FakeContext())
        self.assertIn("mask.columns[0]", str(caught.exception))


class JsonDocumentTests(unittest.TestCase):
    """
    Card numbers in JSON documents (Kubernetes bodies and watch events).
    """

    def test_stays_json(self):
        """
        Card numbers in strings are masked in place; one held in a JSON
        number becomes a masked string (a masked number would not parse);
        other numbers are untouched.
        """
        masker = masking.Masker()
        data = b'{"a":"card 4111 1111 1111 1111","n":4111111111111111,"f":[5500000000000004.0,12,4111111111111112]}'
        masked, count = masker.json_document(data)
        self.assertEqual(count, 3)
        self.assertEqual(
            json.loads(masked),
            {"a": "card 4111 11** **** 1111", "n": "411111******1111", "f": ["550000******0004", 12, 4111111111111112]},
        )
        self.assertEqual(masker.json_document(b'{"a":"no card"}'), (b'{"a":"no card"}', 0))
        self.assertEqual(masker.json_document(b"not json 4111111111111111"), (b"not json 411111******1111", 1))


class MaskAddonStreamTests(unittest.TestCase):
    """
    The mask addon on the chunks the SSH and Kubernetes front ends hand
    the chain: streams per name across chunks, JSON bodies.
    """

    def test_streams(self):
        """
        Each stream of a command is held back and released on its own: a
        card number split across stdout chunks is masked, stderr in between
        does not disturb it, and the final chunk releases what is held.
        """
        harness = ChainHarness([(mask_factory, {})])
        command = exec_command("cat cards")
        out = []
        for stream, data, final in [
            ("stdout", b"card 4111 1111", False),
            ("stderr", b"warning 55", False),
            ("stdout", b" 1111 1111 ok\ntotal 4111111111111111", False),
            ("stderr", b"00000000000004\n", False),
            ("stdout", b"", True),
            ("stderr", b"", True),
        ]:
            chunk = harness.result(command, ResultChunk("stream", data=data, stream=stream, final=final))
            out.append((stream, chunk.data, chunk.masked))
        stdout = b"".join(data for stream, data, _ in out if stream == "stdout")
        stderr = b"".join(data for stream, data, _ in out if stream == "stderr")
        self.assertEqual(stdout, b"card 4111 11** **** 1111 ok\ntotal 411111******1111")
        self.assertEqual(stderr, b"warning 550000******0004\n")
        self.assertEqual(sum(masked for _, _, masked in out), 3)

    def test_json_body(self):
        """
        A JSON body with a card number held in a number stays JSON.
        """
        harness = ChainHarness([(mask_factory, {})])
        chunk = ResultChunk("body", data=b'{"spec":{"card":4111111111111111}}', fields={"content_type": "application/json"})
        harness.result(kubernetes_command("GET", "/apis/x.test/v1/cards/a"), chunk)
        self.assertEqual(json.loads(chunk.data), {"spec": {"card": "411111******1111"}})
        self.assertEqual(chunk.masked, 1)


class RecordIdsTests(unittest.TestCase):
    """
    The ids the gateway writes into the record never look like card
    numbers to a scanner of the record (an end-to-end run found
    c-43153612-10006, a Luhn-valid 13-digit run).
    """

    def test_command_ids(self):
        from hoopgw import model

        self.assertFalse(model._COMMAND_PREFIX[-1].isdigit())
        for number in (1, 10006, 123456789, 10 ** 12 - 1):
            text = "c-%s-%d" % (model._COMMAND_PREFIX, number)
            self.assertEqual(cards.mask_text(text)[1], 0, text)

    def test_random_ids(self):
        from hoopgw import model

        for _ in range(5000):
            value = model.random_hex()
            self.assertNotRegex(value, "[0-9]{6}")
            self.assertEqual(cards.mask_text("s-%s 1234567" % (value,))[1], 0, value)
        self.assertFalse(model.random_hex(4, end_with_letter=True)[-1].isdigit())
