"""
The SIEM side's checks: C{hoopgw verify --siem-file FILE} verifies native
JSON lines a sink delivered (a file sink's output, or what a SIEM search
returns, one event a line) against their own chain, and C{hoopgw
export-status} shows each sink's cursor, lag and last error.
"""

import json
import os
import sys

import orjson

from hoopgw.store import events as chaining


def _lines(paths):
    for path in paths:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, 1):
                if raw.strip():
                    yield "%s line %d" % (path, number), raw


def _native(raw):
    """
    The stored event inside an exported line: the line itself, or the
    C{event} of a Splunk HEC envelope, or an RFC 5424 message's JSON.
    """
    text = raw.strip()
    start = text.find(b"\xef\xbb\xbf")
    if start >= 0:
        # A syslog message (as sent, or as a collector wrote it): the JSON follows the BOM.
        text = text[start + 3:]
    elif not text.startswith((b"{", b"[")):
        text = text[text.find(b"{"):]
    event = json.loads(text)
    if isinstance(event, dict) and "event" in event and "seq" not in event and isinstance(event["event"], dict):
        event = event["event"]
    if isinstance(event, dict) and "class_uid" in event and isinstance((event.get("unmapped") or {}).get("hoopgw"), dict):
        # An OCSF document carries the native event.
        event = event["unmapped"]["hoopgw"]
    return event


def verify_siem(paths, key_path=None, out=sys.stdout):
    """
    Check exported native events: each one's hash, the links between
    consecutive seqs, duplicates identical, and each checkpoint's signature
    (with your copy of the public key, or the key the gateway's start event
    published).  Gaps (filtered or not yet delivered) are listed.

    @return: the exit status: 0 when nothing is wrong.
    """
    from hoopgw.store.signing import SigningKeyError, Verifier

    trusted = None
    if key_path:
        try:
            trusted = Verifier.from_file(key_path)
        except SigningKeyError as error:
            print(str(error), file=out)
            return 2
    problems = []
    by_seq = {}
    duplicates = 0
    published = {}
    try:
        for where, raw in _lines(paths):
            try:
                event = _native(raw)
            except ValueError:
                problems.append("%s is not a JSON event" % (where,))
                continue
            seq = event.get("seq") if isinstance(event, dict) else None
            if not isinstance(seq, int):
                problems.append("%s has no seq: it is neither a native event nor an OCSF document of hoopgw" % (where,))
                continue
            if chaining.digest(event) != event.get("hash"):
                problems.append("%s (seq %d) does not match its hash: it was changed after the gateway wrote it" % (where, seq))
                continue
            if seq in by_seq:
                duplicates += 1
                if by_seq[seq]["hash"] != event["hash"]:
                    problems.append("%s holds seq %d twice with different contents" % (where, seq))
                continue
            by_seq[seq] = event
            key = (event.get("signing_key") or {}) if event.get("type") == "gateway.start" else {}
            if key.get("key_id") and key.get("public_key"):
                published[key["key_id"]] = key["public_key"]
    except OSError as error:
        print("cannot read %s: %s" % (error.filename, error.strerror), file=out)
        return 2
    if not by_seq:
        print("no native events found in %s" % (", ".join(paths),), file=out)
        return 1
    seqs = sorted(by_seq)
    gaps = []
    previous = None
    checkpoints = 0
    signed_through = None
    run_start = seqs[0]
    for seq in seqs:
        event = by_seq[seq]
        if previous is not None:
            if seq == previous + 1:
                if event.get("prev") != by_seq[previous]["hash"]:
                    problems.append("seq %d does not link to seq %d: the chain was rewritten" % (seq, previous))
            else:
                gaps.append((previous + 1, seq - 1))
                run_start = seq
        if event.get("type") == chaining.CHECKPOINT:
            covers = event.get("covers") or {}
            key_id = event.get("key_id")
            verifier = trusted if trusted is not None and trusted.key_id == key_id else None
            if verifier is None and trusted is None and key_id in published:
                verifier = Verifier.from_pem(published[key_id])
            if verifier is None:
                problems.append("the checkpoint at seq %d was signed by key %s, %s" % (
                    seq, key_id, "not by the key you gave" if trusted is not None else "which no exported gateway.start publishes (give --key)"))
            elif covers.get("seq") != seq - 1 or covers.get("hash") != event.get("prev"):
                problems.append("the checkpoint at seq %d does not cover the event before it" % (seq,))
            elif not verifier.check(chaining.checkpoint_message(event), event.get("signature") or ""):
                problems.append("the signature of the checkpoint at seq %d does not verify" % (seq,))
            else:
                checkpoints += 1
                if run_start == seqs[0]:
                    # Linked without a gap from the first exported event.
                    signed_through = seq
        previous = seq
    print("%d events (seq %d to %d), %d duplicates, %d checkpoints verified%s" % (
        len(by_seq), seqs[0], seqs[-1], duplicates, checkpoints,
        " (with your key)" if trusted is not None else " (with the keys the exported gateway.start events publish)",
    ), file=out)
    if signed_through is not None:
        print("signed: seq %d to %d are linked and vouched for by a verified checkpoint" % (seqs[0], signed_through), file=out)
        if signed_through < seqs[-1]:
            print("unsigned: seq %d to %d come after the last checkpoint" % (signed_through + 1, seqs[-1]), file=out)
    else:
        print("unsigned: no verified checkpoint covers these events", file=out)
    for first, last in gaps:
        print("gap: seq %d to %d are not in the file (filtered, or not delivered yet)" % (first, last), file=out)
    for problem in problems:
        print("PROBLEM: " + problem, file=out)
    return 1 if problems else 0


def export_status(config, out=sys.stdout, as_json=False):
    """
    Each sink's cursor, lag (against the store's last event) and last error,
    from the state files in C{gateway.state_dir}.

    @return: 0, or 3 when a sink is past its lag bounds or failing.
    """
    from hoopgw.export.runner import describe_target, load_state, state_path

    head = _store_head(config.gateway.store)
    rows = []
    for sink in config.gateway.export:
        state = load_state(state_path(config.gateway.state_dir, sink.name)) or {}
        cursor = (state.get("cursor") or {}).get("seq")
        lag = None if head is None or cursor is None else max(0, head - cursor)
        rows.append({
            "sink": sink.name,
            "type": sink.type,
            "format": sink.format,
            "target": describe_target(sink),
            "cursor": cursor,
            "head": head,
            "lag_events": lag,
            "lagging_since": state.get("lagging_since"),
            "failures": state.get("failures", 0),
            "last_error": state.get("last_error"),
            "last_error_at": state.get("last_error_at"),
            "last_delivery": state.get("last_delivery"),
            "delivered": state.get("delivered", 0),
            "updated": state.get("updated"),
        })
    if as_json:
        out.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        if not rows:
            print("no sinks: gateway.export is empty", file=out)
        for row in rows:
            print("%s (%s, %s) -> %s" % (row["sink"], row["type"], row["format"], row["target"]), file=out)
            if row["cursor"] is None:
                print("  cursor: none yet (the gateway has not run this sink)", file=out)
            else:
                print("  cursor: seq %s of %s; lag %s events; %d delivered; last delivery %s" % (
                    row["cursor"], row["head"] if row["head"] is not None else "?",
                    row["lag_events"] if row["lag_events"] is not None else "?", row["delivered"],
                    row["last_delivery"] or "never"), file=out)
            if row["lagging_since"]:
                print("  LAGGING since %s (past its bound)" % (row["lagging_since"],), file=out)
            if row["failures"]:
                print("  failing: %d attempts in a row; last error at %s: %s" % (
                    row["failures"], row["last_error_at"], row["last_error"]), file=out)
            elif row["last_error"]:
                print("  last error (recovered since) at %s: %s" % (row["last_error_at"], row["last_error"]), file=out)
    return 3 if any(row["lagging_since"] or row["failures"] for row in rows) else 0


def _store_head(store):
    if store.backend == "file":
        from hoopgw.export.reader import FileReader

        if not os.path.isdir(store.path):
            return None
        return FileReader(store.path, None).head()
    try:
        from hoopgw.store.postgres import PostgresSource

        password = store.postgres.password.read_text().strip() if store.postgres.password is not None else None
        source = PostgresSource(store.postgres.dsn, schema=store.postgres.schema, password=password)
        try:
            return source.fingerprint() or 0
        finally:
            source.close()
    except Exception:
        return None
