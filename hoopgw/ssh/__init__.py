"""
The SSH front end on Twisted Conch: clients log in to the gateway with a
registered key, an OpenSSH certificate or an identity token; every exec,
shell, sftp operation and port forward is a command through the addon
chain; the gateway logs in to the target with its own key.
"""

import warnings

from cryptography.utils import CryptographyDeprecationWarning
from zope.interface import moduleProvides

# Conch names TripleDES among its (unused here) ciphers at import time.
warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning, module=r"twisted\.conch\.ssh\.transport")

from hoopgw.interfaces import IFrontend  # noqa: E402
from hoopgw.ssh.server import SSHGatewayFactory  # noqa: E402
from hoopgw.ssh.settings import parse_connection  # noqa: E402


def make_factory(connection, gateway, chain):
    """
    The listening factory for one configured SSH connection.
    """
    return SSHGatewayFactory(connection, gateway, chain, reactor=gateway.reactor)


moduleProvides(IFrontend)

__all__ = ["SSHGatewayFactory", "make_factory", "parse_connection"]
