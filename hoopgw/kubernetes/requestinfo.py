"""
What a Kubernetes API request asks for (verb, API group and version,
resource, subresource, namespace, name), derived from its method, path and
query the way the API server's C{RequestInfoFactory} derives it, so that
policies written against Kubernetes RBAC read the same here; and the
L{Command} a request becomes, with those facts.
"""

import hashlib
from urllib.parse import parse_qs, parse_qsl, unquote

import attr

from hoopgw import commandline, redact
from hoopgw.model import Command


# HTTP methods and the verbs the API server gives them on resource requests.
_VERBS = {
    "POST": "create",
    "GET": "get",
    "HEAD": "get",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}

# Path segments that are verbs in their own right (deprecated URL forms).
_SPECIAL_VERBS = ("proxy", "watch")
# Subresources of a namespace itself (/api/v1/namespaces/x/status).
_NAMESPACE_SUBRESOURCES = ("status", "finalize")
# Subresources that hold a terminal or a tunnel open: a WebSocket GET of these
# is authorized as "create", as recent API servers do, so that "deny create
# pods/exec" also stops kubectl 1.30+ (which uses WebSockets).
_STREAMING_SUBRESOURCES = ("exec", "attach", "portforward")


@attr.s(frozen=True, slots=True)
class RequestInfo:
    """
    The facts of one request, as in the API server's C{RequestInfo}.

    @ivar resource_request: whether it addresses an API resource (as
        opposed to C{/version}, C{/healthz}, discovery documents...).
    @ivar verb: for resource requests one of get, list, watch, create,
        update, patch, delete, deletecollection (or proxy); otherwise the
        lower-case HTTP method.
    """

    resource_request = attr.ib()
    verb = attr.ib()
    path = attr.ib()
    api_prefix = attr.ib(default="")
    api_group = attr.ib(default="")
    api_version = attr.ib(default="")
    namespace = attr.ib(default="")
    resource = attr.ib(default="")
    subresource = attr.ib(default="")
    name = attr.ib(default="")

    def facts(self):
        """
        The facts policies match on, keyed as in a Kubernetes audit event's
        objectRef.
        """
        return {
            "resourceRequest": self.resource_request,
            "verb": self.verb,
            "apiGroup": self.api_group,
            "apiVersion": self.api_version,
            "resource": self.resource,
            "subresource": self.subresource,
            "namespace": self.namespace,
            "name": self.name,
            "path": self.path,
        }

    @property
    def qualified_resource(self):
        """
        C{resource/subresource}, as RBAC rules write it (C{pods/exec}).
        """
        return "%s/%s" % (self.resource, self.subresource) if self.subresource else self.resource


def _query_value(query, name):
    values = query.get(name)
    return values[-1] if values else None


def _true(value):
    return value is not None and value.lower() in ("true", "1")


def _name_from_field_selector(selector):
    """
    C{metadata.name=x} (or C{==}) in a field selector names one object, as
    C{kubectl get pod x --watch} asks.
    """
    if not selector:
        return ""
    for term in selector.split(","):
        for operator in ("==", "="):
            key, found, value = term.partition(operator)
            if found and key.strip() == "metadata.name" and "!" not in key:
                value = value.strip()
                if value and "/" not in value and value not in (".", ".."):
                    return value
                return ""
    return ""


def request_info(method, path, query="", websocket=False):
    """
    Derive the L{RequestInfo} of a request.

    @param method: the HTTP method.
    @param path: the URL path, without the query.
    @param query: the raw query string.
    @param websocket: whether the request asks to upgrade to a WebSocket.
    """
    method = method.upper()
    parts = [unquote(part) for part in path.strip("/").split("/") if part]
    non_resource = RequestInfo(resource_request=False, verb=method.lower(), path=path)
    if len(parts) < 2 or parts[0] not in ("api", "apis"):
        return non_resource
    prefix = parts[0]
    parts = parts[1:]
    if prefix == "apis":
        if len(parts) < 2:
            # /apis/{group}: a discovery document.
            return non_resource
        group, version, parts = parts[0], parts[1], parts[2:]
    else:
        group, version, parts = "", parts[0], parts[1:]
    if not parts:
        # /api/v1, /apis/apps/v1: discovery of a group version.
        return attr.evolve(non_resource, api_prefix=prefix, api_group=group, api_version=version)

    verb = _VERBS.get(method, method.lower())
    if parts[0] in _SPECIAL_VERBS:
        if len(parts) < 2:
            return attr.evolve(non_resource, api_prefix=prefix, api_group=group, api_version=version)
        verb, parts = parts[0], parts[1:]

    namespace = ""
    if parts[0] == "namespaces":
        if len(parts) > 1:
            namespace = parts[1]
            if len(parts) > 2 and parts[2] not in _NAMESPACE_SUBRESOURCES:
                parts = parts[2:]

    resource = name = subresource = ""
    if len(parts) >= 3 and verb != "proxy":
        subresource = parts[2]
    if len(parts) >= 2:
        name = parts[1]
    resource = parts[0]

    parsed = parse_qs(query, keep_blank_values=True) if query else {}
    if not name and verb == "get":
        verb = "watch" if _true(_query_value(parsed, "watch")) else "list"
        name = _name_from_field_selector(_query_value(parsed, "fieldSelector"))
    if not name and verb == "delete":
        verb = "deletecollection"
    if websocket and verb == "get" and subresource in _STREAMING_SUBRESOURCES:
        verb = "create"

    return RequestInfo(
        resource_request=True,
        verb=verb,
        path=path,
        api_prefix=prefix,
        api_group=group,
        api_version=version,
        namespace=namespace,
        resource=resource,
        subresource=subresource,
        name=name,
    )


def _clean(word):
    return redact.redact_text(word)[0]


def request_command(info, method, path, query="", websocket=False, user_agent="", body=b""):
    """
    The L{Command} of one request: its facts are the request info, and for
    exec and attach the argv (and what it runs: L{hoopgw.commandline}),
    container and streams, for logs whether they follow.  Every fact that
    could hold a secret or a card number is redacted.

    @param info: the request's L{RequestInfo}.
    @param path: the URL path with its query, as the client sent it.
    @param body: the request body: an approval binds to it; the record
        keeps only its size and digest.
    """
    text = "%s %s" % (method, path)
    facts = info.facts()
    facts.update(method=method, websocket=websocket, userAgent=user_agent)
    parsed = parse_qs(query, keep_blank_values=True) if query else {}
    if info.subresource in ("exec", "attach"):
        argv = parsed.get("command", [])
        facts["command"] = [_clean(part) for part in argv]
        if argv:
            facts.update(commandline.parse_argv(argv).facts(_clean))
        facts["container"] = (parsed.get("container") or [""])[-1]
        for flag in ("stdin", "stdout", "stderr", "tty"):
            facts[flag] = (parsed.get(flag) or ["false"])[-1] in ("true", "1")
    if "dryRun" in parsed:
        facts["dryRun"] = parsed["dryRun"][-1]
    if info.subresource == "log":
        facts["follow"] = (parsed.get("follow") or ["false"])[-1] in ("true", "1")
    for key, value in facts.items():
        # Names, paths and the user agent come from the client as they are.
        if isinstance(value, str):
            facts[key] = _clean(value)
    command = Command(kind="kubernetes", text=text, redacted=redacted_request(method, path), facts=facts)
    if body:
        command.parameters = (body,)
        command.redacted_parameters = ("<body, %d bytes, sha256 %s>" % (len(body), hashlib.sha256(body).hexdigest()),)
    return command


def redacted_request(method, path):
    """
    The request line as the record may keep it: the path and every query
    value decoded the way the API server decodes them ("+" is a space,
    %XX escapes), then redacted, so no card number or token hides behind
    URL encoding (an exec command's arguments travel in the query).
    """
    route, _, query = path.partition("?")
    text = "%s %s" % (method, unquote(route))
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        text += "?" + "&".join("%s=%s" % (name, value) for name, value in pairs)
    return _clean(text)
