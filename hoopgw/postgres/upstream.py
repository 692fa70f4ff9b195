"""
The gateway's side of a connection to the target database: TLS, startup
and password authentication with the credentials from the configuration,
then a plain relay of the target's messages to the front end.
"""

import os
import struct

from twisted.internet import defer, endpoints, protocol, threads
from twisted.logger import Logger

from hoopgw import redact
from hoopgw.memorytls import MemoryTLS, TLSFailed, client_context
from hoopgw.options import ConfigError
from hoopgw.postgres import backend, wire
from hoopgw.postgres.auth import AuthenticationFailed, ScramClient, md5_response


class TargetError(Exception):
    """
    The gateway could not open a session on the target.  C{str()} is safe
    to show the client and to record: it never holds the target's
    credentials, and what it quotes of the target (an error message, a
    mechanism's name) has its card numbers masked and secrets removed.
    """

    def __init__(self, message, sqlstate="08001"):
        Exception.__init__(self, redact.redact_text(message)[0])
        self.sqlstate = sqlstate if isinstance(sqlstate, str) and len(sqlstate) == 5 and sqlstate.isalnum() else "08001"


_STARTUP, _TLS, _AUTH, _READY = range(4)
# How much one read from the target's socket may take.
READ_BYTES = 1 << 18


class UpstreamProtocol(protocol.Protocol):
    """
    One session on the target.  C{ready} fires with
    C{(parameter statuses, (process id, secret))} once the target is ready
    for queries; after that, every byte from the target goes to
    C{receiver.upstream_data}.
    """

    log = Logger()

    def __init__(self, target, password, parameters, max_message_bytes):
        self.target = target
        self._password = password
        self._parameters = parameters
        self._max = max_message_bytes
        self.ready = defer.Deferred()
        self.receiver = None
        self.statuses = {}
        self.backend_key = None
        self._state = _STARTUP
        self._pieces = []
        self._buffered = 0
        # How many bytes the next message needs to be whole: a large one
        # arriving in many reads is joined once.
        self._needed = 5
        self._scram = None
        self._scram_stage = None
        self._authenticated = False
        # The SCRAM proof being computed in a thread: messages wait for it.
        self._computing = None
        self._tls = None

    def connectionMade(self):
        self.tcp = self.transport
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        # Larger reads of a large result: the costs paid per delivery
        # (decrypting, the relay's walk, scanning rows) are paid less often.
        self.transport.bufferSize = READ_BYTES
        if self.target.tls == "disable":
            self._start()
        else:
            self._state = _TLS
            self.transport.write(wire.ssl_request())

    def _start(self):
        self._state = _AUTH
        self.transport.write(wire.startup_message(self._parameters))

    def _start_tls(self):
        """
        Switch to TLS: from here on the transport is a L{MemoryTLS} over
        the TCP connection, and what arrives is decrypted before it is
        read.
        """
        target = self.target
        try:
            context = _context(target)
        except (OSError, ValueError) as error:
            self._fail(TargetError("the gateway cannot use the target's CA (%s): %s" % (target.ca, error)))
            return
        name = target.server_name or target.host if target.tls == "verify-full" else None
        self._tls = MemoryTLS(self.transport, context, server_hostname=name)
        self.transport = self._tls
        self._start()
        try:
            self._tls.start()
        except TLSFailed as error:
            self._fail(TargetError("TLS with the target failed: %s" % (error,)))

    def dataReceived(self, data):
        if self._tls is not None:
            try:
                data = self._tls.receive(data)
            except TLSFailed as error:
                self._fail(TargetError("TLS with the target failed: %s" % (error,)))
                return
            if not data:
                return
        if self._state == _READY:
            # No receiver: the client left while the session opened.
            if self.receiver is not None:
                self.receiver.upstream_data(data)
            return
        if self.ready.called:
            return
        if self._state == _TLS:
            if data == b"S":
                self._start_tls()
            elif data[:1] == b"S":
                self._fail(TargetError("the target sent data before TLS started; refusing it"))
            else:
                self._fail(TargetError("the target does not accept TLS, and this connection requires it"))
            return
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered >= self._needed:
            self._login_messages()

    def _login_messages(self):
        """
        Read the target's messages during login, one at a time: a SCRAM
        proof computed in a thread holds back those after it.
        """
        buffer = b"".join(self._pieces)
        self._pieces = []
        self._buffered = 0
        self._needed = 5
        position = 0
        end = len(buffer)
        while self._state == _AUTH and self._computing is None and end - position >= 5:
            kind = buffer[position : position + 1]
            length = wire.unpack_int32(buffer, position + 1)
            if length < 4 or length > self._max:
                self._fail(TargetError("the target sent a malformed message during login"))
                return
            stop = position + 1 + length
            if stop > end:
                self._needed = stop - position
                break
            payload = buffer[position + 5 : stop]
            position = stop
            try:
                self._startup_message(kind, payload)
            except AuthenticationFailed as error:
                self._fail(TargetError("the gateway could not authenticate to the target: %s" % (error,), "28000"))
                return
            except backend.MalformedTarget as error:
                self._fail(TargetError("%s during login" % (error,)))
                return
            except (struct.error, ValueError, IndexError):
                self._fail(TargetError("the target sent a malformed %s during login" % (wire.backend_name(kind[0]),)))
                return
        rest = buffer[position:]
        if self._state == _READY:
            if rest and self.receiver is not None:
                self.receiver.upstream_data(rest)
        elif rest and not self.ready.called:
            self._pieces = [rest]
            self._buffered = len(rest)

    def _startup_message(self, kind, payload):
        code = kind[0]
        if kind == b"R":
            if len(payload) < 4:
                raise backend.MalformedTarget(code)
            self._authentication(wire.unpack_int32(payload), payload[4:])
        elif kind == b"E":
            fields = backend.fields(code, payload)
            # TargetError masks what it quotes: the client and the record
            # see the target's reason without card numbers or secrets.
            self._fail(
                TargetError(
                    "the target refused the gateway's session: %s" % (fields.get("message", "unknown error"),),
                    fields.get("code", "08001"),
                )
            )
        elif kind == b"N":
            backend.fields(code, payload)
        elif kind == b"v":
            pass
        elif not self._authenticated:
            raise AuthenticationFailed(
                "the target sent %s before it accepted the login" % (wire.backend_name(code),)
            )
        elif kind == b"S":
            name, value = backend.parameter_status(code, payload)
            # Passed on to the client as the gateway's own settings: the
            # target's text, so masked as rows are.
            self.statuses[redact.redact_text(name)[0]] = redact.redact_text(value)[0]
        elif kind == b"K":
            if len(payload) != 8:
                raise backend.MalformedTarget(code)
            self.backend_key = (wire.unpack_int32(payload, 0), wire.unpack_int32(payload, 4))
        elif kind == b"Z":
            backend.check(code, payload)
            self._state = _READY
            self.ready.callback((self.statuses, self.backend_key))
        else:
            raise backend.MalformedTarget(code, "during login")

    def _secret(self):
        if self.target.password is None:
            raise AuthenticationFailed("the target asks for a password and the configuration names none")
        try:
            return self.target.password.read_text()
        except ConfigError as error:
            raise AuthenticationFailed(str(error))

    def _authentication(self, code, data):
        if self._authenticated:
            raise AuthenticationFailed("the target sent an authentication request after accepting the login")
        if code == 0:
            if self._scram is not None and self._scram_stage != "verified":
                raise AuthenticationFailed(
                    "the target accepted the login without proving it knows the password (SCRAM unfinished)"
                )
            self._authenticated = True
            return
        if self._scram_stage not in (None, "verified") and code not in (11, 12):
            raise AuthenticationFailed("the target changed authentication method in the middle of SASL")
        if code == 3:
            if self.target.tls == "disable" and self.target.host not in ("127.0.0.1", "localhost", "::1"):
                raise AuthenticationFailed("the target asks for a clear-text password over a connection without TLS")
            self.transport.write(wire.password_message(wire.cstring(self._secret())))
        elif code == 5:
            self.transport.write(
                wire.password_message(wire.cstring(md5_response(self.target.user, self._secret(), data[:4])))
            )
        elif code == 10:
            if self._scram is not None:
                raise AuthenticationFailed("the target started SASL authentication twice")
            mechanisms = [name.decode("utf-8", "replace") for name in data.split(b"\x00") if name]
            if ScramClient.mechanism not in mechanisms:
                raise AuthenticationFailed(
                    "the target offers no SASL mechanism the gateway supports (%s)" % (", ".join(mechanisms)[:200],)
                )
            self._scram = ScramClient(self._secret())
            self._scram_stage = "started"
            self.transport.write(wire.sasl_initial_response(ScramClient.mechanism, self._scram.first_message()))
        elif code == 11:
            if self._scram_stage != "started":
                raise AuthenticationFailed("the target sent SASLContinue out of order (before SASL started, or twice)")
            self._scram.challenge(data, self.target.max_scram_iterations)
            self._scram_stage = "continued"
            # PBKDF2 over the iteration count takes long enough to stall
            # every other session: it runs in a thread.
            self._computing = threads.deferToThread(self._scram.final_message)
            self._computing.addCallbacks(self._proof_computed, self._proof_failed)
        elif code == 12:
            if self._scram_stage != "continued" or self._computing is not None:
                raise AuthenticationFailed("the target sent SASLFinal out of order (before SASLContinue)")
            self._scram.verify_final(data)
            self._scram_stage = "verified"
        else:
            raise AuthenticationFailed("the target asks for an authentication method (%d) the gateway does not support" % (code,))

    def _proof_computed(self, proof):
        self._computing = None
        if self.ready.called:
            return
        self.transport.write(wire.password_message(proof))
        if self._pieces:
            self._login_messages()

    def _proof_failed(self, failure):
        self._computing = None
        self.log.failure("Computing the SCRAM proof failed", failure)
        self._fail(TargetError("the gateway could not authenticate to the target: %s" % (failure.getErrorMessage(),)))

    def _fail(self, error):
        if not self.ready.called:
            self.ready.errback(error)
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if not self.ready.called:
            self.ready.errback(TargetError("the target closed the connection during startup"))
        elif self.receiver is not None:
            self.receiver.upstream_lost(reason)


_contexts = {}


def _context(target):
    """
    The TLS context for a target's settings, made once per mode, CA file
    and version of that file.
    """
    version = os.stat(target.ca).st_mtime_ns if target.ca is not None and target.tls != "require" else None
    key = (target.tls, target.ca, version)
    context = _contexts.get(key)
    if context is None:
        if target.tls == "require":
            context = client_context(verify=False)
        else:
            context = client_context(verify=True, ca_file=target.ca, check_hostname=target.tls == "verify-full")
        if len(_contexts) >= 64:
            _contexts.clear()
        _contexts[key] = context
    return context


def connect(reactor, target, parameters, max_message_bytes):
    """
    Open a session on the target.

    @return: a L{Deferred} firing with a ready L{UpstreamProtocol}.
    """
    try:
        password = target.password
        endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=target.connect_timeout)
    except Exception as error:
        return defer.fail(TargetError(str(error)))
    upstream = UpstreamProtocol(target, password, parameters, max_message_bytes)
    expired = []

    def connected(_):
        return upstream.ready.addCallback(lambda _: upstream)

    def unreachable(failure):
        if failure.check(TargetError):
            return failure
        if expired:
            raise TargetError(
                "the target did not complete the gateway's login within %g seconds (connect_timeout)"
                % (target.connect_timeout,)
            )
        raise TargetError("the gateway cannot reach the target database (%s)" % (failure.getErrorMessage(),))

    opening = endpoints.connectProtocol(endpoint, upstream).addCallback(connected).addErrback(unreachable)

    # connect_timeout bounds the whole login, not only the TCP connect: a
    # target that accepts the connection and never answers is given up.
    def expire():
        expired.append(True)
        opening.cancel()
        if upstream.transport is not None:
            upstream.tcp.abortConnection()

    deadline = reactor.callLater(target.connect_timeout, expire)

    def settled(result):
        if deadline.active():
            deadline.cancel()
        return result

    return opening.addBoth(settled)


def cancel(reactor, target, backend_key):
    """
    Ask the target to cancel what the session with C{backend_key} is
    running: a new connection carrying only a CancelRequest.
    """
    endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=target.connect_timeout)

    class _Cancel(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(wire.cancel_request(*backend_key))
            self.transport.loseConnection()

    return endpoints.connectProtocol(endpoint, _Cancel())
