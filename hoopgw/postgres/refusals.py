"""
The PostgreSQL wire's words for the chain's refusals: the SQLSTATE a
client gets for each protocol-neutral L{Decision.refusal}, at login and
for a statement.
"""

import attr

from hoopgw.model import CANCELLED, FAILED, FORBIDDEN, UNAUTHENTICATED, UNAVAILABLE


SESSION_SQLSTATES = {
    UNAUTHENTICATED: "28P01",  # invalid_password: the credentials did not prove who the client is
    FORBIDDEN: "28000",  # invalid_authorization_specification
    FAILED: "28000",
    CANCELLED: "57014",  # query_canceled
    UNAVAILABLE: "57P03",  # cannot_connect_now
}
COMMAND_SQLSTATES = {
    UNAUTHENTICATED: "28P01",
    FORBIDDEN: "42501",  # insufficient_privilege
    FAILED: "42501",
    CANCELLED: "57014",
    UNAVAILABLE: "57P03",
}


def sqlstate(decision, stage):
    """
    The SQLSTATE for the denial C{decision} at C{stage} (C{"session"} or
    C{"command"}).  A login refused because no addon looked at the
    credentials (the chain lacks the identity addon) is 28000, not a wrong
    password.
    """
    if decision.sqlstate:
        return decision.sqlstate
    if decision.refusal == UNAUTHENTICATED and decision.addon == "gateway":
        return "28000"
    table = SESSION_SQLSTATES if stage == "session" else COMMAND_SQLSTATES
    return table.get(decision.refusal or FORBIDDEN, table[FORBIDDEN])


def wire(decision, stage):
    """
    L{hoopgw.model.Session.wire} for PostgreSQL sessions: the denial with
    its SQLSTATE, which the record keeps beside the refusal.
    """
    if decision.sqlstate:
        return decision
    return attr.evolve(decision, sqlstate=sqlstate(decision, stage))
