"""
How people learn of a request: the notice the waiting client is shown, and
the webhooks told of every request and outcome (each delivery recorded).
"""

from twisted.internet import defer

from hoopgw.approvals.model import duration
from hoopgw.model import Unavailable


class Notifier:
    """
    The notices of one gateway's approvals.

    @param ledger: the L{hoopgw.approvals.ledger.Ledger} deliveries are
        recorded in.
    @param url: where approvers reach the admin API, for notices.
    """

    def __init__(self, ledger, url=None):
        self.ledger = ledger
        self.url = url
        self.webhooks = {}
        self._deliveries = set()

    def register(self, connection, webhooks):
        if webhooks:
            self.webhooks[connection] = list(webhooks)

    def notice(self, request):
        """
        What the waiting client is told.
        """
        where = (" or POST %s/api/approvals/%s/approve" % (self.url, request.id)) if self.url else ""
        return (
            "hoopgw: this %s needs approval (rule %s: %d approval%s from %s). Request %s is waiting; "
            "an approver runs: hoopgw approvals approve %s --reason '...'%s. Waiting up to %s."
            % (
                request.noun,
                request.rule.name,
                request.rule.approvals,
                "" if request.rule.approvals == 1 else "s",
                ", ".join(sorted(request.rule.approvers)),
                request.id,
                request.id,
                where,
                duration(request.rule.timeout),
            )
        )

    def waiting(self, session, request):
        """
        C{request} is recorded and waits: tell its client and the webhooks.
        """
        session.notify(self.notice(request))
        self.announce(request, "approval.request")

    def ended(self, request):
        """
        C{request} ended (C{request.status} says how): tell the webhooks.
        """
        self.announce(request, "approval.%s" % (request.status,))

    def announce(self, request, kind):
        for webhook in self.webhooks.get(request.connection, ()):
            payload = dict(request.to_json(), type=kind)
            if self.url:
                payload["api"] = "%s/api/approvals/%s" % (self.url, request.id)
            payload["cli"] = "hoopgw approvals approve %s --reason '...'" % (request.id,)
            delivery = webhook.send(payload)
            self._deliveries.add(delivery)
            delivery.addBoth(self._delivery_over, delivery)
            delivery.addCallback(self._delivered, request, kind, webhook)
            # A notice the store could not record is logged by the ledger.
            delivery.addErrback(lambda failure: failure.trap(defer.CancelledError, Unavailable))

    def _delivery_over(self, result, delivery):
        self._deliveries.discard(delivery)
        return result

    def _delivered(self, outcome, request, kind, webhook):
        event = self.ledger.event(request, "approval.notified", webhook=webhook.name, notice=kind)
        event.update(outcome)
        return self.ledger.record(event)

    def close(self):
        """
        Stop the notifications still being delivered.
        """
        for webhooks in self.webhooks.values():
            for webhook in webhooks:
                webhook.closed = True
        for delivery in list(self._deliveries):
            delivery.cancel()
