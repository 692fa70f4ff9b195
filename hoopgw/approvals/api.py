"""
The admin listener's HTTP API (twisted.web), through which approvers list,
approve and deny requests and manage grants.  Every call is authenticated
with the caller's own OIDC token (C{Authorization: Bearer ...}), checked
by the gateway's identity providers; acting on a request also needs a
person (not a service identity) in the rule's approver groups.

    GET  /api/approvals[?status=pending|approved|denied|expired|cancelled|all]
    GET  /api/approvals/ID
    POST /api/approvals/ID/approve   {"reason": "...", "digest": "..." (optional)}
    POST /api/approvals/ID/deny      {"reason": "..."}
    GET  /api/grants[?all=1]
    POST /api/grants                 {"connection", "rule", "subject", "duration", "reason"}
    POST /api/grants/ID/revoke       {"reason": "..."}
    GET  /api/whoami
    ...  /api/admin/...             operators' actions (hoopgw.admin; admin_groups)
"""

import json

from twisted.application import internet
from twisted.internet import defer, ssl
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

from hoopgw import listeners, logs
from hoopgw.approvals.model import ApprovalError
from hoopgw.identity.oidc import IdentityError, unverified_claims
from hoopgw.model import Unavailable
from hoopgw.options import ConfigError, duration

MAX_BODY = 64 * 1024


class AdminAPI(resource.Resource):
    """
    The whole API as one leaf resource, routed by path.
    """

    isLeaf = True
    log = Logger()

    def __init__(self, broker, providers, admin=None):
        resource.Resource.__init__(self)
        self.broker = broker
        self.providers = providers
        # The operators' actions under /api/admin (hoopgw.admin).
        self.admin = admin

    def render_GET(self, request):
        return self._handle(request, "GET")

    def render_POST(self, request):
        return self._handle(request, "POST")

    def _handle(self, request, method):
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        path = [part.decode("utf-8", "replace") for part in request.postpath if part]
        if path[:2] == ["api", "admin"] and self.admin is not None:
            return self._handle_admin(request, method, path[2:])
        outcome = defer.maybeDeferred(self._authenticate, request)
        outcome.addCallback(lambda identity: self._route(method, path, request, identity))
        outcome.addCallbacks(lambda body: self._write(request, 200, body), lambda failure: self._error(request, failure))
        return server.NOT_DONE_YET

    def _handle_admin(self, request, method, path):
        from hoopgw.admin import AdminError

        admin = self.admin

        def refused(failure):
            # A token that does not verify is refused on the record too.
            failure.trap(ApprovalError)
            return admin.refused(None, method, ["api", "admin"] + path, str(failure.value), failure.value.code)

        outcome = defer.maybeDeferred(self._authenticate, request, False)
        outcome.addErrback(refused)
        outcome.addCallback(lambda identity: admin.authorise(identity, method, ["api", "admin"] + path))
        outcome.addCallback(lambda identity: admin.route(method, path, self._body(request) if method == "POST" else {}, identity))

        def failed(failure):
            if failure.check(AdminError):
                self._write(request, failure.value.code, {"error": str(failure.value)})
                return None
            return failure

        outcome.addCallbacks(lambda body: self._write(request, 200, body), failed)
        outcome.addErrback(lambda failure: self._error(request, failure))
        return server.NOT_DONE_YET

    @defer.inlineCallbacks
    def _authenticate(self, request, approver=True):
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="hoopgw"')
            raise ApprovalError("sign in: send your identity token as Authorization: Bearer <token>", 401)
        token = token.strip()
        try:
            claims = unverified_claims(token)
            providers = [provider for provider in self.providers if provider.accepts(claims)]
            if not providers:
                raise IdentityError("tokens from the issuer %r are not accepted here" % (claims.get("iss"),))
            identity = yield providers[0].verify(token)
        except IdentityError as error:
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="hoopgw", error="invalid_token"')
            raise ApprovalError("your token was refused: %s" % (error,), 401)
        broker = self.broker
        if approver and broker.approver_groups and not identity.groups & broker.approver_groups:
            raise ApprovalError(
                "%s is not in any approver group of this gateway (%s)"
                % (identity.subject, ", ".join(sorted(broker.approver_groups)))
            )
        return identity

    def _body(self, request):
        data = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(data) > MAX_BODY:
            raise ApprovalError("the request body is too large", 413)
        if not data.strip():
            return {}
        try:
            body = json.loads(data)
        except ValueError:
            raise ApprovalError("the request body is not JSON; send a JSON object such as {\"reason\": \"...\"}", 400)
        if not isinstance(body, dict):
            raise ApprovalError("the request body must be a JSON object", 400)
        return body

    def _route(self, method, path, request, identity):
        broker = self.broker
        if path[:1] != ["api"]:
            raise ApprovalError("not found: the API is under /api/", 404)
        path = path[1:]
        if path == ["whoami"] and method == "GET":
            return identity.to_json()
        if path[:1] == ["approvals"]:
            if len(path) == 1 and method == "GET":
                status = _argument(request, "status", "pending")
                # A broker on a shared store answers from the database: a Deferred.
                listed = defer.maybeDeferred(broker.list, None if status == "all" else status)
                return listed.addCallback(lambda items: {"approvals": [item.to_json() for item in items]})
            if len(path) == 2 and method == "GET":
                return defer.maybeDeferred(broker.get, path[1]).addCallback(lambda item: item.to_json())
            if len(path) == 3 and method == "POST" and path[2] in ("approve", "deny"):
                body = self._body(request)
                if path[2] == "approve":
                    done = broker.approve(path[1], identity, body.get("reason"), body.get("digest"))
                else:
                    done = broker.deny(path[1], identity, body.get("reason"))
                return done.addCallback(lambda item: item.to_json())
        if path[:1] == ["grants"]:
            if len(path) == 1 and method == "GET":
                everything = _argument(request, "all", "") in ("1", "true", "yes")
                listed = defer.maybeDeferred(broker.grants_list, everything)
                return listed.addCallback(lambda grants: {"grants": [grant.to_json() for grant in grants]})
            if len(path) == 1 and method == "POST":
                body = self._body(request)
                try:
                    seconds = duration(body.get("duration"), "duration")
                except ConfigError as error:
                    raise ApprovalError(str(error), 400)
                missing = [key for key in ("connection", "rule", "subject") if not isinstance(body.get(key), str)]
                if missing:
                    raise ApprovalError("give %s" % (", ".join(missing),), 400)
                done = broker.grant(identity, body["connection"], body["rule"], body["subject"], seconds, body.get("reason"))
                return done.addCallback(lambda grant: grant.to_json())
            if len(path) == 3 and method == "POST" and path[2] == "revoke":
                body = self._body(request)
                return broker.revoke(path[1], identity, body.get("reason")).addCallback(lambda grant: grant.to_json())
        raise ApprovalError("not found: %s /%s" % (method, "/".join(["api"] + path)), 404)

    def _write(self, request, code, body):
        if request._disconnected:
            return
        request.setResponseCode(code)
        request.write(json.dumps(body, sort_keys=True).encode("utf-8") + b"\n")
        request.finish()

    def _error(self, request, failure):
        if failure.check(ApprovalError):
            self._write(request, failure.value.code, {"error": str(failure.value)})
            return
        logs.failed(self.log, failure, "The admin API failed")
        if failure.check(Unavailable):
            # The store is away: the caller may try again.
            self._write(request, 503, {"error": str(failure.value)})
            return
        self._write(request, 500, {"error": "the gateway failed internally; the failure is logged"})


def _argument(request, name, default):
    values = request.args.get(name.encode("ascii"))
    return values[0].decode("utf-8", "replace") if values else default


def admin_service(admin, gateway):
    """
    The admin listener: the API on C{admin["listen"]}, over TLS when a
    certificate is configured.
    """
    names = admin["identity_providers"]
    providers = [
        provider for name, provider in sorted(gateway.identity_providers.items()) if names is None or name in names
    ]
    from hoopgw.admin import AdminActions

    actions = AdminActions(gateway, admin["admin_groups"])
    site = server.Site(AdminAPI(gateway.approvals, providers, actions))
    site.displayTracebacks = False
    factory = site
    if admin["tls_certificate"]:
        with open(admin["tls_certificate"], "rb") as handle:
            certificate = handle.read()
        with open(admin["tls_key"], "rb") as handle:
            key = handle.read()
        options = ssl.PrivateCertificate.loadPEM(certificate + b"\n" + key).options()
        factory = TLSMemoryBIOFactory(options, False, site)
    service = listeners.service(gateway.reactor, admin["listen"], factory, reuse_port=bool(admin.get("reuse_port")),
                                service_class=_AdminService)
    service.actions = actions
    service.setName("admin")
    return service


class _AdminService(internet.StreamServerEndpointService):
    def stopService(self):
        self.actions.close()
        return internet.StreamServerEndpointService.stopService(self)
