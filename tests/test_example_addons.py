"""
The example addon in addons/, through the public testing harness and loaded
by path from a configuration, as an addon author would use them.
"""

import calendar
import os

from twisted.trial import unittest

from hoopgw import config as configuration
from hoopgw.options import ConfigError
from hoopgw.testing import ChainHarness, FakeContext, FakeGateway, session, sql_command

HERE = os.path.dirname(os.path.abspath(__file__))
ADDON = os.path.join(os.path.dirname(HERE), "addons", "business_hours.py")


def _factory():
    return configuration.load_addon_file(ADDON, "test")["business_hours"]


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
