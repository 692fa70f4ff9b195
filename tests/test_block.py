"""
The block addon end to end: real PostgreSQL behind the gateway, real psql,
psycopg2 and psycopg in front; each rule kind allowed and denied, denied
statements never reaching the target, transactions ending as if the
denied statement had failed there, and the record naming the rule.
"""

import os
import subprocess
import sys

import psycopg2
from twisted.internet import defer
from twisted.trial import unittest

from tests import support
from tests.support import GatewayHarness, in_thread, psql, token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RULES = [
    {"name": "no-drop", "kinds": ["DROP"]},
    {"name": "no-truncate", "kinds": ["TRUNCATE"]},
    {"name": "no-schemas", "object_types": ["SCHEMA"]},
    {"name": "cards-read-only", "kinds": ["DML"], "tables": ["public.block_cards"]},
    {"name": "no-lock", "kinds": ["LOCK"]},
    {"name": "no-vacuum-full", "kinds": ["VACUUM FULL"]},
    {"name": "no-cvv", "columns": ["cvv"], "reason": "card verification codes are never read"},
]


def app_psql(sql):
    return support.cluster().psql(sql, user="app", password=support.APP_PASSWORD, dbname="payments")


def setUpModule():
    app_psql(
        "DROP TABLE IF EXISTS block_cards, block_other; "
        "CREATE TABLE block_cards (id int, pan text, cvv text); "
        "INSERT INTO block_cards VALUES (1, '4111111111111111', '123'); "
        "CREATE TABLE block_other (id int)"
    )


class BlockTests(unittest.TestCase):
    """
    Deny rules of every kind, through the real gateway.
    """

    def setUp(self):
        setUpModule()
        self.gateway = GatewayHarness(self, addons=["identity", {"block": {"rules": RULES}}, "record"])
        self.token = token()

    def run_each(self, statements):
        """
        Run each statement on one autocommit psycopg2 connection.

        @return: a list of None (ran) or (SQLSTATE, message) (refused).
        """

        def run():
            connection = psycopg2.connect(self.gateway.dsn(password=self.token))
            connection.autocommit = True
            results = []
            try:
                for sql in statements:
                    try:
                        connection.cursor().execute(sql)
                        results.append(None)
                    except psycopg2.Error as error:
                        results.append((error.pgcode, error.pgerror))
            finally:
                connection.close()
            return results

        return in_thread(run)

    @defer.inlineCallbacks
    def test_rules_allow_and_deny(self):
        """
        Statements no rule matches run; each rule kind (kind, object type,
        table with kind, column, and the baseline's functions, server files,
        identity switch, anonymous code, server settings and roles) denies
        with SQLSTATE 42501 naming the rule, and the record has the rule.
        """
        allowed = [
            "SELECT * FROM block_cards WHERE id = 1",
            "INSERT INTO block_other VALUES (1)",
            "VACUUM block_other",
            "CREATE TEMP TABLE block_temp (a int)",
            "SET statement_timeout = 5000",
        ]
        denied = {
            "DROP TABLE block_other": "block:no-drop",
            "TRUNCATE block_other": "block:no-truncate",
            "CREATE SCHEMA block_schema": "block:no-schemas",
            "UPDATE block_cards SET pan = 'x' WHERE id = 1": "block:cards-read-only",
            "DELETE FROM public.block_cards WHERE id = 1": "block:cards-read-only",
            "LOCK block_other": "block:no-lock",
            "VACUUM FULL block_other": "block:no-vacuum-full",
            "SELECT upper(cvv) FROM block_cards": "block:no-cvv",
            "SELECT pg_read_file('/etc/passwd')": "block:baseline:dangerous-functions",
            "SELECT * FROM block_other WHERE id IN (SELECT length(pg_ls_dir('.')))": "block:baseline:dangerous-functions",
            "SELECT query_to_xml('SELECT * FROM block_cards', true, false, '')": "block:baseline:dangerous-functions",
            "COPY block_other TO PROGRAM 'id'": "block:baseline:server-files",
            "SET ROLE postgres": "block:baseline:identity-switch",
            "DO $$ BEGIN PERFORM 1; END $$": "block:baseline:anonymous-code",
            "ALTER SYSTEM SET work_mem = '1GB'": "block:baseline:server-settings",
            "CREATE ROLE block_role": "block:baseline:roles",
            "GRANT SELECT ON block_cards TO PUBLIC": "block:baseline:roles",
        }
        results = yield self.run_each(allowed + list(denied))
        self.assertEqual(results[: len(allowed)], [None] * len(allowed))
        for (sql, rule), result in zip(denied.items(), results[len(allowed) :]):
            self.assertIsNotNone(result, sql)
            code, message = result
            self.assertEqual(code, "42501", (sql, message))
            self.assertIn("hoopgw denied this statement", message)
            self.assertIn("rule: %s" % (rule,), message)
        # The target never saw them: the table and its row are still there.
        self.assertEqual(app_psql("SELECT count(*) FROM block_other").strip(), "1")
        self.assertEqual(app_psql("SELECT pan FROM block_cards").strip(), "4111111111111111")
        # Denied before the record addon, each is recorded once, at its end,
        # with what was asked and the rule.
        ends = {event["text"]: event for event in self.gateway.events("command.end") if "text" in event}
        for sql, rule in denied.items():
            decision = ends[sql]["decision"]
            self.assertEqual((decision["verdict"], decision["rule"], decision["sqlstate"]), ("deny", rule, "42501"))
            self.assertEqual(ends[sql]["outcome"]["status"], "denied")
        self.assertEqual(len(ends), len(denied))

    @defer.inlineCallbacks
    def test_psql_message(self):
        """
        psql shows the denial as an error with the rule and the reason.
        """
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT cvv FROM block_cards", password=self.token)
        self.assertNotEqual(code, 0)
        self.assertIn("hoopgw denied this statement: rule no-cvv matched (column cvv)", err)
        self.assertIn("card verification codes are never read", err)

    @defer.inlineCallbacks
    def test_multi_statement_runs_nothing(self):
        """
        A simple query of three statements, one denied, runs none of them:
        the INSERT before the DROP does not happen either, and all three
        are recorded as denied.
        """
        out, err, code = yield psql(
            self.gateway.dsn(),
            "-c",
            "INSERT INTO block_other VALUES (7); DROP TABLE block_other; INSERT INTO block_other VALUES (8)",
            password=self.token,
        )
        self.assertNotEqual(code, 0)
        self.assertIn("rule: block:no-drop", err)
        self.assertEqual(app_psql("SELECT count(*) FROM block_other WHERE id IN (7, 8)").strip(), "0")
        # The INSERT was checked (and recorded, write-ahead) before the DROP
        # was; its end says it was denied with the rest.
        ends = self.gateway.events("command.end")
        self.assertEqual([end["outcome"]["status"] for end in ends], ["denied", "denied", "denied"])
        self.assertEqual([end["decision"]["rule"] for end in ends], ["block:no-drop"] * 3)
        self.assertIn("another statement in the same query was denied", ends[0]["decision"]["reason"])

    @defer.inlineCallbacks
    def test_transaction_rolled_back(self):
        """
        BEGIN; INSERT; a denied statement; COMMIT: the transaction is
        aborted exactly as if the statement had failed at the target, so the
        INSERT is rolled back; the session then goes on.
        """

        def run():
            connection = psycopg2.connect(self.gateway.dsn(password=self.token))
            try:
                cursor = connection.cursor()
                cursor.execute("INSERT INTO block_other VALUES (9)")
                try:
                    cursor.execute("TRUNCATE block_other")
                    refused = None
                except psycopg2.errors.InsufficientPrivilege as error:
                    refused = error.pgcode
                try:
                    cursor.execute("SELECT 1")
                    after = "ran"
                except psycopg2.errors.InFailedSqlTransaction:
                    after = "in failed transaction"
                connection.commit()
                cursor.execute("SELECT count(*) FROM block_other WHERE id = 9")
                return refused, after, cursor.fetchone()[0]
            finally:
                connection.close()

        refused, after, count = yield in_thread(run)
        self.assertEqual((refused, after, count), ("42501", "in failed transaction", 0))

    @defer.inlineCallbacks
    def test_pipeline_rolled_back(self):
        """
        In an extended-protocol pipeline (psycopg 3), a denied statement
        fails the pipeline's implicit transaction: the INSERT before it is
        rolled back, the one after it is skipped, and the connection works
        afterwards.
        """
        import psycopg

        def run():
            with psycopg.connect(self.gateway.dsn(password=self.token), autocommit=True) as connection:
                refused = None
                try:
                    with connection.pipeline():
                        connection.execute("INSERT INTO block_other VALUES (%s)", (10,))
                        connection.execute("DROP TABLE block_other")
                        connection.execute("INSERT INTO block_other VALUES (%s)", (11,))
                except psycopg.errors.InsufficientPrivilege as error:
                    refused = error.diag.message_primary
                count = connection.execute("SELECT count(*) FROM block_other WHERE id IN (10, 11)").fetchone()[0]
                return refused, count

        refused, count = yield in_thread(run)
        self.assertIn("hoopgw denied this statement", refused)
        self.assertEqual(count, 0)
        self.assertEqual(app_psql("SELECT count(*) FROM block_other WHERE id IN (10, 11)").strip(), "0")

    @defer.inlineCallbacks
    def test_unparseable(self):
        """
        SQL the parser cannot read is refused by the gateway (fail closed),
        and the record says why.
        """
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELEC 1", password=self.token)
        self.assertNotEqual(code, 0)
        self.assertIn("cannot parse this SQL", err)
        (event,) = self.gateway.events("command.end")
        self.assertEqual((event["text"], event["decision"]["rule"]), ("SELEC 1", "block:unparseable"))

    @defer.inlineCallbacks
    def test_explain(self):
        """
        hoopgw explain, on this gateway's configuration, says the DROP is
        denied by rule no-drop, the SELECT allowed, and that the query as a
        whole would not run.
        """
        result = yield in_thread(
            subprocess.run,
            [sys.executable, "-m", "hoopgw.cli", "explain", "--config", self.gateway.config_path, "--connection", "payments",
             "SELECT id FROM block_cards; DROP TABLE block_other"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("block:    allow: no rule matched", result.stdout)
        self.assertIn("block:    deny: rule no-drop matched (kind DROP)", result.stdout)
        self.assertIn("none of this query runs", result.stdout)


class AllowListTests(unittest.TestCase):
    """
    A read-only bot: only SELECT on the tables listed.
    """

    def setUp(self):
        setUpModule()
        self.gateway = GatewayHarness(
            self,
            addons=["identity", {"block": {"allow_only": {"kinds": ["SELECT"], "tables": ["public.block_other"]}}}, "record"],
        )

    @defer.inlineCallbacks
    def test_allow_only(self):
        """
        SELECT on the listed table runs; another table, a write and a
        catalog read are refused with rule block:allow-only.
        """
        token_value = token()
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT count(*) >= 0 FROM block_other", password=token_value)
        self.assertEqual((out.strip(), code), ("t", 0), err)
        for sql, expected in (
            ("SELECT * FROM block_cards", "block_cards is not in this connection's allow-list"),
            ("INSERT INTO block_other VALUES (3)", "INSERT is not in this connection's allow-list"),
            ("SELECT rolname FROM pg_authid", "pg_authid is not in this connection's allow-list"),
        ):
            out, err, code = yield psql(self.gateway.dsn(), "-c", sql, password=token_value)
            self.assertNotEqual(code, 0, sql)
            self.assertIn(expected, err)
            self.assertIn("rule: block:allow-only", err)


class UnparseableAllowedTests(unittest.TestCase):
    """
    A connection may let unparseable SQL through to the target.
    """

    def setUp(self):
        self.gateway = GatewayHarness(self, addons=["identity", {"block": {"allow_unparseable": True}}, "record"])

    @defer.inlineCallbacks
    def test_target_answers(self):
        """
        With allow_unparseable, the target's own syntax error comes back.
        """
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELEC 1", password=token())
        self.assertNotEqual(code, 0)
        self.assertIn('syntax error at or near "SELEC"', err)
        self.assertNotIn("hoopgw", err)


class ExampleConfigurationTests(unittest.TestCase):
    """
    The example configuration stays valid as the addons' options change.
    """

    def test_enforcement_example(self):
        """
        Every addon section of etc/enforcement.yaml passes its addon's
        option checks (the file's certificate paths exist only on a real
        gateway host, so the whole file is not loaded here).
        """
        import yaml

        from hoopgw import config as configuration
        from hoopgw import options

        with open(os.path.join(ROOT, "etc", "enforcement.yaml")) as handle:
            document = yaml.safe_load(handle)
        known = configuration.builtin_addons()
        checked = []
        for entry in document["connections"]["payments"]["addons"]:
            ((name, raw),) = entry.items()
            options.parse_options(known[name].options, raw, name)
            checked.append(name)
        self.assertEqual(checked, ["identity", "block", "approve", "mask", "record"])
        admin = {key: value for key, value in document["gateway"]["admin"].items() if not key.startswith("tls_")}
        options.parse_options(configuration.ADMIN_OPTIONS, admin, "gateway.admin")
