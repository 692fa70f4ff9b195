"""
Property-based tests (hypothesis) of what the gateway accepts from a
target: valid backend messages pass the checks and decode to what was
encoded; any mutation of them is either still a valid message (and then
decodes without error) or refused with L{MalformedTarget} — never any
other exception.
"""

import collections
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from hoopgw.postgres import backend, wire

MAXIMUM = 1 << 20
PROPERTIES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

values = st.one_of(st.none(), st.binary(max_size=40))


@st.composite
def row_runs(draw):
    """
    C{(column count, rows)}: up to 300 rows of the same width, so that
    runs both shorter and longer than the vectorised threshold occur.
    """
    count = draw(st.integers(min_value=0, max_value=6))
    rows = draw(st.lists(st.lists(values, min_size=count, max_size=count), min_size=1, max_size=300))
    return count, rows


@st.composite
def long_runs(draw):
    """
    C{(column count, rows)}: runs long enough to be checked with
    vectorised operations (at least L{wire.VECTOR_RUN} bytes).
    """
    count = draw(st.integers(min_value=1, max_value=4))
    row = st.lists(values, min_size=count, max_size=count)
    rows = draw(st.lists(row, min_size=1, max_size=20))
    # Repeating a few drawn rows keeps generation quick.
    rows = (rows * (400 // len(rows) + 1))[:400]
    return count, rows


any_runs = st.one_of(row_runs(), long_runs())


@st.composite
def mutations(draw, data):
    """
    C{data} with one change: a byte replaced, bytes inserted, or the end
    cut off.
    """
    data = bytearray(data)
    how = draw(st.sampled_from(("replace", "insert", "cut")))
    position = draw(st.integers(min_value=0, max_value=max(len(data) - 1, 0)))
    if how == "replace" and data:
        data[position] = draw(st.integers(min_value=0, max_value=255))
    elif how == "insert":
        data[position:position] = draw(st.binary(min_size=1, max_size=8))
    else:
        del data[position:]
    return bytes(data)


def check_run(test, data, count):
    """
    Frame C{data} as the relay does and check its leading run of rows.

    @return: the rows decoded, or None when C{data} is refused or holds
        no whole run.
    """
    if len(data) < 5 or data[0] != wire.DATA_ROW:
        return None
    length = wire.unpack_int32(data, 1)
    if length < 4 or length > MAXIMUM or 1 + length > len(data):
        return None
    stop = wire.run_end(data, 0, len(data), MAXIMUM)
    try:
        walked = backend._walk_rows(data, 0, stop, count)
    except backend.MalformedTarget:
        walked = "refused"
    try:
        checked = backend.data_rows(data, 0, stop, count)
    except backend.MalformedTarget:
        checked = "refused"
    test.assertEqual(walked, checked)
    # Finding the run and checking it in one walk says the same.
    try:
        found = backend.row_run(data, 0, len(data), MAXIMUM, count)
    except backend.MalformedTarget:
        found = "refused"
    test.assertIn(found, ("refused", (stop, checked)))
    if found == "refused":
        test.assertEqual(checked, "refused")
    if checked == "refused":
        return None
    rows = wire.decode_data_rows(data[:stop])
    # What was accepted is exactly the rows it decodes to.
    test.assertEqual(wire.encode_data_rows(rows), data[:stop])
    test.assertTrue(all(len(row) == checked for row in rows))
    return rows


class DataRowProperties(unittest.SynchronousTestCase):
    @PROPERTIES
    @given(any_runs)
    def test_round_trip(self, run):
        """
        A run of valid rows passes the check (walked and vectorised alike)
        and decodes to the rows encoded.
        """
        count, rows = run
        data = wire.encode_data_rows(rows)
        self.assertEqual(backend.data_rows(data, 0, len(data), count), count)
        self.assertEqual(backend.data_rows(data, 0, len(data), None), count)
        self.assertEqual(wire.decode_data_rows(data), rows)

    @PROPERTIES
    @given(st.data())
    def test_mutations(self, data):
        """
        A mutated run is accepted as rows that re-encode to exactly the
        bytes accepted, or refused with MalformedTarget; the walk and the
        vectorised check always agree.
        """
        count, rows = data.draw(any_runs)
        mutated = data.draw(mutations(wire.encode_data_rows(rows)))
        check_run(self, mutated, count)
        check_run(self, mutated, None)

    def test_vectorised_matches_walk_on_a_value_that_looks_like_a_row(self):
        """
        A value holding bytes that look like a DataRow header does not
        confuse the vectorised walk.
        """
        fake = b"D" + struct.pack("!I", 6) + b"\x00\x00"
        rows = [[fake * 3]] * 200 + [[None]] * 50
        data = wire.encode_data_rows(rows)
        self.assertEqual(len(backend._run_starts(data, 0, len(data))), 250)
        self.assertEqual(backend.data_rows(data, 0, len(data), 1), 1)
        self.assertEqual(backend.row_run(data + b"C", 0, len(data) + 1, MAXIMUM, 1), (len(data), 1))
        with self.assertRaises(backend.MalformedTarget):
            backend.data_rows(data, 0, len(data), 2)


texts = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=30)
codes = st.sampled_from(list(wire.FIELD_NAMES))


def _cstring(text):
    return wire.cstring(text)


messages = st.one_of(
    st.builds(
        lambda fields: (wire.ERROR_RESPONSE, b"".join(code.encode() + _cstring(text) for code, text in fields) + b"\x00"),
        st.lists(st.tuples(codes, texts), max_size=5),
    ),
    st.builds(
        lambda fields: (wire.NOTICE_RESPONSE, b"".join(code.encode() + _cstring(text) for code, text in fields) + b"\x00"),
        st.lists(st.tuples(codes, texts), max_size=5),
    ),
    st.builds(lambda name, value: (wire.PARAMETER_STATUS, _cstring(name) + _cstring(value)), texts, texts),
    st.builds(
        lambda pid, channel, text: (wire.NOTIFICATION_RESPONSE, wire.int32(pid) + _cstring(channel) + _cstring(text)),
        st.integers(min_value=0, max_value=2**32 - 1),
        texts,
        texts,
    ),
    st.builds(lambda value: (wire.FUNCTION_CALL_RESPONSE, wire.function_call_response(value)[5:]), values),
    st.builds(lambda tag: (wire.COMMAND_COMPLETE, _cstring(tag)), texts),
    st.builds(lambda status: (wire.READY_FOR_QUERY, status), st.sampled_from((b"I", b"T", b"E"))),
    st.builds(
        lambda overall, count: (
            wire.COPY_OUT_RESPONSE,
            bytes((overall,)) + struct.pack("!H", count) + struct.pack("!%dH" % count, *([overall] * count)),
        ),
        st.integers(min_value=0, max_value=1),
        st.integers(min_value=0, max_value=5),
    ),
    st.builds(
        lambda columns: (
            wire.ROW_DESCRIPTION,
            struct.pack("!H", len(columns))
            + b"".join(_cstring(name) + struct.pack("!IhIhih", 0, 0, oid, -1, -1, code) for name, oid, code in columns),
        ),
        st.lists(st.tuples(texts, st.integers(min_value=0, max_value=2**32 - 1), st.integers(0, 1)), max_size=4),
    ),
    st.builds(
        lambda oids: (wire.PARAMETER_DESCRIPTION, struct.pack("!H%dI" % len(oids), len(oids), *oids)),
        st.lists(st.integers(min_value=0, max_value=2**32 - 1), max_size=4),
    ),
    st.sampled_from(
        [(kind, b"") for kind in (wire.PARSE_COMPLETE, wire.BIND_COMPLETE, wire.CLOSE_COMPLETE, wire.NO_DATA,
                                  wire.PORTAL_SUSPENDED, wire.COPY_DONE, wire.EMPTY_QUERY_RESPONSE)]
    ),
)


def read(kind, payload):
    """
    What the relay reads from a checked message; must not fail.
    """
    if kind in (wire.ERROR_RESPONSE, wire.NOTICE_RESPONSE):
        return wire.parse_fields(payload)
    if kind == wire.NOTIFICATION_RESPONSE:
        return wire.parse_notification(payload)
    if kind == wire.PARAMETER_STATUS:
        return backend.parameter_status(kind, payload)
    if kind == wire.ROW_DESCRIPTION:
        return backend.row_description(payload)
    if kind == wire.COPY_OUT_RESPONSE:
        return backend.copy_response(kind, payload)
    if kind == wire.FUNCTION_CALL_RESPONSE:
        length = struct.unpack_from("!i", payload)[0]
        return None if length == -1 else payload[4 : 4 + length]
    return payload


class MessageProperties(unittest.SynchronousTestCase):
    @PROPERTIES
    @given(messages)
    def test_valid_accepted(self, message):
        """
        Every valid message passes its check, and what the relay reads
        from it reads without error.
        """
        kind, payload = message
        backend.check(kind, payload)
        read(kind, payload)

    @PROPERTIES
    @given(st.data())
    def test_mutations(self, data):
        """
        A mutated message, or one of another type, passes its check (and
        then reads without error) or is refused with MalformedTarget.
        """
        kind, payload = data.draw(messages)
        payload = data.draw(mutations(payload))
        kind = data.draw(st.one_of(st.just(kind), st.integers(min_value=0, max_value=255)))
        try:
            backend.check(kind, payload)
        except backend.MalformedTarget as error:
            self.assertTrue(str(error).startswith("the target sent a"))
            return
        read(kind, payload)


class _Session:
    def __init__(self):
        self.attributes = {}


class _Chain:
    """
    A chain with a result hook that looks at every chunk (decoding rows),
    as the mask addon does, or with none.
    """

    def __init__(self, hooks):
        self.hooks = hooks

    def has(self, hook):
        return self.hooks

    def result(self, session, command, chunk):
        if chunk.kind == "rows" and chunk.data:
            chunk.rows
        return None

    def finish(self, session, command):
        pass


class _Transport:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(bytes(data))

    def writeSequence(self, pieces):
        self.written.extend(bytes(piece) for piece in pieces)


class _Frontend:
    """
    What L{TargetReplies} needs of a front end, recording what reaches the
    client and whether the session was ended.
    """

    def __init__(self, hooks):
        from hoopgw.postgres.frontend import Pending

        self.chain = _Chain(hooks)
        self.settings = type("Settings", (), {"max_message_bytes": MAXIMUM})()
        self._expected = collections.deque([Pending("query")])
        self._portals = {}
        self._statements = {}
        self._result_hooks = hooks
        self.transport = _Transport()
        self.session = _Session()
        self.ended = None

    def _fatal(self, sqlstate, text, code=None):
        self.ended = (sqlstate, text)

    def _internal_error(self, failure):
        raise AssertionError("internal error: %s" % (failure,))


@st.composite
def replies(draw):
    """
    A simple query's answer as a target sends it: texts around a result of
    rows, then CommandComplete and ReadyForQuery.
    """
    count, rows = draw(row_runs())
    columns = struct.pack("!H", count) + b"".join(
        wire.cstring("c%d" % index) + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0) for index in range(count)
    )
    before = draw(st.lists(messages, max_size=3))
    return (
        b"".join(bytes((kind,)) + wire.int32(len(payload) + 4) + payload for kind, payload in before
                 if kind in (wire.NOTICE_RESPONSE, wire.NOTIFICATION_RESPONSE, wire.PARAMETER_STATUS))
        + wire.message(b"T", columns)
        + wire.encode_data_rows(rows)
        + wire.message(b"C", wire.cstring("SELECT %d" % (len(rows),)))
        + wire.message(b"Z", b"I")
    )


def _relayed_messages(test, data):
    """
    Frame what reached the client and check every message again.
    """
    position = 0
    while position < len(data):
        kind = data[position]
        stop = position + 1 + wire.unpack_int32(data, position + 1)
        test.assertLessEqual(stop, len(data))
        if kind == wire.DATA_ROW:
            backend.data_rows(data, position, stop, None)
        else:
            backend.check(kind, data[position + 5 : stop])
        position = stop


class RelayProperties(unittest.SynchronousTestCase):
    @PROPERTIES
    @given(st.data())
    def test_mutated_replies(self, data):
        """
        Whatever the target sends (a valid reply, mutated), delivered in
        reads of any size, with or without a result hook: the relay raises
        nothing; either everything passes or the session is ended with
        08P01 and a sentence naming a kind of message; and everything that
        reached the client frames into messages that pass the checks.
        """
        from hoopgw.postgres.replies import TargetReplies

        reply = data.draw(replies())
        mutated = data.draw(st.booleans())
        if mutated:
            reply = data.draw(mutations(reply))
        hooks = data.draw(st.booleans())
        frontend = _Frontend(hooks)
        relay = TargetReplies(frontend, lambda: frontend.ended is not None)
        cuts = sorted(data.draw(st.lists(st.integers(min_value=0, max_value=len(reply)), max_size=4)))
        previous = 0
        for cut in cuts + [len(reply)]:
            if frontend.ended is None and cut > previous:
                relay.data_received(reply[previous:cut])
            previous = max(previous, cut)
        if frontend.ended is not None:
            sqlstate, text = frontend.ended
            self.assertEqual(sqlstate, "08P01")
            self.assertTrue(text.startswith("the target sent "), text)
            self.assertTrue(text.endswith("; the session is closed"), text)
        relayed = b"".join(frontend.transport.written)
        _relayed_messages(self, relayed)
        if not mutated:
            # A valid reply passes whole; unchanged unless a hook re-encoded
            # a notice (whose repeated fields then appear once).
            self.assertIsNone(frontend.ended)
            if not hooks:
                self.assertEqual(relayed, reply)
