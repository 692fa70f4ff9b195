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
    body = canonical(event)
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
