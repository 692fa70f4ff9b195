"""
The mask addon end to end, against a bypass corpus that must leak no card
number: real PostgreSQL, psql, psycopg2 and psycopg (binary results),
COPY, notices, errors, notifications, very wide rows, a client that never
describes its portals, large objects read over the fastpath, and the
record.
"""

import re
import socket
import ssl
import struct

import psycopg2
from twisted.internet import defer
from twisted.trial import unittest

from tests import support
from tests.support import GatewayHarness, in_thread, psql, token

from hoopgw.postgres import wire

VISA = "4111111111111111"
MASTERCARD = "5500000000000004"
MASTERCARD_SPACED = "5500 0000 0000 0004"
AMEX = "378282246310005"
AMEX_DASHED = "3782-822463-10005"
NOT_LUHN = "4111111111111112"
CLEAR = (VISA, MASTERCARD, MASTERCARD_SPACED, AMEX, AMEX_DASHED)


def app_psql(sql):
    return support.cluster().psql(sql, user="app", password=support.APP_PASSWORD, dbname="payments")


def setUpModule():
    app_psql(
        "DROP TABLE IF EXISTS mask_cards; "
        "CREATE TABLE mask_cards (id int PRIMARY KEY, pan text UNIQUE, cvv text, note text, pan_number bigint, pan_numeric numeric); "
        "INSERT INTO mask_cards VALUES "
        "(1, '%s', '123', 'plain', %s, %s), "
        "(2, '%s', '456', 'spaced: %s', 1, 1), "
        "(3, '%s', '7890', 'dashed', 2, 2), "
        "(4, '%s', '000', 'not luhn', %s, 3)"
        % (VISA, VISA, VISA, MASTERCARD_SPACED, MASTERCARD_SPACED, AMEX_DASHED, NOT_LUHN, NOT_LUHN)
    )


class LeakCheck:
    def assertNoPan(self, text):
        """
        No card number in C{text}, written in any of the corpus's forms,
        nor with its separators taken out.
        """
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        squeezed = re.sub(r"[ -]", "", text)
        for pan in CLEAR:
            self.assertNotIn(pan, text)
            self.assertNotIn(pan.replace(" ", "").replace("-", ""), squeezed)


class MaskTests(unittest.TestCase, LeakCheck):
    """
    Everything a target sends back, masked.
    """

    def setUp(self):
        setUpModule()
        self.gateway = GatewayHarness(self, addons=["identity", "mask", "record"])
        self.token = token()

    def tearDown(self):
        self.assertNoPan(self.gateway.raw_store())

    @defer.inlineCallbacks
    def query(self, sql):
        out, err, code = yield psql(self.gateway.dsn(), "-c", sql, password=self.token)
        self.assertEqual(code, 0, err)
        return out

    @defer.inlineCallbacks
    def test_text_results(self):
        """
        psql (text format): PANs plain, spaced and dashed, inside JSON,
        jsonb, arrays, whole-row values and text concatenated in SQL are all
        masked to BIN and last four; a digit run failing Luhn is untouched;
        the count of masked values is recorded per statement.
        """
        out = yield self.query(
            "SELECT pan, note, json_build_object('pan', pan)::text, to_jsonb(m)::text, m::text "
            "FROM mask_cards m ORDER BY id"
        )
        self.assertNoPan(out)
        self.assertIn("411111******1111", out)
        self.assertIn("5500 00** **** 0004", out)
        self.assertIn("3782-82****-*0005", out)
        self.assertIn(NOT_LUHN, out)
        out = yield self.query("SELECT array_agg(pan ORDER BY id) FROM mask_cards")
        self.assertNoPan(out)
        out = yield self.query("SELECT '4111' || '1111' || '1111' || '1111' AS joined, '3782-' || '822463-' || '10005'")
        self.assertNoPan(out)
        self.assertEqual(out.strip(), "411111******1111|3782-82****-*0005")
        (first,) = [end for end in self.gateway.events("command.end") if end["outcome"].get("tag") == "SELECT 4"]
        self.assertGreaterEqual(first["outcome"]["masked"], 12)

    @defer.inlineCallbacks
    def test_column_rules(self):
        """
        The CVV column is replaced whole, also under an alias, through a
        subquery with a column list and through a CTE.
        """
        for sql in (
            "SELECT cvv FROM mask_cards WHERE id = 1",
            "SELECT cvv AS x FROM mask_cards WHERE id = 1",
            "SELECT y FROM (SELECT cvv FROM mask_cards WHERE id = 1) s(y)",
            "WITH c AS (SELECT cvv AS code FROM mask_cards WHERE id = 1) SELECT * FROM c",
        ):
            out = yield self.query(sql)
            self.assertEqual(out.strip(), "***", sql)

    @defer.inlineCallbacks
    def test_copy_out(self):
        """
        COPY ... TO STDOUT, text and CSV, through psql and psycopg2, is
        masked; binary COPY is refused before it runs.
        """
        out = yield self.query("COPY mask_cards (id, pan, note) TO STDOUT")
        self.assertNoPan(out)
        self.assertIn("411111******1111", out)
        out = yield self.query("COPY (SELECT pan FROM mask_cards ORDER BY id) TO STDOUT WITH (FORMAT csv)")
        self.assertNoPan(out)

        def run():
            import io

            connection = psycopg2.connect(self.gateway.dsn(password=self.token))
            try:
                sink = io.StringIO()
                connection.cursor().copy_expert(
                    "COPY (SELECT string_agg(pan || ' ' || note, ' ') FROM mask_cards, generate_series(1, 200)) TO STDOUT",
                    sink,
                )
                return sink.getvalue()
            finally:
                connection.close()

        copied = yield in_thread(run)
        self.assertNoPan(copied)
        self.assertGreater(len(copied), 10000)
        out, err, code = yield psql(self.gateway.dsn(), "-c", "COPY mask_cards TO STDOUT (FORMAT binary)", password=self.token)
        self.assertNotEqual(code, 0)
        self.assertIn("binary COPY output cannot be checked", err)

    @defer.inlineCallbacks
    def test_messages(self):
        """
        A RAISE NOTICE, a unique-violation detail, a NOTIFY payload and an
        error message quoting a value are masked.
        """

        def run():
            connection = psycopg2.connect(self.gateway.dsn(password=self.token))
            connection.autocommit = True
            found = {}
            try:
                cursor = connection.cursor()
                cursor.execute("DO $$ BEGIN RAISE NOTICE 'charging card %%', '%s'; END $$" % (MASTERCARD_SPACED,))
                found["notice"] = "".join(connection.notices)
                try:
                    cursor.execute("INSERT INTO mask_cards (id, pan) VALUES (99, '%s')" % (VISA,))
                except psycopg2.errors.UniqueViolation as error:
                    found["detail"] = error.diag.message_detail
                    found["error"] = str(error)
                try:
                    cursor.execute("SELECT '%s'::int" % (AMEX,))
                except psycopg2.Error as error:
                    # (libpq's own "LINE 1:" echoes the client's query text.)
                    found["cast"] = error.diag.message_primary
                cursor.execute("LISTEN cards")
                cursor.execute("NOTIFY cards, 'declined %s'" % (VISA,))
                connection.poll()
                found["notify"] = " ".join(notify.payload for notify in connection.notifies)
                return found
            finally:
                connection.close()

        found = yield in_thread(run)
        for name in ("notice", "detail", "cast", "notify"):
            self.assertNoPan(found[name])
        self.assertIn("5500 00** **** 0004", found["notice"])
        self.assertEqual(found["detail"], "Key (pan)=(411111******1111) already exists.")
        self.assertIn("declined 411111******1111", found["notify"])

    @defer.inlineCallbacks
    def test_binary_results(self):
        """
        psycopg 3 with binary results: text values masked in place; a PAN
        held in a bigint or a numeric is withheld (NULL); a text array
        masked inside; other numbers untouched.
        """
        import psycopg

        def run():
            with psycopg.connect(self.gateway.dsn(password=self.token)) as connection:
                cursor = connection.cursor(binary=True)
                cursor.execute("SELECT pan, pan_number, pan_numeric, id, ARRAY[pan, note] FROM mask_cards WHERE id = %s", (1,))
                return cursor.fetchone()

        pan, number, numeric, identifier, array = yield in_thread(run)
        self.assertEqual(pan, "411111******1111")
        self.assertIsNone(number)
        self.assertIsNone(numeric)
        self.assertEqual(identifier, 1)
        self.assertEqual(array, ["411111******1111", "plain"])

    @defer.inlineCallbacks
    def test_wide_rows(self):
        """
        Rows far larger than one TCP read, with card numbers at their
        start, middle and end, arrive whole and masked; so do many rows
        with a card number each.
        """

        def run():
            connection = psycopg2.connect(self.gateway.dsn(password=self.token))
            try:
                cursor = connection.cursor()
                cursor.execute(
                    "SELECT '%s' || repeat('x', 300000) || '%s' || repeat('y', 300000) || ' %s', g "
                    "FROM generate_series(1, 3) g" % (VISA, MASTERCARD_SPACED, AMEX_DASHED)
                )
                wide = cursor.fetchall()
                cursor.execute("SELECT pan || '-' || g FROM mask_cards, generate_series(1, 20000) g WHERE id = 1")
                many = cursor.fetchall()
                return wide, many
            finally:
                connection.close()

        wide, many = yield in_thread(run)
        self.assertEqual(len(wide), 3)
        for value, _ in wide:
            self.assertEqual(len(value), 16 + 300000 + 19 + 300000 + 1 + 17)
            self.assertNoPan(value)
        self.assertEqual(len(many), 20000)
        self.assertNoPan(" ".join(row[0] for row in many))
        self.assertEqual(many[0][0], "411111******1111-1")

    @defer.inlineCallbacks
    def test_large_object_fastpath(self):
        """
        A large object read with the fastpath function call (libpq's
        lo_read, as psycopg2's lobject does) does not bring a card number
        out.
        """
        oid = int(app_psql("SELECT lo_from_bytea(0, convert_to('card %s', 'UTF8'))" % (VISA,)).strip())
        self.addCleanup(app_psql, "SELECT lo_unlink(%d)" % (oid,))

        def run():
            connection = psycopg2.connect(self.gateway.dsn(password=self.token))
            try:
                try:
                    return connection.lobject(oid, "rb").read()
                except psycopg2.Error as error:
                    return str(error)
            finally:
                connection.close()

        self.assertNoPan((yield in_thread(run)))


class ExtendedWithoutDescribeTests(unittest.TestCase, LeakCheck):
    """
    A client that never describes its portals (as JDBC and pgx do for
    statements they have prepared) and asks for binary results.
    """

    def setUp(self):
        setUpModule()
        self.gateway = GatewayHarness(self, addons=["identity", "mask", "record"])

    def converse(self, messages, *more):
        """
        Log in over TLS and send C{messages} (then each of C{more} in turn);
        return what comes back until the last ReadyForQuery, as C{(type,
        payload)}.
        """
        raw = socket.create_connection(("127.0.0.1", self.gateway.port), timeout=10)
        raw.sendall(wire.ssl_request())
        self.assertEqual(raw.recv(1), b"S")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = context.wrap_socket(raw)
        buffer = b""

        def read_until(kind):
            nonlocal buffer
            seen = []
            while True:
                while len(buffer) >= 5 and len(buffer) >= 1 + wire.unpack_int32(buffer, 1):
                    length = wire.unpack_int32(buffer, 1)
                    seen.append((buffer[:1], buffer[5 : 1 + length]))
                    buffer = buffer[1 + length :]
                    if seen[-1][0] == kind:
                        return seen
                chunk = connection.recv(65536)
                if not chunk:
                    return seen
                buffer += chunk

        try:
            connection.sendall(wire.startup_message({"user": "ci-bot", "database": "payments"}))
            read_until(b"R")
            connection.sendall(wire.password_message(wire.cstring(token())))
            read_until(b"Z")
            answers = []
            for group in (messages,) + more:
                connection.sendall(b"".join(group))
                answers = read_until(b"Z")
            return answers
        finally:
            connection.close()

    @defer.inlineCallbacks
    def test_binary_execute(self):
        """
        Parse, Bind (binary results), Execute, Sync: the gateway asks for
        the portal's columns itself, keeps that answer from the client, and
        masks the binary text values and withholds the binary bigint.
        """
        sql = b"SELECT pan, pan_number FROM mask_cards WHERE id = 1"
        parse = wire.message(b"P", b"\x00" + sql + b"\x00" + struct.pack("!H", 0))
        bind = wire.message(b"B", b"\x00\x00" + struct.pack("!HHH", 0, 0, 1) + struct.pack("!H", 1))
        execute = wire.message(b"E", b"\x00" + struct.pack("!I", 0))
        sync = wire.message(b"S")
        answer = yield in_thread(self.converse, [parse, bind, execute, sync])
        kinds = [kind for kind, _ in answer]
        self.assertEqual(kinds, [b"1", b"2", b"D", b"C", b"Z"])
        (row,) = wire.decode_data_rows(wire.message(b"D", answer[2][1]))
        self.assertEqual(row, [b"411111******1111", None])
        self.assertNoPan(b"".join(payload for _, payload in answer))


    @defer.inlineCallbacks
    def test_statement_described_once(self):
        """
        The JDBC and pgx pattern: a named statement described once, then
        Bind (binary results) and Execute without describing the portal:
        the gateway takes the columns from the statement's description
        (no Describe of its own) and masks the binary text value.
        """
        sql = b"SELECT note, pan FROM mask_cards WHERE id = 1"
        parse = wire.message(b"P", b"s1\x00" + sql + b"\x00" + struct.pack("!H", 0))
        describe = wire.message(b"D", b"Ss1\x00")
        sync = wire.message(b"S")
        bind = wire.message(b"B", b"\x00s1\x00" + struct.pack("!HHH", 0, 0, 1) + struct.pack("!H", 1))
        execute = wire.message(b"E", b"\x00" + struct.pack("!I", 0))
        answer = yield in_thread(self.converse, [parse, describe, sync], [bind, execute, sync])
        self.assertEqual([kind for kind, _ in answer], [b"2", b"D", b"C", b"Z"])
        (row,) = wire.decode_data_rows(wire.message(b"D", answer[1][1]))
        self.assertEqual(row, [b"plain", b"411111******1111"])


class ExemptTests(unittest.TestCase, LeakCheck):
    """
    A group with a documented business need sees card numbers; the record
    says so, and still holds none.
    """

    def setUp(self):
        setUpModule()
        self.gateway = GatewayHarness(
            self, addons=["identity", {"mask": {"exempt_groups": ["fraud-analysts"]}}, "record"]
        )

    @defer.inlineCallbacks
    def test_exempt_group(self):
        """
        A fraud analyst's result is unmasked; the session start says the
        session is exempt, the command's end how many card numbers left in
        clear; the store holds none of them.
        """
        analyst = token(subject="fraud-bot", groups=["payments-bots", "fraud-analysts"])
        out, err, code = yield psql(self.gateway.dsn(user="fraud-bot"), "-c", "SELECT pan FROM mask_cards WHERE id = 1", password=analyst)
        self.assertEqual((out.strip(), code), (VISA, 0), err)
        (start,) = self.gateway.events("session.start")
        self.assertEqual(start["attributes"]["mask_exempt"], "fraud-analysts")
        (end,) = self.gateway.events("command.end")
        self.assertEqual((end["outcome"]["unmasked"], end["outcome"]["mask_exempt"]), (1, "fraud-analysts"))
        self.assertNoPan(self.gateway.raw_store())
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT pan FROM mask_cards WHERE id = 1", password=token())
        self.assertEqual(out.strip(), "411111******1111", err)
