"""
The addon chain: order, combination of decisions, failing closed, and the
groups check, with plain addons and no network.
"""

from twisted.internet import defer
from twisted.trial import unittest

from hoopgw.chain import AddonChain, ChainBroken
from hoopgw.model import Decision
from hoopgw.testing import identity, rows, session, sql_command


class Recorder:
    """
    An addon that notes every hook call and answers as told.
    """

    def __init__(self, name, calls, answer=None):
        self.name = name
        self.calls = calls
        self.answer = answer

    def session_started(self, session):
        self.calls.append((self.name, "session_started"))
        return self.answer

    def command_received(self, session, command):
        self.calls.append((self.name, "command_received"))
        return self.answer

    def command_finished(self, session, command):
        self.calls.append((self.name, "command_finished"))

    def session_ended(self, session):
        self.calls.append((self.name, "session_ended"))


class Raiser:
    name = "broken"

    def command_received(self, session, command):
        raise RuntimeError("boom")

    def result_received(self, session, command, chunk):
        raise RuntimeError("mask exploded")


class SetsIdentity:
    def __init__(self, identity):
        self.identity = identity

    def session_started(self, session):
        session.identity = self.identity


class ChainTests(unittest.TestCase):
    def test_order(self):
        """
        Hooks run in chain order.
        """
        calls = []
        chain = AddonChain([("a", Recorder("a", calls)), ("b", Recorder("b", calls))])
        chain.submit(session(), sql_command("SELECT 1"))
        self.assertEqual(calls, [("a", "command_received"), ("b", "command_received")])

    def test_deny_stops(self):
        """
        The first denial is the decision; later addons are not asked.
        """
        calls = []
        chain = AddonChain(
            [
                ("a", Recorder("a", calls, Decision.deny("no", rule="r1"))),
                ("b", Recorder("b", calls, Decision.allow())),
            ]
        )
        command = sql_command("DROP TABLE x")
        decision = chain.submit(session(), command)
        self.assertEqual((decision.verdict, decision.rule, decision.addon), ("deny", "r1", "a"))
        self.assertIs(command.decision, decision)
        self.assertEqual(calls, [("a", "command_received")])

    def test_approval_kept(self):
        """
        An approval from one addon survives a later "allow".
        """
        chain = AddonChain(
            [
                ("approve", Recorder("approve", [], Decision.approved({"id": "a-1"}))),
                ("other", Recorder("other", [], Decision.allow())),
            ]
        )
        decision = chain.submit(session(), sql_command("DELETE FROM t"))
        self.assertEqual((decision.verdict, decision.approval), ("approved", {"id": "a-1"}))

    def test_exception_denies(self):
        """
        An addon that raises denies the command, saying which addon failed.
        """
        chain = AddonChain([("broken", Raiser())])
        decision = chain.submit(session(), sql_command("SELECT 1"))
        self.assertTrue(decision.denied)
        self.assertEqual(decision.rule, "broken:error")
        self.assertIn("boom", decision.reason)

    def test_bad_answer_denies(self):
        """
        A hook returning something that is not a Decision denies too.
        """
        chain = AddonChain([("odd", Recorder("odd", [], "yes please"))])
        self.assertTrue(chain.submit(session(), sql_command("SELECT 1")).denied)

    def test_deferred_decision(self):
        """
        A hook may answer later; the chain waits, then goes on.
        """
        pending = defer.Deferred()
        calls = []
        chain = AddonChain([("slow", Recorder("slow", calls, pending)), ("b", Recorder("b", calls))])
        result = chain.submit(session(), sql_command("SELECT 1"))
        self.assertNoResult(result)
        pending.callback(Decision.approved({"id": "x"}))
        self.assertEqual(self.successResultOf(result).verdict, "approved")
        self.assertEqual(calls, [("slow", "command_received"), ("b", "command_received")])

    def test_deferred_failure_denies(self):
        """
        A Deferred that fails denies.
        """
        pending = defer.Deferred()
        chain = AddonChain([("slow", Recorder("slow", [], pending))])
        result = chain.submit(session(), sql_command("SELECT 1"))
        pending.errback(IOError("broker unreachable"))
        decision = self.successResultOf(result)
        self.assertTrue(decision.denied)
        self.assertIn("broker unreachable", decision.reason)

    def test_cancel_pending(self):
        """
        Cancelling the chain's Deferred cancels the addon still deciding,
        and the command is denied as given up.
        """
        cancelled = []
        pending = defer.Deferred(lambda d: cancelled.append(True))
        chain = AddonChain([("approve", Recorder("approve", [], pending))])
        result = chain.submit(session(), sql_command("SELECT 1"))
        result.cancel()
        self.assertEqual(cancelled, [True])
        self.assertEqual(self.successResultOf(result).rule, "approve:cancelled")

    def test_result_failure_withholds(self):
        """
        An addon failing on a result raises ChainBroken: the front end must
        withhold the chunk.
        """
        chain = AddonChain([("broken", Raiser())])
        self.assertRaises(
            ChainBroken, chain.result, session(), sql_command("SELECT 1"), rows(["a"], [["4111111111111111"]])
        )

    def test_session_needs_identity(self):
        """
        A chain in which no addon sets an identity refuses every session.
        """
        chain = AddonChain([("a", Recorder("a", []))], allowed_groups={"g"})
        anonymous = session()
        anonymous.identity = None
        decision = self.successResultOf(chain.start_session(anonymous))
        self.assertEqual(decision.rule, "no-identity")
        self.assertIs(anonymous.refusal, decision)

    def test_groups_checked_before_later_addons(self):
        """
        Once the identity is known, a group not allowed refuses the session
        before later addons see it; they are told the session ended.
        """
        calls = []
        chain = AddonChain(
            [("identity", SetsIdentity(identity(groups=["marketing"]))), ("record", Recorder("record", calls))],
            allowed_groups={"payments-bots"},
        )
        visitor = session()
        visitor.identity = None
        decision = self.successResultOf(chain.start_session(visitor))
        self.assertEqual((decision.rule, decision.sqlstate), ("allowed_groups", "28000"))
        self.assertEqual(calls, [("record", "session_ended")])

    def test_session_allowed(self):
        """
        An allowed identity starts the session; every addon sees it.
        """
        calls = []
        chain = AddonChain(
            [("identity", SetsIdentity(identity())), ("record", Recorder("record", calls))],
            allowed_groups={"payments-bots"},
        )
        visitor = session()
        visitor.identity = None
        self.assertEqual(self.successResultOf(chain.start_session(visitor)).verdict, "allow")
        self.assertEqual(calls, [("record", "session_started")])

    def test_finish_survives_failures(self):
        """
        command_finished reaches every addon even when one raises.
        """
        calls = []

        class Bad:
            def command_finished(self, session, command):
                raise RuntimeError("nope")

        chain = AddonChain([("bad", Bad()), ("r", Recorder("r", calls))])
        chain.finish(session(), sql_command("SELECT 1"))
        self.assertEqual(calls, [("r", "command_finished")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_store_unavailable_logged_as_a_line(self):
        """
        An addon that cannot record because the store is unavailable (sync
        or later) is logged as a warning line saying why, redacted, with no
        traceback; any other failure is still logged with its traceback.
        """
        from twisted.logger import LogLevel, capturedLogs, formatEvent

        from hoopgw.store.errors import StoreError

        class Unrecorded:
            def command_finished(self, session, command):
                raise StoreError("the store is unreachable: password=s3cr3t")

            def session_ended(self, session):
                return defer.fail(StoreError("the store is unreachable"))

        chain = AddonChain([("record", Unrecorded())])
        with capturedLogs() as logged:
            chain.finish(session(), sql_command("SELECT 1"))
            chain.end_session(session())
        lines = [(event["log_level"], formatEvent(event)) for event in logged]
        self.assertIn((LogLevel.warn, "The record addon failed in command_finished: the store is unreachable: password=[redacted]"),
                      lines)
        self.assertIn((LogLevel.warn, "The record addon failed in session_ended: the store is unreachable"), lines)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_cancel_reaches_every_addon(self):
        """
        A client's cancel is a chain event: C{cancel_requested} reaches
        every addon that has it, in order, with the command that ran and
        the replica the request came through, even after one raised.
        """
        calls = []

        class Sees:
            def __init__(self, name):
                self.name = name

            def cancel_requested(self, session, command, via):
                calls.append((self.name, command.text if command is not None else None, via))

        class Bad:
            def cancel_requested(self, session, command, via):
                raise RuntimeError("nope")

        chain = AddonChain([("a", Sees("a")), ("bad", Bad()), ("b", Sees("b")), ("r", Recorder("r", []))])
        self.assertIsNone(chain.cancel(session(), sql_command("SELECT pg_sleep(9)"), via="run-2"))
        chain.cancel(session())
        self.assertEqual(
            calls,
            [("a", "SELECT pg_sleep(9)", "run-2"), ("b", "SELECT pg_sleep(9)", "run-2"), ("a", None, None), ("b", None, None)],
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    def test_cancel_recorded(self):
        """
        The record addon writes a cancel as C{command.cancel}: the session's
        fields, the command that ran and C{via}; without a command or a
        routing replica, neither field.
        """
        from hoopgw.addons.record import factory as record
        from hoopgw.testing import ChainHarness

        harness = ChainHarness([(record, {})])
        harness.session.identity = identity("etl-bot")
        command = sql_command("SELECT pg_sleep(9)")
        harness.cancel(command, via="run-2")
        harness.cancel()
        first, second = harness.store.of_type("command.cancel")
        self.assertEqual(
            {key: first[key] for key in ("session", "connection", "protocol", "subject", "command", "via")},
            {
                "session": harness.session.id,
                "connection": harness.session.connection,
                "protocol": "postgres",
                "subject": "etl-bot",
                "command": command.id,
                "via": "run-2",
            },
        )
        self.assertNotIn("command", second)
        self.assertNotIn("via", second)

    def test_interface_declares_every_hook(self):
        """
        L{hoopgw.interfaces.IAddon} declares every hook the chain calls, so
        the addon author's reference is complete.
        """
        from hoopgw.chain import HOOKS
        from hoopgw.interfaces import IAddon

        self.assertEqual([hook for hook in HOOKS if hook not in IAddon.names()], [])

    def test_masked_counted_once_hooks_finish(self):
        """
        The chain counts what result hooks masked or withheld in the
        command's C{outcome["masked"]}, for every front end, and only once
        every hook has finished with the chunk (a hook that waits counts
        when it is done).
        """
        waiting = defer.Deferred()

        class MasksLater:
            def result_received(self, session, command, chunk):
                def done(_):
                    chunk.masked += 2
                    chunk.withheld += 1

                return waiting.addCallback(done)

        class MasksNow:
            def result_received(self, session, command, chunk):
                chunk.masked += 1

        chain = AddonChain([("now", MasksNow()), ("later", MasksLater())])
        command = sql_command("SELECT 1")
        pending = chain.result(session(), command, rows(["a"], [["x"]]))
        self.assertNotIn("masked", command.outcome)
        waiting.callback(None)
        self.successResultOf(pending)
        self.assertEqual(command.outcome["masked"], 4)
        chain = AddonChain([("now", MasksNow())])
        self.assertIsNone(chain.result(session(), command, rows(["a"], [["x"]])))
        self.assertEqual(command.outcome["masked"], 5)
