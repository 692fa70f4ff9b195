"""
The approvals broker: commands that need a person's approval wait here,
whatever their protocol, until enough approvers say yes, one says no, the
time runs out or the client gives up.  Also holds time-boxed grants (an
identity pre-approved for a rule for a window).  Every request, vote,
outcome, grant and use of a grant goes into the record.

The broker keeps the requests and grants and their timeouts; what they are
made of is in L{hoopgw.approvals.model}, who may act on them in
L{hoopgw.approvals.judge}, their events in L{hoopgw.approvals.ledger} and
the notices in L{hoopgw.approvals.notices}, which the shared store's broker
(L{hoopgw.approvals.shared}) uses as they are.
"""

import collections
import time

from twisted.internet import defer

from hoopgw.approvals import model
from hoopgw.approvals.judge import Judge
from hoopgw.approvals.ledger import Ledger
from hoopgw.approvals.model import ApprovalError, ApprovalRule, Grant, Request, approval_digest
from hoopgw.approvals.notices import Notifier


# Finished requests kept for the API and the CLI to show.
FINISHED_KEPT = 1000

__all__ = ["FINISHED_KEPT", "ApprovalError", "ApprovalRule", "Broker", "Grant", "Request", "approval_digest"]


class Broker:
    """
    The gateway's approvals: pending requests, recent outcomes, grants.

    @param record: a callable taking an event and returning a L{Deferred}
        that fires once it is durable (L{hoopgw.gateway.Gateway.record}).
    @param approver_groups: groups an approver must be in at all, besides
        the rule's own (empty: only the rule's).
    @param url: where approvers reach the admin API, for notices.
    @param instance: the gateway run (L{hoopgw.gateway.Gateway.instance})
        whose sessions wait here, named in the record.

    @ivar judge: the L{Judge} of votes, grants and revocations.
    @ivar ledger: the L{Ledger} that builds and records the events.
    @ivar notifier: the L{Notifier} of clients and webhooks.
    """

    def __init__(self, reactor, record, approver_groups=frozenset(), url=None, clock=time.time, instance=None):
        self.reactor = reactor
        self.approver_groups = frozenset(approver_groups or ())
        self.url = url
        self.instance = instance
        self._clock = clock
        self.rules = {}
        self.judge = Judge(self.approver_groups, self.rules, self.now)
        self.ledger = Ledger(record, instance)
        self.notifier = Notifier(self.ledger, url)
        self.requests = {}
        self._finished = collections.deque()
        self.grants = {}

    def now(self):
        return self._clock()

    def register(self, connection, rule, webhooks=()):
        """
        Make C{rule} of C{connection} known, so grants can name it.
        """
        self.rules[(connection, rule.name)] = rule
        self.notifier.register(connection, webhooks)

    def start(self):
        """
        The gateway has started (nothing to do for a broker in memory).
        """

    def decide(self, session, command, rule):
        """
        What C{rule} decides about C{command}: approved at once under an
        active grant (the use is recorded), else held for approvers.

        @return: a L{Decision} or a L{Deferred} firing with one.
        """
        grant = self.active_grant(session.connection, rule.name, session.identity)
        if grant is not None:
            return self.use_grant(grant, session, command)
        return self.submit(session, command, rule)

    def close(self):
        """
        The gateway is stopping: stop the timers of requests still pending
        (their sessions are being closed, which cancels them) and the
        notifications still being delivered.
        """
        for request in self.requests.values():
            request.stop_timer()
        self.notifier.close()

    # Requests.

    def submit(self, session, command, rule):
        """
        Hold C{command} until it is approved, denied, times out or is
        cancelled.

        @return: a L{Deferred} firing with the L{Decision}; cancelling it
            (the client went away) cancels the request.
        """
        request = model.new_request(session, command, rule, self.now(), self.instance)
        request.deferred = defer.Deferred(lambda _: self._end(request, "cancelled", model.gave_up(request), answer=False))
        self.requests[request.id] = request
        request.timer = self.reactor.callLater(rule.timeout, self._expired, request)
        self.ledger.record(self.ledger.request(request)).addErrback(
            lambda failure: self._end(request, "failed", model.unrecorded(rule.name, failure))
        )
        self.notifier.waiting(session, request)
        return request.deferred

    def get(self, request_id):
        request = self.requests.get(request_id)
        if request is None:
            raise model.no_request(request_id)
        return request

    def list(self, status="pending"):
        requests = sorted(self.requests.values(), key=lambda request: request.created)
        if status:
            requests = [request for request in requests if request.status == status]
        return requests

    def approve(self, request_id, approver, reason, digest=None):
        """
        One approver says yes.  Once the rule's number of approvals is
        reached, the command runs.

        @return: a L{Deferred} firing with the L{Request} once the vote is
            recorded, or failing with L{ApprovalError}.
        """
        return self._vote(request_id, approver, reason, digest, True)

    def deny(self, request_id, approver, reason):
        """
        One approver says no: the command is refused.
        """
        return self._vote(request_id, approver, reason, None, False)

    def _vote(self, request_id, approver, reason, digest, approve):
        try:
            request = self.get(request_id)
            vote, settled = self._cast(request, approver, reason, digest, approve)
        except ApprovalError as error:
            return self.ledger.refused(error, approver, approval=request_id, action="approve" if approve else "deny")
        def recorded(_):
            if settled is not None:
                self._end(request, *settled)
            return request

        def unrecorded(failure):
            # Nothing may run on a vote the record does not hold (fail closed).
            self._end(request, "failed", model.unrecorded(request.rule.name, failure, "decided in the record"))
            return failure

        return self.ledger.record(vote).addCallbacks(recorded, unrecorded)

    def _cast(self, request, approver, reason, digest, approve):
        """
        Check a vote on C{request} and count it.

        @return: C{(its event, (status, decision) or None)}: what the votes
            now decide, None while more approvals are needed.
        @raise ApprovalError: saying why the vote is refused.
        """
        reason = self.judge.check_vote(request, approver, reason, digest, approve)
        vote = self.ledger.vote(request, approver, reason, approve, self.now())
        return vote, self.judge.tally(request, approver, reason, approve)

    def _expired(self, request):
        request.timer = None
        self._end(request, "expired", model.timed_out(request))

    def _end(self, request, status, decision, answer=True):
        """
        End a pending C{request}: record how, tell the webhooks, and (unless
        its client gave up: C{answer} false) release or refuse its command.
        """
        if request.status != "pending":
            return
        request.status = status
        request.outcome = decision.to_json()
        request.stop_timer()
        self._finished.append(request.id)
        while len(self._finished) > FINISHED_KEPT:
            self.requests.pop(self._finished.popleft(), None)
        # The ledger logs an outcome it could not record; the command's own
        # record carries the decision.
        self.ledger.record(self.ledger.outcome(request)).addErrback(lambda failure: None)
        self.notifier.ended(request)
        if answer and not request.deferred.called:
            request.deferred.callback(decision)

    # Grants.

    def grant(self, approver, connection, rule_name, subject, duration, reason):
        """
        Pre-approve C{subject} for C{rule_name} on C{connection} for
        C{duration} seconds.

        @return: a L{Deferred} firing with the L{Grant} once recorded.
        """
        try:
            grant = self.judge.new_grant(approver, connection, rule_name, subject, duration, reason)
        except ApprovalError as error:
            return self.ledger.refused(error, approver, action="grant", connection=connection, rule=rule_name, grantee=subject)
        return self._keep(grant)

    def _keep(self, grant):
        """
        Record a checked grant; @return: a L{Deferred} firing with it.
        """
        def recorded(_):
            # In effect only once the record holds it (fail closed).
            self.grants[grant.id] = grant
            return grant

        return self.ledger.record(self.ledger.grant(grant)).addCallback(recorded)

    def revoke(self, grant_id, approver, reason):
        grant = self.grants.get(grant_id)
        try:
            if grant is None:
                raise model.no_grant(grant_id)
            self.judge.revoke(grant, approver, reason)
        except ApprovalError as error:
            return self.ledger.refused(error, approver, action="revoke", grant=grant_id)
        return self.ledger.record(self.ledger.revoke(grant)).addCallback(lambda _: grant)

    def active_grant(self, connection, rule_name, identity):
        now = self.now()
        for grant in self.grants.values():
            if (
                grant.connection == connection
                and grant.rule == rule_name
                and grant.subject == identity.subject
                and grant.active(now)
            ):
                return grant
        return None

    def use_grant(self, grant, session, command):
        """
        A command runs under C{grant}.

        @return: a L{Deferred} firing with the L{Decision} once the use is
            recorded.
        """
        event = self.ledger.grant_use(grant, session, command)
        return self.ledger.record(event).addCallback(lambda _: model.grant_decision(grant, event["digest"]))

    def grants_list(self, include_inactive=False):
        now = self.now()
        return [grant for grant in self.grants.values() if include_inactive or grant.active(now)]
