"""
The target side: the gateway's own SSH client connection to the target,
authenticated with the gateway's key (clients never see it) and trusting
only the host keys pinned in the configuration.
"""

import struct

from twisted.conch.ssh import common, connection, keys, transport, userauth
from twisted.internet import defer, endpoints, error, protocol
from twisted.logger import Logger

from hoopgw import __version__, admission
from hoopgw.ssh.publickeys import fingerprint, load_private_key
from hoopgw.ssh.relay import ChannelBooks, FlowControl


# Algorithms fast in C on both sides of the gateway (AES-CTR and HMAC-SHA-256
# run in OpenSSL), and nothing weak: no CBC, 3DES or MD5, no SHA-1 key
# exchange, SHA-1 MACs last.
CIPHERS = [b"aes128-ctr", b"aes256-ctr", b"aes192-ctr"]
MACS = [b"hmac-sha2-256", b"hmac-sha2-512", b"hmac-sha1"]
KEY_EXCHANGES = [name for name in transport.SSHTransportBase.supportedKeyExchanges if not name.endswith(b"-sha1")]


class TargetError(Exception):
    """
    The target could not be used.  C{str()} is a sentence for the client
    and the record; C{reason} is a short code.
    """

    def __init__(self, message, reason="target-unavailable"):
        Exception.__init__(self, message)
        self.reason = reason


class _Attempt:
    """
    One connection attempt: fires C{ready} once, with the authenticated
    connection or a L{TargetError}.
    """

    def __init__(self, reactor, target, login, key, where):
        self.reactor = reactor
        self.target = target
        self.login = login
        self.key = key
        self.where = where
        self.ready = defer.Deferred()
        self.stage = "connecting"
        self.failure = None
        self.transport = None
        self.disconnect_message = None
        self._timeout = reactor.callLater(target.connect_timeout, self._timed_out)

    @property
    def label(self):
        return "%s:%d" % (self.target.host, self.target.port)

    def succeed(self, conn):
        if not self.ready.called:
            self._cancel_timeout()
            self.stage = "ready"
            self.ready.callback(conn)

    def fail(self, problem):
        if self.ready.called:
            return
        self._cancel_timeout()
        self.failure = problem
        if self.transport is not None and self.transport.transport is not None:
            self.transport.transport.abortConnection()
        self.ready.errback(problem)

    def lost(self):
        if self.stage == "authenticating":
            self.fail(
                TargetError(
                    "the target %s refused the gateway's key for the login %r; add the gateway's public key to "
                    "that account's authorized_keys on the target" % (self.label, self.login),
                    "target-refused-key",
                )
            )
        elif self.disconnect_message:
            self.fail(TargetError("the target %s closed the connection: %s" % (self.label, self.disconnect_message)))
        else:
            self.fail(TargetError("the target %s closed the connection during the handshake" % (self.label,)))

    def _timed_out(self):
        self._timeout = None
        self.fail(
            TargetError(
                "the target %s did not complete the SSH handshake within %g seconds"
                % (self.label, self.target.connect_timeout),
                "target-timeout",
            )
        )

    def _cancel_timeout(self):
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None


class _TargetTransport(transport.SSHClientTransport):
    ourVersionString = ("SSH-2.0-hoopgw_%s" % (__version__,)).encode("ascii")
    supportedCiphers = CIPHERS
    supportedMACs = MACS
    supportedKeyExchanges = KEY_EXCHANGES
    _log = Logger()

    def __init__(self, attempt):
        self.attempt = attempt
        algorithms = []
        for blob in attempt.target.host_key:
            for name in keys.Key.fromString(blob).supportedSignatureAlgorithms():
                if name not in algorithms and name != b"ssh-rsa":
                    algorithms.append(name)
        # Ask only for the kinds of host key that are pinned, so a target
        # with several host keys presents a pinned one.
        self.supportedPublicKeys = algorithms

    def connectionMade(self):
        self.attempt.transport = self
        self.attempt.stage = "handshake"
        _no_delay(self.transport)
        transport.SSHClientTransport.connectionMade(self)

    def verifyHostKey(self, blob, _):
        pins = self.attempt.target.host_key
        if blob in pins:
            return defer.succeed(True)
        problem = TargetError(
            "the target %s presented the host key %s, which is not the one pinned in the configuration (%s); "
            "if the target's key was changed on purpose, update %s"
            % (self.attempt.label, fingerprint(blob), ", ".join(fingerprint(pin) for pin in pins), self.attempt.where),
            "host-key-mismatch",
        )
        self.attempt.fail(problem)
        return defer.fail(problem)

    def connectionSecure(self):
        self.attempt.stage = "authenticating"
        conn = TargetConnection(self.attempt)
        self.requestService(_TargetAuth(self.attempt.login.encode("utf-8"), conn, self.attempt.key))

    def receiveDebug(self, alwaysDisplay, message, lang):
        # The target's words, even in the log: masked.
        if alwaysDisplay:
            self._log.debug("The target's debug message: {message}", message=admission.client_text(message))

    _malformed = False

    def dispatchMessage(self, messageNum, payload):
        """
        A message from the target Conch cannot read (a truncated string, a
        count past the end) ends the connection to the target with a
        protocol error and one line in the log, not a traceback; the
        session's client and the record are told the target sent it.
        """
        if self._malformed:
            return
        try:
            transport.SSHClientTransport.dispatchMessage(self, messageNum, payload)
        except Exception as problem:
            self._malformed = True
            self._log.warn(
                "The target {target} sent a malformed SSH message (number {number}); the connection to it is closed: "
                "{error}",
                target=self.attempt.label, number=messageNum,
                error=admission.client_text("%s: %s" % (type(problem).__name__, problem)),
            )
            self.attempt.disconnect_message = "the target sent a malformed SSH message (number %d)" % (messageNum,)
            self.sendDisconnect(
                transport.DISCONNECT_PROTOCOL_ERROR,
                b"hoopgw: the target sent a malformed SSH message (number %d)" % (messageNum,),
            )

    def receiveError(self, reasonCode, description):
        # The target's words reach the client and the record: masked like any text from it.
        self.attempt.disconnect_message = admission.client_text(description)
        transport.SSHClientTransport.receiveError(self, reasonCode, self.attempt.disconnect_message.encode("utf-8"))

    def connectionLost(self, reason=None):
        if self.attempt.ready.called:
            # The owner hears first, so the channels about to close know
            # their commands were cut short.
            conn = getattr(self, "_hoopgw_connection", None)
            if conn is not None:
                conn.lost(self.attempt.disconnect_message)
            transport.SSHClientTransport.connectionLost(self, reason)
        else:
            transport.SSHClientTransport.connectionLost(self, reason)
            self.attempt.lost()


class _TargetAuth(userauth.SSHUserAuthClient):
    """
    Public key authentication with the gateway's key, signed at once (no
    probe), with SHA-2 for RSA keys: nothing else is tried.
    """

    preferredOrder = [b"publickey"]

    def __init__(self, user, instance, key):
        userauth.SSHUserAuthClient.__init__(self, user, instance)
        self._key = key
        self._tried = False

    def ssh_USERAUTH_BANNER(self, packet):
        """
        The target's banner is for people logging in to it; the client logs
        in to the gateway, and never sees it.  Ignored (Conch would log it
        as it came).
        """

    def tryAuth(self, kind):
        if kind != b"publickey" or self._tried:
            return None
        self._tried = True
        key = self._key
        algorithm = key.supportedSignatureAlgorithms()[0]
        blob = key.public().blob()
        signed = (
            common.NS(self.transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + common.NS(self.user)
            + common.NS(self.instance.name)
            + common.NS(b"publickey")
            + b"\x01"
            + common.NS(algorithm)
            + common.NS(blob)
        )
        signature = key.sign(signed, signatureType=algorithm)
        self.askForAuth(b"publickey", b"\x01" + common.NS(algorithm) + common.NS(blob) + common.NS(signature))
        return True


class TargetConnection(ChannelBooks, FlowControl, connection.SSHConnection):
    """
    The connection service to the target, once the gateway is logged in:
    client-facing channels open their counterparts here.

    @ivar owner: told with C{target_lost(message)} when the target goes
        away.
    """

    peer = "target"
    _refused_opens = 0

    def __init__(self, attempt):
        connection.SSHConnection.__init__(self)
        self.attempt = attempt
        self.owner = None
        self.closed = False

    def serviceStarted(self):
        connection.SSHConnection.serviceStarted(self)
        self.transport._hoopgw_connection = self
        self.attempt.succeed(self)

    def ssh_CHANNEL_OPEN(self, packet):
        """
        The target may open no channel towards the gateway (a forwarded
        port, X11, an agent: the gateway asks for none).  Each is refused;
        the first on a connection is a line in the log (Conch would refuse
        each with a traceback), so that a target opening them in a loop
        cannot flood it.
        """
        channel_type, rest = common.getNS(packet)
        (sender,) = struct.unpack(">L", rest[:4])
        self._refused_opens += 1
        if self._refused_opens == 1:
            self._log.warn("The target {target} tried to open a channel ({kind}); refused, as any more it opens on "
                           "this connection will be, without a line each",
                           target=self.attempt.label, kind=admission.client_text(channel_type))
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)
            + common.NS(b"hoopgw opens no channels for the target") + common.NS(b""),
        )

    def open(self, channel_, extra=b""):
        """
        Open C{channel_} (which has an C{opened} Deferred) on the target.
        """
        channel_.conn = self
        self.openChannel(channel_, extra)
        return channel_.opened

    def lost(self, message):
        if self.closed:
            return
        self.closed = True
        if self.owner is not None:
            self.owner.target_lost(
                "the target closed the connection" + (": %s" % (message,) if message else "")
            )

    def close(self):
        """
        Close the connection to the target (the client has gone).
        """
        self.closed = True
        if self.transport is not None and self.transport.transport is not None:
            self.transport.transport.loseConnection()


def connect(reactor, target, login, where):
    """
    Connect and log in to the target as C{login} with the gateway's key.

    @param where: the configuration key path of the target, for errors.
    @return: a L{Deferred} firing with a L{TargetConnection}, or failing
        with a L{TargetError} whose message says what to do.
    """
    try:
        key = load_private_key(target.key.read_bytes(), "the gateway's key for the target")
    except Exception as problem:
        return defer.fail(TargetError("the gateway cannot use its key for the target: %s" % (problem,), "gateway-key"))
    attempt = _Attempt(reactor, target, login, key, where)
    factory = protocol.Factory.forProtocol(lambda: _TargetTransport(attempt))
    endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=target.connect_timeout)

    def unreachable(failure):
        if failure.check(error.ConnectError, error.DNSLookupError, error.TimeoutError, OSError):
            attempt.fail(
                TargetError(
                    "hoopgw could not reach the target %s: %s" % (attempt.label, _describe(failure.value)),
                    "target-unreachable",
                )
            )
        else:
            attempt.fail(failure.value)

    connecting = endpoint.connect(factory)
    connecting.addErrback(unreachable)
    attempt.ready.addErrback(lambda failure: (connecting.cancel() if not connecting.called else None, failure)[1])
    return attempt.ready


def _describe(problem):
    text = str(problem).strip()
    if isinstance(problem, error.ConnectionRefusedError):
        return "the connection was refused (is sshd running?)"
    return text.rstrip(".") or type(problem).__name__


def _no_delay(transport_):
    set_no_delay = getattr(transport_, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)
