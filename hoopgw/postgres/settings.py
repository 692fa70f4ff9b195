"""
A PostgreSQL connection's settings: the TLS the gateway offers clients, and
the target database with the credentials only the gateway holds.
"""

import attr

from hoopgw import options as o
from hoopgw.options import ConfigError, join


TLS_MODES = ("disable", "require", "verify-ca", "verify-full")

TARGET_OPTIONS = (
    o.Option("host", o.string, o.REQUIRED, "The target database server's host name or address."),
    o.Option("port", o.integer(1, 65535), 5432, "Its port."),
    o.Option("database", o.string, o.REQUIRED, "The one database this connection serves."),
    o.Option("user", o.string, o.REQUIRED, "The role the gateway logs in as."),
    o.Option(
        "password",
        o.secret,
        None,
        "Where that role's password is: {file: PATH} or {env: VARIABLE}. Clients never see it.",
    ),
    o.Option(
        "tls",
        o.choice(*TLS_MODES),
        "verify-full",
        "TLS to the target, as libpq's sslmode: disable, require, verify-ca or verify-full.",
    ),
    o.Option("ca", o.file_path, None, "The CA certificate the target's certificate must chain to."),
    o.Option("server_name", o.string, None, "The name to check the target's certificate for (default: host)."),
    o.Option(
        "connect_timeout",
        o.duration,
        10.0,
        "How long the gateway waits for the target's session: TCP, TLS, authentication and the first "
        "ReadyForQuery together.",
    ),
    o.Option(
        "max_scram_iterations",
        o.integer(minimum=4096),
        100000,
        "The largest SCRAM-SHA-256 iteration count the gateway computes for the target; a target asking "
        "for more is refused (PostgreSQL's default is 4096).",
    ),
)

CONNECTION_OPTIONS = (
    o.Option("target", o.mapping, o.REQUIRED, "The database behind this connection."),
    o.Option("tls", o.mapping, None, "TLS for clients: certificate, key and optionally client_ca."),
    o.Option(
        "allow_plaintext_password",
        o.boolean,
        False,
        "Accept tokens over a connection without TLS. For development on loopback only: "
        "the listen endpoint must then be bound to 127.0.0.1 or ::1.",
    ),
    o.Option(
        "max_message_bytes",
        o.integer(minimum=1024),
        64 * 1024 * 1024,
        "The largest protocol message accepted from a client or the target.",
    ),
    o.Option(
        "startup_timeout",
        o.duration,
        60.0,
        "How long a client has from connecting until it is logged in (encryption negotiated, "
        "startup packet and token sent, the chain's answer given), as PostgreSQL's "
        "authentication_timeout. Past it the client gets FATAL 57014 and is disconnected.",
    ),
    o.Option(
        "max_unauthenticated",
        o.integer(minimum=1),
        100,
        "How many connections of this listener may be open and not yet logged in at once. "
        "One more is answered FATAL 53300 at once and disconnected.",
    ),
    o.Option(
        "max_unauthenticated_per_source",
        o.integer(minimum=1),
        10,
        "How many of those may come from one client address.",
    ),
    o.Option(
        "max_startup_bytes",
        o.integer(minimum=64, maximum=10000),
        10000,
        "The largest startup packet accepted (PostgreSQL's own limit is 10,000 bytes).",
    ),
)


@attr.s(frozen=True)
class Target:
    host = attr.ib()
    port = attr.ib()
    database = attr.ib()
    user = attr.ib()
    password = attr.ib(repr=False)
    tls = attr.ib()
    ca = attr.ib()
    server_name = attr.ib()
    connect_timeout = attr.ib()
    max_scram_iterations = attr.ib(default=100000)


@attr.s(frozen=True)
class PostgresSettings:
    target = attr.ib()
    tls = attr.ib()
    allow_plaintext_password = attr.ib()
    max_message_bytes = attr.ib()
    startup_timeout = attr.ib(default=60.0)
    max_unauthenticated = attr.ib(default=100)
    max_unauthenticated_per_source = attr.ib(default=10)
    max_startup_bytes = attr.ib(default=10000)

    @property
    def target_name(self):
        return "postgresql://%s@%s:%d/%s" % (self.target.user, self.target.host, self.target.port, self.target.database)


def _is_loopback(listen):
    """
    Whether a listen endpoint string only accepts local clients.
    """
    if listen.startswith("unix:"):
        return True
    return any(
        marker in listen for marker in ("interface=127.0.0.1", "interface=localhost", "interface=\\:\\:1")
    )


def parse_connection(raw, path, listen):
    values = o.parse_options(CONNECTION_OPTIONS, raw, path)
    target = Target(**o.parse_options(TARGET_OPTIONS, values["target"], join(path, "target")))
    if target.tls in ("verify-ca", "verify-full") and target.ca is None:
        raise ConfigError(
            join(join(path, "target"), "ca"),
            "is required when tls is %s: the CA the target's certificate is checked against" % (target.tls,),
        )
    if values["startup_timeout"] <= 0:
        raise ConfigError(join(path, "startup_timeout"), "must be more than 0 seconds (PostgreSQL's default is 60s)")
    tls = None
    if values["tls"] is not None:
        tls = o.client_tls(values["tls"], path)
    if tls is None and not values["allow_plaintext_password"]:
        raise ConfigError(
            join(path, "tls"),
            "is required: clients send their token as a password, which must not cross the network in clear "
            "(set allow_plaintext_password: true for loopback development only)",
        )
    if values["allow_plaintext_password"] and not _is_loopback(listen):
        raise ConfigError(
            join(path, "allow_plaintext_password"),
            "is only allowed when the connection listens on loopback (interface=127.0.0.1 or ::1)",
        )
    return PostgresSettings(
        target=target,
        tls=tls,
        allow_plaintext_password=values["allow_plaintext_password"],
        max_message_bytes=values["max_message_bytes"],
        startup_timeout=values["startup_timeout"],
        max_unauthenticated=values["max_unauthenticated"],
        max_unauthenticated_per_source=values["max_unauthenticated_per_source"],
        max_startup_bytes=values["max_startup_bytes"],
    )
