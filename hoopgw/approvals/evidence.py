"""
What a record proves about approvals, checked by C{hoopgw verify} as it
walks the chain: every request decided at most once; every vote from a
person other than the requester, cast while the request was pending; every
approval reached with the votes its rule required; and every statement
that ran approved preceded by the approval (or the use of a grant) bound
to its digest.  Whichever gateway held a statement and whichever decided
it, the chain they share must say so.
"""

import collections

from hoopgw.model import HUMAN
from hoopgw.store.verify import CheckFailed

OUTCOMES = ("approval.approved", "approval.denied", "approval.expired", "approval.cancelled", "approval.failed")


class ApprovalsProblem(CheckFailed):
    """
    The record shows an approval the rules would not have allowed; C{str()}
    says which and where.
    """

    kind = "approval"


class ApprovalsCheck:
    """
    Fed every event of a chain in order (L{see}); raises
    L{ApprovalsProblem} at the first approval that does not hold.

    @param whole: the walk starts at the chain's genesis, so an approval
        named but not found is missing (a bundle cut at a date or a record
        after retention may start after a request it still names).
    """

    def __init__(self, whole):
        self.whole = whole
        self.requests = {}
        self.grants = set()
        self.uses = set()
        self.outcomes = collections.Counter()
        self.approved_statements = 0
        self.granted_statements = 0

    def see(self, event):
        kind = event.get("type")
        seq = event.get("seq")
        if kind == "approval.request":
            self._request(event, seq)
        elif kind == "approval.vote":
            self._vote(event, seq)
        elif kind in OUTCOMES:
            self._outcome(event, kind, seq)
        elif kind == "grant.create":
            self.grants.add((event.get("grant") or {}).get("id"))
        elif kind == "grant.use":
            self.uses.add((event.get("grant"), event.get("digest")))
        elif kind == "command":
            self._command(event, seq)

    def _request(self, event, seq):
        request_id = event.get("approval")
        if request_id in self.requests:
            raise ApprovalsProblem("approval request %s is recorded twice (seq %d)" % (request_id, seq))
        self.requests[request_id] = {
            "seq": seq,
            "digest": event.get("digest"),
            "requester": event.get("subject"),
            "required": event.get("approvals_required", 1),
            "votes": [],
            "outcome": None,
        }

    def _known(self, event, seq, what):
        request = self.requests.get(event.get("approval"))
        if request is None and self.whole:
            raise ApprovalsProblem(
                "%s at seq %d names approval request %s, which is not in the record" % (what, seq, event.get("approval"))
            )
        return request

    def _vote(self, event, seq):
        request = self._known(event, seq, "the vote")
        if request is None:
            return
        approver = event.get("approver") or {}
        if request["outcome"] is not None:
            raise ApprovalsProblem(
                "a vote on %s at seq %d comes after its decision at seq %d" % (event.get("approval"), seq, request["outcome"][1])
            )
        if approver.get("kind") != HUMAN or approver.get("subject") == request["requester"]:
            raise ApprovalsProblem(
                "the vote on %s at seq %d is by %s (%s), who may not approve it: approvers are people other than the "
                "requester" % (event.get("approval"), seq, approver.get("subject"), approver.get("kind"))
            )
        if approver.get("subject") in [vote["subject"] for vote in request["votes"]]:
            raise ApprovalsProblem("%s voted twice on %s (seq %d)" % (approver.get("subject"), event.get("approval"), seq))
        request["votes"].append({"subject": approver.get("subject"), "verdict": event.get("verdict")})

    def _outcome(self, event, kind, seq):
        request = self._known(event, seq, "the decision")
        self.outcomes[kind] += 1
        if request is None:
            return
        if request["outcome"] is not None:
            raise ApprovalsProblem(
                "approval request %s was decided twice: %s at seq %d, %s at seq %d"
                % (event.get("approval"), request["outcome"][0], request["outcome"][1], kind, seq)
            )
        request["outcome"] = (kind, seq)
        if kind == "approval.approved":
            yes = [vote for vote in request["votes"] if vote["verdict"] == "approve"]
            if len(yes) < request["required"] or len(yes) != len(request["votes"]):
                raise ApprovalsProblem(
                    "approval request %s was approved at seq %d with %d approval(s) of the %d its rule requires"
                    % (event.get("approval"), seq, len(yes), request["required"])
                )
            bound = ((event.get("outcome") or {}).get("approval") or {}).get("digest")
            if bound != request["digest"]:
                raise ApprovalsProblem(
                    "the approval of %s at seq %d is bound to another statement than its request" % (event.get("approval"), seq)
                )

    def _command(self, event, seq):
        decision = event.get("decision") or {}
        approval = decision.get("approval")
        if decision.get("verdict") != "approved" or not isinstance(approval, dict):
            return
        if approval.get("grant"):
            self.granted_statements += 1
            if self.whole and (approval["grant"], approval.get("digest")) not in self.uses:
                raise ApprovalsProblem(
                    "the statement at seq %d ran under grant %s, but no use of that grant for it precedes it"
                    % (seq, approval["grant"])
                )
            return
        self.approved_statements += 1
        request = self.requests.get(approval.get("id"))
        if request is None:
            if self.whole:
                raise ApprovalsProblem(
                    "the statement at seq %d ran under approval %s, which is not in the record before it"
                    % (seq, approval.get("id"))
                )
            return
        if (request["outcome"] or (None,))[0] != "approval.approved" or approval.get("digest") != request["digest"]:
            raise ApprovalsProblem(
                "the statement at seq %d ran under approval %s, which the record does not show approved for it before"
                % (seq, approval.get("id"))
            )

    def summary(self):
        """
        One line for verify's report, or None when the record holds no
        approvals.
        """
        if not (self.requests or self.grants or self.approved_statements or self.granted_statements):
            return None
        decided = ", ".join(
            "%d %s" % (count, kind[len("approval.") :]) for kind, count in sorted(self.outcomes.items())
        ) or "none decided"
        return (
            "approvals: %d request(s) (%s), each decided at most once; %d statement(s) ran approved and %d under a "
            "grant, each after its approval" % (len(self.requests), decided, self.approved_statements, self.granted_statements)
        )
