"""
The PostgreSQL v3 wire protocol: framing, and the few messages the gateway
builds or looks inside.  Knows nothing of policy.
"""

import bisect
import struct

import numpy

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_3_0 = 196608
# The largest startup packet PostgreSQL accepts (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET = 10000

# Message types a client sends while logging in.
PASSWORD_MESSAGE = b"p"

_INT32 = struct.Struct("!I")
_INT16 = struct.Struct("!H")
_SIGNED32 = struct.Struct("!i")

# Fields of ErrorResponse and NoticeResponse, by code byte.
FIELD_NAMES = {
    "S": "severity",
    "V": "severity_nonlocalized",
    "C": "code",
    "M": "message",
    "D": "detail",
    "H": "hint",
    "P": "position",
    "p": "internal_position",
    "q": "internal_query",
    "W": "where",
    "s": "schema",
    "t": "table",
    "c": "column",
    "d": "data_type",
    "n": "constraint",
    "F": "file",
    "L": "line",
    "R": "routine",
}
FIELD_CODES = {name: code for code, name in FIELD_NAMES.items()}


class ProtocolViolation(Exception):
    """
    The peer sent something the protocol does not allow.
    """


class StartupError(ValueError):
    """
    A client's first packets cannot be read: a refusal with PostgreSQL's
    SQLSTATE, a rule naming the reason for the record, and a sentence.
    """

    def __init__(self, sqlstate, rule, text):
        ValueError.__init__(self, text)
        self.sqlstate = sqlstate
        self.rule = rule
        self.text = text


def message(kind, payload=b""):
    """
    One typed message: a type byte, a length, the payload.
    """
    return kind + _INT32.pack(len(payload) + 4) + payload


def cstring(text):
    if isinstance(text, str):
        text = text.encode("utf-8")
    return text + b"\x00"


def read_cstring(data, offset):
    """
    @return: C{(bytes, offset after the terminating NUL)}.
    """
    end = data.index(b"\x00", offset)
    return data[offset:end], end + 1


def int32(value):
    return _INT32.pack(value)


def unpack_int32(data, offset=0):
    return _INT32.unpack_from(data, offset)[0]


# From this many bytes on, a run of messages is walked with vectorised
# operations first.
VECTOR_RUN = 4096


def run_end(buffer, position, end, maximum):
    """
    Where the run of whole messages of one type (rows, copy data) that
    starts at C{position} ends: at the first message of another type, the
    first that is not whole before C{end}, or the first whose length is
    out of bounds (4 to C{maximum}), which the caller then reads alone.
    """
    kind = buffer[position]
    # A run of one message that fills the buffer (a large CopyData) needs
    # no vectorised walk over its bytes.
    if end - position >= VECTOR_RUN and position + 1 + _INT32.unpack_from(buffer, position + 1)[0] < end - 4:
        position = _vector_run_end(buffer, position, end, maximum)
    unpack = _INT32.unpack_from
    while end - position >= 5 and buffer[position] == kind:
        length = unpack(buffer, position + 1)[0]
        following = position + 1 + length
        if following > end or length < 4 or length > maximum:
            break
        position = following
    return position


def _vector_run_end(buffer, position, end, maximum):
    """
    Most of L{run_end}'s walk at once: every byte of the message type that
    could start a message whole within bounds is a candidate; while each
    candidate's successor is the next candidate, they are the run.  Where
    that stops holding (the run ends, or a value holds bytes that look like
    a message), return the last position known to start a message of the
    run, for the caller to go on one message at a time.
    """
    size = end - position
    array = numpy.frombuffer(buffer, dtype=numpy.uint8, count=size, offset=position)
    starts = numpy.flatnonzero(array[: size - 4] == buffer[position])
    lengths = (
        (array[starts + 1].astype(numpy.int64) << 24)
        | (array[starts + 2].astype(numpy.int64) << 16)
        | (array[starts + 3].astype(numpy.int64) << 8)
        | array[starts + 4]
    )
    following = starts + 1 + lengths
    whole = (lengths >= 4) & (lengths <= maximum) & (following <= size)
    starts = starts[whole]
    following = following[whole]
    if not len(starts) or starts[0] != 0:
        return position
    broken = numpy.flatnonzero(following[:-1] != starts[1:])
    last = int(broken[0]) if len(broken) else len(starts) - 1
    return position + int(following[last])


# From this size on, a CopyData message that is only relayed is passed on
# as the reads that brought it, never joined into one piece.
LARGE_MESSAGE = 1 << 20


def split_pieces(pieces, size):
    """
    Split a list of byte strings after C{size} bytes, copying at most part
    of one of them.

    @return: C{(the pieces of the first size bytes, the rest's pieces)}.
    """
    taken = []
    total = 0
    for index, piece in enumerate(pieces):
        if total + len(piece) >= size:
            cut = size - total
            taken.append(piece[:cut])
            rest = pieces[index + 1 :]
            if cut < len(piece):
                rest.insert(0, piece[cut:])
            return taken, rest
        taken.append(piece)
        total += len(piece)
    raise ValueError("fewer than %d bytes to split" % (size,))


def regroup(pieces, size):
    """
    Consecutive byte strings joined into parts of at least C{size} bytes
    (the last may be shorter), one at a time: a part is made only when the
    one before was used (a generator); a piece of C{size} bytes or more is
    a part of its own, not copied.
    """
    group = []
    total = 0
    for piece in pieces:
        if not piece:
            continue
        group.append(piece)
        total += len(piece)
        if total >= size:
            yield group[0] if len(group) == 1 else b"".join(group)
            group = []
            total = 0
    if group:
        yield group[0] if len(group) == 1 else b"".join(group)


# Messages the gateway sends to clients.


def authentication_ok():
    return message(b"R", int32(0))


def authentication_cleartext_password():
    return message(b"R", int32(3))


def parameter_status(name, value):
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(process_id, secret):
    return message(b"K", _INT32.pack(process_id) + _INT32.pack(secret))


def ready_for_query(status):
    return message(b"Z", status)


def _fields(fields):
    # A field of a type PostgreSQL does not define (parse_fields keeps its
    # code as its name) is left out: clients ignore such fields anyway, and
    # a target's code may be any byte.
    payload = b"".join(
        FIELD_CODES[name].encode("ascii") + cstring(value)
        for name, value in fields.items()
        if value is not None and name in FIELD_CODES
    )
    return payload + b"\x00"


def error_response(code, text, severity="ERROR", detail=None, hint=None):
    return message(
        b"E",
        _fields(
            {
                "severity": severity,
                "severity_nonlocalized": severity,
                "code": code,
                "message": text,
                "detail": detail,
                "hint": hint,
            }
        ),
    )


def notice_response(text, severity="NOTICE", code="00000", detail=None, hint=None):
    return message(
        b"N",
        _fields(
            {
                "severity": severity,
                "severity_nonlocalized": severity,
                "code": code,
                "message": text,
                "detail": detail,
                "hint": hint,
            }
        ),
    )


def fields_message(kind, fields):
    """
    An ErrorResponse or NoticeResponse from a mapping of field names.
    """
    return message(kind, _fields(fields))


def negotiate_protocol_version(newest_minor, unsupported):
    payload = int32(newest_minor) + int32(len(unsupported)) + b"".join(cstring(name) for name in unsupported)
    return message(b"v", payload)


# Messages the gateway sends to targets.


def startup_message(parameters):
    payload = int32(PROTOCOL_3_0) + b"".join(cstring(k) + cstring(v) for k, v in parameters.items()) + b"\x00"
    return int32(len(payload) + 4) + payload


def ssl_request():
    return int32(8) + int32(SSL_REQUEST)


def cancel_request(process_id, secret):
    return int32(16) + int32(CANCEL_REQUEST) + _INT32.pack(process_id) + _INT32.pack(secret)


def password_message(data):
    return message(b"p", data)


def sasl_initial_response(mechanism, data):
    return message(b"p", cstring(mechanism) + _SIGNED32.pack(len(data)) + data)


def query(sql):
    return message(b"Q", cstring(sql))


def terminate():
    return message(b"X")


# Parsing.


def read_startup_packet(buffer, position=0, maximum=MAX_STARTUP_PACKET):
    """
    The startup-phase packet (an untyped length, a 32-bit code, a body) at
    C{position} of C{buffer}, without copying what follows it.

    @return: C{(code, body, position after it)}, or None when the packet
        is not whole yet.
    @raise StartupError: when its length is out of bounds.
    """
    if len(buffer) - position < 8:
        if len(buffer) - position >= 4:
            _check_startup_length(unpack_int32(buffer, position), maximum)
        return None
    length = unpack_int32(buffer, position)
    _check_startup_length(length, maximum)
    if len(buffer) - position < length:
        return None
    code = unpack_int32(buffer, position + 4)
    return code, bytes(buffer[position + 8 : position + length]), position + length


def _check_startup_length(length, maximum):
    if length < 8 or length > maximum:
        raise StartupError(
            "08P01",
            "postgres:startup-length",
            "invalid length of startup packet (%d bytes; between 8 and %d are accepted)" % (length, maximum),
        )


def parse_startup(payload):
    """
    The parameters of a StartupMessage (after its protocol version): pairs
    of NUL-terminated names and values, then a final NUL.

    @raise StartupError: when the layout is not that.
    """
    parameters = {}
    offset = 0
    end = len(payload)
    try:
        while offset < end and payload[offset] != 0:
            name, offset = read_cstring(payload, offset)
            value, offset = read_cstring(payload, offset)
            parameters[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    except ValueError:
        raise StartupError(
            "08P01", "postgres:startup-layout", "invalid startup packet layout: a name or value has no terminating NUL"
        )
    if offset != end - 1:
        raise StartupError(
            "08P01", "postgres:startup-layout", "invalid startup packet layout: expected terminator as last byte"
        )
    return parameters


def parse_fields(payload):
    """
    The fields of an ErrorResponse or NoticeResponse, by name.
    """
    fields = {}
    offset = 0
    while offset < len(payload) and payload[offset] != 0:
        code = chr(payload[offset])
        value, offset = read_cstring(payload, offset + 1)
        fields[FIELD_NAMES.get(code, code)] = value.decode("utf-8", "replace")
    return fields


def parse_parse(payload):
    """
    @return: C{(statement name, SQL text, parameter type OIDs)}.
    """
    name, offset = read_cstring(payload, 0)
    sql, offset = read_cstring(payload, offset)
    count = _INT16.unpack_from(payload, offset)[0]
    types = struct.unpack_from("!%dI" % (count,), payload, offset + 2)
    return name, sql, types


def _values(payload, offset):
    """
    A count and that many length-prefixed values (-1 for NULL), as in Bind
    and FunctionCall.

    @return: C{(values, offset after them)}.
    """
    count = _INT16.unpack_from(payload, offset)[0]
    offset += 2
    values = []
    for _ in range(count):
        length = _SIGNED32.unpack_from(payload, offset)[0]
        offset += 4
        if length < 0:
            values.append(None)
        else:
            values.append(payload[offset : offset + length])
            offset += length
    return values, offset


def parse_bind(payload):
    """
    @return: C{(portal, statement, parameter formats, parameter values,
        result formats)}.
    """
    portal, offset = read_cstring(payload, 0)
    statement, offset = read_cstring(payload, offset)
    count = _INT16.unpack_from(payload, offset)[0]
    offset += 2
    formats = struct.unpack_from("!%dH" % (count,), payload, offset)
    offset += 2 * count
    values, offset = _values(payload, offset)
    count = _INT16.unpack_from(payload, offset)[0]
    result_formats = struct.unpack_from("!%dH" % (count,), payload, offset + 2)
    return portal, statement, formats, values, result_formats


def parameter_format(formats, index):
    """
    The format code of parameter C{index}, by the rules of Bind: none means
    all text, one applies to all.
    """
    if not formats:
        return 0
    if len(formats) == 1:
        return formats[0]
    return formats[index]


def parse_execute(payload):
    portal, offset = read_cstring(payload, 0)
    return portal, unpack_int32(payload, offset)


def parse_target(payload):
    """
    Describe and Close: C{(b"S" or b"P", name)}.
    """
    return payload[:1], read_cstring(payload, 1)[0]


def parse_function_call(payload):
    """
    @return: C{(function OID, argument formats, argument values)}.
    """
    oid = unpack_int32(payload, 0)
    offset = 4
    count = _INT16.unpack_from(payload, offset)[0]
    offset += 2
    formats = struct.unpack_from("!%dH" % (count,), payload, offset)
    offset += 2 * count
    values, _ = _values(payload, offset)
    return oid, formats, values


_descriptions = {}


def parse_row_description(payload):
    """
    @return: a list of C{(name, type OID, format code)}.  Clients send the
        same few statements again and again, so answers are kept by the
        message's bytes (up to a bound).
    """
    known = _descriptions.get(payload)
    if known is not None:
        return known
    columns = tuple(_parse_row_description(payload))
    if len(_descriptions) >= 1024:
        _descriptions.clear()
    _descriptions[payload] = columns
    return columns


def _parse_row_description(payload):
    count = _INT16.unpack_from(payload, 0)[0]
    offset = 2
    columns = []
    for _ in range(count):
        name, offset = read_cstring(payload, offset)
        type_oid = unpack_int32(payload, offset + 6)
        format_code = _INT16.unpack_from(payload, offset + 16)[0]
        offset += 18
        columns.append((name.decode("utf-8", "replace"), type_oid, format_code))
    return columns


def decode_data_rows(data):
    """
    The rows of a run of DataRow messages (type byte and length included).
    """
    rows = []
    offset = 0
    end = len(data)
    unpack_length = _INT32.unpack_from
    unpack_field = _SIGNED32.unpack_from
    while offset < end:
        length = unpack_length(data, offset + 1)[0]
        message_end = offset + 1 + length
        count = _INT16.unpack_from(data, offset + 5)[0]
        position = offset + 7
        row = []
        for _ in range(count):
            size = unpack_field(data, position)[0]
            position += 4
            if size < 0:
                row.append(None)
            else:
                row.append(data[position : position + size])
                position += size
        rows.append(row)
        offset = message_end
    return rows


def encode_data_rows(rows):
    """
    A run of DataRow messages for C{rows}.
    """
    pieces = []
    for row in rows:
        body = [_INT16.pack(len(row))]
        for value in row:
            if value is None:
                body.append(_SIGNED32.pack(-1))
            else:
                body.append(_SIGNED32.pack(len(value)))
                body.append(bytes(value))
        payload = b"".join(body)
        pieces.append(b"D" + _INT32.pack(len(payload) + 4) + payload)
    return b"".join(pieces)


class DataRowValues:
    """
    Where the values of a run of DataRow messages lie, for a hook that
    edits values in place (see L{hoopgw.model.ResultChunk.locate}).

    A run of digits can include framing bytes only at its start: the low
    bytes of the length before a value, whose top byte (below 0x20 for
    values under 512 MB) is then among the three bytes before the run.
    When none of those is below 0x20 the run is inside one value and no
    index is needed.  When the run is exactly a whole value (the four
    bytes before it say its length, and framing follows it), no index is
    needed either: with k framing bytes at its start the real length
    would be the run's read k bytes further on, which for a run under
    64 KiB cannot match, and the real value would go on past the run
    with text, never a NUL, after it.  Otherwise the batch is indexed
    once.  Only values of text types may be located this way.
    """

    __slots__ = ("data", "fast", "starts", "ends")

    def __init__(self, data, fast=True):
        self.data = data
        self.fast = fast
        self.starts = None
        self.ends = None

    def __call__(self, start, end):
        data = self.data
        if self.fast and start >= 4:
            if data[start - 3] >= 32 and data[start - 2] >= 32 and data[start - 1] >= 32:
                return None
            # The run is a whole value (the common case: a column holding
            # a card number): the four bytes before it are its length, and
            # what follows is framing.  Were the run's first bytes framing
            # instead, the length read here could not be under 64 KiB and
            # equal the run (see the class docstring).
            length = end - start
            if length < 65536 and _INT32.unpack_from(data, start - 4)[0] == length:
                if end == len(data) or data[end] == 0 or (data[end] == 68 and data[end + 1] == 0):
                    return None
                if data[end : end + 4] == b"\xff\xff\xff\xff":
                    return None
        if self.starts is None:
            self._index()
        starts, ends = self.starts, self.ends
        index = max(bisect.bisect_right(starts, start) - 1, 0)
        pieces = []
        while index < len(starts) and starts[index] < end:
            first = max(start, starts[index])
            last = min(end, ends[index])
            if first < last:
                pieces.append((first, last))
            index += 1
        return pieces

    def inside(self, array, starts, ends):
        """
        What L{__call__} tells without an index, for many runs at once:
        whether each run of digits C{data[start:end]} certainly lies
        inside one value (or is one whole value).

        @param array: C{data} as a numpy array of bytes.
        @return: a numpy array of booleans.
        """
        certain = numpy.zeros(len(starts), dtype=bool)
        if not self.fast:
            return certain
        size = len(array)
        lengths = ends - starts
        # Framing can only precede a value: a run whose three bytes before
        # are all printable is inside one value.
        safe = starts >= 3
        safe[safe] &= (array[starts[safe] - 1] >= 32) & (array[starts[safe] - 2] >= 32) & (array[starts[safe] - 3] >= 32)
        # A run that is exactly one value: the four bytes before it are
        # its length, framing follows it.
        whole = ~safe & (starts >= 4) & (lengths < 65536)
        if whole.any():
            where = numpy.flatnonzero(whole)
            first = starts[where]
            length = (
                (array[first - 4].astype(numpy.int64) << 24)
                | (array[first - 3].astype(numpy.int64) << 16)
                | (array[first - 2].astype(numpy.int64) << 8)
                | array[first - 1]
            )
            last = ends[where]
            after = numpy.minimum(last, size - 1)
            following = numpy.minimum(last + 1, size - 1)
            framed = (last == size) | (array[after] == 0) | ((array[after] == 68) & (array[following] == 0))
            whole[where] = (length == lengths[where]) & framed
        return safe | whole

    def _index(self):
        data = self.data
        starts = []
        ends = []
        offset = 0
        size = len(data)
        unpack_field = _SIGNED32.unpack_from
        while offset < size:
            message_end = offset + 1 + _INT32.unpack_from(data, offset + 1)[0]
            count = _INT16.unpack_from(data, offset + 5)[0]
            position = offset + 7
            for _ in range(count):
                length = unpack_field(data, position)[0]
                position += 4
                if length > 0:
                    starts.append(position)
                    ends.append(position + length)
                    position += length
            offset = message_end
        self.starts = starts
        self.ends = ends


def copy_data_payloads(buffer, start, stop):
    """
    The bytes carried by a run of CopyData messages, joined.
    """
    pieces = []
    offset = start
    while offset < stop:
        end = offset + 1 + _INT32.unpack_from(buffer, offset + 1)[0]
        pieces.append(buffer[offset + 5 : end])
        offset = end
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def function_call_response(value):
    """
    A FunctionCallResponse carrying C{value} (None for NULL).
    """
    if value is None:
        return message(b"V", _SIGNED32.pack(-1))
    return message(b"V", _SIGNED32.pack(len(value)) + bytes(value))


def parse_notification(payload):
    process_id = unpack_int32(payload, 0)
    channel, offset = read_cstring(payload, 4)
    text, _ = read_cstring(payload, offset)
    return process_id, channel.decode("utf-8", "replace"), text.decode("utf-8", "replace")


def notification(process_id, channel, text):
    return message(b"A", int32(process_id) + cstring(channel) + cstring(text))


def rows_from_tag(tag):
    """
    The row count at the end of a command tag (C{SELECT 5},
    C{INSERT 0 3}), or None.
    """
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None


# The kinds of message a target sends (the type byte, as an integer: the
# relay reads it from its buffer).  The same letters mean other messages
# from a client.

AUTHENTICATION = 0x52  # R
BACKEND_KEY_DATA = 0x4B  # K
BIND_COMPLETE = 0x32  # 2
CLOSE_COMPLETE = 0x33  # 3
COMMAND_COMPLETE = 0x43  # C
COPY_BOTH_RESPONSE = 0x57  # W
COPY_DATA = 0x64  # d
COPY_DONE = 0x63  # c
COPY_IN_RESPONSE = 0x47  # G
COPY_OUT_RESPONSE = 0x48  # H
DATA_ROW = 0x44  # D
EMPTY_QUERY_RESPONSE = 0x49  # I
ERROR_RESPONSE = 0x45  # E
FUNCTION_CALL_RESPONSE = 0x56  # V
NEGOTIATE_PROTOCOL_VERSION = 0x76  # v
NO_DATA = 0x6E  # n
NOTICE_RESPONSE = 0x4E  # N
NOTIFICATION_RESPONSE = 0x41  # A
PARAMETER_DESCRIPTION = 0x74  # t
PARAMETER_STATUS = 0x53  # S
PARSE_COMPLETE = 0x31  # 1
PORTAL_SUSPENDED = 0x73  # s
READY_FOR_QUERY = 0x5A  # Z
ROW_DESCRIPTION = 0x54  # T

BACKEND_NAMES = {
    AUTHENTICATION: "Authentication",
    BACKEND_KEY_DATA: "BackendKeyData",
    BIND_COMPLETE: "BindComplete",
    CLOSE_COMPLETE: "CloseComplete",
    COMMAND_COMPLETE: "CommandComplete",
    COPY_BOTH_RESPONSE: "CopyBothResponse",
    COPY_DATA: "CopyData",
    COPY_DONE: "CopyDone",
    COPY_IN_RESPONSE: "CopyInResponse",
    COPY_OUT_RESPONSE: "CopyOutResponse",
    DATA_ROW: "DataRow",
    EMPTY_QUERY_RESPONSE: "EmptyQueryResponse",
    ERROR_RESPONSE: "ErrorResponse",
    FUNCTION_CALL_RESPONSE: "FunctionCallResponse",
    NEGOTIATE_PROTOCOL_VERSION: "NegotiateProtocolVersion",
    NO_DATA: "NoData",
    NOTICE_RESPONSE: "NoticeResponse",
    NOTIFICATION_RESPONSE: "NotificationResponse",
    PARAMETER_DESCRIPTION: "ParameterDescription",
    PARAMETER_STATUS: "ParameterStatus",
    PARSE_COMPLETE: "ParseComplete",
    PORTAL_SUSPENDED: "PortalSuspended",
    READY_FOR_QUERY: "ReadyForQuery",
    ROW_DESCRIPTION: "RowDescription",
}


def backend_name(kind):
    """
    A backend message kind as the protocol's documentation names it, or
    its byte in hex for a kind the protocol does not have (never more of
    the message: its contents are the target's data).
    """
    return BACKEND_NAMES.get(kind) or "message of unknown type 0x%02x" % (kind,)
