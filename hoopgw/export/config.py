"""
The C{gateway.export} section: one entry per sink, by name, each checked
against the options of its type.
"""

import re
import socket
from urllib.parse import urlsplit

import attr

from hoopgw import options as o
from hoopgw.options import ConfigError, join


def _positive_duration(value, path):
    seconds = o.duration(value, path)
    if seconds <= 0:
        raise ConfigError(path, "give a duration above zero, such as 30s")
    return seconds


def _optional_list(value, path):
    return tuple(o.string_list(value, path)) if value is not None else None


def _sink_name(name, path):
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
        raise ConfigError(path, "a sink's name is letters, digits, '.', '_' and '-' (it names its cursor file)")
    return name


COMMON_OPTIONS = (
    o.Option("type", o.choice("syslog", "https", "file"), o.REQUIRED, "The kind of sink: syslog, https or file."),
    o.Option(
        "format",
        o.choice("native", "ocsf"),
        "native",
        "native: each event exactly as the store holds it (with its seq and hash); ocsf: an OCSF 1.3.0 document.",
    ),
    o.Option(
        "events",
        _optional_list,
        None,
        "Only events of these types (shell patterns such as 'session.*'); all when absent.",
    ),
    o.Option(
        "connections",
        _optional_list,
        None,
        "Only events of these connections (and the gateway's own events, which belong to none); all when absent.",
    ),
    o.Option(
        "fields",
        _optional_list,
        None,
        "Send only these top-level fields of each event (seq, ts, type, prev and hash are always sent); all when absent.",
    ),
    o.Option("batch_size", o.integer(minimum=1, maximum=10000), 500, "At most this many events per delivery."),
    o.Option(
        "poll_interval", _positive_duration, 1.0, "How often the sink looks for new durable events when it is idle."
    ),
    o.Option("retry_initial", _positive_duration, 1.0, "The first wait after a failed delivery; it doubles after each failure."),
    o.Option("retry_max", _positive_duration, 30.0, "The longest wait between two attempts."),
    o.Option(
        "max_lag_events",
        o.integer(minimum=1),
        10000,
        "Record export.lagging when more than this many events of the record are not yet delivered.",
    ),
    o.Option(
        "max_lag",
        _positive_duration,
        300.0,
        "Record export.lagging when the oldest event not yet delivered is older than this.",
    ),
    o.Option(
        "start",
        o.choice("beginning", "end"),
        "beginning",
        "Where a sink without a cursor starts: the record's first event, or the events after its current end.",
    ),
)

SYSLOG_OPTIONS = (
    o.Option("host", o.string, o.REQUIRED, "The syslog collector's host name or address."),
    o.Option("port", o.integer(minimum=1, maximum=65535), None, "Its port (6514 for tls, 514 for tcp and udp)."),
    o.Option(
        "transport",
        o.choice("tls", "tcp", "udp"),
        "tls",
        "tls: RFC 5425 (RFC 5424 messages, octet-counted, over TLS); tcp: the same without TLS (loopback or "
        "trusted networks only); udp: RFC 3164 messages over UDP, no delivery guarantee.",
    ),
    o.Option("ca", o.file_path, None, "PEM CA certificate(s) the collector's certificate must chain to (tls; required)."),
    o.Option("certificate", o.file_path, None, "PEM client certificate, for a collector that asks for one (mutual TLS)."),
    o.Option("key", o.file_path, None, "The PEM private key of that client certificate."),
    o.Option("server_name", o.string, None, "The name the collector's certificate must carry (default: host)."),
    o.Option(
        "facility",
        o.choice(*sorted(["kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
                          "ftp", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7"])),
        "authpriv",
        "The syslog facility of the messages.",
    ),
    o.Option("app_name", o.string, "hoopgw", "The APP-NAME of the messages."),
    o.Option("hostname", o.string, None, "The HOSTNAME of the messages (default: this machine's name)."),
    o.Option("timeout", _positive_duration, 30.0, "Give up a delivery (and retry it later) after this long."),
)

HTTPS_OPTIONS = (
    o.Option("url", o.string, o.REQUIRED, "Where batches are POSTed: an https:// URL (http:// only to loopback)."),
    o.Option(
        "preset",
        o.choice("json", "splunk-hec"),
        "json",
        "json: a JSON array of documents per POST; splunk-hec: Splunk HTTP Event Collector events, one JSON object "
        "after another, with 'Authorization: Splunk TOKEN'.",
    ),
    o.Option("token", o.secret, None, "A bearer token ({file: PATH} or {env: VARIABLE}); sent as 'Bearer TOKEN' (json)."),
    o.Option("ca", o.file_path, None, "PEM CA certificate(s) the collector's certificate must chain to (default: the system's)."),
    o.Option("certificate", o.file_path, None, "PEM client certificate for mutual TLS."),
    o.Option("key", o.file_path, None, "The PEM private key of that client certificate."),
    o.Option("index", o.string, None, "splunk-hec: the index events go to (the token's default when absent)."),
    o.Option("sourcetype", o.string, None, "splunk-hec: the sourcetype (default: hoopgw:native or hoopgw:ocsf)."),
    o.Option("timeout", _positive_duration, 30.0, "Give up a POST (and retry it later) after this long."),
)

FILE_OPTIONS = (
    o.Option("path", o.string, o.REQUIRED, "The JSON-lines file, relative to the configuration file."),
    o.Option("max_bytes", o.integer(minimum=4096), 100 * 1024 * 1024, "Rotate the file once it is this large."),
    o.Option("backups", o.integer(minimum=0, maximum=1000), 5, "How many rotated files (PATH.1, PATH.2, ...) are kept."),
    o.Option("fsync", o.boolean, True, "Make each batch durable before the cursor moves past it."),
)

TYPE_OPTIONS = {"syslog": SYSLOG_OPTIONS, "https": HTTPS_OPTIONS, "file": FILE_OPTIONS}
FACILITIES = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7, "uucp": 8, "cron": 9,
    "authpriv": 10, "ftp": 11, "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20, "local5": 21,
    "local6": 22, "local7": 23,
}


@attr.s(frozen=True)
class SinkConfig:
    """
    One sink: its name, the options every sink has, and those of its type.
    """

    name = attr.ib()
    type = attr.ib()
    common = attr.ib()
    options = attr.ib()

    def __getattr__(self, name):
        # Options read as attributes: sink.batch_size, sink.url.
        for table in ("common", "options"):
            values = object.__getattribute__(self, table)
            if name in values:
                return values[name]
        raise AttributeError(name)


def parse_export(raw, path):
    """
    C{gateway.export}: a mapping of sink name to its options.

    @return: a tuple of L{SinkConfig}.
    """
    raw = o.mapping(raw or {}, path)
    sinks = []
    for name, entry in raw.items():
        where = join(path, name)
        _sink_name(str(name), where)
        entry = dict(o.mapping(entry, where))
        common_names = {option.name for option in COMMON_OPTIONS}
        kind = o.choice("syslog", "https", "file")(entry.get("type"), join(where, "type")) if "type" in entry else None
        if kind is None:
            raise ConfigError(join(where, "type"), "is required: syslog, https or file")
        common = o.parse_options(COMMON_OPTIONS, {k: v for k, v in entry.items() if k in common_names}, where)
        specific = o.parse_options(TYPE_OPTIONS[kind], {k: v for k, v in entry.items() if k not in common_names}, where)
        _check(kind, specific, where)
        if common["retry_max"] < common["retry_initial"]:
            raise ConfigError(join(where, "retry_max"), "must not be shorter than retry_initial")
        sinks.append(SinkConfig(name=str(name), type=kind, common=common, options=specific))
    return tuple(sinks)


def _check(kind, options, where):
    if bool(options.get("certificate")) != bool(options.get("key")):
        raise ConfigError(where, "give both certificate and key, or neither")
    if kind == "syslog":
        if options["port"] is None:
            options["port"] = 6514 if options["transport"] == "tls" else 514
        if options["transport"] == "tls" and not options["ca"]:
            raise ConfigError(
                join(where, "ca"), "is required with transport tls: the collector's certificate is checked against it"
            )
        if options["hostname"] is None:
            options["hostname"] = socket.gethostname()
        if options["server_name"] is None:
            options["server_name"] = options["host"]
    elif kind == "https":
        url = urlsplit(options["url"])
        if url.scheme not in ("https", "http") or not url.hostname:
            raise ConfigError(join(where, "url"), "give an https:// URL, such as https://siem.example:8088/services/collector")
        if url.scheme == "http" and url.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ConfigError(
                join(where, "url"), "events must not cross the network in clear: use https:// (http:// only to loopback)"
            )
    elif kind == "file":
        options["path"] = o.resolve(options["path"])


def warnings(sink):
    """
    What C{hoopgw check-config} should say of a sink that works but whose
    events the SIEM side cannot verify.
    """
    import fnmatch

    found = []
    if sink.fields is not None:
        found.append("fields cuts each event down: the exported events no longer match their hashes")
    if sink.events is not None and not any(fnmatch.fnmatchcase("checkpoint", pattern) for pattern in sink.events):
        found.append("events leaves out checkpoints: the exported events cannot be checked against a signature")
    return found
