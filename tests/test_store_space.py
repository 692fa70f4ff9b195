"""
The file store guards its space on a real, small volume (a 2 MiB tmpfs):
below the low-water mark it refuses new sessions and says so once; when
the volume is full it gives up its reserved room for the events in
flight, then refuses everything without leaving a torn line; and it
resumes by itself once space is freed, with the record still verifying.
"""

import json
import os
import subprocess

from twisted.internet import defer, reactor
from twisted.trial import unittest

from hoopgw.store import space
from hoopgw.store.file import FileStore, read_events
from hoopgw.store.errors import StoreError
from hoopgw.store.verify import verify_store
from testbed.throwaway import free_port
from tests import support
from tests.support import psql, token


def small_volume(test, size="2m"):
    """
    A tmpfs of C{size} mounted for the test (the tests run as root, as CI
    does), unmounted when it ends.
    """
    path = os.path.abspath(test.mktemp())
    os.makedirs(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % (size,), "tmpfs", path], check=True)
    test.addCleanup(subprocess.run, ["umount", "-l", path], check=True)
    return path


def fill(path, leave):
    """
    Write a filler file in C{path}'s volume until only about C{leave}
    bytes are free (0: until the volume is full).
    """
    filler = os.path.join(path, "filler-%d" % (len(os.listdir(path)),))
    facts = os.statvfs(path)
    room = facts.f_bavail * facts.f_frsize - leave
    with open(filler, "wb") as handle:
        try:
            while room > 0:
                handle.write(b"\0" * min(room, 65536))
                handle.flush()
                room -= 65536
        except OSError:
            pass
    return filler


class SpaceTests(unittest.TestCase):
    def open(self, volume, **kwargs):
        # Without fsync appends answer at once; what is tested is the
        # volume, not the disk cache.
        settings = dict(fsync=False, low_water=512 * 1024, low_water_percent=100, reserve=128 * 1024, space_check_interval=0)
        settings.update(kwargs)
        store = FileStore(os.path.join(volume, "audit"), reactor, **settings)
        os.makedirs(store.directory, exist_ok=True)
        store.open()
        store.start()
        self.addCleanup(store.close)
        return store

    def kinds(self, store):
        return [event["type"] for _, _, _, event in read_events(store.directory)]

    def test_low_water_refuses_new_sessions_and_resumes(self):
        """
        Below the low-water mark a new session's start is refused (its end
        is not written either) and a refused login is counted, not written;
        a session in flight goes on; C{store.low-space} is written once.
        When space is freed the store admits sessions again by itself and
        C{store.space-ok} counts what it refused.
        """
        volume = small_volume(self)
        store = self.open(volume)
        self.assertTrue(os.path.exists(os.path.join(store.directory, "reserve")))
        self.successResultOf(store.append({"type": "session.start", "session": "s-1"}))
        self.assertEqual(store.state(), space.OK)
        filler = fill(volume, 256 * 1024)

        refused = self.failureResultOf(store.append({"type": "session.start", "session": "s-2"}), StoreError)
        self.assertIn("low on space", refused.getErrorMessage())
        self.assertIn("new sessions are refused", refused.getErrorMessage())
        self.assertEqual(store.state(), space.LOW_SPACE)
        self.successResultOf(store.append({"type": "session.end", "session": "s-2"}))
        self.successResultOf(store.append({"type": "session.refused", "session": "s-3"}))
        self.failureResultOf(store.append({"type": "session.start", "session": "s-4"}), StoreError)
        self.successResultOf(store.append({"type": "command", "session": "s-1"}))
        self.successResultOf(store.append({"type": "session.end", "session": "s-1"}))
        self.assertEqual(
            self.kinds(store), ["session.start", "store.low-space", "command", "session.end"]
        )

        os.unlink(filler)
        store.check_space()
        self.assertEqual(store.state(), space.OK)
        self.successResultOf(store.append({"type": "session.start", "session": "s-5"}))
        events = [event for _, _, _, event in read_events(store.directory)]
        (ok,) = [event for event in events if event["type"] == space.STORE_SPACE_OK]
        self.assertEqual((ok["refused_sessions"], ok["refused_attempts"]), (2, 1))
        self.assertEqual(events[-1]["session"], "s-5")
        # The reserved room is set aside again.
        self.assertTrue(os.path.exists(os.path.join(store.directory, "reserve")))

    def test_full_volume_stalls_without_torn_line_and_resumes(self):
        """
        When the volume is full, the reserved room is given up and the
        events in flight still go in; when even that is used, a write that
        does not fit is cut back (no torn line), every event is refused
        and the store says "failed"; once space is freed, the next append
        resumes it: C{store.resumed} says since when, why, and how many
        events were refused, and the record verifies.
        """
        volume = small_volume(self)
        store = self.open(volume)
        self.successResultOf(store.append({"type": "session.start", "session": "s-1"}))
        filler = fill(volume, 0)
        # Large events, so that one is written in part before the volume is full.
        text = "x" * 50000
        written = 0
        while True:
            d = store.append({"type": "command", "session": "s-1", "text": text})
            if store.state() == space.FAILED:
                self.failureResultOf(d, StoreError)
                break
            self.successResultOf(d)
            written += 1
        self.assertGreater(written, 0)
        self.assertFalse(os.path.exists(os.path.join(store.directory, "reserve")))
        with open(store._segment.path, "rb") as handle:
            data = handle.read()
        self.assertTrue(data.endswith(b"\n"))
        for line in data.splitlines():
            json.loads(line)
        # Not even a small event fits now (once the slack of the segment's
        # last page is used).
        second = fill(volume, 0)
        for _ in range(1000):
            d = store.append({"type": "command", "session": "s-1"})
            if store.state() == space.FAILED:
                self.failureResultOf(d, StoreError)
                break
        store._space._last_resume = None
        refusal = self.failureResultOf(store.append({"type": "command", "session": "s-1"}), StoreError)
        self.assertIn("No space left on device", refusal.getErrorMessage())
        self.assertIn("resumes by itself", refusal.getErrorMessage())

        os.unlink(filler)
        os.unlink(second)
        store._space._last_resume = None
        self.successResultOf(store.append({"type": "session.end", "session": "s-1"}))
        self.assertNotEqual(store.state(), space.FAILED)
        events = [event for _, _, _, event in read_events(store.directory)]
        # The small events resumed it once already (they fit in the slack
        # of the segment's last page); the last stall refused two.
        resumed = [event for event in events if event["type"] == space.STORE_RESUMED][-1]
        self.assertEqual(resumed["refused"], 2)
        self.assertIn("No space left on device", resumed["reason"])
        self.assertEqual(events[-1]["type"], "session.end")
        self.successResultOf(store.close())
        report = verify_store(store.directory)
        self.assertTrue(report.ok, report.problem)


class GatewaySpaceTests(unittest.TestCase):
    """
    A real gateway whose store is on a small volume.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_login_refused_while_low_then_admitted(self):
        """
        While the store's volume is below its low-water mark, psql is
        refused with a sentence saying why, and nothing is written for the
        attempt but the one C{store.low-space}; once space is freed the
        next login is admitted without a restart, and the record verifies.
        """
        volume = small_volume(self)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        harness = support.GatewayHarness.__new__(support.GatewayHarness)
        harness.directory = directory
        harness.port = free_port()
        document = support.configuration_document(directory, {"payments": support.postgres_connection(harness.port)})
        document["gateway"]["store"].update(
            path=os.path.join(volume, "audit"), low_water="512KiB", low_water_percent=100, reserve="128KiB",
            space_check_interval="3600s",
        )
        harness.start(self, document)
        out, err, code = yield psql(harness.dsn(), "-c", "SELECT 1", password=token())
        self.assertEqual(code, 0, err)
        yield harness.wait_for("session.end")
        filler = fill(volume, 256 * 1024)

        for _ in range(3):
            out, err, code = yield psql(harness.dsn(), "-c", "SELECT 2", password=token())
            self.assertNotEqual(code, 0)
            self.assertIn("the audit store is low on space", err)
            self.assertIn("new sessions are refused until space is freed", err)
        self.assertEqual(harness.store.state(), space.LOW_SPACE)
        kinds = [event["type"] for event in harness.events()]
        self.assertEqual(kinds.count("store.low-space"), 1)
        self.assertEqual(kinds.count("session.start"), 1)

        os.unlink(filler)
        out, err, code = yield psql(harness.dsn(), "-c", "SELECT 3", password=token())
        self.assertEqual(code, 0, err)
        yield harness.wait_for("session.end", 2)
        (ok,) = harness.events("store.space-ok")
        self.assertEqual(ok["refused_sessions"], 3)
        yield harness.stop()
        report = verify_store(harness.store_path)
        self.assertTrue(report.ok, report.problem)


class ConfigTests(unittest.TestCase):
    """
    The space and witness options, as the configuration file gives them.
    """

    def document(self, store=None, **gateway):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        document = support.configuration_document(
            directory, {"payments": support.postgres_connection(15432)}, gateway=gateway
        )
        document["gateway"]["store"].update(store or {})
        return document

    def test_sizes(self):
        """
        Sizes take units; the defaults are 256 MiB and 5 %, a 4 MiB reserve
        and a check every 5 seconds.
        """
        from hoopgw import config as configuration

        store = configuration.parse(self.document()).gateway.store
        self.assertEqual(
            (store.low_water, store.low_water_percent, store.reserve, store.space_check_interval),
            (256 * 1024 * 1024, 5.0, 4 * 1024 * 1024, 5.0),
        )
        store = configuration.parse(self.document({"low_water": "1GiB", "reserve": "512KiB"})).gateway.store
        self.assertEqual((store.low_water, store.reserve), (1024**3, 512 * 1024))

    def test_bad_size(self):
        """
        A size that is not one is refused, naming the option and the form.
        """
        from hoopgw import config as configuration
        from hoopgw.options import ConfigError

        error = self.assertRaises(ConfigError, configuration.parse, self.document({"low_water": "lots"}))
        self.assertEqual(error.path, "gateway.store.low_water")
        self.assertIn("256MiB", str(error))

    def test_witness_needs_a_signing_key_and_a_folder(self):
        """
        A witness without a signing key has nothing to keep, and one in a
        folder that does not exist could never be written: both refused.
        """
        from hoopgw import config as configuration
        from hoopgw.options import ConfigError

        witness = os.path.join(os.path.abspath(self.mktemp()), "heads.jsonl")
        error = self.assertRaises(ConfigError, configuration.parse, self.document(witness={"file": witness}))
        self.assertEqual(error.path, "gateway.witness.file")
        self.assertIn("does not exist", str(error))
        os.makedirs(os.path.dirname(witness))
        error = self.assertRaises(ConfigError, configuration.parse, self.document(witness={"file": witness}))
        self.assertEqual(error.path, "gateway.witness")
        self.assertIn("needs gateway.signing_key", str(error))
