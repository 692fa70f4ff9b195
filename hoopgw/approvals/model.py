"""
What approvals are made of, whichever broker keeps them: rules, requests,
grants, the digest an approval is bound to, and the decisions a request
ends with.
"""

import hashlib
import time

import attr

from hoopgw.model import Decision, random_hex


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


def noun(command):
    return {"sql": "statement", "kubernetes": "request"}.get(command.kind, "command")


def new_id(prefix):
    return "%s-%s" % (prefix, random_hex(6))


def who(identity):
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

    def stop_timer(self):
        """
        The request no longer waits for its timeout.
        """
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def to_json(self):
        result = {
            "id": self.id,
            "status": self.status,
            "connection": self.connection,
            "session": self.session,
            "command": self.command,
            "rule": self.rule.name,
            "requester": who(self.requester),
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


def new_request(session, command, rule, now, gateway):
    """
    The request of C{session} to run C{command}, which C{rule} holds.
    """
    return Request(
        id=new_id("apr"),
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
        gateway=gateway,
        noun=noun(command),
    )


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


# The decisions a request or a grant gives its command.


def approval_json(request):
    """
    What the command's decision carries: the request, the approvers and
    their reasons, the digest they approved.
    """
    return {
        "id": request.id,
        "rule": request.rule.name,
        "digest": request.digest,
        "approvers": [
            {"subject": vote["subject"], "issuer": vote["issuer"], "reason": vote["reason"], "at": vote["at"]}
            for vote in request.approvals
        ],
    }


def approved(request):
    return Decision.approved(
        approval_json(request),
        reason="approved by %s" % (", ".join(v["subject"] for v in request.approvals),),
        rule="approve:%s" % (request.rule.name,),
    )


def denied(request, approver, reason):
    return Decision.deny(
        "%s denied this %s: %s" % (approver.subject, request.noun, reason),
        rule="approve:%s:denied" % (request.rule.name,),
    )


def timed_out(request):
    return Decision.deny(
        "nobody approved this %s within %s" % (request.noun, duration(request.rule.timeout)),
        rule="approve:%s:timeout" % (request.rule.name,),
    )


def gave_up(request, reason="the client gave up waiting"):
    return Decision.deny(reason, rule="approve:%s:cancelled" % (request.rule.name,))


def unrecorded(rule_name, failure, what="recorded"):
    """
    The refusal of a command whose request could not be recorded (or
    decided in the record): nobody may approve what the record does not
    hold.
    """
    return Decision.deny(
        "the approval request could not be %s (%s)" % (what, failure.getErrorMessage()),
        rule="approve:%s:error" % (rule_name,),
    )


def grant_decision(grant, digest):
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
        reason="pre-approved by %s until %s (grant %s)" % (grant.granted_by["subject"], when(grant.expires), grant.id),
        rule="approve:%s" % (grant.rule,),
    )


def duration(seconds):
    if seconds >= 3600 and seconds % 3600 == 0:
        return "%dh" % (seconds // 3600,)
    if seconds >= 60 and seconds % 60 == 0:
        return "%dm" % (seconds // 60,)
    return "%gs" % (seconds,)


def when(timestamp):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def no_request(request_id):
    return ApprovalError("there is no approval request %s" % (request_id,), 404)


def no_grant(grant_id):
    return ApprovalError("there is no grant %s" % (grant_id,), 404)
