"""
An SSH connection's settings: the target host (the gateway's own key for
it and its pinned host key), the logins clients may ask for, which
channels are allowed, and the public keys and certificate authorities
that prove who a client is.
"""

import fnmatch

import attr

from hoopgw import cast
from hoopgw import options as o
from hoopgw.model import HUMAN, SERVICE
from hoopgw.options import ConfigError, join
from hoopgw.ssh.publickeys import KeyLineError, fingerprint, is_fingerprint, parse_public_key


SHELL_MODES = ("none", "humans", "all")


def _public_key(value, path):
    try:
        return parse_public_key(o.string(value, path))
    except KeyLineError as error:
        raise ConfigError(path, str(error))


def _host_key_pins(value, path):
    """
    One public key line or a list of them: the target's host keys.
    """
    if isinstance(value, str):
        value = [value]
    lines = o.list_of(_public_key)(value, path)
    if not lines:
        raise ConfigError(path, "list at least one of the target's host keys (ssh-keyscan prints them)")
    return tuple(blob for _, blob, _ in lines)


def _key_or_fingerprint(value, path):
    """
    A client key: a public key line or its SHA256 fingerprint.
    """
    text = o.string(value, path).strip()
    if text.startswith("SHA256:"):
        if not is_fingerprint(text):
            raise ConfigError(path, "not a SHA256 fingerprint as ssh-keygen -l prints it (SHA256: and 43 characters)")
        return text
    _, blob, _ = _public_key(text, path)
    return fingerprint(blob)


TARGET_OPTIONS = (
    o.Option("host", o.string, o.REQUIRED, "The target SSH server's host name or address."),
    o.Option("port", o.integer(1, 65535), 22, "Its port."),
    o.Option(
        "key",
        o.secret,
        o.REQUIRED,
        "Where the gateway's own private key for the target is: {file: PATH} or {env: VARIABLE}. "
        "Clients never see it; its public half goes into the target's authorized_keys.",
    ),
    o.Option(
        "host_key",
        _host_key_pins,
        o.REQUIRED,
        "The target's host key as a public key line ('ssh-ed25519 AAAA...'), or a list of them. "
        "A target presenting any other key is refused.",
    ),
    o.Option("connect_timeout", o.duration, 10.0, "How long to wait for the target (connection and handshake)."),
)

IDENTITY_OPTIONS = (
    o.Option("subject", o.string, o.REQUIRED, "The identity these keys prove."),
    o.Option("kind", o.choice(SERVICE, HUMAN), SERVICE, "Whether it is a service or a human."),
    o.Option("groups", o.string_list, [], "The groups it belongs to."),
    o.Option(
        "keys",
        o.list_of(_key_or_fingerprint),
        o.REQUIRED,
        "Its public keys: OpenSSH public key lines or SHA256 fingerprints.",
    ),
)

PRINCIPAL_OPTIONS = (
    o.Option("kind", o.choice(SERVICE, HUMAN), SERVICE, "Whether this principal is a service or a human."),
    o.Option("groups", o.string_list, [], "The groups it belongs to."),
)

AUTHORITY_OPTIONS = (
    o.Option("name", o.string, o.REQUIRED, "A name for the record."),
    o.Option("public_key", _public_key, None, "The CA's public key line (what ssh-keygen -s was given, .pub)."),
    o.Option("public_key_file", o.file_path, None, "Or a file holding that line."),
    o.Option(
        "principals",
        o.mapping,
        o.REQUIRED,
        "Which certificate principals are identities here: principal name -> {kind, groups}. "
        "A certificate must name exactly one of them.",
    ),
    o.Option(
        "max_validity",
        o.duration,
        None,
        "Refuse certificates valid for longer than this (valid_before - valid_after), such as 12h.",
    ),
)

CONNECTION_OPTIONS = (
    o.Option("target", o.mapping, o.REQUIRED, "The SSH server behind this connection."),
    o.Option(
        "allowed_logins",
        o.string_list,
        o.REQUIRED,
        "The logins on the target clients may ask for (the user name they give: ssh LOGIN@gateway).",
    ),
    o.Option(
        "host_keys",
        o.list_of(o.secret),
        [],
        "The gateway's own host keys for clients ({file: PATH} each). When empty, an Ed25519 key is "
        "generated once into the gateway's state folder and reused.",
    ),
    o.Option(
        "shell",
        o.choice(*SHELL_MODES),
        "humans",
        "Interactive shells: 'none', 'humans' (human identities only: PCI DSS 8.6.1 keeps service "
        "accounts non-interactive) or 'all'. Exec commands are always subject to the chain.",
    ),
    o.Option("sftp", o.boolean, False, "Allow the sftp subsystem (also what scp uses by default since OpenSSH 9)."),
    o.Option(
        "port_forwarding",
        o.boolean,
        False,
        "Allow local port forwarding (ssh -L, -W) to go through the target, each as a command. "
        "Refused and recorded when off. Remote forwarding, agent and X11 forwarding are always refused.",
    ),
    o.Option(
        "forward_env",
        o.string_list,
        ["LANG", "LC_*"],
        "Environment variables (patterns) passed from the client to the target; others are dropped.",
    ),
    o.Option("identities", o.list_of(o.mapping), [], "Identities proven by public keys: subject, kind, groups, keys."),
    o.Option(
        "certificate_authorities",
        o.list_of(o.mapping),
        [],
        "OpenSSH certificate authorities whose user certificates prove identities: name, public_key, principals.",
    ),
    o.Option(
        "login_timeout",
        o.duration,
        120.0,
        "How long a client connection may take from its first byte to a successful login (key exchange "
        "included), like OpenSSH's LoginGraceTime; then it is disconnected and the attempt recorded.",
    ),
    o.Option(
        "max_auth_tries",
        o.integer(minimum=1),
        6,
        "How many failed authentication attempts one client connection may make (each key offered that "
        "is not registered counts), like OpenSSH's MaxAuthTries; the last one disconnects it.",
    ),
    o.Option(
        "max_unauthenticated",
        o.integer(minimum=1),
        100,
        "How many client connections may be open at once without having logged in; more are refused "
        "(disconnected with a message) and recorded.",
    ),
    o.Option(
        "max_unauthenticated_per_source",
        o.integer(minimum=1),
        20,
        "How many of those may come from one source address.",
    ),
    o.Option(
        "max_cast_bytes",
        o.integer(minimum=0),
        cast.DEFAULT_LIMIT,
        "The most terminal output and input one shell recording keeps; beyond it the recording notes the cut.",
    ),
)


@attr.s(frozen=True)
class Target:
    host = attr.ib()
    port = attr.ib()
    key = attr.ib(repr=False)
    host_key = attr.ib()
    connect_timeout = attr.ib()


@attr.s(frozen=True)
class RegisteredKey:
    """
    A public key registered for an identity.
    """

    subject = attr.ib()
    kind = attr.ib()
    groups = attr.ib(converter=frozenset)


@attr.s(frozen=True)
class Authority:
    """
    A certificate authority and the principals it may vouch for.
    """

    name = attr.ib()
    key = attr.ib(repr=False)
    principals = attr.ib()
    max_validity = attr.ib()

    @property
    def fingerprint(self):
        return fingerprint(self.key)


@attr.s(frozen=True)
class SSHSettings:
    target = attr.ib()
    allowed_logins = attr.ib(converter=frozenset)
    host_keys = attr.ib()
    shell = attr.ib()
    sftp = attr.ib()
    port_forwarding = attr.ib()
    forward_env = attr.ib()
    keys = attr.ib()
    authorities = attr.ib()
    login_timeout = attr.ib()
    max_cast_bytes = attr.ib()
    max_auth_tries = attr.ib(default=6)
    max_unauthenticated = attr.ib(default=100)
    max_unauthenticated_per_source = attr.ib(default=20)

    @property
    def target_name(self):
        return "ssh://%s:%d" % (self.target.host, self.target.port)

    def target_for(self, login):
        return "ssh://%s@%s:%d" % (login, self.target.host, self.target.port)

    @property
    def proves_identities(self):
        """
        Whether clients can prove who they are with keys or certificates
        registered here, without a token issuer.
        """
        return bool(self.keys or self.authorities)

    def forwards_env(self, name):
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.forward_env)

    def shell_allowed(self, identity):
        if self.shell == "all":
            return True
        return self.shell == "humans" and identity.kind == HUMAN


def _parse_identities(raw, path):
    registered = {}
    for index, entry in enumerate(raw):
        where = join(path, index)
        values = o.parse_options(IDENTITY_OPTIONS, entry, where)
        if not values["keys"]:
            raise ConfigError(join(where, "keys"), "list at least one key")
        key = RegisteredKey(values["subject"], values["kind"], values["groups"])
        for position, print_ in enumerate(values["keys"]):
            other = registered.get(print_)
            if other is not None and other != key:
                raise ConfigError(
                    join(join(where, "keys"), position),
                    "this key is already registered for %r; a key proves one identity" % (other.subject,),
                )
            registered[print_] = key
    return registered


def _parse_authorities(raw, path):
    authorities = {}
    for index, entry in enumerate(raw):
        where = join(path, index)
        values = o.parse_options(AUTHORITY_OPTIONS, entry, where)
        if (values["public_key"] is None) == (values["public_key_file"] is None):
            raise ConfigError(where, "give exactly one of public_key or public_key_file")
        if values["public_key"] is not None:
            _, blob, _ = values["public_key"]
        else:
            with open(values["public_key_file"], encoding="utf-8") as handle:
                _, blob, _ = _public_key(handle.read(), join(where, "public_key_file"))
        principals = {}
        for name, settings in values["principals"].items():
            principal = o.parse_options(PRINCIPAL_OPTIONS, settings, join(join(where, "principals"), name))
            principals[name] = RegisteredKey(name, principal["kind"], principal["groups"])
        if not principals:
            raise ConfigError(join(where, "principals"), "list at least one principal")
        authority = Authority(values["name"], blob, principals, values["max_validity"])
        if authority.fingerprint in authorities:
            raise ConfigError(where, "this CA key is listed twice")
        authorities[authority.fingerprint] = authority
    return authorities


def parse_connection(raw, path, listen):
    values = o.parse_options(CONNECTION_OPTIONS, raw, path)
    target = Target(**o.parse_options(TARGET_OPTIONS, values["target"], join(path, "target")))
    if not values["allowed_logins"]:
        raise ConfigError(join(path, "allowed_logins"), "list at least one login on the target")
    keys = _parse_identities(values["identities"], join(path, "identities"))
    authorities = _parse_authorities(values["certificate_authorities"], join(path, "certificate_authorities"))
    return SSHSettings(
        target=target,
        allowed_logins=values["allowed_logins"],
        host_keys=tuple(values["host_keys"]),
        shell=values["shell"],
        sftp=values["sftp"],
        port_forwarding=values["port_forwarding"],
        forward_env=tuple(values["forward_env"]),
        keys=keys,
        authorities=authorities,
        login_timeout=values["login_timeout"],
        max_cast_bytes=values["max_cast_bytes"],
        max_auth_tries=values["max_auth_tries"],
        max_unauthenticated=values["max_unauthenticated"],
        max_unauthenticated_per_source=values["max_unauthenticated_per_source"],
    )
