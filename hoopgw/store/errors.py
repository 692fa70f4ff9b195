"""
The store's errors, apart from the stores and sources that raise them, so
that any of them can name another's without an import circle.
"""

from hoopgw.model import Unavailable


class StoreError(Unavailable):
    """
    The store cannot take events; the gateway must not run commands.
    """


class SourceError(Exception):
    """
    The record cannot be read; the message says what to do.
    """
