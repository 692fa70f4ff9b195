"""
An issuer's signing keys, fetched as a careful relying party fetches them:
OpenID Connect discovery (C{/.well-known/openid-configuration} names the
C{jwks_uri}), the provider's cache headers obeyed, a refresh when a token
names a key id the gateway does not know (rate-limited, so a flood of bogus
key ids cannot hammer the provider), and the keys already known still
served for a while when the provider is briefly down.
"""

import email.utils
import ipaddress
import json
import re
import time
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hoopgw import metrics
from hoopgw.identity.errors import IdentityError


# A key set or discovery document larger than this is not one.
MAX_DOCUMENT_BYTES = 1024 * 1024

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(no-cache|no-store)\b", re.IGNORECASE)


def cache_lifetime(headers, now):
    """
    How long, in seconds, a response may be used without asking again, by
    its C{Cache-Control} (C{max-age}, C{no-cache}, C{no-store}) or
    C{Expires} header (RFC 9111); C{None} when it does not say.

    @param headers: a mapping of lower-case header name to its value.
    @param now: the current time, for C{Expires} without C{Date}.
    """
    control = headers.get("cache-control")
    if control:
        if _NO_CACHE.search(control):
            return 0.0
        match = _MAX_AGE.search(control)
        if match:
            return float(match.group(1))
    expires = headers.get("expires")
    if expires:
        try:
            expiry = email.utils.parsedate_to_datetime(expires).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            # RFC 9111 5.3: an invalid Expires means already expired.
            return 0.0
        reference = now
        if headers.get("date"):
            try:
                reference = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
            except (TypeError, ValueError, IndexError, OverflowError):
                pass
        return max(0.0, expiry - reference)
    return None


def check_url(url, allow_loopback_http=True):
    """
    An issuer's URL must be HTTPS: keys fetched in clear could be swapped by
    anyone on the path.  Plain HTTP is tolerated on loopback only, for
    stand-ins and sidecars.

    @raise ValueError: with a sentence saying what to do.
    """
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname and allow_loopback_http:
        host = parts.hostname
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if loopback:
            return url
    raise ValueError("expected an https:// URL (plain http is accepted on loopback only), got %r" % (url,))


class _Document:
    """
    One fetched JSON document and how long it may be used.
    """

    __slots__ = ("value", "fresh_until", "stale_until", "fetched_at")

    def __init__(self, value, fresh_until, stale_until, fetched_at):
        self.value = value
        self.fresh_until = fresh_until
        self.stale_until = stale_until
        self.fetched_at = fetched_at


class RemoteKeySet:
    """
    The keys of one issuer, from its discovery document or a JWKS URL.

    L{keys} answers from the cache while it is fresh.  Once it is stale,
    the next call fetches again; when that fails, the keys already known
    are served until C{max_stale} past their freshness (the provider is
    briefly down), and after that every token is refused (fail closed).
    A token naming an unknown key id may force a refresh, at most once per
    C{refresh_interval}; every fetch that failed also holds the next one
    back for that long, so a provider in trouble is not hammered.

    @ivar fetches: how many HTTP requests were made, for the curious.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        issuer,
        discovery_url=None,
        jwks_url=None,
        refresh_interval=60.0,
        default_ttl=300.0,
        max_ttl=86400.0,
        max_stale=43200.0,
        timeout=10.0,
        ca=None,
        clock=None,
    ):
        if bool(discovery_url) == bool(jwks_url):
            raise ValueError("give exactly one of discovery_url or jwks_url")
        self._reactor = reactor
        self._clock = clock or reactor
        self.issuer = issuer
        self.discovery_url = discovery_url
        self.jwks_url = jwks_url
        self._refresh_interval = refresh_interval
        self._default_ttl = default_ttl
        self._max_ttl = max_ttl
        self._max_stale = max_stale
        self._timeout = timeout
        self._ca = ca
        self._client = None
        self._discovery = None
        self._jwks = None
        self._forced_at = None
        self._failed_at = None
        self._waiters = None
        self.fetches = 0

    @property
    def source(self):
        """
        Where the keys come from (the JWKS URL, once known).
        """
        if self._discovery is not None:
            return self._discovery.value["jwks_uri"]
        return self.jwks_url or self.discovery_url

    def keys(self, refresh=False):
        """
        The issuer's keys, by key id.

        @param refresh: a token named a key id not among the keys: fetch
            again if the rate limit allows.
        @return: a L{Deferred} firing with C{(keys, origin)}, C{origin}
            being C{"cache"}, C{"fetched"} or C{"stale-cache"}; or failing
            with L{IdentityError} when no usable keys can be had.
        """
        now = self._clock.seconds()
        current = self._jwks
        if current is not None and now < current.fresh_until:
            if not refresh or not self._may_force(now):
                return defer.succeed((current.value, "cache"))
            self._forced_at = now
        elif self._failed_at is not None and now - self._failed_at < self._refresh_interval:
            return self._stale(now)
        elif refresh:
            self._forced_at = now
        waiting = defer.Deferred()
        if self._waiters is None:
            self._waiters = [waiting]
            self._refresh(now).addBoth(self._settle)
        else:
            self._waiters.append(waiting)
        return waiting

    def _may_force(self, now):
        if self._forced_at is not None and now - self._forced_at < self._refresh_interval:
            return False
        return self._failed_at is None or now - self._failed_at >= self._refresh_interval

    def _stale(self, now):
        current = self._jwks
        if current is not None and now < current.stale_until:
            return defer.succeed((current.value, "stale-cache" if now >= current.fresh_until else "cache"))
        return defer.fail(
            IdentityError(
                "the gateway cannot get the issuer's signing keys right now; try again shortly",
                "jwks-unavailable",
            )
        )

    def _settle(self, result):
        waiters, self._waiters = self._waiters, None
        for waiting in waiters:
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    @defer.inlineCallbacks
    def _refresh(self, now):
        try:
            jwks_url = self.jwks_url
            if self.discovery_url is not None:
                discovery = self._discovery
                if discovery is None or now >= discovery.fresh_until:
                    try:
                        discovery = yield self._fetch(self.discovery_url, self._check_discovery)
                        self._discovery = discovery
                    except Exception:
                        if discovery is None:
                            raise
                jwks_url = discovery.value["jwks_uri"]
            self._jwks = yield self._fetch(jwks_url, _index)
            self._failed_at = None
            metrics.identity_key_fetches.labels(self.issuer, "ok").inc()
            return (self._jwks.value, "fetched")
        except Exception as error:
            self._failed_at = self._clock.seconds()
            metrics.identity_key_fetches.labels(self.issuer, "failed").inc()
            self.log.warn(
                "Fetching the signing keys of {issuer} failed: {error}", issuer=self.issuer, error=error
            )
            result = yield self._stale(self._clock.seconds())
            return result

    def _check_discovery(self, document):
        if not isinstance(document, dict):
            raise ValueError("the discovery document is not a JSON object")
        if document.get("issuer") != self.issuer:
            # OpenID Connect Discovery 1.0, 4.3: the issuer must match exactly.
            raise ValueError(
                "the discovery document names the issuer %r, not %r" % (document.get("issuer"), self.issuer)
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ValueError("the discovery document has no jwks_uri")
        check_url(jwks_uri)
        return document

    @defer.inlineCallbacks
    def _fetch(self, url, parse):
        import treq

        self.fetches += 1
        client = self._http_client()
        response = yield client.get(url, timeout=self._timeout, headers={"Accept": ["application/json"]})
        if response.code != 200:
            yield treq.content(response)
            raise IOError("%s answered HTTP %d" % (url, response.code))
        chunks = []
        size = [0]

        def collect(data):
            size[0] += len(data)
            if size[0] > MAX_DOCUMENT_BYTES:
                raise IOError("%s sent more than %d bytes" % (url, MAX_DOCUMENT_BYTES))
            chunks.append(data)

        yield treq.collect(response, collect)
        value = parse(json.loads(b"".join(chunks)))
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in response.headers.getAllRawHeaders()
        }
        now = self._clock.seconds()
        ttl = cache_lifetime(headers, time.time())
        if ttl is None:
            ttl = self._default_ttl
        # Never more often than the refresh interval, whatever the headers
        # say (no-store would otherwise mean a fetch per token).
        ttl = min(max(ttl, self._refresh_interval), self._max_ttl)
        return _Document(value, now + ttl, now + ttl + self._max_stale, now)

    def _http_client(self):
        if self._client is None:
            from treq.client import HTTPClient
            from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

            policy = BrowserLikePolicyForHTTPS()
            if self._ca is not None:
                from twisted.internet import ssl

                with open(self._ca, "rb") as handle:
                    policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(handle.read()))
            pool = HTTPConnectionPool(self._reactor, persistent=False)
            self._client = HTTPClient(Agent(self._reactor, contextFactory=policy, pool=pool))
        return self._client


def _index(document):
    """
    A JWKS as a mapping of key id to key.

    @raise ValueError: when it is not a JWKS.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the key set is not a JWKS (no 'keys' list)")
    keys = {}
    for key in document["keys"]:
        if isinstance(key, dict) and "kty" in key and key.get("use", "sig") == "sig":
            keys[key.get("kid")] = key
    return keys
