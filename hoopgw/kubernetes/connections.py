"""
The client connections of one Kubernetes listener before any of their
requests is let in: the limits on connections not logged in yet, the TLS
handshake and the deadlines of the handshake and of login, and an event
for every attempt refused or abandoned before a session began.
"""

from hoopgw import admission
from hoopgw.kubernetes import tls
from hoopgw.kubernetes.exchange import address


class ClientConnections:
    """
    The connections of a L{hoopgw.kubernetes.frontend.Frontend}, as they
    arrive and until the chain lets one of their requests in.
    """

    def __init__(self, frontend):
        self.frontend = frontend
        settings = frontend.settings
        self.admission = admission.Admission(settings.max_unauthenticated, settings.max_unauthenticated_per_source)
        self.client_tls = tls.client_context(settings.tls)
        self.upstream_tls = tls.upstream_context(settings.target)
        # What OpenSSL made of each client's handshake, read again once a
        # request comes (only with tls.client_ca).
        self.tls_connections = {}
        # Client connections no request of which the chain let in yet: their
        # source address and the calls that close them when overdue.
        self.unproven = {}
        # Client connections whose attempts are in the record (a request
        # came, a limit or the handshake refused them).
        self.attempted = set()

    def connected(self, client):
        """
        A client connected: refused at once over a limit, else counted
        and given until its deadlines to finish its handshake and log in.
        """
        source = client.peername[0] if client.peername else "unknown"
        refused = self.admission.refusal(source)
        if refused is not None:
            # mitmproxy closes it before TLS: nothing can be said over HTTP.
            client.error = refused[1]
            self.attempted.add(client.id)
            self.record_attempt(client, *refused, stage="connect")
            return
        self.admission.enter(source)
        settings = self.frontend.settings
        reactor = self.frontend.reactor
        due = [
            reactor.callLater(settings.tls_handshake_timeout, self._handshake_due, client),
            reactor.callLater(settings.login_timeout, self._login_due, client),
        ]
        self.unproven[client.id] = (source, due)

    def proven(self, client):
        """
        C{client} no longer counts against the limits before login: the
        chain let one of its requests in, or it has gone.
        """
        entry = self.unproven.pop(client.id, None)
        if entry is None:
            return
        source, due = entry
        self.admission.leave(source)
        _cancel(due)

    def stop(self):
        """
        The listener is stopping: no deadline closes a connection any more.
        """
        for _, due in self.unproven.values():
            _cancel(due)

    def _handshake_due(self, client):
        if client.id not in self.unproven or client.tls_established:
            return
        self._close_attempt(
            client, admission.TLS_HANDSHAKE_TIMEOUT,
            "the client did not complete its TLS handshake within %g seconds (tls_handshake_timeout)"
            % (self.frontend.settings.tls_handshake_timeout,),
        )

    def _login_due(self, client):
        if client.id not in self.unproven:
            return
        self._close_attempt(
            client, admission.LOGIN_TIMEOUT,
            "no request on this connection was let in within %g seconds (login_timeout)"
            % (self.frontend.settings.login_timeout,),
        )

    def _close_attempt(self, client, rule, message):
        self.attempted.add(client.id)
        self.record_attempt(client, rule, message)
        self.frontend.close_client(client.id)

    def requested(self, client):
        """
        A request came on C{client}: whatever becomes of it, it leaves an
        event of its own.
        """
        self.attempted.add(client.id)

    def record_attempt(self, client, rule, message, **attributes):
        """
        Record an attempt refused before any session began (C{session.refused}
        naming C{rule}).
        """
        attributes.setdefault("stage", "request" if client.tls_established else "tls")
        if client.sni:
            attributes["sni"] = admission.client_text(client.sni)
        frontend = self.frontend
        frontend.track(admission.record_refusal(
            frontend.chain, frontend.connection.name, "kubernetes", address(client.peername),
            frontend.settings.target_name, rule, message, **attributes
        ))

    # TLS.

    def tls_start_client(self, data):
        data.ssl_conn = tls.accept(self.client_tls)
        if self.frontend.settings.tls.client_ca is not None:
            # Read again once a request comes: what OpenSSL made of the
            # client's certificate.
            self.tls_connections[data.context.client.id] = data.ssl_conn

    def tls_start_server(self, data):
        data.ssl_conn = tls.connect(self.upstream_tls, self.frontend.settings.target)

    def tls_failed(self, data):
        client = data.context.client
        if client.id in self.attempted:
            # Closed by a limit during the handshake: recorded already.
            return
        self.attempted.add(client.id)
        self.record_attempt(
            client, admission.TLS_HANDSHAKE_FAILED,
            "the TLS handshake failed: %s" % (admission.client_text(data.conn.error or "no reason given"),),
        )

    def client_certificate(self, client):
        """
        The certificate C{client} proved it holds in the TLS handshake, and
        why OpenSSL refused it (see L{tls.client_certificate}).
        """
        return tls.client_certificate(self.tls_connections.get(client.id))

    def disconnected(self, client):
        """
        A client's connection closed: it counts no more, and if no request
        of it came, its attempt is recorded now.
        """
        self.tls_connections.pop(client.id, None)
        self.proven(client)
        if client.id not in self.attempted:
            # Gone before any request (a probe, a client that is not TLS, a
            # request mitmproxy could not read): recorded all the same.
            message = "the connection closed before any request reached the gateway"
            if client.error:
                message += ": %s" % (admission.client_text(client.error),)
            self.record_attempt(client, "kubernetes:closed-before-request", message)
        self.attempted.discard(client.id)


def _cancel(calls):
    for call in calls:
        if call.active():
            call.cancel()
