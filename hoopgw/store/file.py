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

L{FileStore} runs the store; its parts are read on their own: the segment
files and the chain's end at start (L{hoopgw.store.segments}), the group
commit and its sync process (L{hoopgw.store.commit}), the space kept
(L{hoopgw.store.space.SpaceKeeper}) and retention
(L{hoopgw.store.retention}).
"""

import errno
import fcntl
import hashlib
import os
import time

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from hoopgw import logs
from hoopgw.interfaces import IStore
from hoopgw.store import events, retention, space
from hoopgw.store.checkpoints import ChainState, CheckpointSchedule
from hoopgw.store.commit import LAZY_SYNC, SYNC_RESTARTS, WRITE_AHEAD, WRITE_AHEAD_FSYNC, GroupCommit
from hoopgw.store.errors import StoreError
from hoopgw.store.segments import (
    ARCHIVE,
    ARCHIVED,
    SEGMENT,
    SegmentFile,
    all_segments,
    find_end,
    open_segment,
    read_events,
    segment_paths,
)
from hoopgw.store.space import NO_SPACE, RESERVE

# The names of the parts are found here too, where readers and tests have
# long found them.
__all__ = [
    "ARCHIVE", "ARCHIVED", "LAZY_SYNC", "NO_SPACE", "RESERVE", "SEGMENT", "SYNC_RESTARTS", "WRITE_AHEAD",
    "WRITE_AHEAD_FSYNC", "FileStore", "all_segments", "open_segment", "publish_key", "read_events", "segment_paths",
]


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
        self.casts = os.path.join(directory, "casts")
        self._reactor = reactor
        # (fsync=False is the deprecated spelling of write-ahead.)
        self.durability = durability if fsync else WRITE_AHEAD
        self._ahead = self.durability == WRITE_AHEAD
        self._sync_process = sync_process
        self._segment_bytes = segment_bytes
        self._lock_fd = None
        self._broken = None
        # What open found to write at start: a torn tail kept aside, an
        # unclean end of the previous run.
        self._recovered = None
        self._unclean = None
        self.chain = ChainState()
        self.signer = None
        self._schedule = None
        self._retention = None
        self._retention_timer = None
        # Where event timestamps come from (a test may turn it back).
        self._clock = clock
        self._witness = None
        self._segment = SegmentFile(directory)
        self._commit = GroupCommit(reactor, self._segment, sync_interval, self._fail, self._rotate_if_full)
        self._space = space.SpaceKeeper(reactor, self._segment, low_water, low_water_percent, reserve,
                                        self._write_event, self._fail, self.check_space)
        self._space_interval = space_check_interval
        self._space_timer = None

    @property
    def seq(self):
        return self.chain.seq

    @property
    def head(self):
        return self.chain.head

    @property
    def syncs(self):
        """
        Group commits made so far (fdatasyncs asked and answered).
        """
        return self._commit.syncs

    def state(self):
        """
        What monitoring and readiness checks read: C{"ok"}, C{"low-space"}
        (new sessions are refused until space is freed) or C{"failed"} (no
        event can be written: every command is refused; after a full disk
        the store resumes by itself once it can write again).
        """
        if self._broken is not None or self._space.stalled is not None or self._segment.fd is None:
            return space.FAILED
        return space.LOW_SPACE if self._space.guard.low else space.OK

    def use_witness(self, witness):
        """
        Publish every signed checkpoint, once durable, to C{witness} (a
        L{hoopgw.store.witness.FileWitness}).
        """
        self._witness = witness

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

    def use_retention(self, policy):
        """
        Archive (and, if the policy says so, purge) old segments every
        C{policy.check_interval} seconds while the store is open.
        """
        from twisted.internet import task

        self._retention = policy
        self._retention_timer = task.LoopingCall(self._retention_tick)
        self._retention_timer.clock = self._reactor

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
        path, self.chain, self._recovered = find_end(self.directory)
        # The previous run left gateways marked running, or events after the
        # last checkpoint of a signed record: it did not stop cleanly, which
        # the next start says in the chain.
        running = sorted(self.chain.running)
        unclean = self.chain.recovered(
            running, bool(running), "the previous run ended without stopping cleanly (a crash or a kill)")
        if running or unclean["unsigned"]:
            self._unclean = unclean
        self._segment.open(path)
        if self._sync_process:
            self._commit.start_process()
        self._space.keep_reserve()

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
            self._space_timer = space.every(self._reactor, self._space_interval, self.check_space, now=True)
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
        if self._segment.fd is None:
            return defer.fail(StoreError("the store is not open"))
        if self._space.stalled is not None:
            refusal = self._space.refuse()
            if refusal is not None:
                return defer.fail(StoreError(refusal))
        if event.get("type") in space.ADMITTING:
            self.check_space()
        screened = self._space.guard.screen(event, StoreError)
        if screened is not None:
            return screened
        return self._write_event(event, urgent)

    def _write_event(self, event, urgent=True):
        now = self._clock() if self._clock is not None else None
        try:
            data = events.seal(event, self.chain.seq + 1, self.chain.head, now=now, signer=self.signer)
        except events.UnserialisableEvent as error:
            return defer.fail(error)
        try:
            # Written at once, in order, so readers see it; made durable by
            # the next group commit.
            self._segment.append(data)
        except OSError as error:
            if error.errno not in NO_SPACE:
                self._fail("writing %s failed: %s" % (self._segment.path, error.strerror))
                return defer.fail(StoreError(self._broken))
            refusal = self._space.write_in_reserve(data, error)
            if refusal is not None:
                return defer.fail(StoreError(refusal))
        self.chain.account(event)
        if self._schedule is not None:
            self._schedule.appended(self.chain.since_checkpoint)
        if self._ahead:
            # Written to the OS is what write-ahead promises (a gateway crash
            # loses nothing); the disk follows within the sync interval.  A
            # witness holding a checkpoint a power loss took from the store
            # shows that loss to verify.
            self._commit.written()
            return defer.succeed(event)
        return self._commit.wait(event, urgent)

    def check_space(self):
        """
        Measure the free space now (L{space.SpaceKeeper.check}), unless the
        store is closed or failed.
        """
        if self._segment.fd is None or self._broken is not None:
            return
        self._space.check()

    def _rotate_if_full(self):
        """
        After a sync: start the next segment if this one is full.  What was
        written to this one after the sync was asked for is made durable
        first (a rare sync in the loop: once a segment).
        """
        if self._segment.size < self._segment_bytes:
            return
        try:
            if self._commit.pending():
                self._segment.datasync()
        except OSError as error:
            self._fail("fdatasync of %s failed: %s" % (self._segment.path, error.strerror))
            return
        try:
            self._segment.start_next(self.chain.seq + 1)
        except OSError as error:
            self._fail("starting segment %d failed: %s" % (self.chain.seq + 1, error.strerror))
            return
        self._commit.follow()

    def _fail(self, reason):
        """
        The store cannot be trusted to hold more events: refuse every
        append from now on (fail closed).
        """
        self._broken = reason
        logs.store_state("failed", "%s; every event is refused (fail closed)" % (reason,), backend="file")
        self._commit.fail(reason)

    def _retention_tick(self):
        return self.archive().addErrback(lambda failure: self.log.failure("Archiving old segments failed", failure))

    def archive(self, now=None):
        """
        Apply the retention policy now (L{hoopgw.store.retention.archive}).

        @return: a Deferred firing with C{(archived names, purged names)}.
        """
        if now is None:
            now = self._clock() if self._clock is not None else time.time()
        return retention.archive(self, self._retention, now, self._segment.path)

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
            if self.signer is not None and self.chain.since_checkpoint and self._broken is None and self._segment.fd is not None:
                self.checkpoint("stop").addErrback(lambda failure: logs.failed(self.log, failure, "The closing checkpoint failed"))
        draining = self._commit.drain()
        if draining is not None:
            return draining.addBoth(lambda _: self.close())
        self._commit.stop()
        # (With write-ahead, what was written since the last background sync.)
        self._segment.close(sync=self._broken is None)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return defer.succeed(None)
