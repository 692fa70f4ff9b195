"""
Declared options and the small validators the configuration is checked
with.  Every validator takes the raw value and its key path, and either
returns the value to use or raises L{ConfigError} naming the path.
"""

import contextvars
import difflib
import os
import re

import attr


class ConfigError(Exception):
    """
    The configuration is not usable.  C{str()} gives the key path and a
    sentence saying what is expected.
    """

    def __init__(self, path, message):
        Exception.__init__(self, path, message)
        self.path = path
        self.message = message

    def __str__(self):
        if self.path:
            return "%s: %s" % (self.path, self.message)
        return self.message


class MissingFile(ConfigError):
    """
    A file or secret the configuration names is not on this machine (or
    an environment variable is not set): C{check-config --skip-files}
    checks everything else of a file meant for another host.
    """


class ConfigErrors(ConfigError):
    """
    Several problems found at once, so that an operator fixes them in one
    round.  It is a L{ConfigError} (its C{path} and C{message} are the
    first problem's), and C{str()} gives one line a problem.

    @ivar errors: every L{ConfigError}, in the order found.
    """

    def __init__(self, errors):
        self.errors = flatten(errors)
        first = self.errors[0]
        ConfigError.__init__(self, first.path, first.message)

    def __str__(self):
        return "\n".join(ConfigError.__str__(error) for error in self.errors)


def flatten(errors):
    """
    Every single L{ConfigError} in C{errors}, a L{ConfigErrors} opened up.
    """
    found = []
    for error in errors:
        found.extend(getattr(error, "errors", None) or [error])
    return found


def raise_all(errors):
    """
    Raise C{errors}: nothing when empty, the error itself when alone, else
    a L{ConfigErrors}.
    """
    errors = flatten(errors)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ConfigErrors(errors)


class Collector:
    """
    Gathers the problems of a section instead of stopping at the first:
    C{collector.check(validate, value, path)} returns the validated value,
    or L{INVALID} after noting the error.
    """

    def __init__(self):
        self.errors = []

    def check(self, validate, *arguments):
        try:
            return validate(*arguments)
        except ConfigError as error:
            self.errors.append(error)
            return INVALID

    def add(self, path, message):
        self.errors.append(ConfigError(path, message))

    def done(self):
        raise_all(self.errors)


def report(source, error):
    """
    The text check-config and twistd print for C{error} found in the file
    C{source}: one line for one problem, else a count and one indented line
    a problem.
    """
    errors = flatten([error])
    if len(errors) == 1:
        return "%s: %s" % (source, error)
    return "%s: %d problems\n%s" % (source, len(errors), "\n".join("  " + str(each) for each in errors))


# The value of a key whose problem was noted: later checks that need it skip.
INVALID = object()


def suggest(key, known):
    """
    " did you mean X?" for a misspelt C{key}, or an empty string.
    """
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return "; did you mean %s?" % (close[0],) if close else ""


def unknown_keys(raw, known, path, missing_required=(), what="unknown option; this accepts %s"):
    """
    A L{ConfigError} for each key of C{raw} not in C{known}, suggesting the
    closest known key.

    @return: C{(errors, names of the required keys a misspelling stands
        for)}: those need not be reported as missing as well.
    """
    errors = []
    meant = set()
    for key in sorted(set(raw) - set(known)):
        hint = suggest(key, known)
        close = difflib.get_close_matches(key, list(missing_required), n=1, cutoff=0.6)
        if close:
            meant.add(close[0])
            hint = "; did you mean %s? (it is required)" % (close[0],)
        expected = ", ".join(sorted(known)) or "no options"
        errors.append(ConfigError(join(path, key), (what % (expected,) if "%s" in what else what) + hint))
    return errors, meant


@attr.s(frozen=True)
class Option:
    """
    One option an addon (or a section of the configuration) accepts.

    @ivar name: the key in the configuration.
    @ivar validate: a validator, C{(value, path) -> value}.
    @ivar default: the value when the key is absent; L{REQUIRED} if it
        must be given.
    @ivar help: one paragraph for the operator.
    """

    name = attr.ib()
    validate = attr.ib()
    default = attr.ib()
    help = attr.ib()


REQUIRED = object()


def _describe(value):
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def join(path, key):
    """
    The key path of C{key} inside C{path}: C{a.b}, or C{a[3]} for an index.
    """
    if isinstance(key, int):
        return "%s[%d]" % (path, key)
    return "%s.%s" % (path, key) if path else key


def parse_options(declared, raw, path):
    """
    Check C{raw} (a mapping, or None) against the declared options.

    @return: a dict with a value for every declared option.
    @raise ConfigError: for an unknown key, a missing required key or a bad
        value, naming the key path.
    """
    raw = mapping(raw if raw is not None else {}, path)
    known = {option.name: option for option in declared}
    missing = [option.name for option in declared if option.default is REQUIRED and option.name not in raw]
    errors, meant = unknown_keys(raw, known, path, missing)
    result = {}
    for option in declared:
        where = join(path, option.name)
        if option.name in raw:
            try:
                result[option.name] = option.validate(raw[option.name], where)
            except ConfigError as error:
                errors.append(error)
        elif option.default is REQUIRED:
            if option.name not in meant:
                errors.append(ConfigError(where, "is required: %s" % (option.help,)))
        else:
            result[option.name] = option.default
    raise_all(errors)
    return result


def string(value, path):
    if not isinstance(value, str) or not value:
        raise ConfigError(path, "expected a non-empty string, got %s" % (_describe(value),))
    return value


def optional_string(value, path):
    return None if value is None else string(value, path)


def boolean(value, path):
    if not isinstance(value, bool):
        raise ConfigError(path, "expected true or false, got %s" % (_describe(value),))
    return value


def integer(minimum=None, maximum=None):
    def validate(value, path):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, "expected a whole number, got %s" % (_describe(value),))
        if minimum is not None and value < minimum:
            raise ConfigError(path, "expected at least %d, got %d" % (minimum, value))
        if maximum is not None and value > maximum:
            raise ConfigError(path, "expected at most %d, got %d" % (maximum, value))
        return value

    return validate


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}


def duration(value, path):
    """
    A duration in seconds: a number, or a string such as C{"30s"},
    C{"5m"}, C{"12h"}, C{"90d"}.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(
            path, "expected a duration such as 30s, 5m, 12h or 90d, got %r" % (value,)
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def choice(*allowed):
    def validate(value, path):
        if value not in allowed:
            raise ConfigError(
                path, "expected one of %s, got %r" % (", ".join(map(str, allowed)), value)
            )
        return value

    return validate


def mapping(value, path):
    if not isinstance(value, dict):
        raise ConfigError(path, "expected a mapping, got %s" % (_describe(value),))
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(path, "keys must be strings, got %r" % (key,))
    return value


def list_of(validate_item):
    def validate(value, path):
        if not isinstance(value, list):
            raise ConfigError(path, "expected a list, got %s" % (_describe(value),))
        collector = Collector()
        items = [collector.check(validate_item, item, join(path, index)) for index, item in enumerate(value)]
        collector.done()
        return items

    return validate


string_list = list_of(string)


def string_set(value, path):
    return frozenset(string_list(value, path))


def regex(value, path):
    string(value, path)
    try:
        return re.compile(value)
    except re.error as error:
        raise ConfigError(path, "not a valid regular expression: %s" % (error,))


@attr.s(frozen=True, repr=False)
class SecretRef:
    """
    Where a secret lives: a file or an environment variable, never the
    configuration itself.  Read at the moment of use, so a rotated secret
    is picked up without a restart.
    """

    file = attr.ib(default=None)
    env = attr.ib(default=None)
    path = attr.ib(default="")

    def __repr__(self):
        if self.file:
            return "<SecretRef file=%s>" % (self.file,)
        return "<SecretRef env=%s>" % (self.env,)

    def read_bytes(self):
        """
        @raise ConfigError: when the secret is missing, with a sentence
            saying where it was looked for.
        """
        if self.file is not None:
            try:
                with open(self.file, "rb") as handle:
                    return handle.read()
            except OSError as error:
                kind = MissingFile if not os.path.exists(self.file) else ConfigError
                raise kind(
                    self.path, "cannot read the secret file %s: %s" % (self.file, error.strerror or error)
                )
        value = os.environ.get(self.env)
        if value is None:
            raise MissingFile(
                self.path, "the environment variable %s holding this secret is not set" % (self.env,)
            )
        return value.encode("utf-8")

    def read_text(self):
        """
        The secret as text, without a trailing newline (as files written by
        C{echo} have).
        """
        return self.read_bytes().decode("utf-8").rstrip("\r\n")


_BASE_DIRECTORY = contextvars.ContextVar("hoopgw_config_directory", default=".")
# Whether secrets must be present and readable now (see L{secret}).
_CHECK_SECRETS = contextvars.ContextVar("hoopgw_check_secrets", default=False)
# While checking a file written for another host (check-config
# --skip-files), the list the files and secrets this machine lacks go to,
# instead of failing; None otherwise.
_SKIPPED = contextvars.ContextVar("hoopgw_skipped_files", default=None)


def skip_missing(error):
    """
    Note C{error} (a L{MissingFile}) as skipped if files are being skipped.

    @return: whether it was.
    """
    skipped = _SKIPPED.get()
    if skipped is None:
        return False
    skipped.append(error)
    return True


def relative_to(directory):
    """
    Resolve relative paths met by L{secret} and L{file_path} against
    C{directory} (the configuration file's folder) in the current context.
    Returns a token for C{_BASE_DIRECTORY.reset}.
    """
    return _BASE_DIRECTORY.set(directory)


def resolve(path):
    """
    C{path} made absolute against the configuration file's folder.
    """
    return os.path.normpath(os.path.join(_BASE_DIRECTORY.get(), os.path.expanduser(path)))


def secret(value, path):
    """
    A reference to a secret: C{{file: PATH}} (relative to the configuration
    file) or C{{env: NAME}}.  An inline secret is refused.
    """
    if isinstance(value, str):
        raise ConfigError(
            path,
            "secrets are not accepted inline; give {file: PATH} or {env: VARIABLE} instead",
        )
    value = mapping(value, path)
    if set(value) == {"file"}:
        reference = SecretRef(file=resolve(string(value["file"], join(path, "file"))), path=path)
    elif set(value) == {"env"}:
        reference = SecretRef(env=string(value["env"], join(path, "env")), path=path)
    else:
        raise ConfigError(path, "expected exactly one of {file: PATH} or {env: VARIABLE}")
    # Checked when a file is loaded (check-config, a start, a reload), so
    # that a missing secret fails there rather than at the first session;
    # still read at each use, so a rotated secret is picked up without a
    # restart.
    if not _CHECK_SECRETS.get():
        return reference
    try:
        present = reference.read_bytes().strip()
    except MissingFile as error:
        if not skip_missing(error):
            raise
        return reference
    if not present:
        raise ConfigError(
            path,
            "the secret in %s is empty" % ("the file %s" % (reference.file,) if reference.file else "$" + reference.env,),
        )
    return reference


def file_path(value, path):
    """
    A path to an existing file, relative to the configuration file.
    """
    resolved = resolve(string(value, path))
    if not os.path.exists(resolved):
        error = MissingFile(path, "the file %s does not exist" % (resolved,))
        if skip_missing(error):
            return resolved
        raise error
    if not os.access(resolved, os.R_OK):
        raise ConfigError(path, "the file %s cannot be read by this user" % (resolved,))
    return resolved


def directory_path(value, path):
    """
    A folder, relative to the configuration file; created when first used.
    """
    return resolve(string(value, path))


# The TLS a listener offers its clients (PostgreSQL after SSLRequest, the
# Kubernetes API front end): one definition for every front end.
CLIENT_TLS_OPTIONS = (
    Option("certificate", file_path, REQUIRED, "The gateway's PEM certificate (chain) for clients."),
    Option("key", file_path, REQUIRED, "The PEM private key of that certificate."),
    Option(
        "client_ca",
        file_path,
        None,
        "A CA (PEM, one or several) whose client certificates the gateway asks for and checks in the TLS "
        "handshake (mutual TLS); the identity addon's certificates providers then map them to identities.",
    ),
)


@attr.s(frozen=True)
class ClientTLS:
    certificate = attr.ib()
    key = attr.ib()
    client_ca = attr.ib(default=None)


def client_tls(raw, path):
    """
    A connection's C{tls} mapping, checked: a L{ClientTLS}.
    """
    return ClientTLS(**parse_options(CLIENT_TLS_OPTIONS, raw, join(path, "tls")))


def endpoint(value, path):
    """
    A Twisted server endpoint string (C{tcp:15432:interface=127.0.0.1},
    C{ssl:...}, C{unix:...}), parsed as C{twistd} will parse it, without
    listening: an unknown type, a port that is not a number or a misspelt
    parameter is refused here rather than when the gateway starts.
    """
    string(value, path)
    from twisted.internet import endpoints
    from twisted.internet.testing import MemoryReactor

    try:
        # A reactor that never listens: parsing must not install the global
        # one (check-config runs without twistd) nor open a port.
        parsed = endpoints.serverFromString(MemoryReactor(), value)
    except TypeError as error:
        # A parameter the endpoint type does not take (interfase=...).
        detail = str(error).split("() ", 1)[-1]
        raise ConfigError(path, "%r is not a valid endpoint: %s" % (value, detail))
    except (ValueError, KeyError, IndexError, OSError) as error:
        raise ConfigError(
            path,
            "%r is not a valid endpoint (%s); write a Twisted endpoint string such as "
            "tcp:15432:interface=127.0.0.1" % (value, error),
        )
    except Exception as error:
        # An ssl: endpoint whose certificate does not load, for instance.
        raise ConfigError(path, "%r is not a valid endpoint: %s: %s" % (value, type(error).__name__, error))
    port = getattr(parsed, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ConfigError(path, "%r is not a valid endpoint: the port %d is not between 0 and 65535" % (value, port))
    interface = getattr(parsed, "_interface", "")
    if interface and not _resolves(interface):
        raise ConfigError(
            path, "%r is not a valid endpoint: the interface %r is neither an address nor a name this machine "
            "resolves" % (value, interface),
        )
    return value


def _resolves(host):
    import ipaddress
    import socket

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    try:
        socket.getaddrinfo(host, None)
        return True
    except (OSError, UnicodeError):
        return False
