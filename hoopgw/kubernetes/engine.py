"""
The embedded mitmproxy: one master per process, on the asyncio loop the
Twisted reactor runs on, for every Kubernetes connection of the gateway.
Each connection is a reverse-proxy mode of that master, listening on its
own address; one routing addon hands each flow to its connection's front
end.  mitmproxy's console and dump output are never loaded, and its log
goes to Twisted's logger.
"""

import asyncio
import logging
import socket

import wsproto.connection
import wsproto.events
from mitmproxy import ctx as mitmproxy_ctx
from mitmproxy import hooks, options
from mitmproxy.addons import next_layer, proxyserver
from mitmproxy.master import Master
from mitmproxy.proxy import commands, events
from mitmproxy.utils import human
from mitmproxy.proxy.layers import websocket as websocket_layers
from mitmproxy.proxy.mode_servers import ServerInstance
from mitmproxy.proxy.utils import expect
from twisted.internet import defer
from twisted.logger import LogLevel, Logger


_LEVELS = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
    logging.CRITICAL: LogLevel.critical,
}


class TwistedLogHandler(logging.Handler):
    """
    Hands mitmproxy's log records to Twisted's logger, in the namespace of
    the mitmproxy logger that made them (C{mitmproxy.proxy.server}, ...).
    """

    def emit(self, record):
        try:
            message = self.format(record)
        except Exception:
            message = str(record.msg)
        level = _LEVELS.get(record.levelno, LogLevel.warn if record.levelno >= logging.WARNING else LogLevel.debug)
        # Not "message": the legacy log system takes that key for itself.
        Logger(namespace=record.name).emit(level, "{text}", text=message)


# Where a websocket_message hook puts messages to send before the one it
# was given: a list of C{(content, is_text)}.
SEND_FIRST = "hoopgw.send_first"


class WebsocketLayer(websocket_layers.WebsocketLayer):
    """
    mitmproxy's WebSocket relay, with one addition: a C{websocket_message}
    hook may list messages in C{flow.metadata[SEND_FIRST]}, sent to the same
    side just before the message it was given.  The front end releases what
    the masker held back of an exec's output this way, ahead of the status
    message that ends it: mitmproxy's own injection would come after the
    close that often follows in the same read, and be lost.
    """

    @expect(events.DataReceived, events.ConnectionClosed, websocket_layers.WebSocketMessageInjected)
    def relay_messages(self, event):
        relaying = super().relay_messages(event)
        reply = None
        while True:
            try:
                command = relaying.send(reply)
            except StopIteration:
                yield from self._bounded()
                return
            reply = yield command
            if isinstance(command, websocket_layers.WebsocketMessageHook):
                first = self.flow.metadata.pop(SEND_FIRST, None)
                if first:
                    towards = self.server_ws if self.flow.websocket.messages[-1].from_client else self.client_ws
                    for content, is_text in first:
                        message = wsproto.events.TextMessage(content.decode()) if is_text else wsproto.events.BytesMessage(content)
                        yield towards.send2(message)


    def _bounded(self):
        """
        mitmproxy keeps a message's fragments until its last one: a message
        longer than the largest body a connection accepts (its
        C{max_body_bytes}) ends the WebSocket (close code 1009), and the
        flow says why in C{metadata[TOO_LARGE]}.
        """
        if self._handle_event != self.relay_messages:
            return
        limit = human.parse_size(self.context.options.body_size_limit or "") or DEFAULT_WEBSOCKET_LIMIT
        for side, ws in (("client", self.client_ws), ("API server", self.server_ws)):
            if sum(map(len, ws.frame_buf)) <= limit:
                continue
            reason = "the %s sent a WebSocket message longer than %d bytes (max_body_bytes)" % (side, limit)
            self.flow.metadata[TOO_LARGE] = reason
            yield commands.Log("Ending a WebSocket: %s" % (reason,), logging.WARNING)
            for each in (self.server_ws, self.client_ws):
                if each.state in (wsproto.connection.ConnectionState.OPEN, wsproto.connection.ConnectionState.REMOTE_CLOSING):
                    yield each.send2(wsproto.events.CloseConnection(code=1009, reason="hoopgw: message too large"))
                yield commands.CloseConnection(each.conn)
            yield websocket_layers.WebsocketEndHook(self.flow)
            self.flow.live = False
            self._handle_event = self.done
            return


# Why a WebSocket was ended by the gateway (see WebsocketLayer._bounded).
TOO_LARGE = "hoopgw.websocket_too_large"
DEFAULT_WEBSOCKET_LIMIT = 64 * 1024 * 1024


class Router:
    """
    The mitmproxy addon that sends each hook to the front end of the
    connection the flow arrived on.  A flow of no known connection is
    killed: nothing passes unexamined.
    """

    def __init__(self):
        self.frontends = {}

    def _frontend(self, client):
        return self.frontends.get(client.proxy_mode.full_spec)

    def _dispatch(self, name, flow):
        frontend = self._frontend(flow.client_conn)
        if frontend is None:
            if flow.killable:
                flow.kill()
            return None
        return getattr(frontend, name)(flow)

    def request(self, flow):
        return self._dispatch("request", flow)

    def responseheaders(self, flow):
        return self._dispatch("responseheaders", flow)

    def response(self, flow):
        return self._dispatch("response", flow)

    def error(self, flow):
        return self._dispatch("error", flow)

    def websocket_message(self, flow):
        return self._dispatch("websocket_message", flow)

    def websocket_end(self, flow):
        return self._dispatch("websocket_end", flow)

    def client_connected(self, client):
        frontend = self._frontend(client)
        if frontend is not None:
            frontend.client_connected(client)

    def tls_failed_client(self, data):
        frontend = self._frontend(data.context.client)
        if frontend is not None:
            frontend.tls_failed_client(data)

    def client_disconnected(self, client):
        frontend = self._frontend(client)
        if frontend is not None:
            frontend.client_disconnected(client)

    def tls_start_client(self, data):
        frontend = self._frontend(data.context.client)
        if frontend is not None:
            frontend.tls_start_client(data)

    def tls_start_server(self, data):
        frontend = self._frontend(data.context.client)
        if frontend is not None:
            frontend.tls_start_server(data)


class Engine:
    """
    The process's mitmproxy master and what it serves.  Get it with
    L{acquire} and give it back with L{release}: the last release shuts it
    down.
    """

    log = Logger()

    def __init__(self, reactor):
        self.reactor = reactor
        loop = getattr(reactor, "_asyncioEventloop", None)
        if loop is None:
            raise RuntimeError(
                "the Kubernetes front end needs the asyncio reactor: run twistd --reactor=asyncio"
            )
        self.loop = loop
        self.users = 0
        self.limits = {}
        self.handler = TwistedLogHandler()
        mitmproxy_logger = logging.getLogger("mitmproxy")
        mitmproxy_logger.addHandler(self.handler)
        mitmproxy_logger.setLevel(logging.WARNING)
        mitmproxy_logger.propagate = False
        # The HTTP layer makes its WebSocket relays from this name.
        websocket_layers.WebsocketLayer = WebsocketLayer
        self.master = Master(options.Options(), event_loop=loop, with_termlog=False)
        self.router = Router()
        self.proxyserver = proxyserver.Proxyserver()
        self.master.addons.add(self.router, self.proxyserver, next_layer.NextLayer())
        self.master.options.update(
            # Upstream connections open only once a request is allowed.
            connection_strategy="lazy",
            # kubectl exec needs HTTP/1.1 for its WebSocket upgrade; one
            # protocol keeps the front end simple.
            http2=False,
            http3=False,
            rawtcp=False,
            websocket=True,
        )
        self.master.addons.trigger(hooks.RunningHook())

    def listen(self, mode, host, port, frontend, max_body_bytes=None, reuse_port=False):
        """
        Start a reverse-proxy mode listening on C{host:port} for
        C{frontend}.  The socket is bound at once, so a port in use fails
        here.

        @return: the listening C{asyncio.Server}, once serving, as a
            L{Deferred}.
        """
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only
        # when their protocol says TCP (without it, every answer waits for a
        # delayed ACK).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                # Several gateway processes share the port (docs/replicas.rst).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        instance = ServerInstance.make(mode, self.proxyserver)
        self.router.frontends[instance.mode.full_spec] = frontend
        if max_body_bytes is not None:
            # mitmproxy's limit is the master's: the largest any connection allows
            # (each front end checks its own).
            self.limits[instance.mode.full_spec] = max_body_bytes
            self.master.options.update(body_size_limit=str(max(self.limits.values())))

        async def handle(reader, writer):
            # mitmproxy's connection handler takes the master from its
            # context: make sure it is this engine's.
            mitmproxy_ctx.master = self.master
            mitmproxy_ctx.options = self.master.options
            await instance.handle_stream(reader, writer)

        future = asyncio.ensure_future(asyncio.start_server(handle, sock=sock), loop=self.loop)
        return defer.Deferred.fromFuture(future)

    def forget(self, mode):
        self.router.frontends.pop(mode, None)
        self.limits.pop(mode, None)

    def shutdown(self):
        """
        Tell mitmproxy's addons it is done (which also takes its log
        handler off the root logger) and unhook its log from Twisted's.
        """
        asyncio.ensure_future(self.master.done(), loop=self.loop)
        logging.getLogger("mitmproxy").removeHandler(self.handler)


_engines = {}


def acquire(reactor):
    """
    The engine of C{reactor}'s event loop, made on first use.
    """
    engine = _engines.get(id(reactor))
    if engine is None:
        engine = _engines[id(reactor)] = Engine(reactor)
    engine.users += 1
    return engine


def release(engine):
    engine.users -= 1
    if engine.users <= 0:
        _engines.pop(id(engine.reactor), None)
        engine.shutdown()
