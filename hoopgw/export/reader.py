"""
Reading the record from a sequence number on, for the sinks: only events
that are durable, a bounded batch at a time, off the event loop.
"""

import gzip
import json
import os

from twisted.internet import threads

from hoopgw.store import file as filestore
from hoopgw.store.segments import last_line


class FileReader:
    """
    Reads a file store's segments (archived ones too).  What it returns is
    durable: the segment is synced (C{fdatasync}) after it is read and
    before the batch is handed out, so an event the store has written but
    not yet synced cannot reach a SIEM and then vanish in a power cut.

    It remembers where the last read ended, so that following the record
    costs a seek, not a scan.
    """

    def __init__(self, directory, reactor):
        self.directory = directory
        self._reactor = reactor
        # (segment path, byte offset, seq of the next line there)
        self._position = None

    def read(self, after, limit):
        """
        @return: a Deferred firing with up to C{limit} C{(raw line, event)}
            of the events whose seq is above C{after}, in order.
        """
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._read, after, limit)

    def _read(self, after, limit):
        found = []
        position = self._position
        if position is None or position[2] != after + 1 or not os.path.exists(position[0]):
            position = self._locate(after)
            if position is None:
                return found
        segments = filestore.all_segments(self.directory)
        try:
            index = segments.index(position[0])
        except ValueError:
            return found
        path, offset = position[0], position[1]
        while len(found) < limit:
            handle = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
            with handle:
                handle.seek(offset)
                while len(found) < limit:
                    line = handle.readline()
                    if not line.endswith(b"\n"):
                        # The end, or a line the store is still writing.
                        break
                    offset += len(line)
                    try:
                        event = json.loads(line)
                    except ValueError:
                        # Verify names such a line; the export cannot place it.
                        continue
                    if event.get("seq", 0) > after:
                        found.append((line, event))
                if found and not path.endswith(".gz"):
                    os.fdatasync(handle.fileno())
            at_end = len(found) < limit
            if at_end and index + 1 < len(segments):
                index += 1
                path, offset = segments[index], 0
                continue
            break
        next_seq = found[-1][1]["seq"] + 1 if found else after + 1
        self._position = (path, offset, next_seq)
        return found

    def _locate(self, after):
        """
        The segment holding the event after C{after}: segments are named by
        their first seq.
        """
        segments = filestore.all_segments(self.directory)
        chosen = None
        for path in segments:
            first = _first_seq(path)
            if first is not None and first <= after + 1:
                chosen = path
            elif chosen is None:
                # Everything up to here was purged: start at what is left.
                chosen = path
                break
            else:
                break
        if chosen is None:
            return None
        return (chosen, 0, after + 1)

    def head(self):
        """
        The last seq the store has written (durable or about to be).
        """
        segments = filestore.segment_paths(self.directory)
        for path in reversed(segments):
            last, _ = last_line(path)
            if last is not None:
                try:
                    return json.loads(last).get("seq", 0)
                except ValueError:
                    return 0
        return 0

    def close(self):
        pass


def _first_seq(path):
    name = os.path.basename(path)
    digits = name[len("events-"): len("events-") + 12]
    return int(digits) if digits.isdigit() else None


class PostgresReader:
    """
    Reads a PostgreSQL store on a connection of its own (blocking psycopg2,
    off the event loop), so that it can still hand over the last events
    once the gateway's store has closed.  What is committed is durable;
    every commit is announced on the events channel, which wakes the sinks.
    """

    def __init__(self, store, reactor):
        self._store = store
        self._reactor = reactor
        self._config = store.config
        self._table = store.config.schema + ".events"
        self._connection = None
        self._head = 0

    def read(self, after, limit):
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._read, after, limit)

    def _read(self, after, limit):
        import psycopg2

        try:
            if self._connection is None:
                password = self._config.password.read_text().strip() if self._config.password is not None else None
                arguments = {"password": password} if password else {}
                self._connection = psycopg2.connect(self._config.dsn, **arguments)
                self._connection.set_session(readonly=True, autocommit=True)
            with self._connection.cursor() as cursor:
                cursor.execute("SELECT line FROM %s WHERE seq > %%s ORDER BY seq LIMIT %%s" % (self._table,), (after, limit))
                rows = cursor.fetchall()
        except psycopg2.Error as error:
            self.close()
            raise IOError("reading the PostgreSQL store failed: %s" % (str(error).strip(),))
        found = []
        for (line,) in rows:
            event = json.loads(line)
            found.append((line.encode("utf-8") + b"\n", event))
            self._head = max(self._head, event.get("seq", 0))
        return found

    def head(self):
        return max(self._head, getattr(self._store, "seq", 0) or 0)

    def wake_on_commit(self, callback):
        from hoopgw.store.postgres import EVENTS_CHANNEL

        def announced(payload):
            if payload.isdigit():
                self._head = max(self._head, int(payload))
            callback()

        return self._store.listen(EVENTS_CHANNEL, announced).addErrback(lambda _: None)

    def close(self):
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                connection.close()
            except Exception:
                pass


def reader_for(store, reactor):
    """
    The reader of the gateway's open store.
    """
    if hasattr(store, "directory"):
        return FileReader(store.directory, reactor)
    if hasattr(store, "config") and hasattr(store, "read"):
        return PostgresReader(store, reactor)
    raise TypeError("the export cannot read a %s" % (type(store).__name__,))


def head_of(store):
    """
    The store's last seq as the gateway knows it.
    """
    return getattr(store, "seq", 0) or 0

