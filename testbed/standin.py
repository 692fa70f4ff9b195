"""
A small stand-in for a Kubernetes API server, for tests, demos and the
benchmark on machines without one: discovery (core/v1, apps/v1), namespaces,
pods, configmaps, secrets and deployments kept in memory with watches, pod
logs (with follow) and exec over WebSocket (the v5, v4 and v1 channel
protocols), served over TLS.

Exec really runs the command on this machine, as a container would run it:
bind it to loopback only.  It requires the credential it is given (a bearer
token and/or a client certificate from a CA) and notes every
C{Authorization} and C{Impersonate-*} header it saw, so a test can prove
what reached it.
"""

import base64
import collections
import copy
import datetime
import json
import os
import uuid
from urllib.parse import parse_qs

from twisted.internet import defer, protocol, ssl
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web._websocket_impl import _WebSocketWireProtocol, serverBootstrap
from wsproto import ConnectionType
from wsproto.events import AcceptConnection
from wsproto.handshake import H11Handshake

VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-hoopgw-standin",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.0",
    "compiler": "gc",
    "platform": "linux/amd64",
}

# (group, version, plural): (kind, singular, namespaced, short names)
RESOURCES = {
    ("", "v1", "namespaces"): ("Namespace", "namespace", False, ["ns"]),
    ("", "v1", "pods"): ("Pod", "pod", True, ["po"]),
    ("", "v1", "configmaps"): ("ConfigMap", "configmap", True, ["cm"]),
    ("", "v1", "secrets"): ("Secret", "secret", True, []),
    ("apps", "v1", "deployments"): ("Deployment", "deployment", True, ["deploy"]),
}

SUBRESOURCES = {
    "pods": ("log", "exec", "attach", "status"),
    "namespaces": ("status",),
    "deployments": ("status", "scale"),
}

CHANNEL_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code, reason, message, details=None):
    """
    A Kubernetes C{Status} object.
    """
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success" if code < 400 else "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def merge_patch(target, patch):
    """
    RFC 7386 JSON merge patch; also used for strategic merge patches, which
    agree with it on the maps these resources are made of.
    """
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class Watcher:
    """
    One open watch: a request that gets a JSON event per line.
    """

    def __init__(self, request, key, namespace, name):
        self.request = request
        self.key = key
        self.namespace = namespace
        self.name = name

    def matches(self, key, obj):
        meta = obj["metadata"]
        return (
            key == self.key
            and (not self.namespace or meta.get("namespace") == self.namespace)
            and (not self.name or meta["name"] == self.name)
        )

    def send(self, kind, obj):
        self.request.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")


class Follower:
    """
    One C{logs -f}: gets each new line of a pod's log.
    """

    def __init__(self, request):
        self.request = request


class StandinAPIServer:
    """
    The in-memory API server.

    @ivar authorizations: every C{Authorization} header value received, in order.
    @ivar impersonations: every request's C{Impersonate-User} and
        C{Impersonate-Group} headers, as C{(user, [groups])}.
    @ivar requests: C{(method, path)} of every request received.
    @ivar header_names: the (lower-case) header names of every request
        received, a set per request.
    """

    log = Logger()

    def __init__(self, reactor, token=None, client_ca=None):
        self.reactor = reactor
        self.token = token
        self.client_ca = client_ca
        self.authorizations = []
        self.impersonations = []
        self.requests = []
        self.header_names = []
        self.objects = {key: {} for key in RESOURCES}
        self.revision = 1
        self.watchers = []
        # The latest changes, (revision, key, kind, object): a watch from
        # a resourceVersion gets what came after it, as from the API server.
        self.history = collections.deque(maxlen=1000)
        self.logs = {}
        self.followers = {}
        # Pods whose container stopped: logs -f returns the log and ends.
        self.stopped = set()
        # Headers added to every response: C{(name, value)} pairs.
        self.extra_headers = []
        self.port = None
        self.create(("", "v1", "namespaces"), None, {"metadata": {"name": "default"}})
        self.create(("", "v1", "namespaces"), None, {"metadata": {"name": "kube-system"}})

    # Serving.

    def listen(self, certificate, key, port=0, interface="127.0.0.1"):
        """
        Serve HTTPS on loopback with the PEM certificate and key at the given
        paths.  @return: the listening port.
        """
        with open(certificate, "rb") as handle:
            certificate_pem = handle.read()
        with open(key, "rb") as handle:
            key_pem = handle.read()
        private = ssl.PrivateCertificate.loadPEM(certificate_pem + b"\n" + key_pem)
        authorities = None
        if self.client_ca is not None:
            with open(self.client_ca, "rb") as handle:
                authorities = [ssl.Certificate.loadPEM(handle.read()).original]
        options = ssl.CertificateOptions(
            privateKey=private.privateKey.original,
            certificate=private.original,
            verify=authorities is not None,
            caCerts=authorities,
            requireCertificate=False,
        )
        site = server.Site(_Root(self))
        site.displayTracebacks = False
        site.log = lambda request: None
        self.port = self.reactor.listenSSL(port, site, options, interface=interface)
        return self.port

    def stop(self):
        for watcher in list(self.watchers):
            _finish(watcher.request)
        for followers in self.followers.values():
            for follower in list(followers):
                _finish(follower.request)
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return defer.succeed(None)

    # The store.

    def _next_revision(self):
        self.revision += 1
        return str(self.revision)

    def create(self, key, namespace, obj):
        kind, _, namespaced, _ = RESOURCES[key]
        group, version, _ = key
        obj = copy.deepcopy(obj)
        obj["apiVersion"] = "%s/%s" % (group, version) if group else version
        obj["kind"] = kind
        meta = obj.setdefault("metadata", {})
        if namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        meta["uid"] = _uid()
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = self._next_revision()
        if kind == "Pod":
            obj.setdefault("spec", {}).setdefault("containers", [{"name": "main", "image": "busybox"}])
            obj["status"] = {
                "phase": "Running",
                "containerStatuses": [
                    {"name": container["name"], "ready": True, "restartCount": 0, "state": {"running": {"startedAt": _now()}}}
                    for container in obj["spec"]["containers"]
                ],
            }
        if kind == "Namespace":
            obj["status"] = {"phase": "Active"}
        self.objects[key][(namespace if namespaced else None, meta["name"])] = obj
        self._notify(key, "ADDED", obj)
        return obj

    def replace(self, key, obj):
        meta = obj["metadata"]
        meta["resourceVersion"] = self._next_revision()
        self.objects[key][(meta.get("namespace"), meta["name"])] = obj
        self._notify(key, "MODIFIED", obj)
        return obj

    def delete(self, key, namespace, name):
        obj = self.objects[key].pop((namespace, name))
        obj["metadata"]["resourceVersion"] = self._next_revision()
        self._notify(key, "DELETED", obj)
        if key == ("", "v1", "namespaces"):
            for other, objects in self.objects.items():
                for (where, child), _ in list(objects.items()):
                    if where == name:
                        self.delete(other, where, child)
        return obj

    def get(self, key, namespace, name):
        return self.objects[key].get((namespace, name))

    def _notify(self, key, kind, obj):
        self.history.append((int(obj["metadata"]["resourceVersion"]), key, kind, copy.deepcopy(obj)))
        for watcher in list(self.watchers):
            if watcher.matches(key, obj):
                watcher.send(kind, obj)

    # Pod logs.

    def add_log(self, namespace, pod, line):
        """
        Append a line to a pod's log; followers get it at once.
        """
        text = line if line.endswith("\n") else line + "\n"
        self.logs.setdefault((namespace, pod), []).append(text)
        for follower in list(self.followers.get((namespace, pod), ())):
            follower.request.write(text.encode("utf-8"))

    def write_log(self, namespace, pod, data):
        """
        Write C{data} (bytes, cut wherever the caller likes) to the pod's
        followers as one chunk, as a container's output may come.
        """
        for follower in list(self.followers.get((namespace, pod), ())):
            follower.request.write(data)

    def write_watches(self, data):
        """
        Write C{data} (bytes: a part of a watch event, say) to every open
        watch as one chunk.
        """
        for watcher in list(self.watchers):
            watcher.request.write(data)

    def end_watches(self):
        """
        End every open watch, as the API server does when a watch's time
        is up.
        """
        for watcher in list(self.watchers):
            _finish(watcher.request)

    def end_log(self, namespace, pod):
        """
        The pod's container stopped: followers' streams end, and later
        ones get the log without following.
        """
        self.stopped.add((namespace, pod))
        for follower in list(self.followers.pop((namespace, pod), ())):
            _finish(follower.request)


def _finish(request):
    if not request.finished and not getattr(request, "_disconnected", False):
        try:
            request.finish()
        except Exception:
            pass


def _send_json(request, code, body):
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    data = json.dumps(body).encode()
    request.setHeader(b"content-length", str(len(data)).encode())
    return data


def _list_kind(kind):
    return kind + "List"


class _Root(resource.Resource):
    isLeaf = True

    def __init__(self, api):
        resource.Resource.__init__(self)
        self.api = api

    def render(self, request):
        api = self.api
        method = request.method.decode()
        path = request.path.decode("utf-8", "replace")
        api.requests.append((method, path))
        for name, value in api.extra_headers:
            request.responseHeaders.addRawHeader(name, value)
        api.header_names.append({name.decode("latin-1").lower() for name, _ in request.requestHeaders.getAllRawHeaders()})
        authorization = request.getHeader(b"authorization")
        api.authorizations.append(authorization.decode("latin-1") if authorization is not None else None)
        user = request.getHeader(b"impersonate-user")
        groups = request.requestHeaders.getRawHeaders(b"impersonate-group") or []
        if user is not None or groups:
            api.impersonations.append((user and user.decode(), [group.decode() for group in groups]))
        if not self._authenticated(request, authorization):
            return _send_json(request, 401, status(401, "Unauthorized", "Unauthorized"))
        query = parse_qs(request.uri.decode("utf-8", "replace").partition("?")[2], keep_blank_values=True)
        try:
            return self._route(request, method, path, query)
        except _Refusal as refusal:
            return _send_json(request, refusal.code, status(refusal.code, refusal.reason, refusal.message))

    def _authenticated(self, request, authorization):
        api = self.api
        if api.token is not None and authorization == ("Bearer %s" % (api.token,)).encode():
            return True
        if api.client_ca is not None:
            certificate = request.transport.getPeerCertificate() if hasattr(request.transport, "getPeerCertificate") else None
            if certificate is not None:
                request.client_subject = certificate.get_subject().CN
                return True
        return False

    def _route(self, request, method, path, query):
        parts = [part for part in path.strip("/").split("/") if part]
        if path == "/version":
            return _send_json(request, 200, VERSION)
        if path == "/api":
            return _send_json(
                request,
                200,
                {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]},
            )
        if path == "/apis":
            return _send_json(
                request,
                200,
                {
                    "kind": "APIGroupList",
                    "apiVersion": "v1",
                    "groups": [
                        {
                            "name": "apps",
                            "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                            "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"},
                        }
                    ],
                },
            )
        if parts[:2] == ["openapi", "v3"]:
            return _send_json(request, 200, _openapi(parts[2:]))
        if not parts or parts[0] not in ("api", "apis"):
            raise _Refusal(404, "NotFound", "the server could not find the requested resource")
        if parts[0] == "api":
            group, rest = "", parts[1:]
        else:
            if len(parts) < 2:
                raise _Refusal(404, "NotFound", "the server could not find the requested resource")
            group, rest = parts[1], parts[2:]
        if not rest:
            raise _Refusal(404, "NotFound", "the server could not find the requested resource")
        version, rest = rest[0], rest[1:]
        if not rest:
            return _send_json(request, 200, self._resource_list(group, version))
        namespace = None
        if rest[0] == "namespaces" and len(rest) > 2:
            namespace, rest = rest[1], rest[2:]
        key = (group, version, rest[0])
        if key not in RESOURCES:
            raise _Refusal(404, "NotFound", "the server could not find the requested resource")
        kind, singular, namespaced, _ = RESOURCES[key]
        if namespaced and namespace is not None and self.api.get(("", "v1", "namespaces"), None, namespace) is None:
            if method != "GET" or len(rest) > 1:
                raise _Refusal(404, "NotFound", 'namespaces "%s" not found' % (namespace,))
        name = rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        if subresource is not None:
            return self._subresource(request, method, key, namespace, name, subresource, query)
        if name is None:
            if method == "GET":
                if _first(query, "watch") in ("true", "1"):
                    return self._watch(request, key, namespace, query)
                return self._list(request, key, namespace, query)
            if method == "POST":
                return self._create(request, key, namespace, query)
            raise _Refusal(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        found = self.api.get(key, namespace if namespaced else None, name)
        if method == "GET":
            if found is None:
                raise _Refusal(404, "NotFound", '%s "%s" not found' % (rest[0], name))
            return self._send_object(request, 200, found)
        if method == "PUT":
            if found is None:
                raise _Refusal(404, "NotFound", '%s "%s" not found' % (rest[0], name))
            body = _body(request)
            body.setdefault("metadata", {})
            for field in ("uid", "creationTimestamp", "namespace"):
                if field in found["metadata"]:
                    body["metadata"][field] = found["metadata"][field]
            body["apiVersion"], body["kind"] = found["apiVersion"], found["kind"]
            return self._send_object(request, 200, self.api.replace(key, body))
        if method == "PATCH":
            if found is None:
                raise _Refusal(404, "NotFound", '%s "%s" not found' % (rest[0], name))
            patched = merge_patch(found, _body(request))
            if _first(query, "dryRun"):
                return self._send_object(request, 200, patched)
            return self._send_object(request, 200, self.api.replace(key, patched))
        if method == "DELETE":
            if found is None:
                raise _Refusal(404, "NotFound", '%s "%s" not found' % (rest[0], name))
            return self._send_object(request, 200, self.api.delete(key, namespace if namespaced else None, name))
        raise _Refusal(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")

    def _resource_list(self, group, version):
        resources = []
        for (resource_group, resource_version, plural), (kind, singular, namespaced, short) in RESOURCES.items():
            if (resource_group, resource_version) != (group, version):
                continue
            verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
            if plural != "namespaces":
                verbs.append("deletecollection")
            entry = {"name": plural, "singularName": singular, "namespaced": namespaced, "kind": kind, "verbs": sorted(verbs)}
            if short:
                entry["shortNames"] = short
            resources.append(entry)
            for sub in SUBRESOURCES.get(plural, ()):
                resources.append(
                    {
                        "name": "%s/%s" % (plural, sub),
                        "singularName": "",
                        "namespaced": namespaced,
                        "kind": kind if sub == "status" else ("Scale" if sub == "scale" else "PodExecOptions"),
                        "verbs": ["get", "create"] if sub in ("exec", "attach") else ["get", "patch", "update"],
                    }
                )
        if not resources:
            raise _Refusal(404, "NotFound", "the server could not find the requested resource")
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "%s/%s" % (group, version) if group else version,
            "resources": resources,
        }

    def _send_object(self, request, code, obj):
        return _send_json(request, code, obj)

    def _selected(self, key, namespace, query):
        _, _, namespaced, _ = RESOURCES[key]
        name = None
        selector = _first(query, "fieldSelector") or ""
        for term in selector.split(","):
            field, found, value = term.partition("=")
            if found and field.strip() == "metadata.name":
                name = value.lstrip("=").strip()
        labels = {}
        for term in (_first(query, "labelSelector") or "").split(","):
            label, found, value = term.partition("=")
            if found:
                labels[label.strip()] = value.lstrip("=").strip()
        items = []
        for (where, item_name), obj in sorted(self.api.objects[key].items(), key=lambda entry: (entry[0][0] or "", entry[0][1])):
            if namespaced and namespace is not None and where != namespace:
                continue
            if name is not None and item_name != name:
                continue
            object_labels = obj["metadata"].get("labels") or {}
            if any(object_labels.get(label) != value for label, value in labels.items()):
                continue
            items.append(obj)
        return items, name

    def _list(self, request, key, namespace, query):
        kind = RESOURCES[key][0]
        items, _ = self._selected(key, namespace, query)
        group, version, _ = key
        return _send_json(
            request,
            200,
            {
                "kind": _list_kind(kind),
                "apiVersion": "%s/%s" % (group, version) if group else version,
                "metadata": {"resourceVersion": str(self.api.revision)},
                "items": items,
            },
        )

    def _watch(self, request, key, namespace, query):
        items, name = self._selected(key, namespace, query)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        watcher = Watcher(request, key, namespace, name)
        since = _first(query, "resourceVersion")
        if not since or since == "0":
            for item in items:
                watcher.send("ADDED", item)
        elif since.isdigit():
            for revision, changed, kind, obj in list(self.api.history):
                if revision > int(since) and watcher.matches(changed, obj):
                    watcher.send(kind, obj)
        self.api.watchers.append(watcher)
        timeout = _first(query, "timeoutSeconds")
        call = None
        if timeout:
            call = self.api.reactor.callLater(float(timeout), _finish, request)

        def gone(_):
            if watcher in self.api.watchers:
                self.api.watchers.remove(watcher)
            if call is not None and call.active():
                call.cancel()

        request.notifyFinish().addBoth(gone)
        request.write(b"")
        return server.NOT_DONE_YET

    def _create(self, request, key, namespace, query):
        body = _body(request)
        meta = body.setdefault("metadata", {})
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + os.urandom(3).hex()[:5]
            else:
                raise _Refusal(422, "Invalid", "metadata.name: Required value: name or generateName is required")
        _, _, namespaced, _ = RESOURCES[key]
        where = namespace if namespaced else None
        if self.api.get(key, where, meta["name"]) is not None:
            raise _Refusal(409, "AlreadyExists", '%s "%s" already exists' % (key[2], meta["name"]))
        if _first(query, "dryRun"):
            return self._send_object(request, 201, body)
        return self._send_object(request, 201, self.api.create(key, where, body))

    def _subresource(self, request, method, key, namespace, name, subresource, query):
        found = self.api.get(key, namespace, name)
        if found is None:
            raise _Refusal(404, "NotFound", '%s "%s" not found' % (key[2], name))
        if key[2] == "pods" and subresource == "log":
            return self._log(request, namespace, name, query)
        if key[2] == "pods" and subresource in ("exec", "attach"):
            return self._exec(request, found, query)
        if subresource == "status" and method == "GET":
            return self._send_object(request, 200, found)
        raise _Refusal(405, "MethodNotAllowed", "the stand-in does not serve %s/%s %s" % (key[2], subresource, method))

    def _log(self, request, namespace, name, query):
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/plain")
        lines = self.api.logs.get((namespace, name), [])
        if _first(query, "follow") not in ("true", "1") or (namespace, name) in self.api.stopped:
            data = "".join(lines).encode("utf-8")
            request.setHeader(b"content-length", str(len(data)).encode())
            return data
        follower = Follower(request)
        self.api.followers.setdefault((namespace, name), []).append(follower)

        def gone(_):
            followers = self.api.followers.get((namespace, name), [])
            if follower in followers:
                followers.remove(follower)

        request.notifyFinish().addBoth(gone)
        request.write("".join(lines).encode("utf-8"))
        return server.NOT_DONE_YET

    def _exec(self, request, pod, query):
        if (request.getHeader(b"upgrade") or b"").lower() != b"websocket":
            raise _Refusal(
                400, "BadRequest", "the stand-in speaks exec over WebSocket only (v5.channel.k8s.io, v4.channel.k8s.io)"
            )
        argv = query.get("command") or []
        if not argv:
            raise _Refusal(400, "BadRequest", "you must specify at least 1 command")
        offered = []
        for value in request.requestHeaders.getRawHeaders(b"sec-websocket-protocol") or []:
            offered.extend(part.strip() for part in value.decode().split(","))
        chosen = next((name for name in offered if name in CHANNEL_PROTOCOLS), None)
        if chosen is None:
            raise _Refusal(400, "BadRequest", "none of the offered subprotocols %s is served" % (offered,))
        handshake = H11Handshake(ConnectionType.SERVER)
        headers = [(name, value) for name, values in request.requestHeaders.getAllRawHeaders() for value in values]
        handshake.initiate_upgrade_connection(headers, request.path)
        stdin = _first(query, "stdin") in ("true", "1")
        session = _ExecSession(self.api.reactor, argv, stdin, chosen)
        accepted = handshake.send(AcceptConnection(subprotocol=chosen))
        wire = _WebSocketWireProtocol(handshake.connection, serverBootstrap, session)
        transport = request.channel.transport
        request.channel._protocolUpgradeForWebsockets(wire)
        transport.write(accepted)
        session.negotiationFinished()
        return server.NOT_DONE_YET


def _openapi(rest):
    """
    Just enough OpenAPI v3 for kubectl: the index of group versions, and
    for each a PATCH operation per kind that declares the C{fieldValidation}
    and C{dryRun} parameters, so C{kubectl apply} validates on the server
    (as against a real API server) instead of downloading schemas.
    """
    versions = sorted({(group, version) for group, version, _ in RESOURCES})
    if not rest:
        return {
            "paths": {
                ("apis/%s/%s" % (group, version) if group else "api/%s" % (version,)): {
                    "serverRelativeURL": "/openapi/v3/%s"
                    % ("apis/%s/%s" % (group, version) if group else "api/%s" % (version,),)
                }
                for group, version in versions
            }
        }
    wanted = ("", rest[1]) if rest[0] == "api" and len(rest) == 2 else (tuple(rest[1:3]) if len(rest) == 3 else None)
    if wanted not in versions:
        raise _Refusal(404, "NotFound", "the server could not find the requested resource")
    paths = {}
    for (group, version, plural), (kind, _, namespaced, _) in RESOURCES.items():
        if (group, version) != wanted:
            continue
        prefix = "/apis/%s/%s" % (group, version) if group else "/api/%s" % (version,)
        path = prefix + ("/namespaces/{namespace}/%s/{name}" if namespaced else "/%s/{name}") % (plural,)
        paths[path] = {
            "patch": {
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": kind},
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                    {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                ],
                "requestBody": {"content": {"application/merge-patch+json": {"schema": {"type": "object"}}}},
                "responses": {"200": {"description": "OK"}},
            }
        }
    return {"openapi": "3.0.0", "info": {"title": "hoopgw stand-in", "version": "v1.32.0"}, "paths": paths}


class _Refusal(Exception):
    def __init__(self, code, reason, message):
        Exception.__init__(self, code, reason, message)
        self.code = code
        self.reason = reason
        self.message = message


def _protobuf_fields(data):
    """
    The fields of one protobuf message: C{(number, value)} in order, a
    varint as an L{int}, a length-delimited field as L{bytes}.
    """
    fields = []
    offset = 0

    def varint():
        nonlocal offset
        result = shift = 0
        while True:
            if offset >= len(data) or shift > 63:
                raise _Refusal(400, "BadRequest", "the protobuf body is malformed")
            byte = data[offset]
            offset += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while offset < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.append((number, varint()))
        elif wire == 2:
            length = varint()
            if offset + length > len(data):
                raise _Refusal(400, "BadRequest", "the protobuf body is malformed")
            fields.append((number, data[offset:offset + length]))
            offset += length
        elif wire in (1, 5):
            offset += 8 if wire == 1 else 4
        else:
            raise _Refusal(400, "BadRequest", "the protobuf body is malformed")
    return fields


def _protobuf_map(entries, decode):
    """
    A protobuf map's entries (C{{1: key, 2: value}} messages) as a dict.
    """
    result = {}
    for entry in entries:
        parts = dict(_protobuf_fields(entry))
        result[parts.get(1, b"").decode("utf-8")] = decode(parts.get(2, b""))
    return result


# What the stand-in reads of a protobuf body, by kind: field number ->
# (JSON name, how to read it).  Enough for kubectl create configmap and
# kubectl create secret generic.
_TEXT = ("text", lambda value: value.decode("utf-8"))
_BYTES = ("bytes", lambda value: base64.b64encode(value).decode("ascii"))
_PROTOBUF_KINDS = {
    "ConfigMap": {2: ("data", _TEXT), 3: ("binaryData", _BYTES)},
    "Secret": {2: ("data", _BYTES), 3: ("type", None), 4: ("stringData", _TEXT)},
}
_PROTOBUF_METADATA = {1: "name", 2: "generateName", 3: "namespace", 11: "labels", 12: "annotations"}


def _protobuf_body(data):
    """
    A Kubernetes protobuf body (C{k8s\\0} and a C{runtime.Unknown}) as the
    JSON object it stands for, for the kinds in L{_PROTOBUF_KINDS}.
    """
    if not data.startswith(b"k8s\x00"):
        raise _Refusal(400, "BadRequest", "the protobuf body does not start with the Kubernetes magic number")
    envelope = dict(_protobuf_fields(data[4:]))
    type_meta = dict(_protobuf_fields(envelope.get(1, b"")))
    api_version = type_meta.get(1, b"").decode("utf-8")
    kind = type_meta.get(2, b"").decode("utf-8")
    if kind not in _PROTOBUF_KINDS:
        raise _Refusal(415, "UnsupportedMediaType", "the stand-in reads protobuf bodies of %s only, not %s; send JSON (kubectl apply -f)" % (", ".join(sorted(_PROTOBUF_KINDS)), kind or "this kind"))
    body = {"apiVersion": api_version, "kind": kind}
    fields = _protobuf_fields(envelope.get(2, b""))
    layout = _PROTOBUF_KINDS[kind]
    for number, value in fields:
        if number == 1:
            meta = body.setdefault("metadata", {})
            for meta_number, meta_value in _protobuf_fields(value):
                name = _PROTOBUF_METADATA.get(meta_number)
                if name in ("labels", "annotations"):
                    meta.setdefault(name, {}).update(_protobuf_map([meta_value], _TEXT[1]))
                elif name is not None:
                    meta[name] = meta_value.decode("utf-8")
        elif number in layout:
            name, reader = layout[number]
            if reader is None:
                body[name] = value.decode("utf-8")
            else:
                body.setdefault(name, {}).update(_protobuf_map([value], reader[1]))
    return body


def _uid():
    """
    A new object's uid: a random UUID, as the API server makes, but never
    one of the few (about 3 in 1,000) whose digits and dashes the mask
    takes for a card number, so that tests can count what was masked.
    """
    from hoopgw import cards

    while True:
        uid = str(uuid.uuid4())
        if not cards.mask_text(uid)[1]:
            return uid


def _first(query, name):
    values = query.get(name)
    return values[-1] if values else None


def _body(request):
    content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
    if "protobuf" in content_type:
        # kubectl create configmap / secret send protobuf.
        return _protobuf_body(request.content.read())
    if "cbor" in content_type:
        raise _Refusal(415, "UnsupportedMediaType", "the stand-in does not read %s" % (content_type,))
    try:
        body = json.loads(request.content.read() or b"{}")
    except ValueError:
        raise _Refusal(400, "BadRequest", "the request body is not JSON")
    if not isinstance(body, dict):
        raise _Refusal(400, "BadRequest", "the request body is not a JSON object")
    return body


class _Process(protocol.ProcessProtocol):
    def __init__(self, session):
        self.session = session

    def outReceived(self, data):
        self.session.output(STDOUT, data)

    def errReceived(self, data):
        self.session.output(STDERR, data)

    def processEnded(self, reason):
        self.session.ended(reason.value.exitCode)


class _ExecSession:
    """
    One exec: the command runs as a process; its output goes out on the
    stdout and stderr channels, its exit on the error channel.
    """

    def __init__(self, reactor, argv, stdin, subprotocol):
        self.reactor = reactor
        self.argv = argv
        self.stdin = stdin
        self.subprotocol = subprotocol
        self.transport = None
        self.process = None

    def negotiationStarted(self, transport):
        self.transport = transport

    def negotiationFinished(self):
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        try:
            self.process = self.reactor.spawnProcess(_Process(self), self.argv[0], self.argv, env=environment)
        except OSError as error:
            self._status(status(500, "InternalError", "exec failed: %s" % (error,)))
            self.transport.loseConnection()
            return
        if not self.stdin:
            self.process.closeStdin()

    def output(self, channel, data):
        self._send(bytes((channel,)) + data)

    def _status(self, body):
        self._send(bytes((ERROR,)) + json.dumps(body).encode())

    def _send(self, message):
        # The client may close the stream while the command still writes
        # (the gateway does, on a message too large): what comes after is
        # dropped, as a real API server drops it.
        from wsproto.utilities import LocalProtocolError

        try:
            self.transport.sendBytesMessage(message)
        except LocalProtocolError:
            pass

    def ended(self, code):
        if code:
            body = status(500, "NonZeroExitCode", "command terminated with non-zero exit code: exit status %d" % (code,),
                          details={"causes": [{"reason": "ExitCode", "message": str(code)}]})
        else:
            body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        self._status(body)
        self.transport.loseConnection()

    def bytesMessageReceived(self, data):
        if not data or self.process is None:
            return
        channel = data[0]
        if channel == STDIN:
            self.process.write(data[1:])
        elif channel == CLOSE and self.subprotocol == "v5.channel.k8s.io" and data[1:2] == bytes((STDIN,)):
            self.process.closeStdin()

    def textMessageReceived(self, text):
        self.bytesMessageReceived(text.encode("utf-8"))

    def pongReceived(self, payload):
        pass

    def connectionLost(self, reason):
        if self.process is not None and self.process.pid is not None:
            try:
                self.process.signalProcess("KILL")
            except Exception:
                pass


def main(argv=None):
    """
    Run the stand-in on its own: C{python -m testbed.standin
    --port P --certificate C --key K --token-file F [--configmap NAME=KEY=VALUE]
    [--pod NAME=LOGFILE]}.
    """
    import argparse

    from twisted.internet import asyncioreactor

    parser = argparse.ArgumentParser(description="A stand-in Kubernetes API server on loopback.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certificate", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--token-file", required=True, help="the bearer token clients must present")
    parser.add_argument("--configmap", action="append", default=[], help="NAME=KEY=VALUE in the default namespace")
    parser.add_argument(
        "--pod",
        action="append",
        default=[],
        help="NAME=LOGFILE: a pod in the default namespace whose log is LOGFILE: what is appended to it "
        "reaches logs -f as it was written; removing the file stops the container (logs -f ends)",
    )
    arguments = parser.parse_args(argv)
    asyncioreactor.install()
    from twisted.internet import reactor

    with open(arguments.token_file) as handle:
        token = handle.read().strip()
    api = StandinAPIServer(reactor, token=token)
    for entry in arguments.configmap:
        name, key, value = entry.split("=", 2)
        api.create(("", "v1", "configmaps"), "default", {"metadata": {"name": name}, "data": {key: value}})
    for entry in arguments.pod:
        name, path = entry.split("=", 1)
        api.create(("", "v1", "pods"), "default", {"metadata": {"name": name}})
        LogFile(reactor, api, "default", name, path).start()
    api.listen(arguments.certificate, arguments.key, port=arguments.port)
    reactor.run()


class LogFile:
    """
    A pod's log read from a file, for the stand-in run on its own: what is
    appended to the file is the container's output, passed on to
    C{logs -f} in the pieces it was read in; the file's removal is the
    container stopping (what was written before it is passed on first).
    """

    INTERVAL = 0.05

    def __init__(self, reactor, api, namespace, pod, path):
        from twisted.internet import task

        self.api = api
        self.namespace = namespace
        self.pod = pod
        self.file = open(path, "rb")
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = reactor

    def start(self):
        self._loop.start(self.INTERVAL, now=True)

    def poll(self):
        removed = os.fstat(self.file.fileno()).st_nlink == 0
        data = self.file.read()
        if data:
            self.api.logs.setdefault((self.namespace, self.pod), []).append(data.decode("utf-8", "replace"))
            self.api.write_log(self.namespace, self.pod, data)
        if removed:
            self._loop.stop()
            self.file.close()
            self.api.end_log(self.namespace, self.pod)


if __name__ == "__main__":
    main()
