"""
Small real addons the Kubernetes gateway tests load by path: one denies by
Kubernetes facts, one holds requests until the test decides (as an approval
would), one fails on results (as a broken step would), one masks card numbers with L{hoopgw.cards} in whatever result it
is handed.
"""

from twisted.internet import defer

from hoopgw import cards
from hoopgw import options as o
from hoopgw.addon import AddonFactory
from hoopgw.model import Decision


class DenyKubernetes:
    """
    Deny deleting namespaces, and exec into pods of the prod namespace.
    """

    name = "deny-kubernetes"
    options = ()

    def __init__(self, options, context):
        pass

    def command_received(self, session, command):
        facts = command.facts
        if facts.get("verb") == "delete" and facts.get("resource") == "namespaces":
            return Decision.deny("namespaces may not be deleted through the gateway", rule="deny-delete-namespaces")
        if (
            facts.get("verb") == "create"
            and facts.get("resource") == "pods"
            and facts.get("subresource") == "exec"
            and facts.get("namespace") == "prod"
        ):
            return Decision.deny("exec into pods of prod is not allowed", rule="deny-exec-prod")
        return None


class HoldDeletes:
    """
    Hold every delete until the test fires its Deferred (a stand-in for the approvals broker).
    """

    name = "hold-deletes"
    options = ()

    def __init__(self, options, context):
        self.pending = []

    def command_received(self, session, command):
        if command.facts.get("verb") != "delete":
            return None
        waiting = defer.Deferred()
        self.pending.append((command, waiting))
        session.notify("waiting for an approval of %s %s" % (command.facts["verb"], command.facts["resource"]))
        return waiting


class MaskCards:
    """
    Mask card numbers in every body and stream the chain is handed.
    """

    name = "mask-cards"
    options = (o.Option("style", o.choice(cards.BIN_AND_LAST_FOUR, cards.LAST_FOUR), cards.BIN_AND_LAST_FOUR, "How much of a PAN to show."),)

    def __init__(self, options, context):
        self.style = options["style"]

    def result_received(self, session, command, chunk):
        if chunk.kind in ("body", "stream") and chunk.data:
            chunk.data, count = cards.mask_bytes(chunk.data, self.style)
            chunk.masked += count


class Explode:
    """
    Fail on any result that says "explode", as a broken masking step would.
    """

    name = "explode"
    options = ()

    def __init__(self, options, context):
        pass

    def result_received(self, session, command, chunk):
        if b"explode" in chunk.data:
            raise RuntimeError("the masking step broke")


deny = AddonFactory(DenyKubernetes)
explode = AddonFactory(Explode)
hold = AddonFactory(HoldDeletes)
mask = AddonFactory(MaskCards)
