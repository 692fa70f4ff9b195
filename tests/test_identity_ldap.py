"""
Groups from a real OpenLDAP slapd: nested groups, memberOf, StartTLS and
LDAPS with certificate checks, a bind account whose password comes from a
file or the environment, caching, refusal when the directory is down, and
filter injection; the main cases end to end through the PostgreSQL
gateway.
"""

import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from hoopgw.identity import ldap
from hoopgw.identity.errors import IdentityError
from hoopgw.options import ConfigError
from testbed.throwaway import free_port
from tests import identity_fixtures as fixtures
from tests import support
from tests.identity_fixtures import IdentityGateway
from tests.support import psql


def make_directory(**overrides):
    raw = fixtures.ldap_provider(**overrides)
    raw.pop("type")
    return ldap.parse_provider("corp-ldap", raw, "identity_providers.corp-ldap").build(reactor)


class DirectoryTests(unittest.TestCase):
    """
    L{ldap.LDAPDirectory.groups_for} against the run's slapd.
    """

    @defer.inlineCallbacks
    def test_nested_groups(self):
        """
        ci-bot is in payments-bots, which is in db-readers, which is in
        db-admins: all three are its groups.  The answer names the entry
        and the server that gave it.
        """
        instance, _ = fixtures.directory()
        answer = yield make_directory().groups_for("ci-bot")
        self.assertEqual(answer.groups, {"payments-bots", "db-readers", "db-admins"})
        self.assertEqual(answer.dn, "uid=ci-bot," + fixtures.PEOPLE)
        self.assertEqual(answer.server, instance.url)

    @defer.inlineCallbacks
    def test_not_nested(self):
        """
        With nested off, only the groups naming the entry itself count.
        """
        answer = yield make_directory(nested=False).groups_for("ci-bot")
        self.assertEqual(answer.groups, {"payments-bots"})

    @defer.inlineCallbacks
    def test_memberof(self):
        """
        With membership: memberof, the direct groups come from the entry's
        memberOf attribute (kept by slapd's memberof overlay); nesting is
        still followed.
        """
        answer = yield make_directory(membership="memberof").groups_for("ci-bot")
        self.assertEqual(answer.groups, {"payments-bots", "db-readers", "db-admins"})

    @defer.inlineCallbacks
    def test_unknown_subject(self):
        """
        A subject without an entry has no directory groups.
        """
        answer = yield make_directory().groups_for("nobody")
        self.assertEqual((answer.dn, answer.groups), (None, frozenset()))

    @defer.inlineCallbacks
    def test_injection(self):
        """
        Filter metacharacters in a subject are escaped: a subject of '*',
        or one that tries to close the filter and add a clause matching
        everyone, finds no entry and no groups.
        """
        directory = make_directory()
        for subject in ("*", "ci-bot)(uid=*", "*)(|(objectClass=*", "ci-bot\\2a", "ci-bot\x00"):
            answer = yield directory.groups_for(subject)
            self.assertEqual((answer.dn, answer.groups), (None, frozenset()), subject)

    @defer.inlineCallbacks
    def test_cached(self):
        """
        A second lookup within the cache TTL does not ask the directory.
        """
        directory = make_directory(cache_ttl="1m")
        first = yield directory.groups_for("ci-bot")
        second = yield directory.groups_for("ci-bot")
        self.assertEqual((directory.lookups, first.cached, second.cached), (1, False, True))
        self.assertEqual(first.groups, second.groups)

    @defer.inlineCallbacks
    def test_connections_pooled(self):
        """
        Lookups that miss the cache share bound connections instead of
        opening, upgrading and binding one each; stopping closes them.
        """
        directory = make_directory()
        for _ in range(3):
            directory.forget()
            answer = yield directory.groups_for("ci-bot")
            self.assertIn("payments-bots", answer.groups)
        self.assertEqual((directory.lookups, directory.opened), (3, 1))
        directory.close()
        self.assertEqual(directory._idle, [])

    @defer.inlineCallbacks
    def test_stale_pooled_connection(self):
        """
        A pooled connection the directory has closed meanwhile (slapd's
        idletimeout) is replaced at once: the lookup still answers.
        """
        from testbed.throwaway import LdapServer

        server = LdapServer(idle_timeout=1)
        server.start()
        self.addCleanup(server.stop)
        server.add_ldif(
            "dn: ou=people,dc=example,dc=org\nobjectClass: organizationalUnit\nou: people\n\n"
            "dn: uid=bot,ou=people,dc=example,dc=org\nobjectClass: inetOrgPerson\nuid: bot\ncn: bot\nsn: bot\n\n"
            "dn: cn=g,dc=example,dc=org\nobjectClass: groupOfNames\ncn: g\nmember: uid=bot,ou=people,dc=example,dc=org\n"
        )
        directory = make_directory(
            url=server.url, ca=server.ca_path, bind_dn=None, bind_password=None,
            user_base="ou=people,dc=example,dc=org", group_base="dc=example,dc=org",
        )
        self.addCleanup(directory.close)
        first = yield directory.groups_for("bot")
        yield task.deferLater(reactor, 2.5, lambda: None)
        directory.forget()
        second = yield directory.groups_for("bot")
        self.assertEqual((first.groups, second.groups), ({"g"}, {"g"}))
        self.assertEqual(directory.opened, 2)

    @defer.inlineCallbacks
    def test_ldaps(self):
        """
        Over LDAPS, with the server's certificate checked against the CA.
        """
        instance, _ = fixtures.directory()
        answer = yield make_directory(url=instance.ldaps_url).groups_for("alice")
        self.assertEqual(answer.groups, {"marketing"})
        self.assertEqual(answer.server, instance.ldaps_url)

    @defer.inlineCallbacks
    def assertUnavailable(self, directory, expected):
        try:
            yield directory.groups_for("ci-bot")
        except IdentityError as error:
            self.assertEqual(error.reason, "directory-unavailable")
            self.assertIn(expected, str(error))
            self.assertEqual(error.evidence["directory"], "corp-ldap")
            return
        self.fail("the lookup succeeded")

    def test_wrong_ca(self):
        """
        A directory whose certificate does not chain to the configured CA
        is not trusted, over StartTLS as over LDAPS.
        """
        instance, _ = fixtures.directory()
        _, other_ca = fixtures.client_ca()
        return defer.gatherResults(
            [
                self.assertUnavailable(make_directory(ca=other_ca), "cannot be reached or refused"),
                self.assertUnavailable(make_directory(ca=other_ca, url=instance.ldaps_url), "cannot be reached"),
            ]
        )

    def test_wrong_bind_password(self):
        """
        The bind password comes from the environment here; a wrong one is
        refused by the directory, and so the lookup fails.
        """
        os.environ["HOOPGW_TEST_LDAP_PASSWORD"] = "not-the-password"
        self.addCleanup(os.environ.pop, "HOOPGW_TEST_LDAP_PASSWORD", None)
        return self.assertUnavailable(
            make_directory(bind_password={"env": "HOOPGW_TEST_LDAP_PASSWORD"}), "invalidCredentials"
        )

    def test_directory_down(self):
        """
        A directory nobody answers for refuses, quickly.
        """
        return self.assertUnavailable(make_directory(url="ldap://127.0.0.1:%d" % (free_port(),), timeout="2s"), "corp-ldap")

    def test_failover(self):
        """
        With several URLs, a server that is down is skipped for the next.
        """
        instance, _ = fixtures.directory()
        directory = make_directory(url=["ldap://127.0.0.1:%d" % (free_port(),), instance.url], timeout="2s")
        return directory.groups_for("alice").addCallback(lambda answer: self.assertEqual(answer.server, instance.url))

    def test_configuration_checked(self):
        """
        StartTLS cannot be turned off for a remote directory, and a filter
        must have a place for the escaped value.
        """
        base = {"user_base": fixtures.PEOPLE}
        error = self.assertRaises(
            ConfigError, ldap.parse_provider, "d", dict(base, url="ldap://ldap.example.org", start_tls=False), "d"
        )
        self.assertIn("loopback", str(error))
        error = self.assertRaises(
            ConfigError, ldap.parse_provider, "d", dict(base, url="ldaps://ldap.example.org", user_filter="(uid=bob)"), "d"
        )
        self.assertIn("{subject}", str(error))


class GatewayTests(unittest.TestCase):
    """
    LDAP groups deciding PostgreSQL sessions, with the real psql.
    """

    def gateway(self, directory=None, **identity):
        options = {"groups_from": "corp-ldap", "groups_combine": "directory"}
        options.update(identity)
        return IdentityGateway(
            self,
            providers={"corp-ldap": directory or fixtures.ldap_provider()},
            identity=options,
            connection={"allowed_groups": ["db-admins"]},
        )

    @defer.inlineCallbacks
    def test_grant(self):
        """
        A token carrying no groups gets in because the directory puts its
        subject in db-admins (through two nested groups); the record says
        which server and entry decided, and the groups as decided.
        """
        gateway = self.gateway()
        instance, _ = fixtures.directory()
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=support.token(groups=[]))
        self.assertEqual((out.strip(), code), ("1", 0), err)
        (start,) = yield gateway.wait_for("session.start")
        identity = start["identity"]
        self.assertEqual(identity["groups"], ["db-admins", "db-readers", "payments-bots"])
        directory = identity["provenance"]["directory"]
        self.assertEqual((directory["provider"], directory["server"]), ("corp-ldap", instance.url))
        self.assertEqual(directory["dn"], "uid=ci-bot," + fixtures.PEOPLE)
        self.assertEqual(identity["provenance"]["groups"]["token"], [])
        self.assertEqual(identity["provenance"]["groups"]["decided"], identity["groups"])

    @defer.inlineCallbacks
    def test_deny(self):
        """
        With groups_combine: directory, a token's own groups claim does not
        count: alice's token says db-admins, the directory says marketing,
        and she is refused (28000).
        """
        gateway = self.gateway()
        out, err, code = yield psql(
            gateway.dsn(user="alice"), "-c", "SELECT 1", password=support.token(subject="alice", groups=["db-admins"])
        )
        self.assertNotEqual(code, 0)
        self.assertIn("not in any group allowed", err)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["sqlstate"], "28000")
        self.assertEqual(refused["identity"]["groups"], ["marketing"])

    @defer.inlineCallbacks
    def test_directory_down(self):
        """
        When the directory cannot be reached, the session is refused (fail
        closed) with a sentence naming the directory, and the refusal is
        recorded with the directory consulted.
        """
        gateway = self.gateway(fixtures.ldap_provider(url="ldap://127.0.0.1:%d" % (free_port(),), timeout="2s"))
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=support.token())
        self.assertNotEqual(code, 0)
        self.assertIn("the directory corp-ldap cannot be reached", err)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["attributes"]["identity_refused"], "directory-unavailable")
        self.assertEqual(refused["attributes"]["identity_evidence"]["directory"], "corp-ldap")
        self.assertEqual(refused["refusal"]["sqlstate"], "28P01")

    @defer.inlineCallbacks
    def test_directory_down_token_groups_suffice(self):
        """
        When the connection says token groups suffice, a directory that is
        down does not refuse: the token's groups decide, and the record
        says the directory could not be asked.
        """
        gateway = self.gateway(
            fixtures.ldap_provider(url="ldap://127.0.0.1:%d" % (free_port(),), timeout="2s"), token_groups_suffice=True
        )
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=support.token(groups=["db-admins"]))
        self.assertEqual((out.strip(), code), ("1", 0), err)
        (start,) = yield gateway.wait_for("session.start")
        directory = start["identity"]["provenance"]["directory"]
        self.assertIn("cannot be reached", directory["error"])
        self.assertIn("token_groups_suffice", directory["fallback"])

    @defer.inlineCallbacks
    def test_injection_in_subject(self):
        """
        A token whose subject is '*' (from a careless issuer) matches no
        directory entry and gets no directory groups: refused.
        """
        gateway = self.gateway()
        out, err, code = yield psql(gateway.dsn(user="*)(uid=*"), "-c", "SELECT 1", password=support.token(subject="*)(uid=*"))
        self.assertNotEqual(code, 0)
        self.assertIn("not in any group allowed", err)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["identity"]["groups"], [])
        self.assertIsNone(refused["identity"]["provenance"]["directory"]["dn"])
