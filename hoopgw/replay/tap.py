"""
C{twistd hoopgw-replay}: the read-only replay web server for auditors.

The record is read, never written.  The server's own evidence (who signed
in, who looked at what: PCI DSS 10.2.1.3) goes to a chain of its own, so it
never competes with a gateway for the file store's single-writer lock: the
C{views} folder inside a file store (a file store of its own: hash-chained,
signed, verified with the record by C{hoopgw verify}), or the shared chain
of a PostgreSQL store, which takes several writers.
"""

import os

from twisted.application import service, strports
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import server

from hoopgw import __version__
from hoopgw import config as configuration
from hoopgw import logs
from hoopgw.model import random_hex
from hoopgw.options import ConfigError


class Options(usage.Options):
    synopsis = "--store STORE [--listen ENDPOINT] --config FILE"
    longdesc = (
        "Serve a read-only replay of a hoopgw record to auditors, who sign in with their own OIDC token. "
        "Every view is recorded. The identity providers (and, by default, the store and the key signing "
        "the views) come from the gateway's configuration file."
    )
    optParameters = [
        ["store", "s", None, "The record: a store folder, an evidence bundle, or a PostgreSQL DSN (default: the config's)."],
        ["listen", "l", "tcp:8080:interface=127.0.0.1", "A Twisted endpoint string to serve on (ssl:... for HTTPS)."],
        ["config", "c", None, "The gateway's YAML configuration (identity providers, store, signing key)."],
        ["auditor-group", "g", "auditors", "The group (comma-separated groups) whose members may read the record."],
        ["signing-key", "k", None, "A PEM Ed25519 key signing the views chain (default: the config's signing_key)."],
        ["views", None, None, "The folder of the views chain (default: STORE/views for a file store)."],
        ["verify-key", None, None, "Your copy of the record's public key, to verify the record against."],
    ]

    def postOptions(self):
        from hoopgw.tap import own_pidfile

        own_pidfile(self, "hoopgw-replay.pid")
        if not self["config"]:
            raise usage.UsageError("give --config: the gateway's configuration names the identity providers auditors sign in with")


class ReplayService(service.MultiService):
    """
    The web listener, and the views chain's own start and stop.
    """

    log = Logger()

    def __init__(self, views_store, signer, app, listen):
        service.MultiService.__init__(self)
        self.store = views_store
        self.instance = "r-" + random_hex()
        self.signer = signer
        self.app = app
        listener = strports.service(listen, server.Site(app))
        listener.setServiceParent(self)

    def startService(self):
        starting = getattr(self.store, "start", None)
        if starting is not None:
            starting().addErrback(lambda failure: logs.failed(self.log, failure, "Recording the views store's recovery failed"))
        self.store.append(
            {
                "type": "gateway.start",
                "role": "replay",
                "gateway": self.instance,
                "version": __version__,
                "signing_key": {"key_id": self.signer.key_id, "public_key": self.signer.public_pem} if self.signer else None,
            }
        ).addErrback(lambda failure: logs.failed(self.log, failure, "Recording the replay server's start failed"))
        service.MultiService.startService(self)

    @defer.inlineCallbacks
    def stopService(self):
        if not self.running:
            return
        yield service.MultiService.stopService(self)
        try:
            yield self.store.append({"type": "gateway.stop", "role": "replay", "gateway": self.instance, "version": __version__})
        except Exception:
            logs.failed(self.log, Failure(), "Recording the replay server's stop failed")
        yield self.store.close()


def build(options, reactor):
    """
    The replay service for parsed L{Options}.

    @raise usage.UsageError: with a sentence saying what to fix.
    """
    from hoopgw.gateway import load_signer
    from hoopgw.replay.web import Auditors, RecordReader, ReplayApp, ViewLog
    from hoopgw.store.file import FileStore
    from hoopgw.store.errors import StoreError
    from hoopgw.store.signing import Signer, SigningKeyError, Verifier
    from hoopgw.store.sources import FileSource, is_postgres, open_source
    from hoopgw.store.errors import SourceError

    try:
        config = configuration.load(options["config"])
    except ConfigError as error:
        raise usage.UsageError("%s: %s" % (options["config"], error))
    store_spec = options["store"]
    postgres = config.gateway.store.backend == "postgres" and (store_spec is None or is_postgres(store_spec))
    try:
        if postgres and store_spec is None:
            from hoopgw.store.postgres import PostgresSource

            settings = config.gateway.store.postgres
            password = settings.password.read_text() if settings.password is not None else None
            source = PostgresSource(settings.dsn, schema=settings.schema, password=password)
        else:
            source = open_source(store_spec or config.gateway.store.path)
    except (SourceError, ConfigError) as error:
        raise usage.UsageError(str(error))
    try:
        if options["signing-key"]:
            with open(options["signing-key"], "rb") as handle:
                signer = Signer.from_pem(handle.read(), options["signing-key"])
        else:
            signer = load_signer(config.gateway.signing_key)
        key = Verifier.from_file(options["verify-key"]) if options["verify-key"] else None
    except (OSError, SigningKeyError, ConfigError) as error:
        raise usage.UsageError("the signing key cannot be used: %s" % (error,))
    if postgres:
        from hoopgw.store.postgres import PostgresStore

        views_store = PostgresStore(config.gateway.store.postgres, reactor)
    else:
        views = options["views"]
        if views is None:
            if not isinstance(source, FileSource):
                raise usage.UsageError("say with --views where the views of this bundle are recorded (a folder)")
            views = os.path.join(source.directory, "views")
        views_store = FileStore(views, reactor, segment_bytes=config.gateway.store.segment_bytes)
    try:
        views_store.open()
    except StoreError as error:
        raise usage.UsageError("the views chain cannot be written: %s" % (error,))
    if signer is not None:
        views_store.use_signer(signer, every_events=config.gateway.store.checkpoint_events,
                               every_seconds=config.gateway.store.checkpoint_interval)
    providers = {name: provider.build(reactor) for name, provider in config.identity_providers.items()}
    groups = [group.strip() for group in options["auditor-group"].split(",") if group.strip()]
    auditors = Auditors(providers, groups)
    app = ReplayApp(RecordReader(source, key), auditors, ViewLog(views_store), secure=options["listen"].startswith("ssl:"))
    return ReplayService(views_store, signer, app, options["listen"])


def makeService(options):
    from twisted.internet import reactor

    from hoopgw.tap import exit_zero_on_sigterm

    exit_zero_on_sigterm(reactor)
    return build(options, reactor)
