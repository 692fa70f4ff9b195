"""
How a store guards its space: below a low-water mark of free space (the
file store's volume) or of room left under a configured maximum (the
PostgreSQL store's database) it stops admitting new sessions, so that what
is left holds the events of the sessions and statements in flight and the
gateway's stop; it admits them again by itself once space returns.

The file store's volume is kept by a L{SpaceKeeper}: besides the mark, it
sets room aside (a reserve file) for the events in flight when the volume
fills, and after a write failed for want of space it refuses every event
until one can be written again.
"""

import errno
import os
import re

from twisted.internet import defer, task
from twisted.logger import Logger

from hoopgw import logs
from hoopgw.options import ConfigError
from hoopgw.store import events

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

# A full disk: the errors of a write that may succeed once space is freed.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# The file store's room set aside, in its folder.
RESERVE = "reserve"

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

    def __init__(self, low_water, low_water_percent, backend):
        self.low_water = low_water
        self.backend = backend
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
        Take a measurement: C{free} bytes of C{total}.  A change of state
        is logged.

        @return: the event to record if the state changed, else None.
        """
        self.free, self.total = free, total
        mark = self.mark(total)
        if free < mark and self.since is None:
            self.since = now
            self.refused_sessions = self.refused_attempts = 0
            change = {
                "type": STORE_LOW_SPACE,
                "free_bytes": free,
                "total_bytes": total,
                "low_water_bytes": mark,
                "reason": "free space (%s) is below the low-water mark (%s): new sessions are refused until "
                "space is freed; sessions in flight go on" % (mebibytes(free), mebibytes(mark)),
            }
            logs.store_state(LOW_SPACE, change["reason"], backend=self.backend)
            return change
        if free >= mark and self.since is not None:
            change = {
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
            logs.store_state("space-ok", change["reason"], backend=self.backend)
            return change
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



def every(reactor, interval, check, now):
    """
    Call C{check} every C{interval} seconds from now on (at once too with
    C{now}): a store's measurement of its space.

    @return: the L{task.LoopingCall}, to stop.
    """
    timer = task.LoopingCall(check)
    timer.clock = reactor
    timer.start(interval, now=now)
    return timer


class SpaceKeeper:
    """
    The file store's volume: the low-water mark (L{guard}), the room set
    aside in C{reserve} (given up when a write fails for want of space,
    set aside again once space is above the mark), and the stall that
    follows when even that fails: every event is refused until one can be
    written again, and then C{store.resumed} says what was refused.

    @ivar stalled: since a write failed for want of space, when (C{since}),
        why (C{reason}) and how many events were C{refused}; else None.
    """

    log = Logger()

    def __init__(self, reactor, segment, low_water, low_water_percent, reserve, write, fail, check):
        """
        @param segment: the store's L{hoopgw.store.segments.SegmentFile}.
        @param write: seals and writes an event past the store's screening
            (C{FileStore._write_event}).
        @param fail: fails the store closed, with a reason.
        @param check: the store's space check (L{check} while the store is
            open and not failed).
        """
        self.guard = LowWater(low_water, low_water_percent, "file")
        self.stalled = None
        self._reactor = reactor
        self._segment = segment
        self._reserve = reserve
        self._path = os.path.join(segment.directory, RESERVE)
        self._write = write
        self._fail = fail
        self._check = check
        self._last_resume = None
        self._resuming = False

    def measure(self):
        facts = os.statvfs(self._segment.directory)
        return facts.f_bavail * facts.f_frsize, facts.f_blocks * facts.f_frsize

    def check(self):
        """
        Measure the free space: below the low-water mark, new sessions are
        refused (C{store.low-space}, once); above it again, admitted
        (C{store.space-ok}).  After a full disk, try to resume.
        """
        if self.stalled is not None:
            self._resume()
            return
        try:
            free, total = self.measure()
        except OSError as error:
            self.log.warn("Measuring the store's free space failed: {why}", why=error.strerror)
            return
        change = self.guard.measured(free, total, events.timestamp())
        if change is not None:
            self._write(change).addErrback(lambda failure: None)
        if not self.guard.low:
            self.keep_reserve()

    def keep_reserve(self):
        """
        Set the reserved room aside again, if there is room for it above
        the low-water mark.
        """
        path = self._path
        if not self._reserve or os.path.exists(path):
            return
        try:
            free, total = self.measure()
            if free - self._reserve < self.guard.mark(total):
                return
            fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self._reserve)
            finally:
                os.close(fd)
            os.rename(path + ".new", path)
        except OSError as error:
            self.log.warn("Setting {path} aside failed: {why}", path=path, why=error.strerror)
            try:
                os.unlink(path + ".new")
            except OSError:
                pass

    def _give_up_reserve(self):
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            return False
        self.log.warn("The audit store's volume is full: the reserved room ({reserve}) is given up for the events in flight",
                      reserve=mebibytes(self._reserve))
        return True

    def write_in_reserve(self, data, error):
        """
        Writing C{data} failed with C{error}, for want of space.  Cut what
        part of it reached the segment, give up the room set aside and
        write again; if that fails too, stall: refuse every event until
        space is freed.

        @return: None once the event is written, else why it is not.
        """
        segment = self._segment
        try:
            segment.cut()
            if self._give_up_reserve():
                segment.append(data)
                return None
        except OSError as again:
            error = again
            if error.errno not in NO_SPACE:
                reason = "writing %s failed: %s" % (segment.path, error.strerror)
                self._fail(reason)
                return reason
        self._stall("writing %s failed: %s" % (os.path.basename(segment.path), error.strerror))
        return self._refusal()

    def _stall(self, reason):
        try:
            # Back to the end of the last complete event.
            self._segment.cut()
        except OSError as error:
            self._fail("cutting a torn write from %s failed: %s" % (self._segment.path, error.strerror))
        if self.stalled is None:
            if not self._resuming:
                logs.store_state("stalled", "cannot write: %s; every event is refused until space is freed, "
                                 "then the store resumes by itself" % (reason,), backend="file")
            # (While resuming, L{_resume} puts back what it stalled with.)
            self.stalled = {"since": events.timestamp(), "reason": reason, "refused": 1}

    def _refusal(self):
        return (
            "the audit store cannot write (%s); nothing is let through until space is freed, and the store "
            "resumes by itself then" % (self.stalled["reason"],)
        )

    def refuse(self):
        """
        An event comes while stalled: try to resume (at most once a
        second).

        @return: None once resumed, else why the event is refused (it is
            counted).
        """
        self._resume(throttle=True)
        if self.stalled is None:
            return None
        self.stalled["refused"] += 1
        return self._refusal()

    def _resume(self, throttle=False):
        """
        After a full disk: write C{store.resumed} (when writing stopped, why,
        how many events were refused); once it is written, events are taken
        again.
        """
        now = self._reactor.seconds()
        if throttle and self._last_resume is not None and now - self._last_resume < 1.0:
            return
        self._last_resume = now
        stalled, self.stalled = self.stalled, None
        event = {
            "type": STORE_RESUMED,
            "since": stalled.get("since"),
            "reason": stalled["reason"],
            "refused": stalled["refused"],
        }
        self._resuming = True
        try:
            written = self._write(event)
        finally:
            self._resuming = False
        written.addErrback(lambda failure: None)
        if self.stalled is not None:
            # Still no room: it stays stalled as it was.
            self.stalled = stalled
            return
        logs.store_state("resumed", "writing again after %s; %d event(s) were refused meanwhile"
                         % (stalled["reason"], stalled["refused"]), backend="file", refused=stalled["refused"])
        self._check()
