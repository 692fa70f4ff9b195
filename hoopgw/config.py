"""
The gateway's one YAML file: loaded, checked key by key, and turned into
frozen objects the rest of hoopgw uses.  Every error names the key path.
"""

import hashlib
import importlib
import importlib.util
import os

import attr
import yaml
from twisted.plugin import getPlugins

from hoopgw import options as o
from hoopgw import refusals
from hoopgw.interfaces import IAddonFactory
from hoopgw.options import ConfigError, join


# Each protocol's package parses its own connection settings and builds its
# listener; this table is the only place that names them.
PROTOCOLS = {
    "postgres": "hoopgw.postgres",
    "kubernetes": "hoopgw.kubernetes",
    "ssh": "hoopgw.ssh",
}

# Likewise for identity provider types.
IDENTITY_PROVIDERS = {
    "oidc": "hoopgw.identity.oidc",
    "ldap": "hoopgw.identity.ldap",
    "saml": "hoopgw.identity.saml",
    "certificate": "hoopgw.identity.certificates",
}


@attr.s(frozen=True)
class AddonSpec:
    """
    One step of a connection's chain: which addon, with which options.
    """

    name = attr.ib()
    factory = attr.ib(repr=False)
    options = attr.ib()
    source = attr.ib()
    path = attr.ib()

    def describe(self):
        """
        What the record says of this step: which addon, from where, and a
        digest of its options (they may name secrets' locations, never
        secrets, but need not be spelled out to show that they changed).
        """
        options = repr(sorted(self.options.items(), key=lambda item: item[0]))
        return {
            "name": self.name,
            "source": self.source,
            "options_sha256": hashlib.sha256(options.encode("utf-8")).hexdigest(),
        }


@attr.s(frozen=True)
class ConnectionConfig:
    """
    One listener: a protocol, where it listens, the target behind it, who
    may use it and the addon chain every session runs through.
    """

    name = attr.ib()
    protocol = attr.ib()
    listen = attr.ib()
    allowed_groups = attr.ib()
    addons = attr.ib()
    settings = attr.ib()
    description = attr.ib(default="")
    # SO_REUSEPORT on the listening socket: several gateway processes
    # share the port (docs/replicas.rst).
    reuse_port = attr.ib(default=False)

    @property
    def target_name(self):
        return self.settings.target_name


@attr.s(frozen=True)
class StoreConfig:
    backend = attr.ib()
    path = attr.ib()
    fsync = attr.ib()
    segment_bytes = attr.ib()
    options = attr.ib(factory=dict)
    checkpoint_events = attr.ib(default=1000)
    checkpoint_interval = attr.ib(default=60.0)
    retention = attr.ib(default=None)
    postgres = attr.ib(default=None)
    sync_process = attr.ib(default=True)
    low_water = attr.ib(default=256 * 1024 * 1024)
    low_water_percent = attr.ib(default=5.0)
    reserve = attr.ib(default=4 * 1024 * 1024)
    space_check_interval = attr.ib(default=5.0)
    durability = attr.ib(default="write-ahead-fsync")
    sync_interval = attr.ib(default=0.05)


@attr.s(frozen=True)
class GatewayConfig:
    state_dir = attr.ib()
    store = attr.ib()
    admin = attr.ib()
    signing_key = attr.ib()
    options = attr.ib(factory=dict)
    witness = attr.ib(default=None)
    metrics = attr.ib(default=None)
    refusals = attr.ib(factory=dict)
    export = attr.ib(default=())


@attr.s(frozen=True)
class Config:
    """
    The whole configuration, checked.
    """

    path = attr.ib()
    gateway = attr.ib()
    identity_providers = attr.ib()
    connections = attr.ib()
    digest = attr.ib()


STORE_OPTIONS = (
    o.Option(
        "backend",
        o.choice("file", "postgres"),
        "file",
        "Where events go: 'file', a folder of JSON-lines segments; 'postgres', a table several gateways share.",
    ),
    o.Option("path", o.directory_path, "var/audit", "The store's folder, relative to this file."),
    o.Option(
        "durability",
        o.choice("write-ahead-fsync", "write-ahead"),
        "write-ahead-fsync",
        "What a command waits for before it is forwarded: 'write-ahead-fsync', its event synced to disk "
        "(nothing acknowledged is lost, even on a power loss); 'write-ahead', its event written to the "
        "operating system (a gateway crash loses nothing; a power loss may lose the last sync_interval).",
    ),
    o.Option(
        "sync_interval",
        lambda value, path: _positive_duration(value, path),
        0.05,
        "With durability write-ahead: the longest an event stays written but not synced to disk.",
    ),
    o.Option(
        "fsync",
        o.boolean,
        True,
        "Deprecated: 'fsync: false' is read as 'durability: write-ahead'.",
    ),
    o.Option(
        "sync_process",
        o.boolean,
        True,
        "Make events durable in a small process of the store's own, so that the event loop goes on with "
        "other sessions while the disk syncs; off, each group commit's fdatasync is made in the loop.",
    ),
    o.Option(
        "segment_bytes",
        o.integer(minimum=4096),
        64 * 1024 * 1024,
        "Start a new segment file once the current one is this large.",
    ),
    o.Option(
        "checkpoint_events",
        o.integer(minimum=1),
        1000,
        "Sign a checkpoint of the record after this many events (with gateway.signing_key).",
    ),
    o.Option(
        "checkpoint_interval",
        o.duration,
        60.0,
        "Sign a checkpoint at least this often while events come in, and always when the gateway stops.",
    ),
    o.Option(
        "postgres",
        lambda value, path: _load_module("hoopgw.store.postgres").parse_options(value, path),
        None,
        "For backend postgres: dsn (a libpq connection string without the password), password ({file: PATH} "
        "or {env: VARIABLE}) and schema.",
    ),
    o.Option(
        "retention",
        lambda value, path: _load_module("hoopgw.store.retention").parse_retention(value, path),
        None,
        "How long the record is kept online and in all: 'pci-dss-10.5.1' (3 months online, 12 months kept) "
        "or {online: 90d, keep: 365d, purge: false}.",
    ),
    o.Option(
        "low_water",
        lambda value, path: _load_module("hoopgw.store.space").size(value, path),
        256 * 1024 * 1024,
        "Below this much free space (or low_water_percent of the volume, whichever is smaller; for backend "
        "postgres, room left under postgres.max_bytes) new sessions are refused until space returns.",
    ),
    o.Option(
        "low_water_percent",
        lambda value, path: _load_module("hoopgw.store.space").percent(value, path),
        5.0,
        "The low-water mark as a percentage of the volume (or of postgres.max_bytes).",
    ),
    o.Option(
        "reserve",
        lambda value, path: _load_module("hoopgw.store.space").size(value, path),
        4 * 1024 * 1024,
        "Room the file store sets aside (STORE/reserve) and gives up when the volume is full, so the events "
        "of sessions in flight and gateway.stop still fit.",
    ),
    o.Option(
        "space_check_interval",
        lambda value, path: _positive_duration(value, path),
        5.0,
        "How often the store measures its space, and after a full disk tries to write again.",
    ),
)


def _positive_duration(value, path):
    seconds = o.duration(value, path)
    if seconds <= 0:
        raise ConfigError(path, "give a duration above zero, such as 30s")
    return seconds


ADMIN_OPTIONS = (
    o.Option("listen", o.endpoint, o.REQUIRED, "A Twisted endpoint string for the admin and approvals HTTP API."),
    o.Option("tls_certificate", o.file_path, None, "PEM certificate for HTTPS on the admin listener."),
    o.Option("tls_key", o.file_path, None, "PEM private key for HTTPS on the admin listener."),
    o.Option(
        "reuse_port",
        o.boolean,
        False,
        "SO_REUSEPORT on the admin listener, so that replicas of one configuration share its port "
        "(docs/replicas.rst): approvals are shared through the PostgreSQL store; /api/admin acts on the "
        "replica that answers.",
    ),
    o.Option(
        "identity_providers",
        o.string_list,
        None,
        "The identity providers whose tokens approvers may sign in with (all when absent).",
    ),
    o.Option("approver_groups", o.string_list, [], "Groups allowed to act on approvals at all."),
    o.Option(
        "admin_groups",
        o.string_list,
        [],
        "Groups whose members may use the admin API (/api/admin: sessions, pause, addons, reload); "
        "nobody when empty.",
    ),
    o.Option(
        "url",
        o.string,
        None,
        "The URL approvers reach this listener at, given in notices and webhooks (derived from listen when absent).",
    ),
    o.Option(
        "reconcile_interval",
        _positive_duration,
        30.0,
        "With a PostgreSQL store: how often this gateway sweeps the shared approvals, a safety net behind "
        "LISTEN/NOTIFY (decisions whose wake-up was lost, requests of gateways that died or are long past "
        "their timeout).",
    ),
)


METRICS_OPTIONS = (
    o.Option(
        "listen",
        o.endpoint,
        o.REQUIRED,
        "A Twisted endpoint string for /metrics (Prometheus), /healthz and /readyz, such as "
        "tcp:9187:interface=127.0.0.1. Plain HTTP: keep it on loopback or a monitoring network.",
    ),
    o.Option(
        "reuse_port",
        o.boolean,
        False,
        "SO_REUSEPORT on the metrics listener, so that replicas of one configuration share its port "
        "(docs/replicas.rst); each request is answered by one replica, with its own figures.",
    ),
    o.Option(
        "readiness_cache",
        o.duration,
        5.0,
        "How long /readyz reuses its last answer, so that frequent polls cost little.",
    ),
    o.Option(
        "connect_timeout",
        _positive_duration,
        2.0,
        "How long /readyz waits for each connection's target to accept a TCP connection.",
    ),
    o.Option(
        "store_min_free_bytes",
        o.integer(minimum=0),
        0,
        "/readyz fails when the file store's folder has less free space than this (bytes); a probe write "
        "must succeed in any case.",
    ),
)


GATEWAY_OPTIONS = (
    o.Option("state_dir", o.directory_path, "var", "A folder the gateway keeps its own state in (host keys, caches)."),
    o.Option("store", o.mapping, {}, "The evidence store: backend, path, fsync, segment_bytes."),
    o.Option("admin", o.mapping, None, "The admin HTTP listener (approvals API); off when absent."),
    o.Option("signing_key", o.secret, None, "The Ed25519 key signing the record's checkpoints."),
    o.Option(
        "witness",
        lambda value, path: _load_module("hoopgw.store.witness").parse_options(value, path),
        None,
        "{file: PATH}: append every signed checkpoint to PATH, on another volume than the store, for "
        "'hoopgw verify --witness PATH'.",
    ),
    o.Option("metrics", o.mapping, None, "The metrics and health listener (/metrics, /healthz, /readyz); off when absent."),
    o.Option(
        "refusals",
        o.mapping,
        {},
        "How refused attempts are recorded under a flood: in_full, interval, max_sources, max_identities "
        "(see docs/limits-and-attempts.rst).",
    ),
    o.Option(
        "export",
        lambda value, path: _load_module("hoopgw.export.config").parse_export(value, path),
        (),
        "Sinks streaming the record to a SIEM (syslog over TLS, HTTPS, a JSON-lines file), by name: see docs/export.rst.",
    ),
)


def _load_module(module_name):
    return importlib.import_module(module_name)


def builtin_addons():
    """
    The addon factories installed as plugins, by name.
    """
    import hoopgw.plugins

    return {factory.name: factory for factory in getPlugins(IAddonFactory, hoopgw.plugins)}


def load_addon_file(path, key_path):
    """
    Load the addon factories a Python file defines at module level, as
    mitmproxy loads scripts.

    @return: a dict of name to factory.
    """
    module_name = "hoopgw_addon_%s" % (hashlib.sha256(path.encode()).hexdigest()[:12],)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None:
        raise ConfigError(key_path, "%s is not a Python file" % (path,))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise ConfigError(key_path, "loading %s failed: %s: %s" % (path, type(error).__name__, error))
    found = {
        value.name: value
        for value in vars(module).values()
        if IAddonFactory.providedBy(value) and not isinstance(value, type)
    }
    if not found:
        raise ConfigError(
            key_path,
            "%s defines no addon: it needs a module-level AddonFactory (see addons/ for examples)" % (path,),
        )
    return found


def _parse_addon(entry, path, known):
    """
    One chain entry: C{name}, C{{name: {options}}}, or
    C{{path: FILE, name: NAME, options: {...}}}.
    """
    if isinstance(entry, str):
        name, raw_options, source = entry, None, "plugin"
        factories = known
    else:
        entry = o.mapping(entry, path)
        if "path" in entry:
            unknown = sorted(set(entry) - {"path", "name", "options"})
            if unknown:
                raise ConfigError(join(path, unknown[0]), "unknown key; a file addon takes path, name and options")
            file_path = o.file_path(entry["path"], join(path, "path"))
            factories = load_addon_file(file_path, join(path, "path"))
            if "name" in entry:
                name = o.string(entry["name"], join(path, "name"))
            elif len(factories) == 1:
                (name,) = factories
            else:
                raise ConfigError(
                    path, "%s defines several addons (%s); say which with name:" % (file_path, ", ".join(sorted(factories)))
                )
            raw_options, source = entry.get("options"), file_path
        elif len(entry) == 1:
            ((name, raw_options),) = entry.items()
            factories, source = known, "plugin"
        else:
            raise ConfigError(path, "expected an addon name, {NAME: {options}} or {path: FILE, options: {...}}")
    factory = factories.get(name)
    if factory is None:
        raise ConfigError(
            path, "there is no addon named %r; known addons: %s" % (name, ", ".join(sorted(factories)))
        )
    options = o.parse_options(factory.options, raw_options, join(path, name))
    return AddonSpec(name=name, factory=factory, options=options, source=source, path=path)


# The keys every connection has, whatever its protocol (the protocol's own
# settings are checked by its package).
CONNECTION_KEYS = ("protocol", "listen", "allowed_groups", "description", "addons", "reuse_port")


def _parse_connection(name, raw, path, known_addons, providers):
    raw = dict(o.mapping(raw, path))
    problems = o.Collector()
    protocol_name = raw.get("protocol")
    protocol_module = _load_module(PROTOCOLS[protocol_name]) if protocol_name in PROTOCOLS else None
    # A misspelt common key (alowed_groups) is reported as unknown, with the
    # key it stands for, rather than as a missing key alone.
    protocol_keys = set()
    if protocol_module is not None:
        settings_module = _load_module(protocol_module.parse_connection.__module__)
        protocol_keys = {option.name for option in getattr(settings_module, "CONNECTION_OPTIONS", ())}
    stray = {key: value for key, value in raw.items() if key not in CONNECTION_KEYS and key not in protocol_keys}
    missing = [key for key in ("protocol", "listen", "allowed_groups") if key not in raw]
    errors, meant = o.unknown_keys(
        stray, CONNECTION_KEYS + tuple(sorted(protocol_keys)), path, missing,
        what="unknown key; a %s connection takes %%s" % (protocol_name if protocol_module else "",),
    )
    if protocol_module is None:
        # Without a protocol its settings are unknown: only the misspellings
        # of a common key can be told apart.
        errors = [error for error in errors if "(it is required)" in error.message]
        stray = {key: None for key in stray if any(key == error.path.rsplit(".", 1)[-1] for error in errors)}
    problems.errors.extend(errors)
    for key in stray:
        del raw[key]
    protocol = problems.check(o.choice(*sorted(PROTOCOLS)), raw.pop("protocol", None), join(path, "protocol"))
    listen = o.INVALID
    if "listen" not in raw:
        if "listen" not in meant:
            problems.add(join(path, "listen"), "is required: a Twisted endpoint string such as tcp:15432:interface=127.0.0.1")
    else:
        listen = problems.check(o.endpoint, raw.pop("listen"), join(path, "listen"))
    allowed_groups = problems.check(o.string_set, raw.pop("allowed_groups", []), join(path, "allowed_groups"))
    if allowed_groups is not o.INVALID and not allowed_groups and "allowed_groups" not in meant:
        problems.add(
            join(path, "allowed_groups"),
            "is required: list the groups whose members may use this connection",
        )
    description = problems.check(o.optional_string, raw.pop("description", None), join(path, "description")) or ""
    reuse_port = problems.check(o.boolean, raw.pop("reuse_port", False), join(path, "reuse_port"))
    if reuse_port is True and listen is not o.INVALID:
        from hoopgw import listeners

        problems.check(listeners.check, listen, path)
    raw_addons = problems.check(
        o.list_of(lambda value, where: value), raw.pop("addons", None) or [], join(path, "addons")
    )
    addons = []
    for index, entry in enumerate(raw_addons if raw_addons is not o.INVALID else []):
        spec = problems.check(_parse_addon, entry, join(join(path, "addons"), index), known_addons)
        if spec is not o.INVALID:
            addons.append(spec)
    addons = tuple(addons)
    names = [spec.name for spec in addons]
    for twice in sorted({name for name in names if names.count(name) > 1}):
        problems.add(join(path, "addons"), "the addon %r appears twice" % (twice,))
    settings = o.INVALID
    if protocol is not o.INVALID:
        settings = problems.check(
            protocol_module.parse_connection, raw, path, listen if listen is not o.INVALID else "tcp:0"
        )
    problems.done()
    connection = ConnectionConfig(
        name=name,
        protocol=protocol,
        listen=listen,
        allowed_groups=allowed_groups,
        addons=addons,
        settings=settings,
        description=description,
        reuse_port=reuse_port is True,
    )
    if connection.reuse_port and protocol == "ssh" and settings is not o.INVALID and not settings.host_keys:
        problems.add(
            join(path, "reuse_port"),
            "needs host_keys on an SSH connection: every process sharing the port must show clients the same "
            "host key (a generated one is per state_dir)",
        )
    for spec in addons:
        check = getattr(spec.factory, "check_connection", None)
        if check is not None:
            problems.check(check, spec.options, connection, providers, spec.path)
    problems.done()
    return connection


def parse(document, path="<string>"):
    """
    Check a parsed YAML document.

    @return: a L{Config}.
    @raise ConfigError: naming the bad key; a L{hoopgw.options.ConfigErrors}
        naming each when there are several.
    """
    base = os.path.dirname(os.path.abspath(path)) if path != "<string>" else os.getcwd()
    token = o.relative_to(base)
    try:
        return _parse(document, path)
    finally:
        o._BASE_DIRECTORY.reset(token)


SECTIONS = ("gateway", "identity_providers", "connections")


def _parse(document, path):
    document = o.mapping(document, "")
    problems = o.Collector()
    errors, _ = o.unknown_keys(
        document, SECTIONS, "", what="unknown section; expected gateway, identity_providers and connections"
    )
    problems.errors.extend(errors)
    gateway = problems.check(_parse_gateway, document.get("gateway"))

    providers = {}
    raw_providers = problems.check(o.mapping, document.get("identity_providers") or {}, "identity_providers")
    for name, raw in (raw_providers if raw_providers is not o.INVALID else {}).items():
        where = join("identity_providers", name)
        provider = problems.check(_reading, _parse_provider, where, name, raw, where)
        if provider is SKIPPED_SECTION or provider is o.INVALID:
            # Parsing it needed a file this machine lacks, or its problems
            # are already noted: connections may still name it without
            # reporting it missing as well.
            providers[name] = SkippedProvider(name, raw)
        else:
            providers[name] = provider

    known_addons = builtin_addons()
    connections = {}
    raw_connections = problems.check(o.mapping, document.get("connections") or {}, "connections")
    if raw_connections is not o.INVALID and not raw_connections:
        problems.add("connections", "is required: define at least one connection")
    for name, raw in (raw_connections if raw_connections is not o.INVALID else {}).items():
        where = join("connections", name)
        connection = problems.check(_reading, _parse_connection, where, name, raw, where, known_addons, providers)
        if connection is not o.INVALID and connection is not SKIPPED_SECTION:
            connections[name] = connection
    if gateway is not o.INVALID:
        for connection in connections.values():
            for spec in connection.addons:
                check = getattr(spec.factory, "check_gateway", None)
                if check is not None:
                    problems.check(check, spec.options, gateway, spec.path)
    listens = {}
    for connection in connections.values():
        other = listens.setdefault(connection.listen, connection.name)
        if other != connection.name:
            problems.add(
                join(join("connections", connection.name), "listen"),
                "the connection %r already listens on %s" % (other, connection.listen),
            )
    problems.done()
    digest = hashlib.sha256(yaml.safe_dump(document, sort_keys=True).encode()).hexdigest()
    return Config(
        path=path,
        gateway=gateway,
        identity_providers=providers,
        connections=connections,
        digest=digest,
    )


def _parse_provider(name, raw, where):
    raw = dict(o.mapping(raw, where))
    if "type" not in raw:
        # tpye: saml would otherwise parse as an oidc provider's unknown key.
        for key in raw:
            if o.suggest(key, ["type"]):
                raise ConfigError(join(where, key), "unknown key; did you mean type? (oidc when absent)")
    kind = o.choice(*sorted(IDENTITY_PROVIDERS))(raw.pop("type", "oidc"), join(where, "type"))
    return _load_module(IDENTITY_PROVIDERS[kind]).parse_provider(name, raw, where)


def _parse_gateway(raw):
    problems = o.Collector()
    gateway_raw = problems.check(o.parse_options, GATEWAY_OPTIONS, raw, "gateway")
    if gateway_raw is o.INVALID:
        # Go on into the store and admin sections, whose problems are worth
        # knowing in the same round.
        given = raw if isinstance(raw, dict) else {}
        gateway_raw = {
            key: given.get(key) if isinstance(given.get(key), dict) else default
            for key, default in (("store", {}), ("admin", None))
        }
    store = problems.check(
        lambda: StoreConfig(**o.parse_options(STORE_OPTIONS, gateway_raw["store"], "gateway.store"))
    )
    if store is not o.INVALID and not store.fsync:
        if store.durability == "write-ahead-fsync" and "durability" in gateway_raw["store"]:
            problems.add("gateway.store.fsync", "contradicts durability: write-ahead-fsync; remove fsync (deprecated)")
        else:
            # The deprecated switch: events are still synced, in the background.
            store = attr.evolve(store, durability="write-ahead")
    if store is not o.INVALID and store.backend == "postgres" and store.postgres is None:
        problems.add("gateway.store.postgres", "is required with backend postgres: give at least its dsn")
    admin = None
    if gateway_raw["admin"] is not None:
        admin = problems.check(o.parse_options, ADMIN_OPTIONS, gateway_raw["admin"], "gateway.admin")
        if admin is not o.INVALID:
            if bool(admin["tls_certificate"]) != bool(admin["tls_key"]):
                problems.add("gateway.admin", "give both tls_certificate and tls_key, or neither")
            elif not admin["tls_certificate"] and not _admin_on_loopback(admin["listen"]):
                problems.add(
                    "gateway.admin.listen",
                    "approvers' tokens must not cross the network in clear: give tls_certificate and tls_key, "
                    "or listen on loopback only (interface=127.0.0.1)",
                )
    if gateway_raw.get("witness") is not None and gateway_raw.get("signing_key") is None:
        problems.add("gateway.witness", "needs gateway.signing_key: the witness keeps the signed checkpoints")
    metrics = None
    if gateway_raw.get("metrics") is not None:
        metrics = problems.check(o.parse_options, METRICS_OPTIONS, gateway_raw["metrics"], "gateway.metrics")
    for name, listener in (("admin", admin), ("metrics", metrics)):
        if isinstance(listener, dict) and listener["reuse_port"]:
            from hoopgw import listeners

            problems.check(listeners.check, listener["listen"], "gateway." + name)
    refused = problems.check(refusals.parse, gateway_raw.get("refusals") or {}, "gateway.refusals")
    problems.done()
    return GatewayConfig(
        state_dir=gateway_raw["state_dir"],
        store=store,
        admin=admin,
        signing_key=gateway_raw["signing_key"],
        witness=gateway_raw["witness"],
        metrics=metrics,
        refusals=refused,
        export=gateway_raw["export"],
    )


def _admin_on_loopback(listen):
    return any(marker in listen for marker in ("interface=127.0.0.1", "interface=localhost", "interface=\\:\\:1"))


def load_skipping_files(path):
    """
    Check a file written for another host: L{load}, but the files, secret
    files and environment variables this machine lacks are noted instead
    of refused (what is read from a file while parsing cannot be checked).

    @return: C{(Config, [MissingFile, ...])}.
    @raise ConfigError: for every other problem.
    """
    skipped = []
    token = o._SKIPPED.set(skipped)
    try:
        return load(path), skipped
    finally:
        o._SKIPPED.reset(token)


# What a section that read a missing file parses to under --skip-files.
SKIPPED_SECTION = object()


@attr.s(frozen=True)
class SkippedProvider:
    """
    An identity provider of a file checked with --skip-files whose parsing
    needed a file this machine lacks: connections may name it, nothing can
    use it.
    """

    name = attr.ib()
    raw = attr.ib(eq=False, repr=False)

    CREDENTIALS = {"oidc": "jwt", "saml": "saml", "certificate": "certificate", "ldap": "directory"}

    @property
    def type(self):
        return self.raw.get("type", "oidc") if isinstance(self.raw, dict) else "oidc"

    @property
    def credential(self):
        return self.CREDENTIALS.get(self.type, "jwt")

    def build(self, reactor):
        raise ConfigError(
            join("identity_providers", self.name), "was skipped: a file it reads is not on this machine"
        )


def _reading(parse, where, *arguments):
    """
    C{parse(*arguments)}; a file it opens that is missing is reported as
    L{hoopgw.options.MissingFile} at C{where} (unless already noted), and
    L{SKIPPED_SECTION} returned, when files are skipped.
    """
    try:
        return parse(*arguments)
    except FileNotFoundError as error:
        skipped = o._SKIPPED.get()
        if skipped is None:
            raise
        if not any(str(error.filename) in noted.message for noted in skipped):
            skipped.append(o.MissingFile(where, "the file %s does not exist" % (error.filename,)))
        return SKIPPED_SECTION


def load(path):
    """
    Read and check the configuration file at C{path}, and that the secrets
    it names are there to read (files readable, environment variables set).

    @raise ConfigError: if it cannot be read, is not YAML, or is not valid.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError("", "cannot read the configuration file %s: %s" % (path, error.strerror))
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError("", "%s is not valid YAML: %s" % (path, error))
    # A file about to be used: its secrets must be there too.
    token = o._CHECK_SECRETS.set(True)
    try:
        return parse(document, path)
    finally:
        o._CHECK_SECRETS.reset(token)
