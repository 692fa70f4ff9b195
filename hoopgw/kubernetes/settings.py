"""
A Kubernetes connection's settings: where the gateway listens and with
which certificate, the API server behind it, and the credential only the
gateway holds (a bearer token or a client certificate).
"""

import re
from urllib.parse import urlsplit

import attr

from hoopgw import options as o
from hoopgw.options import ConfigError, join


IMPERSONATE_OPTIONS = (
    o.Option(
        "user_prefix",
        o.string,
        "",
        "Put before the identity's subject in Impersonate-User (for instance 'hoopgw:').",
    ),
    o.Option(
        "groups",
        o.boolean,
        True,
        "Also send the identity's groups as Impersonate-Group headers.",
    ),
)

TARGET_OPTIONS = (
    o.Option("server", o.string, o.REQUIRED, "The API server's URL, https://HOST:PORT."),
    o.Option("ca", o.file_path, None, "The CA certificate the API server's certificate must chain to."),
    o.Option(
        "server_name",
        o.string,
        None,
        "The name to check the API server's certificate for (default: the host of server).",
    ),
    o.Option(
        "token",
        o.secret,
        None,
        "Where the gateway's own bearer token for the API server is: {file: PATH} or {env: VARIABLE}. "
        "Read at each request, so a rotated token is picked up. Clients never see it.",
    ),
    o.Option("client_certificate", o.file_path, None, "A PEM client certificate the gateway presents to the API server."),
    o.Option("client_key", o.file_path, None, "The PEM private key of that client certificate."),
    o.Option(
        "insecure_skip_verify",
        o.boolean,
        False,
        "Do not check the API server's certificate. For throwaway clusters only; never in production.",
    ),
    o.Option(
        "impersonate",
        o.mapping,
        None,
        "Send Impersonate-User (and Impersonate-Group) headers naming the client's identity, so the API "
        "server's RBAC and audit see the real service identity (the gateway's credential needs the "
        "'impersonate' verb). Off when absent.",
    ),
)

CONNECTION_OPTIONS = (
    o.Option("target", o.mapping, o.REQUIRED, "The Kubernetes API server behind this connection."),
    o.Option("tls", o.mapping, o.REQUIRED, "TLS for clients: certificate, key and optionally client_ca."),
    o.Option(
        "max_body_bytes",
        o.integer(minimum=1024),
        64 * 1024 * 1024,
        "The largest request or (non-streamed) response body the gateway accepts.",
    ),
    o.Option(
        "tls_handshake_timeout",
        o.duration,
        10.0,
        "How long a client may take to complete its TLS handshake; then its connection is closed and the "
        "attempt recorded.",
    ),
    o.Option(
        "login_timeout",
        o.duration,
        60.0,
        "How long a client connection may stay open without a request the chain let in (a valid token or "
        "certificate); then it is closed and the attempt recorded.",
    ),
    o.Option(
        "max_unauthenticated",
        o.integer(minimum=1),
        100,
        "How many client connections may be open at once without a request the chain let in; more are "
        "closed at once (before TLS) and recorded.",
    ),
    o.Option(
        "max_unauthenticated_per_source",
        o.integer(minimum=1),
        20,
        "How many of those may come from one source address.",
    ),
    o.Option(
        "saml_header",
        o.optional_string,
        "X-Hoopgw-Saml",
        "The request header a client may carry a base64 SAML assertion in, for the identity addon's SAML "
        "providers (an assertion also works as the bearer token). Never forwarded to the API server. "
        "null turns the header off.",
    ),
)

# An HTTP field name (RFC 9110 token).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

_LISTEN = re.compile(r"^tcp:(?P<port>\d+)(?::interface=(?P<interface>[^:]+))?$")


@attr.s(frozen=True)
class Impersonation:
    user_prefix = attr.ib()
    groups = attr.ib()


@attr.s(frozen=True, repr=False)
class Target:
    server = attr.ib()
    host = attr.ib()
    port = attr.ib()
    ca = attr.ib()
    server_name = attr.ib()
    token = attr.ib()
    client_certificate = attr.ib()
    client_key = attr.ib()
    insecure_skip_verify = attr.ib()
    impersonate = attr.ib()

    def __repr__(self):
        return "<Target %s>" % (self.server,)


@attr.s(frozen=True)
class KubernetesSettings:
    """
    @ivar listen_host: the address mitmproxy listens on.
    @ivar listen_port: its port.
    """

    target = attr.ib()
    tls = attr.ib()
    listen_host = attr.ib()
    listen_port = attr.ib()
    max_body_bytes = attr.ib()
    saml_header = attr.ib(default=None)
    tls_handshake_timeout = attr.ib(default=10.0)
    login_timeout = attr.ib(default=60.0)
    max_unauthenticated = attr.ib(default=100)
    max_unauthenticated_per_source = attr.ib(default=20)

    @property
    def target_name(self):
        return self.target.server

    @property
    def mode(self):
        """
        The mitmproxy mode of this connection: a reverse proxy to the API
        server, listening where the connection says.
        """
        return "reverse:https://%s:%d@%s:%d" % (
            _bracket(self.target.host),
            self.target.port,
            _bracket(self.listen_host),
            self.listen_port,
        )


def _bracket(host):
    return "[%s]" % (host,) if ":" in host else host


def parse_listen(listen, path):
    """
    The host and port of a C{tcp:PORT[:interface=HOST]} endpoint string:
    mitmproxy listens itself, so only plain TCP endpoints are accepted.
    """
    match = _LISTEN.match(listen)
    if match is None:
        raise ConfigError(
            join(path, "listen"),
            "a Kubernetes connection listens on a plain TCP endpoint such as tcp:16443:interface=127.0.0.1 "
            "(the gateway does TLS itself with tls.certificate), not %r" % (listen,),
        )
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise ConfigError(join(path, "listen"), "the port must be between 1 and 65535, not %d" % (port,))
    return (match.group("interface") or "0.0.0.0").replace("\\:", ":"), port


def parse_connection(raw, path, listen):
    values = o.parse_options(CONNECTION_OPTIONS, raw, path)
    target_path = join(path, "target")
    target_values = o.parse_options(TARGET_OPTIONS, values["target"], target_path)
    url = urlsplit(target_values["server"])
    if url.scheme != "https" or not url.hostname:
        raise ConfigError(
            join(target_path, "server"),
            "expected the API server's URL as https://HOST:PORT, got %r" % (target_values["server"],),
        )
    if url.path not in ("", "/") or url.query:
        raise ConfigError(join(target_path, "server"), "give the API server's URL without a path or query")
    if target_values["ca"] is None and not target_values["insecure_skip_verify"]:
        raise ConfigError(
            join(target_path, "ca"),
            "is required: the CA the API server's certificate is checked against "
            "(or insecure_skip_verify: true for a throwaway cluster)",
        )
    if bool(target_values["client_certificate"]) != bool(target_values["client_key"]):
        raise ConfigError(target_path, "give both client_certificate and client_key, or neither")
    if target_values["token"] is None and target_values["client_certificate"] is None:
        raise ConfigError(
            target_path,
            "the gateway needs its own credential for the API server: token ({file: PATH} or {env: VARIABLE}) "
            "or client_certificate and client_key",
        )
    impersonate = None
    if target_values["impersonate"] is not None:
        impersonate = Impersonation(
            **o.parse_options(IMPERSONATE_OPTIONS, target_values["impersonate"], join(target_path, "impersonate"))
        )
    target = Target(
        server="https://%s:%d" % (_bracket(url.hostname), url.port or 443),
        host=url.hostname,
        port=url.port or 443,
        ca=target_values["ca"],
        server_name=target_values["server_name"],
        token=target_values["token"],
        client_certificate=target_values["client_certificate"],
        client_key=target_values["client_key"],
        insecure_skip_verify=target_values["insecure_skip_verify"],
        impersonate=impersonate,
    )
    tls = o.client_tls(values["tls"], path)
    host, port = parse_listen(listen, path)
    saml_header = values["saml_header"]
    if saml_header is not None and not _HEADER_NAME.match(saml_header):
        raise ConfigError(join(path, "saml_header"), "%r is not an HTTP header name; use letters, digits and dashes" % (saml_header,))
    if saml_header is not None and (saml_header.lower() in ("authorization", "proxy-authorization", "cookie")
                                    or saml_header.lower().startswith("impersonate-")):
        raise ConfigError(join(path, "saml_header"), "choose a header of its own, such as X-Hoopgw-Saml, not %r" % (saml_header,))
    return KubernetesSettings(
        target=target,
        tls=tls,
        listen_host=host,
        listen_port=port,
        max_body_bytes=values["max_body_bytes"],
        saml_header=saml_header,
        tls_handshake_timeout=values["tls_handshake_timeout"],
        login_timeout=values["login_timeout"],
        max_unauthenticated=values["max_unauthenticated"],
        max_unauthenticated_per_source=values["max_unauthenticated_per_source"],
    )
