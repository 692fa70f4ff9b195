"""
What a target may send after login, checked before any of it is relayed:
the layout of every backend message (lengths within the message, nothing
left over), and runs of DataRow messages walked column by column with
vectorised operations.  A target is as untrusted as a client.
"""

import struct

import numpy

from hoopgw.postgres import wire

_INT16 = struct.Struct("!H")
_INT32 = struct.Struct("!I")
_SIGNED32 = struct.Struct("!i")
_COLUMN = struct.Struct("!IhIhih")

# From this many rows on, a run of DataRow messages is checked with
# vectorised operations (each costs a few microseconds whatever its size).
VECTOR_ROWS = 16


class MalformedTarget(wire.ProtocolViolation):
    """
    The target sent a message the protocol does not allow, here or at all.
    C{str()} names the message's kind, never its contents: it is shown to
    the client and written to the record.
    """

    def __init__(self, kind, problem="malformed"):
        self.kind = kind
        self.problem = problem
        if problem == "malformed":
            text = "the target sent a malformed %s" % (wire.backend_name(kind),)
        elif kind not in wire.BACKEND_NAMES:
            text = "the target sent a %s" % (wire.backend_name(kind),)
        else:
            name = wire.backend_name(kind)
            text = "the target sent %s %s %s" % ("an" if name[0] in "AEIOU" else "a", name, problem)
        wire.ProtocolViolation.__init__(self, text)


def _cstring_end(payload, offset, kind):
    end = payload.find(b"\x00", offset)
    if end < 0:
        raise MalformedTarget(kind)
    return end + 1


def _empty(kind, payload):
    if payload:
        raise MalformedTarget(kind)


def _command_complete(kind, payload):
    if _cstring_end(payload, 0, kind) != len(payload):
        raise MalformedTarget(kind)


def _ready_for_query(kind, payload):
    if payload not in (b"I", b"T", b"E"):
        raise MalformedTarget(kind)


def fields(kind, payload):
    """
    The fields of an ErrorResponse or NoticeResponse, checked: each a code
    byte and a string, then a NUL, then nothing.
    """
    offset = 0
    size = len(payload)
    while offset < size and payload[offset] != 0:
        offset = _cstring_end(payload, offset + 1, kind)
    if offset != size - 1:
        raise MalformedTarget(kind)
    return wire.parse_fields(payload)


def _fields(kind, payload):
    fields(kind, payload)


def parameter_status(kind, payload):
    """
    @return: C{(name, value)} of a ParameterStatus, checked.
    """
    middle = _cstring_end(payload, 0, kind)
    if _cstring_end(payload, middle, kind) != len(payload):
        raise MalformedTarget(kind)
    return payload[: middle - 1].decode("utf-8", "replace"), payload[middle:-1].decode("utf-8", "replace")


def _parameter_status(kind, payload):
    parameter_status(kind, payload)


def _notification(kind, payload):
    if len(payload) < 6:
        raise MalformedTarget(kind)
    middle = _cstring_end(payload, 4, kind)
    if _cstring_end(payload, middle, kind) != len(payload):
        raise MalformedTarget(kind)


def _function_call_response(kind, payload):
    if len(payload) < 4:
        raise MalformedTarget(kind)
    length = _SIGNED32.unpack_from(payload, 0)[0]
    if length != -1 and length != len(payload) - 4:
        raise MalformedTarget(kind)


def _parameter_description(kind, payload):
    if len(payload) < 2 or len(payload) != 2 + 4 * _INT16.unpack_from(payload, 0)[0]:
        raise MalformedTarget(kind)


def copy_response(kind, payload):
    """
    @return: the overall format of a CopyInResponse or CopyOutResponse,
        checked: a format (0 or 1), a column count, that many column
        formats (0 or 1; all 0 when the overall format is text), nothing
        more.
    """
    if len(payload) < 3 or payload[0] > 1:
        raise MalformedTarget(kind)
    count = _INT16.unpack_from(payload, 1)[0]
    if len(payload) != 3 + 2 * count:
        raise MalformedTarget(kind)
    formats = struct.unpack_from("!%dH" % (count,), payload, 3)
    if any(code > payload[0] for code in formats):
        raise MalformedTarget(kind)
    return payload[0]


def _copy_response(kind, payload):
    copy_response(kind, payload)


_descriptions = {}


def row_description(payload):
    """
    @return: the columns of a RowDescription, checked, as a tuple of
        C{(name, type OID, format code)}.  Clients send the same few
        statements again and again, so answers are kept by the message's
        bytes (up to a bound).
    """
    known = _descriptions.get(payload)
    if known is not None:
        return known
    kind = wire.ROW_DESCRIPTION
    if len(payload) < 2:
        raise MalformedTarget(kind)
    count = _INT16.unpack_from(payload, 0)[0]
    offset = 2
    size = len(payload)
    columns = []
    for _ in range(count):
        name_end = _cstring_end(payload, offset, kind)
        if name_end + 18 > size:
            raise MalformedTarget(kind)
        _, _, type_oid, _, _, format_code = _COLUMN.unpack_from(payload, name_end)
        if format_code not in (0, 1):
            raise MalformedTarget(kind)
        columns.append((payload[offset : name_end - 1].decode("utf-8", "replace"), type_oid, format_code))
        offset = name_end + 18
    if offset != size:
        raise MalformedTarget(kind)
    columns = tuple(columns)
    if len(_descriptions) >= 1024:
        _descriptions.clear()
    _descriptions[payload] = columns
    return columns


def _row_description(kind, payload):
    row_description(payload)


# The layout check of each kind a target may send after login, other than
# the runs (DataRow, CopyData) checked by L{data_rows} and framing alone.
LAYOUTS = {
    wire.BIND_COMPLETE: _empty,
    wire.CLOSE_COMPLETE: _empty,
    wire.COMMAND_COMPLETE: _command_complete,
    wire.COPY_DONE: _empty,
    wire.COPY_IN_RESPONSE: _copy_response,
    wire.COPY_OUT_RESPONSE: _copy_response,
    wire.EMPTY_QUERY_RESPONSE: _empty,
    wire.ERROR_RESPONSE: _fields,
    wire.FUNCTION_CALL_RESPONSE: _function_call_response,
    wire.NO_DATA: _empty,
    wire.NOTICE_RESPONSE: _fields,
    wire.NOTIFICATION_RESPONSE: _notification,
    wire.PARAMETER_DESCRIPTION: _parameter_description,
    wire.PARAMETER_STATUS: _parameter_status,
    wire.PARSE_COMPLETE: _empty,
    wire.PORTAL_SUSPENDED: _empty,
    wire.READY_FOR_QUERY: _ready_for_query,
    wire.ROW_DESCRIPTION: _row_description,
}


def check(kind, payload):
    """
    Check one message's layout (L{LAYOUTS}); a kind not there is not one
    a target may send after login.
    """
    layout = LAYOUTS.get(kind)
    if layout is None:
        raise MalformedTarget(kind, "after login")
    layout(kind, payload)


def data_rows(buffer, start, stop, count):
    """
    Check a run of whole DataRow messages (L{wire.run_end}): each holds
    C{count} fields (or, when C{count} is None, as many as the first), each
    field's length is -1 (NULL) or within the message, and nothing is
    left over.

    @return: the number of fields of the rows.
    """
    if stop - start >= wire.VECTOR_RUN:
        starts = _run_starts(buffer, start, stop)
        if len(starts) >= VECTOR_ROWS:
            return _vector_rows(buffer, start, stop, starts, count)
    return _walk_rows(buffer, start, stop, count)


def row_run(buffer, start, end, maximum, count):
    """
    Find the run of whole DataRow messages that starts at C{start} (as
    L{wire.run_end} does, and in the same walk) and check it (as
    L{data_rows} does).

    @return: C{(where the run ends, the number of fields of its rows)}.
    """
    size = end - start
    if size < wire.VECTOR_RUN:
        stop = wire.run_end(buffer, start, end, maximum)
        return stop, _walk_rows(buffer, start, stop, count)
    array = numpy.frombuffer(buffer, dtype=numpy.uint8, count=size, offset=start)
    candidates = numpy.flatnonzero(array[: size - 4] == wire.DATA_ROW)
    lengths = _int32_at(buffer, start, size, ">u4")[candidates + 1]
    following = candidates + 1 + lengths
    whole = (lengths >= 4) & (lengths <= maximum) & (following <= size)
    # The candidates that are rows of the run: while each one is whole and
    # ends where the next begins.
    chained = whole[:-1] & (following[:-1] == candidates[1:])
    broken = numpy.flatnonzero(~chained)
    last = int(broken[0]) if len(broken) else len(candidates) - 1
    if whole[last]:
        starts, stop = candidates[: last + 1], start + int(following[last])
    else:
        starts, stop = candidates[:last], start + int(candidates[last])
    if len(starts) >= VECTOR_ROWS:
        count = _vector_rows(buffer, start, stop, starts, count)
    else:
        count = _walk_rows(buffer, start, stop, count)
    if stop < end and buffer[stop] == wire.DATA_ROW:
        # A value held bytes that look like a row: the rest of the run, one
        # message at a time.
        rest = wire.run_end(buffer, stop, end, maximum)
        count = _walk_rows(buffer, stop, rest, count)
        stop = rest
    return stop, count


def _walk_rows(buffer, start, stop, count):
    unpack_length = _INT32.unpack_from
    unpack_field = _SIGNED32.unpack_from
    unpack_count = _INT16.unpack_from
    offset = start
    while offset < stop:
        end = offset + 1 + unpack_length(buffer, offset + 1)[0]
        if end - offset < 7:
            raise MalformedTarget(wire.DATA_ROW)
        fields = unpack_count(buffer, offset + 5)[0]
        if count is None:
            count = fields
        elif fields != count:
            raise MalformedTarget(wire.DATA_ROW, "with more or fewer fields than its RowDescription")
        position = offset + 7
        for _ in range(fields):
            if position + 4 > end:
                raise MalformedTarget(wire.DATA_ROW)
            length = unpack_field(buffer, position)[0]
            position += 4
            if length == -1:
                continue
            if length < 0 or position + length > end:
                raise MalformedTarget(wire.DATA_ROW)
            position += length
        if position != end:
            raise MalformedTarget(wire.DATA_ROW)
        offset = end
    return count


def _int32_at(buffer, start, size, dtype=">i4"):
    """
    A view of C{buffer[start:start + size]} whose element C{i} is the
    big-endian 32-bit integer at byte C{i}: reading the lengths at many
    offsets is then one indexing operation.
    """
    return numpy.ndarray(shape=(size - 3,), dtype=dtype, buffer=buffer, offset=start, strides=(1,))


def _run_starts(buffer, start, stop):
    """
    Where each message of a run of whole messages of one kind starts,
    relative to C{start}.  Every byte of the kind is a candidate; the run's
    messages are the chain from the first candidate through each one's end.
    Where a value holds bytes that look like a message, the chain is
    followed one message at a time from there.
    """
    size = stop - start
    array = numpy.frombuffer(buffer, dtype=numpy.uint8, count=size, offset=start)
    candidates = numpy.flatnonzero(array[: size - 4] == buffer[start])
    following = _int32_at(buffer, start, size, ">u4")[candidates + 1] + (candidates + 1)
    broken = numpy.flatnonzero(following[:-1] != candidates[1:])
    if not len(broken) and following[-1] == size:
        return candidates
    prefix = int(broken[0]) + 1 if len(broken) else len(candidates)
    starts = candidates[:prefix].tolist()
    index = dict(zip(candidates.tolist(), range(len(candidates))))
    following = following.tolist()
    position = following[prefix - 1]
    while position < size:
        starts.append(position)
        position = following[index[position]]
    return numpy.array(starts, dtype=numpy.int64)


def _vector_rows(buffer, start, stop, starts, count):
    """
    L{_walk_rows} for many rows at once: column by column, every row's
    field is read together.  Positions only grow, so a row whose fields
    overrun it ends past its end, which the last comparison finds; reads
    are clipped to the buffer meanwhile.
    """
    size = stop - start
    ends = numpy.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = size
    if (ends - starts < 7).any():
        raise MalformedTarget(wire.DATA_ROW)
    counts = numpy.ndarray(shape=(size - 1,), dtype=">u2", buffer=buffer, offset=start, strides=(1,))[starts + 5]
    if count is None:
        count = int(counts[0])
    if (counts != count).any():
        raise MalformedTarget(wire.DATA_ROW, "with more or fewer fields than its RowDescription")
    lengths_at = _int32_at(buffer, start, size)
    position = starts + 7
    at = numpy.empty_like(position)
    lowest = numpy.zeros(len(starts), dtype=numpy.int32)
    for _ in range(count):
        numpy.minimum(position, size - 4, out=at)
        lengths = lengths_at[at]
        numpy.minimum(lowest, lengths, out=lowest)
        position += numpy.maximum(lengths, 0)
        position += 4
    # Only -1 (NULL) of the negative lengths is allowed.
    if (position != ends).any() or (lowest < -1).any():
        raise MalformedTarget(wire.DATA_ROW)
    return count
