"""
The gateway's side of a connection to the target database: TLS, startup
and password authentication with the credentials from the configuration,
then a plain relay of the target's messages to the front end.
"""

import os
import struct

from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from hoopgw.memorytls import MemoryTLS, TLSFailed, client_context
from hoopgw.options import ConfigError
from hoopgw.postgres import wire
from hoopgw.postgres.auth import AuthenticationFailed, ScramClient, md5_response


class TargetError(Exception):
    """
    The gateway could not open a session on the target.  C{str()} is safe
    to show the client: it never holds the target's credentials.
    """

    def __init__(self, message, sqlstate="08001"):
        Exception.__init__(self, message)
        self.sqlstate = sqlstate


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
        self._buffer = b""
        self._scram = None
        self._tls = None

    def connectionMade(self):
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
            self.receiver.upstream_data(data)
            return
        self._buffer += data
        if self._state == _TLS:
            answer, self._buffer = self._buffer[:1], self._buffer[1:]
            if answer == b"S" and not self._buffer:
                self._start_tls()
            elif answer == b"S":
                self._fail(TargetError("the target sent data before TLS started; refusing it"))
            else:
                self._fail(TargetError("the target does not accept TLS, and this connection requires it"))
            return
        while self._state == _AUTH and len(self._buffer) >= 5:
            kind = self._buffer[:1]
            length = wire.unpack_int32(self._buffer, 1)
            if length < 4 or length > self._max:
                self._fail(TargetError("the target sent a malformed message"))
                return
            if len(self._buffer) < length + 1:
                return
            payload = self._buffer[5 : length + 1]
            self._buffer = self._buffer[length + 1 :]
            try:
                self._startup_message(kind, payload)
            except AuthenticationFailed as error:
                self._fail(TargetError("the gateway could not authenticate to the target: %s" % (error,), "28000"))
                return
            except (struct.error, ValueError, IndexError):
                self._fail(TargetError("the target sent a malformed message during startup"))
                return
        if self._state == _READY and self._buffer:
            rest, self._buffer = self._buffer, b""
            self.receiver.upstream_data(rest)

    def _startup_message(self, kind, payload):
        if kind == b"R":
            self._authentication(wire.unpack_int32(payload), payload[4:])
        elif kind == b"S":
            name, offset = wire.read_cstring(payload, 0)
            value, _ = wire.read_cstring(payload, offset)
            self.statuses[name.decode("utf-8")] = value.decode("utf-8")
        elif kind == b"K":
            self.backend_key = (wire.unpack_int32(payload, 0), wire.unpack_int32(payload, 4))
        elif kind == b"Z":
            self._state = _READY
            self.ready.callback((self.statuses, self.backend_key))
        elif kind == b"E":
            fields = wire.parse_fields(payload)
            self._fail(
                TargetError(
                    "the target refused the gateway's session: %s" % (fields.get("message", "unknown error"),),
                    fields.get("code", "08001"),
                )
            )
        elif kind == b"N":
            pass
        elif kind == b"v":
            pass
        else:
            raise ValueError("unexpected message %r during startup" % (kind,))

    def _secret(self):
        if self.target.password is None:
            raise AuthenticationFailed("the target asks for a password and the configuration names none")
        try:
            return self.target.password.read_text()
        except ConfigError as error:
            raise AuthenticationFailed(str(error))

    def _authentication(self, code, data):
        if code == 0:
            return
        if code == 3:
            if self.target.tls == "disable" and self.target.host not in ("127.0.0.1", "localhost", "::1"):
                raise AuthenticationFailed("the target asks for a clear-text password over a connection without TLS")
            self.transport.write(wire.password_message(wire.cstring(self._secret())))
        elif code == 5:
            self.transport.write(
                wire.password_message(wire.cstring(md5_response(self.target.user, self._secret(), data[:4])))
            )
        elif code == 10:
            mechanisms = [name.decode() for name in data.split(b"\x00") if name]
            if ScramClient.mechanism not in mechanisms:
                raise AuthenticationFailed("the target offers no SASL mechanism the gateway supports (%s)" % (mechanisms,))
            self._scram = ScramClient(self._secret())
            self.transport.write(wire.sasl_initial_response(ScramClient.mechanism, self._scram.first_message()))
        elif code == 11:
            self.transport.write(wire.password_message(self._scram.final_message(data)))
        elif code == 12:
            self._scram.verify_final(data)
        else:
            raise AuthenticationFailed("the target asks for an authentication method (%d) the gateway does not support" % (code,))

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

    def connected(_):
        return upstream.ready.addCallback(lambda _: upstream)

    def unreachable(failure):
        if failure.check(TargetError):
            return failure
        raise TargetError("the gateway cannot reach the target database (%s)" % (failure.getErrorMessage(),))

    return endpoints.connectProtocol(endpoint, upstream).addCallback(connected).addErrback(unreachable)


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
