"""
The SSH front end's server side: the listening factory with the
gateway's host keys, one transport per client connection (with its own
portal), the connection service that opens channels (also after a
decision) and flow-controls them, and the avatar that owns a session and
its connection to the target, and the realm that makes that avatar once
the gateway has logged in to the target.
"""

import os
import struct

from twisted.conch import avatar as conch_avatar
from twisted.conch.interfaces import IConchUser
from twisted.conch.openssh_compat import primes
from twisted.conch.ssh import common, connection, factory, transport
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from hoopgw import __version__, admission
from hoopgw.model import DENIED, Decision
from hoopgw.ssh import auth, channels, upstream
from hoopgw.ssh.commands import refused_request
from hoopgw.ssh.publickeys import generated_host_key, load_private_key
from hoopgw.ssh.relay import ChannelBooks, FlowControl
from hoopgw.ssh.upstream import CIPHERS, KEY_EXCHANGES, MACS


class GatewayConnection(ChannelBooks, FlowControl, connection.SSHConnection):
    """
    The ssh-connection service for an admitted client: a channel may be
    confirmed only once the chain and the target have agreed (direct-tcpip),
    and a channel learns when the reply to its request has gone out.
    """

    peer = "client"
    _stopped = False

    def serviceStopped(self):
        self._stopped = True
        connection.SSHConnection.serviceStopped(self)

    def ssh_CHANNEL_OPEN(self, packet):
        channel_type, rest = common.getNS(packet)
        sender, window, max_packet = struct.unpack(">3L", rest[:12])
        data = rest[12:]
        opening = defer.maybeDeferred(self.transport.avatar.open_channel, channel_type, window, max_packet, data)
        opening.addCallbacks(self._opened, self._open_failed, callbackArgs=(sender,), errbackArgs=(sender,))

    def _opened(self, channel_, sender):
        if self._stopped:
            channel_.closed()
            return
        channel_.conn = self
        local = self.localChannelID
        self.localChannelID += 1
        channel_.id = local
        self.channels[local] = channel_
        self.channelsToRemoteChannel[channel_] = sender
        self.localToRemoteChannel[local] = sender
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_CONFIRMATION,
            struct.pack(">4L", sender, local, channel_.localWindowSize, channel_.localMaxPacket)
            + channel_.specificData,
        )
        channel_.channelOpen(b"")

    def _open_failed(self, failure, sender):
        if self._stopped:
            return
        if failure.check(channels.ChannelRefused):
            code, text = failure.value.code, failure.value.text
        else:
            self._log.failure("Opening a channel failed", failure)
            code, text = connection.OPEN_CONNECT_FAILED, "the gateway could not open this channel"
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, code) + common.NS(text.encode("utf-8")) + common.NS(b""),
        )

    def _cbChannelRequest(self, result, localChannel):
        # The channel may have closed while its request was being decided.
        if localChannel not in self.localToRemoteChannel:
            return None
        return connection.SSHConnection._cbChannelRequest(self, result, localChannel)

    def _ebChannelRequest(self, result, localChannel):
        if localChannel not in self.localToRemoteChannel:
            return None
        return connection.SSHConnection._ebChannelRequest(self, result, localChannel)

    def ssh_CHANNEL_REQUEST(self, packet):
        channel_ = self.channels.get(struct.unpack(">L", packet[:4])[0])
        replying = connection.SSHConnection.ssh_CHANNEL_REQUEST(self, packet)
        replied = getattr(channel_, "replied", None)
        if replied is None:
            return replying
        if replying is None:
            replied()
            return None
        return replying.addBoth(lambda result: (replied(), result)[1])


class GatewayAvatar(conch_avatar.ConchUser):
    """
    An admitted client: its session, its connection to the target, and
    its open channels.
    """

    log = Logger()

    def __init__(self, front, session, target, proof):
        conch_avatar.ConchUser.__init__(self)
        self.front = front
        self.factory = front.factory
        self.session = session
        self.chain = front.factory.chain
        self.settings = front.factory.settings
        self.store = front.factory.gateway.store
        self.login = session.attributes["login"]
        self.certificate = proof.certificate if proof is not None else None
        self.target = target
        target.owner = self
        self.channels = set()
        self.pending = set()
        self._waiting = []
        self.ended = None
        self.done = defer.Deferred()
        self.factory.avatars.add(self)
        front.logged_in()

    def open_channel(self, channel_type, window, max_packet, data):
        if channel_type == b"session":
            return channels.SessionChannel(self, remoteWindow=window, remoteMaxPacket=max_packet)
        if channel_type == b"direct-tcpip":
            return channels.open_forward(self, window, max_packet, data)
        raise channels.ChannelRefused(
            connection.OPEN_UNKNOWN_CHANNEL_TYPE,
            "hoopgw does not open %s channels" % (channel_type.decode("ascii", "replace"),),
        )

    def gotGlobalRequest(self, request_type, data):
        if request_type == b"tcpip-forward":
            try:
                address, rest = common.getNS(data)
                port = struct.unpack(">L", rest[:4])[0]
                text = "tcpip-forward %s:%d" % (address.decode("utf-8", "replace"), port)
            except (struct.error, IndexError):
                text = "tcpip-forward"
            self.refuse(
                refused_request("remote-forwarding", text, direction="remote"),
                "remote port forwarding is never allowed through hoopgw",
            )
        return 0

    def refuse(self, command, reason, rule=None):
        """
        Record something the gateway refuses without asking the chain.
        """
        rule = rule or command.facts.get("request", command.kind)
        command.decision = Decision.deny(reason, rule=rule, addon="gateway")
        command.outcome.update(status=DENIED)
        self.chain.finish(self.session, command)

    def notify(self, text):
        for channel_ in list(self.pending):
            channel_.notify(text)

    def wait_for(self, deferred):
        """
        The session ends only once C{deferred} (a recording being stored)
        has fired.
        """
        self._waiting.append(deferred)

    def target_lost(self, reason):
        if self.ended is not None:
            return
        self.session.attributes.setdefault("end_reason", reason)
        for channel_ in list(self.channels):
            if channel_.command is not None and not channel_.finished:
                channel_.command.outcome.setdefault("status", "interrupted")
                channel_.command.outcome.setdefault("reason", reason)
        self.front.disconnect("hoopgw: %s" % (reason,))

    def logout(self):
        self.end(self.session.attributes.get("end_reason", "client disconnected"))

    def end(self, reason):
        """
        The client connection is gone: close the target's, wait for what
        is still being recorded, then end the session.
        """
        if self.ended is not None:
            return self.ended
        self.session.attributes.setdefault("end_reason", reason)
        self.target.close()
        waiting = defer.DeferredList(self._waiting, consumeErrors=True) if self._waiting else defer.succeed(None)
        self.ended = waiting.addCallback(lambda _: self.chain.end_session(self.session))
        self.ended.addErrback(lambda failure: self.log.failure("Ending an SSH session failed", failure))
        self.ended.addBoth(self._ended)
        return self.ended

    def _ended(self, result):
        self.factory.avatars.discard(self)
        self.done.callback(None)
        return result


class GatewayServerTransport(transport.SSHServerTransport):
    """
    One client connection.
    """

    ourVersionString = ("SSH-2.0-hoopgw_%s" % (__version__,)).encode("ascii")
    supportedCiphers = CIPHERS
    supportedMACs = MACS
    supportedKeyExchanges = KEY_EXCHANGES

    def connectionMade(self):
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        peer = self.transport.getPeer()
        self.client_host = getattr(peer, "host", str(peer))
        self.client_address = "%s:%s" % (self.client_host, getattr(peer, "port", ""))
        self.lost = False
        self.key_proof = None
        self.auth_method = None
        # Whether an event of this connection's attempts is in the record
        # (a login tried, a limit met): a connection that ends without one
        # leaves one saying how far it got.
        self.recorded = False
        self.authenticated = False
        self.sent_disconnect = None
        self._refused = False
        self._abort = None
        self._counted = False
        self._grace = None
        self.portal = Portal(GatewayRealm(self), [auth.KeyChecker(self), auth.TokenChecker(self)])
        self.factory.fronts.add(self)
        transport.SSHServerTransport.connectionMade(self)
        limits = self.factory.admission
        refused = limits.refusal(self.client_host)
        if refused is not None:
            self.refuse_attempt(*refused, code=transport.DISCONNECT_TOO_MANY_CONNECTIONS)
            return
        limits.enter(self.client_host)
        self._counted = True
        self._grace = self.factory.reactor.callLater(self.factory.settings.login_timeout, self._grace_expired)

    def logged_in(self):
        """
        The client has logged in: it no longer counts against the limits
        before login.
        """
        self.authenticated = True
        self._uncount()

    def _uncount(self):
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        if self._counted:
            self._counted = False
            self.factory.admission.leave(self.client_host)

    def stage(self):
        """
        How far the connection got: version, key-exchange or authentication.
        """
        if not self.gotVersion:
            return "version"
        if getattr(self, "sessionID", None) is None:
            return "key-exchange"
        return "authentication"

    def _grace_expired(self):
        self._grace = None
        if self.lost or self.authenticated:
            return
        self.refuse_attempt(
            admission.LOGIN_TIMEOUT,
            "the client did not log in within %g seconds (login_timeout)" % (self.factory.settings.login_timeout,),
        )

    def refuse_attempt(self, rule, message, code=transport.DISCONNECT_BY_APPLICATION):
        """
        Refuse this connection before login: record it (C{session.refused}
        with C{rule}) and disconnect with C{message}.
        """
        self.recorded = True
        self._record(rule, message)
        if self.lost:
            return
        text = ("hoopgw refused the connection: %s" % (message,)).encode("utf-8")
        self.sent_disconnect = (code, text)
        self.sendPacket(transport.MSG_DISCONNECT, struct.pack(">L", code) + common.NS(text) + common.NS(b""))
        # Closed for writing only, and what the client still sends
        # discarded: a full close with its version and key exchange unread
        # would reset the connection before the client reads why.
        self._refused = True
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is None:
            self.transport.loseConnection()
            return
        half_close()
        self._abort = self.factory.reactor.callLater(REFUSED_LINGER, self.transport.abortConnection)

    def dataReceived(self, data):
        if self._refused:
            return
        transport.SSHServerTransport.dataReceived(self, data)

    def receiveDebug(self, alwaysDisplay, message, lang):
        # The client's words, even in the log: masked.
        if alwaysDisplay:
            self._log.debug("{client}: debug message: {message}", client=self.client_address,
                            message=admission.client_text(message))

    def dispatchMessage(self, messageNum, payload):
        """
        A message Conch cannot read (a truncated string, a count past the
        end) ends the connection with a protocol error the client is told
        of, and one line in the log: bad input is no traceback.
        """
        try:
            transport.SSHServerTransport.dispatchMessage(self, messageNum, payload)
        except Exception as error:
            self._log.warn(
                "{client}: a malformed SSH message (number {number}) ended the connection: {error}",
                client=self.client_address,
                number=messageNum,
                error=admission.client_text("%s: %s" % (type(error).__name__, error)),
            )
            if not self.lost:
                self.sendDisconnect(
                    transport.DISCONNECT_PROTOCOL_ERROR,
                    b"hoopgw: the client sent a malformed SSH message (number %d)" % (messageNum,),
                )

    def _record(self, rule, message):
        attributes = {"stage": self.stage()}
        if self.gotVersion:
            attributes["client_version"] = admission.client_text(self.otherVersionString)
        factory = self.factory
        admission.record_refusal(
            factory.chain, factory.connection.name, "ssh", self.client_address, factory.settings.target_name,
            rule, message, **attributes
        )

    def sendDisconnect(self, reason, desc):
        if self.sent_disconnect is None:
            self.sent_disconnect = (reason, desc)
        transport.SSHServerTransport.sendDisconnect(self, reason, desc)

    def connectionLost(self, reason=None):
        self.lost = True
        self.factory.fronts.discard(self)
        self._uncount()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if not self.authenticated and not self.recorded:
            self.recorded = True
            self._record(*self._how_it_ended())
        transport.SSHServerTransport.connectionLost(self, reason)

    def _how_it_ended(self):
        """
        The reason code and sentence of a connection that ended before any
        login was tried.
        """
        stage = self.stage()
        if self.sent_disconnect is None:
            return "ssh:closed-before-login", "the client closed the connection before logging in (at the %s stage)" % (stage,)
        code, desc = self.sent_disconnect
        rule = _DISCONNECT_RULES.get(code, "ssh:closed-before-login")
        return rule, "the gateway ended the connection at the %s stage: %s" % (stage, admission.client_text(desc))

    def banner(self, text):
        """
        Show C{text} to the client during authentication.
        """
        if not hasattr(self, "avatar") and not self.lost:
            self.sendPacket(auth.MSG_USERAUTH_BANNER, common.NS((text + "\n").encode("utf-8")) + common.NS(b""))

    def notify(self, text):
        """
        The session's notifier: a banner while the client authenticates,
        then the stderr of the channels waiting for a decision.
        """
        avatar = getattr(self, "avatar", None)
        if avatar is None:
            self.banner("hoopgw: %s" % (text,))
        else:
            avatar.notify(text)

    def disconnect(self, message, code=transport.DISCONNECT_BY_APPLICATION):
        if not self.lost:
            self.sendDisconnect(code, message.encode("utf-8"))


# How long a refused client may take to read why before its connection is
# cut.
REFUSED_LINGER = 5.0

# The reason codes of connections the gateway ended before any login was tried.
_DISCONNECT_RULES = {
    transport.DISCONNECT_PROTOCOL_ERROR: "ssh:protocol-error",
    transport.DISCONNECT_KEY_EXCHANGE_FAILED: "ssh:key-exchange-failed",
    transport.DISCONNECT_CONNECTION_LOST: "ssh:protocol-error",
    transport.DISCONNECT_MAC_ERROR: "ssh:protocol-error",
    transport.DISCONNECT_PROTOCOL_VERSION_NOT_SUPPORTED: "ssh:protocol-error",
}


class SSHGatewayFactory(factory.SSHFactory):
    """
    The listener of one SSH connection.
    """

    protocol = GatewayServerTransport
    services = {b"ssh-userauth": auth.GatewayUserAuth, b"ssh-connection": GatewayConnection}
    moduli = "/etc/ssh/moduli"

    def __init__(self, connection_, gateway, chain, reactor=None):
        from twisted.internet import reactor as default_reactor

        self.connection = connection_
        self.settings = connection_.settings
        self.gateway = gateway
        self.chain = chain
        self.reactor = reactor or default_reactor
        host_keys = self._host_keys()
        self.privateKeys = {key.sshType(): key for key in host_keys}
        self.publicKeys = {name: key.public() for name, key in self.privateKeys.items()}
        self.fronts = set()
        self.avatars = set()
        self.admission = admission.Admission(
            self.settings.max_unauthenticated, self.settings.max_unauthenticated_per_source
        )

    def _host_keys(self):
        if self.settings.host_keys:
            found = []
            for reference in self.settings.host_keys:
                found.append(load_private_key(reference.read_bytes(), reference.file or reference.env))
            return found
        state = self.gateway.config.gateway.state_dir
        return [generated_host_key(os.path.join(state, "ssh", self.connection.name))]

    def buildProtocol(self, address):
        built = factory.SSHFactory.buildProtocol(self, address)
        # SHA-1 host key signatures (ssh-rsa, ssh-dss) are not offered.
        built.supportedPublicKeys = [name for name in built.supportedPublicKeys if name not in (b"ssh-rsa", b"ssh-dss")]
        return built

    def getPrimes(self):
        """
        OpenSSH's Diffie-Hellman groups, for clients that ask for group
        exchange; without them, only fixed groups and elliptic curves.
        """
        try:
            return primes.parseModuliFile(self.moduli)
        except (OSError, ValueError):
            return None

    def host_key_lines(self):
        """
        The gateway's public host keys for this connection, as known_hosts
        would list them.
        """
        return [key.toString("openssh").decode("ascii") for key in self.publicKeys.values()]

    def close_sessions(self, reason):
        """
        End every session (the gateway is stopping).
        """
        avatars = list(self.avatars)
        for avatar in avatars:
            avatar.session.attributes["end_reason"] = reason
        for front in list(self.fronts):
            front.disconnect("hoopgw is shutting down: %s" % (reason,))
        return defer.DeferredList([avatar.done for avatar in avatars], consumeErrors=True)


@implementer(IRealm)
class GatewayRealm:
    """
    Turns an admitted session into an avatar, once the gateway is logged
    in to the target on the client's behalf.
    """

    log = Logger()

    def __init__(self, front):
        self.front = front

    def requestAvatar(self, session, mind, *interfaces):
        if IConchUser not in interfaces:
            raise NotImplementedError("hoopgw only serves SSH")
        front = self.front
        factory = front.factory
        login = session.attributes["login"]
        proof = front.key_proof
        if front.lost:
            session.attributes["end_reason"] = "client disconnected"
            return factory.chain.end_session(session).addCallback(lambda _: defer.fail(auth.Refused("disconnected")))
        where = "connections.%s.target" % (factory.connection.name,)
        connecting = upstream.connect(factory.reactor, factory.settings.target, login, where)

        def connected(target):
            avatar = GatewayAvatar(front, session, target, proof)
            if front.lost:
                avatar.end("client disconnected")
                raise auth.Refused("disconnected")
            return IConchUser, avatar, avatar.logout

        def failed(failure):
            failure.trap(upstream.TargetError)
            self.log.warn(
                "{connection}: the target is unavailable: {reason}",
                connection=factory.connection.name,
                reason=failure.getErrorMessage(),
            )
            session.attributes["end_reason"] = "target unavailable: %s" % (failure.getErrorMessage(),)
            session.attributes["target_error"] = failure.value.reason
            ending = factory.chain.end_session(session)
            return ending.addBoth(lambda _: failure)

        return connecting.addCallbacks(connected, failed)
