"""
OIDC as identity providers run it: discovery, key rotation, cache headers,
a rate limit on refreshes for unknown key ids, a warm cache while the
provider is down, token lifetime and replay, several issuers at once.
Against a real HTTP stand-in on loopback; the main cases end to end
through the PostgreSQL gateway with the real psql.
"""

import time

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from hoopgw.identity import oidc
from hoopgw.identity.errors import IdentityError
from hoopgw.identity.keys import cache_lifetime
from hoopgw.identity.replay import ReplayCache
from hoopgw.options import ConfigError
from tests import support
from tests.identity_fixtures import IdentityGateway, IssuerStandIn
from tests.support import psql


def make_provider(issuer, clock, **overrides):
    raw = issuer.provider(**overrides)
    raw.pop("type")
    config = oidc.parse_provider("corp", raw, "identity_providers.corp")
    return oidc.OIDCProvider(config, reactor, clock=clock)


class DiscoveryTests(unittest.TestCase):
    """
    Keys found through discovery, cached by the provider's headers,
    refreshed for rotation but not for a flood of bogus key ids.
    """

    def setUp(self):
        self.issuer = IssuerStandIn(self)
        self.clock = Clock()

    @defer.inlineCallbacks
    def assertRefused(self, provider, token, reason):
        try:
            yield provider.verify(token)
        except IdentityError as error:
            self.assertEqual(error.reason, reason, str(error))
            return error
        self.fail("the token was accepted")

    @defer.inlineCallbacks
    def test_discovery_then_cache(self):
        """
        Without jwks_url or jwks_file, the keys come from the jwks_uri of
        the issuer's discovery document, and the next token is checked
        from the cache without asking again.
        """
        provider = make_provider(self.issuer, self.clock)
        identity = yield provider.verify(self.issuer.token())
        self.assertEqual(identity.subject, "ci-bot")
        self.assertEqual(identity.provenance["keys"], self.issuer.issuer + "/keys")
        self.assertEqual(identity.provenance["keys_from"], "fetched")
        self.assertEqual(identity.provenance["kid"], "key-1")
        self.assertEqual(identity.provenance["algorithm"], "ES256")
        identity = yield provider.verify(self.issuer.token())
        self.assertEqual(identity.provenance["keys_from"], "cache")
        self.assertEqual(
            (self.issuer.requests["/.well-known/openid-configuration"], self.issuer.requests["/keys"]), (1, 1)
        )

    @defer.inlineCallbacks
    def test_rotation_picked_up(self):
        """
        When the issuer rotates to a new key, the first token signed with
        it makes the gateway fetch the keys again, and it is accepted; a
        token signed with the retired key is then refused.
        """
        provider = make_provider(self.issuer, self.clock)
        old = self.issuer.token(kid="key-1")
        yield provider.verify(old)
        self.issuer.add_key("key-2")
        self.issuer.publish("key-2")
        identity = yield provider.verify(self.issuer.token(kid="key-2"))
        self.assertEqual((identity.provenance["kid"], identity.provenance["keys_from"]), ("key-2", "fetched"))
        self.assertEqual(self.issuer.requests["/keys"], 2)
        yield self.assertRefused(provider, self.issuer.token(kid="key-1"), "unknown-kid")

    @defer.inlineCallbacks
    def test_unknown_kid_flood_rate_limited(self):
        """
        A hundred tokens naming made-up key ids cause at most one extra
        fetch per refresh interval: the provider is not hammered.  Once
        the interval has passed, one more refresh is allowed.
        """
        provider = make_provider(self.issuer, self.clock, refresh_interval="60s")
        yield provider.verify(self.issuer.token())
        attempts = [provider.verify(self.issuer.token(kid="bogus-%d" % (index,))) for index in range(100)]
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        reasons = {failure.value.reason for ok, failure in results if not ok}
        self.assertEqual(reasons, {"unknown-kid"})
        self.assertFalse(any(ok for ok, _ in results))
        self.assertEqual(self.issuer.requests["/keys"], 2)
        more = [provider.verify(self.issuer.token(kid="again-%d" % (index,))) for index in range(20)]
        yield defer.DeferredList(more, consumeErrors=True)
        self.assertEqual(self.issuer.requests["/keys"], 2)
        self.clock.advance(61)
        yield self.assertRefused(provider, self.issuer.token(kid="later"), "unknown-kid")
        self.assertEqual(self.issuer.requests["/keys"], 3)

    @defer.inlineCallbacks
    def test_cache_headers_obeyed(self):
        """
        Keys served with max-age=120 are used for 120 seconds without a
        fetch, then fetched again.
        """
        self.issuer.headers = {"Cache-Control": "public, max-age=120"}
        provider = make_provider(self.issuer, self.clock, refresh_interval="10s")
        yield provider.verify(self.issuer.token())
        self.clock.advance(110)
        yield provider.verify(self.issuer.token())
        self.assertEqual(self.issuer.requests["/keys"], 1)
        self.clock.advance(15)
        identity = yield provider.verify(self.issuer.token())
        self.assertEqual(identity.provenance["keys_from"], "fetched")
        self.assertEqual(self.issuer.requests["/keys"], 2)

    @defer.inlineCallbacks
    def test_provider_down_warm_cache(self):
        """
        When the provider stops answering, keys fetched earlier are still
        used past their freshness (recorded as stale-cache), failed
        fetches are not retried more than once per refresh interval, and
        once max_stale has passed too, tokens are refused (fail closed).
        """
        self.issuer.headers = {"Cache-Control": "max-age=60"}
        provider = make_provider(self.issuer, self.clock, refresh_interval="30s", max_stale="10m")
        yield provider.verify(self.issuer.token())
        self.issuer.failing = True
        self.clock.advance(61)
        identity = yield provider.verify(self.issuer.token())
        self.assertEqual(identity.provenance["keys_from"], "stale-cache")
        asked = self.issuer.requests["/keys"]
        for _ in range(10):
            yield provider.verify(self.issuer.token())
        self.assertEqual(self.issuer.requests["/keys"], asked)
        yield self.issuer.stop()
        self.clock.advance(700)
        error = yield self.assertRefused(provider, self.issuer.token(), "jwks-unavailable")
        self.assertIn("cannot get the issuer's signing keys", str(error))

    @defer.inlineCallbacks
    def test_provider_down_cold(self):
        """
        A provider that never answered proves nothing: tokens are refused.
        """
        self.issuer.failing = True
        provider = make_provider(self.issuer, self.clock)
        yield self.assertRefused(provider, self.issuer.token(), "jwks-unavailable")

    @defer.inlineCallbacks
    def test_discovery_names_another_issuer(self):
        """
        A discovery document naming an issuer other than the configured
        one is not trusted (OpenID Connect Discovery 4.3).
        """
        self.issuer.discovered_issuer = "https://evil.example"
        provider = make_provider(self.issuer, self.clock)
        yield self.assertRefused(provider, self.issuer.token(), "jwks-unavailable")
        self.assertEqual(self.issuer.requests["/keys"], 0)

    @defer.inlineCallbacks
    def test_https_with_private_ca(self):
        """
        Over HTTPS, the provider's certificate is checked against the
        configured CA: with it, the keys are fetched; without it (the
        system's CAs), nothing is fetched and tokens are refused.
        """
        issuer = IssuerStandIn(self, tls=True)
        provider = make_provider(issuer, self.clock, ca=issuer.ca_path)
        identity = yield provider.verify(issuer.token())
        self.assertEqual(identity.provenance["keys"], issuer.issuer + "/keys")
        untrusting = make_provider(issuer, self.clock)
        yield self.assertRefused(untrusting, issuer.token(), "jwks-unavailable")
        self.assertEqual(issuer.requests["/keys"], 1)

    @defer.inlineCallbacks
    def test_jwks_url(self):
        """
        A configured jwks_url is used directly, without discovery.
        """
        provider = make_provider(self.issuer, self.clock, jwks_url=self.issuer.issuer + "/keys")
        yield provider.verify(self.issuer.token())
        self.assertEqual(self.issuer.requests["/.well-known/openid-configuration"], 0)


class TokenTests(unittest.TestCase):
    """
    Lifetimes, replay, claims and the kind of identity, per issuer.
    """

    def setUp(self):
        self.issuer = IssuerStandIn(self)
        self.clock = Clock()

    @defer.inlineCallbacks
    def refused(self, provider, token):
        try:
            yield provider.verify(token)
        except IdentityError as error:
            return error
        self.fail("the token was accepted")

    @defer.inlineCallbacks
    def test_expired(self):
        """
        A token whose exp has passed (beyond the leeway) is refused.
        """
        provider = make_provider(self.issuer, self.clock)
        error = yield self.refused(provider, self.issuer.token(now=time.time() - 3600, lifetime=600))
        self.assertEqual(error.reason, "expired")
        self.assertEqual(error.evidence["kid"], "key-1")

    @defer.inlineCallbacks
    def test_too_long_lived(self):
        """
        With max_lifetime, a token valid for longer (exp - iat) is refused
        even though it has not expired (PCI DSS 8.6.3).
        """
        provider = make_provider(self.issuer, self.clock, max_lifetime="1h")
        yield provider.verify(self.issuer.token(lifetime=3600))
        error = yield self.refused(provider, self.issuer.token(lifetime=86400))
        self.assertEqual(error.reason, "lifetime")
        self.assertIn("longer than the 3600", str(error))

    @defer.inlineCallbacks
    def test_replayed(self):
        """
        With replay protection, a token is accepted once; presented again
        while it is valid, it is refused.  A dry run (whoami) does not use
        it up.
        """
        provider = make_provider(self.issuer, self.clock, max_lifetime="15m", replay_protection=True)
        token = self.issuer.token()
        yield provider.verify(token, consume=False)
        identity = yield provider.verify(token)
        self.assertTrue(identity.provenance["replay_checked"])
        error = yield self.refused(provider, token)
        self.assertEqual(error.reason, "replayed")
        error = yield self.refused(provider, self.issuer.token(extra={"jti": None}))
        self.assertIn("has no jti", str(error))

    def test_replay_cache_forgets_expired(self):
        """
        The replay cache keeps an id only until its credential expires, so
        its memory stays bounded.
        """
        clock = Clock()
        clock.advance(1000)
        cache = ReplayCache(clock)
        self.assertTrue(cache.use("a", 1100))
        self.assertTrue(cache.use("b", 2000))
        self.assertFalse(cache.use("a", 1100))
        clock.advance(150)
        self.assertEqual(len(cache), 1)
        self.assertTrue(cache.use("a", 1300))

    def test_replay_needs_max_lifetime(self):
        """
        Replay protection without max_lifetime is a configuration error:
        the memory of used tokens would have no bound.
        """
        raw = self.issuer.provider(replay_protection=True)
        raw.pop("type")
        error = self.assertRaises(ConfigError, oidc.parse_provider, "corp", raw, "identity_providers.corp")
        self.assertIn("needs max_lifetime", str(error))

    def test_insecure_url_refused(self):
        """
        Keys fetched over plain HTTP from anywhere but loopback could be
        swapped on the way: such a URL is a configuration error.
        """
        error = self.assertRaises(
            ConfigError,
            oidc.parse_provider,
            "corp",
            {"issuer": "x", "audience": "a", "jwks_url": "http://idp.example.org/keys"},
            "identity_providers.corp",
        )
        self.assertIn("https://", str(error))

    @defer.inlineCallbacks
    def test_kind_and_required_claims(self):
        """
        A claim marks humans and services with configured values, and
        required claims restrict whose tokens are accepted.
        """
        provider = make_provider(
            self.issuer,
            self.clock,
            kind_claim="principal_type",
            human_values=["user"],
            service_values=["workload"],
            required_claims={"org": ["acme"]},
        )
        identity = yield provider.verify(self.issuer.token(extra={"principal_type": "user", "org": "acme"}))
        self.assertEqual(identity.kind, "human")
        identity = yield provider.verify(self.issuer.token(extra={"principal_type": "workload", "org": "acme"}))
        self.assertEqual(identity.kind, "service")
        error = yield self.refused(provider, self.issuer.token(extra={"principal_type": "robot", "org": "acme"}))
        self.assertIn("service or a human", str(error))
        error = yield self.refused(provider, self.issuer.token(extra={"principal_type": "user", "org": "evil"}))
        self.assertIn("'org' claim", str(error))

    def test_cache_lifetime(self):
        """
        Cache-Control max-age wins, no-store and no-cache mean at once,
        Expires counts from Date, and silence is None.
        """
        self.assertEqual(cache_lifetime({"cache-control": "public, max-age=600"}, 0), 600)
        self.assertEqual(cache_lifetime({"cache-control": "no-store"}, 0), 0)
        self.assertEqual(
            cache_lifetime({"expires": "Wed, 21 Oct 2015 07:30:00 GMT", "date": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0), 120
        )
        self.assertEqual(cache_lifetime({"expires": "0"}, 0), 0)
        self.assertIsNone(cache_lifetime({}, 0))


class GatewayTests(unittest.TestCase):
    """
    Through the PostgreSQL gateway with the real psql: rotation, two
    issuers, replay, and what the record says.
    """

    def setUp(self):
        self.issuer = IssuerStandIn(self)

    @defer.inlineCallbacks
    def test_rotation_end_to_end(self):
        """
        A bot signs in with a token from a discovered issuer; the issuer
        rotates its key; the next bot's token, signed with the new key, is
        accepted too.  The record names the key and where it came from.
        """
        gateway = IdentityGateway(self, providers={"corp": self.issuer.provider()})
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=self.issuer.token())
        self.assertEqual((out.strip(), code), ("1", 0), err)
        self.issuer.add_key("key-2")
        self.issuer.publish("key-2")
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 2", password=self.issuer.token(kid="key-2"))
        self.assertEqual((out.strip(), code), ("2", 0), err)
        starts = yield gateway.wait_for("session.start", 2)
        provenance = [start["identity"]["provenance"] for start in starts]
        self.assertEqual([entry["kid"] for entry in provenance], ["key-1", "key-2"])
        self.assertEqual([entry["keys_from"] for entry in provenance], ["fetched", "fetched"])
        self.assertEqual(provenance[1]["keys"], self.issuer.issuer + "/keys")
        self.assertEqual(provenance[1]["groups"]["decided"], ["payments-bots"])
        self.assertEqual(self.issuer.requests["/keys"], 2)

    @defer.inlineCallbacks
    def test_two_issuers(self):
        """
        Two issuers at once, each with its own audience and claim mapping:
        a CI issuer for bots and a company IdP for humans.  Each one's
        tokens are accepted with the kind its mapping gives; a token from
        one issuer for the other's audience is refused.
        """
        gateway = IdentityGateway(
            self,
            providers={
                "corp": self.issuer.provider(audience="hoopgw-humans", kind_claim="principal_type", human_values=["user"])
            },
        )
        bot = support.token(subject="ci-bot")
        person = self.issuer.token(subject="alice", audience="hoopgw-humans", extra={"principal_type": "user"})
        for user, token in (("ci-bot", bot), ("alice", person)):
            out, err, code = yield psql(gateway.dsn(user=user), "-c", "SELECT 1", password=token)
            self.assertEqual((out.strip(), code), ("1", 0), err)
        starts = yield gateway.wait_for("session.start", 2)
        seen = {(start["identity"]["subject"], start["identity"]["issuer"], start["identity"]["kind"]) for start in starts}
        self.assertEqual(
            seen, {("ci-bot", support.ISSUER, "service"), ("alice", self.issuer.issuer, "human")}
        )
        wrong = self.issuer.token(subject="alice", audience=support.AUDIENCE, extra={"principal_type": "user"})
        out, err, code = yield psql(gateway.dsn(user="alice"), "-c", "SELECT 1", password=wrong)
        self.assertNotEqual(code, 0)
        self.assertIn("invalid audience", err)

    @defer.inlineCallbacks
    def test_replayed_end_to_end(self):
        """
        With replay protection, a token opens one session; the same token
        again is refused with 28P01 and the refusal is recorded with the
        key id and subject that were tried, never the token.
        """
        gateway = IdentityGateway(
            self, providers={"corp": self.issuer.provider(max_lifetime="10m", replay_protection=True)}
        )
        token = self.issuer.token(lifetime=300)
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=token)
        self.assertEqual(code, 0, err)
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=token)
        self.assertNotEqual(code, 0)
        self.assertIn("was already used", err)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["sqlstate"], "28P01")
        self.assertEqual(refused["attributes"]["identity_refused"], "replayed")
        self.assertEqual(refused["attributes"]["identity_evidence"]["subject"], "ci-bot")
        self.assertEqual(refused["attributes"]["identity_evidence"]["kid"], "key-1")
        self.assertNotIn(token.encode(), gateway.raw_store())

    @defer.inlineCallbacks
    def test_too_long_lived_end_to_end(self):
        """
        A day-long token is refused where the issuer's tokens may live an
        hour at most.
        """
        gateway = IdentityGateway(self, providers={"corp": self.issuer.provider(max_lifetime="1h")})
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=self.issuer.token(lifetime=86400))
        self.assertNotEqual(code, 0)
        self.assertIn("longer than the 3600 this gateway accepts", err)
