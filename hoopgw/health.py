"""
The metrics listener (C{gateway.metrics}): C{/metrics} for Prometheus,
C{/healthz} (the process serves) and C{/readyz} (it can do its work: the
store takes events, the identity providers' keys are fresh, every
connection's target accepts TCP connections), served by twisted.web.
"""

import json
import os

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger
from twisted.web import resource, server

from hoopgw import listeners, metrics

# A probe write this large must fit for the store to count as writable.
PROBE_BYTES = 4096


class _Probe(protocol.Protocol):
    def connectionMade(self):
        self.transport.abortConnection()


class Readiness:
    """
    The readiness checks, each cached for C{cache} seconds so that a
    scraper or a load balancer polling often costs little.
    """

    log = Logger()

    def __init__(self, gateway, settings):
        self.gateway = gateway
        self.cache = settings["readiness_cache"]
        self.connect_timeout = settings["connect_timeout"]
        self.min_free = settings["store_min_free_bytes"]
        self._cached = None
        self._checking = None

    def check(self):
        """
        @return: a L{Deferred} firing with C{(ready, checks)}, C{checks}
            mapping each check's name to C{{"ok": bool, ...}}.
        """
        now = self.gateway.reactor.seconds()
        if self._cached is not None and now - self._cached[0] < self.cache:
            return defer.succeed(self._cached[1])
        if self._checking is None:
            self._checking = self._run().addBoth(self._done, now)
        waiting = defer.Deferred()
        self._checking.addBoth(lambda result: (waiting.callback(result), result)[1])
        return waiting

    def _done(self, result, now):
        self._checking = None
        if isinstance(result, tuple):
            self._cached = (now, result)
        return result

    @defer.inlineCallbacks
    def _run(self):
        checks = {"store": self.store()}
        identity = yield self.identity()
        checks.update(identity)
        targets = yield self.targets()
        checks.update(targets)
        return all(check["ok"] for check in checks.values()), checks

    def store(self):
        """
        The store takes events: it has not failed, and, for a file store,
        a page can be written in its folder and the free space is above
        C{gateway.metrics.store_min_free_bytes}.
        """
        store = self.gateway.store
        state = metrics.store_state(store)
        if state == "low-space":
            return {"ok": False, "state": state, "error": "the store is low on space: new sessions are refused"}
        if state == "connecting":
            return {"ok": False, "state": state, "error": "the store has not reached its database yet: events wait for it"}
        if state != "ok":
            return {"ok": False, "state": state, "error": "the store is %s and takes no events" % (state,)}
        directory = getattr(store, "directory", None)
        if not isinstance(directory, str):
            return {"ok": True, "state": state}
        free = metrics.free_bytes(store)
        if free is not None and free < self.min_free:
            return {"ok": False, "state": state, "free_bytes": free,
                    "error": "the store's folder has %d bytes free, below %d" % (free, self.min_free)}
        probe = os.path.join(directory, ".hoopgw-readyz")
        try:
            descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(descriptor, b"\0" * PROBE_BYTES)
            finally:
                os.close(descriptor)
                os.unlink(probe)
        except OSError as error:
            return {"ok": False, "state": state, "free_bytes": free,
                    "error": "writing in the store's folder failed: %s" % (error.strerror,)}
        return {"ok": True, "state": state, "free_bytes": free}

    @defer.inlineCallbacks
    def identity(self):
        """
        Each provider that verifies tokens with signing keys has them, and
        they are fresh (not served from a stale cache because the issuer is
        unreachable).
        """
        checks = {}
        for name, provider in sorted(self.gateway.identity_providers.items()):
            key_set = getattr(provider, "key_set", None)
            if key_set is None:
                continue
            try:
                _, origin = yield key_set.keys()
            except Exception as error:
                checks["identity:%s" % (name,)] = {"ok": False, "error": str(error)}
                continue
            if origin == "stale-cache":
                checks["identity:%s" % (name,)] = {
                    "ok": False, "error": "the issuer is unreachable; its keys are served from a stale cache"}
            else:
                checks["identity:%s" % (name,)] = {"ok": True}
        return checks

    @defer.inlineCallbacks
    def targets(self):
        """
        Every connection's target accepts a TCP connection within
        C{connect_timeout}; the connection is closed at once.
        """
        reactor = self.gateway.reactor
        names = sorted(self.gateway.config.connections)
        attempts = []
        for name in names:
            target = self.gateway.config.connections[name].settings.target
            endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=self.connect_timeout)
            attempts.append(endpoints.connectProtocol(endpoint, _Probe()))
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        checks = {}
        for name, (success, value) in zip(names, results):
            target = self.gateway.config.connections[name].settings.target
            where = "%s:%s" % (target.host, target.port)
            if success:
                checks["target:%s" % (name,)] = {"ok": True, "target": where}
            else:
                checks["target:%s" % (name,)] = {
                    "ok": False, "target": where, "error": "%s is unreachable: %s" % (where, value.getErrorMessage())}
        return checks


class _JSON(resource.Resource):
    isLeaf = True

    def _write(self, request, code, body):
        if request._disconnected:
            return
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.write(json.dumps(body, sort_keys=True).encode("utf-8") + b"\n")
        request.finish()


class Healthz(_JSON):
    """
    200 while the process serves: nothing is checked beyond answering.
    """

    def render_GET(self, request):
        self._write(request, 200, {"status": "ok"})
        return server.NOT_DONE_YET


class Readyz(_JSON):
    """
    200 when every readiness check passes, else 503; the body lists the
    checks and says what failed.
    """

    log = Logger()

    def __init__(self, readiness):
        _JSON.__init__(self)
        self.readiness = readiness

    def render_GET(self, request):
        def answer(result):
            ready, checks = result
            failed = sorted(name for name, check in checks.items() if not check["ok"])
            body = {"status": "ready" if ready else "not ready", "checks": checks}
            if failed:
                body["failed"] = failed
            self._write(request, 200 if ready else 503, body)

        def broken(failure):
            self.log.failure("The readiness check failed", failure)
            self._write(request, 503, {"status": "not ready", "failed": ["internal"],
                                       "error": "the readiness check failed internally; the failure is logged"})

        self.readiness.check().addCallbacks(answer, broken)
        return server.NOT_DONE_YET


class Metrics(resource.Resource):
    """
    The Prometheus text exposition of one gateway's metrics, made in the
    reactor's thread (the collectors read the store).
    """

    isLeaf = True

    def __init__(self, gateway):
        resource.Resource.__init__(self)
        self.registry = metrics.GatewayRegistry(gateway)

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class Root(resource.Resource):
    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"hoopgw: /metrics (Prometheus), /healthz, /readyz\n"


def metrics_service(settings, gateway):
    """
    The metrics listener on C{settings["listen"]}.
    """
    root = Root()
    root.putChild(b"", root)
    root.putChild(b"metrics", Metrics(gateway))
    root.putChild(b"healthz", Healthz())
    root.putChild(b"readyz", Readyz(Readiness(gateway, settings)))
    site = server.Site(root)
    site.displayTracebacks = False
    # Scrapes every few seconds would fill the log.
    site.log = lambda request: None
    service = listeners.service(gateway.reactor, settings["listen"], site, reuse_port=bool(settings.get("reuse_port")))
    service.setName("metrics")
    return service
