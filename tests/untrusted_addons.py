"""
An addon tests/test_untrusted_e2e.py loads by path: it holds every SQL
statement until the test decides it, as an approval does.
"""

from twisted.internet import defer

from hoopgw.addon import AddonFactory
from hoopgw.model import Decision

# The decisions waiting, oldest first (the gateway runs in the test's process).
HELD = []


class Hold:
    name = "test-hold"
    options = ()

    def __init__(self, options, context):
        pass

    def command_received(self, session, command):
        # Loaded by path, this file is another module than the test's
        # tests.untrusted_addons: keep the decisions where the test looks.
        from tests import untrusted_addons

        decision = defer.Deferred()
        untrusted_addons.HELD.append((command.text, decision))
        return decision


hold = AddonFactory(Hold)


def allow(decision):
    decision.callback(Decision.allow())
