"""
The built-in addons, registered as plugins.
"""

from hoopgw.addons.identity import factory as identity
from hoopgw.addons.record import factory as record

__all__ = ["identity", "record"]
