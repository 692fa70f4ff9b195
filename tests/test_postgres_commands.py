"""
The PostgreSQL front end's commands (L{hoopgw.postgres.commands}): made in
one place, classified once, with the facts the rules match in
L{Command.facts}, which is what the record holds.
"""

from unittest import mock

from twisted.trial import unittest

from hoopgw import sqlfacts
from hoopgw.addons.block import factory
from hoopgw.postgres.commands import function_call_command, sql_command
from hoopgw.testing import build, session


class SQLCommandTests(unittest.TestCase):
    """
    A statement is classified as it is made, and its facts are on it.
    """

    def test_facts_are_the_classification(self):
        """
        The kinds, tables, writes and the missing WHERE a rule matches are
        in the command's facts, beside the statement type and protocol.
        """
        command = sql_command("DELETE FROM public.orders", "simple", session())
        self.assertEqual(command.facts["statement_type"], "DELETE")
        self.assertEqual(command.facts["protocol"], "simple")
        self.assertEqual(command.facts["kinds"], ["DELETE"])
        self.assertEqual(command.facts["tables"], ["public.orders"])
        self.assertEqual(command.facts["writes"], ["public.orders"])
        self.assertIs(command.facts["without_where"], True)
        self.assertIs(command.metadata["sql"], sqlfacts.facts_of(None, command))

    def test_execute_shows_what_it_runs(self):
        """
        An EXECUTE's facts are those of the statement its PREPARE named in
        the same session: what the rules matched, not just "EXECUTE".
        """
        current = session()
        sql_command("PREPARE wipe AS DELETE FROM cards", "simple", current)
        executed = sql_command("EXECUTE wipe", "simple", current)
        self.assertIn("DELETE", executed.facts["kinds"])
        self.assertEqual(executed.facts["writes"], ["cards"])

    def test_unparseable(self):
        """
        SQL the parser cannot read says why in its facts.
        """
        command = sql_command("SELEC 1", "simple", session())
        self.assertIn("syntax error", command.facts["sql_error"])
        self.assertNotIn("kinds", command.facts)

    def test_addons_do_not_classify_again(self):
        """
        Block reads the classification the front end made: the classifier
        runs once per command, however many addons look.
        """
        current = session()
        command = sql_command("ALTER SYSTEM SET work_mem = 1", "simple", current)
        block = build(factory)
        with mock.patch.object(sqlfacts, "classify", side_effect=AssertionError("classified twice")):
            decision = block.command_received(current, command)
            block.command_received(current, command)
        self.assertTrue(decision.denied)

    def test_parameters_redacted(self):
        """
        Bind parameters are kept as sent, and recorded redacted by their
        format: a binary one by its size only.
        """
        command = sql_command("SELECT $1, $2", "extended", session(), parameters=(b"4111111111111111", b"\x00\x01"),
                              formats=(0, 1))
        self.assertEqual(command.parameters, (b"4111111111111111", b"\x00\x01"))
        self.assertNotIn("4111111111111111", repr(command.redacted_parameters))
        self.assertEqual(len(command.redacted_parameters), 2)

    def test_function_call(self):
        """
        A fastpath call is a command of its own kind, named by OID.
        """
        command = function_call_command(1234, (), (b"x",))
        self.assertEqual(command.kind, "function-call")
        self.assertEqual(command.facts, {"function_oid": 1234, "protocol": "function-call"})
        self.assertEqual(command.redacted, "function call (oid 1234)")


class ClassifiedWhenReadTests(unittest.TestCase):
    """
    Statements are parsed for a chain whose addons read the
    classification, and not for one whose addons do not.
    """

    def test_chain_says_who_reads(self):
        """
        Block, approve and mask read the classification; identity and
        record do not.
        """
        from hoopgw.addons.identity import factory as identity
        from hoopgw.addons.mask import factory as mask
        from hoopgw.addons.record import factory as record
        from hoopgw.testing import ChainHarness

        self.assertFalse(ChainHarness([(identity, {}), (record, {})]).chain.reads("sql"))
        self.assertTrue(ChainHarness([(identity, {}), (factory, {}), (record, {})]).chain.reads("sql"))
        self.assertTrue(ChainHarness([(mask, {}), (record, {})]).chain.reads("sql"))

    def test_unread_statement_not_parsed(self):
        """
        Made without classification, a statement is not parsed until an
        addon asks; then its facts arrive on the command.
        """
        with mock.patch.object(sqlfacts, "classify", wraps=sqlfacts.classify) as classify:
            command = sql_command("UPDATE accounts SET balance = 0", "simple", session(), classify=False)
            self.assertEqual(classify.call_count, 0)
            self.assertNotIn("kinds", command.facts)
            sqlfacts.facts_of(session(), command)
            self.assertEqual(classify.call_count, 1)
        self.assertTrue(command.facts["without_where"])
