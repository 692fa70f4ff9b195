"""
The SQL classifier and the rules block and approve share: what pglast says
a statement does, and what rules match it.
"""

from twisted.trial import unittest

from hoopgw import sqlpolicy
from hoopgw.options import ConfigError
from hoopgw.testing import session, sql_command


def facts(sql):
    return sqlpolicy.classify(sql)


class ClassifyTests(unittest.TestCase):
    """
    Kinds, tables, writes and functions, read from the parse tree.
    """

    def test_kinds(self):
        """
        Each statement kind the issue names is recognised, with its first
        word and category as further labels.
        """
        cases = {
            "DROP TABLE a.b, c": ({"DROP TABLE"}, {"DROP", "DDL"}),
            "DROP SCHEMA s CASCADE": ({"DROP SCHEMA"}, {"DROP", "DDL"}),
            "DROP VIEW v": ({"DROP VIEW"}, {"DROP"}),
            "DROP FUNCTION f(int)": ({"DROP FUNCTION"}, {"DROP"}),
            "TRUNCATE a, b": ({"TRUNCATE"}, {"DDL"}),
            "ALTER TABLE t ADD c int": ({"ALTER TABLE"}, {"ALTER", "DDL"}),
            "GRANT SELECT ON cards TO x": ({"GRANT TABLE"}, {"GRANT"}),
            "REVOKE admin FROM bob": ({"REVOKE ROLE"}, {"REVOKE"}),
            "CREATE ROLE x": ({"CREATE ROLE"}, {"CREATE"}),
            "ALTER ROLE x PASSWORD 'y'": ({"ALTER ROLE"}, {"ALTER"}),
            "DROP ROLE x": ({"DROP ROLE"}, {"DROP"}),
            "ALTER SYSTEM SET work_mem = '1GB'": ({"ALTER SYSTEM"}, set()),
            "COPY t TO PROGRAM 'id'": ({"COPY", "COPY TO"}, {"COPY PROGRAM"}),
            "COPY t FROM PROGRAM 'id'": ({"COPY", "COPY FROM"}, {"COPY PROGRAM", "DML"}),
            "COPY t TO '/tmp/x'": ({"COPY", "COPY TO"}, {"COPY FILE"}),
            "DO $$ BEGIN END $$": ({"DO"}, set()),
            "SET ROLE postgres": ({"SET ROLE"}, {"SET"}),
            "SET SESSION AUTHORIZATION postgres": ({"SET SESSION AUTHORIZATION"}, {"SET"}),
            "SET search_path = secret": ({"SET SEARCH_PATH"}, {"SET"}),
            "SET statement_timeout = 5": ({"SET"}, set()),
            "LOCK t IN ACCESS EXCLUSIVE MODE": ({"LOCK"}, set()),
            "VACUUM FULL t": ({"VACUUM", "VACUUM FULL"}, set()),
            "VACUUM (FULL false) t": ({"VACUUM", "VACUUM FULL"}, set()),
            "VACUUM t": ({"VACUUM"}, set()),
            "BEGIN": ({"TRANSACTION"}, {"BEGIN"}),
            "DELETE FROM t": ({"DELETE"}, {"DML", "DELETE WITHOUT WHERE"}),
            "SELECT * INTO n FROM t": ({"SELECT", "CREATE TABLE", "CREATE TABLE AS"}, {"SELECT INTO"}),
            "LOAD 'x'": ({"LOAD"}, set()),
        }
        for sql, (kinds, labels) in cases.items():
            found = facts(sql)
            self.assertEqual(found.kinds, frozenset(kinds), sql)
            self.assertTrue(labels <= found.labels, (sql, labels, found.labels))

    def test_tables_in_ctes_and_subqueries(self):
        """
        Tables are found schema-qualified as written, inside CTEs,
        subqueries and joins; a CTE's name is not a table, but a table of
        the same name referenced where the CTE is not in scope is.
        """
        self.assertEqual(
            facts("WITH c AS (SELECT * FROM secret.cards) SELECT * FROM c JOIN s.t ON true WHERE x IN (SELECT 1 FROM o)").tables,
            {"secret.cards", "s.t", "o"},
        )
        self.assertEqual(facts("WITH cards AS (SELECT 1) SELECT * FROM cards").tables, set())
        # A non-recursive CTE does not see itself: the inner cards is the table.
        self.assertEqual(facts("WITH cards AS (SELECT * FROM cards) SELECT * FROM cards").tables, {"cards"})
        self.assertEqual(facts("SELECT * FROM cards, (WITH cards AS (SELECT 1) SELECT * FROM cards) x").tables, {"cards"})
        self.assertEqual(facts("WITH RECURSIVE r AS (SELECT 1 UNION ALL SELECT * FROM r) SELECT * FROM r").tables, set())

    def test_writes(self):
        """
        The tables a statement changes are told apart from those it reads,
        also for a data-modifying CTE.
        """
        found = facts("WITH d AS (DELETE FROM audit.log RETURNING *) INSERT INTO archive SELECT * FROM d")
        self.assertEqual(found.writes, {"audit.log", "archive"})
        self.assertIn("DELETE", found.kinds)
        self.assertTrue(found.without_where)
        self.assertEqual(facts("UPDATE t SET a = 1 WHERE id = 4").writes, {"t"})
        self.assertEqual(facts("SELECT * FROM t").writes, set())

    def test_functions_anywhere(self):
        """
        Function calls are found in subqueries, FROM items, COPY queries and
        CALL.
        """
        self.assertEqual(facts("SELECT * FROM (SELECT pg_ls_dir('.')) s").functions, {"pg_ls_dir"})
        self.assertEqual(facts("SELECT 1 WHERE EXISTS (SELECT lo_export(1, '/tmp/x'))").functions, {"lo_export"})
        self.assertEqual(facts("COPY (SELECT pg_read_file('/etc/passwd')) TO STDOUT").functions, {"pg_read_file"})
        self.assertEqual(facts("SELECT pg_catalog.pg_read_file('x')").functions, {"pg_catalog.pg_read_file"})
        self.assertIn("pg_read_file", facts("CALL p(pg_read_file('x'))").functions)

    def test_without_where(self):
        """
        A WHERE that names no column (WHERE true, WHERE 1 = 1) filters
        nothing: the statement counts as without WHERE.
        """
        self.assertTrue(facts("UPDATE t SET a = 1").without_where)
        self.assertTrue(facts("UPDATE t SET a = 1 WHERE true").without_where)
        self.assertTrue(facts("DELETE FROM t WHERE 1 = 1").without_where)
        self.assertFalse(facts("DELETE FROM t WHERE id = 1").without_where)

    def test_unparseable(self):
        """
        SQL the parser refuses gets an error and no facts.
        """
        found = facts("SELEC 1")
        self.assertIn("syntax error", found.error)
        self.assertEqual(found.kinds, set())

    def test_cache_is_not_fooled(self):
        """
        Statements that differ in schema or in a constant-only WHERE are
        classified apart, though pglast's fingerprint would confuse them
        (the reason the cache is keyed by normalised text).
        """
        from pglast import parser

        first, second = "SELECT * FROM public.orders", "SELECT * FROM secret.orders"
        self.assertEqual(parser.fingerprint(first), parser.fingerprint(second))
        self.assertEqual(facts(first).tables, {"public.orders"})
        self.assertEqual(facts(second).tables, {"secret.orders"})
        first, second = "UPDATE t SET a = 1 WHERE id = 3", "UPDATE t SET a = 1"
        self.assertFalse(facts(first).without_where)
        self.assertTrue(facts(second).without_where)
        # Constants alone do not make a new entry.
        self.assertIs(facts("SELECT * FROM t WHERE a = 1"), facts("SELECT * FROM t WHERE a = 2"))

    def test_prepare_and_execute(self):
        """
        EXECUTE carries the facts of the statement PREPARE named, within
        the session.
        """
        current = session()
        sqlpolicy.for_command(current, sql_command("PREPARE wipe AS DELETE FROM cards"))
        executed = sqlpolicy.for_command(current, sql_command("EXECUTE wipe"))
        self.assertIn("DELETE", executed.kinds)
        self.assertEqual(executed.writes, {"cards"})
        unknown = sqlpolicy.for_command(session(), sql_command("EXECUTE wipe"))
        self.assertIn("UNRESOLVED", unknown.labels)

    def test_outputs_follow_aliases(self):
        """
        Output columns say which columns they come from, through aliases,
        subqueries with column lists, UNION and RETURNING.
        """
        found = facts("SELECT cvv AS x, name FROM cards")
        self.assertEqual([entry[:2] for entry in found.outputs], [("x", {"cvv"}), ("name", {"name"})])
        found = facts("SELECT x FROM (SELECT cvv FROM cards) s(x)")
        self.assertIn(("x", {"cvv"}), [(name, set(sources)) for name, sources in found.aliases])
        found = facts("SELECT name FROM a UNION SELECT cvv FROM cards")
        self.assertEqual(found.outputs[0][1], {"name", "cvv"})
        found = facts("DELETE FROM cards RETURNING cvv AS c")
        self.assertEqual(found.outputs[0][:2], ("c", {"cvv"}))


class MatcherTests(unittest.TestCase):
    """
    Rules: every field given must match.
    """

    def matcher(self, **raw):
        return sqlpolicy.Matcher.parse(raw, "rule")[0]

    def test_kind_and_table(self):
        """
        A rule on DML to secret.cards matches an UPDATE of cards (bare name,
        any schema) but not a SELECT, nor an UPDATE elsewhere.
        """
        rule = self.matcher(kinds=["DML"], tables=["secret.cards"])
        self.assertIsNotNone(rule.match(facts("UPDATE cards SET a = 1 WHERE id = 2"), ["public"]))
        self.assertIsNotNone(rule.match(facts("UPDATE secret.cards SET a = 1 WHERE id = 2"), ["public"]))
        self.assertIsNone(rule.match(facts("SELECT * FROM secret.cards"), ["public"]))
        self.assertIsNone(rule.match(facts("UPDATE public.cards SET a = 1 WHERE id = 2"), ["public"]))

    def test_schema_wildcard(self):
        """
        SCHEMA.* matches qualified names in that schema, and bare names only
        when the schema is on the search path.
        """
        rule = self.matcher(tables=["audit.*"])
        self.assertIsNotNone(rule.match(facts("SELECT * FROM audit.log"), ["public"]))
        self.assertIsNone(rule.match(facts("SELECT * FROM log"), ["public"]))
        self.assertIsNotNone(rule.match(facts("SELECT * FROM log"), ["audit", "public"]))

    def test_functions(self):
        """
        A bare function name matches the function in any schema.
        """
        rule = self.matcher(functions=["pg_read_file"])
        self.assertIsNotNone(rule.match(facts("SELECT pg_catalog.pg_read_file('x')"), ["public"]))
        self.assertIsNone(rule.match(facts("SELECT pg_read_binary_file('x')"), ["public"]))
        self.assertIsNotNone(self.matcher(functions=["pg_read_*"]).match(facts("SELECT pg_read_binary_file('x')"), []))

    def test_bad_rules(self):
        """
        A rule that matches nothing, an unknown kind or a malformed name is
        refused with the key path.
        """
        with self.assertRaises(ConfigError) as caught:
            sqlpolicy.Matcher.parse({}, "block.rules[0]")
        self.assertIn("at least one of", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            sqlpolicy.Matcher.parse({"kinds": ["DROPP"]}, "block.rules[0]")
        self.assertIn("block.rules[0].kinds[0]", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            sqlpolicy.Matcher.parse({"tables": ["a.b.c"]}, "block.rules[0]")
        self.assertIn("SCHEMA.NAME", str(caught.exception))


class AllowListTests(unittest.TestCase):
    """
    Allow-list mode: only SELECT on named tables.
    """

    def setUp(self):
        self.allow = sqlpolicy.AllowList.parse({"kinds": ["SELECT"], "tables": ["public.orders", "reports.*"]}, "allow_only")

    def refuse(self, sql):
        return self.allow.refuse(facts(sql), ["public"])

    def test_allowed(self):
        """
        SELECTs on listed tables, transaction control and ordinary settings
        pass.
        """
        for sql in ("SELECT * FROM orders", "SELECT * FROM public.orders JOIN reports.daily ON true", "BEGIN", "SET statement_timeout = 10", "SELECT 1"):
            self.assertIsNone(self.refuse(sql), sql)

    def test_refused(self):
        """
        Another table, a write (also hidden in a CTE), a catalog read by a
        bare name and a search_path change are refused.
        """
        self.assertIn("cards", self.refuse("SELECT * FROM cards"))
        self.assertIn("DELETE", self.refuse("WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d"))
        self.assertIn("pg_authid", self.refuse("SELECT * FROM pg_authid"))
        self.assertIn("SET SEARCH_PATH", self.refuse("SET search_path = secret"))
        self.assertIn("INSERT", self.refuse("INSERT INTO orders VALUES (1)"))


class FactsMatcherTests(unittest.TestCase):
    """
    Rules on command facts, for any protocol.
    """

    def test_other_protocols(self):
        """
        A rule naming facts matches a command of another protocol by them
        (block denies a Kubernetes delete of a secret in production), while
        SQL rules never match such a command.
        """
        from hoopgw.addons.block import factory as block
        from hoopgw.model import Command
        from hoopgw.testing import ChainHarness

        harness = ChainHarness(
            [(block, {"rules": [{"name": "no-prod-secret-deletes", "facts": {"verb": "delete", "resource": "secrets", "namespace": "prod-*"}}]})]
        )

        def request(verb, namespace):
            return Command(kind="kubernetes", text="x", redacted="x", facts={"verb": verb, "resource": "secrets", "namespace": namespace})

        decision = harness.submit(request("delete", "prod-eu"))
        self.assertEqual((decision.verdict, decision.rule), ("deny", "block:no-prod-secret-deletes"))
        self.assertFalse(harness.submit(request("get", "prod-eu")).denied)
        self.assertFalse(harness.submit(request("delete", "staging")).denied)
        self.assertFalse(harness.submit(sql_command("DELETE FROM secrets")).denied)

    def test_sql_facts(self):
        """
        On a SQL command, facts narrow a SQL rule: here, DELETEs over the
        extended protocol only.
        """
        matcher = sqlpolicy.Matcher.parse({"kinds": ["DELETE"], "facts": {"protocol": "extended"}}, "rule")[0]
        simple = sql_command("DELETE FROM t WHERE id = 1")
        extended = sql_command("DELETE FROM t WHERE id = $1", parameters=[b"1"])
        self.assertIsNone(matcher.match_sql(facts(simple.text), [], simple))
        self.assertIsNotNone(matcher.match_sql(facts(extended.text), [], extended))
