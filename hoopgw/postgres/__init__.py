"""
The PostgreSQL front end: clients speak the wire protocol to the gateway,
the gateway speaks it to the target with its own credentials.
"""

from zope.interface import moduleProvides

from hoopgw.interfaces import IFrontend
from hoopgw.postgres.frontend import PostgresFactory
from hoopgw.postgres.settings import parse_connection


def make_factory(connection, gateway, chain):
    """
    The listening factory for one configured PostgreSQL connection.
    """
    return PostgresFactory(connection, gateway, chain, reactor=gateway.reactor)


moduleProvides(IFrontend)

__all__ = ["PostgresFactory", "make_factory", "parse_connection"]
