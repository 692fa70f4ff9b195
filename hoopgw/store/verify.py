"""
Walk a record's chain and say whether an auditor can trust it, or name the
first problem: an event edited, reordered or removed, a whole session
removed, a checkpoint whose signature fails or that a key other than the
expected one signed, an unsigned tail (the signed end cut off), a session
or a gateway run without its end, a terminal recording (asciicast) missing
or not matching the digest its command's end event committed, an approval
the rules would not have allowed, a torn last write, and - given a head the
auditor noted earlier (C{--expect-head}) or a witness file the gateway
published its signed checkpoints to (C{--witness}) - a tail cut off after
the last checkpoint the record itself still holds.
"""

import json

import hashlib
import os

import attr

from hoopgw import cast as casts
from hoopgw.store import events as chaining
from hoopgw.store.checkpoints import GATEWAY_RECOVERED, GATEWAY_START, GATEWAY_STOP, STORE_RECONNECTED
from hoopgw.store.signing import SigningKeyError, Verifier
from hoopgw.store.sources import open_source
from hoopgw.store.errors import SourceError


# The short names of problems, for programs (and tests) that act on them.
EDITED = "edited"
REORDERED = "reordered"
REMOVED = "removed"
REMOVED_SESSION = "removed-session"
UNSIGNED_TAIL = "unsigned-tail"
WRONG_KEY = "wrong-key"
BAD_SIGNATURE = "bad-signature"
UNSIGNED = "unsigned"
UNENDED = "unended"
CAST_MISSING = "cast-missing"
CAST_EDITED = "cast-edited"
UNREADABLE = "unreadable"
TORN = "torn"
TRUNCATED = "truncated"
WITNESS = "witness"


class CheckFailed(Exception):
    """
    Raised by a check given to the walk (C{checks=}) at the first event
    its rules do not allow; C{kind} is the problem's short name, C{str()}
    says which and where.
    """

    kind = "check"


class Problem(Exception):
    def __init__(self, kind, message):
        Exception.__init__(self, message)
        self.kind = kind
        self.message = message


@attr.s
class Report:
    """
    What verify found.

    @ivar problem: None if the record can be trusted, else a sentence
        naming the first problem.
    @ivar kind: the problem's short name (L{EDITED}, L{REMOVED_SESSION}...).
    @ivar notes: facts the auditor should know that are not problems (the
        key the signatures were checked with, a tail not yet signed while
        the gateway runs, a crash the record acknowledges).
    """

    events = attr.ib(default=0)
    head = attr.ib(default=chaining.GENESIS)
    problem = attr.ib(default=None)
    kind = attr.ib(default=None)
    first_seq = attr.ib(default=None)
    last_seq = attr.ib(default=None)
    checkpoints = attr.ib(default=0)
    signed_through = attr.ib(default=None)
    key_ids = attr.ib(factory=set)
    sessions = attr.ib(default=0)
    casts = attr.ib(default=0)
    notes = attr.ib(factory=list)
    views = attr.ib(default=None)
    # One line from each check given to the walk that had something to say.
    findings = attr.ib(factory=list)
    # Sessions by how they ended: their own session.end, the recorded
    # crash of their run (by run), a store outage (store.reconnected).
    sessions_ended = attr.ib(default=0)
    sessions_crashed = attr.ib(factory=dict)
    sessions_outage = attr.ib(default=0)
    sessions_open = attr.ib(default=0)
    heads_checked = attr.ib(default=0)

    @property
    def ok(self):
        return self.problem is None and (self.views is None or self.views.ok)

    def summary(self):
        if self.problem is not None:
            if self.last_seq:
                return "BROKEN: %s\n  intact up to head %s:%s" % (self.problem, self.last_seq, self.head)
            return "BROKEN: %s" % (self.problem,)
        if self.views is not None and not self.views.ok:
            return "BROKEN: the chain of views of the record: %s" % (self.views.problem,)
        text = "OK: %d events, chain intact, head %s:%s" % (self.events, self.last_seq or 0, self.head)
        if self.heads_checked:
            text += "\n  heads checked: %d (--expect-head, --witness), each still in the record" % (self.heads_checked,)
        if self.checkpoints:
            text += "\n  signed: %d checkpoint(s), events %s to %s covered, key %s" % (
                self.checkpoints,
                self.first_seq,
                self.signed_through,
                ", ".join(sorted(self.key_ids)),
            )
        text += "\n  sessions: %s; asciicasts checked: %d" % (self._sessions_summary(), self.casts)
        for finding in self.findings:
            text += "\n  " + finding
        for note in self.notes:
            text += "\n  note: %s" % (note,)
        if self.views is not None:
            text += "\n  views of the record (PCI DSS 10.2.1.3): %d events, chain intact" % (self.views.events,)
            if self.views.checkpoints:
                text += ", signed through %s" % (self.views.signed_through,)
        return text

    def _sessions_summary(self):
        """
        How the sessions ended, exactly: each by its own end event, by the
        recorded crash of its gateway run, by a store outage, or still open.
        """
        parts = []
        if self.sessions_ended:
            parts.append("%d ended" % (self.sessions_ended,))
        for run, number in sorted(self.sessions_crashed.items()):
            parts.append("%d ended by the recorded crash of run %s" % (number, run))
        if self.sessions_outage:
            parts.append("%d ended during a store outage (store.reconnected)" % (self.sessions_outage,))
        if self.sessions_open:
            parts.append("%d still open" % (self.sessions_open,))
        if parts == ["%d ended" % (self.sessions,)] or not (self.sessions or parts):
            return "%d, each with its end" % (self.sessions,)
        return "%d: %s" % (self.sessions, ", ".join(parts))


def parse_head(text, where="--expect-head"):
    """
    C{(seq, hash)} of a head written as C{SEQ:HASH} (as verify prints it).

    @raise ValueError: saying what is wrong.
    """
    seq, _, digest = text.strip().partition(":")
    if not seq.isdigit() or int(seq) < 1 or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
        raise ValueError(
            "%s takes SEQ:HASH as 'hoopgw verify' prints it after 'head' (42:9f86d0...), got %r" % (where, text)
        )
    return int(seq), digest


def read_witness(path, trusted=None):
    """
    The heads a witness file holds: one signed checkpoint a line, as the
    gateway published them (L{hoopgw.store.witness}).  Each line must be
    intact (its hash) and, with C{trusted}, signed by that key.

    @return: a list of C{(seq, hash, label)}.
    @raise Problem: when the witness cannot be read or a line is not intact.
    """
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise Problem(UNREADABLE, "cannot read the witness %s: %s" % (path, error.strerror))
    heads = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        where = "%s line %d" % (os.path.basename(path), number)
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if (
            not isinstance(event, dict)
            or event.get("type") != chaining.CHECKPOINT
            or not isinstance(event.get("seq"), int)
            or chaining.digest(event) != event.get("hash")
        ):
            raise Problem(WITNESS, "the witness %s is not an intact signed checkpoint: the witness was edited" % (where,))
        if trusted is not None and not (
            event.get("key_id") == trusted.key_id
            and trusted.check(chaining.checkpoint_message(event), event.get("signature") or "")
        ):
            raise Problem(WITNESS, "the signature of the witness %s does not verify with the key you gave" % (where,))
        heads.append((event["seq"], event["hash"], "the witness (%s)" % (where,)))
    return heads


class _Walk:
    """
    One pass over a chain.
    """

    def __init__(self, source, trusted_key=None, heads=(), checks=()):
        self.source = source
        # What the record must prove beyond its chain (approvals ...): each
        # made with whole=, fed every event, asked for a summary at the end.
        self.check_factories = tuple(checks)
        self.checks = None
        # Heads the record must still hold: seq -> [(hash, who says so)].
        self.heads = {}
        for seq, digest, label in heads:
            self.heads.setdefault(seq, []).append((digest, label))
        self.torn = None
        self.report = Report()
        self.trusted = trusted_key
        self.keys = {}
        if trusted_key is None:
            for key_id, pem in source.published_keys().items():
                self._learn_key(pem, "published with the record")
        self.anchor = source.anchor
        self.expected_seq = None
        self.counts = None
        self.checkpoint_seen = False
        self.signing_declared = False
        self.last_checkpoint = None
        self.late_signed = []
        self.gateways = {}
        self.sessions = {}
        self.ended = set()
        self.purged = None
        self.start_gap = None
        self.from_genesis = False

    def _learn_key(self, pem, where):
        try:
            verifier = Verifier.from_pem(pem, where)
        except SigningKeyError:
            return
        self.keys.setdefault(verifier.key_id, verifier)

    def run(self):
        entries = iter(self.source.entries())
        try:
            for where, raw, event in entries:
                self._raw = raw
                self._step(where, event, entries)
            self._finish()
        except Problem as problem:
            self.report.problem = problem.message
            self.report.kind = problem.kind
        return self.report

    def _step(self, where, event, rest):
        report = self.report
        if self.torn is not None:
            raise Problem(EDITED, "%s follows an unterminated line: the record was edited" % (where,))
        if not isinstance(event, dict):
            raw = self._raw
            if self.source.kind == "store" and not raw.endswith(b"\n") and next(rest, None) is None:
                # Only the last line of the last segment can lack its end:
                # the gateway stopped while writing it.
                self.torn = (where.partition(" line ")[0], len(raw))
                return
            raise Problem(EDITED, "%s is not a JSON event: the record was edited" % (where,))
        seq = event.get("seq")
        if chaining.digest(event) != event.get("hash"):
            raise Problem(EDITED, "event %s (%s) was edited: its content no longer matches its hash" % (seq, where))
        for expected, label in self.heads.pop(seq, ()):
            if event["hash"] != expected:
                raise Problem(
                    TRUNCATED,
                    "%s says the record held event %d with hash %s, but the record's event %d (%s) has hash %s: "
                    "the record was rewritten from there" % (label, seq, expected, seq, where, event["hash"]),
                )
            report.heads_checked += 1
        if self.expected_seq is None:
            self._begin(event, where)
        if event.get("prev") != report.head or seq != self.expected_seq:
            raise self._explain_break(seq, where, rest, event)
        kind = event.get("type")
        if kind == chaining.CHECKPOINT:
            self._checkpoint(event, where)
        elif self.counts is not None:
            self.counts[kind] = self.counts.get(kind, 0) + 1
        self._lifecycle(kind, event, where)
        if self.checks is None:
            self.checks = [factory(whole=self.from_genesis) for factory in self.check_factories]
        for check in self.checks:
            try:
                check.see(event)
            except CheckFailed as problem:
                raise Problem(problem.kind, "%s (%s)" % (problem, where))
        report.head = event["hash"]
        report.last_seq = seq
        report.events += 1
        self.expected_seq += 1

    def _begin(self, event, where):
        """
        Where the walk starts: at the genesis, after a bundle's anchor, or
        after segments removed by retention (which a later store.purged
        event must account for).
        """
        if self.anchor is not None:
            self.expected_seq = self.anchor["seq"] + 1
            self.report.head = self.anchor["hash"]
            if self.anchor["seq"] == 0:
                self.from_genesis = True
                self.counts = {}
        elif event.get("seq") == 1:
            self.expected_seq = 1
            self.counts = {}
            self.from_genesis = True
        elif isinstance(event.get("seq"), int) and event["seq"] > 1:
            self.start_gap = (event["seq"], event.get("prev"), where)
            self.expected_seq = event["seq"]
            self.report.head = event.get("prev")
        else:
            self.expected_seq = 1
        self.report.first_seq = self.expected_seq

    def _checkpoint(self, event, where):
        report = self.report
        seq = event["seq"]
        covers = event.get("covers") or {}
        if covers.get("seq") != seq - 1 or covers.get("hash") != event.get("prev"):
            raise Problem(
                BAD_SIGNATURE,
                "the checkpoint at seq %d (%s) does not cover the event before it: the chain was rewritten" % (seq, where),
            )
        key_id = event.get("key_id")
        verifier = self.trusted if self.trusted is not None and self.trusted.key_id == key_id else self.keys.get(key_id)
        if verifier is None:
            if self.trusted is not None:
                raise Problem(
                    WRONG_KEY,
                    "the checkpoint at seq %d (%s) was signed by key %s, not by the key you gave (%s)"
                    % (seq, where, key_id, self.trusted.key_id),
                )
            raise Problem(
                WRONG_KEY,
                "the checkpoint at seq %d (%s) was signed by key %s, which the record does not publish" % (seq, where, key_id),
            )
        if not verifier.check(chaining.checkpoint_message(event), event.get("signature") or ""):
            raise Problem(
                BAD_SIGNATURE,
                "the signature of the checkpoint at seq %d (%s) does not verify with key %s: "
                "the checkpoint or the chain it covers was changed after signing" % (seq, where, key_id),
            )
        signed_counts = event.get("counts") or {}
        if self.counts is not None and self.counts != signed_counts:
            raise Problem(
                REMOVED,
                "the checkpoint at seq %d was signed over other counts of events than the record holds (%s): "
                "events were removed and the chain rewritten" % (seq, _describe_difference(signed_counts, self.counts)),
            )
        self.counts = dict(signed_counts)
        self.counts[chaining.CHECKPOINT] = self.counts.get(chaining.CHECKPOINT, 0) + 1
        # The runs a signed checkpoint names as running must each end later
        # (a stop, a recorded crash) or be running now: cutting the record
        # back to this checkpoint is then seen.
        for gateway in event.get("gateways") or ():
            self.gateways.setdefault(gateway, seq)
        self.checkpoint_seen = True
        self.last_checkpoint = seq
        report.checkpoints += 1
        report.signed_through = seq
        report.key_ids.add(key_id)

    def _lifecycle(self, kind, event, where):
        seq = event["seq"]
        gateway = event.get("gateway")
        if kind == GATEWAY_START:
            declared = event.get("signing_key")
            if declared:
                self.signing_declared = True
                if self.trusted is None and declared.get("public_key"):
                    self._learn_key(declared["public_key"], "declared at seq %d" % (seq,))
            if gateway:
                self.gateways[gateway] = seq
        elif kind == GATEWAY_STOP:
            self.gateways.pop(gateway, None)
            for session, (started, owner) in sorted(self.sessions.items(), key=lambda item: item[1][0]):
                if owner == gateway:
                    raise Problem(
                        REMOVED_SESSION,
                        "session %s (started at seq %d) has no end, although its gateway stopped at seq %d (%s): "
                        "its end event was removed" % (session, started, seq, where),
                    )
        elif kind == GATEWAY_RECOVERED:
            crashed = set(event.get("crashed") or ())
            for name in crashed:
                self.gateways.pop(name, None)
            for session, (_, owner) in list(self.sessions.items()):
                if owner in crashed:
                    del self.sessions[session]
                    self.report.sessions_crashed[owner] = self.report.sessions_crashed.get(owner, 0) + 1
            # The run recovering names itself: it must end later too.
            if isinstance(event.get("by"), str):
                self.gateways.setdefault(event["by"], seq)
            unsigned = event.get("unsigned")
            if unsigned:
                self.late_signed.append((unsigned.get("from"), unsigned.get("to"), seq))
        elif kind == STORE_RECONNECTED:
            # The gateway ran on through its store's outage (even if another
            # gateway recorded it as crashed meanwhile): the sessions that
            # ended then could not be recorded, those still open go on.
            if gateway and gateway not in self.gateways:
                self.gateways[gateway] = seq
            for session in event.get("sessions_ended") or ():
                if self.sessions.pop(session, None) is not None:
                    self.report.sessions_outage += 1
                self.ended.add(session)
            for session in event.get("sessions_open") or ():
                if session not in self.ended:
                    self.sessions.setdefault(session, (seq, gateway))
        elif kind == "store.purged":
            self.purged = event.get("up_to")
        elif kind == "session.start":
            self.sessions[event.get("session")] = (seq, gateway)
            self.report.sessions += 1
        elif kind in ("session.end", "session.refused"):
            session = event.get("session")
            if kind == "session.end":
                self.report.sessions_ended += 1
            if kind == "session.end" and self.sessions.pop(session, None) is None and session not in self.ended:
                if self.from_genesis:
                    raise Problem(
                        REMOVED_SESSION,
                        "session %s ended at seq %d (%s) but its start is not in the record: "
                        "its start event was removed" % (session, seq, where),
                    )
            self.ended.add(session)
        elif kind == "command.end":
            recording = casts.committed(event)
            if recording is not None:
                self._check_cast(event, recording, seq)

    def _check_cast(self, event, recording, seq):
        name, expected = recording.get("name"), recording.get("sha256")
        data = self.source.attachment(name) if isinstance(name, str) and name else None
        what = "the terminal recording %r of command %s (session %s)" % (
            name, event.get("command"), event.get("session"))
        if data is None:
            raise Problem(
                CAST_MISSING,
                "%s, committed at seq %d, is missing from the record: it was deleted" % (what, seq),
            )
        if hashlib.sha256(data).hexdigest() != expected:
            raise Problem(
                CAST_EDITED,
                "%s does not match the digest committed at seq %d: it was edited" % (what, seq),
            )
        self.report.casts += 1

    def _finish(self):
        report = self.report
        for check in self.checks or ():
            finding = check.summary()
            if finding:
                report.findings.append(finding)
        live = self.source.live()
        running = self.source.running_gateways()
        if self.torn is not None:
            segment, size = self.torn
            text = (
                "torn write at the end of segment %s: the gateway stopped while writing the event after seq %s "
                "(%d bytes, never acknowledged as written)" % (segment, report.last_seq, size)
            )
            if not live:
                raise Problem(
                    TORN,
                    text + " - a crash, a kill or a full disk, not an edit; start a gateway on this store: it sets "
                    "the torn bytes aside (torn-OFFSET.bin) and records the recovery",
                )
            report.notes.append(text)
        for seq in sorted(self.heads):
            for expected, label in self.heads[seq]:
                if self.source.kind == "bundle" or (report.first_seq is not None and seq < report.first_seq):
                    report.notes.append("%s names event %d, outside this %s: not checked" % (
                        label, seq, "bundle" if self.source.kind == "bundle" else "record (removed by retention)"))
                    continue
                raise Problem(
                    TRUNCATED,
                    "the record ends at seq %s, but %s says it held event %d (hash %s): the end of the record was "
                    "removed" % (report.last_seq or 0, label, seq, expected),
                )
        if self.start_gap is not None:
            first, prev, where = self.start_gap
            if not self.purged or self.purged.get("seq") != first - 1 or self.purged.get("hash") != prev:
                span = "event 1 was removed" if first == 2 else "events 1 to %d were removed" % (first - 1,)
                raise Problem(
                    REMOVED,
                    "%s: the record starts at event %d (%s) and no store.purged event accounts for it"
                    % (span, first, where),
                )
            report.notes.append("events 1 to %d were removed under the retention policy (store.purged)" % (first - 1,))
        if report.events == 0:
            if self.trusted is not None:
                raise Problem(UNSIGNED, "the record is empty")
            return
        signed = self.checkpoint_seen or self.signing_declared
        if self.trusted is not None and not signed:
            raise Problem(UNSIGNED, "the record is not signed at all, so nothing in it is signed by the key you gave")
        if signed:
            first_unsigned = (self.last_checkpoint or report.first_seq - 1) + 1
            if first_unsigned <= report.last_seq:
                span = "event %d comes" % (first_unsigned,) if first_unsigned == report.last_seq else (
                    "events %d to %d come" % (first_unsigned, report.last_seq))
                if live or running:
                    report.notes.append(
                        "%s after the last checkpoint: not signed yet (a gateway is writing to the record now)" % (span,)
                    )
                else:
                    raise Problem(
                        UNSIGNED_TAIL,
                        "unsigned tail: %s after the last signed checkpoint (seq %s): the signed end of the record "
                        "was removed, or a gateway did not stop cleanly (start it again to record the recovery)"
                        % (span, self.last_checkpoint),
                    )
            if self.trusted is not None:
                report.notes.append("signatures checked with the key you gave (%s)" % (self.trusted.key_id,))
            else:
                report.notes.append(
                    "signatures checked with the key(s) published with the record (%s); "
                    "pass --key with your own copy of the public key to rule out a substituted key"
                    % (", ".join(sorted(report.key_ids)) or "none"),
                )
        else:
            report.notes.append("the record is not signed (no gateway.signing_key was configured)")
        for start, end, at in self.late_signed:
            report.notes.append(
                "events %s to %s were written by a run that crashed before signing them; "
                "the record says so at seq %d and they are signed from there" % (start, end, at)
            )
        sliced = self.source.kind == "bundle"
        for gateway, started in sorted(self.gateways.items(), key=lambda item: item[1]):
            if sliced:
                report.notes.append("gateway %s (started at seq %d) was still running where the bundle ends" % (gateway, started))
            elif live or (running is not None and gateway in running):
                report.notes.append("gateway %s (started at seq %d) is running" % (gateway, started))
            else:
                raise Problem(
                    UNENDED,
                    "gateway %s started at seq %d and never stopped, and is not running: the end of the record "
                    "was removed, or it crashed (start a gateway on this store to record the recovery)" % (gateway, started),
                )
        still_open = [
            (started, session, owner)
            for session, (started, owner) in self.sessions.items()
            if owner not in self.gateways and owner is not None
        ]
        for started, session, owner in sorted(still_open):
            raise Problem(
                REMOVED_SESSION,
                "session %s (started at seq %d) never ended: its end event was removed" % (session, started),
            )
        open_sessions = report.sessions_open = len(self.sessions)
        if open_sessions:
            report.notes.append(
                "%d session(s) still open at the end of the %s" % (open_sessions, "bundle" if sliced else "record")
            )

    def _explain_break(self, seq, where, rest, event):
        """
        The chain breaks at C{where}: say whether the expected event turns
        up later (reordered), never (removed), and when a signed checkpoint
        further on tells what kind of events went, whether a whole session
        did.
        """
        expected = self.expected_seq
        remainder = list(rest)
        for later_where, _, later in remainder:
            if isinstance(later, dict) and later.get("seq") == expected:
                return Problem(
                    REORDERED,
                    "events were reordered: event %d is at %s, after event %s (%s)" % (expected, later_where, seq, where),
                )
        if isinstance(seq, int) and seq > expected:
            if seq - expected == 1:
                span = "event %d was removed" % (expected,)
            else:
                span = "events %d to %d were removed" % (expected, seq - 1)
            text = "%s: the chain jumps from %d to %d at %s" % (span, expected - 1, seq, where)
            missing = self._missing_by_checkpoint([event] + [later for _, _, later in remainder])
            if missing:
                kind = REMOVED
                if missing.get("session.start") or missing.get("session.end"):
                    kind = REMOVED_SESSION
                    text = "a whole session was removed: " + text
                text += " (%s)" % (missing["_text"],)
                return Problem(kind, text)
            return Problem(REMOVED, text)
        return Problem(
            REMOVED,
            "event %s (%s) does not follow the event before it: the event before it was replaced or the chain "
            "was rewritten" % (seq, where),
        )

    def _missing_by_checkpoint(self, following):
        if self.counts is None:
            return None
        counts = dict(self.counts)
        for event in following:
            if not isinstance(event, dict):
                continue
            if event.get("type") == chaining.CHECKPOINT:
                signed = event.get("counts") or {}
                missing = {
                    kind: signed.get(kind, 0) - counts.get(kind, 0)
                    for kind in signed
                    if signed.get(kind, 0) > counts.get(kind, 0)
                }
                if not missing:
                    return None
                missing["_text"] = "the signed checkpoint at seq %s counts %s more than the record holds" % (
                    event.get("seq"),
                    ", ".join("%d %s" % (number, kind) for kind, number in sorted(missing.items())),
                )
                return missing
            counts[event.get("type")] = counts.get(event.get("type"), 0) + 1
        return None


def _describe_difference(signed, counted):
    kinds = sorted(set(signed) | set(counted))
    return ", ".join(
        "%s: %d signed, %d found" % (kind, signed.get(kind, 0), counted.get(kind, 0))
        for kind in kinds
        if signed.get(kind, 0) != counted.get(kind, 0)
    )


def verify_source(source, key=None, heads=(), checks=()):
    """
    Verify a record (and the chain of its views, if it has one).

    @param key: a L{Verifier} the auditor trusts, or None to use the keys
        published with the record.
    @param heads: C{(seq, hash, who says so)} the record must still hold
        (L{parse_head}, L{read_witness}).
    @param checks: what else the record must prove, as factories called
        with C{whole} (the walk starts at the genesis) that make an object
        with C{see(event)}, raising L{CheckFailed}, and C{summary()}, one
        line or None (L{hoopgw.approvals.evidence.ApprovalsCheck}).
    @return: a L{Report}.
    """
    report = _Walk(source, key, heads, checks).run()
    views = source.views()
    if views is not None:
        report.views = _Walk(views, None).run()
    return report


def verify(spec, key_path=None, expect_head=None, witness=None, checks=()):
    """
    Verify the record named by C{spec}: a store folder, an evidence bundle
    or a PostgreSQL store.

    @param expect_head: C{SEQ:HASH}, a head noted earlier that the record
        must still hold.
    @param witness: the path of a witness file the gateway published its
        signed checkpoints to; the record must hold each.
    """
    try:
        key = Verifier.from_file(key_path) if key_path else None
        heads = []
        if expect_head:
            heads.append(parse_head(expect_head) + ("--expect-head",))
        if witness:
            heads.extend(read_witness(witness, key))
        source = open_source(spec)
    except (SourceError, SigningKeyError, ValueError) as error:
        return Report(problem=str(error), kind=UNREADABLE)
    except Problem as problem:
        return Report(problem=problem.message, kind=problem.kind)
    return verify_source(source, key, heads, checks)


def verify_store(directory, key_path=None, expect_head=None, witness=None, checks=()):
    """
    Verify the file store in C{directory}.
    """
    if not os.path.isdir(directory):
        return Report(problem="%s is not a store folder" % (directory,), kind=UNREADABLE)
    return verify(directory, key_path, expect_head=expect_head, witness=witness, checks=checks)
