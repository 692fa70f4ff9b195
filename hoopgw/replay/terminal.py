"""
The record in a terminal: C{hoopgw sessions list} (one line a session,
with filters) and C{hoopgw replay SESSION} (its identity, the timeline of
its commands with decisions, approvals and outcomes, and each of its
terminal recordings played back with its timing).
"""

import hashlib
import json
import time

from hoopgw import cast as casts
from hoopgw.store.index import Index, to_epoch


def list_sessions(source, out, **filters):
    index = Index(source.entries())
    chosen = index.select(**filters)
    print("%-27s %-20s %-18s %-9s %-14s %4s  %s" % ("STARTED (UTC)", "SESSION", "IDENTITY", "PROTOCOL", "CONNECTION", "CMDS", "FLAGS"), file=out)
    for record in chosen:
        print(
            "%-27s %-20s %-18s %-9s %-14s %4d  %s"
            % (
                record.started,
                record.id,
                record.subject or "-",
                record.protocol,
                record.connection,
                len(record.commands),
                " ".join([record.status] + record.flags()),
            ),
            file=out,
        )
    print("%d session(s)" % (len(chosen),), file=out)
    return index, chosen


def describe_identity(identity):
    """
    Lines saying who the identity is and how the gateway knew.
    """
    if not identity:
        return ["identity: not established"]
    lines = [
        "identity: %s (%s) from %s" % (identity.get("subject"), identity.get("kind", "?"), identity.get("issuer") or "?"),
        "  proven by: %s%s" % (identity.get("method", "?"), _provenance(identity.get("provenance") or {})),
        "  groups: %s" % (", ".join(identity.get("groups") or []) or "(none)",),
    ]
    if identity.get("token_id"):
        lines.append("  token id: %s" % (identity["token_id"],))
    return lines


def _provenance(provenance):
    shown = ", ".join("%s %s" % (key, value) for key, value in sorted(provenance.items()) if value not in (None, ""))
    return " (%s)" % (shown,) if shown else ""


def describe_decision(decision):
    verdict = decision.get("verdict", "?")
    text = verdict.upper()
    if decision.get("rule"):
        text += " by %s" % (decision["rule"],)
    if decision.get("reason"):
        text += ": %s" % (decision["reason"],)
    approval = decision.get("approval")
    if approval:
        text += " [approval %s]" % (describe_approval(approval),)
    return text


def describe_approval(approval):
    if not isinstance(approval, dict):
        return str(approval)
    parts = []
    if approval.get("id"):
        parts.append(str(approval["id"]))
    approvers = approval.get("approvers") or approval.get("approver")
    if approvers:
        if isinstance(approvers, list):
            approvers = ", ".join(
                "%s%s%s" % (
                    each.get("subject", each) if isinstance(each, dict) else each,
                    " at %s" % (each["at"],) if isinstance(each, dict) and each.get("at") else "",
                    ": %s" % (each["reason"],) if isinstance(each, dict) and each.get("reason") else "",
                )
                for each in approvers
            )
        parts.append("by %s" % (approvers,))
    for key in ("at", "approved_at", "reason"):
        if approval.get(key):
            parts.append("%s %s" % (key.replace("_", " "), approval[key]))
    return "; ".join(parts)


def describe_outcome(outcome):
    if not outcome:
        return "no outcome recorded"
    parts = [str(outcome.get("status", ""))]
    for key in ("tag", "rows", "sqlstate", "error", "exit_status", "reason"):
        if outcome.get(key) not in (None, ""):
            parts.append("%s=%s" % (key, outcome[key]))
    return " ".join(part for part in parts if part)


def timeline(record):
    """
    The session as lines of text: who, from where, and every command.
    """
    lines = [
        "session %s: %s on %s (%s) from %s to %s" % (
            record.id, record.status, record.connection, record.protocol, record.client, record.target or "?"),
        "started %s, ended %s" % (record.started or "?", record.ended or "(not ended)"),
    ]
    lines.extend(describe_identity(record.identity))
    if record.refused:
        lines.append("REFUSED: %s" % ((record.end.get("refusal") or {}).get("reason", ""),))
    origin = to_epoch(record.started) if record.started else None
    for number, command in enumerate(record.commands, 1):
        offset = "+%.3fs" % (to_epoch(command.ts) - origin,) if origin and command.ts else ""
        lines.append("")
        lines.append("#%d %s %s %s" % (number, offset, command.kind, command.text))
        if command.event.get("parameters"):
            lines.append("   parameters: %s" % (json.dumps(command.event["parameters"]),))
        lines.append("   decision: %s" % (describe_decision(command.decision),))
        lines.append("   outcome: %s" % (describe_outcome(command.outcome),))
        if command.masked:
            lines.append("   masked values: %d" % (command.masked,))
        results = command.results
        if results:
            if results.get("columns"):
                lines.append("   results (as recorded): %s" % (" | ".join(results["columns"]),))
            for row in results.get("rows") or []:
                lines.append("     %s" % (" | ".join("NULL" if value is None else str(value) for value in row),))
            if results.get("text"):
                lines.append("   output (as recorded): %s" % (results["text"].rstrip(),))
        if command.cast:
            lines.append("   terminal recording: %s" % (describe_recording(command.cast),))
    return lines


def describe_recording(recording):
    text = "%s (sha256 %s" % (recording.get("name"), recording.get("sha256"))
    if isinstance(recording.get("bytes"), int):
        text += ", %d bytes" % (recording["bytes"],)
    if recording.get("truncated"):
        text += ", truncated at the size limit"
    return text + ")"


def load(source, recording):
    """
    A committed recording read from C{source} and checked against its
    digest.

    @return: C{(parsed recording, None)}, or C{(None, why it cannot be
        played)}.
    """
    name = recording.get("name")
    data = source.attachment(name) if isinstance(name, str) and name else None
    if data is None:
        return None, "the recording %s is missing from the record" % (name,)
    if hashlib.sha256(data).hexdigest() != recording.get("sha256"):
        return None, "the recording %s does not match the digest in the record: it was edited; not playing it" % (name,)
    try:
        return casts.parse(data), None
    except casts.CastError as error:
        return None, "the recording %s cannot be played: %s" % (name, error)


def play(cast, out, speed=1.0, sleep=time.sleep, max_pause=5.0):
    """
    Write a recording's output to C{out} with its timing, C{speed} times
    faster; pauses longer than C{max_pause} seconds (an idle terminal) are
    shortened to it.
    """
    previous = 0.0
    for when, code, data in cast.frames:
        if code != "o":
            continue
        pause = min(max(when - previous, 0.0), max_pause) / speed
        if pause > 0:
            out.flush()
            sleep(pause)
        previous = when
        out.write(data)
    out.flush()


def replay(source, session_id, out, speed=1.0, sleep=time.sleep, command=None):
    """
    Print a session's timeline and play its terminal recordings, in the
    order of its commands.

    @param command: play only the recording of this command (its number in
        the timeline, or its id).
    @return: the exit status: 0, 1 if there is no such session or a
        recording is missing or does not match the record, 2 if the
        command asked for left no recording.
    """
    index = Index(source.entries())
    record = index.sessions.get(session_id)
    if record is None:
        print("there is no session %s in %s; list them with 'hoopgw sessions list'" % (session_id, source.name), file=out)
        return 1
    for line in timeline(record):
        print(line, file=out)
    recordings = record.recordings
    if command is not None:
        recordings = [(number, each) for number, each in recordings if command in (str(number), each.id)]
        if not recordings:
            print("command %s of session %s left no terminal recording" % (command, session_id), file=out)
            return 2
    status = 0
    for number, each in recordings:
        parsed, problem = load(source, each.cast)
        print("", file=out)
        if parsed is None:
            print("#%d: %s" % (number, problem), file=out)
            status = 1
            continue
        heading = "--- playing #%d %s (%.1fs at %gx) ---" % (number, each.cast.get("name"), parsed.duration, speed)
        print(heading, file=out)
        play(parsed, out, speed=speed, sleep=sleep)
        print("\n--- end of recording #%d ---" % (number,), file=out)
    return status
