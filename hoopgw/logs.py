"""
hoopgw's own lines in the gateway's log, for operators (the record is for
auditors): one line per session start, end and refusal, configuration
reload, limit hit and store state change, each naming the session id the
record uses.  All go through the C{hoopgw} log namespace, with their facts
as fields, so that the JSON observer (C{twistd --logger=hoopgw.logs.json})
gives a log shipper one object a line.

Nothing secret goes out: every text field passes through
L{hoopgw.redact.redact_text} (card numbers, tokens, key=value secrets), and
no credential is ever a field.
"""

import json as _json
import sys
import time

from twisted.logger import FileLogObserver, Logger, formatEvent

from hoopgw.model import Unavailable
from hoopgw.redact import redact_text


log = Logger(namespace="hoopgw")


def _clean(value):
    if isinstance(value, str):
        return redact_text(value)[0]
    return value


def _emit(level, event, format, **fields):
    fields = {key: _clean(value) for key, value in fields.items()}
    getattr(log, level)(format, event=event, **fields)


def failed(logger, failure, format, **fields):
    """
    Log C{failure} on C{logger}: a warning line when a service the gateway
    relies on is unavailable (its message says why; the service logs its
    own outage once, so a traceback per refused write would only bury it),
    a traceback for anything else, which is a bug.
    """
    if failure.check(Unavailable):
        logger.warn(format + ": {why}", why=_clean(failure.getErrorMessage()), **fields)
    else:
        logger.failure(format, failure, **fields)


def _who(session):
    identity = session.identity
    return identity.subject if identity is not None else "-"


def _session_fields(session):
    return {
        "session": session.id,
        "connection": session.connection,
        "protocol": session.protocol,
        "client": str(session.client_address),
        "subject": _who(session),
    }


def session_started(session):
    _emit(
        "info",
        "session.start",
        "session {session} started: {subject} from {client} on {connection} ({protocol})",
        **_session_fields(session),
    )


# Set in a refused session's metadata when the flood bound counted it in
# its address's summary instead of recording it (L{hoopgw.refusals}).
SUMMARISED = "refusal_summarised"


def session_refused(session, decision):
    """
    A refused session's line, unless it is one of a flood: then the
    address's summary line (L{refusals_summarised}) counts it, as the
    record's summary event does.
    """
    if session.metadata.get(SUMMARISED):
        return
    _emit(
        "warn",
        "session.refused",
        "session {session} refused: {subject} from {client} on {connection} ({protocol}): {reason} [{rule}]",
        reason=decision.reason or "",
        rule=decision.rule or "",
        **_session_fields(session),
    )


def refusals_summarised(summary):
    """
    One line per client address and interval for the refusals a flood
    bound counted (the C{session.refused.summary} event's counts).
    """
    by_reason = summary.get("by_reason") or {}
    _emit(
        "warn",
        "session.refused.summary",
        "{refused} more refused attempts from {client} since {first} were counted, not logged one by one "
        "(a flood of refusals): {by_reason_text}",
        client=summary.get("client", "-"),
        refused=summary.get("refused", 0),
        first=summary.get("first") or "-",
        last=summary.get("last") or "-",
        by_reason_text=", ".join("%s %d" % item for item in sorted(by_reason.items())),
        reasons=sorted(by_reason),
        identities=len(summary.get("identities") or ()) + summary.get("more_identities", 0),
    )


def session_ended(session):
    _emit(
        "info",
        "session.end",
        "session {session} ended after {seconds}s: {subject} on {connection}: {reason}",
        seconds=round(time.time() - session.started, 3),
        reason=session.attributes.get("end_reason") or "ended",
        **_session_fields(session),
    )


def reload_applied(changed, config_sha256):
    _emit(
        "info",
        "config.reloaded",
        "configuration reloaded ({config_sha256}): chain changed on {changed_text}",
        changed=sorted(changed),
        changed_text=", ".join(sorted(changed)) or "no connection",
        config_sha256=config_sha256[:12],
    )


def reload_refused(reason):
    _emit("error", "config.reload_refused", "configuration not reloaded: {reason}", reason=reason)


def limit_hit(what, limit, detail="", session=None):
    """
    A bound was reached (a recording's size, a message's size, a flood of
    sessions): what, the bound, and whose session it was.
    """
    _emit(
        "warn",
        "limit",
        "limit hit in session {session}: {what} (limit {limit}){detail}",
        what=what,
        limit=limit,
        detail=": " + detail if detail else "",
        session=session.id if session is not None else "-",
    )


# Store states that mean events are being refused: logged as critical.
_STORE_DOWN = ("failed", "unavailable", "unreachable", "stalled", "low-space")


def store_state(state, reason="", backend="", **facts):
    """
    The evidence store changed state: C{low-space} (new sessions refused),
    C{space-ok}, C{stalled} (the volume is full: every event refused),
    C{resumed}, C{failed} (for good), C{unreachable} (a PostgreSQL store's
    database is away), C{reconnected}.  C{facts}: counts (C{refused},
    C{seconds} ...), fields of the line.
    """
    _emit(
        "critical" if state in _STORE_DOWN else "warn",
        "store.state",
        "evidence store {state}{detail}",
        state=state,
        detail=": " + reason if reason else "",
        reason=reason,
        backend=backend,
        **facts,
    )


def _facts(event):
    """
    The plain fields of an event: not the logging system's own (log_*),
    nor objects that would not read as JSON.
    """
    found = {}
    for key, value in event.items():
        if key.startswith("log_") or key in ("format", "message", "isError", "system", "time"):
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            found[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(item, (str, int, float, bool)) for item in value):
            found[key] = list(value)
    return found


def format_json(event):
    """
    One log event as one JSON line: time (UTC, ISO 8601), level, namespace,
    the message as text, and the event's plain fields (hoopgw's own lines
    carry C{event}, C{session}, C{connection}, C{subject} ...).
    """
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        + ".%03dZ" % (int((event.get("log_time", 0) % 1) * 1000),),
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = "%s: %s" % (failure.type.__name__, failure.getErrorMessage())
        record["traceback"] = failure.getTraceback()
    record.update({key: value for key, value in _facts(event).items() if key not in record})
    return _json.dumps(record, default=str) + "\n"


def json(stream=None):
    """
    A log observer writing JSON lines, for C{twistd --logger=hoopgw.logs.json}:
    twistd calls it with no argument, so the lines go to standard output
    (journald, a container's log), and --logger takes precedence over
    twistd's --logfile.
    """
    return FileLogObserver(stream or sys.stdout, format_json)
