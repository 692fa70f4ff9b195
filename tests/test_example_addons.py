"""
The example addon in addons/, through the public testing harness and loaded
by path from a configuration, as an addon author would use them.
"""

import calendar
import os

from twisted.trial import unittest

from hoopgw import config as configuration
from hoopgw.options import ConfigError
from hoopgw.testing import ChainHarness, FakeContext, FakeGateway, load, session, sql_command

HERE = os.path.dirname(os.path.abspath(__file__))
ADDON = os.path.join(os.path.dirname(HERE), "addons", "business_hours.py")


def _factory():
    return load(ADDON)


def _at(timestamp):
    gateway = FakeGateway()
    gateway.reactor.advance(calendar.timegm(timestamp))
    return FakeContext(gateway=gateway)


class BusinessHoursTests(unittest.TestCase):
    """
    C{addons/business_hours.py}: commands of service identities inside the
    window pass, outside it they are denied with the rule's name.
    """

    def harness(self, when, **options):
        return ChainHarness([(_factory(), options)], context=_at(when))

    def test_inside_window(self):
        """
        A Wednesday at noon: no opinion, so the command is allowed.
        """
        decision = self.harness((2026, 11, 25, 12, 0, 0)).submit(sql_command("SELECT 1"))
        self.assertEqual(decision.verdict, "allow")

    def test_outside_window(self):
        """
        A Wednesday at 23:00: denied, naming the rule and the window.
        """
        decision = self.harness((2026, 11, 25, 23, 0, 0)).submit(sql_command("SELECT 1"))
        self.assertTrue(decision.denied)
        self.assertEqual(decision.rule, "business_hours")
        self.assertEqual(decision.addon, "business_hours")
        self.assertIn("07:00-19:00", decision.reason)

    def test_weekend(self):
        """
        A Sunday at noon is outside the default weekdays.
        """
        decision = self.harness((2026, 11, 29, 12, 0, 0)).submit(sql_command("SELECT 1"))
        self.assertTrue(decision.denied)

    def test_humans_exempt(self):
        """
        Human identities are not held to the window unless asked.
        """
        harness = self.harness((2026, 11, 29, 12, 0, 0))
        human = session(kind="human")
        self.assertEqual(harness.submit(sql_command("SELECT 1"), session=human).verdict, "allow")

    def test_bad_option(self):
        """
        A malformed window is refused when the options are checked, naming
        the option.
        """
        with self.assertRaises(ConfigError) as caught:
            self.harness((2026, 11, 25, 12, 0, 0), hours="noon till late")
        self.assertIn("business_hours.hours", str(caught.exception))

    def test_loaded_by_path(self):
        """
        A configuration naming the file by path builds it into the chain.
        """
        from tests.support import configuration_document, postgres_connection

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        connection = postgres_connection(
            15999, addons=["identity", {"path": ADDON, "options": {"hours": "06:00-20:00"}}, "record"]
        )
        config = configuration.parse(configuration_document(directory, {"payments": connection}))
        spec = config.connections["payments"].addons[1]
        self.assertEqual((spec.name, spec.source), ("business_hours", ADDON))
        self.assertEqual(spec.options["hours"], (360, 1200))


class HarnessTests(unittest.TestCase):
    """
    The addon author's kit itself: loading by path, a Deferred that never
    fires, and what addons log.
    """

    def write(self, source):
        path = self.mktemp() + ".py"
        with open(path, "w") as handle:
            handle.write(source)
        return path

    def test_load_errors(self):
        """
        C{load} refuses a file without an addon, and asks which one when a
        file defines several, naming the file.
        """
        empty = self.write("x = 1\n")
        with self.assertRaises(ConfigError) as caught:
            load(empty)
        self.assertIn("defines no addon", str(caught.exception))
        two = self.write(
            "from hoopgw import AddonFactory\n"
            "class A:\n    name = 'a'\n    options = ()\n    def __init__(self, o, c): pass\n"
            "class B(A):\n    name = 'b'\n"
            "a, b = AddonFactory(A), AddonFactory(B)\n"
        )
        with self.assertRaises(ConfigError) as caught:
            load(two)
        self.assertIn("defines several addons (a, b)", str(caught.exception))
        self.assertEqual(load(two, name="b").name, "b")

    def test_unfired_deferred_fails_loudly(self):
        """
        A hook whose Deferred never fires makes the harness raise, saying
        what to do, unless the test says waiting is the point; then the
        Deferred is returned and fires when the addon decides.
        """
        from twisted.internet import defer

        from hoopgw import Decision

        waiting = []

        class Waits:
            name = "waits"
            options = ()

            def __init__(self, options, context):
                pass

            def command_received(self, session, command):
                waiting.append(defer.Deferred())
                return waiting[-1]

        from hoopgw import AddonFactory

        harness = ChainHarness([(AddonFactory(Waits), {})])
        with self.assertRaises(AssertionError) as caught:
            harness.submit(sql_command("SELECT 1"))
        self.assertIn("has not fired", str(caught.exception))
        pending = harness.submit(sql_command("SELECT 2"), pending=True)
        self.assertNoResult(pending)
        waiting[-1].callback(Decision.deny("no", rule="waits"))
        self.assertTrue(self.successResultOf(pending).denied)

    def test_logs_captured(self):
        """
        What an addon logs while the harness drives it is kept in
        C{harness.logs}.
        """
        from twisted.logger import Logger

        from hoopgw import AddonFactory

        class Chatty:
            name = "chatty"
            options = ()
            log = Logger()

            def __init__(self, options, context):
                pass

            def command_received(self, session, command):
                self.log.info("looked at {text}", text=command.redacted)

        harness = ChainHarness([(AddonFactory(Chatty), {})])
        harness.submit(sql_command("SELECT 42"))
        self.assertTrue(harness.logged("looked at SELECT 42"))
        self.assertFalse(harness.logged("SELECT 43"))

    def test_frontends_declare_their_interface(self):
        """
        Each protocol's package provides what L{hoopgw.interfaces.IFrontend}
        declares.
        """
        import hoopgw.kubernetes
        import hoopgw.postgres
        import hoopgw.ssh
        from zope.interface.verify import verifyObject

        from hoopgw.interfaces import IFrontend

        for module in (hoopgw.postgres, hoopgw.ssh, hoopgw.kubernetes):
            self.assertTrue(verifyObject(IFrontend, module))
