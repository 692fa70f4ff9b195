"""
Client authentication on the gateway's SSH server: a portal per client
connection with two checkers, one for public keys and OpenSSH
certificates (the client proves it holds the key; the key registry says
who that is), one for identity tokens given as the password or through
keyboard-interactive.  Either way the session then goes through the
chain's C{start_session}, where the identity addon sets the identity and
the connection's allowed groups are enforced.  The realm connects to the
target before the client is let in.
"""

import struct
import time

from twisted.conch import error as conch_error
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import keys, transport, userauth
from twisted.conch.ssh.common import NS, getNS
from twisted.cred import credentials as cred_credentials
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from hoopgw import admission
from hoopgw.model import DENY, Credentials, Decision, Session
from hoopgw.ssh import upstream
from hoopgw.ssh.identities import KeyRefused, identify
from hoopgw.ssh.publickeys import fingerprint, key_type


MSG_USERAUTH_BANNER = 53
MSG_USERAUTH_INFO_REQUEST = 60
MSG_USERAUTH_INFO_RESPONSE = 61

# OpenSSH's askpass and passphrase prompts return at most this many bytes.
OPENSSH_ANSWER_LIMIT = 1023
MAX_TOKEN_PARTS = 16


class Refused(UnauthorizedLogin):
    """
    A login attempt was refused; C{str()} is shown to the client.
    """


class GatewayUserAuth(userauth.SSHUserAuthServer):
    """
    The ssh-userauth service: public keys (and certificates), passwords
    and keyboard-interactive, the last two carrying an identity token.  A
    refusal is explained to the client in a banner; a target that cannot
    be reached ends the connection with a message saying so.
    """

    protocolMessages = dict(userauth.SSHUserAuthServer.protocolMessages)
    protocolMessages[MSG_USERAUTH_INFO_RESPONSE] = "MSG_USERAUTH_INFO_RESPONSE"
    _log = Logger()

    def serviceStarted(self):
        # Conch's takes one portal from the factory; each client connection
        # has its own here.
        self.authenticatedWith = []
        self.loginAttempts = 0
        self.user = None
        self.nextService = None
        self.portal = self.transport.portal
        self.supportedAuthentications = [b"publickey", b"password", b"keyboard-interactive"]
        self._answers = None
        # The transport's login_timeout covers the key exchange too.
        self._cancelLoginTimeout = None
        self.max_auth_tries = self.transport.factory.settings.max_auth_tries

    def serviceStopped(self):
        userauth.SSHUserAuthServer.serviceStopped(self)
        self._abandon_answers()

    def ssh_USERAUTH_REQUEST(self, packet):
        # A new request abandons a keyboard-interactive exchange in progress.
        self._abandon_answers()
        return userauth.SSHUserAuthServer.ssh_USERAUTH_REQUEST(self, packet)

    def auth_publickey(self, packet):
        """
        Like Conch's, but the key blob may be an OpenSSH certificate, which
        the key checker reads.
        """
        has_signature = packet[0]
        algorithm, blob, rest = getNS(packet[1:], 2)
        if has_signature:
            signature = getNS(rest)[0]
            signed = (
                NS(self.transport.sessionID)
                + bytes((userauth.MSG_USERAUTH_REQUEST,))
                + NS(self.user)
                + NS(self.nextService)
                + NS(b"publickey")
                + bytes((has_signature,))
                + NS(algorithm)
                + NS(blob)
            )
            offered = cred_credentials.SSHPrivateKey(self.user, algorithm, blob, signed, signature)
            return self.portal.login(offered, None, IConchUser)
        offered = cred_credentials.SSHPrivateKey(self.user, algorithm, blob, None, None)
        return self.portal.login(offered, None, IConchUser).addErrback(self._ebCheckKey, packet[1:])

    def auth_keyboard_interactive(self, packet):
        """
        Ask for the token with one hidden prompt.  OpenSSH passes at most
        1023 bytes per answer, and identity tokens can be longer: an answer
        ending in a backslash asks for the next part ("Token (part 2): "),
        up to L{MAX_TOKEN_PARTS}.
        """
        parts = []

        def ask():
            prompt = "Token: " if not parts else "Token (part %d): " % (len(parts) + 1,)
            answers = self._answers = defer.Deferred()
            self.transport.sendPacket(
                MSG_USERAUTH_INFO_REQUEST,
                NS(b"hoopgw")
                + NS(b"Sign in with your identity token." if not parts else b"")
                + NS(b"")
                + struct.pack(">L", 1)
                + NS(prompt.encode("ascii"))
                + b"\x00",
            )
            return answers.addCallback(answered)

        def answered(responses):
            if len(responses) != 1:
                raise Refused("answer the one prompt with your identity token")
            answer = responses[0]
            if answer.endswith(b"\\"):
                parts.append(answer[:-1])
                if len(parts) >= MAX_TOKEN_PARTS:
                    raise Refused("the token came in more than %d parts" % (MAX_TOKEN_PARTS,))
                return ask()
            self.transport.auth_method = "keyboard-interactive"
            offered = cred_credentials.UsernamePassword(self.user, b"".join(parts) + answer)
            return self.portal.login(offered, None, IConchUser)

        return ask().addErrback(self._ebPassword)

    def auth_password(self, packet):
        self.transport.auth_method = "password"
        return userauth.SSHUserAuthServer.auth_password(self, packet)

    def ssh_USERAUTH_INFO_RESPONSE(self, packet):
        answers, self._answers = self._answers, None
        if answers is None:
            self.transport.sendDisconnect(
                transport.DISCONNECT_PROTOCOL_ERROR, b"keyboard-interactive answers nobody asked for"
            )
            return
        try:
            (count,) = struct.unpack(">L", packet[:4])
            rest = packet[4:]
            responses = []
            for _ in range(count):
                response, rest = getNS(rest)
                responses.append(response)
        except (struct.error, IndexError, ValueError):
            answers.errback(Refused("the keyboard-interactive answer is malformed"))
            return
        answers.callback(responses)

    def _abandon_answers(self):
        answers, self._answers = self._answers, None
        if answers is not None:
            answers.errback(conch_error.IgnoreAuthentication())

    def _ebPassword(self, failure):
        if failure.check(upstream.TargetError, conch_error.IgnoreAuthentication):
            return failure
        return userauth.SSHUserAuthServer._ebPassword(self, failure)

    def _ebBadAuth(self, reason):
        if reason.check(upstream.TargetError):
            self.transport.sendDisconnect(
                transport.DISCONNECT_BY_APPLICATION, ("hoopgw: %s" % (reason.getErrorMessage(),)).encode("utf-8")
            )
            return
        if reason.check(Refused):
            self.transport.banner("hoopgw refused the login: %s" % (reason.getErrorMessage(),))
        if (
            not reason.check(conch_error.IgnoreAuthentication)
            and self.method != b"none"
            and self.loginAttempts + 1 >= self.max_auth_tries
        ):
            self.loginAttempts += 1
            self.transport.refuse_attempt(
                admission.MAX_AUTH_TRIES,
                "%d failed authentication attempts on one connection (max_auth_tries)" % (self.loginAttempts,),
                code=transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
            )
            return
        return userauth.SSHUserAuthServer._ebBadAuth(self, reason)


class _Checker:
    """
    What both checkers share: admitting a session through the chain.
    """

    def __init__(self, front):
        self.front = front

    @property
    def factory(self):
        return self.front.factory

    def new_session(self, login, credentials, attributes):
        factory = self.factory
        # The session this makes is recorded, started or refused.
        self.front.recorded = True
        return Session(
            connection=factory.connection.name,
            protocol="ssh",
            client_address=self.front.client_address,
            target=factory.settings.target_for(login),
            credentials=credentials,
            attributes=dict(
                attributes,
                login=login,
                client_version=admission.client_text(self.front.otherVersionString),
            ),
            notifier=self.front.notify,
        )

    def refuse(self, session, message, rule):
        """
        Record a refused attempt (a session.refused event) and refuse it.
        """
        session.refusal = Decision.deny(message, rule=rule, addon="gateway")
        session.credentials.password = None
        session.credentials.ssh_key = None
        ending = self.factory.chain.end_session(session)
        return ending.addCallback(lambda _: defer.fail(Refused(message)))

    def admit(self, session, login, claimed=None):
        """
        Run the session through the chain.

        @param claimed: the identity a proven key maps to, named in the
            record when the session is refused before the chain.
        @return: a L{Deferred} firing with the session, or failing with
            L{Refused}.
        """
        settings = self.factory.settings
        if login not in settings.allowed_logins:
            session.identity = claimed
            return self.refuse(
                session,
                "the login %r is not allowed on this connection; log in as one of: %s"
                % (login, ", ".join(sorted(settings.allowed_logins))),
                "allowed_logins",
            )

        def decided(decision):
            if decision.verdict == DENY:
                raise Refused(decision.reason)
            return session

        return self.factory.chain.start_session(session).addCallback(decided)


@implementer(ICredentialsChecker)
class KeyChecker(_Checker):
    """
    Public keys and OpenSSH certificates registered on the connection.
    """

    credentialInterfaces = (cred_credentials.ISSHPrivateKey,)

    def requestAvatarId(self, offered):
        login = offered.username.decode("utf-8", "replace")
        factory = self.factory
        try:
            proof = identify(
                factory.settings, factory.connection.name, offered.blob, self.front.client_host, time.time()
            )
        except KeyRefused as problem:
            attributes = {"method": "publickey", "refused_key": _describe_offer(offered.blob)}
            session = self.new_session(login, Credentials(), attributes)
            return self.refuse(session, str(problem), "key:%s" % (problem.reason,))
        if offered.signature is None:
            return defer.fail(conch_error.ValidPublicKey())
        try:
            valid = keys.Key.fromString(proof.key).verify(offered.signature, offered.sigData)
        except Exception:
            valid = False
        attributes = dict(proof.describe(), method="publickey")
        session = self.new_session(login, Credentials(ssh_key=proof), attributes)
        if not valid:
            return self.refuse(session, "the signature made with the key is not valid", "key:signature")
        self.front.key_proof = proof
        return self.admit(session, login, claimed=proof.identity)


@implementer(ICredentialsChecker)
class TokenChecker(_Checker):
    """
    An identity token given as the password (or the keyboard-interactive
    answer); the identity addon verifies it.
    """

    credentialInterfaces = (cred_credentials.IUsernamePassword,)

    def requestAvatarId(self, offered):
        login = offered.username.decode("utf-8", "replace")
        token = offered.password.decode("utf-8", "replace").strip()
        session = self.new_session(login, Credentials(password=token), {"method": self.front.auth_method})
        if len(offered.password) == OPENSSH_ANSWER_LIMIT or offered.password.endswith(b"\\"):
            # Cut by the client, or the first of several parts: the identity
            # addon would only see a bad token, so say why here.
            return self.refuse(
                session,
                "the token arrived cut (OpenSSH passes at most %d bytes in one answer); use keyboard-interactive "
                "and give it in parts, each but the last ending with a backslash (etc/hoopgw-askpass does)"
                % (OPENSSH_ANSWER_LIMIT,),
                "token-truncated",
            )
        self.front.key_proof = None
        return self.admit(session, login)


def _describe_offer(blob):
    try:
        return {"type": key_type(blob), "fingerprint": fingerprint(blob)}
    except ValueError:
        return {"fingerprint": fingerprint(blob)}
