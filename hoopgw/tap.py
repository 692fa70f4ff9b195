"""
C{twistd hoopgw}: the gateway as a Twisted application.
"""

from twisted.python import usage

from hoopgw import config as configuration
from hoopgw.options import ConfigError, report
from hoopgw.store import open_store
from hoopgw.store.errors import StoreError


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Run the hoopgw access gateway: one listener per connection of the configuration file. "
        "Use --reactor=asyncio (twistd --reactor=asyncio -n hoopgw ...) so the Kubernetes front end "
        "can share the event loop."
    )
    optParameters = [["config", "c", "etc/hoopgw.yaml", "The gateway's YAML configuration file."]]

    def postOptions(self):
        own_pidfile(self, "hoopgw.pid")


def own_pidfile(options, name):
    """
    Give this plugin a pid file of its own (C{name}) unless the operator
    chose one with twistd's C{--pidfile}: with twistd's shared default
    (C{twistd.pid}) the gateway and the replay server could not run from
    one folder ("Another twistd server is running").
    """
    parent = getattr(options, "parent", None)
    if parent is not None and parent.get("pidfile") == "twistd.pid":
        parent["pidfile"] = name


def exit_zero_on_sigterm(reactor):
    """
    A stop asked for with SIGTERM (systemd, docker stop, kill) that went
    cleanly exits with status 0; twistd would otherwise re-raise the signal
    and the process would end with -15, which service managers count as a
    failure.
    """
    import signal

    def clear():
        if getattr(reactor, "_exitSignal", None) == signal.SIGTERM:
            reactor._exitSignal = None

    reactor.addSystemEventTrigger("after", "shutdown", clear)


def makeService(options):
    """
    Check the configuration, open the store and build the gateway service.
    """
    from twisted.internet import reactor

    from hoopgw.gateway import Gateway, StartupError

    try:
        config = configuration.load(options["config"])
    except ConfigError as error:
        raise StartupError(report(options["config"], error))
    try:
        store = open_store(config.gateway.store, reactor)
    except StoreError as error:
        raise StartupError(str(error))
    exit_zero_on_sigterm(reactor)
    try:
        return Gateway(config, reactor, store, reload_on_hangup=True)
    except ConfigError as error:
        store.close()
        raise StartupError(report(options["config"], error))
    except StoreError as error:
        # The shared approvals broker prepares its index in the store.
        store.close()
        raise StartupError(str(error))
