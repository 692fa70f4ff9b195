"""
Who may act on an approval request or a grant, and what the votes decide:
the checks both brokers make, in memory or under the shared store's lock.
"""

from hoopgw import redact
from hoopgw.model import HUMAN
from hoopgw.approvals import model
from hoopgw.approvals.model import ApprovalError, ApprovalRule


class Judge:
    """
    The checks of one gateway's approvals.

    @param approver_groups: groups an approver must be in at all, besides
        the rule's own (empty: only the rule's).
    @param rules: the registered rules, C{{(connection, rule name): rule}}.
    @param now: a callable returning the time.
    """

    def __init__(self, approver_groups, rules, now):
        self.approver_groups = approver_groups
        self.rules = rules
        self.now = now

    def eligible(self, request_rule, approver, requester, self_refusal):
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

    def check_vote(self, request, approver, reason, digest, approve):
        """
        Refuse a vote the rules do not allow: from someone who may not
        approve, without a reason, on a request already decided, naming
        another statement's digest, or a second vote of one person.

        @return: the reason, redacted for the record.
        @raise ApprovalError: saying why the vote is refused.
        """
        action = "approve" if approve else "deny"
        self.eligible(
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

    @staticmethod
    def tally(request, approver, reason, approve):
        """
        What the votes so far decide: C{(status, decision)}, or None while
        more approvals are needed.
        """
        if not approve:
            return "denied", model.denied(request, approver, reason)
        if len([v for v in request.approvals if v["verdict"] == "approve"]) >= request.rule.approvals:
            return "approved", model.approved(request)
        return None

    def new_grant(self, approver, connection, rule_name, subject, duration, reason):
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
        self.eligible(rule, approver, subject, "%s cannot grant themselves a window; another approver must")
        reason = redact.redact_text((reason or "").strip())[0]
        if not reason:
            raise ApprovalError("give a reason: it goes into the record with the grant", 400)
        if not 0 < duration <= rule.max_grant:
            raise ApprovalError(
                "a grant for rule %s may last at most %s; ask for a shorter window"
                % (rule.name, model.duration(rule.max_grant)),
                400,
            )
        now = self.now()
        return model.Grant(
            id=model.new_id("grant"),
            connection=connection,
            rule=rule.name,
            subject=subject,
            granted_by=model.who(approver),
            reason=reason,
            created=now,
            expires=now + duration,
            approvers=tuple(sorted(rule.approvers)),
        )

    def revoke(self, grant, approver, reason):
        """
        End C{grant}, if C{approver} may end it now.

        @raise ApprovalError: if not.
        """
        # The rule as this gateway knows it, else the approver groups the
        # grant recorded (a grant made on another gateway sharing the store).
        rule = self.rules.get((grant.connection, grant.rule)) or ApprovalRule(grant.rule, grant.approvers)
        self.eligible(rule, approver, None, "")
        if not (reason or "").strip():
            raise ApprovalError("give a reason: it goes into the record with the revocation", 400)
        if grant.revoked is not None:
            raise ApprovalError("grant %s is already revoked" % (grant.id,), 409)
        grant.revoked = {"by": model.who(approver), "reason": redact.redact_text(reason.strip())[0], "at": self.now()}
