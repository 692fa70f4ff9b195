"""
The protocol-neutral refusal (L{Decision.refusal}) and how each front end
says it on its wire: a SQLSTATE for PostgreSQL, an HTTP status for
Kubernetes.
"""

from twisted.trial import unittest

from hoopgw.chain import AddonChain
from hoopgw.kubernetes.frontend import refusal_status
from hoopgw.model import CANCELLED, FAILED, FORBIDDEN, REFUSALS, UNAUTHENTICATED, UNAVAILABLE, Decision
from hoopgw.postgres import refusals
from hoopgw.testing import session, sql_command


class Raiser:
    def command_received(self, session, command):
        raise RuntimeError("boom")


class Denier:
    def __init__(self, decision):
        self.decision = decision

    def command_received(self, session, command):
        return self.decision


class DecisionTests(unittest.TestCase):
    def test_default_and_unknown(self):
        """
        A denial is a policy's refusal unless it says otherwise, and a
        refusal kind the model does not know is a programming error, caught
        at once.
        """
        self.assertEqual(Decision.deny("no").refusal, FORBIDDEN)
        self.assertEqual(Decision.deny("no").to_json()["refusal"], FORBIDDEN)
        self.assertRaises(ValueError, Decision.deny, "no", refusal="42501")
        self.assertNotIn("refusal", Decision.allow("fine").to_json())


class ChainRefusalTests(unittest.TestCase):
    def test_failure_is_failed(self):
        """
        An addon that raises refuses with C{failed}; on a PostgreSQL session
        the decision also carries the SQLSTATE the client gets (42501), on
        an SSH session none.
        """
        chain = AddonChain([("broken", Raiser())])
        decision = chain.submit(session(), sql_command("SELECT 1"))
        self.assertEqual((decision.refusal, decision.sqlstate), (FAILED, "42501"))
        decision = chain.submit(session(protocol="ssh"), sql_command("SELECT 1"))
        self.assertEqual((decision.refusal, decision.sqlstate), (FAILED, None))

    def test_addon_sqlstate_kept(self):
        """
        A decision that already names its SQLSTATE (the PostgreSQL front
        end's own) keeps it.
        """
        chain = AddonChain([("a", Denier(Decision.deny("no", sqlstate="26000")))])
        self.assertEqual(chain.submit(session(), sql_command("SELECT 1")).sqlstate, "26000")


class PostgresTests(unittest.TestCase):
    def test_sqlstates(self):
        """
        Each refusal has a SQLSTATE at login and for a statement, the ones
        the gateway always sent: 28P01 for credentials, 28000 for a login
        refused otherwise, 42501 for a statement, 57014 for a cancel.
        """
        def at(stage, refusal, addon="block"):
            return refusals.sqlstate(Decision.deny("x", addon=addon, refusal=refusal), stage)

        self.assertEqual(at("session", UNAUTHENTICATED, "identity"), "28P01")
        self.assertEqual(at("session", UNAUTHENTICATED, "gateway"), "28000")
        self.assertEqual(at("session", FORBIDDEN), "28000")
        self.assertEqual(at("session", FAILED), "28000")
        self.assertEqual(at("command", FORBIDDEN), "42501")
        self.assertEqual(at("command", FAILED), "42501")
        self.assertEqual(at("command", CANCELLED), "57014")
        self.assertEqual(at("session", UNAVAILABLE), "57P03")
        for refusal in REFUSALS:
            self.assertEqual(len(at("command", refusal)), 5)


class KubernetesTests(unittest.TestCase):
    def test_statuses(self):
        """
        A refused Kubernetes session is 401 when who the client is was not
        proven, 503 when the connection is paused, else 403.
        """
        self.assertEqual(refusal_status(Decision.deny("x", refusal=UNAUTHENTICATED)), 401)
        self.assertEqual(refusal_status(Decision.deny("x", addon="identity", refusal=FAILED)), 401)
        self.assertEqual(refusal_status(Decision.deny("x", addon="block", refusal=FAILED)), 403)
        self.assertEqual(refusal_status(Decision.deny("x", refusal=FORBIDDEN)), 403)
        self.assertEqual(refusal_status(Decision.deny("x", refusal=UNAVAILABLE)), 503)
