"""
The Kubernetes API front end: mitmproxy, embedded in the gateway's event
loop, is a reverse proxy in front of the API server; its hooks turn every
request into a command for the addon chain and forward what the chain
allows with the gateway's own credential.
"""

from zope.interface import moduleProvides

from hoopgw.interfaces import IFrontend
from hoopgw.kubernetes.settings import parse_connection


def make_factory(connection, gateway, chain):
    """
    The listener of one configured Kubernetes connection: a service of its
    own (mitmproxy listens, not C{strports}).
    """
    from hoopgw.kubernetes.frontend import KubernetesService

    return KubernetesService(connection, gateway, chain, gateway.reactor)


moduleProvides(IFrontend)

__all__ = ["make_factory", "parse_connection"]
