"""
Listening sockets several gateway processes share (C{reuse_port: true} on
a connection): a TCP port bound with SO_REUSEPORT, so that the kernel
spreads new connections over every process listening on it.
"""

import socket

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer

from hoopgw.options import ConfigError, join

# The endpoint types whose socket the gateway can build itself.
_TCP = (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint)


def supported():
    """
    Whether this platform has SO_REUSEPORT (Linux 3.9+, the BSDs).
    """
    return hasattr(socket, "SO_REUSEPORT")


def check(listen, path):
    """
    Refuse C{reuse_port} on a C{listen} endpoint it cannot apply to: only
    plain TCP endpoints (C{tcp:PORT:interface=...}) are bound by the
    gateway itself; TLS is each protocol's own business (PostgreSQL's
    SSLRequest, SSH), never the endpoint's.
    """
    if not supported():
        raise ConfigError(join(path, "reuse_port"), "this platform has no SO_REUSEPORT: run one gateway per port here")
    parsed = _parse(listen)
    if not isinstance(parsed, _TCP) or not parsed._port:
        raise ConfigError(
            join(path, "reuse_port"),
            "works only with a plain TCP listener on a fixed port (tcp:15432:interface=127.0.0.1), not %r" % (listen,),
        )


def _parse(listen, reactor=None):
    from twisted.internet.testing import MemoryReactor

    return endpoints.serverFromString(reactor or MemoryReactor(), listen)


class ReusePort(tcp.Port):
    """
    A TCP port whose socket is bound with SO_REUSEPORT (and SO_REUSEADDR,
    as Twisted's own): a port other processes of the same user may bind too.
    """

    def createInternetSocket(self):
        sock = tcp.Port.createInternetSocket(self)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A TCP server endpoint listening with L{ReusePort}.
    """

    def __init__(self, reactor, port, backlog=50, interface=""):
        self.reactor = reactor
        self.port = port
        self.backlog = backlog
        self.interface = interface

    def listen(self, factory):
        port = ReusePort(self.port, factory, self.backlog, self.interface, self.reactor)
        try:
            port.startListening()
        except Exception:
            return defer.fail()
        return defer.succeed(port)


def endpoint(reactor, listen):
    """
    The L{ReusePortEndpoint} of C{listen}, a checked TCP endpoint string.
    """
    parsed = _parse(listen, reactor)
    return ReusePortEndpoint(reactor, parsed._port, parsed._backlog, parsed._interface)


def service(reactor, listen, factory, reuse_port=True, service_class=StreamServerEndpointService):
    """
    The listening service of C{listen} (a checked endpoint string; TCP
    with SO_REUSEPORT when C{reuse_port}), behaving as C{strports.service}
    does: a port that is taken fails the start at once, where Twisted's
    endpoint service would log it and run without the listener.
    """
    where = endpoint(reactor, listen) if reuse_port else endpoints.serverFromString(reactor, listen)
    listening = service_class(where, factory)
    listening._raiseSynchronously = True
    return listening

