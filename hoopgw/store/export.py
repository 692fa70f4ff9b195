"""
C{hoopgw export}: a self-contained evidence bundle (tar.gz) for an
auditor.  It holds a slice of the chain that verifies on its own: it starts
at the last signed checkpoint before the period (with the hash of the
event before it, its anchor) and ends at the first signed checkpoint after
it, so every event in it is covered by a signature.  Beside the events:
the asciicasts its commands committed, the public keys, the views of the
record over the same period, a README and a report mapping PCI DSS
requirements to what the bundle shows.
"""

import hashlib
import io
import json
import os
import tarfile
import time

from hoopgw import __version__, cards
from hoopgw.cast import committed
from hoopgw.store.index import Index, to_epoch
from hoopgw.store import events as chaining
from hoopgw.store.sources import BUNDLE_FORMAT


class ExportError(Exception):
    """
    The bundle cannot be made; the message says what to do.
    """


def _slice(entries, since, until):
    """
    The lines of the chain to export for C{[since, until]} (epoch
    seconds): from the last checkpoint before the period (or the start of
    the record) to the first checkpoint after it.

    @return: C{(raw lines, events, anchor)}.
    """
    before = []
    kept = None
    last_in = None
    for where, raw, event in entries:
        if not isinstance(event, dict):
            raise ExportError("%s is not a JSON event: run 'hoopgw verify' on the store first" % (where,))
        when = to_epoch(event.get("ts", ""))
        checkpoint = event.get("type") == chaining.CHECKPOINT
        if kept is None:
            if when < since:
                if checkpoint:
                    before = []
                before.append((raw, event))
                continue
            kept, before = before, None
        kept.append((raw, event))
        if when <= until:
            last_in = len(kept) - 1
        elif checkpoint:
            break
    if last_in is None or not any(since <= to_epoch(event.get("ts", "")) <= until for _, event in kept):
        raise ExportError("the record holds no event between the times given")
    end = max((i for i, (_, event) in enumerate(kept) if event.get("type") == chaining.CHECKPOINT), default=None)
    if end is None or end < last_in:
        unsigned = [event["seq"] for _, event in kept[(end or -1) + 1 : last_in + 1]]
        raise ExportError(
            "events %d to %d are not covered by a signed checkpoint yet: wait for the next one (the gateway writes one "
            "every checkpoint_interval, and when it stops), give an earlier --until, or configure gateway.signing_key"
            % (unsigned[0], unsigned[-1])
        )
    kept = kept[: end + 1]
    first = kept[0][1]
    anchor = {"seq": first["seq"] - 1, "hash": first["prev"]}
    return [raw for raw, _ in kept], [event for _, event in kept], anchor


def export(source, output, since=None, until=None, now=None):
    """
    Write the bundle for C{[since, until]} (epoch seconds; the whole record
    when absent) to C{output}.

    @return: the manifest.
    @raise ExportError: when no signed slice covers the period.
    """
    now = time.time() if now is None else now
    since = 0.0 if since is None else since
    until = now if until is None else until
    if until < since:
        raise ExportError("--until is before --since")
    lines, parsed, anchor = _slice(source.entries(), since, until)
    keys = dict(source.published_keys())
    for event in parsed:
        declared = event.get("signing_key") if event.get("type") == "gateway.start" else None
        if declared and declared.get("public_key"):
            keys.setdefault(declared["key_id"], declared["public_key"])
    index = Index(("", raw, event) for raw, event in zip(lines, parsed))
    casts = {}
    for event in parsed:
        recording = committed(event)
        name = recording.get("name") if recording else None
        if name and name not in casts:
            data = source.attachment(name) if isinstance(name, str) else None
            if data is None:
                raise ExportError(
                    "the terminal recording %r of command %s (session %s) is missing from the store: "
                    "run 'hoopgw verify' on the store" % (name, event.get("command"), event.get("session"))
                )
            casts[name] = data
    views = source.views()
    view_part = None
    view_lines = []
    if views is not None:
        try:
            view_lines, view_events, view_anchor = _slice(views.entries(), since, until)
        except ExportError:
            view_events = []
        if view_events:
            keys.update(views.published_keys())
            view_part = {"anchor": view_anchor, "first_seq": view_events[0]["seq"], "last_seq": view_events[-1]["seq"],
                         "events": len(view_events)}
        else:
            view_lines, view_events = [], []
    else:
        view_events = []
    events_data = b"".join(lines)
    manifest = {
        "format": BUNDLE_FORMAT,
        "made_by": "hoopgw %s" % (__version__,),
        "made_at": chaining.timestamp(now),
        "source": source.name,
        "period": {"since": chaining.timestamp(since), "until": chaining.timestamp(until)},
        "anchor": anchor,
        "first_seq": parsed[0]["seq"],
        "last_seq": parsed[-1]["seq"],
        "events": len(parsed),
        "events_sha256": hashlib.sha256(events_data).hexdigest(),
        "casts": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(casts.items())},
        "keys": sorted(keys),
        "views": view_part,
    }
    report = pci_report(index, parsed, casts, view_events, manifest)
    files = {
        "manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n",
        "events.jsonl": events_data,
        "README.txt": readme(manifest).encode(),
        "REPORT.md": report.encode(),
    }
    if view_lines:
        files["views.jsonl"] = b"".join(view_lines)
    for key_id, pem in keys.items():
        files["keys/%s.pem" % (key_id,)] = pem.encode("ascii")
    for name, data in casts.items():
        files["casts/" + name] = data
    sums = "".join("%s  %s\n" % (hashlib.sha256(data).hexdigest(), name) for name, data in sorted(files.items()))
    files["SHA256SUMS"] = sums.encode()
    temporary = output + ".partial"
    with tarfile.open(temporary, "w:gz") as bundle:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo("evidence/" + name)
            info.size = len(data)
            info.mtime = int(now)
            info.mode = 0o644
            bundle.addfile(info, io.BytesIO(data))
    os.replace(temporary, output)
    return manifest


def readme(manifest):
    return """hoopgw evidence bundle
======================

Period: {since} to {until} (UTC).
Events {first} to {last} of the gateway's record ({events} events), as the
gateway wrote them: one JSON object a line in events.jsonl, each holding
the SHA-256 of the one before ("prev") and its own ("hash", over the
event's canonical form: compact JSON, keys sorted, without "hash").  The
first event follows the event whose hash is {anchor_hash} (seq {anchor_seq}).

Events of type "checkpoint" are signed with Ed25519: the signature (base64)
is over "hoopgw-checkpoint-v1\\n" followed by the canonical JSON of the
checkpoint's covers (seq and hash of the event before it), counts, gateways,
key_id, seq and ts.  The bundle ends with a checkpoint, so every event in it
is covered by a signature.  keys/ holds the public keys (named by the
SHA-256 of the raw key); compare them with the copy you received from the
operator.

casts/ holds the terminal recordings (asciicast v2); each one's SHA-256 is
committed in the end event of the command that produced it (a
"command.end" whose "outcome" holds "cast": {{"name", "sha256"}}).
views.jsonl (when present) is the separate, signed chain in which the
replay server records who looked at the record (PCI DSS 10.2.1.3).

To check everything offline, with your copy of the public key:

    hoopgw verify evidence.tar.gz --key gateway-signing.pub

It names the first problem (an edited, reordered or removed event, a
removed session, a bad or foreign signature, an unsigned tail, a recording
that does not match) and exits non-zero; or prints OK.  Without hoopgw, the
chain can be recomputed with any JSON library and SHA-256.

REPORT.md maps PCI DSS v4.0 requirements to what this bundle shows.
""".format(
        since=manifest["period"]["since"],
        until=manifest["period"]["until"],
        first=manifest["first_seq"],
        last=manifest["last_seq"],
        events=manifest["events"],
        anchor_hash=manifest["anchor"]["hash"],
        anchor_seq=manifest["anchor"]["seq"],
    )


_PRIVILEGED = ("CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "TRUNCATE")
_CREDENTIALS = ("CREATE ROLE", "ALTER ROLE", "CREATE USER", "ALTER USER", "DROP ROLE", "DROP USER")


def _clear_pans(parsed, casts):
    """
    Luhn-valid card numbers in clear in the text an event keeps (commands,
    parameters, results) and in the recordings: the bundle should hold none.
    """
    found = 0
    for event in parsed:
        for key in ("text", "parameters", "results"):
            if key in event:
                found += cards.mask_text(json.dumps(event[key]))[1]
    for data in casts.values():
        found += cards.mask_bytes(data)[1]
    return found


def pci_report(index, parsed, casts, view_events, manifest):
    sessions = [record for record in index.order if not record.refused]
    refused = [record for record in index.order if record.refused]
    commands = [command for record in index.order for command in record.commands]
    blocked = [command for command in commands if command.verdict == "deny"]
    approved = [command for command in commands if command.verdict == "approved"]
    masked = sum(command.masked or 0 for command in commands)
    masked_commands = sum(1 for command in commands if command.masked)
    identities = {(record.identity.get("issuer"), record.identity.get("subject")) for record in sessions if record.identity}
    anonymous = sum(1 for record in sessions if not record.identity)
    kinds = {}
    for record in sessions:
        kind = record.identity.get("kind", "unknown") if record.identity else "unknown"
        kinds[kind] = kinds.get(kind, 0) + 1
    interactive = sum(1 for record in sessions if record.recordings)
    service_interactive = sum(
        1 for record in sessions if record.recordings and record.identity.get("kind") == "service"
    )
    words = [command.text.strip().upper() for command in commands]
    privileged = sum(1 for text in words if text.startswith(_PRIVILEGED))
    credentials = sum(1 for text in words if text.startswith(_CREDENTIALS))
    counts = {}
    for event in parsed:
        counts[event.get("type")] = counts.get(event.get("type"), 0) + 1
    required = ("type", "ts", "session", "subject", "client")
    session_events = [event for event in parsed if event.get("session")]
    complete = sum(1 for event in session_events if all(event.get(name) not in (None, "") for name in required[:3]))
    views = sum(1 for event in view_events if event.get("type") == "audit.view")
    view_denied = sum(1 for event in view_events if event.get("type") == "audit.signin.refused")
    clear = _clear_pans(parsed, casts)
    rows = [
        ("3.3.1", "Sensitive authentication data is not retained after authorization",
         "%d card numbers in clear in the bundle's commands, results and recordings (scanned for Luhn-valid PANs); "
         "%d values masked or withheld on the way out" % (clear, masked)),
        ("3.4.1", "PAN is masked when displayed (at most BIN and last four)",
         "%d values masked in %d command results; results samples in the record are kept masked" % (masked, masked_commands)),
        ("8.2.2", "Shared, group or generic accounts are not used; every action is attributable to one identity",
         "%d sessions by %d distinct identities (issuer + subject); %d sessions without an identity; "
         "the target's credentials never left the gateway" % (len(sessions), len(identities), anonymous)),
        ("8.6.1", "System and application accounts used interactively are managed and every use is attributable",
         "identities by kind: %s; %d sessions with terminal use, %d of them by service accounts, %d terminal "
         "recordings (asciicast), each committed in its command's end event"
         % (", ".join("%s %d" % item for item in sorted(kinds.items())) or "none", interactive, service_interactive,
            len(casts))),
        ("10.2.1.1", "All individual user access to cardholder data is logged",
         "%d sessions, %d commands, each with its identity and outcome" % (len(sessions), len(commands))),
        ("10.2.1.2", "All actions by administrative/privileged access are logged",
         "%d privileged statements (DDL, GRANT/REVOKE), %d approved by a human before they ran, %d blocked"
         % (privileged, len(approved), len(blocked))),
        ("10.2.1.3", "All access to audit logs is logged",
         "%d views of the record by auditors, %d refused sign-ins (views chain%s)"
         % (views, view_denied, "" if manifest.get("views") else ": none in this period")),
        ("10.2.1.4", "Invalid logical access attempts are logged",
         "%d refused sessions (bad, expired or foreign tokens, groups not allowed)" % (len(refused),)),
        ("10.2.1.5", "Changes to identification and authentication credentials are logged",
         "%d statements creating, changing or dropping database roles" % (credentials,)),
        ("10.2.1.6", "Initialization, stopping or pausing of the audit logs is logged",
         "%d gateway starts, %d stops, %d recoveries after a crash, %d archive and %d purge events"
         % (counts.get("gateway.start", 0), counts.get("gateway.stop", 0), counts.get("gateway.recovered", 0),
            counts.get("store.archived", 0), counts.get("store.purged", 0))),
        ("10.2.1.7", "Creation and deletion of system-level objects is logged",
         "%d CREATE/ALTER/DROP statements" % (sum(1 for text in words if text.startswith(("CREATE", "ALTER", "DROP"))),)),
        ("10.2.2", "Each entry records user, event type, date and time, success or failure, origin, and the affected resource",
         "%d of %d session events carry type, time and session; sessions carry subject, client address, connection and "
         "target; outcomes carry status and error codes" % (complete, len(session_events))),
        ("10.3.1", "Read access to audit logs is limited to those with a job-related need",
         "the replay server admits only the auditor group, with each auditor's own token"),
        ("10.3.2", "Audit log files are protected from modification",
         "a SHA-256 hash chain over every event and %d Ed25519-signed checkpoints; 'hoopgw verify' names any change"
         % (counts.get(chaining.CHECKPOINT, 0),)),
        ("10.3.3", "Audit log files are promptly backed up",
         "this bundle: events %d to %d, %d recordings, verifiable offline" % (manifest["first_seq"], manifest["last_seq"], len(casts))),
        ("10.3.4", "File integrity monitoring or change detection on audit logs",
         "'hoopgw verify' on the store or this bundle; the gateway refuses to start on a store whose end was altered"),
    ]
    lines = [
        "# PCI DSS evidence report",
        "",
        "Period %s to %s; events %d to %d (%d events); made by %s at %s."
        % (manifest["period"]["since"], manifest["period"]["until"], manifest["first_seq"], manifest["last_seq"],
           manifest["events"], manifest["made_by"], manifest["made_at"]),
        "",
        "Totals: %d sessions, %d refused, %d commands, %d blocked, %d approved, %d masked values, %d recordings."
        % (len(sessions), len(refused), len(commands), len(blocked), len(approved), masked, len(casts)),
        "",
        "| Requirement | What it asks | What this bundle shows |",
        "| --- | --- | --- |",
    ]
    lines.extend("| %s | %s | %s |" % row for row in rows)
    lines.extend(["", "Verify before relying on any of this: `hoopgw verify evidence.tar.gz --key <your copy of the public key>`.", ""])
    return "\n".join(lines)
