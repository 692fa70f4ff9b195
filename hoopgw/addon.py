"""
How an addon class becomes a loadable plugin: wrap it in an
L{AddonFactory} at module level, and hoopgw finds it (in C{hoopgw.plugins}
or in a file named by path in the configuration); and the L{AddonContext}
it is built with.
"""

import attr
from twisted.plugin import IPlugin
from zope.interface import implementer

from hoopgw.interfaces import IAddonFactory


@implementer(IPlugin, IAddonFactory)
@attr.s(frozen=True)
class AddonFactory:
    """
    Make instances of an addon class for each connection.

    The class declares C{name} and C{options} (a sequence of
    L{hoopgw.options.Option}); its docstring's first line describes it; it
    is built as C{cls(options, context)}.  A class may also define a static
    C{check_connection(options, connection, providers, path)} to check its
    options against the rest of the configuration at load time.
    """

    addon_class = attr.ib()

    @property
    def name(self):
        return self.addon_class.name

    @property
    def options(self):
        return tuple(getattr(self.addon_class, "options", ()))

    @property
    def description(self):
        return (self.addon_class.__doc__ or "").strip().splitlines()[0] if self.addon_class.__doc__ else ""

    @property
    def check_connection(self):
        return getattr(self.addon_class, "check_connection", None)

    @property
    def check_gateway(self):
        """
        A static C{check_gateway(options, gateway, path)} the class may
        define, to check its options against the gateway section.
        """
        return getattr(self.addon_class, "check_gateway", None)

    def build(self, options, context):
        return self.addon_class(options, context)


@attr.s(frozen=True)
class AddonContext:
    """
    What an addon gets when it is built for a connection.
    """

    connection = attr.ib()
    gateway = attr.ib(repr=False)

    @property
    def store(self):
        return self.gateway.store

    @property
    def reactor(self):
        return self.gateway.reactor

    @property
    def identity_providers(self):
        return self.gateway.identity_providers

    @property
    def approvals(self):
        return self.gateway.approvals
