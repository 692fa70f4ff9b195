"""
The login phase of a PostgreSQL client connection: encryption negotiation
(SSLRequest, GSSENCRequest), the startup packet, the token sent as a
password and the chain's admission, within the listener's limits before
login.  Every refusal is answered with a FATAL error (where the protocol
has room for one) and recorded as a refused session through the chain.
"""

from twisted.logger import Logger

from hoopgw import admission, redact
from hoopgw.memorytls import MemoryTLS
from hoopgw.model import DENY, Credentials, Decision, Session
from hoopgw.postgres import upstream as upstream_module
from hoopgw.postgres import wire
from hoopgw.postgres.wire import StartupError
from hoopgw.postgres.refusals import wire as sqlstate_of_refusal


# The phases of a client connection, in order.
STARTUP, PASSWORD, OPENING, READY, CLOSED = range(5)

# Startup parameters passed on to the target; everything else a client
# sends is dropped, so it cannot change the gateway's session settings.
FORWARDED_PARAMETERS = ("client_encoding", "DateStyle", "TimeZone", "IntervalStyle", "extra_float_digits")

# The largest password message taken before login: room for a JSON Web
# Token or a SAML assertion, not for the 64 MiB a logged-in client may send.
MAX_PASSWORD_BYTES = 1024 * 1024

# What the record keeps of a name the client claims before login.
_CLAIM_CHARACTERS = 128


class Admission(admission.Admission):
    """
    The connections of one listener that are not logged in yet, counted in
    total and per client address as the SSH and Kubernetes listeners count
    them, so that clients that never log in cannot take every connection
    slot; refused as PostgreSQL refuses too many clients.
    """

    def __init__(self, settings):
        admission.Admission.__init__(self, settings.max_unauthenticated, settings.max_unauthenticated_per_source)

    def enter(self, source):
        """
        Count one more connection from C{source}.

        @return: None, or the L{StartupError} refusing it (not counted).
        """
        refused = self.refusal(source)
        if refused is None:
            admission.Admission.enter(self, source)
            return None
        if refused[0] == admission.TOO_MANY_UNAUTHENTICATED:
            return StartupError(
                "53300",
                "postgres:too-many-unauthenticated",
                "sorry, too many clients already: %d connections are waiting to log in "
                "(max_unauthenticated); try again later" % (self.total,),
            )
        return StartupError(
            "53300",
            "postgres:too-many-unauthenticated-per-source",
            "sorry, too many clients already: %d connections from %s are waiting to log in "
            "(max_unauthenticated_per_source); try again later" % (self.by_source[source], source),
        )


class Startup:
    """
    Log in one client connection of a L{PostgresFrontend}: everything from
    the connection's first byte until the target session is open.  The
    front end keeps the transport, the buffer and the phase; this reads
    the startup packets from the buffer (one by one, in a loop, without
    copying what follows them) and dispatches them by their code.
    """

    log = Logger()

    def __init__(self, frontend):
        self.frontend = frontend
        self.factory = frontend.factory
        self.settings = frontend.settings
        self.parameters = {}
        self.source = None
        self._negotiated = set()
        # The length word alone decides a length out of bounds (a packet
        # of 7 bytes is refused as soon as they are here, not after the
        # startup timeout waiting for an eighth).
        self._needed = 4
        self._timer = None
        self._counted = False
        self._recorded = False
        self._requests = {
            wire.SSL_REQUEST: self._ssl_request,
            wire.GSSENC_REQUEST: self._gssenc_request,
            wire.CANCEL_REQUEST: self._cancel_request,
        }

    # Limits.

    def connected(self, host):
        """
        A client connected from C{host}: admit it among the connections not
        logged in yet, or refuse it at once; start its startup timeout.
        """
        self.source = host
        refusal = self.factory.admission.enter(host)
        if refusal is not None:
            self.refuse(refusal)
            return
        self._counted = True
        self._timer = self.factory.reactor.callLater(self.settings.startup_timeout, self._timed_out)

    def finished(self):
        """
        The connection is logged in, refused or gone: it no longer counts
        against the limits before login.
        """
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self.factory.admission.leave(self.source)

    def _timed_out(self):
        self._timer = None
        frontend = self.frontend
        if frontend._state == CLOSED:
            return
        text = "canceling authentication due to timeout: the client did not log in within %gs (startup_timeout)" % (
            self.settings.startup_timeout,
        )
        if frontend.session is not None:
            # The chain is still deciding: the session's own end says why.
            self.finished()
            frontend.session.attributes["end_reason"] = text
            frontend._fatal("57014", text)
            return
        self.refuse(StartupError("57014", "postgres:startup-timeout", text))

    # Refusals.

    def refuse(self, error, answer=True):
        """
        Close the connection with C{error}'s FATAL (unless the protocol has
        no room for an answer) and record the attempt.
        """
        frontend = self.frontend
        self.finished()
        recorded, self._recorded = self._recorded, True
        if answer:
            frontend._fatal(error.sqlstate, error.text)
        else:
            frontend._state = CLOSED
            frontend.transport.loseConnection()
        if recorded:
            return
        self.log.info(
            "PostgreSQL client {client} refused before login: {reason}", client=frontend.client_address, reason=error.text
        )
        session = Session(
            connection=self.factory.connection.name,
            protocol="postgres",
            client_address=frontend.client_address,
            target=self.settings.target_name,
            credentials=Credentials(user=self.parameters.get("user")),
            attributes=self._claimed(),
        )
        decision = Decision.deny(error.text, rule=error.rule, addon="gateway", sqlstate=error.sqlstate)
        frontend.chain.refuse_session(session, decision).addErrback(
            lambda failure: self.log.error(
                "A refused PostgreSQL login could not be recorded: {error}", error=failure.getErrorMessage()
            )
        )

    def _claimed(self):
        """
        What the client said about itself before it was refused, safe to
        record: names only, cut short, secrets redacted.
        """
        layer = self.frontend._tls_layer
        attributes = {"tls": layer is not None and bool(getattr(layer, "handshake_done", True))}
        if self._negotiated:
            attributes["negotiated"] = sorted(self._negotiated)
        for name in ("user", "database", "application_name"):
            value = self.parameters.get(name)
            if value:
                attributes[name] = redact.redact_secrets(value[:_CLAIM_CHARACTERS])
        return attributes

    def lost(self, phase):
        """
        The connection closed in C{phase}.  A client that had started to
        log in and gave up is an attempt too (PostgreSQL logs "incomplete
        startup packet"); one that sent nothing is not (a port probe).
        """
        self.finished()
        if self._recorded or self.frontend.session is not None:
            return
        if phase == STARTUP and (self.frontend._buffered or self._negotiated):
            self.refuse(
                StartupError("08P01", "postgres:incomplete-startup", "incomplete startup packet: the client closed the connection"),
                answer=False,
            )
        elif phase == PASSWORD:
            self.refuse(
                StartupError(
                    "08P01",
                    "postgres:closed-before-password",
                    "the client closed the connection before sending its token",
                ),
                answer=False,
            )

    # The startup packets.

    def data(self):
        """
        Read every whole startup-phase packet the client has sent, in order.
        """
        frontend = self.frontend
        if frontend._buffered < self._needed:
            # A client sending a packet piece by piece: wait for the whole
            # of it rather than join the pieces at every one.
            return
        buffer = frontend._take()
        position = 0
        maximum = self.settings.max_startup_bytes
        while frontend._state == STARTUP:
            try:
                packet = wire.read_startup_packet(buffer, position, maximum)
                if packet is None:
                    remaining = len(buffer) - position
                    self._needed = wire.unpack_int32(buffer, position) if remaining >= 4 else 4
                    break
                code, body, position = packet
                handler = self._requests.get(code)
                if handler is None:
                    handler = self._startup_message if code >> 16 == 3 else self._unsupported
                handler(code, body, position < len(buffer))
            except StartupError as error:
                self.refuse(error)
                return
        if frontend._state == CLOSED:
            return
        frontend._keep(buffer[position:])
        if frontend._state == PASSWORD and frontend._buffered:
            frontend._client_data()

    def _negotiation(self, kind, body):
        """
        PostgreSQL takes one SSLRequest and one GSSENCRequest at most, and
        none once encryption is on: anything else is a client going round
        in circles (or an attacker making the server do so).
        """
        if body:
            raise StartupError("08P01", "postgres:negotiation-length", "invalid length of %s negotiation request" % (kind,))
        if kind in self._negotiated or self.frontend._tls_layer is not None:
            raise StartupError(
                "0A000",
                "postgres:duplicate-negotiation",
                "duplicate %s negotiation request: a connection negotiates encryption once "
                "(unsupported frontend protocol)" % (kind,),
            )
        self._negotiated.add(kind)

    def _ssl_request(self, code, body, more):
        self._negotiation("SSL", body)
        frontend = self.frontend
        if self.factory.tls_context is None:
            frontend.transport.write(b"N")
            return
        if more:
            # Bytes sent before the TLS handshake could be injected by
            # someone in the middle (CVE-2021-23214): refuse them.
            raise StartupError("08P01", "postgres:data-after-ssl-request", "received unencrypted data after the SSL request")
        frontend.transport.write(b"S")
        frontend._tls_layer = MemoryTLS(frontend.transport, self.factory.tls_context, server_side=True)
        frontend.transport = frontend._tls_layer

    def _gssenc_request(self, code, body, more):
        self._negotiation("GSS", body)
        self.frontend.transport.write(b"N")

    def _cancel_request(self, code, body, more):
        """
        A CancelRequest comes on a connection of its own, which closes
        without an answer whether the key matched or not (so that keys
        cannot be guessed).  A matching one is recorded by the session it
        cancels; a key that matches no session is a refused attempt.
        """
        if len(body) != 8:
            raise StartupError("08P01", "postgres:cancel-length", "invalid length of cancel request packet")
        key = (wire.unpack_int32(body, 0), wire.unpack_int32(body, 4))
        if self.factory.cancel(*key):
            self._cancelled(True)
            return
        peers = self.factory.peers
        if peers is None:
            self._cancelled(False)
            return
        # Another process sharing the store may hold the session: the
        # connection stays open, reading nothing more, until it answers or
        # the wait ends; only then is an unknown key recorded (once).
        self.frontend._state = CLOSED
        peers.forward(self.factory.connection.name, key).addCallback(self._cancelled)

    def _cancelled(self, held):
        if not held:
            self.refuse(
                StartupError("57014", "postgres:cancel-unknown-key", "a cancel request named no session of this gateway"),
                answer=False,
            )
            return
        self.finished()
        self._recorded = True
        self.frontend._state = CLOSED
        self.frontend.transport.loseConnection()

    def _unsupported(self, code, body, more):
        raise StartupError(
            "0A000",
            "postgres:protocol-version",
            "unsupported frontend protocol %d.%d: server supports 3.0 to 3.0" % (code >> 16, code & 0xFFFF),
        )

    def _startup_message(self, code, body, more):
        frontend = self.frontend
        self.parameters = parameters = wire.parse_startup(body)
        minor = code & 0xFFFF
        unsupported = sorted(name for name in parameters if name.startswith("_pq_."))
        if minor > 0 or unsupported:
            frontend.transport.write(wire.negotiate_protocol_version(0, unsupported))
        target = self.settings.target
        user = parameters.get("user")
        if not user:
            raise StartupError("28000", "postgres:no-user", "no user name was given in the startup packet")
        database = parameters.get("database") or user
        if "replication" in parameters:
            raise StartupError(
                "0A000", "postgres:replication", "replication connections are not accepted through the gateway"
            )
        if parameters.get("options"):
            raise StartupError(
                "0A000",
                "postgres:options",
                "the startup option 'options' is not accepted through the gateway; use SET after connecting",
            )
        if database != target.database:
            raise StartupError(
                "3D000",
                "postgres:database",
                "this gateway connection serves the database %r only; connect with dbname=%s"
                % (target.database, target.database),
            )
        if frontend._tls_layer is None and not self.settings.allow_plaintext_password:
            raise StartupError(
                "28000",
                "postgres:tls-required",
                "this gateway accepts tokens over TLS only; connect with sslmode=require or verify-full",
            )
        frontend._state = PASSWORD
        frontend.transport.write(wire.authentication_cleartext_password())

    def tls_failed(self, error):
        """
        The TLS handshake (or a later TLS record) failed: there is no
        channel left to answer on.
        """
        text = "TLS with the client failed: %s" % (error,)
        if self.frontend.session is not None:
            self.frontend.session.attributes.setdefault("end_reason", text)
            return
        self.refuse(StartupError("08P01", "postgres:tls", text), answer=False)

    # The token and admission.

    def password(self):
        frontend = self.frontend
        if not frontend._inbox:
            return
        kind, buffer, start, stop = frontend._inbox.popleft()
        if kind != wire.PASSWORD_MESSAGE:
            self.refuse(
                StartupError(
                    "08P01",
                    "postgres:expected-password",
                    "expected a password message (the token), got a message of type %r" % (kind.decode("latin-1"),),
                )
            )
            return
        token = buffer[start + 5 : stop].rstrip(b"\x00").decode("utf-8", "replace")
        frontend._state = OPENING
        certificate = None
        if frontend._tls_layer is not None:
            certificate = frontend._tls_layer.getPeerCertificate()
        parameters = self.parameters
        frontend.session = Session(
            connection=self.factory.connection.name,
            protocol="postgres",
            client_address=frontend.client_address,
            target=self.settings.target_name,
            credentials=Credentials(user=parameters["user"], password=token, client_certificate=certificate),
            wire=sqlstate_of_refusal,
            attributes={
                "user": parameters["user"],
                "database": parameters.get("database") or parameters["user"],
                "application_name": parameters.get("application_name", ""),
                "tls": frontend._tls_layer is not None,
            },
            notifier=frontend._notify,
        )
        frontend._admitting = True
        frontend.chain.start_session(frontend.session).addCallback(self._admitted).addErrback(frontend._internal_error)

    def _admitted(self, decision):
        frontend = self.frontend
        frontend._admitting = False
        self.finished()
        if frontend._state == CLOSED:
            if decision.verdict != DENY:
                frontend._end_session("client disconnected")
            return
        if decision.verdict == DENY:
            frontend._ended = True
            frontend._fatal(decision.sqlstate or "28000", "hoopgw refused the session: %s" % (decision.reason,))
            return
        subject = frontend.session.identity.subject
        application = self.parameters.get("application_name")
        parameters = {
            "user": self.settings.target.user,
            "database": self.settings.target.database,
            "application_name": ("hoopgw:%s:%s" % (subject, application) if application else "hoopgw:%s" % (subject,))[:63],
        }
        for name in FORWARDED_PARAMETERS:
            if name in self.parameters:
                parameters[name] = self.parameters[name]
        upstream_module.connect(
            self.factory.reactor, self.settings.target, parameters, self.settings.max_message_bytes
        ).addCallbacks(self._upstream_ready, self._upstream_failed)

    def _upstream_failed(self, failure):
        frontend = self.frontend
        if frontend._state == CLOSED:
            frontend._end_session("client disconnected")
            return
        error = failure.value
        sqlstate = getattr(error, "sqlstate", "08001")
        frontend.session.attributes["end_reason"] = "target unavailable: %s" % (error,)
        frontend._fatal(sqlstate, "hoopgw could not open the target session: %s" % (error,))

    def _upstream_ready(self, upstream):
        frontend = self.frontend
        if frontend._state == CLOSED:
            upstream.transport.write(wire.terminate())
            upstream.transport.loseConnection()
            frontend._end_session("client disconnected")
            return
        frontend.logged_in(upstream)
