"""
The built-in addons, registered as plugins.
"""

from hoopgw.addons.identity import factory as identity
from hoopgw.addons.record import factory as record
from hoopgw.addons.block import factory as block
from hoopgw.addons.mask import factory as mask
from hoopgw.addons.approve import factory as approve

__all__ = ["identity", "record", "block", "approve", "mask"]
