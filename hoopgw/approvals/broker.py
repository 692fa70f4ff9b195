"""
The approvals broker: commands that need a person's approval wait here,
whatever their protocol, until enough approvers say yes, one says no, the
time runs out or the client gives up.  Also holds time-boxed grants (an
identity pre-approved for a rule for a window).  Every request, vote,
outcome, grant and use of a grant goes into the record.
"""

import collections
import hashlib
import os
import socket
import time

import attr
from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import redact
from hoopgw.model import HUMAN, Decision


# Finished requests kept for the API and the CLI to show.
FINISHED_KEPT = 1000


class ApprovalError(Exception):
    """
    An approver's action was refused.  C{str()} is a sentence for the
    approver; C{code} an HTTP status.
    """

    def __init__(self, message, code=403):
        Exception.__init__(self, message)
        self.code = code


@attr.s(frozen=True)
class ApprovalRule:
    """
    What a rule asks of approvers: who (groups), how many, how soon, and
    how long a grant for it may last.
    """

    name = attr.ib()
    approvers = attr.ib(converter=frozenset)
    approvals = attr.ib(default=1)
    timeout = attr.ib(default=300.0)
    max_grant = attr.ib(default=86400.0)
    reason = attr.ib(default=None)

    def to_json(self):
        return {
            "name": self.name,
            "approvers": sorted(self.approvers),
            "approvals": self.approvals,
            "timeout_s": self.timeout,
            "max_grant_s": self.max_grant,
        }


def approval_digest(command, identity, connection):
    """
    What an approval is bound to: the exact command and its parameters,
    who asked, on which connection.
    """
    digest = hashlib.sha256(b"hoopgw-approval\x00")
    for part in (command.digest_input, identity.subject.encode(), identity.issuer.encode(), connection.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _noun(command):
    return {"sql": "statement", "kubernetes": "request"}.get(command.kind, "command")


def _new_id(prefix):
    return "%s-%s" % (prefix, os.urandom(6).hex())


def _who(identity):
    return {"subject": identity.subject, "issuer": identity.issuer, "kind": identity.kind}


@attr.s(eq=False)
class Request:
    """
    One command waiting for approval.
    """

    id = attr.ib()
    connection = attr.ib()
    session = attr.ib()
    command = attr.ib()
    rule = attr.ib()
    requester = attr.ib()
    text = attr.ib()
    parameters = attr.ib()
    facts = attr.ib()
    digest = attr.ib()
    created = attr.ib()
    expires = attr.ib()
    approvals = attr.ib(factory=list)
    status = attr.ib(default="pending")
    outcome = attr.ib(default=None)
    gateway = attr.ib(default=None)
    deferred = attr.ib(default=None, repr=False)
    timer = attr.ib(default=None, repr=False)
    # What the client calls what it asked for: a statement, a command, a request.
    noun = attr.ib(default="statement")

    def to_json(self):
        result = {
            "id": self.id,
            "status": self.status,
            "connection": self.connection,
            "session": self.session,
            "command": self.command,
            "rule": self.rule.name,
            "requester": _who(self.requester),
            "statement": self.text,
            "digest": self.digest,
            "facts": self.facts,
            "approvals_required": self.rule.approvals,
            "approver_groups": sorted(self.rule.approvers),
            "approvals": list(self.approvals),
            "created": self.created,
            "expires": self.expires,
        }
        if self.parameters:
            result["parameters"] = list(self.parameters)
        if self.outcome:
            result["outcome"] = self.outcome
        if self.gateway:
            result["gateway"] = self.gateway
        return result


@attr.s(eq=False)
class Grant:
    """
    An identity pre-approved for a rule on a connection, for a window.
    """

    id = attr.ib()
    connection = attr.ib()
    rule = attr.ib()
    subject = attr.ib()
    granted_by = attr.ib()
    reason = attr.ib()
    created = attr.ib()
    expires = attr.ib()
    uses = attr.ib(default=0)
    revoked = attr.ib(default=None)
    approvers = attr.ib(default=())

    def active(self, now):
        return self.revoked is None and self.created <= now < self.expires

    def to_json(self):
        result = {
            "id": self.id,
            "connection": self.connection,
            "rule": self.rule,
            "subject": self.subject,
            "granted_by": self.granted_by,
            "reason": self.reason,
            "created": self.created,
            "expires": self.expires,
            "uses": self.uses,
        }
        if self.revoked:
            result["revoked"] = self.revoked
        if self.approvers:
            result["approver_groups"] = sorted(self.approvers)
        return result


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
    """

    log = Logger()

    def __init__(self, reactor, record, approver_groups=frozenset(), url=None, clock=time.time, instance=None):
        self.reactor = reactor
        self._record = record
        self.approver_groups = frozenset(approver_groups or ())
        self.url = url
        self.instance = instance
        self._clock = clock
        self.requests = {}
        self._finished = collections.deque()
        self.grants = {}
        self.rules = {}
        self.webhooks = {}
        self._deliveries = set()

    def now(self):
        return self._clock()

    def record(self, event):
        return self._record(self.stamp(event)).addErrback(self._unrecorded, event.get("type"))

    def stamp(self, event):
        """
        Say in C{event} which replica wrote it: the run id changes at every
        restart, the host and the process say where it ran.
        """
        if self.instance:
            event.setdefault("replica", {"host": socket.gethostname(), "pid": os.getpid(), "run": self.instance})
        return event

    def _unrecorded(self, failure, kind):
        self.log.failure("An approvals event ({kind}) could not be recorded", failure, kind=kind)
        return failure

    def register(self, connection, rule, webhooks=()):
        """
        Make C{rule} of C{connection} known, so grants can name it.
        """
        self.rules[(connection, rule.name)] = rule
        if webhooks:
            self.webhooks[connection] = list(webhooks)

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

    # Requests.

    def submit(self, session, command, rule):
        """
        Hold C{command} until it is approved, denied, times out or is
        cancelled.

        @return: a L{Deferred} firing with the L{Decision}; cancelling it
            (the client went away) cancels the request.
        """
        request = self._new_request(session, command, rule, self.now())
        request.deferred = defer.Deferred(lambda _: self._cancelled(request))
        self.requests[request.id] = request
        request.timer = self.reactor.callLater(rule.timeout, self._expired, request)
        self.record(self._request_event(request)).addErrback(lambda failure: self._fail(request, failure))
        session.notify(self.notice(request))
        self._notify_webhooks(request, "approval.request")
        return request.deferred

    def _new_request(self, session, command, rule, now):
        return Request(
            id=_new_id("apr"),
            connection=session.connection,
            session=session.id,
            command=command.id,
            rule=rule,
            requester=session.identity,
            text=command.redacted,
            parameters=tuple(command.redacted_parameters),
            facts=dict(command.facts),
            digest=approval_digest(command, session.identity, session.connection),
            created=now,
            expires=now + rule.timeout,
            gateway=self.instance,
            noun=_noun(command),
        )

    def _request_event(self, request):
        """
        The record of a new request: everything an approver on any gateway
        needs to judge it, and every gateway to check a vote on it.
        """
        rule = request.rule
        event = self._event(request, "approval.request")
        event.update(
            text=request.text,
            digest=request.digest,
            facts=request.facts,
            requester=_who(request.requester),
            approvals_required=rule.approvals,
            approver_groups=sorted(rule.approvers),
            created=request.created,
            timeout=rule.timeout,
            expires=request.expires,
        )
        if request.parameters:
            event["parameters"] = list(request.parameters)
        if request.gateway:
            event["gateway"] = request.gateway
        if request.noun != "statement":
            # What another gateway's refusal calls it (a command, a request).
            event["noun"] = request.noun
        return event

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
                _duration(request.rule.timeout),
            )
        )

    def _event(self, request, kind, **fields):
        event = {
            "type": kind,
            "approval": request.id,
            "session": request.session,
            "connection": request.connection,
            "subject": request.requester.subject,
            "command": request.command,
            "rule": request.rule.name,
        }
        event.update(fields)
        return self.stamp(event)

    def get(self, request_id):
        request = self.requests.get(request_id)
        if request is None:
            raise ApprovalError("there is no approval request %s" % (request_id,), 404)
        return request

    def list(self, status="pending"):
        requests = sorted(self.requests.values(), key=lambda request: request.created)
        if status:
            requests = [request for request in requests if request.status == status]
        return requests

    def _eligible(self, request_rule, approver, requester, self_refusal):
        """
        Refuse an approver who may not act: not a person, the requester
        themselves, or outside the approver groups.
        """
        if approver.kind != HUMAN:
            raise ApprovalError(
                "%s is a service identity; approvals must come from a person signed in with their own token"
                % (approver.subject,)
            )
        if requester is not None and approver.subject == requester:
            raise ApprovalError(self_refusal % (approver.subject,))
        if self.approver_groups and not approver.groups & self.approver_groups:
            raise ApprovalError(
                "%s is not in any approver group of this gateway (%s)"
                % (approver.subject, ", ".join(sorted(self.approver_groups)))
            )
        if not approver.groups & request_rule.approvers:
            raise ApprovalError(
                "%s is not in the approver groups of rule %s (%s)"
                % (approver.subject, request_rule.name, ", ".join(sorted(request_rule.approvers)))
            )

    @defer.inlineCallbacks
    def _refused(self, error, approver, **fields):
        event = {"type": "approval.refused", "approver": _who(approver), "error": str(error)}
        event.update(fields)
        yield self.record(event)
        raise error

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
        action = "approve" if approve else "deny"
        try:
            request = self.get(request_id)
            reason = self._check_vote(request, approver, reason, digest, approve)
        except ApprovalError as error:
            return self._refused(error, approver, approval=request_id, action=action)
        done = self.record(self._vote_event(request, approver, reason, approve))
        settled = self._tally(request, approver, reason, approve)
        if settled is not None:
            self._finish(request, *settled)
        return done.addCallback(lambda _: request)

    def _check_vote(self, request, approver, reason, digest, approve):
        """
        Refuse a vote the rules do not allow: from someone who may not
        approve, without a reason, on a request already decided, naming
        another statement's digest, or a second vote of one person.

        @return: the reason, redacted for the record.
        @raise ApprovalError: saying why the vote is refused.
        """
        action = "approve" if approve else "deny"
        self._eligible(
            request.rule,
            approver,
            request.requester.subject,
            "%%s cannot %s their own request; another approver must" % (action,),
        )
        # What approvers write goes into the record: no card number or token in clear.
        reason = redact.redact_text((reason or "").strip())[0]
        if not reason:
            raise ApprovalError("give a reason: it goes into the record with your %s" % ("approval" if approve else "denial"), 400)
        if request.status != "pending":
            raise ApprovalError("request %s is %s; it can no longer be %sd" % (request.id, request.status, action), 409)
        if digest is not None and digest != request.digest:
            raise ApprovalError(
                "the digest %s is not this request's: an approval is bound to one statement, from one identity, "
                "on one connection" % (digest,),
                409,
            )
        if any(vote["subject"] == approver.subject for vote in request.approvals):
            raise ApprovalError(
                "%s has already voted on %s; it needs approvals from %d different people"
                % (approver.subject, request.id, request.rule.approvals),
                409,
            )
        return reason

    def _vote_event(self, request, approver, reason, approve):
        """
        Count the vote on C{request}; @return: its record.
        """
        action = "approve" if approve else "deny"
        now = self.now()
        request.approvals.append(
            {"subject": approver.subject, "issuer": approver.issuer, "verdict": action, "reason": reason, "at": now}
        )
        event = self._event(request, "approval.vote", approver=_who(approver), verdict=action, reason=reason, at=now)
        if self.instance:
            # Which gateway's API the approver acted through.
            event["gateway"] = self.instance
        return event

    def _tally(self, request, approver, reason, approve):
        """
        What the votes so far decide: C{(status, decision)}, or None while
        more approvals are needed.
        """
        if not approve:
            return (
                "denied",
                Decision.deny(
                    "%s denied this %s: %s" % (approver.subject, request.noun, reason),
                    rule="approve:%s:denied" % (request.rule.name,),
                ),
            )
        if len([v for v in request.approvals if v["verdict"] == "approve"]) >= request.rule.approvals:
            return (
                "approved",
                Decision.approved(
                    self.approval_json(request),
                    reason="approved by %s" % (", ".join(v["subject"] for v in request.approvals),),
                    rule="approve:%s" % (request.rule.name,),
                ),
            )
        return None

    def approval_json(self, request):
        """
        What the command's decision carries: the request, the approvers and
        their reasons, the digest they approved.
        """
        return {
            "id": request.id,
            "rule": request.rule.name,
            "digest": request.digest,
            "approvers": [{"subject": v["subject"], "issuer": v["issuer"], "reason": v["reason"], "at": v["at"]} for v in request.approvals],
        }

    def _finish(self, request, status, decision):
        if request.status != "pending":
            return
        request.status = status
        request.outcome = decision.to_json()
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None
        self._finished.append(request.id)
        while len(self._finished) > FINISHED_KEPT:
            self.requests.pop(self._finished.popleft(), None)
        if status != "cancelled":
            self.record(self._event(request, "approval.%s" % (status,), outcome=request.outcome))
            self._notify_webhooks(request, "approval.%s" % (status,))
        if not request.deferred.called:
            request.deferred.callback(decision)

    def _expired(self, request):
        request.timer = None
        self._finish(request, "expired", _timed_out(request))

    def _cancelled(self, request):
        """
        The client gave up (cancelled, disconnected): the request is void.
        """
        if request.status != "pending":
            return
        request.status = "cancelled"
        request.outcome = _gave_up(request).to_json()
        if request.timer is not None and request.timer.active():
            request.timer.cancel()
        request.timer = None
        self._finished.append(request.id)
        self.record(self._event(request, "approval.cancelled", outcome=request.outcome))
        self._notify_webhooks(request, "approval.cancelled")

    def _fail(self, request, failure):
        # The request could not be recorded: nobody may approve it.
        self._finish(
            request,
            "failed",
            Decision.deny(
                "the approval request could not be recorded (%s)" % (failure.getErrorMessage(),),
                rule="approve:%s:error" % (request.rule.name,),
            ),
        )

    def close(self):
        """
        The gateway is stopping: stop the timers of requests still pending
        (their sessions are being closed, which cancels them) and the
        notifications still being delivered.
        """
        for request in self.requests.values():
            if request.timer is not None and request.timer.active():
                request.timer.cancel()
            request.timer = None
        for webhooks in self.webhooks.values():
            for webhook in webhooks:
                webhook.closed = True
        for delivery in list(self._deliveries):
            delivery.cancel()

    # Grants.

    def grant(self, approver, connection, rule_name, subject, duration, reason):
        """
        Pre-approve C{subject} for C{rule_name} on C{connection} for
        C{duration} seconds.

        @return: a L{Deferred} firing with the L{Grant} once recorded.
        """
        try:
            grant = self._new_grant(approver, connection, rule_name, subject, duration, reason)
        except ApprovalError as error:
            return self._refused(error, approver, action="grant", connection=connection, rule=rule_name, grantee=subject)
        self.grants[grant.id] = grant
        return self.record(_grant_event(grant)).addCallback(lambda _: grant)

    def _new_grant(self, approver, connection, rule_name, subject, duration, reason):
        """
        A grant, once the rule, the approver, the reason and the window
        are checked.

        @raise ApprovalError: saying why the grant is refused.
        """
        rule = self.rules.get((connection, rule_name))
        if rule is None:
            known = sorted("%s/%s" % key for key in self.rules)
            raise ApprovalError(
                "there is no approval rule %r on connection %r (known: %s)"
                % (rule_name, connection, ", ".join(known) or "none"),
                404,
            )
        self._eligible(rule, approver, subject, "%s cannot grant themselves a window; another approver must")
        reason = redact.redact_text((reason or "").strip())[0]
        if not reason:
            raise ApprovalError("give a reason: it goes into the record with the grant", 400)
        if not 0 < duration <= rule.max_grant:
            raise ApprovalError(
                "a grant for rule %s may last at most %s; ask for a shorter window"
                % (rule.name, _duration(rule.max_grant)),
                400,
            )
        now = self.now()
        return Grant(
            id=_new_id("grant"),
            connection=connection,
            rule=rule.name,
            subject=subject,
            granted_by=_who(approver),
            reason=reason,
            created=now,
            expires=now + duration,
            approvers=tuple(sorted(rule.approvers)),
        )

    def revoke(self, grant_id, approver, reason):
        grant = self.grants.get(grant_id)
        try:
            if grant is None:
                raise ApprovalError("there is no grant %s" % (grant_id,), 404)
            reason = self._check_revoke(grant, approver, reason)
        except ApprovalError as error:
            return self._refused(error, approver, action="revoke", grant=grant_id)
        self._revoked(grant, approver, reason)
        return self.record(_revoke_event(grant)).addCallback(lambda _: grant)

    def _check_revoke(self, grant, approver, reason):
        """
        @return: the reason, redacted for the record.
        @raise ApprovalError: if C{approver} may not end C{grant} now.
        """
        # The rule as this gateway knows it, else the approver groups the
        # grant recorded (a grant made on another gateway sharing the store).
        rule = self.rules.get((grant.connection, grant.rule)) or ApprovalRule(grant.rule, grant.approvers)
        self._eligible(rule, approver, None, "")
        if not (reason or "").strip():
            raise ApprovalError("give a reason: it goes into the record with the revocation", 400)
        if grant.revoked is not None:
            raise ApprovalError("grant %s is already revoked" % (grant.id,), 409)
        return redact.redact_text(reason.strip())[0]

    def _revoked(self, grant, approver, reason):
        grant.revoked = {"by": _who(approver), "reason": reason, "at": self.now()}

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
        grant.uses += 1
        event = self._grant_use_event(grant, session, command)
        return self.record(event).addCallback(lambda _: _grant_decision(grant, event["digest"]))

    def _grant_use_event(self, grant, session, command):
        event = {
            "type": "grant.use",
            "grant": grant.id,
            "session": session.id,
            "connection": session.connection,
            "subject": session.identity.subject,
            "command": command.id,
            "rule": grant.rule,
            "digest": approval_digest(command, session.identity, session.connection),
            "use": grant.uses,
        }
        if self.instance:
            event["gateway"] = self.instance
        return self.stamp(event)

    def grants_list(self, include_inactive=False):
        now = self.now()
        return [grant for grant in self.grants.values() if include_inactive or grant.active(now)]

    # Webhooks.

    def _notify_webhooks(self, request, kind):
        for webhook in self.webhooks.get(request.connection, ()):
            payload = dict(request.to_json(), type=kind)
            if self.url:
                payload["api"] = "%s/api/approvals/%s" % (self.url, request.id)
            payload["cli"] = "hoopgw approvals approve %s --reason '...'" % (request.id,)
            delivery = webhook.send(payload)
            self._deliveries.add(delivery)
            delivery.addBoth(self._delivery_over, delivery)
            delivery.addCallback(self._delivered, request, kind, webhook)
            delivery.addErrback(lambda failure: failure.trap(defer.CancelledError))

    def _delivery_over(self, result, delivery):
        self._deliveries.discard(delivery)
        return result

    def _delivered(self, outcome, request, kind, webhook):
        event = self._event(request, "approval.notified", webhook=webhook.name, notice=kind)
        event.update(outcome)
        return self.record(event)


def _timed_out(request):
    return Decision.deny(
        "nobody approved this %s within %s" % (request.noun, _duration(request.rule.timeout)),
        rule="approve:%s:timeout" % (request.rule.name,),
    )


def _gave_up(request, reason="the client gave up waiting"):
    return Decision.deny(reason, rule="approve:%s:cancelled" % (request.rule.name,))


def _grant_event(grant):
    return {"type": "grant.create", "connection": grant.connection, "subject": grant.subject, "grant": grant.to_json()}


def _revoke_event(grant):
    return {"type": "grant.revoke", "connection": grant.connection, "subject": grant.subject, "grant": grant.to_json()}


def _grant_decision(grant, digest):
    approval = {
        "grant": grant.id,
        "rule": grant.rule,
        "granted_by": grant.granted_by,
        "reason": grant.reason,
        "expires": grant.expires,
        "digest": digest,
    }
    return Decision.approved(
        approval,
        reason="pre-approved by %s until %s (grant %s)" % (grant.granted_by["subject"], _when(grant.expires), grant.id),
        rule="approve:%s" % (grant.rule,),
    )


def _duration(seconds):
    if seconds >= 3600 and seconds % 3600 == 0:
        return "%dh" % (seconds // 3600,)
    if seconds >= 60 and seconds % 60 == 0:
        return "%dm" % (seconds // 60,)
    return "%gs" % (seconds,)


def _when(timestamp):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
