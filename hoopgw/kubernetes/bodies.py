"""
The Kubernetes shapes the front end reads and writes: C{Status} objects
for refusals, Secret values opened from base64 (so the chain sees the text
a Secret really holds) and closed again, and the audit event recorded for
every request.
"""

import base64
import binascii
import datetime
import json

from hoopgw import redact
from hoopgw.model import ResultChunk

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    502: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status(code, message, reason=None, details=None):
    """
    A Kubernetes C{Status} object as JSON bytes: what kubectl prints as
    C{Error from server (Reason): message}.
    """
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "InternalError"),
        "code": code,
    }
    if details:
        body["details"] = details
    return json.dumps(body).encode("utf-8")


def denial_details(info):
    """
    The C{details} of a Forbidden status, naming the object as the API
    server does.
    """
    details = {}
    if info.name:
        details["name"] = info.name
    if info.api_group:
        details["group"] = info.api_group
    if info.resource:
        details["kind"] = info.qualified_resource
    return details or None


# Secret values: opened before the chain sees a body, closed after.


def _open(value):
    """
    The text a base64 Secret value holds, or None when it is not text.
    """
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


def _open_data(data, opened, where):
    if not isinstance(data, dict):
        return
    for key, value in list(data.items()):
        text = _open(value)
        if text is not None:
            data[key] = text
            opened.append(where + [key])


# The fields of each kind whose values are base64.
BASE64_FIELDS = {"Secret": "data", "ConfigMap": "binaryData"}


def _open_object(obj, field, opened, where):
    _open_data(obj.get(field), opened, where + [field])
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    applied = annotations.get(LAST_APPLIED)
    if isinstance(applied, str) and ('"%s"' % (field,)) in applied:
        # kubectl apply keeps the whole object, base64 and all, in this annotation.
        try:
            document = json.loads(applied)
        except ValueError:
            return
        if isinstance(document, dict):
            inner = []
            _open_data(document.get(field), inner, [field])
            if inner:
                annotations[LAST_APPLIED] = json.dumps(document)
                opened.append(where + ["metadata", "annotations", LAST_APPLIED, inner])


def _base64_field(obj, list_kind=None):
    """
    The base64 field of C{obj}, if it is a Secret or a ConfigMap (items of
    a typed list carry no kind: C{list_kind} says it).
    """
    if not isinstance(obj, dict):
        return None
    return BASE64_FIELDS.get(obj.get("kind") or list_kind)


def open_secrets(document):
    """
    Replace, in place, the base64 values of every Secret (and ConfigMap
    binaryData) in C{document} (an object, a list, a watch event) by the
    text they encode.

    @return: where the opened values are, for L{close_secrets}.
    """
    opened = []
    if not isinstance(document, dict):
        return opened
    if document.get("type") in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK") and isinstance(document.get("object"), dict):
        field = _base64_field(document["object"])
        if field:
            _open_object(document["object"], field, opened, ["object"])
        return opened
    field = _base64_field(document)
    if field:
        _open_object(document, field, opened, [])
    elif (document.get("kind") or "").endswith("List"):
        list_kind = document["kind"][: -len("List")]
        for index, item in enumerate(document.get("items") or ()):
            field = _base64_field(item, list_kind)
            if field:
                _open_object(item, field, opened, ["items", index])
    return opened


def describe_opened(opened):
    """
    Where L{open_secrets} opened values, as JSON pointers (a value inside
    the last-applied annotation as the annotation's pointer, C{#}, and the
    pointer inside it).
    """
    pointers = []
    for where in opened:
        if isinstance(where[-1], list):
            outer = "/" + "/".join(str(step).replace("/", "~1") for step in where[:-1])
            pointers.extend(outer + "#" + pointer for pointer in describe_opened(where[-1]))
        else:
            pointers.append("/" + "/".join(str(step).replace("/", "~1") for step in where))
    return pointers


def _close(text):
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def close_secrets(document, opened):
    """
    Encode again, in place, what L{open_secrets} opened (after the chain
    may have masked it).
    """
    for where in opened:
        if isinstance(where[-1], list):
            holder = _walk(document, where[:-2])
            if holder is None or not isinstance(holder.get(where[-2]), str):
                continue
            try:
                inner_document = json.loads(holder[where[-2]])
            except ValueError:
                continue
            close_secrets(inner_document, where[-1])
            holder[where[-2]] = json.dumps(inner_document, separators=(",", ":"))
            continue
        holder = _walk(document, where[:-1])
        if holder is not None and isinstance(holder.get(where[-1]), str):
            holder[where[-1]] = _close(holder[where[-1]])


def body_chunk(content, content_type):
    """
    The chunk the chain sees for a JSON body (a response's, or one watch
    event): Secret values opened.

    @return: the chunk, and where values were opened (for L{body_bytes}).
    """
    opened = None
    data = content
    if b'"Secret' in content or b'"binaryData"' in content:
        try:
            document = json.loads(content)
        except ValueError:
            document = None
        if document is not None:
            opened = open_secrets(document)
            if opened:
                data = _compact(document)
    fields = {"content_type": content_type}
    if opened:
        fields["base64_opened"] = describe_opened(opened)
    return ResultChunk("body", data=data, fields=fields), opened


def body_bytes(chunk, opened):
    """
    The body to send once the chain is done with C{chunk} (made by
    L{body_chunk}): what was opened closed again.
    """
    if not opened:
        return chunk.data
    document = json.loads(chunk.data)
    close_secrets(document, opened)
    return _compact(document)


def _compact(document):
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _walk(document, path):
    node = document
    for step in path:
        try:
            node = node[step]
        except (KeyError, IndexError, TypeError):
            return None
    return node if isinstance(node, dict) else None


# The audit event.


def _timestamp(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def audit_event(session, command, info, request_uri, code, stage, received, finished, source_ip, user_agent,
                impersonated=None, failure=None):
    """
    The fields of a Kubernetes audit C{Event} (audit.k8s.io/v1) for one
    request, at level Metadata, with hoopgw's decision as annotations.
    """
    identity = session.identity
    event = {
        "kind": "Event",
        "apiVersion": "audit.k8s.io/v1",
        "level": "Metadata",
        "auditID": command.id,
        "stage": stage,
        "requestURI": request_uri,
        "verb": info.verb,
        "user": {
            "username": identity.subject if identity is not None else "system:anonymous",
            "groups": sorted(identity.groups) if identity is not None else [],
        },
        "sourceIPs": [source_ip],
        "userAgent": redact.redact_text(user_agent)[0],
        "requestReceivedTimestamp": _timestamp(received),
        "stageTimestamp": _timestamp(finished),
    }
    if identity is not None:
        event["user"]["extra"] = {"hoopgw.io/issuer": [identity.issuer], "hoopgw.io/method": [identity.method]}
    if impersonated is not None:
        event["impersonatedUser"] = impersonated
    if info.resource_request:
        reference = {
            "resource": info.resource,
            "namespace": info.namespace,
            "name": info.name,
            "apiGroup": info.api_group,
            "apiVersion": info.api_version,
            "subresource": info.subresource,
        }
        # The client named these: recorded as every client text is, redacted.
        event["objectRef"] = {key: redact.redact_text(value)[0] for key, value in reference.items() if value}
    response = {"metadata": {}, "code": code}
    if failure is not None:
        response.update(status="Failure", reason=failure.get("reason", ""), message=failure.get("message", ""))
    event["responseStatus"] = response
    decision = command.decision
    if decision is not None:
        annotations = {
            "authorization.k8s.io/decision": "forbid" if decision.denied else "allow",
            "hoopgw.io/verdict": decision.verdict,
        }
        if decision.reason:
            annotations["authorization.k8s.io/reason"] = decision.reason
        if decision.rule:
            annotations["hoopgw.io/rule"] = decision.rule
        if decision.approval:
            annotations["hoopgw.io/approval"] = json.dumps(decision.approval, sort_keys=True, default=str)
        event["annotations"] = annotations
    return event
