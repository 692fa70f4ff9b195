"""
The running gateway: the store, the identity providers and one listener
with its addon chain per configured connection, assembled as a Twisted
service.
"""

import importlib
import os
import signal
import socket

import attr
from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure

from hoopgw import __version__, listeners, logs
from hoopgw.addon import AddonContext
from hoopgw.chain import AddonChain
from hoopgw.config import PROTOCOLS
from hoopgw.model import random_hex
from hoopgw.options import ConfigError
from hoopgw.refusals import RefusalFloods


class StartupError(SystemExit):
    """
    The gateway cannot start: twistd prints this sentence and exits 1,
    without a traceback (a UsageError raised here would print one).
    """

    def __init__(self, message):
        SystemExit.__init__(self, "hoopgw cannot start: %s" % (message,))


class Gateway(service.MultiService):
    """
    The gateway process: its children are the listeners (and the admin API
    when configured); it writes C{gateway.start} before they listen and
    C{gateway.stop} after every session has ended.
    """

    log = Logger()

    def __init__(self, config, reactor, store, reload_on_hangup=False):
        service.MultiService.__init__(self)
        self._reload_on_hangup = reload_on_hangup
        self.config = config
        self.reactor = reactor
        self.store = store
        self.approvals = None
        # Names this run of the gateway in the record: its start, its stop
        # and its sessions carry it, so verify can tell which sessions a
        # stop (or a crash) ended when several gateways share a store.
        self.instance = "g-" + random_hex()
        from hoopgw import metrics

        metrics.instrument_store(store)
        self.signer = load_signer(config.gateway.signing_key)
        if self.signer is not None:
            store.use_signer(
                self.signer,
                every_events=config.gateway.store.checkpoint_events,
                every_seconds=config.gateway.store.checkpoint_interval,
            )
            if config.gateway.witness is not None:
                store.use_witness(config.gateway.witness)
        self.identity_providers = {
            name: provider.build(reactor) for name, provider in config.identity_providers.items()
        }
        from hoopgw.replicas import Replicas

        # With a PostgreSQL store: used tokens and cancel requests shared
        # with the other processes on it (docs/replicas.rst); None otherwise.
        self.replicas = Replicas.for_gateway(self)
        from hoopgw.approvals import make_broker

        self.refusals = RefusalFloods(reactor, self.record, gateway=self.instance, **config.gateway.refusals)
        self.approvals = make_broker(config, reactor, self.record, store=store, instance=self.instance)
        self.factories = {}
        self.chains = {}
        # One per connection, shared by its successive chains (hoopgw.metrics).
        self.monitors = {
            name: metrics.ConnectionMonitor(name, connection.protocol) for name, connection in config.connections.items()
        }
        for connection in config.connections.values():
            chain = self.build_chain(connection)
            self.chains[connection.name] = chain
            factory = importlib.import_module(PROTOCOLS[connection.protocol]).make_factory(connection, self, chain)
            self.factories[connection.name] = factory
            if service.IService.providedBy(factory):
                # A protocol whose listener is not a Twisted factory (mitmproxy
                # listens itself) hands back its own service.
                listener = factory
            else:
                listener = listeners.service(reactor, connection.listen, self.monitors[connection.name].listening(factory),
                                             reuse_port=connection.reuse_port)
            listener.setName("connection:%s" % (connection.name,))
            listener.setServiceParent(self)
        self.export = None
        if config.gateway.export:
            from hoopgw.export.service import ExportService

            self.export = ExportService(config.gateway.export, config.gateway.state_dir, reactor, store, self.record)
        if config.gateway.admin is not None:
            from hoopgw.approvals.api import admin_service

            admin_service(config.gateway.admin, self).setServiceParent(self)
        if config.gateway.metrics is not None:
            from hoopgw.health import metrics_service

            metrics_service(config.gateway.metrics, self).setServiceParent(self)

    def build_chain(self, connection):
        """
        The addons of C{connection}'s chain, built with their options.
        """
        context = AddonContext(connection=connection, gateway=self)
        addons = [(spec.name, spec.factory.build(spec.options, context)) for spec in connection.addons]
        return AddonChain(addons, allowed_groups=connection.allowed_groups, monitor=self.monitors.get(connection.name))

    def reload(self, by=None):
        """
        Read the configuration file again and apply what can change while
        the gateway runs: each connection's chain (its addons, their order
        and options) and allowed groups.  New sessions get the new chain;
        sessions already open keep theirs.  Each change is recorded with the
        chain before and after; a file that is invalid, or that changes what
        needs a restart (listeners, targets, identity providers, the store),
        changes nothing and is recorded as refused.

        @return: a L{Deferred} firing with the names of the connections whose
            chain changed.
        """
        from hoopgw import config as configuration
        from hoopgw.options import ConfigError

        try:
            new = configuration.load(self.config.path)
            reason = _needs_restart(self.config, new)
        except ConfigError as error:
            reason = str(error)
        if reason is not None:
            logs.reload_refused(reason)
            return self.record({"type": "config.reload_refused", "gateway": self.instance, "reason": reason, "by": by}).addCallback(
                lambda _: []
            )
        changed = []
        recorded = []
        for name, connection in new.connections.items():
            old = self.config.connections[name]
            before = [spec.describe() for spec in old.addons]
            after = [spec.describe() for spec in connection.addons]
            if before == after and old.allowed_groups == connection.allowed_groups:
                continue
            chain = self.build_chain(connection)
            self.chains[name] = chain
            self.factories[name].chain = chain
            changed.append(name)
            recorded.append(
                self.record(
                    {
                        "type": "chain.changed",
                        "gateway": self.instance,
                        "connection": name,
                        "config_sha256": new.digest,
                        "before": {"chain": before, "allowed_groups": sorted(old.allowed_groups)},
                        "after": {"chain": after, "allowed_groups": sorted(connection.allowed_groups)},
                        "by": by,
                    }
                )
            )
        self.config = new
        logs.reload_applied(changed, new.digest)
        return defer.gatherResults(recorded, consumeErrors=True).addCallback(lambda _: changed)

    def change_chain(self, connection, by, **fields):
        """
        Give C{connection} (a changed L{ConnectionConfig} of a running
        connection) its new chain at run time: C{chain.changed} naming the
        operator C{by} and the chain before and after is made durable
        first; then new sessions get the new chain (open ones keep theirs).

        @return: a L{Deferred} firing with the new chain.
        """
        old = self.config.connections[connection.name]
        chain = self.build_chain(connection)
        event = {
            "type": "chain.changed",
            "gateway": self.instance,
            "connection": connection.name,
            "config_sha256": self.config.digest,
            "before": {"chain": [spec.describe() for spec in old.addons], "allowed_groups": sorted(old.allowed_groups)},
            "after": {"chain": [spec.describe() for spec in connection.addons], "allowed_groups": sorted(connection.allowed_groups)},
            "by": by,
        }
        event.update(fields)

        def apply(_):
            self.chains[connection.name] = chain
            self.factories[connection.name].chain = chain
            connections = dict(self.config.connections)
            connections[connection.name] = connection
            self.config = attr.evolve(self.config, connections=connections)
            return chain

        return self.record(event).addCallback(apply)

    def record(self, event):
        """
        Append an event to the store.  @return: a L{Deferred} firing once it
        is durable.
        """
        return self.store.append(event)

    def privilegedStartService(self):
        """
        Listen (twistd does this before dropping privileges): a port that
        is taken stops the start with a sentence naming the listener, not
        a traceback.
        """
        service.Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except CannotListenError as error:
                self.store.close()
                raise StartupError(
                    "%s cannot listen on %s port %s: %s"
                    % ((child.name or "a listener").replace(":", " "), error.interface or "every interface", error.port,
                       getattr(error.socketError, "strerror", None) or error.socketError)
                )

    def startService(self):
        starting = getattr(self.store, "start", None)
        if starting is not None:
            # What the store found on opening (a crash, a torn line) goes in
            # before this run's start.
            starting(self.instance).addErrback(lambda failure: logs.failed(self.log, failure, "Recording the store's recovery failed"))
        self.record(
            {
                "type": "gateway.start",
                "gateway": self.instance,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "signing_key": {"key_id": self.signer.key_id, "public_key": self.signer.public_pem}
                if self.signer is not None
                else None,
                "version": __version__,
                "config": self.config.path,
                "config_sha256": self.config.digest,
                # What a command's event waits for before it is forwarded.
                "durability": self.config.gateway.store.durability,
                "sync_interval": self.config.gateway.store.sync_interval
                if self.config.gateway.store.durability == "write-ahead"
                else None,
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
        ).addErrback(lambda failure: logs.failed(self.log, failure, "Recording the gateway start failed"))
        if self.replicas is not None:
            self.replicas.start()
        if self.approvals is not None:
            self.approvals.start()
        if self.export is not None:
            self.export.start()
        service.MultiService.startService(self)
        if self._reload_on_hangup:
            # An operator turns addons on and off per connection by editing
            # the file and sending SIGHUP; each change is recorded.
            signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, *_):
        from hoopgw.admin import local_operator

        self.reactor.callFromThread(self.reload, local_operator("SIGHUP"))

    @defer.inlineCallbacks
    def stopService(self):
        yield service.MultiService.stopService(self)
        yield defer.gatherResults(
            [factory.close_sessions("the gateway is stopping") for factory in self.factories.values()],
            consumeErrors=True,
        )
        if self.approvals is not None:
            self.approvals.close()
        if self.replicas is not None:
            self.replicas.stop()
        for provider in self.identity_providers.values():
            # Pooled directory connections.
            close = getattr(provider, "close", None)
            if close is not None:
                close()
        # Floods counted so far are part of this run's record.
        yield self.refusals.flush()
        try:
            yield self.record({"type": "gateway.stop", "gateway": self.instance, "version": __version__})
        except Exception:
            logs.failed(self.log, Failure(), "Recording the gateway stop failed")
        yield self.store.close()
        if self.export is not None:
            # After the store's last event (the stop, its closing checkpoint).
            yield self.export.stop()


def _needs_restart(old, new):
    """
    Why C{new} cannot be applied to a running gateway configured with
    C{old}, or None if it can.
    """
    if old.gateway != new.gateway or old.identity_providers != new.identity_providers:
        return "the gateway or identity provider settings changed: restart the gateway to apply them"
    if set(old.connections) != set(new.connections):
        return "connections were added or removed: restart the gateway to apply that"
    for name, connection in new.connections.items():
        before = old.connections[name]
        if (before.protocol, before.listen, before.settings, before.reuse_port) != (
            connection.protocol, connection.listen, connection.settings, connection.reuse_port
        ):
            return "the connection %r changed its listener or target: restart the gateway to apply that" % (name,)
    return None


def load_signer(secret):
    """
    The checkpoint signer from C{gateway.signing_key}, or None when the
    record is not to be signed.

    @raise ConfigError: naming the key when it cannot be used.
    """
    if secret is None:
        return None
    from hoopgw.store.signing import Signer, SigningKeyError

    try:
        return Signer.from_pem(secret.read_bytes(), "the signing key")
    except SigningKeyError as error:
        raise ConfigError(secret.path, str(error))
