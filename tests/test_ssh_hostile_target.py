"""
An SSH peer that misbehaves after login.  A target that opens channels
towards the gateway, or sends a message Conch cannot read: no OpenSSH sshd
does either, a compromised or buggy target could.  The target here is
Conch's SSH server, playing that hostile peer; a hostile client is Conch's
SSH client.
"""

import os
import struct

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import channel, common, connection, factory, keys, transport
from twisted.cred import credentials, portal
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from tests.ssh_support import SSHGateway, key


@implementer(ICredentialsChecker)
class _AnyKey:
    """
    Lets the gateway in with whatever key it signs with.
    """

    credentialInterfaces = (credentials.ISSHPrivateKey,)

    def requestAvatarId(self, given):
        return defer.succeed(given.username)


class _Probe(channel.SSHChannel):
    """
    A channel the target opens towards the gateway (X11 here).
    """

    name = b"x11"

    def __init__(self, refused, **kwargs):
        channel.SSHChannel.__init__(self, **kwargs)
        self.refused = refused

    def openFailed(self, reason):
        self.refused.callback(reason)

    def channelOpen(self, specificData):
        self.refused.errback(AssertionError("the gateway accepted a channel the target opened"))


class _Session(channel.SSHChannel):
    """
    The session channel the gateway opens for a client's command: the
    target does what its test asks once the command is asked for.
    """

    name = b"session"

    def request_exec(self, data):
        reactor.callLater(0, self.avatar.behaviour, self)
        return 1


class _CarelessTransport(transport.SSHServerTransport):
    """
    The hostile target's own side: what the gateway answers to its
    nonsense (a failure for a request it never made, a close of a channel
    it made up) Conch's server cannot match with anything it sent; it
    shrugs, as a hostile peer would.
    """

    def dispatchMessage(self, messageNum, payload):
        try:
            transport.SSHServerTransport.dispatchMessage(self, messageNum, payload)
        except Exception:
            pass

    def connectionLost(self, reason):
        # Its books of channels may be in any state by now.
        try:
            transport.SSHServerTransport.connectionLost(self, reason)
        except Exception:
            pass


class _HostileTarget:
    def __init__(self, behaviour):
        key = keys.Key(ed25519.Ed25519PrivateKey.generate())
        self.host_key = key.public().toString("openssh").decode()
        realm = self

        class Factory(factory.SSHFactory):
            protocol = _CarelessTransport
            publicKeys = {b"ssh-ed25519": key.public()}
            privateKeys = {b"ssh-ed25519": key}

        self.factory = Factory()
        self.factory.portal = portal.Portal(realm, [_AnyKey()])
        self.behaviour = behaviour
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")

    def requestAvatar(self, avatar_id, mind, *interfaces):
        user = ConchUser()
        user.behaviour = self.behaviour
        user.channelLookup[b"session"] = _Session
        return interfaces[0], user, lambda: None


def _exit(session, status):
    session.conn.sendRequest(session, b"exit-status", struct.pack(">L", status))
    session.conn.sendEOF(session)
    session.loseConnection()


class HostileTargetTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def gateway(self, behaviour):
        target = _HostileTarget(behaviour)
        self.addCleanup(target.port.stopListening)
        return SSHGateway(self, target={"port": target.port.getHost().port, "host_key": target.host_key})

    def warnings(self, text):
        return [formatEvent(event) for event in self.logged
                if event.get("log_level") == LogLevel.warn and text in formatEvent(event)]

    @defer.inlineCallbacks
    def opens_channels(self, count):
        """
        The target opens C{count} X11 channels as it runs the client's
        command, then answers it: the client gets the output and exit 0.

        @return: the gateway's refusal of each (Conch's ConchError: value
            is the description, data the code).
        """
        refusals = [defer.Deferred() for _ in range(count)]

        def behaviour(session):
            for refused in refusals:
                session.conn.openChannel(_Probe(refused, conn=session.conn), common.NS(b"127.0.0.1") + struct.pack(">L", 6000))
            session.write(b"ok\n")
            _exit(session, 0)

        gateway = self.gateway(behaviour)
        out, err, code = yield gateway.ssh("echo ok")
        self.assertEqual((out, code), (b"ok\n", 0), err)
        return (yield defer.gatherResults(refusals))

    @defer.inlineCallbacks
    def test_target_opens_a_channel(self):
        """
        A channel the target opens towards the gateway is refused
        (administratively prohibited), with one warning line; the command
        goes on and its output and exit status reach the client.
        """
        (reason,) = yield self.opens_channels(1)
        self.assertEqual((reason.data, reason.value),
                         (connection.OPEN_ADMINISTRATIVELY_PROHIBITED, b"hoopgw opens no channels for the target"))
        (line,) = self.warnings("tried to open a channel")
        self.assertIn("(x11); refused", line)

    @defer.inlineCallbacks
    def test_target_opens_channels_in_a_loop(self):
        """
        Every channel a target opens is refused, but only the first on a
        connection is a line in the gateway's log: a loop cannot flood it.
        """
        reasons = yield self.opens_channels(50)
        self.assertEqual({reason.data for reason in reasons}, {connection.OPEN_ADMINISTRATIVELY_PROHIBITED})
        self.assertEqual(len(self.warnings("tried to open a channel")), 1)

    @defer.inlineCallbacks
    def test_malformed_message(self):
        """
        A channel-data message cut short ends the connection to the target
        with a protocol error and one warning line, not a traceback; the
        client's command fails, and the record says the target sent a
        malformed message.
        """

        def behaviour(session):
            session.write(b"partial\n")
            remote = session.conn.channelsToRemoteChannel[session]
            session.conn.transport.sendPacket(connection.MSG_CHANNEL_DATA, struct.pack(">L", remote) + b"\x00\x00")

        gateway = self.gateway(behaviour)
        out, err, code = yield gateway.ssh("echo ok")
        self.assertNotEqual(code, 0)
        (line,) = self.warnings("sent a malformed SSH message")
        self.assertIn("(number 94)", line)
        for _ in range(100):
            ends = gateway.events("session.end")
            if ends:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        (end,) = ends
        self.assertEqual(end["reason"], "the target closed the connection: the target sent a malformed SSH message (number 94)")


    @defer.inlineCallbacks
    def test_open_channel_refused_afterwards(self):
        """
        A target that refuses the session channel after confirming it (so
        that Conch would drop the channel from its books while it is still
        open) ends the connection to it with one warning line, and the
        gateway's books stay whole (they raised when the connection ended).
        """

        def behaviour(session):
            remote = session.conn.channelsToRemoteChannel[session]
            session.conn.transport.sendPacket(
                connection.MSG_CHANNEL_OPEN_FAILURE, struct.pack(">2L", remote, 2) + common.NS(b"no") + common.NS(b""))

        gateway = self.gateway(behaviour)
        out, err, code = yield gateway.ssh("echo ok")
        self.assertNotEqual(code, 0)
        (line,) = self.warnings("sent a malformed SSH message")
        self.assertIn("(number 92)", line)
        self.assertIn("the target refused channel 0, which is not being opened", line)

# The connection-layer messages a target can send once logged in.
_MESSAGES = (
    connection.MSG_GLOBAL_REQUEST,
    connection.MSG_CHANNEL_OPEN,
    connection.MSG_CHANNEL_OPEN_CONFIRMATION,
    connection.MSG_CHANNEL_OPEN_FAILURE,
    connection.MSG_CHANNEL_WINDOW_ADJUST,
    connection.MSG_CHANNEL_DATA,
    connection.MSG_CHANNEL_EXTENDED_DATA,
    connection.MSG_CHANNEL_EOF,
    connection.MSG_CHANNEL_CLOSE,
    connection.MSG_CHANNEL_REQUEST,
    connection.MSG_CHANNEL_SUCCESS,
    connection.MSG_CHANNEL_FAILURE,
)


_TARGET_NAMES = (b"exit-status", b"exit-signal", b"x11", b"keepalive@openssh.com")
_CLIENT_NAMES = (b"exec", b"pty-req", b"env", b"shell", b"subsystem", b"window-change", b"signal", b"session",
                 b"direct-tcpip", b"tcpip-forward", b"auth-agent-req@openssh.com", b"sftp")


def _mutated(rng, remote, names=_TARGET_NAMES):
    """
    A connection-layer message as a hostile peer might send it: a known
    type, addressed to the session's channel or another, its body random,
    well-formed pieces (among them C{names}: request and channel types) or
    cut anywhere.
    """
    number = rng.choice(_MESSAGES)
    if rng.random() < 0.8:
        # None: the session's channel, whose number is known only once open.
        pieces = [b"MINE" if remote is None else struct.pack(">L", remote)]
    else:
        pieces = [struct.pack(">L", rng.choice([(remote or 0) + 1, 0xFFFFFFFF, rng.getrandbits(32)]))]
    for _ in range(rng.randrange(4)):
        kind = rng.randrange(4)
        if kind == 0:
            pieces.append(common.NS(rng.choice(names + (b"card 4111111111111111",
                                                        bytes(rng.getrandbits(8) for _ in range(8))))))
        elif kind == 1:
            pieces.append(struct.pack(">L", rng.choice([0, 1, 2 ** 31, 0xFFFFFFFF, rng.getrandbits(32)])))
        elif kind == 2:
            pieces.append(bytes([rng.randrange(2)]))
        else:
            pieces.append(bytes(rng.getrandbits(8) for _ in range(rng.randrange(40))))
    body = b"".join(pieces)
    if rng.random() < 0.5:
        body = body[: rng.randrange(len(body) + 1)]
    return number, body


class HostileTargetFuzzTests(unittest.TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_mutated_messages(self):
        """
        Sixty sessions whose target answers the command with one to three
        mutated connection-layer messages before its output and exit: every
        client gets an answer within 30 seconds (its output or an error),
        no error is logged (trial fails the test on one), no card number
        reaches a client in clear, and the gateway still serves a session
        whose target behaves.  HOOPGW_FUZZ_SEED and HOOPGW_FUZZ_ROUNDS run
        it with another seed, longer.
        """
        import random

        rng = random.Random(int(os.environ.get("HOOPGW_FUZZ_SEED", "13")))
        hostile = [True]

        def behaviour(session):
            if hostile[0]:
                remote = session.conn.channelsToRemoteChannel[session]
                for _ in range(rng.randrange(1, 4)):
                    session.conn.transport.sendPacket(*_mutated(rng, remote))
            if session.conn.transport.transport.connected:
                session.write(b"done\n")
                _exit(session, 0)

        target = _HostileTarget(behaviour)
        self.addCleanup(target.port.stopListening)
        gateway = SSHGateway(self, target={"port": target.port.getHost().port, "host_key": target.host_key})
        outcomes = {}
        for round_ in range(int(os.environ.get("HOOPGW_FUZZ_ROUNDS", "60"))):
            answered = gateway.ssh("echo done").addTimeout(30, reactor)
            out, err, code = yield answered
            self.assertNotIn(b"4111111111111111", out)
            self.assertNotIn("4111111111111111", err)
            outcomes[code] = outcomes.get(code, 0) + 1
        hostile[0] = False
        out, err, code = yield gateway.ssh("echo done")
        self.assertEqual((out, code), (b"done\n", 0), (err, outcomes))


class _KeyClient(transport.SSHClientTransport):
    """
    A Conch client that logs in as the factory's C{login} with deploy-bot's
    key and opens the session channel C{session(conn)} makes.
    """

    def verifyHostKey(self, blob, fingerprint):
        return defer.succeed(True)

    def session(self, conn):
        raise NotImplementedError

    def connectionSecure(self):
        from twisted.conch.ssh import userauth

        client = self

        class Connection(connection.SSHConnection):
            def serviceStarted(self):
                self.openChannel(client.session(self))

        class Auth(userauth.SSHUserAuthClient):
            def getPublicKey(self):
                return keys.Key.fromFile(key("deploy-bot")[0]).public()

            def getPrivateKey(self):
                return defer.succeed(keys.Key.fromFile(key("deploy-bot")[0]))

        self.requestService(Auth(self.factory.login.encode(), Connection()))


class _RefusingClient(_KeyClient):
    """
    A client that opens a session and, once the gateway has confirmed it,
    refuses that same channel.
    """

    def session(self, conn):
        return _Refuser(conn=conn)

    def receiveError(self, reasonCode, description):
        self.factory.told.append((reasonCode, description))

    def connectionLost(self, reason):
        try:
            transport.SSHClientTransport.connectionLost(self, reason)
        finally:
            self.factory.closed.callback(None)


class _Refuser(channel.SSHChannel):
    name = b"session"

    def channelOpen(self, specificData):
        remote = self.conn.channelsToRemoteChannel[self]
        self.conn.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE, struct.pack(">2L", remote, 2) + common.NS(b"no") + common.NS(b""))


class HostileClientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_open_channel_refused_afterwards(self):
        """
        A client that refuses its own session channel once the gateway has
        confirmed it is told of a protocol error, and the gateway's books
        stay whole (they raised when the connection ended).
        """
        from twisted.internet import endpoints, protocol

        gateway = SSHGateway(self)
        factory = protocol.ClientFactory.forProtocol(_RefusingClient)
        factory.told, factory.closed, factory.login = [], defer.Deferred(), gateway.login
        yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.ssh_port), factory.buildProtocol(None))
        yield factory.closed
        self.assertEqual(factory.told, [(transport.DISCONNECT_PROTOCOL_ERROR,
                                         b"hoopgw: the client sent a malformed SSH message (number 92)")])


class _FuzzingClient(_KeyClient):
    """
    A client that opens a session, sends the factory's mutated messages on
    it, then asks for C{echo done}.
    """

    def session(self, conn):
        return _Fuzzer(self.factory, conn=conn)

    def dispatchMessage(self, messageNum, payload):
        # The gateway's close of the session is its last answer, read here:
        # its answers to the nonsense (a refusal addressed to a channel
        # number the nonsense named, say) may have spoiled this side's books.
        session = self.factory.session
        if (messageNum == connection.MSG_CHANNEL_CLOSE and session is not None
                and payload[:4] == struct.pack(">L", session)):
            self._over("closed")
            self.transport.loseConnection()
            return
        try:
            transport.SSHClientTransport.dispatchMessage(self, messageNum, payload)
        except Exception:
            pass

    def _over(self, how):
        if not self.factory.over.called:
            self.factory.over.callback(how)

    def connectionLost(self, reason):
        try:
            transport.SSHClientTransport.connectionLost(self, reason)
        except Exception:
            pass
        finally:
            self._over("lost")


class _Fuzzer(channel.SSHChannel):
    name = b"session"

    def __init__(self, factory, **kwargs):
        channel.SSHChannel.__init__(self, **kwargs)
        self.factory = factory

    def channelOpen(self, specificData):
        self.factory.session = self.id
        remote = self.conn.channelsToRemoteChannel[self]
        for message in self.factory.messages(remote):
            self.conn.transport.sendPacket(*message)
        self.conn.sendRequest(self, b"exec", common.NS(b"echo done"))

    def dataReceived(self, data):
        self.factory.received.append(data)


class HostileClientFuzzTests(unittest.TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_mutated_messages(self):
        """
        Sixty logged-in clients each send one to three mutated
        connection-layer messages (requests, data, window adjustments,
        channel opens and answers, global requests, cut anywhere) on their
        session before asking for a command: the gateway answers each (the
        command's output or a close) within 30 seconds, logs no error, and
        still serves the real ssh afterwards.  HOOPGW_FUZZ_SEED and
        HOOPGW_FUZZ_ROUNDS run it with another seed, longer.
        """
        import random

        from twisted.internet import endpoints, protocol

        rng = random.Random(int(os.environ.get("HOOPGW_FUZZ_SEED", "13")))
        gateway = SSHGateway(self)
        endings = {}
        for round_ in range(int(os.environ.get("HOOPGW_FUZZ_ROUNDS", "60"))):
            factory = protocol.ClientFactory.forProtocol(_FuzzingClient)
            factory.login, factory.received, factory.over = gateway.login, [], defer.Deferred()
            factory.session = None
            sent = [_mutated(rng, remote=None, names=_CLIENT_NAMES) for _ in range(rng.randrange(1, 4))]
            factory.messages = lambda remote: [(number, struct.pack(">L", remote) + body[4:] if body[:4] == b"MINE" else body)
                                               for number, body in sent]
            client = yield endpoints.connectProtocol(
                endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.ssh_port), factory.buildProtocol(None))
            try:
                ending = yield factory.over.addTimeout(30, reactor)
            except defer.TimeoutError:
                self.fail("round %d: no answer and no close within 30 s after %r" % (round_, sent))
            endings[ending] = endings.get(ending, 0) + 1
            if client.transport.connected:
                client.transport.loseConnection()
        out, err, code = yield gateway.ssh("echo done")
        self.assertEqual((out, code), (b"done\n", 0), (err, endings))
