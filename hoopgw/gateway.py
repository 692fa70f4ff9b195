"""
The running gateway: the store, the identity providers and one listener
with its addon chain per configured connection, assembled as a Twisted
service.
"""

import importlib

import attr
from twisted.application import service, strports
from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import __version__
from hoopgw.chain import AddonChain
from hoopgw.config import PROTOCOLS


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


class Gateway(service.MultiService):
    """
    The gateway process: its children are the listeners (and the admin API
    when configured); it writes C{gateway.start} before they listen and
    C{gateway.stop} after every session has ended.
    """

    log = Logger()

    def __init__(self, config, reactor, store):
        service.MultiService.__init__(self)
        self.config = config
        self.reactor = reactor
        self.store = store
        self.approvals = None
        self.identity_providers = {
            name: provider.build(reactor) for name, provider in config.identity_providers.items()
        }
        from hoopgw.approvals import make_broker

        self.approvals = make_broker(config, reactor, self.record)
        self.factories = {}
        self.chains = {}
        for connection in config.connections.values():
            chain = self.build_chain(connection)
            self.chains[connection.name] = chain
            factory = importlib.import_module(PROTOCOLS[connection.protocol]).make_factory(connection, self, chain)
            self.factories[connection.name] = factory
            listener = strports.service(connection.listen, factory)
            listener.setName("connection:%s" % (connection.name,))
            listener.setServiceParent(self)
        if config.gateway.admin is not None:
            from hoopgw.approvals.api import admin_service

            admin_service(config.gateway.admin, self).setServiceParent(self)

    def build_chain(self, connection):
        """
        The addons of C{connection}'s chain, built with their options.
        """
        context = AddonContext(connection=connection, gateway=self)
        addons = [(spec.name, spec.factory.build(spec.options, context)) for spec in connection.addons]
        return AddonChain(addons, allowed_groups=connection.allowed_groups)

    def record(self, event):
        """
        Append an event to the store.  @return: a L{Deferred} firing once it
        is durable.
        """
        return self.store.append(event)

    def startService(self):
        self.record(
            {
                "type": "gateway.start",
                "version": __version__,
                "config": self.config.path,
                "config_sha256": self.config.digest,
                "connections": {
                    name: {
                        "protocol": connection.protocol,
                        "listen": connection.listen,
                        "target": connection.target_name,
                        "allowed_groups": sorted(connection.allowed_groups),
                        "chain": [spec.describe() for spec in connection.addons],
                    }
                    for name, connection in self.config.connections.items()
                },
            }
        ).addErrback(lambda failure: self.log.failure("Recording the gateway start failed", failure))
        service.MultiService.startService(self)

    @defer.inlineCallbacks
    def stopService(self):
        yield service.MultiService.stopService(self)
        yield defer.gatherResults(
            [factory.close_sessions("the gateway is stopping") for factory in self.factories.values()],
            consumeErrors=True,
        )
        if self.approvals is not None:
            self.approvals.close()
        try:
            yield self.record({"type": "gateway.stop", "version": __version__})
        except Exception:
            self.log.failure("Recording the gateway stop failed")
        yield self.store.close()
