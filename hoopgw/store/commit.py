"""
The file store's group commit: one fdatasync for every event written in
the meantime.  With durability C{write-ahead-fsync} an append waits for
the sync covering its event; with C{write-ahead} it does not, and the
events written are synced in the background within C{sync_interval}.
The sync is made by the store's sync process (L{hoopgw.store.sync}), or
in the event loop when there is none - or when a lost one could not be
replaced L{SYNC_RESTARTS} times in a row.
"""

import time

from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import metrics
from hoopgw.store.errors import StoreError
from hoopgw.store.segments import sync_folder
from hoopgw.store.sync import SyncProcess, SyncProcessLost


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


class GroupCommit:
    """
    The syncs of a L{hoopgw.store.segments.SegmentFile}, and the appends
    waiting for them.

    @ivar syncs: group commits made so far (fdatasyncs asked and answered).
    @ivar syncer: the L{SyncProcess}, or None when syncing in the loop.
    @ivar waiting: C{(Deferred, event)} of the appends the next sync covers.
    @ivar syncing: whether a sync is asked and not yet answered.
    @ivar failed: why the store failed (L{fail}), or None.
    """

    log = Logger()

    def __init__(self, reactor, segment, sync_interval, on_failure, after_sync):
        """
        @param on_failure: called with a reason when a sync fails: the store
            fails closed (and calls L{fail}).
        @param after_sync: called once a sync succeeded, before the appends
            it covered are answered (the store rotates a full segment).
        """
        self._reactor = reactor
        self._segment = segment
        self._sync_interval = sync_interval
        self._on_failure = on_failure
        self._after_sync = after_sync
        self.syncs = 0
        self.syncer = None
        self.waiting = []
        self.syncing = False
        self.failed = None
        self._restarts = 0
        # The sync that events nobody waits on get if no urgent one comes.
        self._lazy = None
        # When the oldest event written but not yet asked to be synced was
        # written (write-ahead): the background sync is due sync_interval later.
        self.unsynced_since = None
        self._sync_started = None

    def start_process(self):
        """
        Sync in a process of its own from now on; it follows the current
        segment.

        @raise OSError: if it cannot be started.
        """
        self.syncer = SyncProcess(self._reactor)
        self.follow()

    def follow(self):
        """
        The segment has changed: the sync process follows the new one, or
        its folder entry is made durable here.
        """
        if self.syncer is not None:
            self.syncer.open(self._segment.path).addErrback(self._sync_process_failed, None, self.syncer)
        else:
            sync_folder(self._segment.directory)

    def wait(self, event, urgent):
        """
        A Deferred that fires with C{event} once the sync covering it is
        done: asked at the end of this loop turn when C{urgent}, else
        within L{LAZY_SYNC} seconds.
        """
        d = defer.Deferred()
        self.waiting.append((d, event))
        if self.syncing:
            pass
        elif urgent:
            self._sync()
        elif self._lazy is None:
            self._lazy = self._reactor.callLater(LAZY_SYNC, self._sync)
        return d

    def written(self):
        """
        An event was written nobody waits on (write-ahead): it is synced
        in the background within the sync interval of the first such.
        """
        if self.unsynced_since is None:
            self.unsynced_since = self._reactor.seconds()
        if not self.syncing and self._lazy is None:
            self._lazy = self._reactor.callLater(self._sync_interval, self._sync)

    def pending(self):
        """
        Whether something written has not been asked to be synced yet.
        """
        return bool(self.waiting) or self.unsynced_since is not None

    def _sync(self):
        """
        One fdatasync for everything written since the last one (group
        commit), asked at the end of this turn of the event loop so that
        every command received in it shares the sync.  With a sync process
        the loop goes on meanwhile and what is appended until it answers
        shares the next sync; without one the loop waits on the disk.
        """
        self.syncing = True
        self._cancel_lazy()
        self._reactor.callLater(0, self._sync_now)

    def _cancel_lazy(self):
        if self._lazy is not None:
            if self._lazy.active():
                self._lazy.cancel()
            self._lazy = None

    def _sync_now(self):
        batch, self.waiting = self.waiting, []
        # Everything written so far is covered by this sync.
        self.unsynced_since = None
        self._sync_started = time.monotonic()
        if self.syncer is not None:
            self.syncer.sync().addCallbacks(
                lambda _: self._synced(batch, None), self._sync_process_failed, errbackArgs=(batch, self.syncer)
            )
            return
        try:
            self._segment.datasync()
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
            self.syncing = False
        reason = "syncing %s failed: %s" % (self._segment.path, failure.getErrorMessage())
        if failure.check(SyncProcessLost) and self.failed is None and self._segment.fd is not None:
            reason = None
            if self.syncer is not None and self.syncer is syncer and self._restarts < SYNC_RESTARTS:
                self._restarts += 1
                try:
                    self.syncer = SyncProcess(self._reactor)
                except OSError as error:
                    self.log.warn("Starting a new sync process failed: {why}", why=error.strerror)
                else:
                    self.log.warn("{why}; a new sync process ({pid}) takes over", why=failure.getErrorMessage(),
                                  pid=self.syncer.pid)
                    # It follows the segment (making its folder entry durable),
                    # then syncs what the lost one was asked.
                    self.follow()
                    syncer = None
            if self.syncer is not None and self.syncer is syncer:
                self.log.warn("{why}; the store syncs in the event loop from now on", why=failure.getErrorMessage())
                self.syncer = None
                try:
                    # It may not have made the current segment's folder entry durable.
                    sync_folder(self._segment.directory)
                except OSError as error:
                    reason = "syncing %s failed: %s" % (self._segment.directory, error.strerror)
            if reason is None:
                if batch is not None:
                    self.waiting[:0] = batch
                    self.syncing = True
                    self._sync_now()
                return
        if self.failed is None:
            self._on_failure(reason)
        for d, _ in batch or ():
            d.errback(StoreError(self.failed))

    def _synced(self, batch, error):
        self.syncing = False
        self.syncs += 1
        metrics.store_fsync_seconds.labels("file").observe(time.monotonic() - self._sync_started)
        if error is not None:
            self._on_failure("fdatasync of %s failed: %s" % (self._segment.path, error.strerror))
        if self.failed is not None:
            # Failed by this sync, or earlier while it was under way.
            for d, _ in batch:
                d.errback(StoreError(self.failed))
            return
        self._restarts = 0
        self._after_sync()
        for d, event in batch:
            d.callback(event)
        if self.waiting and not self.syncing:
            # They came while this sync ran: the next group is formed
            # already, so it is asked now rather than a loop turn later.
            self.syncing = True
            self._cancel_lazy()
            self._sync_now()
        elif self.unsynced_since is not None and not self.syncing and self._lazy is None:
            # Written while this sync ran (write-ahead): due within the
            # interval of the first of them.
            due = self.unsynced_since + self._sync_interval - self._reactor.seconds()
            self._lazy = self._reactor.callLater(max(0.0, due), self._sync)

    def fail(self, reason):
        """
        The store failed: no sync is due any more, and what waits for one
        fails.
        """
        self.failed = reason
        self._cancel_lazy()
        waiting, self.waiting = self.waiting, []
        for d, _ in waiting:
            d.errback(StoreError(reason))

    def drain(self):
        """
        Before closing: ask the sync of what is written and not synced, and
        wait for it.

        @return: a Deferred firing once the sync under way is answered, or
            None when none is.
        """
        if self.waiting and not self.syncing:
            # Events nobody waited on are made durable now, not later.
            self._sync()
        if not self.syncing:
            return None
        done = defer.Deferred()
        self.waiting.append((done, None))
        return done

    def stop(self):
        if self.syncer is not None:
            syncer, self.syncer = self.syncer, None
            syncer.stop()
        self._cancel_lazy()
