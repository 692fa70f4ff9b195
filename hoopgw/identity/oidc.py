"""
OIDC identity providers: verify a JSON Web Token against the issuer's keys
(found by OpenID Connect discovery, or a JWKS URL or file) and turn its
claims into an L{Identity}, with the facts an auditor asks for (key id,
algorithm, where the keys came from) in its provenance.
"""

import json
import os

import attr
from jose import jwt
from jose.exceptions import ExpiredSignatureError, JWTClaimsError, JWTError
from twisted.internet import defer

from hoopgw import options as o
from hoopgw.identity.errors import IdentityError
from hoopgw.identity.keys import RemoteKeySet, check_url
from hoopgw.identity.replay import ReplayCache
from hoopgw.store.errors import StoreError
from hoopgw.model import HUMAN, SERVICE, Identity
from hoopgw.options import ConfigError, join

__all__ = ["IdentityError", "OIDCProvider", "OIDCProviderConfig", "parse_provider", "unverified_claims"]


# Asymmetric algorithms only: "none" is never accepted, and HMAC would let
# anyone holding the public key forge tokens.
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
_KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC"}

DISCOVERY_PATH = "/.well-known/openid-configuration"


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


def _url(value, path):
    try:
        return check_url(o.string(value, path))
    except ValueError as error:
        raise ConfigError(path, str(error))


def _required_claims(value, path):
    value = o.mapping(value, path)
    result = {}
    for claim, expected in value.items():
        where = join(path, claim)
        if isinstance(expected, list):
            result[claim] = frozenset(o.string_list(expected, where))
        else:
            result[claim] = frozenset([o.string(expected, where)])
    return result


OPTIONS = (
    o.Option("issuer", o.string, o.REQUIRED, "The issuer (iss) this provider's tokens carry."),
    o.Option("audience", _audience, o.REQUIRED, "The audience (aud) a token must be issued for: this gateway."),
    o.Option(
        "discovery_url",
        _url,
        None,
        "Where the issuer's OpenID Connect discovery document is; by default the issuer followed by "
        "/.well-known/openid-configuration. Used when neither jwks_url nor jwks_file is given.",
    ),
    o.Option("jwks_file", o.file_path, None, "A JWKS file with the issuer's public keys, instead of discovery."),
    o.Option("jwks_url", _url, None, "A URL serving the issuer's JWKS, instead of discovery."),
    o.Option("ca", o.file_path, None, "A PEM CA the issuer's HTTPS certificate must chain to (default: the system's)."),
    o.Option("algorithms", _algorithms, ["RS256", "ES256"], "Signature algorithms accepted."),
    o.Option("subject_claim", o.string, "sub", "The claim naming the identity."),
    o.Option("groups_claim", o.string, "groups", "The claim listing the identity's groups."),
    o.Option("kind", o.choice(SERVICE, HUMAN), SERVICE, "Whether this issuer's identities are services or humans."),
    o.Option(
        "kind_claim",
        o.string,
        None,
        "A claim whose value says whether the token is a service's or a human's (see service_values and "
        "human_values), overriding kind for each token.",
    ),
    o.Option("service_values", o.string_list, ["service"], "Values of kind_claim that mark a service."),
    o.Option("human_values", o.string_list, ["human"], "Values of kind_claim that mark a human."),
    o.Option(
        "required_claims",
        _required_claims,
        {},
        "Claims a token must carry with one of the given values, e.g. {repository_owner: my-org} for CI tokens.",
    ),
    o.Option("leeway", o.duration, 30.0, "Clock skew allowed on exp, nbf and iat."),
    o.Option(
        "max_lifetime",
        o.duration,
        None,
        "Refuse tokens valid for longer than this (exp - iat): long-lived tokens are a PCI DSS 8.6.3 finding.",
    ),
    o.Option(
        "replay_protection",
        o.boolean,
        False,
        "Refuse a token whose jti was already used, until it expires: each token opens one session. "
        "Needs max_lifetime. The memory of used tokens is per gateway process with the file store, shared by "
        "every process with the PostgreSQL store (docs/replicas.rst).",
    ),
    o.Option(
        "refresh_interval",
        o.duration,
        60.0,
        "The shortest time between two fetches of the keys: a token naming an unknown key id refreshes "
        "them at most this often, and a failed fetch is not retried sooner.",
    ),
    o.Option("cache_ttl", o.duration, 300.0, "How long fetched keys are used when the provider's cache headers say nothing."),
    o.Option("max_cache", o.duration, 86400.0, "The longest fetched keys are used before asking again, whatever the headers say."),
    o.Option(
        "max_stale",
        o.duration,
        43200.0,
        "How long past their freshness the keys already known are still used while the provider cannot be reached.",
    ),
    o.Option("fetch_timeout", o.duration, 10.0, "How long to wait for the provider when fetching keys."),
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
    discovery_url = attr.ib(default=None)
    ca = attr.ib(default=None)
    service_values = attr.ib(default=("service",), converter=tuple)
    human_values = attr.ib(default=("human",), converter=tuple)
    required_claims = attr.ib(factory=dict)
    replay_protection = attr.ib(default=False)
    cache_ttl = attr.ib(default=300.0)
    max_cache = attr.ib(default=86400.0)
    max_stale = attr.ib(default=43200.0)
    fetch_timeout = attr.ib(default=10.0)

    type = "oidc"
    credential = "jwt"

    def build(self, reactor):
        return OIDCProvider(self, reactor)


def parse_provider(name, raw, path):
    values = o.parse_options(OPTIONS, raw, path)
    sources = [key for key in ("jwks_file", "jwks_url", "discovery_url") if values[key]]
    if len(sources) > 1:
        raise ConfigError(path, "give at most one of jwks_file, jwks_url or discovery_url (%s given)" % (", ".join(sources),))
    if not sources:
        try:
            values["discovery_url"] = check_url(values["issuer"].rstrip("/") + DISCOVERY_PATH)
        except ValueError:
            raise ConfigError(
                join(path, "issuer"),
                "is not an https:// URL, so its keys cannot be discovered; give jwks_url or jwks_file",
            )
    if values["replay_protection"] and values["max_lifetime"] is None:
        raise ConfigError(
            join(path, "replay_protection"),
            "needs max_lifetime, so that the memory of used tokens stays bounded",
        )
    overlap = set(values["service_values"]) & set(values["human_values"])
    if overlap:
        raise ConfigError(join(path, "human_values"), "%r cannot mark both a service and a human" % (sorted(overlap)[0],))
    return OIDCProviderConfig(name=name, **values)


class JWKSFile:
    """
    Keys from a JWKS file, read again whenever the file changes.
    """

    def __init__(self, path):
        self.path = path
        self.source = path
        self._mtime = None
        self._keys = {}

    def keys(self, refresh=False):
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime != self._mtime:
                with open(self.path, encoding="utf-8") as handle:
                    self._keys = _index(json.load(handle))
                self._mtime = mtime
        except (OSError, ValueError) as error:
            return defer.fail(
                IdentityError("the gateway cannot read its key set (%s)" % (getattr(error, "strerror", None) or error,), "jwks-unavailable")
            )
        return defer.succeed((self._keys, "file"))


def _index(document):
    keys = {}
    for key in document.get("keys", []) if isinstance(document, dict) else ():
        if isinstance(key, dict) and "kty" in key:
            keys[key.get("kid")] = key
    return keys


class OIDCProvider:
    """
    Verifies one issuer's tokens.
    """

    method = "oidc"
    credential = "jwt"

    def __init__(self, config, reactor, clock=None):
        self.config = config
        self.name = config.name
        self._reactor = reactor
        clock = clock or reactor
        if config.jwks_file:
            self.key_set = JWKSFile(config.jwks_file)
        else:
            self.key_set = RemoteKeySet(
                reactor,
                config.issuer,
                discovery_url=config.discovery_url,
                jwks_url=config.jwks_url,
                refresh_interval=config.refresh_interval,
                default_ttl=config.cache_ttl,
                max_ttl=config.max_cache,
                max_stale=config.max_stale,
                timeout=config.fetch_timeout,
                ca=config.ca,
                clock=clock,
            )
        self.replay = ReplayCache(reactor) if config.replay_protection else None

    def accepts(self, claims):
        """
        Whether a token with these (unverified) claims is this provider's.
        """
        return claims.get("iss") == self.config.issuer

    @defer.inlineCallbacks
    def verify(self, token, consume=True):
        """
        @param consume: with replay protection, mark the token used (a
            dry run such as C{hoopgw whoami} only looks).
        @return: a L{Deferred} firing with the L{Identity} the token
            proves, or failing with L{IdentityError}.
        """
        config = self.config
        header = unverified_header(token)
        algorithm = header.get("alg")
        kid = header.get("kid")
        evidence = {"provider": config.name, "issuer": config.issuer, "kid": kid, "algorithm": algorithm}
        if not isinstance(algorithm, str) or algorithm not in config.algorithms:
            raise IdentityError(
                "tokens signed with %r are not accepted (allowed: %s)" % (algorithm, ", ".join(config.algorithms)),
                "algorithm",
                evidence,
            )
        keys, origin = yield self.key_set.keys()
        key = _select(keys, kid)
        if key is None:
            keys, origin = yield self.key_set.keys(refresh=True)
            key = _select(keys, kid)
        if key is None:
            raise IdentityError(
                "the token's signing key (kid %r) is not one of the issuer's keys" % (kid,), "unknown-kid", evidence
            )
        if key.get("kty") != _KEY_TYPES[algorithm[:2]] or key.get("alg", algorithm) != algorithm:
            raise IdentityError("the token's algorithm does not match its signing key", "algorithm", evidence)
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
                    "verify_at_hash": False,
                },
            )
        except ExpiredSignatureError:
            raise IdentityError("the token has expired", "expired", evidence)
        except JWTClaimsError as error:
            raise IdentityError("the token was refused: %s" % (str(error).rstrip(".").lower(),), "claims", evidence)
        except JWTError as error:
            raise IdentityError("the token's signature is not valid (%s)" % (str(error).rstrip("."),), "signature", evidence)
        subject = claims.get(config.subject_claim)
        if isinstance(subject, str):
            evidence["subject"] = subject
        if len(config.audience) > 1:
            audience = claims.get("aud")
            audience = [audience] if isinstance(audience, str) else list(audience or ())
            if not set(audience) & set(config.audience):
                raise IdentityError("the token was refused: invalid audience", "claims", evidence)
        if config.max_lifetime is not None:
            lifetime = claims["exp"] - claims["iat"]
            if lifetime > config.max_lifetime + config.leeway:
                raise IdentityError(
                    "the token is valid for %d seconds, longer than the %d this gateway accepts; "
                    "ask the issuer for a shorter-lived token" % (lifetime, config.max_lifetime),
                    "lifetime",
                    evidence,
                )
        for claim, allowed in sorted(config.required_claims.items()):
            value = claims.get(claim)
            if not isinstance(value, str) or value not in allowed:
                raise IdentityError(
                    "the token's %r claim is not one this gateway accepts" % (claim,), "claims", evidence
                )
        identity = self._identity(claims, kid, algorithm, origin, evidence)
        if self.replay is not None:
            yield self._check_replay(claims, consume, evidence)
        return identity

    @defer.inlineCallbacks
    def _check_replay(self, claims, consume, evidence):
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise IdentityError(
                "the token has no jti, and this issuer's tokens must each be used once", "replay", evidence
            )
        # The cache may answer later: shared between replicas, it asks the
        # PostgreSQL store (hoopgw.replicas).
        try:
            if consume:
                fresh = yield defer.maybeDeferred(self.replay.use, jti, claims["exp"] + self.config.leeway)
            else:
                fresh = not (yield defer.maybeDeferred(self.replay.seen, jti))
        except OverflowError:
            raise IdentityError("the gateway holds too many unexpired tokens to check this one for replay", "replay", evidence)
        except StoreError as error:
            raise IdentityError(
                "the token could not be checked for replay against the other replicas (%s); try again" % (error,),
                "replay",
                evidence,
            )
        if not fresh:
            raise IdentityError(
                "the token (jti %s) was already used; each token opens one session, so fetch a new one" % (jti,),
                "replayed",
                evidence,
            )

    def _identity(self, claims, kid, algorithm, origin, evidence):
        config = self.config
        subject = claims.get(config.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise IdentityError(
                "the token has no %r claim naming who it is for" % (config.subject_claim,), "claims", evidence
            )
        groups = claims.get(config.groups_claim, [])
        if isinstance(groups, str):
            groups = groups.split()
        if not isinstance(groups, list) or not all(isinstance(group, str) for group in groups):
            raise IdentityError(
                "the token's %r claim is not a list of group names" % (config.groups_claim,), "claims", evidence
            )
        kind = config.kind
        if config.kind_claim is not None:
            value = claims.get(config.kind_claim)
            if value in config.service_values:
                kind = SERVICE
            elif value in config.human_values:
                kind = HUMAN
            else:
                raise IdentityError(
                    "the token's %r claim does not say whether it is a service or a human" % (config.kind_claim,),
                    "claims",
                    evidence,
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
                "keys": self.key_set.source,
                "keys_from": origin,
                "issued_at": claims.get("iat"),
                "expires_at": claims.get("exp"),
                "replay_checked": self.replay is not None,
                "groups": {"token": sorted(groups)},
            },
        )


def _select(keys, kid):
    if kid is not None:
        return keys.get(kid)
    if len(keys) == 1:
        return next(iter(keys.values()))
    return None


NOT_A_TOKEN = "the password is not a JSON Web Token nor a SAML assertion; sign in with your identity token"


def unverified_header(token):
    """
    The header of a compact JWT, not yet trusted.

    @raise IdentityError: if C{token} is not a JWT.
    """
    try:
        header = jwt.get_unverified_header(token)
    except JWTError:
        raise IdentityError(NOT_A_TOKEN, "not-a-token")
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
        raise IdentityError(NOT_A_TOKEN, "not-a-token")
    if not isinstance(claims, dict):
        raise IdentityError("the token's claims are not a JSON object", "not-a-token")
    return claims
