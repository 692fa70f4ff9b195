"""
LDAP directories as a source of group membership (ldap3): the groups of an
identity's subject, whoever proved it (a token, a client certificate, an
SSH key's owner), looked up in a thread (ldap3 blocks), cached briefly,
over LDAPS or StartTLS with the server's certificate checked, with every
value placed in a filter escaped.  A directory that cannot be reached
refuses (fail closed) unless the connection says token groups suffice.
"""

import ssl
import threading
import time
from urllib.parse import urlsplit

import attr
from twisted.internet import defer, threads
from twisted.logger import Logger

from hoopgw import options as o
from hoopgw.identity.errors import IdentityError
from hoopgw.options import ConfigError, join


def _urls(value, path):
    urls = o.string_list(value, path) if isinstance(value, list) else [o.string(value, path)]
    if not urls:
        raise ConfigError(path, "list at least one ldap:// or ldaps:// URL")
    for index, url in enumerate(urls):
        parts = urlsplit(url)
        if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
            raise ConfigError(join(path, index) if len(urls) > 1 else path, "expected an ldap:// or ldaps:// URL, got %r" % (url,))
    return tuple(urls)


def _template(placeholder):
    def validate(value, path):
        value = o.string(value, path)
        if placeholder not in value:
            raise ConfigError(path, "the filter must contain %s, where the escaped value goes" % (placeholder,))
        if not (value.startswith("(") and value.endswith(")")):
            raise ConfigError(path, "an LDAP filter is enclosed in parentheses, e.g. (uid={subject})")
        return value

    return validate


OPTIONS = (
    o.Option("url", _urls, o.REQUIRED, "The directory: an ldaps:// or ldap:// URL, or a list tried in order (failover)."),
    o.Option(
        "start_tls",
        o.boolean,
        True,
        "Upgrade ldap:// connections with StartTLS before binding. Turning it off is accepted on loopback only.",
    ),
    o.Option("ca", o.file_path, None, "The PEM CA the directory's certificate must chain to (default: the system's)."),
    o.Option("bind_dn", o.string, None, "The account the gateway binds as (anonymous when absent)."),
    o.Option("bind_password", o.secret, None, "That account's password: {file: PATH} or {env: VARIABLE}."),
    o.Option("user_base", o.string, o.REQUIRED, "Where users are searched, e.g. ou=people,dc=example,dc=org."),
    o.Option(
        "user_filter",
        _template("{subject}"),
        "(&(objectClass=inetOrgPerson)(uid={subject}))",
        "How a subject's entry is found; {subject} is replaced by the escaped subject.",
    ),
    o.Option("group_base", o.string, None, "Where groups are searched (default: user_base's parent)."),
    o.Option(
        "group_filter",
        _template("{dn}"),
        "(&(objectClass=groupOfNames)(member={dn}))",
        "How the groups having an entry as a member are found; {dn} is replaced by the escaped entry DN. "
        "On Active Directory, (member:1.2.840.113556.1.4.1941:={dn}) resolves nesting in one search.",
    ),
    o.Option("group_name_attribute", o.string, "cn", "The attribute holding a group's name."),
    o.Option(
        "membership",
        o.choice("search", "memberof"),
        "search",
        "'search' finds groups with group_filter; 'memberof' reads the user entry's memberof_attribute.",
    ),
    o.Option("memberof_attribute", o.string, "memberOf", "The user attribute listing group DNs (membership: memberof)."),
    o.Option(
        "nested",
        o.boolean,
        True,
        "Follow groups that are members of groups (a search per level, at most nested_depth levels).",
    ),
    o.Option("nested_depth", o.integer(1, 32), 8, "How many levels of nested groups are followed."),
    o.Option("cache_ttl", o.duration, 60.0, "How long a subject's groups are reused before asking the directory again."),
    o.Option("timeout", o.duration, 5.0, "How long to wait for the directory (connecting, and each answer)."),
)


@attr.s(frozen=True)
class LDAPProviderConfig:
    name = attr.ib()
    url = attr.ib()
    start_tls = attr.ib()
    ca = attr.ib()
    bind_dn = attr.ib()
    bind_password = attr.ib(repr=False)
    user_base = attr.ib()
    user_filter = attr.ib()
    group_base = attr.ib()
    group_filter = attr.ib()
    group_name_attribute = attr.ib()
    membership = attr.ib()
    memberof_attribute = attr.ib()
    nested = attr.ib()
    nested_depth = attr.ib()
    cache_ttl = attr.ib()
    timeout = attr.ib()

    type = "ldap"
    credential = "directory"

    def build(self, reactor):
        return LDAPDirectory(self, reactor)


def _is_loopback(url):
    host = urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def parse_provider(name, raw, path):
    values = o.parse_options(OPTIONS, raw, path)
    if not values["start_tls"]:
        for url in values["url"]:
            if url.startswith("ldap://") and not _is_loopback(url):
                raise ConfigError(
                    join(path, "start_tls"),
                    "can only be turned off for a directory on loopback: the bind password and the "
                    "groups would cross the network in clear (use ldaps:// or StartTLS)",
                )
    if bool(values["bind_dn"]) != bool(values["bind_password"]):
        raise ConfigError(path, "give both bind_dn and bind_password, or neither (anonymous)")
    if values["group_base"] is None:
        values["group_base"] = values["user_base"].split(",", 1)[-1]
    return LDAPProviderConfig(name=name, **values)


@attr.s(frozen=True)
class DirectoryGroups:
    """
    What a directory said about a subject.

    @ivar groups: the group names (nested groups included).
    @ivar dn: the subject's entry, or C{None} when it has none.
    @ivar server: the directory server that answered.
    @ivar cached: whether this came from the cache.
    @ivar looked_up_at: when the directory was asked (POSIX time).
    """

    groups = attr.ib(converter=frozenset)
    dn = attr.ib()
    server = attr.ib()
    cached = attr.ib(default=False)
    looked_up_at = attr.ib(default=0.0)

    def provenance(self, name):
        return {
            "provider": name,
            "server": self.server,
            "dn": self.dn,
            "cached": self.cached,
            "looked_up_at": round(self.looked_up_at, 3),
            "groups": sorted(self.groups),
        }


class LDAPDirectory:
    """
    Group lookups in one directory.  L{groups_for} is what any front end's
    identity uses.
    """

    method = "ldap"
    credential = "directory"
    log = Logger()
    cache_limit = 10000
    # Bound connections kept for the next lookups, and how long one may
    # sit unused before it is closed rather than reused.
    pool_size = 4
    pool_idle = 60.0

    def __init__(self, config, reactor):
        self.config = config
        self.name = config.name
        self._reactor = reactor
        self._cache = {}
        self.lookups = 0
        self.opened = 0
        self._idle = []
        self._lock = threading.Lock()
        self._closed = False

    def groups_for(self, subject):
        """
        The groups of C{subject}'s directory entry.

        @return: a L{Deferred} firing with L{DirectoryGroups}, or failing
            with L{IdentityError} (C{"directory-unavailable"}) when the
            directory cannot be asked or its answer cannot be trusted.
        """
        now = time.time()
        hit = self._cache.get(subject)
        if hit is not None and hit[0] > now:
            return defer.succeed(attr.evolve(hit[1], cached=True))
        pool = self._reactor.getThreadPool()
        d = threads.deferToThreadPool(self._reactor, pool, self._lookup, subject)
        d.addCallback(self._remember, subject)
        return d

    def _remember(self, result, subject):
        if len(self._cache) >= self.cache_limit:
            now = time.time()
            for key in [key for key, (expiry, _) in self._cache.items() if expiry <= now] or list(self._cache)[: self.cache_limit // 10]:
                self._cache.pop(key, None)
        self._cache[subject] = (time.time() + self.config.cache_ttl, result)
        return result

    def forget(self):
        """
        Drop every cached answer.
        """
        self._cache.clear()

    def close(self):
        """
        Close the pooled connections (the gateway is stopping).
        """
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection, _ in idle:
            _close(connection)

    # Everything below runs in a thread.

    def _take(self):
        """
        A bound connection: a pooled one not idle too long, else a new one.

        @return: C{(connection, whether it was pooled)}.
        """
        with self._lock:
            while self._idle:
                connection, used = self._idle.pop()
                if time.monotonic() - used < self.pool_idle:
                    return connection, True
                _close(connection)
        return self._connection(), False

    def _give_back(self, connection):
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append((connection, time.monotonic()))
                return
        _close(connection)

    def _connection(self):
        import ldap3

        config = self.config
        # ldap3 packs the timeout into a socket option: whole seconds.
        timeout = max(1, int(round(config.timeout)))
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca, version=ssl.PROTOCOL_TLS_CLIENT)
        servers = [
            ldap3.Server(url, use_ssl=url.startswith("ldaps://"), tls=tls, connect_timeout=timeout, get_info=ldap3.NONE)
            for url in config.url
        ]
        pool = ldap3.ServerPool(servers, ldap3.FIRST, active=1, exhaust=True) if len(servers) > 1 else servers[0]
        password = config.bind_password.read_text() if config.bind_password is not None else None
        start_tls = config.start_tls and any(url.startswith("ldap://") for url in config.url)
        connection = ldap3.Connection(
            pool,
            user=config.bind_dn,
            password=password,
            auto_bind=ldap3.AUTO_BIND_NONE,
            receive_timeout=timeout,
            raise_exceptions=True,
            read_only=True,
        )
        self.opened += 1
        connection.open()
        if start_tls and not connection.server.ssl:
            connection.start_tls()
        connection.bind()
        return connection

    def _lookup(self, subject):
        from ldap3.core.exceptions import LDAPException, LDAPSizeLimitExceededResult

        config = self.config
        self.lookups += 1
        evidence = {"directory": config.name, "servers": list(config.url), "subject": subject}
        started = time.time()
        connection = None
        try:
            connection, pooled = self._take()
            try:
                answer = self._ask(connection, subject, evidence, started)
            except LDAPSizeLimitExceededResult:
                raise
            except LDAPException:
                if not pooled:
                    raise
                # The directory may have closed a pooled connection while it
                # sat idle: once more, on a new one.
                _close(connection)
                connection = None
                connection = self._connection()
                answer = self._ask(connection, subject, evidence, started)
            self._give_back(connection)
            connection = None
            return answer
        except LDAPSizeLimitExceededResult:
            raise IdentityError(
                "the directory %s holds several entries for %r, so its groups cannot be trusted" % (config.name, subject),
                "directory-ambiguous",
                evidence,
            )
        except LDAPException as error:
            self.log.warn("The directory {name} could not be asked about {subject}: {error}", name=config.name, subject=subject, error=error)
            raise IdentityError(
                "the directory %s cannot be reached or refused the gateway (%s), so your groups cannot be "
                "checked; try again later" % (config.name, _describe(error)),
                "directory-unavailable",
                evidence,
            )
        finally:
            if connection is not None:
                _close(connection)

    def _ask(self, connection, subject, evidence, started):
        """
        The groups of C{subject}, asked on C{connection}.
        """
        import ldap3
        from ldap3.utils.conv import escape_filter_chars

        config = self.config
        evidence["server"] = _server_url(connection.server)
        user_filter = config.user_filter.replace("{subject}", escape_filter_chars(subject))
        attributes = [config.memberof_attribute] if config.membership == "memberof" else []
        connection.search(config.user_base, user_filter, ldap3.SUBTREE, attributes=attributes, size_limit=2)
        entries = [entry for entry in connection.response if entry.get("type") == "searchResEntry"]
        if len(entries) > 1:
            raise IdentityError(
                "the directory %s holds several entries for %r, so its groups cannot be trusted" % (config.name, subject),
                "directory-ambiguous",
                evidence,
            )
        if not entries:
            return DirectoryGroups(groups=(), dn=None, server=evidence["server"], looked_up_at=started)
        dn = entries[0]["dn"]
        if config.membership == "memberof":
            group_dns = list(entries[0]["attributes"].get(config.memberof_attribute) or [])
            names = self._names_of(connection, group_dns)
        else:
            names = set()
            group_dns = []
        seen = set(group_dns)
        frontier = [dn] if config.membership == "search" else list(group_dns)
        depth = 0
        limit = config.nested_depth + 1 if config.nested else 1
        if config.membership == "memberof":
            limit = config.nested_depth if config.nested else 0
        while frontier and depth < limit:
            depth += 1
            found = []
            for member in frontier:
                group_filter = config.group_filter.replace("{dn}", escape_filter_chars(member))
                connection.search(config.group_base, group_filter, ldap3.SUBTREE, attributes=[config.group_name_attribute])
                for entry in connection.response:
                    if entry.get("type") != "searchResEntry" or entry["dn"] in seen:
                        continue
                    seen.add(entry["dn"])
                    found.append(entry["dn"])
                    names.update(_values(entry["attributes"].get(config.group_name_attribute)))
            frontier = found
        return DirectoryGroups(groups=names, dn=dn, server=evidence["server"], looked_up_at=started)

    def _names_of(self, connection, group_dns):
        import ldap3

        names = set()
        for dn in group_dns:
            connection.search(dn, "(objectClass=*)", ldap3.BASE, attributes=[self.config.group_name_attribute])
            for entry in connection.response:
                if entry.get("type") == "searchResEntry":
                    names.update(_values(entry["attributes"].get(self.config.group_name_attribute)))
        return names


def _close(connection):
    try:
        connection.unbind()
    except Exception:
        pass


def _values(value):
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(item) for item in value]
    return [str(value)]


def _server_url(server):
    scheme = "ldaps" if server.ssl else "ldap"
    return "%s://%s:%d" % (scheme, server.host, server.port)


def _describe(error):
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]


@defer.inlineCallbacks
def with_directory_groups(identity, directory, combine="union", token_groups_suffice=False):
    """
    C{identity} with its groups decided with the directory: the groups of
    its subject's entry added to (C{"union"}) or replacing
    (C{"directory"}) the groups its credential carried.  Any front end's
    identity can go through this, whatever proved it.

    @param directory: an L{LDAPDirectory}.
    @param token_groups_suffice: when the directory cannot be reached, go
        on with the credential's groups alone (recorded) instead of
        refusing.
    @return: a L{Deferred} firing with the new L{Identity}; failing with
        L{IdentityError} when the directory cannot be asked and the
        credential's groups do not suffice.
    """
    provenance = dict(identity.provenance)
    groups_record = dict(provenance.get("groups") or {})
    if not groups_record:
        groups_record["credential"] = sorted(identity.groups)
    try:
        answer = yield directory.groups_for(identity.subject)
    except IdentityError as error:
        if not token_groups_suffice:
            error.evidence.setdefault("subject", identity.subject)
            raise
        provenance["directory"] = {
            "provider": directory.name,
            "error": str(error),
            "fallback": "credential groups only (token_groups_suffice)",
        }
        groups_record["decided"] = sorted(identity.groups)
        provenance["groups"] = groups_record
        return attr.evolve(identity, provenance=provenance)
    groups = set(answer.groups)
    if combine == "union":
        groups |= identity.groups
    provenance["directory"] = answer.provenance(directory.name)
    groups_record["directory"] = sorted(answer.groups)
    groups_record["decided"] = sorted(groups)
    provenance["groups"] = groups_record
    return attr.evolve(identity, groups=frozenset(groups), provenance=provenance)
