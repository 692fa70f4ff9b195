"""
Evidence bundles: C{hoopgw export} writes a slice of a real, signed record
with its recordings, keys, README and PCI DSS report, and C{hoopgw verify}
checks the bundle offline, in a fresh folder, in a fresh process.
"""

import io
import json
import os
import shutil
import sys
import tarfile

from twisted.internet import defer
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from hoopgw import cli
from hoopgw.store import verify as verification
from hoopgw.store.sources import BundleSource
from tests import evidence_support as es
from tests.test_evidence import _pristine, pristine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ExportTests(unittest.TestCase):
    """
    Bundles made from the record a real gateway run left.
    """

    @defer.inlineCallbacks
    def export(self, *extra):
        path = yield pristine(self)
        output = os.path.abspath(self.mktemp()) + ".tar.gz"
        out = io.StringIO()
        status = cli.main(["export", "--store", path, "-o", output] + list(extra), out=out)
        self.assertEqual(status, 0)
        self.assertIn("hoopgw verify", out.getvalue())
        return output

    @defer.inlineCallbacks
    def test_verifies_elsewhere(self):
        """
        The whole record exported, copied with the public key alone into an
        empty folder, verifies there with a fresh C{hoopgw verify} process
        (nothing but the bundle and the key).
        """
        bundle = yield self.export()
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        shutil.copy(bundle, os.path.join(elsewhere, "evidence.tar.gz"))
        shutil.copy(es.signing_key()[1], os.path.join(elsewhere, "gateway.pub"))
        environment = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ROOT}
        out, err, code = yield getProcessOutputAndValue(
            sys.executable,
            ["-m", "hoopgw.cli", "verify", "evidence.tar.gz", "--key", "gateway.pub"],
            env=environment,
            path=elsewhere,
        )
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"OK: ", out)
        self.assertIn(b"asciicasts checked: 2", out)
        self.assertEqual(sorted(os.listdir(elsewhere)), ["evidence.tar.gz", "gateway.pub"])

    @defer.inlineCallbacks
    def test_contents(self):
        """
        The bundle holds the events, every recording its commands committed,
        the public key, a README saying how to check it, and a report
        mapping PCI DSS requirements to counts from the bundle; SHA256SUMS
        lists every file.
        """
        bundle = yield self.export()
        committed = es.recordings((yield pristine(self)))
        with tarfile.open(bundle) as archive:
            names = set(archive.getnames())
            report = archive.extractfile("evidence/REPORT.md").read().decode()
            readme = archive.extractfile("evidence/README.txt").read().decode()
            manifest = json.loads(archive.extractfile("evidence/manifest.json").read())
            sums = archive.extractfile("evidence/SHA256SUMS").read().decode()
        key_id = es.signing.Verifier.from_file(es.signing_key()[1]).key_id
        self.assertIn("evidence/keys/%s.pem" % (key_id,), names)
        self.assertEqual(len(committed), 2)
        for _, recording in committed:
            self.assertIn("evidence/casts/" + recording["name"], names)
            self.assertEqual(manifest["casts"][recording["name"]], recording["sha256"])
        self.assertEqual(len(manifest["casts"]), 2)
        self.assertEqual(manifest["anchor"]["seq"], 0)
        for requirement in ("3.3.1", "3.4.1", "8.2.2", "8.6.1", "10.2.1.3", "10.2.1.4", "10.2.1.6", "10.2.2", "10.3.2"):
            self.assertIn("| %s |" % (requirement,), report)
        self.assertIn("Totals: 2 sessions, 1 refused, 4 commands, 0 blocked, 0 approved", report)
        self.assertIn("2 recordings.", report)
        self.assertIn("1 sessions with terminal use, 1 of them by service accounts, 2 terminal recordings", report)
        self.assertIn("0 card numbers in clear", report)
        self.assertIn("1 refused sessions", report)
        self.assertIn("1 gateway starts, 1 stops", report)
        self.assertIn("hoopgw verify evidence.tar.gz --key", readme)
        for name in ("events.jsonl", "REPORT.md", "manifest.json"):
            self.assertIn("  %s\n" % (name,), sums)

    @defer.inlineCallbacks
    def test_slice_verifies(self):
        """
        A slice from the terminal session on starts at the checkpoint
        before it, anchored on the hash of the event before that, and
        verifies on its own.
        """
        path = yield pristine(self)
        start = [event for event in es.events(path) if event.get("session") == _pristine["session"]][0]
        bundle = yield self.export("--since", start["ts"])
        source = BundleSource(bundle)
        first = next(iter(source.entries()))[2]
        self.assertEqual(first["type"], "checkpoint")
        self.assertEqual(source.anchor, {"seq": first["seq"] - 1, "hash": first["prev"]})
        self.assertGreater(first["seq"], 1)
        report = verification.verify(bundle, es.signing_key()[1])
        self.assertTrue(report.ok, report.problem)
        self.assertEqual(report.sessions, 1)
        self.assertEqual(report.casts, 2)

    @defer.inlineCallbacks
    def test_tampered_bundle(self):
        """
        A bundle whose events were edited, whose recording was replaced, or
        that lacks a recording, fails verify, naming the problem.
        """
        committed = es.recordings((yield pristine(self)))
        bundle = yield self.export()
        edited = self.rewrite(bundle, "evidence/events.jsonl", lambda data: data.replace(b"41 + 1", b"40 + 2"))
        report = verification.verify(edited, es.signing_key()[1])
        self.assertEqual(report.kind, verification.EDITED, report.problem)
        cast = "evidence/casts/" + committed[0][1]["name"]
        replaced = self.rewrite(bundle, cast, lambda data: data.replace(b"     3", b"     0"))
        report = verification.verify(replaced, es.signing_key()[1])
        self.assertEqual(report.kind, verification.CAST_EDITED, report.problem)
        self.assertIn(committed[0][1]["name"], report.problem)
        out = io.StringIO()
        self.assertEqual(cli.main(["verify", replaced, "--key", es.signing_key()[1]], out=out), 1)
        dropped = self.rewrite(bundle, "evidence/casts/" + committed[1][1]["name"], None)
        report = verification.verify(dropped, es.signing_key()[1])
        self.assertEqual(report.kind, verification.CAST_MISSING, report.problem)
        self.assertIn(committed[1][1]["name"], report.problem)

    def rewrite(self, bundle, member, change):
        target = os.path.abspath(self.mktemp()) + ".tar.gz"
        with tarfile.open(bundle) as source, tarfile.open(target, "w:gz") as copy:
            for info in source.getmembers():
                data = source.extractfile(info).read()
                if info.name == member and change is None:
                    continue
                if info.name == member:
                    data = change(data)
                    info.size = len(data)
                copy.addfile(info, io.BytesIO(data))
        return target

    @defer.inlineCallbacks
    def test_unsigned_period_refused(self):
        """
        An export whose period is not covered by a checkpoint yet is
        refused with a sentence saying what to do.
        """
        harness = es.SignedGateway(self, store={"checkpoint_events": 1000})
        from tests.support import psql, token

        yield psql(harness.dsn(), "-c", "SELECT 1", password=token())
        yield harness.wait_for("session.end")
        output = os.path.abspath(self.mktemp()) + ".tar.gz"
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(cli.main(["export", "--store", harness.store_path, "-o", output], out=io.StringIO()), 2)
        self.assertIn("not covered by a signed checkpoint yet", err.getvalue())
        self.assertFalse(os.path.exists(output))
