"""
The one rules engine block and approve share (L{hoopgw.rules.RuleSet}):
first match in order, per command kind, worked out once per
classification; and the duplicate-name check both addons use.
"""

from twisted.trial import unittest

from hoopgw import rules
from hoopgw.options import ConfigError
from hoopgw.testing import exec_command, session, sql_command


class Named:
    def __init__(self, name):
        self.name = name


def ruleset(*specs):
    return rules.RuleSet([(Named(name), rules.Matcher.parse(raw, name)[0]) for name, raw in specs])


class RuleSetTests(unittest.TestCase):
    def test_first_match(self):
        """
        Of two rules that match, the earlier answers, with the sentences
        saying what matched; a statement no rule matches gets None.
        """
        engine = ruleset(("drops", {"kinds": ["DROP"]}), ("orders", {"tables": ["orders"]}))
        rule, why = engine.first(session(), sql_command("DROP TABLE orders"))
        self.assertEqual((rule.name, why), ("drops", ["kind DROP"]))
        rule, _ = engine.first(session(), sql_command("SELECT * FROM orders"))
        self.assertEqual(rule.name, "orders")
        self.assertIsNone(engine.first(session(), sql_command("SELECT 1")))

    def test_per_command_kind(self):
        """
        SQL rules do not match an SSH command and SSH rules do not match
        SQL; each meets the rules that name its facts.
        """
        engine = ruleset(("drops", {"kinds": ["DROP"]}), ("sudo", {"programs": ["sudo"]}))
        rule, _ = engine.first(session(protocol="ssh"), exec_command("sudo id"))
        self.assertEqual(rule.name, "sudo")
        self.assertIsNone(engine.first(session(protocol="ssh"), exec_command("drop table")))
        self.assertIsNone(engine.first(session(), sql_command("SELECT sudo FROM t")))

    def test_once_per_classification(self):
        """
        Statements that differ only in their constants share one answer,
        kept on their shared classification.
        """
        engine = ruleset(("wipe", {"kinds": ["DELETE"], "without_where": True}))
        first = sql_command("DELETE FROM t WHERE id = 1")
        self.assertIsNone(engine.first(session(), first))
        second = sql_command("DELETE FROM t WHERE id = 2")
        engine.first(session(), second)
        self.assertIs(first.metadata["sql"], second.metadata["sql"])
        self.assertIn(("rules", id(engine)), second.metadata["sql"].memo)

    def test_unparseable_matches_nothing(self):
        """
        SQL that does not parse matches no rule; the caller decides (block
        refuses it, approve has no opinion).
        """
        engine = ruleset(("any", {"kinds": ["SELECT"]}))
        self.assertIsNone(engine.first(session(), sql_command("SELEC 1")))

    def test_unique_names(self):
        """
        Two rules with one name are refused, naming the second.
        """
        error = self.assertRaises(ConfigError, rules.unique_names, [Named("a"), Named("b"), Named("a")], "rules")
        self.assertIn("rules[2].name", str(error))
        self.assertIn("already named 'a'", str(error))

    def test_command_only_rules_leave_sql_memoised(self):
        """
        Rules that name only facts of SSH or Kubernetes commands (the
        baseline has them) are not asked about SQL, so the answer for SQL
        is still kept per classification; a rule on a command fact any
        command may have (C{facts}) is asked every time.
        """
        engine = ruleset(("sudo", {"programs": ["sudo"]}), ("drops", {"kinds": ["DROP"]}))
        self.assertFalse(engine.on_facts)
        self.assertEqual([rule.name for rule, _ in engine.sql_rules], ["drops"])
        command = sql_command("DROP TABLE t")
        rule, _ = engine.first(session(), command)
        self.assertEqual(rule.name, "drops")
        self.assertIn(("rules", id(engine)), command.metadata["sql"].memo)
        engine = ruleset(("extended", {"facts": {"protocol": ["extended"]}}))
        self.assertTrue(engine.on_facts)
        self.assertIsNone(engine.first(session(), sql_command("SELECT 1")))
        rule, _ = engine.first(session(), sql_command("SELECT 1", [b"1"]))
        self.assertEqual(rule.name, "extended")
