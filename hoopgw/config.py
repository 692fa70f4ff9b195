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
    o.Option("listen", o.string, o.REQUIRED, "A Twisted endpoint string for the admin and approvals HTTP API."),
    o.Option("tls_certificate", o.file_path, None, "PEM certificate for HTTPS on the admin listener."),
    o.Option("tls_key", o.file_path, None, "PEM private key for HTTPS on the admin listener."),
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
        o.string,
        o.REQUIRED,
        "A Twisted endpoint string for /metrics (Prometheus), /healthz and /readyz, such as "
        "tcp:9187:interface=127.0.0.1. Plain HTTP: keep it on loopback or a monitoring network.",
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


def _parse_connection(name, raw, path, known_addons, providers):
    raw = dict(o.mapping(raw, path))
    protocol = o.choice(*sorted(PROTOCOLS))(raw.pop("protocol", None), join(path, "protocol"))
    if "listen" not in raw:
        raise ConfigError(join(path, "listen"), "is required: a Twisted endpoint string such as tcp:15432:interface=127.0.0.1")
    listen = o.string(raw.pop("listen"), join(path, "listen"))
    allowed_groups = o.string_set(raw.pop("allowed_groups", []), join(path, "allowed_groups"))
    if not allowed_groups:
        raise ConfigError(
            join(path, "allowed_groups"),
            "is required: list the groups whose members may use this connection",
        )
    description = o.optional_string(raw.pop("description", None), join(path, "description")) or ""
    raw_addons = o.list_of(lambda value, where: value)(raw.pop("addons", None) or [], join(path, "addons"))
    addons = tuple(
        _parse_addon(entry, join(join(path, "addons"), index), known_addons)
        for index, entry in enumerate(raw_addons)
    )
    names = [spec.name for spec in addons]
    for spec in addons:
        if names.count(spec.name) > 1:
            raise ConfigError(join(path, "addons"), "the addon %r appears twice" % (spec.name,))
    settings = _load_module(PROTOCOLS[protocol]).parse_connection(raw, path, listen)
    connection = ConnectionConfig(
        name=name,
        protocol=protocol,
        listen=listen,
        allowed_groups=allowed_groups,
        addons=addons,
        settings=settings,
        description=description,
    )
    for spec in addons:
        check = getattr(spec.factory, "check_connection", None)
        if check is not None:
            check(spec.options, connection, providers, spec.path)
    return connection


def parse(document, path="<string>"):
    """
    Check a parsed YAML document.

    @return: a L{Config}.
    @raise ConfigError: naming the first bad key.
    """
    base = os.path.dirname(os.path.abspath(path)) if path != "<string>" else os.getcwd()
    token = o.relative_to(base)
    try:
        return _parse(document, path)
    finally:
        o._BASE_DIRECTORY.reset(token)


def _parse(document, path):
    document = o.mapping(document, "")
    unknown = sorted(set(document) - {"gateway", "identity_providers", "connections"})
    if unknown:
        raise ConfigError(unknown[0], "unknown section; expected gateway, identity_providers and connections")
    gateway_raw = o.parse_options(GATEWAY_OPTIONS, document.get("gateway"), "gateway")
    store = StoreConfig(**o.parse_options(STORE_OPTIONS, gateway_raw["store"], "gateway.store"))
    if not store.fsync:
        if store.durability == "write-ahead-fsync" and "durability" in gateway_raw["store"]:
            raise ConfigError("gateway.store.fsync", "contradicts durability: write-ahead-fsync; remove fsync (deprecated)")
        # The deprecated switch: events are still synced, in the background.
        store = attr.evolve(store, durability="write-ahead")
    if store.backend == "postgres" and store.postgres is None:
        raise ConfigError("gateway.store.postgres", "is required with backend postgres: give at least its dsn")
    admin = None
    if gateway_raw["admin"] is not None:
        admin = o.parse_options(ADMIN_OPTIONS, gateway_raw["admin"], "gateway.admin")
        if bool(admin["tls_certificate"]) != bool(admin["tls_key"]):
            raise ConfigError("gateway.admin", "give both tls_certificate and tls_key, or neither")
        if not admin["tls_certificate"] and not _admin_on_loopback(admin["listen"]):
            raise ConfigError(
                "gateway.admin.listen",
                "approvers' tokens must not cross the network in clear: give tls_certificate and tls_key, "
                "or listen on loopback only (interface=127.0.0.1)",
            )
    if gateway_raw["witness"] is not None and gateway_raw["signing_key"] is None:
        raise ConfigError("gateway.witness", "needs gateway.signing_key: the witness keeps the signed checkpoints")
    gateway = GatewayConfig(
        state_dir=gateway_raw["state_dir"],
        store=store,
        admin=admin,
        signing_key=gateway_raw["signing_key"],
        witness=gateway_raw["witness"],
        metrics=o.parse_options(METRICS_OPTIONS, gateway_raw["metrics"], "gateway.metrics")
        if gateway_raw["metrics"] is not None
        else None,
        refusals=refusals.parse(gateway_raw["refusals"], "gateway.refusals"),
    )

    providers = {}
    raw_providers = o.mapping(document.get("identity_providers") or {}, "identity_providers")
    for name, raw in raw_providers.items():
        where = join("identity_providers", name)
        raw = dict(o.mapping(raw, where))
        kind = o.choice(*sorted(IDENTITY_PROVIDERS))(raw.pop("type", "oidc"), join(where, "type"))
        providers[name] = _load_module(IDENTITY_PROVIDERS[kind]).parse_provider(name, raw, where)

    known_addons = builtin_addons()
    connections = {}
    raw_connections = o.mapping(document.get("connections") or {}, "connections")
    if not raw_connections:
        raise ConfigError("connections", "is required: define at least one connection")
    for name, raw in raw_connections.items():
        connections[name] = _parse_connection(name, raw, join("connections", name), known_addons, providers)
    for connection in connections.values():
        for spec in connection.addons:
            check = getattr(spec.factory, "check_gateway", None)
            if check is not None:
                check(spec.options, gateway, spec.path)
    listens = {}
    for connection in connections.values():
        other = listens.setdefault(connection.listen, connection.name)
        if other != connection.name:
            raise ConfigError(
                join(join("connections", connection.name), "listen"),
                "the connection %r already listens on %s" % (other, connection.listen),
            )
    digest = hashlib.sha256(yaml.safe_dump(document, sort_keys=True).encode()).hexdigest()
    return Config(
        path=path,
        gateway=gateway,
        identity_providers=providers,
        connections=connections,
        digest=digest,
    )


def _admin_on_loopback(listen):
    return any(marker in listen for marker in ("interface=127.0.0.1", "interface=localhost", "interface=\\:\\:1"))


def load(path):
    """
    Read and check the configuration file at C{path}.

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
    return parse(document, path)
