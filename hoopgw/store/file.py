"""
The embedded evidence store: a folder of JSON-lines segments, one event a
line, hash-chained across the whole store.  Appends are group-committed:
every event written in the meantime shares one fdatasync, and an append's
Deferred fires only once its event is on disk (write-ahead).

It guards its volume's space (L{hoopgw.store.space}): below the low-water
mark it refuses new sessions; when a write fails for want of space it cuts
the write back to the last complete event, gives up the room it set aside,
and failing that refuses every event until it can write again, then
resumes by itself.
"""

import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import time

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from hoopgw import metrics
from hoopgw.interfaces import IStore
from hoopgw.store import events, space
from hoopgw.store.checkpoints import GATEWAY_RECOVERED, ChainState, CheckpointSchedule
from hoopgw.store.errors import StoreError
from hoopgw.store.sync import SyncProcess, SyncProcessLost


SEGMENT = re.compile(r"^events-(\d{12})\.jsonl$")
ARCHIVED = re.compile(r"^events-(\d{12})\.jsonl\.gz$")
ARCHIVE = "archive"


def segment_paths(directory):
    """
    The store's segments in chain order.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [os.path.join(directory, name) for name in sorted(names) if SEGMENT.match(name)]


def all_segments(directory):
    """
    Every segment of the store in chain order, the archived (compressed,
    in C{archive/}) before the live ones.  A segment found in both (a crash
    while archiving) is read from the live copy.
    """
    live = segment_paths(directory)
    names = {os.path.basename(path) for path in live}
    try:
        archived = sorted(os.listdir(os.path.join(directory, ARCHIVE)))
    except FileNotFoundError:
        archived = []
    older = [
        os.path.join(directory, ARCHIVE, name)
        for name in archived
        if ARCHIVED.match(name) and name[: -len(".gz")] not in names
    ]
    return sorted(older + live, key=lambda path: os.path.basename(path))


def open_segment(path):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def read_events(directory):
    """
    Every event in the store (archived segments too), in order, as
    C{(segment path, line number, raw line, parsed event or None)}.  A line
    that is not JSON is given with C{None} so that verify can name it.
    """
    for path in all_segments(directory):
        with open_segment(path) as handle:
            for number, raw in enumerate(handle, 1):
                try:
                    event = json.loads(raw)
                except ValueError:
                    event = None
                yield path, number, raw, event


def _last_line(path):
    """
    The last complete line of a file, and the offset where a torn
    (unterminated) tail starts, if any.
    """
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        block = 1 << 16
        position = size
        tail = b""
        while position > 0:
            step = min(block, position)
            position -= step
            handle.seek(position)
            tail = handle.read(step) + tail
            if tail.count(b"\n") >= 2 or position == 0:
                break
    complete_end = tail.rfind(b"\n") + 1
    torn_at = None
    if complete_end < len(tail):
        torn_at = size - (len(tail) - complete_end)
    lines = tail[:complete_end].splitlines()
    return (lines[-1] if lines else None), torn_at


def publish_key(directory, key_id, pem):
    """
    Keep the public half of a signing key beside the events, as
    C{keys/KEY_ID.pem}, so the evidence carries what it was signed with.
    """
    keys = os.path.join(directory, "keys")
    os.makedirs(keys, exist_ok=True)
    path = os.path.join(keys, key_id + ".pem")
    if not os.path.exists(path):
        with open(path, "w", encoding="ascii") as handle:
            handle.write(pem)


_CHECKPOINT_MARK = b'"type":"checkpoint"'
# What an append waits for (gateway.store.durability): its event synced to
# disk, or only written to the operating system (synced in the background
# within sync_interval).
WRITE_AHEAD_FSYNC = "write-ahead-fsync"
WRITE_AHEAD = "write-ahead"
# How long an event nobody waits on (a command's end) may wait for a sync
# that an urgent, write-ahead event would bring anyway.
LAZY_SYNC = 0.05
# A lost sync process is replaced this many times in a row (without a sync
# answered in between) before the store syncs in its event loop instead.
SYNC_RESTARTS = 3
# A full disk: the errors of a write that may succeed once space is freed.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
RESERVE = "reserve"


def _last_checkpoint_position(segments):
    """
    Where the chain's last checkpoint line starts: C{(segment index, byte
    offset)}, or C{(0, 0)} when it has none.  Found by searching the raw
    bytes backwards, so a long chain is not parsed to find its end.
    """
    for index in range(len(segments) - 1, -1, -1):
        with open(segments[index], "rb") as handle:
            data = handle.read()
        end = len(data)
        while True:
            found = data.rfind(_CHECKPOINT_MARK, 0, end)
            if found < 0:
                break
            line_start = data.rfind(b"\n", 0, found) + 1
            line_end = data.find(b"\n", found)
            try:
                if json.loads(data[line_start : line_end if line_end >= 0 else None]).get("type") == events.CHECKPOINT:
                    return index, line_start
            except ValueError:
                pass
            end = line_start
    return 0, 0


def _tail_from_last_checkpoint(segments):
    """
    The chain's events from its last checkpoint to its end (all of them
    when it has none), one at a time: memory stays flat however long the
    chain is.
    """
    first, offset = _last_checkpoint_position(segments)
    for index in range(first, len(segments)):
        with open(segments[index], "rb") as handle:
            if index == first:
                handle.seek(offset)
            for line in handle:
                if line.strip():
                    yield json.loads(line)


@implementer(IStore)
class FileStore:
    """
    An append-only, hash-chained event store in a folder.

    @ivar directory: the folder.
    @ivar seq: the sequence number of the last event.
    @ivar head: the hash of the last event.
    """

    log = Logger()

    def __init__(self, directory, reactor, fsync=True, segment_bytes=64 * 1024 * 1024, clock=None,
                 sync_process=False, low_water=256 * 1024 * 1024, low_water_percent=5.0, reserve=4 * 1024 * 1024,
                 space_check_interval=5.0, durability=WRITE_AHEAD_FSYNC, sync_interval=0.05):
        self.directory = directory
        self._sync_process = sync_process
        self.casts = os.path.join(directory, "casts")
        self._reactor = reactor
        # (fsync=False is the deprecated spelling of write-ahead.)
        self.durability = durability if fsync else WRITE_AHEAD
        self._ahead = self.durability == WRITE_AHEAD
        self._sync_interval = sync_interval
        # When the oldest event written but not yet asked to be synced was
        # written (write-ahead): the background sync is due sync_interval later.
        self._unsynced_since = None
        # Group commits made so far (fdatasyncs asked and answered).
        self.syncs = 0
        self._segment_bytes = segment_bytes
        self._fd = None
        self._lock_fd = None
        self._size = 0
        self._waiting = []
        self._syncing = False
        # The sync that events nobody waits on get if no urgent one comes.
        self._lazy = None
        self._broken = None
        self._syncer = None
        self._recovered = None
        self._unclean = None
        self.chain = ChainState()
        self.signer = None
        self._schedule = None
        self._retention = None
        self._retention_timer = None
        # Where event timestamps come from (a test may turn it back).
        self._clock = clock
        self._restarts = 0
        # Space: the low-water mark, the room set aside, and - after a write
        # failed for want of space - what the store refused since.
        self._guard = space.LowWater(low_water, low_water_percent)
        self._reserve = reserve
        self._space_interval = space_check_interval
        self._space_timer = None
        self._stalled = None
        self._last_resume = None
        self._resuming = False
        self._witness = None

    @property
    def seq(self):
        return self.chain.seq

    def state(self):
        """
        What monitoring and readiness checks read: C{"ok"}, C{"low-space"}
        (new sessions are refused until space is freed) or C{"failed"} (no
        event can be written: every command is refused; after a full disk
        the store resumes by itself once it can write again).
        """
        if self._broken is not None or self._stalled is not None or self._fd is None:
            return space.FAILED
        return space.LOW_SPACE if self._guard.low else space.OK

    def use_witness(self, witness):
        """
        Publish every signed checkpoint, once durable, to C{witness} (a
        L{hoopgw.store.witness.FileWitness}).
        """
        self._witness = witness

    @property
    def head(self):
        return self.chain.head

    def use_signer(self, signer, every_events=1000, every_seconds=60.0):
        """
        Sign the chain with C{signer} (a L{hoopgw.store.signing.Signer}):
        a checkpoint every C{every_events} events or C{every_seconds}
        seconds, and one when the store closes.  The public key is
        published in the store's C{keys} folder.
        """
        self.signer = signer
        self._schedule = CheckpointSchedule(self, self._reactor, every_events, every_seconds)
        publish_key(self.directory, signer.key_id, signer.public_pem)

    def open(self):
        """
        Take the store's lock, find the end of the chain and get ready to
        append.

        @raise StoreError: if another process holds the store, or its last
            event does not match its own hash.
        """
        os.makedirs(self.casts, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.directory, "store.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(self._lock_fd)
            self._lock_fd = None
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise StoreError("another gateway process is writing to the store at %s" % (self.directory,))
            raise
        segments = segment_paths(self.directory)
        if segments:
            path = segments[-1]
            last, torn_at = _last_line(path)
            if torn_at is not None:
                self._recover_torn_tail(path, torn_at)
            if last is None and len(segments) > 1:
                last, _ = _last_line(segments[-2])
            if last is not None:
                event = json.loads(last)
                if events.digest(event) != event.get("hash"):
                    raise StoreError(
                        "the last event of %s does not match its hash: the store was altered; "
                        "run 'hoopgw verify %s' before starting the gateway" % (path, self.directory)
                    )
                self.chain = ChainState.rebuild(_tail_from_last_checkpoint(segments))
                self._note_unclean_end()
        else:
            path = os.path.join(self.directory, "events-%012d.jsonl" % (1,))
        self._open_segment(path)
        if self._sync_process:
            self._syncer = SyncProcess(self._reactor)
            self._syncer.open(self._segment).addErrback(self._sync_process_failed, None, self._syncer)
        self._keep_reserve()

    def _recover_torn_tail(self, path, torn_at):
        """
        A crash left half a line at the end of the last segment.  It was
        never acknowledged as durable; keep its bytes aside and say so in the
        chain.
        """
        with open(path, "rb+") as handle:
            handle.seek(torn_at)
            torn = handle.read()
            handle.truncate(torn_at)
        aside = os.path.join(self.directory, "torn-%d.bin" % (torn_at,))
        with open(aside, "wb") as handle:
            handle.write(torn)
        self._recovered = {
            "type": "store.recovered",
            "segment": os.path.basename(path),
            "torn_bytes": len(torn),
            "torn_sha256": hashlib.sha256(torn).hexdigest(),
            "kept_in": os.path.basename(aside),
        }

    def _note_unclean_end(self):
        """
        The previous run left gateways marked running, or events after the
        last checkpoint of a signed record: it did not stop cleanly.  The
        next start says so in the chain.
        """
        state = self.chain
        unsigned = (state.last_checkpoint is not None or state.running) and state.since_checkpoint > 0
        if state.running or unsigned:
            self._unclean = {
                "type": GATEWAY_RECOVERED,
                "crashed": sorted(state.running),
                "unsigned": {"from": (state.last_checkpoint or 0) + 1, "to": state.seq} if unsigned else None,
                "reason": "the previous run ended without stopping cleanly (a crash or a kill)",
            }

    def _open_segment(self, path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
        self._segment = path

    def start(self, instance=None):
        """
        Write what recovery found, if anything, sign it, and start the
        checkpoint and space timers.

        @param instance: the id of the gateway run starting: the recovery
            event names it, so the checkpoint signing the recovery does too.
        @return: a L{Deferred}.
        """
        written = []
        if self._recovered is not None:
            recovered, self._recovered = self._recovered, None
            written.append(self.append(recovered))
        if self._unclean is not None:
            unclean, self._unclean = self._unclean, None
            if instance is not None:
                unclean["by"] = instance
            written.append(self.append(unclean))
            if self.signer is not None:
                written.append(self.checkpoint("recovered"))
        if self._schedule is not None:
            self._schedule.start()
        if self._retention_timer is not None and not self._retention_timer.running:
            self._retention_timer.start(self._retention.check_interval, now=True)
        if self._space_interval and self._space_timer is None:
            from twisted.internet import task

            self._space_timer = task.LoopingCall(self.check_space)
            self._space_timer.clock = self._reactor
            self._space_timer.start(self._space_interval, now=True)
        return defer.gatherResults(written, consumeErrors=True).addCallback(lambda _: None)

    def unsigned_events(self):
        return self.chain.since_checkpoint

    def checkpoint(self, reason):
        """
        Append a signed checkpoint covering the chain so far.
        """
        event = {"type": events.CHECKPOINT, "reason": reason}
        event.update(self.chain.checkpoint_fields())
        written = self.append(event)
        if self._witness is not None and self.signer is not None:
            written.addCallback(lambda sealed: (self._witness.publish(sealed), sealed)[1])
        return written

    def append(self, event, urgent=True):
        if self._broken is not None:
            return defer.fail(StoreError("the store failed earlier and takes no more events: %s" % (self._broken,)))
        if self._fd is None:
            return defer.fail(StoreError("the store is not open"))
        if self._stalled is not None:
            self._resume(throttle=True)
            if self._stalled is not None:
                self._stalled["refused"] += 1
                return defer.fail(StoreError(
                    "the audit store cannot write (%s); nothing is let through until space is freed, and the "
                    "store resumes by itself then" % (self._stalled["reason"],)))
        if event.get("type") in space.ADMITTING:
            self.check_space()
        screened = self._guard.screen(event, StoreError)
        if screened is not None:
            return screened
        return self._write_event(event, urgent)

    def _write_event(self, event, urgent=True):
        now = self._clock() if self._clock is not None else None
        try:
            data = events.seal(event, self.seq + 1, self.head, now=now, signer=self.signer)
        except events.UnserialisableEvent as error:
            return defer.fail(error)
        try:
            # Written at once, in order, so readers see it; made durable by
            # the next group commit.
            self._write(data)
        except OSError as error:
            if error.errno not in NO_SPACE:
                self._fail("writing %s failed: %s" % (self._segment, error.strerror))
                return defer.fail(StoreError(self._broken))
            refusal = self._write_in_reserve(data, error)
            if refusal is not None:
                return defer.fail(StoreError(refusal))
        self.chain.account(event)
        self._size += len(data)
        if self._schedule is not None:
            self._schedule.appended(self.chain.since_checkpoint)
        if self._ahead:
            # Written to the OS is what write-ahead promises (a gateway crash
            # loses nothing); the disk follows within the sync interval.  A
            # witness holding a checkpoint a power loss took from the store
            # shows that loss to verify.
            self._sync_in_background()
            return defer.succeed(event)
        d = defer.Deferred()
        self._waiting.append((d, event))
        if self._syncing:
            pass
        elif urgent:
            self._sync()
        elif self._lazy is None:
            self._lazy = self._reactor.callLater(LAZY_SYNC, self._sync)
        return d

    def _sync_in_background(self):
        if self._unsynced_since is None:
            self._unsynced_since = self._reactor.seconds()
        if not self._syncing and self._lazy is None:
            self._lazy = self._reactor.callLater(self._sync_interval, self._sync)

    def _write(self, data):
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _write_in_reserve(self, data, error):
        """
        A write failed for want of space.  Cut what part of it reached the
        segment (a torn line would read as an edit), give up the room set
        aside and write again; if that fails too, stall: refuse every event
        until space is freed.

        @return: None once the event is written, else why it is not.
        """
        try:
            os.ftruncate(self._fd, self._size)
            if self._give_up_reserve():
                self._write(data)
                return None
        except OSError as again:
            error = again
            if error.errno not in NO_SPACE:
                self._fail("writing %s failed: %s" % (self._segment, error.strerror))
                return self._broken
        self._stall("writing %s failed: %s" % (os.path.basename(self._segment), error.strerror))
        return (
            "the audit store cannot write (%s); nothing is let through until space is freed, and the store "
            "resumes by itself then" % (self._stalled["reason"],)
        )

    def _stall(self, reason):
        try:
            # Back to the end of the last complete event.
            os.ftruncate(self._fd, self._size)
        except OSError as error:
            self._fail("cutting a torn write from %s failed: %s" % (self._segment, error.strerror))
        if self._stalled is None:
            if not self._resuming:
                self.log.critical(
                    "The audit store cannot write: {reason}; every event is refused until space is freed, "
                    "then the store resumes by itself", reason=reason)
            # (While resuming, L{_resume} puts back what it stalled with.)
            self._stalled = {"since": events.timestamp(), "reason": reason, "refused": 1}

    def _give_up_reserve(self):
        path = os.path.join(self.directory, RESERVE)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        self.log.warn("The audit store's volume is full: the reserved room ({reserve}) is given up for the events in flight",
                      reserve=space.mebibytes(self._reserve))
        return True

    def _keep_reserve(self):
        """
        Set the reserved room aside again, if there is room for it above
        the low-water mark.
        """
        path = os.path.join(self.directory, RESERVE)
        if not self._reserve or os.path.exists(path):
            return
        try:
            free, total = self._measure()
            if free - self._reserve < self._guard.mark(total):
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

    def _measure(self):
        facts = os.statvfs(self.directory)
        return facts.f_bavail * facts.f_frsize, facts.f_blocks * facts.f_frsize

    def check_space(self):
        """
        Measure the free space: below the low-water mark, new sessions are
        refused (C{store.low-space}, once); above it again, admitted
        (C{store.space-ok}).  After a full disk, try to resume.
        """
        if self._fd is None or self._broken is not None:
            return
        if self._stalled is not None:
            self._resume()
            return
        try:
            free, total = self._measure()
        except OSError as error:
            self.log.warn("Measuring the store's free space failed: {why}", why=error.strerror)
            return
        change = self._guard.measured(free, total, events.timestamp())
        if change is not None:
            if change["type"] == space.STORE_LOW_SPACE:
                self.log.critical("{reason}", reason=change["reason"])
            else:
                self.log.warn("{reason}", reason=change["reason"])
            self._write_event(change).addErrback(lambda failure: None)
        if not self._guard.low:
            self._keep_reserve()

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
        stalled, self._stalled = self._stalled, None
        event = {
            "type": space.STORE_RESUMED,
            "since": stalled.get("since"),
            "reason": stalled["reason"],
            "refused": stalled["refused"],
        }
        self._resuming = True
        try:
            written = self._write_event(event)
        finally:
            self._resuming = False
        written.addErrback(lambda failure: None)
        if self._stalled is not None:
            # Still no room: it stays stalled as it was.
            self._stalled = stalled
            return
        self.log.warn("The audit store writes again; {refused} event(s) were refused meanwhile", refused=stalled["refused"])
        self.check_space()

    def _sync(self):
        """
        One fdatasync for everything written since the last one (group
        commit), asked at the end of this turn of the event loop so that
        every command received in it shares the sync.  With a sync process
        the loop goes on meanwhile and what is appended until it answers
        shares the next sync; without one the loop waits on the disk.
        """
        self._syncing = True
        if self._lazy is not None:
            if self._lazy.active():
                self._lazy.cancel()
            self._lazy = None
        self._reactor.callLater(0, self._sync_now)

    def _sync_now(self):
        batch, self._waiting = self._waiting, []
        # Everything written so far is covered by this sync.
        self._unsynced_since = None
        self._sync_started = time.monotonic()
        if self._syncer is not None:
            self._syncer.sync().addCallbacks(
                lambda _: self._synced(batch, None), self._sync_process_failed, errbackArgs=(batch, self._syncer)
            )
            return
        try:
            os.fdatasync(self._fd)
            error = None
        except OSError as failure:
            error = failure
        self._synced(batch, error)

    def _sync_process_failed(self, failure, batch=(), syncer=None):
        """
        The sync process could not sync, or went away.  Gone, a new one
        takes over (up to L{SYNC_RESTARTS} times in a row, then syncing in
        the loop does) and covers what it was asked; a failed sync fails
        the store.
        """
        if batch is not None:
            self._syncing = False
        reason = "syncing %s failed: %s" % (self._segment, failure.getErrorMessage())
        if failure.check(SyncProcessLost) and self._broken is None and self._fd is not None:
            reason = None
            if self._syncer is not None and self._syncer is syncer and self._restarts < SYNC_RESTARTS:
                self._restarts += 1
                try:
                    self._syncer = SyncProcess(self._reactor)
                except OSError as error:
                    self.log.warn("Starting a new sync process failed: {why}", why=error.strerror)
                else:
                    self.log.warn("{why}; a new sync process ({pid}) takes over", why=failure.getErrorMessage(),
                                  pid=self._syncer.pid)
                    # It follows the segment (making its folder entry durable),
                    # then syncs what the lost one was asked.
                    self._syncer.open(self._segment).addErrback(self._sync_process_failed, None, self._syncer)
                    syncer = None
            if self._syncer is not None and self._syncer is syncer:
                self.log.warn("{why}; the store syncs in the event loop from now on", why=failure.getErrorMessage())
                self._syncer = None
                try:
                    # It may not have made the current segment's folder entry durable.
                    self._sync_folder()
                except OSError as error:
                    reason = "syncing %s failed: %s" % (self.directory, error.strerror)
            if reason is None:
                if batch is not None:
                    self._waiting[:0] = batch
                    self._syncing = True
                    self._sync_now()
                return
        if self._broken is None:
            self._fail(reason)
        for d, _ in batch or ():
            d.errback(StoreError(self._broken))

    def _synced(self, batch, error):
        self._syncing = False
        self.syncs += 1
        metrics.store_fsync_seconds.labels("file").observe(time.monotonic() - self._sync_started)
        if error is not None:
            self._fail("fdatasync of %s failed: %s" % (self._segment, error.strerror))
        if self._broken is not None:
            # Failed by this sync, or earlier while it was under way.
            for d, _ in batch:
                d.errback(StoreError(self._broken))
            return
        self._restarts = 0
        if self._size >= self._segment_bytes:
            self._rotate()
        for d, event in batch:
            d.callback(event)
        if self._waiting and not self._syncing:
            # They came while this sync ran: the next group is formed
            # already, so it is asked now rather than a loop turn later.
            self._syncing = True
            if self._lazy is not None:
                if self._lazy.active():
                    self._lazy.cancel()
                self._lazy = None
            self._sync_now()
        elif self._unsynced_since is not None and not self._syncing and self._lazy is None:
            # Written while this sync ran (write-ahead): due within the
            # interval of the first of them.
            due = self._unsynced_since + self._sync_interval - self._reactor.seconds()
            self._lazy = self._reactor.callLater(max(0.0, due), self._sync)

    def _fail(self, reason):
        """
        The store cannot be trusted to hold more events: refuse every
        append from now on (fail closed).
        """
        self._broken = reason
        self.log.critical("Audit store failure: {reason}", reason=reason)
        if self._lazy is not None and self._lazy.active():
            self._lazy.cancel()
        self._lazy = None
        waiting, self._waiting = self._waiting, []
        for d, _ in waiting:
            d.errback(StoreError(reason))

    def _rotate(self):
        """
        Start the next segment.  What was written to this one after the
        last sync was asked for is made durable first (a rare sync in the
        loop: once a segment).
        """
        try:
            if self._waiting or self._unsynced_since is not None:
                os.fdatasync(self._fd)
        except OSError as error:
            self._fail("fdatasync of %s failed: %s" % (self._segment, error.strerror))
            return
        os.close(self._fd)
        try:
            self._open_segment(os.path.join(self.directory, "events-%012d.jsonl" % (self.seq + 1,)))
        except OSError as error:
            self._fd = None
            self._fail("starting segment %d failed: %s" % (self.seq + 1, error.strerror))
            return
        if self._syncer is not None:
            self._syncer.open(self._segment).addErrback(self._sync_process_failed, None, self._syncer)
        else:
            self._sync_folder()

    def _sync_folder(self):
        # A new segment's entry in the folder is part of what is durable.
        folder = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def use_retention(self, policy):
        """
        Archive (and, if the policy says so, purge) old segments every
        C{policy.check_interval} seconds while the store is open.
        """
        from twisted.internet import task

        self._retention = policy
        self._retention_timer = task.LoopingCall(self._retention_tick)
        self._retention_timer.clock = self._reactor

    def _retention_tick(self):
        return self.archive().addErrback(lambda failure: self.log.failure("Archiving old segments failed", failure))

    @defer.inlineCallbacks
    def archive(self, now=None):
        """
        Apply the retention policy now: compress segments whose newest event
        is older than the online period into C{archive/}, and with purge,
        remove archived segments older than the keep period.  The chain
        records each step and a checkpoint signs it before any file goes.

        @return: a Deferred firing with C{(archived names, purged names)}.
        """
        import time

        from hoopgw.store import retention

        policy = self._retention
        if now is None:
            now = self._clock() if self._clock is not None else time.time()
        archive_dir = os.path.join(self.directory, ARCHIVE)
        archived, removals = [], []
        for path in segment_paths(self.directory):
            if path == self._segment:
                break
            first, last = yield threads.deferToThread(retention.bounds, path)
            if last is None or now - events.epoch(last["ts"]) < policy.online:
                break
            target, digest, size = yield threads.deferToThread(retention.compress, path, archive_dir)
            yield self.append({
                "type": "store.archived",
                "segment": os.path.basename(path),
                "archive": os.path.join(ARCHIVE, os.path.basename(target)),
                "first_seq": first["seq"],
                "last_seq": last["seq"],
                "last_hash": last["hash"],
                "sha256": digest,
                "bytes": size,
                "reason": "older than %d days online (%s)" % (policy.online / 86400, policy.describe()),
            })
            archived.append(os.path.basename(path))
            removals.append(path)
        purged = []
        if policy.purge:
            names = sorted(name for name in os.listdir(archive_dir) if ARCHIVED.match(name)) if os.path.isdir(archive_dir) else []
            for name in names:
                path = os.path.join(archive_dir, name)
                first, last = yield threads.deferToThread(retention.bounds, path)
                if last is None or now - events.epoch(last["ts"]) < policy.keep:
                    break
                recordings = yield threads.deferToThread(retention.committed_casts, path)
                yield self.append({
                    "type": "store.purged",
                    "archive": os.path.join(ARCHIVE, os.path.basename(path)),
                    "first_seq": first["seq"],
                    "up_to": {"seq": last["seq"], "hash": last["hash"]},
                    "casts": len(recordings),
                    "reason": "older than %d days kept (%s)" % (policy.keep / 86400, policy.describe()),
                })
                purged.append(os.path.basename(path))
                removals.append(path)
                removals.extend(
                    os.path.join(self.casts, name)
                    for name in recordings
                    if os.sep not in name and not name.startswith(".") and os.path.exists(os.path.join(self.casts, name))
                )
        if removals:
            if self.signer is not None:
                yield self.checkpoint("retention")
            for path in removals:
                os.unlink(path)
        return archived, purged

    def write_attachment(self, name, data):
        """
        Write a blob (an asciicast) into the store's C{casts} folder,
        durably, and return its SHA-256.
        """
        if os.sep in name or name.startswith("."):
            return defer.fail(ValueError("attachment names are plain file names, not %r" % (name,)))
        path = os.path.join(self.casts, name)

        def write():
            with open(path, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            return hashlib.sha256(data).hexdigest()

        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), write)

    def close(self):
        """
        Sign what is not signed yet, wait for pending appends, then stop the
        writer and release the files.
        """
        if self._retention_timer is not None and self._retention_timer.running:
            self._retention_timer.stop()
        if self._space_timer is not None and self._space_timer.running:
            self._space_timer.stop()
        if self._schedule is not None:
            schedule, self._schedule = self._schedule, None
            schedule.stop()
            if self.signer is not None and self.chain.since_checkpoint and self._broken is None and self._fd is not None:
                self.checkpoint("stop").addErrback(lambda failure: self.log.failure("The closing checkpoint failed", failure))
        if self._waiting and not self._syncing:
            # Events nobody waited on are made durable now, not later.
            self._sync()
        if self._syncing:
            done = defer.Deferred()
            self._waiting.append((done, None))
            return done.addBoth(lambda _: self.close())
        if self._syncer is not None:
            syncer, self._syncer = self._syncer, None
            syncer.stop()
        if self._lazy is not None and self._lazy.active():
            self._lazy.cancel()
        self._lazy = None
        if self._fd is not None:
            if self._broken is None:
                # (With write-ahead, what was written since the last background sync.)
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return defer.succeed(None)
