"""
gateway.store.durability: what a command's event waits for before the
command is forwarded.  write-ahead-fsync (the default) waits for the disk;
write-ahead waits for the operating system to hold it and syncs in the
background within sync_interval.
"""

import json
import os
import signal

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from hoopgw import config as configuration
from hoopgw.options import ConfigError
from hoopgw.store.file import WRITE_AHEAD, WRITE_AHEAD_FSYNC, FileStore, read_events, segment_paths
from tests import support
from tests.support import in_thread, psql, token


def document(directory, **store):
    settings = support.configuration_document(directory, {"payments": support.postgres_connection(15432)})
    settings["gateway"]["store"].update(store)
    return settings


class SettingTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def store(self, **settings):
        return configuration.parse(document(self.directory, **settings)).gateway.store

    def test_default_is_write_ahead_fsync(self):
        """
        Without a setting, a command waits for its event to be on disk.
        """
        self.assertEqual(self.store().durability, WRITE_AHEAD_FSYNC)

    def test_write_ahead_with_interval(self):
        """
        durability write-ahead is read with its sync_interval, a duration.
        """
        store = self.store(durability="write-ahead", sync_interval="20ms")
        self.assertEqual((store.durability, store.sync_interval), (WRITE_AHEAD, 0.02))
        self.assertEqual(self.store(durability="write-ahead").sync_interval, 0.05)

    def test_fsync_false_is_write_ahead(self):
        """
        The deprecated fsync: false is read as durability write-ahead (its
        events are still synced, in the background), and contradicting an
        explicit write-ahead-fsync is refused.
        """
        self.assertEqual(self.store(fsync=False).durability, WRITE_AHEAD)
        error = self.assertRaises(ConfigError, self.store, fsync=False, durability="write-ahead-fsync")
        self.assertEqual(error.path, "gateway.store.fsync")

    def test_bad_values_refused(self):
        """
        An unknown durability, or a sync_interval of zero, is refused naming
        the option.
        """
        error = self.assertRaises(ConfigError, self.store, durability="eventually")
        self.assertEqual(error.path, "gateway.store.durability")
        self.assertIn("write-ahead-fsync, write-ahead", str(error))
        error = self.assertRaises(ConfigError, self.store, sync_interval=0)
        self.assertEqual(error.path, "gateway.store.sync_interval")


class FileStoreTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())
        self.syncs = []
        real = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (self.syncs.append(fd), real(fd))[1])

    def lines(self):
        (segment,) = segment_paths(self.path)
        with open(segment, "rb") as handle:
            return [json.loads(line) for line in handle]

    def test_write_ahead_answers_once_written(self):
        """
        In write-ahead mode an append fires as soon as its event is written
        to the segment (no sync yet); one background sync covers every
        event written within sync_interval of the first, and is made when
        that interval is up, not before.
        """
        clock = task.Clock()
        store = FileStore(self.path, clock, durability=WRITE_AHEAD, sync_interval=0.05)
        store.open()
        first = store.append({"type": "command", "n": 1})
        self.assertTrue(first.called)
        self.assertEqual([event["n"] for event in self.lines()], [1])
        clock.advance(0.03)
        second = store.append({"type": "command", "n": 2})
        self.assertTrue(second.called)
        clock.advance(0.019)
        self.assertEqual((self.syncs, store.syncs), ([], 0))
        clock.advance(0.001)
        clock.advance(0)
        self.assertEqual((len(self.syncs), store.syncs), (1, 1))
        # Nothing written since: no sync is due.
        self.assertEqual(clock.getDelayedCalls(), [])
        store.append({"type": "command.end", "n": 3}, urgent=False)
        clock.advance(0.05)
        clock.advance(0)
        self.assertEqual(store.syncs, 2)
        closed = store.close()
        self.assertTrue(closed.called)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_write_ahead_fsync_waits_for_the_sync(self):
        """
        In write-ahead-fsync mode (the default) an append fires only once
        the sync covering its event is done.
        """
        clock = task.Clock()
        store = FileStore(self.path, clock)
        store.open()
        self.assertEqual(store.durability, WRITE_AHEAD_FSYNC)
        appended = store.append({"type": "command", "n": 1})
        self.assertFalse(appended.called)
        clock.advance(0)
        self.assertEqual((appended.called, store.syncs, len(self.syncs)), (True, 1, 1))
        store.close()

    def test_write_ahead_bound_across_a_slow_sync(self):
        """
        An event written while a background sync is under way (a slow disk:
        the sync process has not answered) is not covered by it; its own
        sync is asked sync_interval after it was written, or at once when
        the slow sync ends later than that.
        """

        class SlowDisk:
            # The sync process's side, answered when the test says.
            def __init__(self):
                self.asked = []

            def sync(self):
                self.asked.append(defer.Deferred())
                return self.asked[-1]

            def stop(self):
                pass

        clock = task.Clock()
        store = FileStore(self.path, clock, durability=WRITE_AHEAD, sync_interval=0.05)
        store.open()
        disk = store._commit.syncer = SlowDisk()
        store.append({"type": "command", "n": 1})
        clock.advance(0.05)
        clock.advance(0)
        self.assertEqual(len(disk.asked), 1)
        clock.advance(0.01)
        store.append({"type": "command", "n": 2})
        # The first sync answers 10 ms later: the second event's is due 40 ms after that.
        clock.advance(0.01)
        disk.asked[0].callback(None)
        clock.advance(0.039)
        clock.advance(0)
        self.assertEqual(len(disk.asked), 1)
        clock.advance(0.001)
        clock.advance(0)
        self.assertEqual(len(disk.asked), 2)
        # A third event, and a sync that answers after its interval is up:
        # the next sync is asked as soon as the slow one ends.
        store.append({"type": "command", "n": 3})
        clock.advance(0.2)
        disk.asked[1].callback(None)
        clock.advance(0)
        clock.advance(0)
        self.assertEqual((len(disk.asked), store.syncs), (3, 2))
        disk.asked[2].callback(None)
        self.assertEqual((store.syncs, clock.getDelayedCalls()), (3, []))
        store._commit.syncer = None
        store.close()

    @defer.inlineCallbacks
    def test_write_ahead_asks_the_sync_process(self):
        """
        With the sync process, write-ahead appends answer at once and the
        sync process is asked to sync them in the background; closing syncs
        what is left.
        """
        store = FileStore(self.path, reactor, durability=WRITE_AHEAD, sync_interval=0.01, sync_process=True)
        store.open()
        self.addCleanup(store.close)
        appended = [store.append({"type": "command", "n": index}) for index in range(3)]
        self.assertTrue(all(d.called for d in appended))
        for _ in range(400):
            if store.syncs:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        # Answered by the sync process: the gateway's loop made no fdatasync.
        self.assertEqual((store.syncs, self.syncs), (1, []))
        yield store.close()


class GatewayTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_recorded_and_survives_a_crash(self):
        """
        The setting is in gateway.start; in write-ahead mode a gateway
        killed (SIGKILL) right after a statement, long before its background
        sync is due, still leaves the statement's command event in the
        store: it was written to the operating system before the statement
        was forwarded.
        """
        from tests.test_postgres_store import GatewayProcess

        process = GatewayProcess(self, {"path": "audit", "durability": "write-ahead", "sync_interval": "1h"})
        yield in_thread(process.wait_listening)
        out, err, code = yield psql(process.dsn(), "-c", "SELECT 42 AS answer", password=token())
        self.assertEqual((code, out.strip()), (0, "42"), err)
        yield in_thread(process.stop, signal.SIGKILL)
        events = [event for _, _, _, event in read_events(os.path.join(process.directory, "audit"))]
        (start,) = [event for event in events if event["type"] == "gateway.start"]
        self.assertEqual((start["durability"], start["sync_interval"]), ("write-ahead", 3600.0))
        commands = [event for event in events if event["type"] == "command" and "SELECT 42" in event["text"]]
        self.assertEqual(len(commands), 1)
        self.assertEqual(commands[0]["decision"]["verdict"], "allow")

    @defer.inlineCallbacks
    def test_default_recorded(self):
        """
        A gateway with no setting records write-ahead-fsync in
        gateway.start (and no sync interval: every command waits for the
        disk).
        """
        gateway = support.GatewayHarness(self)
        yield gateway.wait_for("gateway.start")
        (start,) = gateway.events("gateway.start")
        self.assertEqual((start["durability"], start["sync_interval"]), ("write-ahead-fsync", None))
        yield gateway.stop()


class PostgresStoreTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_synchronous_commit_follows_durability(self):
        """
        The PostgreSQL store's transactions commit with synchronous_commit
        on by default, and off with durability write-ahead (the server
        flushes its WAL in the background).
        """
        from hoopgw.store import postgres as pgstore
        from tests.test_postgres_store import store_settings

        settings = yield in_thread(store_settings)
        config = pgstore.parse_options(settings["postgres"], "gateway.store.postgres")
        yield in_thread(pgstore.prepare_schema, config)
        found = {}
        for durability in (WRITE_AHEAD_FSYNC, WRITE_AHEAD):
            store = pgstore.PostgresStore(config, reactor, durability=durability)
            self.addCleanup(store.close)
            appended = yield store.append({"type": "test", "durability": durability})
            self.assertEqual(appended["durability"], durability)

            def show(cursor):
                return cursor.execute("SHOW synchronous_commit").addCallback(lambda _: cursor.fetchone()[0])

            found[durability] = yield store.read(show)
            yield store.close()
        self.assertEqual(found, {WRITE_AHEAD_FSYNC: "on", WRITE_AHEAD: "off"})


class SyncProgramTests(unittest.TestCase):
    def test_gateway_gone_before_the_answer(self):
        """
        When the gateway has gone before the sync process answers (it could
        not start, say), the process ends quietly: no traceback in the
        gateway's log.
        """
        import subprocess
        import sys

        from hoopgw.store import sync

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        segment = os.path.join(directory, "segment")
        open(segment, "wb").close()
        process = subprocess.Popen(
            [sys.executable, "-I", sync.PROGRAM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        process.stdout.close()
        _, errors = process.communicate(("open %s\nsync\n" % (segment,)).encode("utf-8"), timeout=30)
        self.assertEqual((process.returncode, errors), (0, b""))
