"""
The embedded evidence store: a folder of JSON-lines segments, one event a
line, hash-chained across the whole store.  Appends are group-committed:
every event written in the meantime shares one fdatasync, and an append's
Deferred fires only once its event is on disk (write-ahead).
"""

import errno
import fcntl
import hashlib
import json
import os
import queue
import re
import threading

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from hoopgw.interfaces import IStore
from hoopgw.store import events


SEGMENT = re.compile(r"^events-(\d{12})\.jsonl$")


class StoreError(Exception):
    """
    The store cannot take events; the gateway must not run commands.
    """


def segment_paths(directory):
    """
    The store's segments in chain order.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [os.path.join(directory, name) for name in sorted(names) if SEGMENT.match(name)]


def read_events(directory):
    """
    Every event in the store, in order, as C{(segment path, line number,
    raw line, parsed event or None)}.  A line that is not JSON is given
    with C{None} so that verify can name it.
    """
    for path in segment_paths(directory):
        with open(path, "rb") as handle:
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


@implementer(IStore)
class FileStore:
    """
    An append-only, hash-chained event store in a folder.

    @ivar directory: the folder.
    @ivar seq: the sequence number of the last event.
    @ivar head: the hash of the last event.
    """

    log = Logger()

    def __init__(self, directory, reactor, fsync=True, segment_bytes=64 * 1024 * 1024):
        self.directory = directory
        self.casts = os.path.join(directory, "casts")
        self._reactor = reactor
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self._fd = None
        self._lock_fd = None
        self._size = 0
        self._waiting = []
        self._syncing = False
        self._broken = None
        self._queue = queue.SimpleQueue()
        self._writer = None
        self._recovered = None
        self.seq = 0
        self.head = events.GENESIS

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
                self.seq, self.head = event["seq"], event["hash"]
        else:
            path = os.path.join(self.directory, "events-%012d.jsonl" % (1,))
        self._open_segment(path)
        self._writer = threading.Thread(target=self._sync_batches, name="hoopgw-store-writer", daemon=True)
        self._writer.start()

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

    def _open_segment(self, path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size
        self._segment = path

    def start(self):
        """
        Write what recovery found, if anything.  @return: a L{Deferred}.
        """
        if self._recovered is not None:
            recovered, self._recovered = self._recovered, None
            return self.append(recovered)
        return defer.succeed(None)

    def append(self, event):
        if self._broken is not None:
            return defer.fail(StoreError("the store failed earlier and takes no more events: %s" % (self._broken,)))
        if self._fd is None:
            return defer.fail(StoreError("the store is not open"))
        data = events.seal(event, self.seq + 1, self.head)
        try:
            # Written at once, in order, so readers see it; made durable by
            # the next group commit.
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as error:
            self._fail("writing %s failed: %s" % (self._segment, error.strerror))
            return defer.fail(StoreError(self._broken))
        self.seq = event["seq"]
        self.head = event["hash"]
        self._size += len(data)
        if not self._fsync:
            if self._size >= self._segment_bytes:
                self._rotate()
            return defer.succeed(event)
        d = defer.Deferred()
        self._waiting.append((d, event))
        if not self._syncing:
            self._sync()
        return d

    def _sync(self):
        """
        One fdatasync, in the writer thread, for everything written since
        the last one (group commit).
        """
        self._syncing = True
        batch, self._waiting = self._waiting, []
        self._queue.put((self._fd, batch))

    def _sync_batches(self):
        """
        The writer thread: sync, then report back to the reactor thread.
        """
        while True:
            item = self._queue.get()
            if item is None:
                return
            fd, batch = item
            try:
                os.fdatasync(fd)
                error = None
            except OSError as failure:
                error = failure
            self._reactor.callFromThread(self._synced, batch, error)

    def _synced(self, batch, error):
        self._syncing = False
        if error is not None:
            self._fail("fdatasync of %s failed: %s" % (self._segment, error.strerror))
            for d, _ in batch:
                d.errback(StoreError(self._broken))
            return
        if self._size >= self._segment_bytes:
            self._rotate()
        for d, event in batch:
            d.callback(event)
        if self._waiting and not self._syncing:
            self._sync()

    def _fail(self, reason):
        """
        The store cannot be trusted to hold more events: refuse every
        append from now on (fail closed).
        """
        self._broken = reason
        self.log.critical("Audit store failure: {reason}", reason=reason)
        waiting, self._waiting = self._waiting, []
        for d, _ in waiting:
            d.errback(StoreError(reason))

    def _rotate(self):
        os.close(self._fd)
        self._open_segment(os.path.join(self.directory, "events-%012d.jsonl" % (self.seq + 1,)))

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
        Wait for pending appends, then stop the writer and release the files.
        """
        if self._syncing:
            done = defer.Deferred()
            self._waiting.append((done, None))
            return done.addBoth(lambda _: self.close())
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        if self._fd is not None:
            if self._fsync and self._broken is None:
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return defer.succeed(None)
