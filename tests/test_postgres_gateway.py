"""
The PostgreSQL gateway end to end: a real cluster behind it, the real
psql, pgbench and psycopg2 in front, and the record it leaves.
"""

import os
import time

import psycopg2
from twisted.internet import defer, reactor, task
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests import support
from tests.support import GatewayHarness, in_thread, psql, token


class LoginTests(unittest.TestCase):
    """
    Who gets in: a valid token in an allowed group over TLS, nobody else.
    """

    def setUp(self):
        self.gateway = GatewayHarness(self)

    @defer.inlineCallbacks
    def test_valid_token(self):
        """
        A token from the configured issuer, for an allowed group, opens a
        session as the gateway's target role; the client never learns the
        target's password.
        """
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT current_user", password=token())
        self.assertEqual((out.strip(), code), ("app", 0), err)
        (start,) = self.gateway.events("session.start")
        self.assertEqual(start["identity"]["subject"], "ci-bot")
        self.assertEqual(start["identity"]["method"], "oidc")
        self.assertEqual(start["attributes"]["database"], "payments")
        self.assertNotIn(support.APP_PASSWORD.encode(), self.gateway.raw_store())

    @defer.inlineCallbacks
    def assertRefused(self, password, expected, sqlstate="28P01", user="ci-bot", **dsn):
        """
        psql is refused with C{expected} in its error, and the refusal is
        recorded with its reason and never with the token.
        """
        out, err, code = yield psql(self.gateway.dsn(user=user, **dsn), "-c", "SELECT 1", password=password)
        self.assertNotEqual(code, 0)
        self.assertIn(expected, err)
        refused = self.gateway.events("session.refused")
        self.assertEqual(len(refused), 1, refused)
        self.assertIn(expected, refused[0]["refusal"]["reason"])
        if sqlstate:
            self.assertEqual(refused[0]["refusal"]["sqlstate"], sqlstate)
        self.assertEqual(self.gateway.events("session.start"), [])
        if password:
            self.assertNotIn(password.encode(), self.gateway.raw_store())

    def test_expired(self):
        """
        An expired token is refused (28P01) and recorded (PCI DSS 10.2.1.4).
        """
        return self.assertRefused(token(now=time.time() - 3600, lifetime=600), "the token has expired")

    def test_wrong_audience(self):
        """
        A token issued for another audience is refused.
        """
        return self.assertRefused(token(audience="someone-else"), "invalid audience")

    def test_wrong_issuer(self):
        """
        A token from an issuer the connection does not trust is refused.
        """
        return self.assertRefused(token(issuer="https://evil.example"), "tokens from the issuer")

    def test_unknown_kid(self):
        """
        A token signed with a key that is not in the issuer's JWKS is refused.
        """
        from hoopgw.identity import dev

        other, _ = dev.generate_key(self.mktemp(), kid="test-1")
        with open(other, "rb") as handle:
            forged = dev.mint(handle.read(), "ci-bot", support.ISSUER, support.AUDIENCE, ["payments-bots"], kid="rogue")
        return self.assertRefused(forged, "is not one of the issuer's keys")

    def test_wrong_key_same_kid(self):
        """
        A token whose kid names a real key but which another key signed fails
        the signature check.
        """
        from hoopgw.identity import dev

        other, _ = dev.generate_key(self.mktemp(), kid="test-1")
        with open(other, "rb") as handle:
            forged = dev.mint(handle.read(), "ci-bot", support.ISSUER, support.AUDIENCE, ["payments-bots"], kid="test-1")
        return self.assertRefused(forged, "signature is not valid")

    def test_alg_none(self):
        """
        An unsigned token (alg none) is refused.
        """
        import base64
        import json

        def part(value):
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

        claims = {
            "iss": support.ISSUER,
            "aud": support.AUDIENCE,
            "sub": "ci-bot",
            "groups": ["payments-bots"],
            "exp": int(time.time()) + 600,
        }
        unsigned = part({"alg": "none", "typ": "JWT", "kid": "test-1"}) + "." + part(claims) + "."
        return self.assertRefused(unsigned, "tokens signed with 'none' are not accepted")

    def test_hs256_with_public_key(self):
        """
        The classic key-confusion forgery, an HS256 token whose HMAC key is
        the issuer's public key, is refused.
        """
        import json

        from jose import jwt

        _, jwks_path = support.issuer()
        with open(jwks_path) as handle:
            public = json.dumps(json.load(handle)["keys"][0])
        forged = jwt.encode(
            {
                "iss": support.ISSUER,
                "aud": support.AUDIENCE,
                "sub": "ci-bot",
                "groups": ["payments-bots"],
                "exp": int(time.time()) + 600,
            },
            public,
            algorithm="HS256",
            headers={"kid": "test-1"},
        )
        return self.assertRefused(forged, "tokens signed with 'HS256' are not accepted")

    def test_group_not_allowed(self):
        """
        A valid token whose groups are not allowed on the connection is
        refused with 28000.
        """
        return self.assertRefused(
            token(groups=["marketing"]), "not in any group allowed to use this connection", sqlstate="28000"
        )

    def test_not_a_token(self):
        """
        A plain password is refused with a sentence saying what to send.
        """
        return self.assertRefused(support.APP_PASSWORD, "the password is not a JSON Web Token")

    def test_user_mismatch(self):
        """
        A token presented under a login name that is not its subject is
        refused.
        """
        return self.assertRefused(token(subject="ci-bot"), "is not the token's subject", user="other-bot")

    @defer.inlineCallbacks
    def test_plaintext_refused(self):
        """
        Without TLS, the gateway does not even ask for the token.
        """
        out, err, code = yield psql(self.gateway.dsn(sslmode="disable"), "-c", "SELECT 1", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn("accepts tokens over TLS only", err)

    @defer.inlineCallbacks
    def test_other_database(self):
        """
        A client asking for a database the connection does not serve is told
        which one it does.
        """
        out, err, code = yield psql(self.gateway.dsn(dbname="postgres"), "-c", "SELECT 1", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn("serves the database 'payments' only", err)

    @defer.inlineCallbacks
    def test_verify_full_against_gateway(self):
        """
        A client can check the gateway's certificate (sslmode=verify-full).
        """
        _, _, ca_path = support.gateway_certificate()
        out, err, code = yield psql(
            self.gateway.dsn(sslmode="verify-full", sslrootcert=ca_path), "-c", "SELECT 7", password=token()
        )
        self.assertEqual((out.strip(), code), ("7", 0), err)


class TargetAuthenticationTests(unittest.TestCase):
    """
    The gateway authenticates to the target with SCRAM, MD5 or trust, from
    credentials the client never sees.
    """

    @defer.inlineCallbacks
    def check(self, user, tls="verify-full", password=True):
        target = {"user": user, "tls": tls}
        if not password:
            target["password"] = None
            target["ca"] = None
        gateway = GatewayHarness(self, target=target)
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT current_user", password=token())
        self.assertEqual((out.strip(), code), (user, 0), err)

    def test_scram(self):
        """
        SCRAM-SHA-256 over TLS (the gateway checks the server's signature).
        """
        return self.check("app")

    def test_md5(self):
        """
        MD5 password authentication.
        """
        return self.check("md5_user")

    def test_trust_without_tls(self):
        """
        Trust authentication, with TLS to the target off.
        """
        return self.check("trust_user", tls="disable", password=False)

    @defer.inlineCallbacks
    def test_wrong_target_password(self):
        """
        When the configured target password is wrong, the client gets a
        clear error that does not contain the password.
        """
        path = os.path.join(self.mktemp())
        with open(path, "w") as handle:
            handle.write("wrong-password-xyz\n")
        gateway = GatewayHarness(self, target={"password": {"file": os.path.abspath(path)}})
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn("could not open the target session", err)
        self.assertNotIn("wrong-password-xyz", err)
        ended = yield gateway.wait_for("session.end")
        self.assertIn("target unavailable", ended[0]["reason"])

    @defer.inlineCallbacks
    def test_target_down(self):
        """
        A target that does not answer gives the client a clear error and
        the record a session ended for that reason.
        """
        gateway = GatewayHarness(self, target={"port": support.free_port()})
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn("cannot reach the target database", err)
        ended = yield gateway.wait_for("session.end")
        self.assertIn("target unavailable", ended[0]["reason"])

    @defer.inlineCallbacks
    def test_target_certificate_checked(self):
        """
        verify-full refuses a target whose certificate does not chain to the
        configured CA.
        """
        _, _, other_ca = support.gateway_certificate()
        gateway = GatewayHarness(self, target={"ca": other_ca})
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn("could not open the target session", err)
        self.assertIn("certificate verify failed", err)

    def test_unusable_certificate_refused_at_start(self):
        """
        A certificate whose key does not match it stops the gateway from
        starting, with the connection and the files named.
        """
        from hoopgw.options import ConfigError
        from testbed.pki import make_ca

        certificate, _, _ = support.gateway_certificate()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        _, other_key = make_ca("another").issue("localhost").write(directory, "other")
        error = self.assertRaises(ConfigError, GatewayHarness, self, tls={"certificate": certificate, "key": other_key})
        self.assertIn("connections.payments.tls: the gateway cannot use %s, %s" % (certificate, other_key), str(error))
        self.assertIn("KEY_VALUES_MISMATCH", str(error))

    @defer.inlineCallbacks
    def test_target_name_checked(self):
        """
        verify-full also checks the name in the target's certificate;
        verify-ca checks only that it chains to the CA.
        """
        gateway = GatewayHarness(self, target={"server_name": "elsewhere.example"})
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn("certificate verify failed", err)
        self.assertIn("elsewhere.example", err)
        gateway = GatewayHarness(self, target={"server_name": "elsewhere.example", "tls": "verify-ca"})
        out, err, code = yield psql(gateway.dsn(), "-A", "-t", "-c", "SELECT 1", password=token())
        self.assertEqual((out.strip(), code), ("1", 0), err)

    @defer.inlineCallbacks
    def test_target_tls_require(self):
        """
        tls: require encrypts without checking the target's certificate
        (libpq's sslmode=require): another CA's server is accepted, and the
        session is encrypted on the target's side too.
        """
        _, _, other_ca = support.gateway_certificate()
        gateway = GatewayHarness(self, target={"tls": "require", "ca": other_ca})
        out, err, code = yield psql(
            gateway.dsn(), "-A", "-t", "-c", "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", password=token()
        )
        self.assertEqual((out.strip(), code), ("t", 0), err)


class QueryTests(unittest.TestCase):
    """
    The protocol through the gateway: every statement a command in the
    record, answers unchanged.
    """

    def setUp(self):
        self.gateway = GatewayHarness(self)
        self.token = token()

    def connect(self):
        return psycopg2.connect(self.gateway.dsn(password=self.token))

    @defer.inlineCallbacks
    def test_multi_statement(self):
        """
        A simple query with three statements runs as one, and each
        statement is its own command in the record, in order, with its
        statement type and outcome.
        """
        out, err, code = yield psql(
            self.gateway.dsn(),
            "-c",
            "CREATE TEMP TABLE t(a int); INSERT INTO t VALUES (1),(2); SELECT count(*) FROM t",
            password=self.token,
        )
        self.assertEqual((out.strip(), code), ("2", 0), err)
        commands = self.gateway.events("command")
        self.assertEqual(
            [(c["text"], c["facts"]["statement_type"]) for c in commands],
            [
                ("CREATE TEMP TABLE t(a int)", "CREATE"),
                ("INSERT INTO t VALUES (1),(2)", "INSERT"),
                ("SELECT count(*) FROM t", "SELECT"),
            ],
        )
        ends = self.gateway.events("command.end")
        self.assertEqual([e["outcome"]["tag"] for e in ends], ["CREATE TABLE", "INSERT 0 2", "SELECT 1"])
        self.assertEqual([e["command"] for e in ends], [c["command"] for c in commands])
        for event in commands + ends:
            self.assertEqual(event["subject"], "ci-bot")
            self.assertEqual(event["connection"], "payments")

    @defer.inlineCallbacks
    def test_write_ahead(self):
        """
        A command's event is in the store, with a lower sequence number
        than its outcome, and the session's events bracket it.
        """
        yield psql(self.gateway.dsn(), "-c", "SELECT 1", password=self.token)
        yield self.gateway.wait_for("session.end")
        kinds = [event["type"] for event in self.gateway.events() if event.get("session")]
        self.assertEqual(kinds, ["session.start", "command", "command.end", "session.end"])

    @defer.inlineCallbacks
    def test_extended_protocol(self):
        """
        psycopg 3 binds parameters server-side (the extended protocol):
        Parse/Bind/Execute become one command carrying the SQL and its
        redacted parameters, and binary results come back intact.
        """
        import psycopg

        def run():
            with psycopg.connect(self.gateway.dsn(password=self.token)) as connection:
                text = connection.execute(
                    "SELECT %s::int + %s::int AS sum, %s::text AS card", (40, 2, "4111 1111 1111 1111")
                ).fetchone()
                binary = connection.cursor(binary=True).execute("SELECT %s::int * 2", (21,)).fetchone()
                return text, binary

        text, binary = yield in_thread(run)
        self.assertEqual(text, (42, "4111 1111 1111 1111"))
        self.assertEqual(binary, (42,))
        (command,) = [c for c in self.gateway.events("command") if "AS card" in c["text"]]
        self.assertEqual(command["facts"]["protocol"], "extended")
        self.assertEqual(command["text"], "SELECT $1::int + $2::int AS sum, $3::text AS card")
        self.assertEqual(command["parameters"][2], "4111 11** **** 1111")
        self.assertNotIn(b"4111 1111 1111 1111", self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_pipeline(self):
        """
        psql's pipeline mode is not in 15; pgbench's prepared mode pipelines
        Bind/Execute/Sync: all transactions succeed and each SELECT is
        recorded.
        """
        instance = support.cluster()
        instance.psql("DROP TABLE IF EXISTS pgbench_accounts, pgbench_branches, pgbench_history, pgbench_tellers", dbname="payments", user="app", password=support.APP_PASSWORD)
        init = yield getProcessOutputAndValue(
            support.PGBENCH,
            ["-i", "-s", "1", "-q", instance.dsn("app", support.APP_PASSWORD, dbname="payments")],
            env={"PATH": os.environ["PATH"]},
        )
        self.assertEqual(init[2], 0, init[1])
        result = yield getProcessOutputAndValue(
            support.PGBENCH,
            ["-S", "-M", "prepared", "-c", "2", "-t", "50", "-n", self.gateway.dsn()],
            env={"PATH": os.environ["PATH"], "PGPASSWORD": self.token},
        )
        out = result[0].decode()
        self.assertEqual(result[2], 0, result[1])
        self.assertIn("number of transactions actually processed: 100/100", out)
        selects = [c for c in self.gateway.events("command") if c["text"].startswith("SELECT abalance")]
        self.assertEqual(len(selects), 100, [c["text"] for c in selects[:3]])
        self.assertTrue(all(c["facts"]["protocol"] == "extended" for c in selects))
        ends = [e for e in self.gateway.events("command.end") if e["outcome"].get("tag") == "SELECT 1"]
        self.assertGreaterEqual(len(ends), 100)

    @defer.inlineCallbacks
    def test_copy_both_ways(self):
        """
        COPY FROM STDIN and COPY TO STDOUT pass through, each one command.
        """

        def run():
            connection = self.connect()
            try:
                import io

                cursor = connection.cursor()
                cursor.execute("CREATE TEMP TABLE c(a int, b text)")
                cursor.copy_expert("COPY c FROM STDIN", io.StringIO("1\tone\n2\ttwo\n3\tthree\n"))
                out = io.StringIO()
                cursor.copy_expert("COPY c TO STDOUT", out)
                return out.getvalue()
            finally:
                connection.close()

        copied = yield in_thread(run)
        self.assertEqual(copied, "1\tone\n2\ttwo\n3\tthree\n")
        tags = [e["outcome"].get("tag") for e in self.gateway.events("command.end")]
        self.assertIn("COPY 3", tags)
        self.assertEqual(tags.count("COPY 3"), 2)

    @defer.inlineCallbacks
    def test_upstream_error(self):
        """
        A statement that fails at the target fails for the client with the
        target's error; the record has the SQLSTATE, and later statements of
        the same query are recorded as not run.
        """
        out, err, code = yield psql(
            self.gateway.dsn(), "-c", "SELECT 1/0; SELECT 2", password=self.token
        )
        self.assertNotEqual(code, 0)
        self.assertIn("division by zero", err)
        ends = self.gateway.events("command.end")
        self.assertEqual(ends[0]["outcome"]["status"], "error")
        self.assertEqual(ends[0]["outcome"]["sqlstate"], "22012")
        self.assertEqual(ends[1]["outcome"]["status"], "not-run")

    @defer.inlineCallbacks
    def test_error_then_continue(self):
        """
        After an error the session goes on (psycopg2 over the simple
        protocol, a transaction rolled back and a new one).
        """

        def run():
            connection = self.connect()
            try:
                cursor = connection.cursor()
                try:
                    cursor.execute("SELECT * FROM no_such_table")
                except psycopg2.errors.UndefinedTable:
                    connection.rollback()
                cursor.execute("SELECT 'still here'")
                return cursor.fetchone()[0]
            finally:
                connection.close()

        self.assertEqual((yield in_thread(run)), "still here")

    @defer.inlineCallbacks
    def test_cancel(self):
        """
        psql interrupted (SIGINT) sends a CancelRequest with the gateway's
        own backend key; the gateway forwards it with the target's, and the
        pg_sleep stops with 57014.
        """
        from twisted.internet import protocol

        ended = defer.Deferred()

        class Collect(protocol.ProcessProtocol):
            err = b""

            def errReceived(self, data):
                self.err += data

            def processEnded(self, reason):
                ended.callback(self.err.decode())

        client = Collect()
        started = time.time()
        process = reactor.spawnProcess(
            client,
            support.PSQL,
            [support.PSQL, "-X", "-c", "SELECT pg_sleep(20)", self.gateway.dsn()],
            env={"PATH": os.environ["PATH"], "PGPASSWORD": self.token},
        )
        for _ in range(100):
            if self.gateway.events("command"):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield task.deferLater(reactor, 0.3, lambda: None)
        process.signalProcess("INT")
        err = yield ended
        self.assertIn("canceling statement due to user request", err)
        self.assertLess(time.time() - started, 10)
        (cancel,) = self.gateway.events("command.cancel")
        (sleep,) = [e for e in self.gateway.events("command.end") if e["outcome"].get("sqlstate") == "57014"]
        self.assertEqual(sleep["outcome"]["status"], "error")
        # Recorded by the record addon through the chain: the session's fields and the statement it stopped.
        self.assertEqual((cancel["session"], cancel["command"]), (sleep["session"], sleep["command"]))
        self.assertEqual(cancel["protocol"], "postgres")

    @defer.inlineCallbacks
    def test_client_disconnect(self):
        """
        A client that vanishes mid-statement ends its session in the record;
        the target session is closed too.
        """
        instance = support.cluster()

        def run():
            connection = self.connect()
            cursor = connection.cursor()
            cursor.execute("SELECT pg_backend_pid()")
            connection.close()

        yield in_thread(run)
        for _ in range(50):
            if self.gateway.events("session.end"):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        (end,) = self.gateway.events("session.end")
        self.assertIn(end["reason"], ("client terminated the session", "client disconnected"))
        for _ in range(50):
            count = instance.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'hoopgw:%'"
            ).strip()
            if count == "0":
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(count, "0")

    @defer.inlineCallbacks
    def test_target_disconnect(self):
        """
        When the target ends the session (an administrator terminates it),
        the client gets an error and the record says why the session ended.
        """

        def run():
            connection = self.connect()
            try:
                cursor = connection.cursor()
                cursor.execute("SELECT pg_backend_pid()")
                connection.commit()
                support.cluster().psql(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE 'hoopgw:%'"
                )
                try:
                    cursor.execute("SELECT 1")
                    return "still connected"
                except psycopg2.OperationalError as error:
                    return str(error)
            finally:
                connection.close()

        message = yield in_thread(run)
        self.assertNotEqual(message, "still connected")
        for _ in range(50):
            if self.gateway.events("session.end"):
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        (end,) = self.gateway.events("session.end")
        self.assertIn("target", end["reason"])

    @defer.inlineCallbacks
    def test_application_name(self):
        """
        The target sees who is really connected: application_name carries
        the identity.
        """
        out, err, code = yield psql(
            self.gateway.dsn(application_name="deployer"), "-c", "SHOW application_name", password=self.token
        )
        self.assertEqual(out.strip(), "hoopgw:ci-bot:deployer", err)

    @defer.inlineCallbacks
    def test_password_redacted(self):
        """
        CREATE/ALTER ROLE ... PASSWORD never reaches the record in clear.
        """
        out, err, code = yield psql(
            self.gateway.dsn(),
            "-c",
            "ALTER ROLE app PASSWORD '%s'" % (support.APP_PASSWORD,),
            password=self.token,
        )
        self.assertEqual(code, 0, err)
        (command,) = self.gateway.events("command")
        self.assertEqual(command["text"], "ALTER ROLE app PASSWORD '[redacted]'")
        self.assertNotIn(support.APP_PASSWORD.encode(), self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_card_numbers_not_recorded(self):
        """
        A card number in a statement and in its results is masked in the
        record (BIN and last four at most).
        """
        out, err, code = yield psql(
            self.gateway.dsn(), "-c", "SELECT '5500005555555559' AS pan", password=self.token
        )
        self.assertEqual(out.strip(), "5500005555555559", err)
        raw = self.gateway.raw_store()
        self.assertNotIn(b"5500005555555559", raw)
        self.assertIn(b"550000******5559", raw)

    @defer.inlineCallbacks
    def test_large_result_streams(self):
        """
        A result far larger than one read streams through whole, row by row.
        """
        out, err, code = yield psql(
            self.gateway.dsn(),
            "-c",
            "SELECT count(*), sum(length(x)) FROM (SELECT repeat('x', 1000) || g AS x FROM generate_series(1, 20000) g) s",
            password=self.token,
        )
        self.assertEqual(code, 0, err)

        def run():
            connection = self.connect()
            try:
                cursor = connection.cursor()
                cursor.execute("SELECT g, repeat('y', 500) FROM generate_series(1, 50000) g")
                rows = cursor.fetchall()
                return len(rows), rows[-1][0]
            finally:
                connection.close()

        self.assertEqual((yield in_thread(run)), (50000, 50000))

    @defer.inlineCallbacks
    def test_notifications(self):
        """
        LISTEN/NOTIFY works through the gateway.
        """

        def run():
            connection = self.connect()
            connection.autocommit = True
            try:
                cursor = connection.cursor()
                cursor.execute("LISTEN jobs")
                cursor.execute("NOTIFY jobs, 'payload-1'")
                connection.poll()
                return [(n.channel, n.payload) for n in connection.notifies]
            finally:
                connection.close()

        self.assertEqual((yield in_thread(run)), [("jobs", "payload-1")])
