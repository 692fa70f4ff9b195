"""
The file store and verify: events chained and durable, and every kind of
tampering named.
"""

import json
import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from hoopgw import cli
from hoopgw.store.file import LAZY_SYNC, FileStore, segment_paths
from hoopgw.store.errors import StoreError
from hoopgw.store.sync import SyncFailed
from hoopgw.store.verify import verify_store


class StoreTests(unittest.TestCase):
    def setUp(self):
        self.path = os.path.abspath(self.mktemp())

    def open(self, **kwargs):
        store = FileStore(self.path, reactor, **kwargs)
        store.open()
        self.addCleanup(store.close)
        return store

    def fill(self, count=6):
        store = self.open()
        for index in range(count):
            store.append({"type": "test", "n": index})
        return store.close()

    def lines(self):
        (segment,) = segment_paths(self.path)
        with open(segment, "rb") as handle:
            return segment, handle.read().splitlines(True)

    def rewrite(self, lines):
        segment, _ = self.lines()
        with open(segment, "wb") as handle:
            handle.writelines(lines)

    def test_append_is_durable(self):
        """
        An append's Deferred fires with the chained event once it is on
        disk: the line is in the segment when the Deferred fires.
        """
        store = self.open()
        d = store.append({"type": "test", "n": 1})

        def check(event):
            _, lines = self.lines()
            self.assertEqual(json.loads(lines[-1])["hash"], event["hash"])
            self.assertEqual(event["seq"], 1)

        return d.addCallback(check)

    def test_sync_process(self):
        """
        With C{sync_process}, appends are synced by the store's sync process
        and fire in order once durable; closing ends the process.
        """
        store = self.open(sync_process=True)
        process = store._commit.syncer._process
        self.assertIsNone(process.poll())
        appended = [store.append({"type": "test", "n": index}) for index in range(5)]

        def check(events):
            self.assertEqual([event["seq"] for event in events], [1, 2, 3, 4, 5])
            self.assertIsNotNone(store._commit.syncer)
            return store.close().addCallback(lambda _: self.assertEqual(process.poll(), 0))

        return defer.gatherResults(appended).addCallback(check)

    def test_sync_process_rotates(self):
        """
        Segments rotate under the sync process: every event is acknowledged,
        the chain spans several segments and verifies, and the process ends
        up following the last segment.
        """
        store = self.open(sync_process=True, segment_bytes=2048)

        @defer.inlineCallbacks
        def append():
            acknowledged = []
            for batch in range(10):
                # Segments rotate after a sync: one sync a batch.
                acknowledged.extend((yield defer.gatherResults(
                    [store.append({"type": "test", "n": batch * 4 + index, "pad": "x" * 200}) for index in range(4)]
                )))
            return acknowledged

        def check(events):
            self.assertEqual([event["n"] for event in events], list(range(40)))
            # The last rotation's request may still be under way: answered in order.
            return store._commit.syncer.sync().addCallback(lambda _: following(events))

        def following(_):
            descriptors = "/proc/%d/fd" % (store._commit.syncer.pid,)
            paths = [os.readlink(os.path.join(descriptors, fd)) for fd in os.listdir(descriptors)]
            self.assertEqual([path for path in paths if path.startswith(self.path)], [segment_paths(self.path)[-1]])
            return store.close()

        def verified(_):
            self.assertGreater(len(segment_paths(self.path)), 3)
            self.assertTrue(verify_store(self.path).ok)

        return append().addCallback(check).addCallback(verified)

    def test_rotation_syncs_what_waits(self):
        """
        Events written while the sync process syncs are in the segment being
        left when it answers: the store syncs that segment itself before it
        moves to the next, so they are not left behind unsynced.
        """
        store = self.open(sync_process=True, segment_bytes=1024)
        synced = []
        real = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (synced.append(os.readlink("/proc/self/fd/%d" % (fd,))), real(fd))[1])
        first = [store.append({"type": "test", "n": index, "pad": "x" * 300}) for index in range(4)]
        (segment,) = segment_paths(self.path)
        second = []
        # After the first sync was asked for, before its answer can be read.
        reactor.callLater(0, lambda: second.extend(store.append({"type": "test", "n": 4 + index}) for index in range(2)))

        def check(events):
            self.assertEqual([event["n"] for event in events], [0, 1, 2, 3, 4, 5])
            self.assertEqual(synced, [segment])
            self.assertEqual(len(segment_paths(self.path)), 2)

        return defer.gatherResults(first).addCallback(lambda head: defer.gatherResults(second).addCallback(
            lambda tail: check(head + tail)))

    def test_sync_process_lost(self):
        """
        If the sync process dies, a new one takes over: it follows the
        segment (making its folder entry durable) and syncs what the lost
        one was asked; nothing appended is lost or left unsynced.
        """
        store = self.open(sync_process=True)
        first = store.append({"type": "test", "n": 1})
        lost = []

        def kill(_):
            lost.append(store._commit.syncer.pid)
            store._commit.syncer._process.kill()
            store._commit.syncer._process.wait()
            return store.append({"type": "test", "n": 2})

        def check(event):
            self.assertEqual(event["seq"], 2)
            self.assertIsNotNone(store._commit.syncer)
            self.assertNotEqual(store._commit.syncer.pid, lost[0])
            self.assertEqual(os.readlink("/proc/%d/fd/3" % (store._commit.syncer.pid,)), store._segment.path)
            return store.append({"type": "test", "n": 3})

        def loop(event):
            self.assertEqual(event["seq"], 3)
            self.assertEqual(store._commit._restarts, 0)

        return first.addCallback(kill).addCallback(check).addCallback(loop)

    def test_sync_process_lost_again_and_again(self):
        """
        A sync process lost every time it is replaced gives way, after
        SYNC_RESTARTS replacements, to syncing in the event loop, which
        covers what was asked: the appends still succeed.
        """
        from hoopgw.store import sync

        store = self.open(sync_process=True)
        # Every new process is broken from the start.
        self.patch(sync, "PROGRAM", os.devnull)
        self.patch(sync.SyncProcess, "__init__", _dies_at_once(sync.SyncProcess.__init__))
        syncs, real = [], os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
        first = store.append({"type": "test", "n": 1})

        def kill(_):
            store._commit.syncer._process.kill()
            store._commit.syncer._process.wait()
            return store.append({"type": "test", "n": 2})

        def check(event):
            self.assertEqual(event["seq"], 2)
            self.assertIsNone(store._commit.syncer)
            self.assertIn(store._segment.fd, syncs)

        return first.addCallback(kill).addCallback(check)

    def test_sync_process_failure_fails_closed(self):
        """
        A sync the process reports as failed breaks the store: the appends
        it covered fail, and later ones are refused.
        """
        store = self.open(sync_process=True)
        appended = store.append({"type": "test", "n": 1})
        # The process loses its segment before the append's sync reaches it.
        lost = self.assertFailure(store._commit.syncer.open("/nonexistent/segment"), SyncFailed)

        def check(_):
            self.assertIn("no segment is open", store._broken)
            return self.assertFailure(store.append({"type": "test", "n": 2}), StoreError)

        return defer.gatherResults([lost, self.assertFailure(appended, StoreError)]).addCallback(check)

    def test_end_events_ride_the_next_sync(self):
        """
        An event nobody waits on (C{urgent=False}: a command's end) does not
        cost a sync of its own: it becomes durable with the next urgent
        event's sync, or after L{LAZY_SYNC} seconds when none comes, or at
        close.
        """
        clock = task.Clock()
        syncs = []
        real = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd))[1])
        store = FileStore(self.path, clock)
        store.open()
        ended = store.append({"type": "command.end", "n": 1}, urgent=False)
        clock.advance(0)
        self.assertEqual((ended.called, len(syncs)), (False, 0))
        started = store.append({"type": "command", "n": 2})
        clock.advance(0)
        self.assertEqual((ended.called, started.called, len(syncs)), (True, True, 1))
        self.assertEqual(clock.getDelayedCalls(), [])
        alone = store.append({"type": "command.end", "n": 3}, urgent=False)
        clock.advance(LAZY_SYNC / 2)
        self.assertFalse(alone.called)
        clock.advance(LAZY_SYNC / 2)
        self.assertEqual((alone.called, len(syncs)), (True, 2))
        last = store.append({"type": "command.end", "n": 4}, urgent=False)
        closed = store.close()
        clock.advance(0)
        # One sync for the waiting event, one as the file closes.
        self.assertEqual((last.called, closed.called, len(syncs)), (True, True, 4))
        self.assertEqual(clock.getDelayedCalls(), [])
        _, lines = self.lines()
        self.assertEqual([json.loads(line)["n"] for line in lines if b'"n"' in line], [1, 2, 3, 4])

    def test_chain_continues_after_reopen(self):
        """
        A reopened store continues the chain where it ended.
        """
        d = self.fill(3)

        def reopen(_):
            store = FileStore(self.path, reactor)
            store.open()
            self.assertEqual(store.seq, 3)
            return store.append({"type": "test"}).addCallback(lambda event: (self.assertEqual(event["seq"], 4), store.close())[1])

        return d.addCallback(reopen).addCallback(lambda _: self.assertTrue(verify_store(self.path).ok))

    def test_one_writer(self):
        """
        A second process (or service) cannot write to a store in use.
        """
        self.open()
        other = FileStore(self.path, reactor)
        self.assertRaises(StoreError, other.open)

    def test_intact(self):
        """
        An untouched store verifies.
        """

        def check(_):
            report = verify_store(self.path)
            self.assertTrue(report.ok, report.problem)
            self.assertEqual(report.events, 6)

        return self.fill().addCallback(check)

    def outage_chain(self, reconnected):
        """
        Gateway A's store loses its connection; gateway B starts meanwhile
        and, finding A's lock free, records A as crashed; A comes back
        (store.reconnected, if C{reconnected}) and ends its session.
        """
        store = self.open()
        events = [
            {"type": "gateway.start", "gateway": "A"},
            {"type": "session.start", "session": "s1", "gateway": "A"},
            {"type": "session.start", "session": "s2", "gateway": "A"},
            {"type": "gateway.start", "gateway": "B"},
            {"type": "gateway.recovered", "crashed": ["A"], "unsigned": None},
        ]
        if reconnected:
            events.append({"type": "store.reconnected", "gateway": "A", "refused": 3,
                           "sessions_ended": ["s2"], "sessions_open": ["s1"]})
        events += [
            {"type": "session.end", "session": "s1", "gateway": "A"},
            {"type": "gateway.stop", "gateway": "A"},
            {"type": "gateway.stop", "gateway": "B"},
        ]
        for event in events:
            store.append(event)
        return store.close()

    @defer.inlineCallbacks
    def test_outage_verifies(self):
        """
        A gateway that ran on through its store's outage is not a crash:
        with its store.reconnected event the record verifies, and the
        session that ended unrecorded meanwhile is not a removed end.
        """
        yield self.outage_chain(reconnected=True)
        report = verify_store(self.path)
        self.assertTrue(report.ok, report.problem)

    @defer.inlineCallbacks
    def test_outage_unexplained(self):
        """
        Without it, the end of a session of a gateway recorded as crashed
        reads as a removed start.
        """
        yield self.outage_chain(reconnected=False)
        self.assertIn("its start event was removed", verify_store(self.path).problem)

    def test_edited(self):
        """
        An edited event is named as edited.
        """

        def tamper(_):
            segment, lines = self.lines()
            lines[2] = lines[2].replace(b'"n":2', b'"n":9')
            self.rewrite(lines)
            self.assertIn("event 3 (events-000000000001.jsonl line 3) was edited", verify_store(self.path).problem)

        return self.fill().addCallback(tamper)

    def test_edited_and_rehashed(self):
        """
        An event edited and given a fresh hash breaks the link to the next.
        """
        from hoopgw.store import events

        def tamper(_):
            _, lines = self.lines()
            event = json.loads(lines[2])
            event["n"] = 99
            event["hash"] = events.digest(event)
            lines[2] = json.dumps(event).encode() + b"\n"
            self.rewrite(lines)
            problem = verify_store(self.path).problem
            self.assertIn("event 4", problem)
            self.assertIn("replaced", problem)

        return self.fill().addCallback(tamper)

    def test_reordered(self):
        """
        Two swapped events are named as reordered.
        """

        def tamper(_):
            _, lines = self.lines()
            lines[2], lines[3] = lines[3], lines[2]
            self.rewrite(lines)
            self.assertIn("reordered", verify_store(self.path).problem)

        return self.fill().addCallback(tamper)

    def test_removed(self):
        """
        A deleted event is named as removed.
        """

        def tamper(_):
            _, lines = self.lines()
            del lines[3]
            self.rewrite(lines)
            self.assertIn("event 4 was removed", verify_store(self.path).problem)

        return self.fill().addCallback(tamper)

    def test_cli_exit_status(self):
        """
        C{hoopgw verify} exits 0 on an intact store and 1 on a broken one,
        printing the problem.
        """
        import io

        def check(_):
            out = io.StringIO()
            self.assertEqual(cli.main(["verify", self.path], out=out), 0)
            self.assertIn("OK: 6 events", out.getvalue())
            _, lines = self.lines()
            del lines[0]
            self.rewrite(lines)
            out = io.StringIO()
            self.assertEqual(cli.main(["verify", self.path], out=out), 1)
            self.assertIn("BROKEN: event 1 was removed", out.getvalue())

        return self.fill().addCallback(check)

    def test_torn_tail_recovered(self):
        """
        Half a line at the end (a crash mid-write) is set aside, noted in
        the chain, and the store verifies.
        """

        def crash(_):
            segment, _ = self.lines()
            with open(segment, "ab") as handle:
                handle.write(b'{"type":"half')
            store = FileStore(self.path, reactor)
            store.open()
            return store.start().addCallback(lambda _: store.close())

        def check(_):
            report = verify_store(self.path)
            self.assertTrue(report.ok, report.problem)
            _, lines = self.lines()
            self.assertEqual(json.loads(lines[-1])["type"], "store.recovered")

        return self.fill(2).addCallback(crash).addCallback(check)

    def test_refuses_altered_tail(self):
        """
        The gateway does not start on a store whose last event was altered.
        """

        def tamper(_):
            _, lines = self.lines()
            lines[-1] = lines[-1].replace(b'"n":5', b'"n":6')
            self.rewrite(lines)
            store = FileStore(self.path, reactor)
            error = self.assertRaises(StoreError, store.open)
            self.assertIn("hoopgw verify", str(error))

        return self.fill().addCallback(tamper)

    def test_write_failure_fails_closed(self):
        """
        When a write fails, the append fails and so does every later one.
        """
        store = self.open()
        os.close(store._segment.fd)
        store._segment.fd = os.open(os.devnull, os.O_RDONLY)
        self.failureResultOf(store.append({"type": "test"}), StoreError)
        self.failureResultOf(store.append({"type": "test"}), StoreError)


def _dies_at_once(start):
    """
    C{SyncProcess.__init__} whose process is a program that exits at once.
    """

    def init(self, reactor):
        start(self, reactor)
        self._process.wait()

    return init
