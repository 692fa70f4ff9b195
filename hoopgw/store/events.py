"""
How an event is chained: its canonical JSON form and the hash that links
it to the event before it.  Shared by every store backend and by verify.
"""

import hashlib
import time

import orjson


GENESIS = "0" * 64


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


def seal(event, seq, prev, now=None):
    """
    Give C{event} its place in the chain: a sequence number, a timestamp
    (if it has none), the previous event's hash, and its own hash.

    @return: the event as one line of the store: its canonical form with
        the hash appended as the last key.
    """
    event["seq"] = seq
    event.setdefault("ts", timestamp(now))
    event["prev"] = prev
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
