"""
OIDC identity providers: verify a JSON Web Token against the issuer's keys
(a JWKS from a file or a URL) and turn its claims into an L{Identity}.
"""

import json
import os

import attr
from jose import jwt
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hoopgw import options as o
from hoopgw.model import HUMAN, SERVICE, Identity
from hoopgw.options import ConfigError, join


# Asymmetric algorithms only: "none" is never accepted, and HMAC would let
# anyone holding the public key forge tokens.
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC"}


class IdentityError(Exception):
    """
    A credential was refused.  C{str()} is a sentence for the client;
    C{reason} is a short code for the record.
    """

    def __init__(self, message, reason="invalid-token"):
        Exception.__init__(self, message)
        self.reason = reason


def _algorithms(value, path):
    value = o.string_list(value, path)
    for index, algorithm in enumerate(value):
        if algorithm not in ASYMMETRIC:
            raise ConfigError(
                join(path, index),
                "%r is not accepted; use asymmetric algorithms only (%s)" % (algorithm, ", ".join(ASYMMETRIC)),
            )
    if not value:
        raise ConfigError(path, "list at least one algorithm")
    return tuple(value)


def _audience(value, path):
    if isinstance(value, list):
        return tuple(o.string_list(value, path))
    return (o.string(value, path),)


OPTIONS = (
    o.Option("issuer", o.string, o.REQUIRED, "The issuer (iss) this provider's tokens carry."),
    o.Option("audience", _audience, o.REQUIRED, "The audience (aud) a token must be issued for: this gateway."),
    o.Option("jwks_file", o.file_path, None, "A JWKS file with the issuer's public keys."),
    o.Option("jwks_url", o.string, None, "A URL serving the issuer's JWKS."),
    o.Option("algorithms", _algorithms, ["RS256", "ES256"], "Signature algorithms accepted."),
    o.Option("subject_claim", o.string, "sub", "The claim naming the identity."),
    o.Option("groups_claim", o.string, "groups", "The claim listing the identity's groups."),
    o.Option("kind", o.choice(SERVICE, HUMAN), SERVICE, "Whether this issuer's identities are services or humans."),
    o.Option(
        "kind_claim",
        o.string,
        None,
        "A claim whose value says 'service' or 'human', overriding kind for each token.",
    ),
    o.Option("leeway", o.duration, 30.0, "Clock skew allowed on exp, nbf and iat."),
    o.Option(
        "max_lifetime",
        o.duration,
        None,
        "Refuse tokens valid for longer than this (exp - iat): long-lived tokens are a PCI DSS 8.6.3 finding.",
    ),
    o.Option("refresh_interval", o.duration, 60.0, "The shortest time between two fetches of the JWKS URL."),
)


@attr.s(frozen=True)
class OIDCProviderConfig:
    name = attr.ib()
    issuer = attr.ib()
    audience = attr.ib()
    jwks_file = attr.ib()
    jwks_url = attr.ib()
    algorithms = attr.ib()
    subject_claim = attr.ib()
    groups_claim = attr.ib()
    kind = attr.ib()
    kind_claim = attr.ib()
    leeway = attr.ib()
    max_lifetime = attr.ib()
    refresh_interval = attr.ib()

    type = "oidc"

    def build(self, reactor):
        return OIDCProvider(self, reactor)


def parse_provider(name, raw, path):
    values = o.parse_options(OPTIONS, raw, path)
    if bool(values["jwks_file"]) == bool(values["jwks_url"]):
        raise ConfigError(path, "give exactly one of jwks_file or jwks_url")
    return OIDCProviderConfig(name=name, **values)


class JWKSFile:
    """
    Keys from a JWKS file, read again whenever the file changes.
    """

    def __init__(self, path):
        self.path = path
        self._mtime = None
        self._keys = {}

    def keys(self, refresh=False):
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError as error:
            return defer.fail(IdentityError("the gateway cannot read its key set (%s)" % (error.strerror,), "jwks-unavailable"))
        if mtime != self._mtime:
            with open(self.path, encoding="utf-8") as handle:
                self._keys = _index(json.load(handle))
            self._mtime = mtime
        return defer.succeed(self._keys)


class JWKSURL:
    """
    Keys from a JWKS URL, fetched with treq, kept, and fetched again for an
    unknown key id at most once per C{interval} seconds.
    """

    log = Logger()

    def __init__(self, url, reactor, interval):
        self.url = url
        self._reactor = reactor
        self._interval = interval
        self._keys = None
        self._fetched = None
        self._waiters = None

    def keys(self, refresh=False):
        now = self._reactor.seconds()
        if self._fetched is not None and not (refresh and now - self._fetched >= self._interval):
            return defer.succeed(self._keys)
        waiting = defer.Deferred()
        if self._waiters is None:
            self._waiters = [waiting]
            self._fetch().addBoth(self._fetched_keys)
        else:
            self._waiters.append(waiting)
        return waiting

    def _fetched_keys(self, result):
        waiters, self._waiters = self._waiters, None
        for waiting in waiters:
            if isinstance(result, Failure):
                waiting.errback(result)
            else:
                waiting.callback(result)

    @defer.inlineCallbacks
    def _fetch(self):
        import treq

        try:
            response = yield treq.get(self.url, timeout=10)
            if response.code != 200:
                raise IOError("HTTP %d" % (response.code,))
            document = yield response.json()
            self._keys = _index(document)
        except Exception as error:
            self.log.warn("Fetching the JWKS at {url} failed: {error}", url=self.url, error=error)
            if self._keys is None:
                raise IdentityError("the gateway cannot fetch its key set right now", "jwks-unavailable")
        # A failed refresh keeps the keys already known, and also counts
        # against the rate limit, so an unreachable provider is not hammered.
        self._fetched = self._reactor.seconds()
        return self._keys


def _index(document):
    keys = {}
    for key in document.get("keys", []):
        if isinstance(key, dict) and "kty" in key:
            keys[key.get("kid")] = key
    return keys


class OIDCProvider:
    """
    Verifies one issuer's tokens.
    """

    method = "oidc"

    def __init__(self, config, reactor):
        self.config = config
        self.name = config.name
        self._reactor = reactor
        if config.jwks_file:
            self._jwks = JWKSFile(config.jwks_file)
        else:
            self._jwks = JWKSURL(config.jwks_url, reactor, config.refresh_interval)

    def accepts(self, claims):
        """
        Whether a token with these (unverified) claims is this provider's.
        """
        return claims.get("iss") == self.config.issuer

    @defer.inlineCallbacks
    def verify(self, token):
        """
        @return: a L{Deferred} firing with the L{Identity} the token
            proves, or failing with L{IdentityError}.
        """
        header = unverified_header(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.config.algorithms:
            raise IdentityError(
                "tokens signed with %r are not accepted (allowed: %s)" % (algorithm, ", ".join(self.config.algorithms)),
                "algorithm",
            )
        kid = header.get("kid")
        keys = yield self._jwks.keys()
        key = _select(keys, kid)
        if key is None:
            keys = yield self._jwks.keys(refresh=True)
            key = _select(keys, kid)
        if key is None:
            raise IdentityError("the token's signing key (kid %r) is not one of the issuer's keys" % (kid,), "unknown-kid")
        if key.get("kty") != _KEY_TYPES[algorithm[:2]] or key.get("alg", algorithm) != algorithm:
            raise IdentityError("the token's algorithm does not match its signing key", "algorithm")
        config = self.config
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=config.audience[0] if len(config.audience) == 1 else None,
                issuer=config.issuer,
                options={
                    "leeway": int(config.leeway),
                    "require_exp": True,
                    "require_iat": config.max_lifetime is not None,
                    "verify_aud": len(config.audience) == 1,
                },
            )
        except ExpiredSignatureError:
            raise IdentityError("the token has expired", "expired")
        except JWTClaimsError as error:
            raise IdentityError("the token was refused: %s" % (str(error).rstrip(".").lower(),), "claims")
        except JWTError as error:
            raise IdentityError("the token's signature is not valid (%s)" % (str(error).rstrip("."),), "signature")
        if len(config.audience) > 1:
            audience = claims.get("aud")
            audience = [audience] if isinstance(audience, str) else list(audience or ())
            if not set(audience) & set(config.audience):
                raise IdentityError("the token was refused: invalid audience", "claims")
        if config.max_lifetime is not None:
            lifetime = claims["exp"] - claims["iat"]
            if lifetime > config.max_lifetime + config.leeway:
                raise IdentityError(
                    "the token is valid for %d seconds, longer than the %d this gateway accepts; "
                    "ask the issuer for a shorter-lived token" % (lifetime, config.max_lifetime),
                    "lifetime",
                )
        return self._identity(claims, kid, algorithm)

    def _identity(self, claims, kid, algorithm):
        config = self.config
        subject = claims.get(config.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise IdentityError("the token has no %r claim naming who it is for" % (config.subject_claim,), "claims")
        groups = claims.get(config.groups_claim, [])
        if isinstance(groups, str):
            groups = groups.split()
        if not isinstance(groups, list) or not all(isinstance(group, str) for group in groups):
            raise IdentityError("the token's %r claim is not a list of group names" % (config.groups_claim,), "claims")
        kind = config.kind
        if config.kind_claim is not None:
            kind = claims.get(config.kind_claim)
            if kind not in (SERVICE, HUMAN):
                raise IdentityError(
                    "the token's %r claim must say 'service' or 'human'" % (config.kind_claim,), "claims"
                )
        return Identity(
            subject=subject,
            issuer=config.issuer,
            groups=frozenset(groups),
            kind=kind,
            method="oidc",
            token_id=claims.get("jti"),
            provenance={
                "provider": config.name,
                "kid": kid,
                "algorithm": algorithm,
                "issued_at": claims.get("iat"),
                "expires_at": claims.get("exp"),
            },
        )


def _select(keys, kid):
    if kid is not None:
        return keys.get(kid)
    if len(keys) == 1:
        return next(iter(keys.values()))
    return None


def unverified_header(token):
    """
    The header of a compact JWT, not yet trusted.

    @raise IdentityError: if C{token} is not a JWT.
    """
    try:
        header = jwt.get_unverified_header(token)
    except JWTError:
        raise IdentityError("the password is not a JSON Web Token; sign in with your identity token", "not-a-token")
    if not isinstance(header, dict):
        raise IdentityError("the token's header is not a JSON object", "not-a-token")
    return header


def unverified_claims(token):
    """
    The claims of a compact JWT, not yet trusted: only to pick a provider.
    """
    try:
        claims = jwt.get_unverified_claims(token)
    except JWTError:
        raise IdentityError("the password is not a JSON Web Token; sign in with your identity token", "not-a-token")
    if not isinstance(claims, dict):
        raise IdentityError("the token's claims are not a JSON object", "not-a-token")
    return claims

