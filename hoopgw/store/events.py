"""
How an event is chained: its canonical JSON form and the hash that links
it to the event before it.  Shared by every store backend and by verify.
"""

import hashlib
import time

import orjson


GENESIS = "0" * 64

# A signed statement, inside the chain, that the chain up to the event
# before it (its C{covers}: seq and hash) is what the gateway wrote.  Its
# C{counts} (events by type before it) let verify say what kind of events
# went missing when some did.
CHECKPOINT = "checkpoint"


# The top-level key listing the fields of an event whose text was escaped
# because it was not valid UTF-8 (see L{escape_text}).
ESCAPED = "escaped"


class UnserialisableEvent(ValueError):
    """
    An event holds something JSON cannot carry: it is not written.
    """


def escape_text(text):
    """
    Text that is not valid UTF-8 (bytes a client sent, decoded with
    C{surrogateescape}), made writable without losing anything: each
    backslash is doubled, each byte that was not UTF-8 becomes C{\\xNN}
    and any other lone surrogate C{\\uXXXX}.  L{unescape_text} undoes it.
    """
    pieces = []
    for character in text:
        point = ord(character)
        if character == "\\":
            pieces.append("\\\\")
        elif 0xDC80 <= point <= 0xDCFF:
            pieces.append("\\x%02x" % (point - 0xDC00,))
        elif 0xD800 <= point <= 0xDFFF:
            pieces.append("\\u%04x" % (point,))
        else:
            pieces.append(character)
    return "".join(pieces)


def unescape_text(text):
    """
    The bytes an escaped field (one named in an event's C{escaped} list)
    stood for.
    """
    out = bytearray()
    position = 0
    end = len(text)
    while position < end:
        character = text[position]
        if character != "\\":
            out += character.encode("utf-8")
            position += 1
        elif text[position + 1] == "\\":
            out += b"\\"
            position += 2
        elif text[position + 1] == "x":
            out.append(int(text[position + 2 : position + 4], 16))
            position += 4
        else:
            out += chr(int(text[position + 2 : position + 6], 16)).encode("utf-8", "surrogatepass")
            position += 6
    return bytes(out)


def _needs_escape(value):
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    if isinstance(value, dict):
        return any(_needs_escape(key) or _needs_escape(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return any(_needs_escape(item) for item in value)
    return False


def _escaped(value, path, paths):
    """
    A copy of C{value} with every string that is not UTF-8 escaped, and
    bytes turned into escaped text; the paths of what was escaped are
    added to C{paths}.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "surrogateescape")
        paths.append(path)
        return escape_text(value)
    if isinstance(value, str):
        if _needs_escape(value):
            paths.append(path)
            return escape_text(value)
        return value
    if isinstance(value, dict):
        return {
            (escape_text(key) if _needs_escape(key) else key): _escaped(item, "%s.%s" % (path, key), paths)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_escaped(item, "%s.%d" % (path, index), paths) for index, item in enumerate(value)]
    return value


def escape_event(event):
    """
    Make C{event} writable in place: each top-level field holding text that
    is not valid UTF-8 (or bytes) is replaced by an escaped copy, and the
    event's C{escaped} list names the path of every escaped string (as
    C{"text"}, C{"parameters.1"}, C{"facts.portal"}), so that a literal
    backslash in any other field is never mistaken for an escape.
    """
    paths = []
    for key in list(event):
        if key != ESCAPED and _needs_escape(event[key]):
            event[key] = _escaped(event[key], key, paths)
    if paths:
        event[ESCAPED] = sorted(set(event.get(ESCAPED, ())) | set(paths))
    return event


def canonical(event):
    """
    The bytes an event's hash covers: the event without its own hash, as
    compact JSON (UTF-8, not escaped) with sorted keys, as orjson writes it.
    """
    if "hash" in event:
        event = {key: value for key, value in event.items() if key != "hash"}
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)


def digest(event):
    return hashlib.sha256(canonical(event)).hexdigest()


def seal(event, seq, prev, now=None, signer=None):
    """
    Give C{event} its place in the chain: a sequence number, a timestamp
    (if it has none), the previous event's hash, and its own hash.  A
    checkpoint is signed here, once it knows which head it covers.

    @return: the event as one line of the store: its canonical form with
        the hash appended as the last key.
    """
    event["seq"] = seq
    event.setdefault("ts", timestamp(now))
    event["prev"] = prev
    if event.get("type") == CHECKPOINT and signer is not None:
        event["covers"] = {"seq": seq - 1, "hash": prev}
        event["key_id"] = signer.key_id
        event["signature"] = signer.sign(checkpoint_message(event))
    event.pop("hash", None)
    try:
        body = canonical(event)
    except TypeError:
        # Rare (a statement that is not UTF-8): escape, and say so in the
        # event, rather than lose the attempt.
        escape_event(event)
        try:
            body = canonical(event)
        except TypeError as error:
            raise UnserialisableEvent("a %s event cannot be written as JSON: %s" % (event.get("type"), error))
    event["hash"] = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + event["hash"].encode("ascii") + b'"}\n'


_second = [None, ""]


def timestamp(now=None):
    """
    An RFC 3339 UTC timestamp with microseconds.
    """
    now = time.time() if now is None else now
    seconds = int(now)
    if _second[0] != seconds:
        # Formatting the date is the slow part; it changes once a second.
        _second[:] = [seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))]
    return "%s.%06dZ" % (_second[1], int((now - seconds) * 1e6))


def checkpoint_message(event):
    """
    The bytes a checkpoint's signature covers: what it vouches for (the
    head it covers, the counts, the gateways running), where it is (its own seq) and when.
    """
    signed = {name: event.get(name) for name in ("covers", "counts", "gateways", "key_id", "seq", "ts")}
    return b"hoopgw-checkpoint-v1\n" + orjson.dumps(signed, option=orjson.OPT_SORT_KEYS)


def epoch(stamp):
    """
    Epoch seconds of a timestamp written by L{timestamp}.
    """
    import calendar

    whole, _, fraction = stamp.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + (float("0." + fraction) if fraction else 0.0)
