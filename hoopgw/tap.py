"""
C{twistd hoopgw}: the gateway as a Twisted application.
"""

from twisted.python import usage

from hoopgw import config as configuration
from hoopgw.options import ConfigError, report
from hoopgw.store import StoreError, open_store


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Run the hoopgw access gateway: one listener per connection of the configuration file. "
        "Use --reactor=asyncio (twistd --reactor=asyncio -n hoopgw ...) so the Kubernetes front end "
        "can share the event loop."
    )
    optParameters = [["config", "c", "etc/hoopgw.yaml", "The gateway's YAML configuration file."]]


class StartupError(SystemExit):
    """
    The gateway cannot start: twistd prints this sentence and exits 1,
    without a traceback (a UsageError raised here would print one).
    """

    def __init__(self, message):
        SystemExit.__init__(self, "hoopgw cannot start: %s" % (message,))


def makeService(options):
    """
    Check the configuration, open the store and build the gateway service.
    """
    from twisted.internet import reactor

    from hoopgw.gateway import Gateway

    try:
        config = configuration.load(options["config"])
    except ConfigError as error:
        raise StartupError(report(options["config"], error))
    try:
        store = open_store(config.gateway.store, reactor)
    except StoreError as error:
        raise StartupError(str(error))
    try:
        return Gateway(config, reactor, store, reload_on_hangup=True)
    except ConfigError as error:
        store.close()
        raise StartupError(report(options["config"], error))
    except StoreError as error:
        # The shared approvals broker prepares its index in the store.
        store.close()
        raise StartupError(str(error))
