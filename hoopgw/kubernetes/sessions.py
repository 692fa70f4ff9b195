"""
Login: the session of each credential a client connection presents (a
bearer token, a SAML assertion in the configured header, the certificate
of its TLS handshake), started through the chain's identity addon on its
first request and reused while it holds; sessions end once their
connection's requests are done.
"""

import hashlib
import time

from twisted.internet import defer

from hoopgw.identity.certificates import as_certificate, fingerprint
from hoopgw.kubernetes.exchange import address, wait
from hoopgw.model import DENY, FAILED, UNAUTHENTICATED, UNAVAILABLE, Credentials, Decision, Session

# How long a closing connection's requests get to finish before its
# sessions end regardless.
DRAIN_SECONDS = 2.0


def refusal_status(decision):
    """
    The HTTP status for a refused session: 401 when who the client is was
    not proven (or the identity addon failed to say), 503 when the
    connection is paused or the gateway stopping, else 403.
    """
    if decision.refusal == UNAUTHENTICATED or (decision.refusal == FAILED and decision.addon == "identity"):
        return 401
    if decision.refusal == UNAVAILABLE:
        return 503
    return 403


class ClientState:
    """
    The sessions of one client connection, one per token it presented,
    the decisions its requests wait for, and its requests in flight.
    """

    __slots__ = ("sessions", "waiting", "open", "drained")

    def __init__(self):
        self.sessions = {}
        self.waiting = set()
        self.open = set()
        self.drained = []

    def wait_for(self, pending):
        """
        A request waits for C{pending} (its decision): should the client
        give up, it is called off.
        """
        self.waiting.add(pending)
        pending.addBoth(lambda result: (self.waiting.discard(pending), result)[1])

    def finished(self, exchange):
        self.open.discard(exchange)
        if not self.open:
            drained, self.drained = self.drained, []
            for waiter in drained:
                if not waiter.called:
                    waiter.callback(None)

    def drain(self, reactor):
        """
        @return: a L{Deferred} firing once no request is in flight, or after
            L{DRAIN_SECONDS}.
        """
        if not self.open:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self.drained.append(waiter)
        timeout = reactor.callLater(DRAIN_SECONDS, lambda: waiter.called or waiter.callback(None))
        return waiter.addBoth(lambda result: (timeout.active() and timeout.cancel(), result)[1])


class Sessions:
    """
    The sessions of a L{hoopgw.kubernetes.frontend.Frontend}, by client
    connection and credential.

    @ivar clients: the L{ClientState} of each client connection that made
        a request, by its id.
    """

    def __init__(self, frontend):
        self.frontend = frontend
        self.clients = {}

    async def session(self, flow, token, exchange):
        """
        The session C{flow}'s request runs in: the one its credential
        started on this connection, or a new one the chain lets in.

        @return: the session, or None when the request has been refused.
        """
        frontend = self.frontend
        client = flow.client_conn
        saml_header = frontend.settings.saml_header
        assertion = flow.request.headers.get(saml_header, "").strip() if saml_header else ""
        if assertion:
            if token:
                message = (
                    "hoopgw refused the request: it carries both a bearer token and a %s header; send one "
                    "credential, the SAML assertion in %s or the token as the bearer token" % (saml_header, saml_header)
                )
                # A failed access attempt (PCI DSS 10.2.1.4): recorded as a
                # refused session, without either credential.
                session = self._new_session(flow, None)
                session.attributes["identity_refused"] = "ambiguous-credentials"
                refusal = Decision.deny(message, rule="identity:ambiguous-credentials", addon="gateway")
                await wait(frontend.chain.refuse_session(session, refusal), frontend.loop)
                exchange.refuse(flow, 400, message)
                return None
            # The identity addon tells a SAML assertion from a JWT itself,
            # as it does for a PostgreSQL password.
            token = assertion
        state = self.clients.get(client.id)
        if state is None:
            state = self.clients[client.id] = ClientState()
        key = hashlib.sha256(token.encode("utf-8")).hexdigest() if token else ""
        session = state.sessions.get(key)
        if session is not None:
            expires = session.identity.provenance.get("expires_at") if session.identity is not None else None
            if expires is None or time.time() < expires:
                exchange.session = session
                return session
            # The token ran out while the connection stayed open: it is checked anew.
            del state.sessions[key]
            session.attributes["end_reason"] = "the token expired"
            self._end(session)
        session = self._new_session(flow, token)
        decision = await wait(frontend.chain.start_session(session), frontend.loop)
        if decision.verdict == DENY:
            message = "hoopgw refused the session: %s" % (decision.reason,)
            # kubectl meets the refusal in its discovery request, whose
            # errors it prints without the Status message ("You must be
            # logged in to the server"); it does print Warning headers.
            exchange.warnings.append(message)
            exchange.refuse(flow, refusal_status(decision), message)
            return None
        if client.id not in self.clients:
            # The client went away while its token was checked.
            session.attributes["end_reason"] = "client disconnected"
            self._end(session)
            return None
        state.sessions[key] = session
        exchange.session = session
        frontend.connections.proven(client)
        return session

    def _new_session(self, flow, token):
        frontend = self.frontend
        client = flow.client_conn
        return Session(
            connection=frontend.connection.name,
            protocol="kubernetes",
            client_address=address(client.peername),
            target=frontend.settings.target_name,
            credentials=self._credentials(client, token),
            attributes={
                "user_agent": flow.request.headers.get("user-agent", ""),
                "tls": client.tls_established,
                "sni": client.sni or "",
            },
        )

    def _credentials(self, client, token):
        """
        What the client presented: its token, and the certificate it
        proved it holds in the TLS handshake (asked for only with
        C{tls.client_ca}).  A certificate OpenSSL could not verify against
        C{tls.client_ca} is not handed over as one: the identity addon
        learns why, and refuses.
        """
        certificate, problem = self.frontend.connections.client_certificate(client)
        credentials = Credentials(password=token, client_certificate=certificate)
        if problem is not None:
            credentials.client_certificate = None
            evidence = {"reason": problem}
            try:
                parsed = as_certificate(certificate)
                evidence.update(
                    certificate_fingerprint=fingerprint(parsed), certificate_subject=parsed.subject.rfc4514_string()
                )
            except ValueError:
                # What cryptography cannot read is still named in the record.
                evidence["certificate_fingerprint"] = certificate.digest("sha256").decode("ascii").lower()
            credentials.extra["client_certificate_refused"] = evidence
        return credentials

    def _end(self, session):
        return self.frontend.track(self.frontend.chain.end_session(session))

    def _leave(self, state, reason):
        """
        A client connection is over: call off what its requests wait for,
        let them finish, then end its sessions (so a session's end follows
        its commands' in the record).
        """
        for waiting in list(state.waiting):
            waiting.cancel()

        def end(_):
            for session in state.sessions.values():
                session.attributes.setdefault("end_reason", reason)
                self._end(session)

        return self.frontend.track(state.drain(self.frontend.reactor).addCallback(end))

    def disconnected(self, client):
        state = self.clients.pop(client.id, None)
        if state is not None:
            self._leave(state, "client disconnected")

    def close(self, reason):
        """
        End every session (the gateway is stopping): close the clients'
        connections and tell the chain.
        """
        for client_id in list(self.clients):
            state = self.clients.pop(client_id)
            self.frontend.close_client(client_id)
            self._leave(state, reason)
