"""
Limits before login, shared by the SSH and Kubernetes listeners: how many
client connections may be open without having authenticated, in total and
from one source address, and the record of every attempt refused before
a session began (a C{session.refused} event, written through the chain's
C{refuse_session} as every other refused session is).
"""

from twisted.logger import Logger

from hoopgw import logs
from hoopgw.model import Decision, Session

log = Logger()

# Reason codes (the refusal's C{rule}) of refusals made before a session began.
TOO_MANY_UNAUTHENTICATED = "limit:unauthenticated-connections"
TOO_MANY_FROM_SOURCE = "limit:unauthenticated-per-source"
LOGIN_TIMEOUT = "limit:login-timeout"
MAX_AUTH_TRIES = "limit:max-auth-tries"
TLS_HANDSHAKE_TIMEOUT = "tls:handshake-timeout"
TLS_HANDSHAKE_FAILED = "tls:handshake-failed"
TLS_PLAINTEXT = "tls:plaintext"

# Client-controlled text kept in a refusal's attributes is cut to this.
MAX_TEXT = 256


class Admission:
    """
    The client connections of one listener that have not authenticated
    yet, counted in total and per source address.

    @ivar total: how many there are.
    @ivar by_source: how many from each source address (only those with
        at least one).
    """

    def __init__(self, max_total, max_per_source):
        self.max_total = max_total
        self.max_per_source = max_per_source
        self.total = 0
        self.by_source = {}

    def refusal(self, source):
        """
        Whether a new connection from C{source} would pass a limit.

        @return: C{None}, or C{(rule, message)} saying which limit.
        """
        if self.total >= self.max_total:
            return TOO_MANY_UNAUTHENTICATED, (
                "the gateway already has %d client connections that have not logged in "
                "(max_unauthenticated); try again shortly" % (self.total,)
            )
        if self.by_source.get(source, 0) >= self.max_per_source:
            return TOO_MANY_FROM_SOURCE, (
                "your address %s already has %d client connections that have not logged in "
                "(max_unauthenticated_per_source); finish or close them first" % (source, self.by_source[source])
            )
        return None

    def enter(self, source):
        self.total += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1

    def leave(self, source):
        self.total -= 1
        left = self.by_source.get(source, 0) - 1
        if left > 0:
            self.by_source[source] = left
        else:
            self.by_source.pop(source, None)


def client_text(value):
    """
    Text a client or a target sent that the record keeps: decoded,
    bounded, card numbers masked and secrets redacted.
    """
    from hoopgw import redact

    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return redact.redact_text(str(value)[:MAX_TEXT])[0]


def record_refusal(chain, connection, protocol, client_address, target, rule, message, **attributes):
    """
    Record an attempt refused before any session began (a limit, a
    failed handshake, a client that left before logging in) as a
    C{session.refused} event whose refusal names C{rule}.

    @return: a L{Deferred} firing once it is recorded (a failure to record
        is logged, never raised: the attempt is refused either way).
    """
    session = Session(
        connection=connection,
        protocol=protocol,
        client_address=client_address,
        target=target,
        attributes=attributes,
    )
    refusal = Decision.deny(message, rule=rule, addon="gateway")
    recorded = chain.refuse_session(session, refusal)
    recorded.addErrback(
        lambda failure: logs.failed(log, failure, "A refused {protocol} attempt could not be recorded", protocol=protocol)
    )
    return recorded
