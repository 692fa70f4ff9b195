"""
How a store guards its space: below a low-water mark of free space (the
file store's volume) or of room left under a configured maximum (the
PostgreSQL store's database) it stops admitting new sessions, so that what
is left holds the events of the sessions and statements in flight and the
gateway's stop; it admits them again by itself once space returns.
"""

import re

from twisted.internet import defer

from hoopgw.options import ConfigError

# What a store says of itself (L{FileStore.state}, L{PostgresStore.state}),
# for monitoring and readiness checks.
OK = "ok"
LOW_SPACE = "low-space"
FAILED = "failed"

# The events of a state change.
STORE_LOW_SPACE = "store.low-space"
STORE_SPACE_OK = "store.space-ok"
STORE_RESUMED = "store.resumed"

# Events that admit a new session (or record an attempt at one): refused,
# and counted instead, while space is low.
ADMITTING = ("session.start", "session.refused")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def size(value, path):
    """
    A size in bytes: an integer, or a number with a unit (C{256MiB},
    C{4 MB}, C{1GiB}).
    """
    if isinstance(value, bool):
        raise ConfigError(path, "expected a size such as 256MiB, got %r" % (value,))
    if isinstance(value, int) and value >= 0:
        return value
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        raise ConfigError(path, "expected a size such as 256MiB, 4MB or a number of bytes, got %r" % (value,))
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def percent(value, path):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise ConfigError(path, "expected a percentage from 0 to 100, got %r" % (value,))
    return float(value)


def mebibytes(number):
    return "%.1f MiB" % (number / 1024.0 / 1024.0,)


class LowWater:
    """
    The mark: the smaller of C{low_water} bytes and C{low_water_percent}
    of the whole (the volume, or the PostgreSQL store's maximum), so a
    small volume is not always low.

    @ivar since: when space went low (a timestamp), or None while it is not.
    @ivar refused_sessions: new sessions refused since.
    @ivar refused_attempts: refused logins counted, not written, since.
    """

    def __init__(self, low_water, low_water_percent):
        self.low_water = low_water
        self.percent = low_water_percent
        self.since = None
        self.refused_sessions = 0
        self.refused_attempts = 0
        self.free = None
        self.total = None
        # Sessions whose start was refused: their ends are not written
        # either (bounded: a flood cannot grow it).
        self._turned_away = {}

    def mark(self, total):
        return min(self.low_water, int(total * self.percent / 100.0))

    @property
    def low(self):
        return self.since is not None

    def measured(self, free, total, now):
        """
        Take a measurement: C{free} bytes of C{total}.

        @return: the event to record if the state changed, else None.
        """
        self.free, self.total = free, total
        mark = self.mark(total)
        if free < mark and self.since is None:
            self.since = now
            self.refused_sessions = self.refused_attempts = 0
            return {
                "type": STORE_LOW_SPACE,
                "free_bytes": free,
                "total_bytes": total,
                "low_water_bytes": mark,
                "reason": "free space (%s) is below the low-water mark (%s): new sessions are refused until "
                "space is freed; sessions in flight go on" % (mebibytes(free), mebibytes(mark)),
            }
        if free >= mark and self.since is not None:
            event = {
                "type": STORE_SPACE_OK,
                "free_bytes": free,
                "total_bytes": total,
                "low_water_bytes": mark,
                "since": self.since,
                "refused_sessions": self.refused_sessions,
                "refused_attempts": self.refused_attempts,
                "reason": "free space (%s) is above the low-water mark (%s) again: new sessions are admitted"
                % (mebibytes(free), mebibytes(mark)),
            }
            self.since = None
            return event
        return None

    def screen(self, event, refused_by):
        """
        What becomes of C{event} while space is low: None when it is to be
        written; else the L{Deferred} to answer with - a new session's
        start fails with C{refused_by(sentence)} (and its end is not
        written), a refused login is counted, not written.
        """
        kind = event.get("type")
        if kind == "session.end" and self._turned_away.pop(event.get("session"), False):
            return defer.succeed(event)
        if kind not in ADMITTING or not self.low:
            return None
        if kind == "session.start":
            self.refused_sessions += 1
            if len(self._turned_away) < 10000:
                self._turned_away[event.get("session")] = True
            return defer.fail(refused_by(self.refusal()))
        self.refused_attempts += 1
        return defer.succeed(event)

    def refusal(self):
        return "the audit store is low on space (%s free, below the low-water mark of %s): new sessions are refused " \
               "until space is freed" % (mebibytes(self.free or 0), mebibytes(self.mark(self.total or 0)))

