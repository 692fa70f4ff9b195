"""
The Kubernetes front end: the mitmproxy hooks of one connection, each
handing its moment to the part that owns it.  Connections are admitted and
their TLS handshakes made in L{connections}; every request is decided in
L{requests} (its session from L{sessions}), made a L{Command} for the
addon chain and, if allowed, passed to the API server with the gateway's
own credential; responses, watch events and log streams pass back through
the chain's result hooks in L{responses} and L{streams}, exec and attach
in L{terminal}; every request leaves an audit event (L{exchange}).
"""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from hoopgw.kubernetes import engine as engines
from hoopgw.kubernetes.connections import ClientConnections
from hoopgw.kubernetes.exchange import Exchange
from hoopgw.kubernetes.requests import Requests
from hoopgw.kubernetes.responses import Responses
from hoopgw.kubernetes.sessions import Sessions, refusal_status
from hoopgw.kubernetes.terminal import Terminal

# Named here before the front end was split, and still found here.
__all__ = ["Exchange", "Frontend", "KubernetesService", "refusal_status"]


class Frontend:
    """
    The hooks of one Kubernetes connection, called by the engine's router.

    @ivar ending: what must fire before the connection's sessions are all
        over (their end, refused attempts' events), see L{track}.
    """

    log = Logger()

    def __init__(self, connection, gateway, chain, reactor, loop):
        self.connection = connection
        self.settings = connection.settings
        self.gateway = gateway
        self.chain = chain
        self.reactor = reactor
        self.loop = loop
        self.engine = None
        self.ending = set()
        self.result_hooks = chain.has("result_received")
        self.connections = ClientConnections(self)
        self.sessions = Sessions(self)
        self.requests = Requests(self)
        self.responses = Responses(self)
        self.terminal = Terminal(self)

    # mitmproxy's hooks.

    def client_connected(self, client):
        self.connections.connected(client)

    def tls_start_client(self, data):
        self.connections.tls_start_client(data)

    def tls_start_server(self, data):
        self.connections.tls_start_server(data)

    def tls_failed_client(self, data):
        self.connections.tls_failed(data)

    async def request(self, flow):
        await self.requests.received(flow)

    def responseheaders(self, flow):
        self.responses.headers(flow)

    async def response(self, flow):
        await self.responses.complete(flow)

    def error(self, flow):
        self.responses.failed(flow)

    async def websocket_message(self, flow):
        await self.terminal.message(flow)

    async def websocket_end(self, flow):
        await self.terminal.end(flow)

    def client_disconnected(self, client):
        self.connections.disconnected(client)
        self.sessions.disconnected(client)

    # What the parts share.

    def track(self, ending):
        """
        Keep C{ending} (a L{Deferred}) among what L{close_sessions} waits
        for until it fires.

        @return: C{ending}.
        """
        self.ending.add(ending)
        ending.addBoth(lambda result: (self.ending.discard(ending), result)[1])
        return ending

    def _handler(self, client_id):
        return self.engine.proxyserver.connections.get(client_id) if self.engine is not None else None

    def close_client(self, client_id):
        """
        Close a client's connection now (unless it is closed already).
        """
        handler = self._handler(client_id)
        if handler is not None:
            _close_client(handler)

    def stream_broken(self, flow, exchange, reason, delay=None):
        """
        A streamed response may not go on (an addon failed on it): close
        the client's connection.
        """
        self.log.error("Withholding the rest of a Kubernetes stream: {reason}", reason=reason)
        exchange.broken = reason
        handler = self._handler(flow.client_conn.id)
        if handler is not None:
            # After what is on its way out (a status frame) has been written.
            if delay is None:
                self.loop.call_soon(_close_client, handler)
            else:
                self.loop.call_later(delay, _close_client, handler)

    def close_sessions(self, reason):
        """
        End every session (the gateway is stopping): close the clients'
        connections and tell the chain.

        @return: a L{Deferred} firing once every session has ended.
        """
        self.connections.stop()
        self.sessions.close(reason)
        return _all_of(self.ending)


def _all_of(ending):
    """
    A L{Deferred} firing once every one of C{ending} (a set that may grow
    meanwhile, as sessions end after their requests) has fired.
    """
    if not ending:
        return defer.succeed(None)
    return defer.DeferredList(list(ending), consumeErrors=True).addCallback(lambda _: _all_of(ending))


def _close_client(handler):
    """
    Close a client's connection through its mitmproxy connection handler
    (unless it is closed already).
    """
    if handler.client in handler.transports:
        handler.close_connection(handler.client)


class KubernetesService(service.Service):
    """
    The listener of one Kubernetes connection: a reverse-proxy mode of the
    process's mitmproxy master.  The gateway adds it as it is (it is its
    own service, not a factory for C{strports}).

    @ivar listening: a L{Deferred} firing once the mode serves.
    """

    log = Logger()

    def __init__(self, connection, gateway, chain, reactor):
        self.connection = connection
        self.reactor = reactor
        loop = getattr(reactor, "_asyncioEventloop", None)
        self.frontend = Frontend(connection, gateway, chain, reactor, loop)
        self.listening = None
        self._server = None
        self._stopped = None

    def startService(self):
        service.Service.startService(self)
        self._stopped = None
        engine = engines.acquire(self.reactor)
        settings = self.connection.settings
        try:
            self.listening = engine.listen(
                settings.mode, settings.listen_host, settings.listen_port, self.frontend, settings.max_body_bytes,
                reuse_port=self.connection.reuse_port,
            )
        except OSError:
            engines.release(engine)
            raise
        self.frontend.engine = engine
        self.listening.addCallback(self._serving)

    def _serving(self, server):
        if not self.running:
            # Stopped before the listener began serving (it starts in the
            # asyncio loop): nothing may be served any more.
            server.close()
            return server
        self._server = server
        return server

    def stopService(self):
        service.Service.stopService(self)
        if self._stopped is not None:
            return self._stopped
        engine = self.frontend.engine
        if self._server is not None:
            self._server.close()
            self._server = None
        ending = self.frontend.close_sessions("the gateway is stopping")

        def release(result):
            engine.forget(self.connection.settings.mode)
            engines.release(engine)
            self.frontend.engine = None
            return result

        self._stopped = ending.addBoth(release)
        return self._stopped

    def close_sessions(self, reason):
        if self.frontend.engine is None:
            return self._stopped or defer.succeed(None)
        return self.frontend.close_sessions(reason)

