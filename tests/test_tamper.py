"""
An attacker's changes to a finished record, tried exhaustively: every tail
cut off, every event deleted, every event edited (with its own hash made
right again), every pair of neighbours swapped, whole sessions and whole
gateway runs deleted - on records made by real gateways (real PostgreSQL,
real psql) with restarts, with a crash and its recovery, and by a store
whose volume filled up and was freed.  C{hoopgw verify --key ...
--expect-head ...} and C{--witness ...} catch every one, and the untouched
record passes.
"""

import io
import json
import os
import shutil

import orjson
from twisted.internet import defer, reactor
from twisted.trial import unittest

from hoopgw import cli
from hoopgw.store import events as chaining
from hoopgw.store import signing
from hoopgw.store import verify as verification
from hoopgw.store.file import FileStore, segment_paths
from hoopgw.store.verify import verify_store
from hoopgw.store.witness import FileWitness
from testbed.throwaway import free_port
from tests import evidence_support as es
from tests import support
from tests.support import psql, token
from tests.test_store_space import fill, small_volume

_records = {}


class WitnessedGateway(support.GatewayHarness):
    """
    A real gateway whose record is signed (a checkpoint every 4 events) and
    whose checkpoints go to a witness file outside the store.
    """

    def __init__(self, test, directory, witness):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        os.makedirs(os.path.dirname(witness), exist_ok=True)
        self.port = free_port()
        document = support.configuration_document(
            directory,
            {"payments": support.postgres_connection(self.port)},
            gateway={"signing_key": {"file": es.signing_key()[0]}, "witness": {"file": witness}},
        )
        document["gateway"]["store"].update(checkpoint_events=4, reserve=0)
        self.start(test, document)


@defer.inlineCallbacks
def a_session(harness):
    out, err, code = yield psql(harness.dsn(), "-c", "SELECT 1 AS one", "-c", "SELECT 2 AS two", password=token())
    assert code == 0, err


def crash(harness):
    """
    End C{harness}'s gateway as kill -9 would: nothing more is written, its
    lock goes with it.
    """
    store = harness.store
    harness.gateway.running = False
    es.forget_refusals(harness.gateway)
    store._schedule.stop()
    store._space_timer.stop()
    if store._commit.syncer is not None:
        store._commit.syncer.stop()
        store._commit.syncer = None
    os.close(store._lock_fd)
    store._lock_fd = None
    os.close(store._segment.fd)
    store._segment.fd = None
    return defer.gatherResults([listener.stopService() for listener in list(harness.gateway)])


@defer.inlineCallbacks
def record(test, name):
    """
    C{(store path, witness path)} of a finished record, made once per run:
    C{"restarts"} (two clean runs, a refused login in the first),
    C{"crash"} (a run killed with a session open, the next run recovering
    it and stopping cleanly).
    """
    if name not in _records:
        directory = os.path.join(support.workspace(), "tamper-" + name)
        witness = os.path.join(support.workspace(), "witness-" + name, "heads.jsonl")
        first = WitnessedGateway(test, directory, witness)
        yield a_session(first)
        yield psql(first.dsn(user="intruder"), "-c", "SELECT 1", password=token(subject="intruder", groups=["marketing"]))
        yield first.wait_for("session.refused")
        slow = None
        if name == "crash":
            yield first.wait_for("session.end")
            # A session still open when the run is killed: its end is the crash.
            slow = psql(first.dsn(), "-c", "SELECT pg_sleep(2)", password=token())
            yield first.wait_for("command", 3)
            yield crash(first)
        else:
            yield first.stop()
        second = WitnessedGateway(test, directory, witness)
        yield a_session(second)
        yield second.wait_for("session.end", 2)
        yield second.stop()
        if slow is not None:
            yield slow
            # Until the killed run's front end has tried to record the end.
            closing = [frontend.closed() for frontend in list(first.gateway.factories["payments"].open)]
            yield defer.DeferredList(closing, consumeErrors=True)
            # What the killed run's session did after the kill was not written
            # (its store is gone): logged as a line each, not a traceback.
        _records[name] = (first.store_path, witness)
    return _records[name]


def full_disk_record(test):
    """
    C{(store path, witness path)} of a record whose volume filled up (its
    writes stalled, one cut back) and was freed (it resumed), signed and
    witnessed, made by the store itself on a 2 MiB tmpfs.
    """
    volume = small_volume(test)
    path = os.path.join(volume, "audit")
    witness = os.path.join(os.path.abspath(test.mktemp()), "heads.jsonl")
    os.makedirs(os.path.dirname(witness))
    store = FileStore(path, reactor, fsync=False, low_water=0, reserve=0, space_check_interval=0)
    key = signing.Signer.from_pem(open(es.signing_key()[0], "rb").read())
    store.use_signer(key, every_events=3, every_seconds=0)
    store.use_witness(FileWitness(witness))
    store.open()
    store.start("g-full")
    store.append({"type": "gateway.start", "gateway": "g-full"})
    store.append({"type": "session.start", "session": "s-1", "gateway": "g-full"})
    filler = fill(volume, 0)
    while store.state() != "failed":
        # The last fails (it does not fit): refused, as the gateway is.
        store.append({"type": "command", "session": "s-1", "text": "x" * 40000}).addErrback(lambda _: None)
    os.unlink(filler)
    store._space._last_resume = None
    store.append({"type": "session.end", "session": "s-1", "gateway": "g-full"})
    store.append({"type": "gateway.stop", "gateway": "g-full"})
    test.successResultOf(store.close())
    kinds = [event["type"] for event in events_of(path)]
    assert "store.resumed" in kinds, kinds
    copy = os.path.abspath(test.mktemp())
    shutil.copytree(path, copy, ignore=shutil.ignore_patterns("store.lock"))
    return copy, witness


def events_of(path):
    (segment,) = segment_paths(path)
    with open(segment, "rb") as handle:
        return [json.loads(line) for line in handle]


def head_of(path):
    last = events_of(path)[-1]
    return "%d:%s" % (last["seq"], last["hash"])


def as_line(event):
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS) + b"\n"


def rehashed(event, **changes):
    """
    C{event} changed and its own hash made right again: only the link to
    the next event (or a signature) can show the change.
    """
    changed = dict(event, **changes)
    changed.pop("hash")
    changed["hash"] = chaining.digest(changed)
    return changed


class Tampering:
    """
    A copy of a record to change, and verify's verdicts on the changes.
    """

    def __init__(self, test, path, witness):
        self.test = test
        self.original = path
        self.witness = witness
        self.head = head_of(path)
        self.copy = os.path.abspath(test.mktemp())
        shutil.copytree(path, self.copy, ignore=shutil.ignore_patterns("store.lock", "reserve"))
        (self.segment,) = segment_paths(self.copy)
        with open(self.segment, "rb") as handle:
            self.lines = handle.read().splitlines(True)
        self.events = [json.loads(line) for line in self.lines]

    def write(self, lines):
        with open(self.segment, "wb") as handle:
            handle.writelines(lines)

    def verdicts(self, lines):
        """
        Verify's reports on the record holding C{lines}: with the key and
        the head noted earlier, and with the key and the witness.
        """
        self.write(lines)
        key = es.signing_key()[1]
        return (
            verify_store(self.copy, key, expect_head=self.head),
            verify_store(self.copy, key, witness=self.witness),
        )

    def assert_caught(self, lines, what):
        for report in self.verdicts(lines):
            self.test.assertFalse(report.ok, "%s was not caught: %s" % (what, report.summary()))

    def assert_every_change_caught(self):
        lines, events = self.lines, self.events
        tried = 0
        for keep in range(len(lines)):
            self.assert_caught(lines[:keep], "cutting the record after %d events" % (keep,))
            tried += 1
        for index in range(len(lines)):
            self.assert_caught(lines[:index] + lines[index + 1:], "deleting event %d" % (index + 1,))
            edited = rehashed(events[index], ts="2020-01-01T00:00:00.000000Z")
            self.assert_caught(lines[:index] + [as_line(edited)] + lines[index + 1:], "editing event %d" % (index + 1,))
            tried += 2
        for index in range(len(lines) - 1):
            swapped = lines[:index] + [lines[index + 1], lines[index]] + lines[index + 2:]
            self.assert_caught(swapped, "swapping events %d and %d" % (index + 1, index + 2))
            tried += 1
        return tried


class TamperTests(unittest.TestCase):
    """
    Every change of every kind is caught, on every kind of record.
    """

    timeout = 300

    def assertIntact(self, path, witness):
        out = io.StringIO()
        code = cli.main(
            ["verify", path, "--key", es.signing_key()[1], "--expect-head", head_of(path), "--witness", witness], out=out
        )
        self.assertEqual(code, 0, out.getvalue())
        self.assertIn("chain intact, head %s" % (head_of(path),), out.getvalue())
        self.assertIn("each still in the record", out.getvalue())

    @defer.inlineCallbacks
    def test_restarts(self):
        """
        A record of two clean runs: intact, it verifies with the head and
        the witness; every tail cut, deletion, edit and swap is caught.
        """
        path, witness = yield record(self, "restarts")
        self.assertIntact(path, witness)
        tried = Tampering(self, path, witness).assert_every_change_caught()
        self.assertGreater(tried, 50)

    @defer.inlineCallbacks
    def test_crash(self):
        """
        A record with a crash (a session open when its run was killed) and
        the next run's recovery: verify counts that session as ended by the
        crash, and every change is caught too.
        """
        path, witness = yield record(self, "crash")
        self.assertIntact(path, witness)
        summary = verify_store(path, es.signing_key()[1]).summary()
        (run,) = [event["crashed"][0] for event in events_of(path) if event["type"] == "gateway.recovered"]
        self.assertIn("sessions: 3: 2 ended, 1 ended by the recorded crash of run %s" % (run,), summary)
        Tampering(self, path, witness).assert_every_change_caught()

    def test_full_disk(self):
        """
        A record whose volume filled up and was freed: every change is
        caught too.
        """
        path, witness = full_disk_record(self)
        self.assertIntact(path, witness)
        Tampering(self, path, witness).assert_every_change_caught()

    @defer.inlineCallbacks
    def test_recovering_run_cut_off(self):
        """
        After a crash, a restart and a clean stop, deleting the restarted
        run's last events (its start, its stop, its final checkpoint) is
        caught by the key alone: the recovery event and the checkpoint
        signing it name the run that recovered, which then never ends.
        """
        path, witness = yield record(self, "crash")
        tampering = Tampering(self, path, witness)
        (recovered,) = [event for event in tampering.events if event["type"] == "gateway.recovered"]
        (start,) = [event for event in tampering.events if event["type"] == "gateway.start" and event["seq"] > recovered["seq"]]
        self.assertEqual(recovered["by"], start["gateway"])
        after = [index for index, event in enumerate(tampering.events) if event["seq"] > recovered["seq"] + 1]
        for cut in range(1, len(after) + 1):
            tampering.write(tampering.lines[:-cut])
            report = verify_store(tampering.copy, es.signing_key()[1])
            self.assertFalse(report.ok, "cutting the last %d events was not caught: %s" % (cut, report.summary()))
        tampering.write([line for line in tampering.lines if json.loads(line).get("gateway") != start["gateway"]])
        report = verify_store(tampering.copy, es.signing_key()[1])
        self.assertFalse(report.ok, report.summary())

    @defer.inlineCallbacks
    def test_whole_session_and_run_deleted(self):
        """
        Deleting every event of one session, or of one gateway run (the
        first or the last), is caught with the key and the head noted.
        """
        path, witness = yield record(self, "restarts")
        tampering = Tampering(self, path, witness)
        sessions = {event["session"] for event in tampering.events if event.get("session")}
        runs = [event["gateway"] for event in tampering.events if event["type"] == "gateway.start"]
        self.assertEqual(len(runs), 2)
        for session in sessions:
            kept = [line for line, event in zip(tampering.lines, tampering.events) if event.get("session") != session]
            tampering.assert_caught(kept, "deleting session %s" % (session,))
        for run in runs:
            kept = [line for line, event in zip(tampering.lines, tampering.events) if event.get("gateway") != run]
            tampering.assert_caught(kept, "deleting the events of run %s" % (run,))
        # The last run and everything after it: the tail of the record.
        second_start = [index for index, event in enumerate(tampering.events) if event.get("gateway") == runs[1]][0]
        tampering.assert_caught(tampering.lines[:second_start], "deleting the last run")
        out = io.StringIO()
        code = cli.main(["verify", tampering.copy, "--key", es.signing_key()[1], "--expect-head", tampering.head], out=out)
        self.assertEqual(code, 1)
        self.assertIn("but --expect-head says it held event %s" % (tampering.head.split(":")[0],), out.getvalue())
        self.assertIn("the end of the record was removed", out.getvalue())

    @defer.inlineCallbacks
    def test_torn_write_named(self):
        """
        An unterminated last line (the gateway stopped while writing it) is
        named as a torn write at the end of its segment, not as an edit;
        the same bytes followed by more lines are an edit.
        """
        path, witness = yield record(self, "restarts")
        tampering = Tampering(self, path, witness)
        tampering.write(tampering.lines + [b'{"type":"command","seq":'])
        report = verify_store(tampering.copy)
        self.assertEqual(report.kind, verification.TORN, report.problem)
        self.assertIn("torn write at the end of segment %s" % (os.path.basename(tampering.segment),), report.problem)
        self.assertIn("not an edit", report.problem)
        tampering.write(tampering.lines[:3] + [b'{"type":"command","seq":\n'] + tampering.lines[3:])
        report = verify_store(tampering.copy)
        self.assertEqual(report.kind, verification.EDITED, report.problem)

    @defer.inlineCallbacks
    def test_witness_edited(self):
        """
        A witness whose line was changed is refused as edited, one signed
        by another key than the one given is refused, and a head given in
        the wrong form is refused with what to write.
        """
        path, witness = yield record(self, "restarts")
        copy = os.path.join(os.path.abspath(self.mktemp()), "heads.jsonl")
        os.makedirs(os.path.dirname(copy))
        with open(witness, "rb") as handle:
            lines = handle.read().splitlines(True)
        event = json.loads(lines[-1])
        event["seq"] += 1
        with open(copy, "wb") as handle:
            handle.writelines(lines[:-1] + [as_line(event)])
        report = verify_store(path, es.signing_key()[1], witness=copy)
        self.assertEqual(report.kind, verification.WITNESS, report.problem)
        # A witness line re-signed by another key is refused with yours.
        other = signing.Signer.from_pem(open(es.signing_key("other")[0], "rb").read())
        event = json.loads(lines[-1])
        event.pop("hash")
        forged = dict(event, key_id=other.key_id)
        forged["signature"] = other.sign(chaining.checkpoint_message(forged))
        forged["hash"] = chaining.digest(forged)
        with open(copy, "wb") as handle:
            handle.writelines(lines[:-1] + [as_line(forged)])
        report = verify_store(path, es.signing_key()[1], witness=copy)
        self.assertEqual(report.kind, verification.WITNESS, report.problem)
        report = verify_store(path, es.signing_key()[1], expect_head="12")
        self.assertEqual(report.kind, verification.UNREADABLE)
        self.assertIn("SEQ:HASH", report.problem)


class ExportedWitnessTests(unittest.TestCase):
    """
    The native lines a SIEM export delivered serve as a witness: their
    checkpoints are heads the record must still hold.
    """

    timeout = 300

    @defer.inlineCallbacks
    def test_export_copy_as_witness(self):
        """
        A copy of the record's lines, as a SIEM file sink holds them,
        verifies the intact record with --witness and catches the record
        cut back before its last checkpoint; an edited line in the copy is
        refused as an edited witness.
        """
        path, _ = yield record(self, "restarts")
        exported = os.path.join(os.path.abspath(self.mktemp()), "siem.jsonl")
        os.makedirs(os.path.dirname(exported))
        (segment,) = segment_paths(path)
        shutil.copy(segment, exported)
        key = es.signing_key()[1]
        self.assertTrue(verify_store(path, key, witness=exported).ok)
        tampering = Tampering(self, path, exported)
        last_checkpoint = max(
            index for index, event in enumerate(tampering.events) if event["type"] == chaining.CHECKPOINT
        )
        tampering.write(tampering.lines[:last_checkpoint])
        report = verify_store(tampering.copy, key, witness=exported)
        self.assertFalse(report.ok)
        events = events_of(path)
        edited = dict(events[2], ts="2020-01-01T00:00:00.000000Z")
        with open(exported, "wb") as handle:
            handle.writelines([as_line(event) for event in events[:2]] + [as_line(edited)])
        report = verify_store(path, key, witness=exported)
        self.assertEqual(report.kind, verification.WITNESS, report.problem)
