"""
The approvals broker of gateways that share a PostgreSQL store: a
statement waiting on one gateway is approved, denied or covered by a grant
through any of them, and decided exactly once.

- The chain is the record of truth.  Requests, votes, outcomes, grants,
  revocations and uses are the same chain events the single broker
  records; the table C{approvals} beside the events is only their index:
  one row per request or grant naming the seq of the events that opened,
  voted on and closed it.  A row is written in the transaction that
  appends the event it points to, a trigger lets it change only by
  recording what comes next (a closed row never changes again), and every
  request or grant a broker acts on is rebuilt from the chain's events
  themselves (L{hoopgw.approvals.index}).
- Every decision is taken under the chain's lock
  (L{PostgresStore.append_checked}): the broker reads the request from the
  store, checks the vote exactly as the single broker does, and appends the
  vote and the outcome in the same transaction, so two gateways can never
  both decide one request, nor a late vote beat the timeout.
- The gateway holding the statement learns of a decision by LISTEN/NOTIFY,
  sent in the deciding transaction (so only once it is committed).  A
  notification is only a wake-up call: the waiting gateway reads the
  outcome event from the chain and checks that it is bound to its
  statement before it releases anything.  A slow sweep is the safety net:
  it settles this gateway's requests whose wake-up was lost, ends requests
  whose gateway is gone (its lock in the store is free: a crash or a kill)
  and those long past their timeout.
"""

import json

from twisted.internet import defer, task
from twisted.logger import Logger

from hoopgw import logs
from hoopgw.approvals import model
from hoopgw.approvals.broker import FINISHED_KEPT, Broker
from hoopgw.approvals.index import ApprovalsIndex, channel, recorded_decision, schema_sql
from hoopgw.approvals.model import ApprovalError
from hoopgw.model import Decision
from hoopgw.store.postgres import gateway_lock

__all__ = ["GRACE", "RECONCILE_INTERVAL", "SharedBroker", "channel", "schema_sql"]

# How often a gateway looks for what a lost wake-up or a dead gateway left
# pending; and how long after its timeout another gateway's request is
# ended by whoever sees it (its own gateway normally ends it on time).
RECONCILE_INTERVAL = 30.0
GRACE = 5.0


class _Holding:
    """
    A statement being held: its request, once recorded, and whether its
    client gave up before that.
    """

    def __init__(self):
        self.request = None
        self.cancelled = False


class SharedBroker(Broker):
    """
    The approvals of every gateway sharing C{store} (a
    L{hoopgw.store.postgres.PostgresStore}).  Its reads answer with
    L{Deferred}s.
    """

    log = Logger()

    def __init__(self, reactor, store, record, reconcile_interval=RECONCILE_INTERVAL, **options):
        Broker.__init__(self, reactor, record, **options)
        self.store = store
        self.reconcile_interval = reconcile_interval
        self.index = ApprovalsIndex(store, self.ledger)
        self._waiting = {}
        self._loop = None
        self._closed = False
        self.index.prepare()

    def start(self):
        """
        Listen for decisions, and sweep now and every so often.
        """
        self.store.listen(self.index.channel, self._notified).addErrback(
            lambda failure: logs.failed(self.log, failure, "Listening for approvals on the shared store failed")
        )
        self._loop = task.LoopingCall(self._reconcile)
        self._loop.clock = self.reactor
        self._loop.start(self.reconcile_interval, now=True)

    def close(self):
        self._closed = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for request in self._waiting.values():
            request.stop_timer()
        Broker.close(self)

    def get(self, request_id):
        return self.store.read(lambda cursor: self.index.request(cursor, request_id))

    def list(self, status="pending"):
        """
        The requests of every gateway sharing the store: those pending, or
        the latest ones (of one status).
        """
        if status == "pending":
            return self.index.read("request", "closed IS NULL")
        if status:
            return self.index.read("request", "status = %s", (status,), FINISHED_KEPT)
        return self.index.read("request", "true", (), FINISHED_KEPT)

    def grants_list(self, include_inactive=False):
        if include_inactive:
            return self.index.read("grant", "true", (), FINISHED_KEPT)
        now = self.now()
        found = self.index.read("grant", "closed IS NULL AND expires > %s", (now,))
        return found.addCallback(lambda grants: [grant for grant in grants if grant.active(now)])

    # Requests.

    def decide(self, session, command, rule):
        """
        In one transaction under the chain's lock: use an active grant for
        C{command} (from any gateway), or record a request for approvers.
        """
        return self._hold(session, command, rule, grants=True)

    def submit(self, session, command, rule):
        return self._hold(session, command, rule, grants=False)

    def active_grant(self, connection, rule_name, identity):
        raise NotImplementedError("on a shared store a grant is checked and used under the chain's lock: call decide()")

    def use_grant(self, grant, session, command):
        raise NotImplementedError("on a shared store a grant is checked and used under the chain's lock: call decide()")

    def _hold(self, session, command, rule, grants):
        holding = _Holding()
        waiting = defer.Deferred(lambda _: self._gave_up(holding))

        @defer.inlineCallbacks
        def work(cursor, append):
            now = self.now()
            if grants:
                found = yield self.index.load(
                    cursor,
                    "grant",
                    "closed IS NULL AND connection = %s AND rule = %s AND subject = %s AND expires > %s",
                    (session.connection, rule.name, session.identity.subject, now),
                )
                grant = next((grant for grant in found if grant.active(now)), None)
                if grant is not None:
                    event = yield append(self.ledger.grant_use(grant, session, command))
                    yield self.index.used(cursor, grant.id)
                    return model.grant_decision(grant, event["digest"])
            request = model.new_request(session, command, rule, now, self.instance)
            yield self.index.open(
                cursor,
                append,
                self.ledger.request(request),
                (request.id, "request", "pending", request.connection, rule.name, session.identity.subject,
                 self.instance, request.expires),
            )
            # Known as waiting before the commit, so that no wake-up can come first.
            request.deferred = waiting
            self._waiting[request.id] = request
            holding.request = request
            return request

        def held(result):
            if isinstance(result, Decision):
                if not waiting.called:
                    waiting.callback(result)
                return
            request = result
            if holding.cancelled or waiting.called:
                # The client went away while the request was being recorded.
                self._waiting.pop(request.id, None)
                self._end_if_pending(request.id, "cancelled", "the client gave up waiting")
                return
            request.timer = self.reactor.callLater(max(0.0, request.expires - self.now()), self._expire, request)
            self.notifier.waiting(session, request)

        def unrecorded(failure):
            logs.failed(self.log, failure, "An approval request could not be recorded")
            if holding.request is not None:
                self._waiting.pop(holding.request.id, None)
            if not waiting.called:
                waiting.callback(model.unrecorded(rule.name, failure))

        self.store.append_checked(work).addCallbacks(held, unrecorded)
        return waiting

    def _gave_up(self, holding):
        """
        The client went away: its request, once recorded, is cancelled.
        """
        request = holding.request
        if request is None:
            holding.cancelled = True
            return
        if self._waiting.pop(request.id, None) is not None:
            request.stop_timer()
            self._end_if_pending(request.id, "cancelled", "the client gave up waiting")

    def _expire(self, request):
        request.timer = None
        self._end_if_pending(request.id, "expired")

    def _end_if_pending(self, request_id, status, reason=None):
        """
        End a request (it timed out, its client gave up) unless a decision
        came first, in which case that decision applies.
        """

        @defer.inlineCallbacks
        def work(cursor, append):
            request = yield self.index.request(cursor, request_id)
            if request.status != "pending":
                return request, False
            decision = model.timed_out(request) if status == "expired" else model.gave_up(request, reason)
            yield self.index.close(cursor, append, request, status, decision)
            return request, True

        def ended(result):
            request, here = result
            if here:
                self.notifier.ended(request)
            self._apply(request)

        def failed(failure):
            logs.failed(self.log, failure, "Ending approval request {id} failed", id=request_id)
            self._fail_waiting(request_id, failure)

        return self.store.append_checked(work).addCallbacks(ended, failed)

    def _fail_waiting(self, request_id, failure):
        # Fail closed: the statement is refused when its fate cannot be recorded.
        request = self._waiting.pop(request_id, None)
        if request is None:
            return
        request.stop_timer()
        if not request.deferred.called:
            request.deferred.callback(model.unrecorded(request.rule.name, failure, "decided in the record"))

    def _apply(self, final):
        """
        Release or refuse the statement this gateway holds for C{final}, a
        request the chain says is decided.
        """
        request = self._waiting.get(final.id)
        if request is None or final.status == "pending":
            return
        del self._waiting[final.id]
        request.stop_timer()
        if request.deferred.called:
            return
        request.deferred.callback(self._bound_decision(request, final))

    def _bound_decision(self, request, final):
        """
        The decision recorded for C{final}, if it is bound to the statement
        held as C{request}; a refusal otherwise.
        """
        outcome = final.outcome or {}
        approval = outcome.get("approval") or {}
        if (
            final.digest != request.digest
            or final.connection != request.connection
            or (outcome.get("verdict") == "approved" and approval.get("digest") != request.digest)
        ):
            return Decision.deny(
                "the decision recorded for %s is not bound to this statement; it is refused" % (request.id,),
                rule="approve:%s:error" % (request.rule.name,),
            )
        return recorded_decision(outcome) if outcome else model.gave_up(request, "the request ended without a decision")

    def _vote(self, request_id, approver, reason, digest, approve):
        action = "approve" if approve else "deny"
        late = []

        @defer.inlineCallbacks
        def work(cursor, append):
            request = yield self.index.request(cursor, request_id)
            if request.status == "pending" and self.now() >= request.expires:
                # The time ran out before this vote: the timeout denies, as it
                # does on the gateway holding the statement.
                yield self.index.close(cursor, append, request, "expired", model.timed_out(request))
                late.append(request)
                return request
            vote, settled = self._cast(request, approver, reason, digest, approve)
            vote = yield append(vote)
            yield self.index.voted(cursor, request.id, vote["seq"])
            if settled is not None:
                yield self.index.close(cursor, append, request, *settled)
            else:
                yield self.index.wake(cursor, request.id, "vote")
            return request

        def voted(request):
            if request.status != "pending":
                self.notifier.ended(request)
                self._apply(request)
            if late:
                error = ApprovalError("request %s is expired; it can no longer be %sd" % (request.id, action), 409)
                return self.ledger.refused(error, approver, approval=request_id, action=action)
            return request

        def refused(failure):
            failure.trap(ApprovalError)
            if request_id in self._waiting:
                # Decided already, perhaps through another gateway whose
                # wake-up is still on its way: apply what the chain says.
                self._settle([request_id])
            return self.ledger.refused(failure.value, approver, approval=request_id, action=action)

        return self.store.append_checked(work).addCallbacks(voted, refused)

    # Wake-ups and the sweep.

    def _notified(self, payload):
        if self._closed:
            return
        try:
            request_id = json.loads(payload).get("approval")
        except (ValueError, AttributeError):
            return
        if request_id in self._waiting:
            self._settle([request_id])

    def _settle(self, request_ids):
        """
        Apply what the chain says of requests this gateway holds.
        """
        read = self.index.read("request", "id = ANY(%s)", (list(request_ids),))
        read.addCallback(lambda requests: [self._apply(request) for request in requests])
        read.addErrback(lambda failure: logs.failed(self.log, failure, "Reading approval decisions failed"))
        return read

    def _reconcile(self):
        if self._closed:
            return None
        if self._waiting:
            self._settle(list(self._waiting))
        swept = self.store.append_checked(self._sweep)
        swept.addCallback(lambda ended: [self.notifier.ended(request) for request in ended])
        swept.addErrback(lambda failure: logs.failed(self.log, failure, "Sweeping the shared approvals failed"))
        return swept

    @defer.inlineCallbacks
    def _sweep(self, cursor, append):
        """
        End other gateways' requests that nobody will end: their gateway is
        gone (its lock is free), or they are long past their timeout.
        """
        found = yield self.index.load(cursor, "request", "closed IS NULL AND gateway IS DISTINCT FROM %s", (self.instance,))
        if not found:
            return []
        running = yield self.index.running(cursor)
        now = self.now()
        ended = []
        for request in found:
            if request.gateway is None or gateway_lock(request.gateway) not in running:
                reason = (
                    "the gateway %s holding this statement stopped without deciding it (a crash or a kill); "
                    "its client is gone" % (request.gateway,)
                )
                yield self.index.close(cursor, append, request, "cancelled", model.gave_up(request, reason))
            elif now >= request.expires + GRACE:
                yield self.index.close(cursor, append, request, "expired", model.timed_out(request))
            else:
                continue
            ended.append(request)
        return ended

    # Grants.

    def _keep(self, grant):
        @defer.inlineCallbacks
        def work(cursor, append):
            yield self.index.open(
                cursor,
                append,
                self.ledger.grant(grant),
                (grant.id, "grant", "active", grant.connection, grant.rule, grant.subject, None, grant.expires),
            )
            yield self.index.wake(cursor, grant.id, "grant.create")
            return grant

        return self.store.append_checked(work)

    def revoke(self, grant_id, approver, reason):
        @defer.inlineCallbacks
        def work(cursor, append):
            found = yield self.index.load(cursor, "grant", "id = %s", (grant_id,))
            if not found:
                raise model.no_grant(grant_id)
            grant = found[0]
            self.judge.revoke(grant, approver, reason)
            event = yield append(self.ledger.revoke(grant))
            yield self.index.revoked(cursor, grant.id, event["seq"])
            yield self.index.wake(cursor, grant.id, "grant.revoke")
            return grant

        def refused(failure):
            failure.trap(ApprovalError)
            return self.ledger.refused(failure.value, approver, action="revoke", grant=grant_id)

        return self.store.append_checked(work).addErrback(refused)

