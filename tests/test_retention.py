"""
Retention on the file store: old segments archived (compressed, moved,
never edited) and, with purge, removed, each step a signed event; verify
passes across archives and purges and still names a segment deleted by
hand.
"""

import gzip
import os
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from hoopgw.cast import CAST
from hoopgw.options import ConfigError
from hoopgw.store.file import ARCHIVE, FileStore, segment_paths
from hoopgw.store.retention import DAY, RetentionPolicy, parse_retention
from hoopgw.store.signing import Signer
from hoopgw.store.verify import verify_store
from tests import evidence_support as es


def signer():
    with open(es.signing_key()[0], "rb") as handle:
        return Signer.from_pem(handle.read())


class PolicyTests(unittest.TestCase):
    def test_pci_preset(self):
        """
        The PCI DSS 10.5.1 preset keeps 12 months, 3 online; a preset may
        not be weakened below what it stands for.
        """
        policy = parse_retention("pci-dss-10.5.1", "gateway.store.retention")
        self.assertGreaterEqual(policy.online, 90 * DAY)
        self.assertGreaterEqual(policy.keep, 365 * DAY)
        self.assertFalse(policy.purge)
        error = self.assertRaises(
            ConfigError, parse_retention, {"preset": "pci-dss-10.5.1", "keep": "30d"}, "gateway.store.retention"
        )
        self.assertIn("12 months", str(error))
        error = self.assertRaises(ConfigError, parse_retention, {"online": "10d"}, "gateway.store.retention")
        self.assertIn("both online and keep", str(error))


class ArchiveTests(unittest.TestCase):
    @defer.inlineCallbacks
    def fill(self, policy, recordings=False):
        """
        A signed store with small segments: 60 events 400 days old, 60 events
        200 days old, 30 of today.  With C{recordings}, the fifth event of
        each age is a command's end committing a terminal recording
        C{AGE.cast}.
        """
        self.path = os.path.abspath(self.mktemp())
        now = time.time()
        clock = [now]
        store = FileStore(self.path, reactor, segment_bytes=4096, clock=lambda: clock[0])
        store.open()
        store.use_signer(signer(), every_events=10, every_seconds=0)
        store.use_retention(policy)
        for age, count in ((400, 60), (200, 60), (0, 30)):
            for number in range(count):
                clock[0] = now - age * DAY + number
                if recordings and number == 5:
                    data = b'{"version": 2}\n[0.1, "o", "age %d"]\n' % (age,)
                    name = "%d.cast" % (age,)
                    digest = yield store.write_attachment(name, data)
                    yield store.append({
                        "type": "command.end", "session": "s-%d" % (age,), "command": 1, "age": age,
                        "outcome": {CAST: {"name": name, "sha256": digest, "bytes": len(data)}},
                    })
                    continue
                yield store.append({"type": "test", "age": age, "n": number})
        clock[0] = now
        return store, now

    @defer.inlineCallbacks
    def test_purge_takes_recordings(self):
        """
        A terminal recording goes with the events that commit it: purged
        with its 400-day-old segment (the store.purged event counts it),
        kept while its 200-day-old segment is only archived; what remains
        verifies, the kept recording checked against its digest.
        """
        store, now = yield self.fill(RetentionPolicy(online=90 * DAY, keep=365 * DAY, purge=True), recordings=True)
        casts = os.path.join(self.path, "casts")
        self.assertEqual(sorted(os.listdir(casts)), ["0.cast", "200.cast", "400.cast"])
        archived, purged = yield store.archive(now)
        yield store.close()
        self.assertEqual(sorted(os.listdir(casts)), ["0.cast", "200.cast"])
        counted = sum(event.get("casts", 0) for event in es.events(self.path) if event["type"] == "store.purged")
        self.assertEqual(counted, 1)
        report = verify_store(self.path, es.signing_key()[1])
        self.assertTrue(report.ok, report.problem)
        self.assertEqual(report.casts, 2)

    @defer.inlineCallbacks
    def test_archive_and_purge(self):
        """
        With 90 days online and 365 kept (purge on): the 400- and 200-day
        old segments are compressed into archive/ and the 400-day ones then
        removed; the chain says so (store.archived, store.purged, a
        checkpoint); what remains verifies, including the compressed
        segments.
        """
        store, now = yield self.fill(RetentionPolicy(online=90 * DAY, keep=365 * DAY, purge=True))
        before = len(segment_paths(self.path))
        archived, purged = yield store.archive(now)
        yield store.close()
        self.assertTrue(archived)
        self.assertTrue(purged)
        self.assertLess(len(segment_paths(self.path)), before)
        remaining = sorted(os.listdir(os.path.join(self.path, ARCHIVE)))
        self.assertTrue(remaining)
        self.assertFalse(set(purged) & set(remaining))
        for name in remaining:
            with gzip.open(os.path.join(self.path, ARCHIVE, name)) as handle:
                ages = {int(line.split(b'"age":')[1].split(b",")[0]) for line in handle if b'"age":' in line}
            self.assertLessEqual(ages, {200, 400})
        found = es.events(self.path)
        kinds = [event["type"] for event in found]
        self.assertIn("store.archived", kinds)
        self.assertIn("store.purged", kinds)
        self.assertEqual(kinds[-1], "checkpoint")
        self.assertGreater(found[0]["seq"], 1)
        report = verify_store(self.path, es.signing_key()[1])
        self.assertTrue(report.ok, report.problem)
        self.assertIn("removed under the retention policy", report.summary())

    @defer.inlineCallbacks
    def test_archived_segment_deleted_by_hand(self):
        """
        Without purge, an archived segment deleted by hand is named: the
        record starts later than it should and no purge accounts for it.
        """
        store, now = yield self.fill(RetentionPolicy(online=90 * DAY, keep=365 * DAY, purge=False))
        archived, purged = yield store.archive(now)
        yield store.close()
        self.assertEqual(purged, [])
        self.assertTrue(verify_store(self.path, es.signing_key()[1]).ok)
        first = sorted(os.listdir(os.path.join(self.path, ARCHIVE)))[0]
        os.unlink(os.path.join(self.path, ARCHIVE, first))
        report = verify_store(self.path, es.signing_key()[1])
        self.assertFalse(report.ok)
        self.assertIn("were removed: the record starts at event", report.problem)

    @defer.inlineCallbacks
    def test_archived_segment_edited(self):
        """
        An archived segment recompressed with one event changed is named as
        edited.
        """
        store, now = yield self.fill(RetentionPolicy(online=90 * DAY, keep=365 * DAY))
        yield store.archive(now)
        yield store.close()
        name = sorted(os.listdir(os.path.join(self.path, ARCHIVE)))[0]
        path = os.path.join(self.path, ARCHIVE, name)
        with gzip.open(path) as handle:
            data = handle.read()
        with gzip.open(path, "wb") as handle:
            handle.write(data.replace(b'"n":3,', b'"n":4,', 1))
        report = verify_store(self.path, es.signing_key()[1])
        self.assertIn("was edited", report.problem)

    @defer.inlineCallbacks
    def test_gateway_applies_policy(self):
        """
        A gateway configured with the PCI DSS preset starts its store's
        retention timer, and a fresh store has nothing to archive.
        """
        harness = es.SignedGateway(self, store={"retention": "pci-dss-10.5.1"})
        self.assertTrue(harness.store._retention_timer.running)
        archived, purged = yield harness.store.archive()
        self.assertEqual((archived, purged), ([], []))
        yield harness.stop()
        self.assertFalse(harness.store._retention_timer.running)
