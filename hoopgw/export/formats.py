"""
What a sink sends for one event of the record: the event exactly as the
store holds it (C{native}: its seq and hash let the receiver check it
against the chain), or an OCSF 1.3.0 document (C{ocsf}).  Also the per-sink
filter (event types, connections) and field allow-list.

Only what the record holds leaves: the record is redacted and masked before
its events are built, so nothing here removes secrets; the allow-list lets
an operator send less.
"""

import fnmatch

import orjson

from hoopgw import __version__
from hoopgw.store import events as chaining

OCSF_VERSION = "1.3.0"

# Kept by a native allow-list whatever it names: without them an exported
# event cannot be placed in (or checked against) the chain.
CHAIN_FIELDS = ("seq", "ts", "type", "prev", "hash")

AUTHENTICATION = 3002
API_ACTIVITY = 6003
DATASTORE_ACTIVITY = 6005
BASE_EVENT = 0
CATEGORY = {AUTHENTICATION: 3, API_ACTIVITY: 6, DATASTORE_ACTIVITY: 6, BASE_EVENT: 0}
CLASS_NAME = {
    AUTHENTICATION: "Authentication",
    API_ACTIVITY: "API Activity",
    DATASTORE_ACTIVITY: "Datastore Activity",
    BASE_EVENT: "Base Event",
}
CATEGORY_NAME = {3: "Identity & Access Management", 6: "Application Activity", 0: "Uncategorized"}

# OCSF severity_id and status_id.
INFORMATIONAL, LOW, MEDIUM, HIGH = 1, 2, 3, 4
SUCCESS, FAILURE = 1, 2

# Authentication activity_id.
LOGON, LOGOFF = 1, 2
# Datastore Activity activity_id by the first word of the statement.
SQL_ACTIVITY = {
    "select": (1, "Read"), "show": (1, "Read"), "explain": (1, "Read"),
    "update": (2, "Update"), "insert": (5, "Write"), "copy": (5, "Write"), "merge": (2, "Update"),
    "create": (6, "Create"), "delete": (7, "Delete"), "drop": (7, "Delete"), "truncate": (7, "Delete"),
}
QUERY = (4, "Query")
# API Activity activity_id by Kubernetes verb (anything else is Other).
API_ACTIVITY_BY_VERB = {
    "create": (1, "Create"),
    "get": (2, "Read"), "list": (2, "Read"), "watch": (2, "Read"),
    "update": (3, "Update"), "patch": (3, "Update"),
    "delete": (4, "Delete"), "deletecollection": (4, "Delete"),
}
OTHER = (99, "Other")


class EventFilter:
    """
    Which events a sink sends: their types (shell-style patterns such as
    C{session.*}) and connections.  An event of no connection (the gateway's
    own, checkpoints) passes a connection filter: the chain needs them.
    """

    def __init__(self, types=None, connections=None):
        self.types = tuple(types) if types else None
        self.connections = frozenset(connections) if connections else None

    def __call__(self, event):
        kind = event.get("type", "")
        if self.types is not None and not any(fnmatch.fnmatchcase(kind, pattern) for pattern in self.types):
            return False
        connection = event.get("connection")
        if self.connections is not None and connection is not None and connection not in self.connections:
            return False
        return True


def allow_fields(event, fields):
    """
    C{event} with only the top-level C{fields} (and the chain's own).
    """
    return {key: value for key, value in event.items() if key in fields or key in CHAIN_FIELDS}


def native(raw, event, fields=None):
    """
    The native document: the stored line itself (byte for byte, so its hash
    checks), or, with an allow-list, the event with only those fields.
    """
    if fields is None:
        return raw.rstrip(b"\n")
    return orjson.dumps(allow_fields(event, fields))


def ocsf(event, fields=None):
    """
    The OCSF 1.3.0 document for C{event}, as a dict.  C{unmapped.hoopgw}
    carries the native event (cut to the allow-list, if any).
    """
    kind = event.get("type", "")
    mapper = _MAPPERS.get(kind, _base_event)
    document = mapper(event)
    # The native event itself, untouched: an OCSF document can be checked
    # against the chain as a native line can (unless an allow-list cut it).
    document.setdefault("unmapped", {})["hoopgw"] = allow_fields(event, fields) if fields is not None else event
    return document


def ocsf_or_base(event, fields=None):
    """
    L{ocsf}, or, for an event whose facts its class cannot take (a field of
    an unexpected type), a Base Event carrying it: one odd event must not
    stop a sink for good.
    """
    try:
        return ocsf(event, fields)
    except Exception:
        document = _common(dict(event, ts=None), BASE_EVENT, OTHER)
        document["time"] = 0
        document["message"] = "%s (not mapped: unexpected facts)" % (event.get("type"),)
        document["unmapped"] = {"hoopgw": allow_fields(event, fields) if fields is not None else event}
        return document


def _common(event, class_uid, activity, severity=INFORMATIONAL, status=None):
    activity_id, activity_name = activity
    document = {
        "class_uid": class_uid,
        "class_name": CLASS_NAME[class_uid],
        "category_uid": CATEGORY[class_uid],
        "category_name": CATEGORY_NAME[CATEGORY[class_uid]],
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "time": _milliseconds(event.get("ts")),
        "severity_id": severity,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "hoopgw", "vendor_name": "hoopgw", "version": __version__},
            "log_name": "hoopgw record",
            "sequence": event.get("seq"),
            "uid": event.get("hash"),
            "original_time": event.get("ts"),
            "event_code": event.get("type"),
        },
        "message": event.get("type"),
    }
    if event.get("session"):
        document["metadata"]["correlation_uid"] = event["session"]
    document["metadata"] = {key: value for key, value in document["metadata"].items() if value is not None}
    if status is not None:
        document["status_id"] = status
        document["status"] = "Success" if status == SUCCESS else "Failure"
    return document


def _milliseconds(stamp):
    if not stamp:
        return 0
    return int(round(chaining.epoch(stamp) * 1000))


def _endpoint(address):
    """
    An OCSF network endpoint from C{host:port} (or C{[v6]:port}).
    """
    if not address or not isinstance(address, str):
        return {}
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return {"name": address}
    host = host.strip("[]")
    return {"ip": host, "port": int(port)}


def _user(event):
    identity = event.get("identity") or {}
    name = identity.get("subject") or event.get("subject") or (event.get("attributes") or {}).get("user") or "unknown"
    user = {"name": name, "uid": name}
    if identity.get("groups"):
        user["groups"] = [{"name": group} for group in identity["groups"]]
    if identity.get("kind") == "service":
        user["type_id"], user["type"] = 99, "Service"
    elif identity.get("kind") == "human":
        user["type_id"], user["type"] = 1, "User"
    return user


def _endpoints(document, event):
    document["src_endpoint"] = _endpoint(event.get("client"))
    document["dst_endpoint"] = {"svc_name": event.get("connection") or "", "name": event.get("target") or ""}


def _authentication(event):
    kind = event["type"]
    refused = kind == "session.refused"
    activity = (LOGOFF, "Logoff") if kind == "session.end" else (LOGON, "Logon")
    document = _common(event, AUTHENTICATION, activity, MEDIUM if refused else INFORMATIONAL, FAILURE if refused else SUCCESS)
    document["user"] = _user(event)
    _endpoints(document, event)
    document["service"] = {"name": event.get("connection") or ""}
    if event.get("session"):
        document["session"] = {"uid": event["session"]}
    document["is_remote"] = True
    method = (event.get("identity") or {}).get("method")
    if method:
        document["auth_protocol_id"], document["auth_protocol"] = 99, method
    if refused:
        refusal = event.get("refusal") or {}
        document["status_detail"] = refusal.get("reason") or refusal.get("message") or "refused"
    return document


def _command(event):
    """
    A command, or its end: Datastore Activity for SQL, API Activity for
    the rest, with the gateway's decision as the security control's action.
    """
    kind = event.get("kind") or ""
    facts = event.get("facts") or {}
    decision = event.get("decision") or {}
    verdict = decision.get("verdict")
    denied = verdict not in (None, "allow", "approved")
    if event["type"] == "command.end" and not denied:
        outcome = event.get("outcome") or {}
        # What each front end calls a failure: an error (SQLSTATE, HTTP 4xx
        # and 5xx, a lost target), a command that exited non-zero or was
        # killed, a client that left before it ran.
        failed = isinstance(outcome, dict) and bool(
            outcome.get("error")
            or outcome.get("status") in ("error", "signalled", "interrupted", "denied")
            or (outcome.get("status") == "exited" and outcome.get("exit_status"))
        )
    else:
        failed = denied
    text = event.get("text") or ""
    if event.get("protocol") == "postgres" or kind == "sql":
        word = str(facts.get("statement_type") or (text.split(None, 1)[0] if text.split() else "")).lower()
        class_uid, activity = DATASTORE_ACTIVITY, SQL_ACTIVITY.get(word, QUERY)
    else:
        class_uid = API_ACTIVITY
        activity = API_ACTIVITY_BY_VERB.get(str(facts.get("verb", "")).lower(), OTHER)
    document = _common(event, class_uid, activity, MEDIUM if denied else INFORMATIONAL, FAILURE if failed else SUCCESS)
    document["actor"] = {"user": _user(event)}
    if event.get("session"):
        document["actor"]["session"] = {"uid": event["session"]}
    _endpoints(document, event)
    if class_uid == DATASTORE_ACTIVITY:
        document["type_id"], document["type"] = 1, "Database"
        document["database"] = {"name": str(facts.get("database") or event.get("target") or ""), "type_id": 99, "type": "PostgreSQL"}
        document["query_info"] = {"query_string": text}
        if event.get("command"):
            document["query_info"]["uid"] = event["command"]
        # The class includes the security control profile: the decision is its action.
        document["metadata"]["profiles"] = ["security_control"]
        if denied:
            document["action_id"], document["action"] = 2, "Denied"
            document["disposition_id"], document["disposition"] = 2, "Blocked"
        else:
            document["action_id"], document["action"] = 1, "Allowed"
            document["disposition_id"], document["disposition"] = 1, "Allowed"
    else:
        operation = facts.get("verb") or kind or "command"
        document["api"] = {"operation": str(operation), "service": {"name": event.get("connection") or ""}}
        if event.get("command"):
            document["api"]["request"] = {"uid": event["command"]}
        if facts.get("resource"):
            document["resources"] = [
                {"type": str(facts.get("resource")), "name": str(facts.get("name") or ""), "namespace": str(facts.get("namespace") or "")}
            ]
    if denied:
        document["status_detail"] = decision.get("reason") or decision.get("rule") or "refused"
    if event.get("duration_ms") is not None:
        document["duration"] = int(event["duration_ms"])
    unmapped = {"decision": decision}
    if decision.get("approval"):
        unmapped["approval"] = decision["approval"]
    if event.get("masked"):
        unmapped["masked"] = event["masked"]
    document["unmapped"] = unmapped
    return document


def _base_event(event):
    """
    What no OCSF class fits (the gateway's start and stop, checkpoints,
    approvals, export alerts): a Base Event with the facts unmapped.
    """
    kind = event.get("type", "")
    severity = HIGH if kind in ("export.lagging", "store.recovered", "gateway.recovered") else INFORMATIONAL
    document = _common(event, BASE_EVENT, OTHER, severity)
    if kind.endswith((".refused", ".lagging")):
        document["status_id"], document["status"] = FAILURE, "Failure"
    return document


_MAPPERS = {
    "session.start": _authentication,
    "session.refused": _authentication,
    "session.end": _authentication,
    "command": _command,
    "command.end": _command,
}
