"""
The signed record on the file store: a real gateway (real PostgreSQL, real
psql) writes it, with checkpoints signed by its Ed25519 key, and verify
accepts it untouched and names every kind of tampering: an edited,
reordered or removed event, a whole session removed, the signed tail cut
off, a signature by another key, an edited or a deleted recording.  Also a crash and the
next start's recovery, and the terminal tools (sessions list, replay).
"""

import hashlib
import io
import json
import os

from twisted.internet import defer
from twisted.trial import unittest

from hoopgw import cast as casts
from hoopgw import cli
from hoopgw.replay import terminal
from hoopgw.store import events as chaining
from hoopgw.store import verify as verification
from hoopgw.store.sources import FileSource
from hoopgw.store.verify import verify_store
from tests import evidence_support as es
from tests import support
from tests.support import psql, token

_pristine = {}


@defer.inlineCallbacks
def run_gateway(test, directory, **settings):
    """
    A gateway run: a psql session with two statements, a refused session, a
    terminal session with two recordings; then a clean stop.
    """
    harness = es.SignedGateway(test, directory=directory, **settings)
    out, err, code = yield psql(
        harness.dsn(), "-c", "SELECT 41 + 1 AS answer", "-c", "SELECT '4111 1111 1111 1111' AS pan", password=token()
    )
    assert code == 0, err
    yield psql(harness.dsn(user="intruder"), "-c", "SELECT 1", password=token(subject="intruder", groups=["marketing"]))
    session = yield es.terminal_session(harness)
    yield harness.wait_for("session.end", 2)
    yield harness.stop()
    return harness, session


@defer.inlineCallbacks
def pristine(test):
    """
    The path of a finished, signed store (made once per run) and the
    terminal session's id; tests copy it before changing it.
    """
    if "path" not in _pristine:
        directory = os.path.join(support.workspace(), "pristine")
        harness, session = yield run_gateway(test, directory, store={"checkpoint_events": 4})
        _pristine.update(path=harness.store_path, session=session.id)
    return _pristine["path"]


class SignedRecordTests(unittest.TestCase):
    """
    What a clean run leaves: a chain signed by checkpoints, every session
    ended, each recording's digest committed by its command.
    """

    @defer.inlineCallbacks
    def test_clean_run_verifies(self):
        """
        The record of a clean run verifies with the auditor's copy of the
        public key: signed to its last event, every session ended, both
        recordings of the terminal session checked; logging's own start and
        stop are in it.
        """
        path = yield pristine(self)
        report = verify_store(path, es.signing_key()[1])
        self.assertTrue(report.ok, report.problem)
        found = es.events(path)
        self.assertEqual(report.signed_through, found[-1]["seq"])
        self.assertEqual(found[-1]["type"], "checkpoint")
        self.assertEqual(found[-1]["reason"], "stop")
        self.assertEqual(found[-2]["type"], "gateway.stop")
        self.assertEqual(found[0]["type"], "gateway.start")
        self.assertEqual(found[0]["signing_key"]["key_id"], report.key_ids.pop())
        self.assertGreater(report.checkpoints, 2)
        self.assertEqual((report.sessions, report.casts), (2, 2))
        self.assertIn("signatures checked with the key you gave", report.summary())
        self.assertTrue(os.path.exists(os.path.join(path, "keys", found[0]["signing_key"]["key_id"] + ".pem")))

    @defer.inlineCallbacks
    def test_checkpoint_every_n_events(self):
        """
        With checkpoint_events 4, no more than 4 events go unsigned between
        two checkpoints, and each checkpoint covers the event before it and
        counts the events before it.
        """
        path = yield pristine(self)
        found = es.events(path)
        since = 0
        counts = {}
        for event in found:
            if event["type"] == chaining.CHECKPOINT:
                self.assertLessEqual(since, 4)
                self.assertEqual(event["covers"], {"seq": event["seq"] - 1, "hash": event["prev"]})
                self.assertEqual(event["counts"], counts)
                since = 0
            else:
                since += 1
            counts[event["type"]] = counts.get(event["type"], 0) + 1

    @defer.inlineCallbacks
    def test_cli_verify_with_key(self):
        """
        C{hoopgw verify STORE --key PUB} prints OK and what was checked, and
        exits 0.
        """
        path = yield pristine(self)
        out = io.StringIO()
        self.assertEqual(cli.main(["verify", path, "--key", es.signing_key()[1]], out=out), 0)
        self.assertIn("OK: ", out.getvalue())
        self.assertIn("asciicasts checked: 2", out.getvalue())

    @defer.inlineCallbacks
    def test_recordings_committed_per_command(self):
        """
        A session with two terminal recordings: each is committed in the
        end event of the command that made it (name, digest, size), is in
        the store with that digest, and the session's end carries none.
        """
        path = yield pristine(self)
        committed = es.recordings(path)
        self.assertEqual([event["session"] for event, _ in committed], [_pristine["session"]] * 2)
        self.assertEqual(len({event["command"] for event, _ in committed}), 2)
        source = FileSource(path)
        for event, recording in committed:
            self.assertEqual(recording["name"], "%s-%s.cast" % (event["session"], event["command"]))
            data = source.attachment(recording["name"])
            self.assertEqual(hashlib.sha256(data).hexdigest(), recording["sha256"])
            self.assertEqual(recording["bytes"], len(data))
        (end,) = [
            event for event in es.events(path)
            if event["type"] == "session.end" and event["session"] == _pristine["session"]
        ]
        self.assertNotIn("cast", end)
        self.assertNotIn("attachments", end)
        second = casts.parse(source.attachment(committed[1][1]["name"]))
        self.assertIn(es.SECOND_MASKED, second.text())
        self.assertEqual(second.text("i"), "tail -1 app.log\r")
        self.assertNotIn(b"4111 1111 1111 1111", source.attachment(committed[1][1]["name"]))

    @defer.inlineCallbacks
    def test_no_card_number_in_record(self):
        """
        The card number in the statement is in the record only redacted,
        never in clear, signed record or not.
        """
        path = yield pristine(self)
        raw = b"".join(es.lines(path)[1])
        self.assertNotIn(b"4111 1111 1111 1111", raw)


class TamperTests(unittest.TestCase):
    """
    Each kind of tampering with a finished store is named by verify, which
    exits non-zero.
    """

    @defer.inlineCallbacks
    def tampered(self, change):
        path = es.copy_store((yield pristine(self)), self)
        segment, lines = es.lines(path)
        change(path, segment, lines)
        return path

    def assertBroken(self, path, kind, *phrases, key=True):
        report = verify_store(path, es.signing_key()[1] if key is True else key)
        self.assertFalse(report.ok)
        self.assertEqual(report.kind, kind, report.problem)
        for phrase in phrases:
            self.assertIn(phrase, report.problem)
        out = io.StringIO()
        arguments = ["verify", path] + (["--key", es.signing_key()[1] if key is True else key] if key else [])
        self.assertEqual(cli.main(arguments, out=out), 1)
        self.assertIn("BROKEN: ", out.getvalue())
        return report

    @defer.inlineCallbacks
    def test_edited(self):
        """
        A command's text changed in place: named as edited, with its seq.
        """

        def change(path, segment, lines):
            (number,) = es.index_of(path, lambda event: event.get("text") == "SELECT 41 + 1 AS answer")
            lines[number] = lines[number].replace(b"41 + 1", b"40 + 2")
            es.rewrite(segment, lines)

        path = yield self.tampered(change)
        self.assertBroken(path, verification.EDITED, "was edited")

    @defer.inlineCallbacks
    def test_edited_and_rehashed(self):
        """
        An event edited and given a fresh hash breaks the link to the next
        event; re-chaining everything after it breaks the next checkpoint's
        signature instead.
        """

        def change(path, segment, lines):
            (number,) = es.index_of(path, lambda event: event.get("text") == "SELECT 41 + 1 AS answer")
            head = None
            for position in range(number, len(lines)):
                event = json.loads(lines[position])
                if position == number:
                    event["text"] = "SELECT 1"
                else:
                    event["prev"] = head
                event["hash"] = chaining.digest(event)
                head = event["hash"]
                lines[position] = es.as_line(event)
            es.rewrite(segment, lines)

        path = yield self.tampered(change)
        self.assertBroken(path, verification.BAD_SIGNATURE, "checkpoint")

    @defer.inlineCallbacks
    def test_reordered(self):
        """
        Two events swapped: named as reordered.
        """

        def change(path, segment, lines):
            lines[3], lines[4] = lines[4], lines[3]
            es.rewrite(segment, lines)

        path = yield self.tampered(change)
        self.assertBroken(path, verification.REORDERED, "reordered")

    @defer.inlineCallbacks
    def test_removed_event(self):
        """
        One command event deleted: named as removed, with its seq.
        """

        def change(path, segment, lines):
            (number,) = es.index_of(path, lambda event: event.get("text") == "SELECT 41 + 1 AS answer")
            del lines[number]
            es.rewrite(segment, lines)

        path = yield self.tampered(change)
        report = self.assertBroken(path, verification.REMOVED, "was removed")
        self.assertIn("1 command", report.problem)

    @defer.inlineCallbacks
    def test_removed_session(self):
        """
        Every event of the terminal session deleted: named as a whole
        session removed, from the counts the next signed checkpoint holds.
        """

        def change(path, segment, lines):
            session = _pristine["session"]
            doomed = set(es.index_of(path, lambda event: event.get("session") == session))
            es.rewrite(segment, [line for number, line in enumerate(lines) if number not in doomed])

        path = yield self.tampered(change)
        self.assertBroken(path, verification.REMOVED_SESSION, "a whole session was removed", "1 session.start")

    @defer.inlineCallbacks
    def test_removed_session_end(self):
        """
        A session's end deleted and the chain rewritten around it (but no
        checkpoint re-signed) still fails; verify names the first problem.
        """

        def change(path, segment, lines):
            (number,) = es.index_of(path, lambda event: event.get("type") == "session.end" and event.get("protocol") == "ssh")
            del lines[number]
            es.rewrite(segment, lines)

        path = yield self.tampered(change)
        self.assertBroken(path, verification.REMOVED_SESSION, "session.end")

    @defer.inlineCallbacks
    def test_unsigned_tail(self):
        """
        The closing checkpoint cut off, or the signed end of the record
        (the last session's end, the gateway's stop and the checkpoints
        after them): named as an unsigned tail.
        """

        def drop_last_checkpoint(path, segment, lines):
            es.rewrite(segment, lines[:-1])

        path = yield self.tampered(drop_last_checkpoint)
        found = es.events(path)
        signed = [event["seq"] for event in found if event["type"] == "checkpoint"][-1]
        span = "event %d comes" % (found[-1]["seq"],) if signed + 1 == found[-1]["seq"] else (
            "events %d to %d come" % (signed + 1, found[-1]["seq"]))
        self.assertBroken(path, verification.UNSIGNED_TAIL, "unsigned tail", span + " after")

        def drop_signed_end(path, segment, lines):
            (end,) = es.index_of(path, lambda event: event.get("type") == "session.end" and event.get("protocol") == "ssh")
            es.rewrite(segment, lines[:end])

        path = yield self.tampered(drop_signed_end)
        self.assertBroken(path, verification.UNSIGNED_TAIL, "unsigned tail")

    @defer.inlineCallbacks
    def test_cut_at_a_checkpoint(self):
        """
        The record cut right after an earlier checkpoint (so it ends signed):
        the gateway's run has no stop, and it is not running: named.
        """

        def change(path, segment, lines):
            checkpoints = es.index_of(path, lambda event: event["type"] == "checkpoint")
            es.rewrite(segment, lines[: checkpoints[1] + 1])

        path = yield self.tampered(change)
        self.assertBroken(path, verification.UNENDED, "never stopped")

    @defer.inlineCallbacks
    def test_wrong_key(self):
        """
        Verified with another key than the one that signed: named as the
        wrong key, with both fingerprints.
        """
        path = es.copy_store((yield pristine(self)), self)
        other = es.signing_key("other")[1]
        report = self.assertBroken(path, verification.WRONG_KEY, "not by the key you gave", key=other)
        self.assertIn(es.signing.Verifier.from_file(other).key_id, report.problem)

    @defer.inlineCallbacks
    def test_resigned_with_substituted_key(self):
        """
        Someone who rewrites the record and re-signs it with their own key
        (publishing it in the store) is caught by the auditor's copy of the
        real key.
        """
        from hoopgw.store.signing import Signer

        def change(path, segment, lines):
            with open(es.signing_key("other")[0], "rb") as handle:
                forger = Signer.from_pem(handle.read())
            head = chaining.GENESIS
            rewritten = []
            for seq, line in enumerate(lines, 1):
                event = json.loads(line)
                event.pop("hash")
                if event.get("text") == "SELECT 41 + 1 AS answer":
                    event["text"] = "SELECT 1"
                if event["type"] == "checkpoint":
                    for name in ("covers", "key_id", "signature"):
                        event.pop(name)
                rewritten.append(chaining.seal(event, seq, head, signer=forger))
                head = event["hash"]
            es.rewrite(segment, rewritten)
            from hoopgw.store.file import publish_key

            publish_key(path, forger.key_id, forger.public_pem)

        path = yield self.tampered(change)
        self.assertBroken(path, verification.WRONG_KEY, "not by the key you gave")

    @defer.inlineCallbacks
    def test_edited_cast(self):
        """
        The second recording of a session changed after its command's end
        committed its digest: named, with its command.
        """
        path = yield pristine(self)
        event, recording = es.recordings(path)[1]

        def change(path, segment, lines):
            with open(os.path.join(path, "casts", recording["name"]), "ab") as handle:
                handle.write(b'[9.0, "o", "nothing to see"]\n')

        path = yield self.tampered(change)
        self.assertBroken(
            path, verification.CAST_EDITED, repr(recording["name"]), event["command"], "does not match the digest",
            "seq %d" % (event["seq"],),
        )

    @defer.inlineCallbacks
    def test_deleted_cast(self):
        """
        The first recording of a session deleted from the store: named as
        missing, with its command.
        """
        path = yield pristine(self)
        event, recording = es.recordings(path)[0]

        def change(path, segment, lines):
            os.unlink(os.path.join(path, "casts", recording["name"]))

        path = yield self.tampered(change)
        self.assertBroken(path, verification.CAST_MISSING, repr(recording["name"]), event["command"], "is missing")


class RecoveryTests(unittest.TestCase):
    """
    A gateway killed mid-run leaves an unsigned tail; the next start says
    so in the chain and signs it, and verify passes with a note.
    """

    @defer.inlineCallbacks
    def test_crash_then_restart(self):
        """
        A run that never stops (its store is dropped without closing, as a
        kill -9 would) is reported by verify; the next start writes
        gateway.recovered naming the crashed run and the unsigned events,
        then a checkpoint, and the record verifies again.
        """
        directory = os.path.abspath(self.mktemp())
        harness = es.SignedGateway(self, directory=directory, store={"checkpoint_events": 100})
        out, err, code = yield psql(harness.dsn(), "-c", "SELECT 1", password=token())
        self.assertEqual(code, 0, err)
        yield harness.wait_for("session.end")
        # The crash: the process is gone, its lock with it; nothing more is written.
        harness.gateway.running = False
        es.forget_refusals(harness.gateway)
        harness.store._schedule.stop()
        harness.store._space_timer.stop()
        harness.store._commit.syncer.stop()
        harness.store._commit.syncer = None
        os.close(harness.store._lock_fd)
        harness.store._lock_fd = None
        for listener in list(harness.gateway):
            yield listener.stopService()
        crashed = harness.gateway.instance
        report = verify_store(harness.store_path, es.signing_key()[1])
        self.assertEqual(report.kind, verification.UNSIGNED_TAIL, report.problem)

        os.close(harness.store._segment.fd)
        harness.store._segment.fd = None
        again = es.SignedGateway(self, directory=directory)
        out, err, code = yield psql(again.dsn(), "-c", "SELECT 2", password=token())
        yield again.wait_for("session.end", 2)
        yield again.stop()
        (recovered,) = again.events("gateway.recovered")
        self.assertEqual(recovered["crashed"], [crashed])
        self.assertEqual(recovered["unsigned"], {"from": 1, "to": recovered["seq"] - 1})
        report = verify_store(again.store_path, es.signing_key()[1])
        self.assertTrue(report.ok, report.problem)
        self.assertIn("crashed before signing them", report.summary())


class TerminalToolTests(unittest.TestCase):
    """
    C{hoopgw sessions list} and C{hoopgw replay} on a real record.
    """

    @defer.inlineCallbacks
    def test_sessions_list(self):
        """
        The list shows each session with its identity, protocol and flags;
        filters narrow it.
        """
        path = yield pristine(self)
        out = io.StringIO()
        self.assertEqual(cli.main(["sessions", "list", "--store", path], out=out), 0)
        text = out.getvalue()
        self.assertIn("ci-bot", text)
        self.assertIn("ops-bot", text)
        self.assertIn("refused", text)
        self.assertIn("3 session(s)", text)
        out = io.StringIO()
        cli.main(["sessions", "list", "--store", path, "--protocol", "ssh"], out=out)
        self.assertIn("1 session(s)", out.getvalue())
        self.assertIn("casts:2", out.getvalue())
        out = io.StringIO()
        cli.main(["sessions", "list", "--store", path, "--decision", "refused"], out=out)
        self.assertIn("intruder", out.getvalue())
        self.assertIn("1 session(s)", out.getvalue())
        out = io.StringIO()
        cli.main(["sessions", "list", "--store", path, "--identity", "ci-", "--since", "1h"], out=out)
        self.assertIn("1 session(s)", out.getvalue())
        out = io.StringIO()
        cli.main(["sessions", "list", "--store", path, "--until", "2001-01-01"], out=out)
        self.assertIn("0 session(s)", out.getvalue())

    @defer.inlineCallbacks
    def test_replay_timeline(self):
        """
        C{hoopgw replay} of the psql session prints its identity's
        provenance and each statement with its decision and outcome, and
        the recorded results with the card number masked.
        """
        path = yield pristine(self)
        index_out = io.StringIO()
        index, chosen = terminal.list_sessions(FileSource(path), index_out, protocol="postgres", subject="ci-bot")
        (record,) = chosen
        out = io.StringIO()
        self.assertEqual(cli.main(["replay", "--store", path, record.id], out=out), 0)
        text = out.getvalue()
        self.assertIn("identity: ci-bot (service) from %s" % (support.ISSUER,), text)
        self.assertIn("proven by: oidc", text)
        self.assertIn("SELECT 41 + 1 AS answer", text)
        self.assertIn("decision: ALLOW", text)
        self.assertIn("tag=SELECT 1", text)
        self.assertIn("411111******1111", text.replace(" ", ""))
        self.assertNotIn("4111 1111 1111 1111", text)

    @defer.inlineCallbacks
    def test_replay_cast_with_timing(self):
        """
        Both recordings of the terminal session are listed under their
        commands in the timeline and played in order with their timing,
        scaled by --speed: the pauses asked for add up to their durations /
        speed, and their output (masked) is printed.
        """
        path = yield pristine(self)
        pauses = []
        out = io.StringIO()
        status = terminal.replay(FileSource(path), _pristine["session"], out, speed=4.0, sleep=pauses.append)
        self.assertEqual(status, 0)
        self.assertAlmostEqual(sum(pauses), (es.CAST_OUTPUT[-1][0] + es.SECOND_OUTPUT[-1][0]) / 4.0, places=5)
        self.assertEqual(len(pauses), 5)
        text = out.getvalue()
        for event, recording in es.recordings(path):
            self.assertIn("   terminal recording: %s (sha256 %s" % (recording["name"], recording["sha256"]), text)
        self.assertIn(" count \r\n-------\r\n     3", text)
        self.assertIn(es.SECOND_MASKED, text)
        self.assertLess(text.index("--- end of recording #1 ---"), text.index("--- playing #2 "))
        self.assertIn("--- end of recording #2 ---", text)

    @defer.inlineCallbacks
    def test_replay_one_command(self):
        """
        C{hoopgw replay SESSION --command 2} plays only the second
        command's recording; a command without one is said so (exit 2).
        """
        path = yield pristine(self)
        out = io.StringIO()
        arguments = ["replay", "--store", path, _pristine["session"], "--command", "2", "--speed", "1000"]
        self.assertEqual(cli.main(arguments, out=out), 0)
        text = out.getvalue()
        self.assertNotIn("--- playing #1 ", text)
        self.assertIn("--- playing #2 ", text)
        self.assertIn(es.SECOND_MASKED, text)
        out = io.StringIO()
        self.assertEqual(cli.main(["replay", "--store", path, _pristine["session"], "--command", "3"], out=out), 2)
        self.assertIn("left no terminal recording", out.getvalue())

    @defer.inlineCallbacks
    def test_replay_refuses_edited_cast(self):
        """
        A recording that no longer matches its committed digest is not
        played (the other one still is), and replay exits 1.
        """
        path = es.copy_store((yield pristine(self)), self)
        _, first = es.recordings(path)[0]
        with open(os.path.join(path, "casts", first["name"]), "ab") as handle:
            handle.write(b'[9.0, "o", "forged"]\n')
        out = io.StringIO()
        self.assertEqual(terminal.replay(FileSource(path), _pristine["session"], out, sleep=lambda _: None), 1)
        self.assertIn("#1: the recording %s does not match the digest in the record: it was edited" % (first["name"],),
                      out.getvalue())
        self.assertNotIn("forged", out.getvalue())
        self.assertIn(es.SECOND_MASKED, out.getvalue())
