"""
The file store's segments: the files its events are written to, one
JSON line each, named after the first event's sequence number.  How they
are found and read (archived ones too), where the chain ends when the
store opens (a torn last line kept aside), and the one being written.
"""

import gzip
import hashlib
import json
import os
import re

from hoopgw.store import events
from hoopgw.store.checkpoints import ChainState
from hoopgw.store.errors import StoreError


SEGMENT = re.compile(r"^events-(\d{12})\.jsonl$")
ARCHIVED = re.compile(r"^events-(\d{12})\.jsonl\.gz$")
ARCHIVE = "archive"

_CHECKPOINT_MARK = b'"type":"checkpoint"'


def segment_path(directory, first_seq):
    """
    Where the segment starting with event C{first_seq} is.
    """
    return os.path.join(directory, "events-%012d.jsonl" % (first_seq,))


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


def last_line(path):
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


def find_end(directory):
    """
    Where the store's chain ends: the segment to append to, the chain's
    state there (from its last checkpoint on), and the C{store.recovered}
    event to write if a crash left half a line at the end (or None).

    @raise StoreError: if the last event does not match its own hash.
    """
    segments = segment_paths(directory)
    if not segments:
        return segment_path(directory, 1), ChainState(), None
    path = segments[-1]
    recovered = None
    last, torn_at = last_line(path)
    if torn_at is not None:
        recovered = _recover_torn_tail(directory, path, torn_at)
    if last is None and len(segments) > 1:
        last, _ = last_line(segments[-2])
    if last is None:
        return path, ChainState(), recovered
    event = json.loads(last)
    if events.digest(event) != event.get("hash"):
        raise StoreError(
            "the last event of %s does not match its hash: the store was altered; "
            "run 'hoopgw verify %s' before starting the gateway" % (path, directory)
        )
    return path, ChainState.rebuild(_tail_from_last_checkpoint(segments)), recovered


def _recover_torn_tail(directory, path, torn_at):
    """
    A crash left half a line at the end of the last segment.  It was
    never acknowledged as durable; keep its bytes aside and say so in the
    chain.
    """
    with open(path, "rb+") as handle:
        handle.seek(torn_at)
        torn = handle.read()
        handle.truncate(torn_at)
    aside = os.path.join(directory, "torn-%d.bin" % (torn_at,))
    with open(aside, "wb") as handle:
        handle.write(torn)
    return {
        "type": "store.recovered",
        "segment": os.path.basename(path),
        "torn_bytes": len(torn),
        "torn_sha256": hashlib.sha256(torn).hexdigest(),
        "kept_in": os.path.basename(aside),
    }


def sync_folder(directory):
    """
    Make the folder's entries durable: a new segment's entry in it is part
    of what is durable.
    """
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class SegmentFile:
    """
    The segment events are appended to.

    @ivar path: its path (None until opened).
    @ivar fd: its descriptor, opened for appending; None when closed.
    @ivar size: its length up to the end of the last complete event.
    """

    def __init__(self, directory):
        self.directory = directory
        self.path = None
        self.fd = None
        self.size = 0

    def open(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = os.fstat(self.fd).st_size
        self.path = path

    def append(self, data):
        """
        Write one sealed event, whole; C{size} moves past it only once it
        is all written.

        @raise OSError: as the write did (part of it may be in the file:
            L{cut} takes it out).
        """
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)

    def cut(self):
        """
        Take what part of a failed write reached the file back out: it
        ends with the last complete event again (a torn line would read as
        an edit).
        """
        os.ftruncate(self.fd, self.size)

    def datasync(self):
        os.fdatasync(self.fd)

    def start_next(self, first_seq):
        """
        Close this segment and start the one whose first event is
        C{first_seq}.  (What is in this one is made durable first by the
        caller.)

        @raise OSError: if the new one cannot be made (C{fd} is None then).
        """
        os.close(self.fd)
        self.fd = None
        self.open(segment_path(self.directory, first_seq))

    def close(self, sync=True):
        if self.fd is not None:
            if sync:
                os.fdatasync(self.fd)
            os.close(self.fd)
            self.fd = None
