"""
The approvals' events in the record: every request, vote, outcome, refused
action, grant and use of a grant, built the same way by both brokers and
stamped with the replica that wrote them.
"""

import os
import socket

from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import logs
from hoopgw.approvals.model import approval_digest, who


class Ledger:
    """
    Builds and records one gateway's approvals events.

    @param record: a callable taking an event and returning a L{Deferred}
        that fires once it is durable (L{hoopgw.gateway.Gateway.record}).
    @param instance: the gateway run (L{hoopgw.gateway.Gateway.instance})
        whose sessions wait here, named in the record.
    """

    log = Logger()

    def __init__(self, record, instance=None):
        self._record = record
        self.instance = instance

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
        logs.failed(self.log, failure, "An approvals event ({kind}) could not be recorded", kind=kind)
        return failure

    @defer.inlineCallbacks
    def refused(self, error, approver, **fields):
        """
        Record an approver's refused action, then fail with C{error}.
        """
        event = {"type": "approval.refused", "approver": who(approver), "error": str(error)}
        event.update(fields)
        yield self.record(event)
        raise error

    def event(self, request, kind, **fields):
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

    def outcome(self, request):
        return self.event(request, "approval.%s" % (request.status,), outcome=request.outcome)

    def request(self, request):
        """
        The record of a new request: everything an approver on any gateway
        needs to judge it, and every gateway to check a vote on it.
        """
        rule = request.rule
        event = self.event(request, "approval.request")
        event.update(
            text=request.text,
            digest=request.digest,
            facts=request.facts,
            requester=who(request.requester),
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

    def vote(self, request, approver, reason, approve, now):
        """
        Count the vote on C{request}; @return: its record.
        """
        action = "approve" if approve else "deny"
        request.approvals.append(
            {"subject": approver.subject, "issuer": approver.issuer, "verdict": action, "reason": reason, "at": now}
        )
        event = self.event(request, "approval.vote", approver=who(approver), verdict=action, reason=reason, at=now)
        if self.instance:
            # Which gateway's API the approver acted through.
            event["gateway"] = self.instance
        return event

    def grant_use(self, grant, session, command):
        """
        Count a use of C{grant} by C{command}; @return: its record.
        """
        grant.uses += 1
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

    def grant(self, grant):
        return self._grant_event("grant.create", grant)

    def revoke(self, grant):
        return self._grant_event("grant.revoke", grant)

    def _grant_event(self, kind, grant):
        return self.stamp({"type": kind, "connection": grant.connection, "subject": grant.subject, "grant": grant.to_json()})
