"""
The gateway as the offline CLI verbs see it (C{hoopgw explain}, C{hoopgw
whoami}): the real addon context around the configuration's connections and
identity providers, with nothing that runs — no store (nothing is
recorded), no approvals broker, no listeners.
"""

import attr
from twisted.internet.task import Clock

from hoopgw.addon import AddonContext


@attr.s
class OfflineGateway:
    """
    What an addon reaches through its context when no gateway runs.

    @ivar reactor: the reactor identity providers fetch keys with (a
        C{Clock} when nothing may run at all, as for C{explain}).
    """

    reactor = attr.ib(factory=Clock)
    identity_providers = attr.ib(factory=dict)
    store = None
    approvals = None
    instance = None
    refusals = None


def context(connection, gateway=None):
    """
    The context to build C{connection}'s addons with, offline.
    """
    return AddonContext(connection=connection, gateway=gateway or OfflineGateway())
