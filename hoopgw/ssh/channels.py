"""
The channels of an admitted SSH session.  A client's session channel
carries one command (exec, shell or the sftp subsystem, made from its
requests by L{hoopgw.ssh.requests}): it goes through the chain, and only
when allowed is a session channel opened on the target and the request
replayed there.  The target's stdout and stderr come back through the
chain's result hooks (L{hoopgw.ssh.output}: masking holds bytes back
across chunks and releases them on the final chunk), the exit status is
passed through and recorded, and a terminal session is kept as an
asciicast.
"""

import struct

from twisted.conch.error import ConchError
from twisted.conch.ssh import connection
from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import admission
from hoopgw import cast as casts
from hoopgw.model import DENIED, ERROR, INTERRUPTED
from hoopgw.ssh import certificates
from hoopgw.ssh.commands import forward_command
from hoopgw.ssh.output import TargetOutput
from hoopgw.ssh.publickeys import Reader
from hoopgw.ssh.relay import RelayChannel
from hoopgw.ssh.requests import SessionRequests
from hoopgw.ssh.sftp import SftpRelay


# The exit status a client sees for a command the gateway denied, as a
# shell reports a command it may not execute.
DENIED_EXIT_STATUS = 126


class ChannelRefused(Exception):
    """
    A channel open the gateway refuses; C{text} is shown to the client.
    """

    def __init__(self, code, text):
        Exception.__init__(self, code, text)
        self.code = code
        self.text = text


class TargetChannel(RelayChannel):
    """
    The target-facing half of a relayed channel: what arrives is handed
    to the client-facing half (C{front}), and a full window on either side
    holds the other.
    """

    def __init__(self, front, name, **kwargs):
        RelayChannel.__init__(self, **kwargs)
        self.name = name
        self.front = front
        self.opened = defer.Deferred()

    def channelOpen(self, data):
        self.opened.callback(self)

    def openFailed(self, reason):
        if isinstance(reason, ConchError):
            text = reason.args[0]
        else:
            text = str(reason)
        # The target's words reach the client and the record: masked like any text from it.
        self.opened.errback(ConchError(admission.client_text(text)))

    def dataReceived(self, data):
        self.front.target_output("stdout", data)

    def extReceived(self, code, data):
        if code == connection.EXTENDED_DATA_STDERR:
            self.front.target_output("stderr", data)

    def eofReceived(self):
        self.front.target_eof()

    def requestReceived(self, name, data):
        if name in (b"exit-status", b"exit-signal"):
            self.front.target_exit(name, data)
            return 1
        return 0

    def closed(self):
        self.front.target_closed()

    def blocked(self):
        self.front.hold("target-full")

    def drained(self):
        self.front.release("target-full")


# How long a client's CLOSE waits for the target's exit status and CLOSE:
# sshd sends them once the command has exited, however long it runs.
CLOSE_WAIT = 300.0


class _ClientSide(RelayChannel):
    """
    A channel to the client fed by a channel to the target
    (C{self.target}, once open): a full client window holds the target.
    """

    target = None

    def close_target(self):
        if self.target is not None and not self.target.localClosed:
            self.target.send_close()

    def blocked(self):
        if self.target is not None:
            self.target.hold("client-full")

    def drained(self):
        if self.target is not None:
            self.target.release("client-full")


class SessionChannel(_ClientSide):
    """
    A client's session channel: its requests (L{SessionRequests}) make one
    exec, shell or sftp command, which the chain decides and, if allowed,
    is replayed on a new session channel on the target; the client's bytes
    go to the target, the target's come back through the chain
    (L{TargetOutput}), and the command's outcome is recorded.
    """

    log = Logger()

    def __init__(self, avatar, **kwargs):
        RelayChannel.__init__(self, avatar=avatar, **kwargs)
        self.session = avatar.session
        self.chain = avatar.chain
        self.settings = avatar.settings
        self.command = None
        self.target = None
        self.sftp = None
        self.cast = None
        self.started = False
        self.finished = False
        self.requests = SessionRequests(self)
        self.output = TargetOutput(self)
        self._early = []
        self._client_eof = False
        self._after_reply = []
        self._deciding = None
        self._stdin = 0
        self.client_closed = False
        self._close_wait = None
        # Nothing the client sends is relayed before the command is allowed.
        self.hold("starting")

    def channelOpen(self, data):
        self.avatar.channels.add(self)

    def requestReceived(self, request_type, data):
        return self.requests.received(request_type, data)

    def replied(self):
        """
        The reply to a request has gone out (see L{GatewayConnection}):
        what must follow it can go now.
        """
        actions, self._after_reply = self._after_reply, []
        for action in actions:
            action()

    def running(self):
        """
        Whether the command runs on the target, which can still be told
        something (a window change, a signal).
        """
        return self.started and self.target is not None and not self.target.localClosed

    # Deciding and starting.

    def start(self, command, request, payload, denial=None):
        """
        Decide C{command}, which C{request} (C{exec}, C{shell},
        C{subsystem}, with C{payload}) asked for: refused at once with
        C{denial}, else by the chain; run on the target if allowed.

        @return: the request's answer (1 or 0), or a L{Deferred} firing
            with it.
        """
        self.command = command
        command.facts.setdefault("login", self.avatar.login)
        if denial is not None:
            command.decision = denial
            return self._refused(request)
        self.avatar.pending.add(self)
        decision = self.chain.submit(self.session, command)
        if isinstance(decision, defer.Deferred):
            self._deciding = decision
            return decision.addCallback(self._decided, request, payload)
        return self._decided(decision, request, payload)

    def _decided(self, decision, request, payload):
        self._deciding = None
        self.avatar.pending.discard(self)
        if self.localClosed or self.remoteClosed:
            self.command.outcome.update(status=INTERRUPTED, reason="the client left before the decision")
            self.finish()
            return 0
        if decision.denied:
            return self._refused(request)
        return self._open_target(request, payload)

    def _refused(self, request):
        decision = self.command.decision
        self.command.outcome.update(status=DENIED)
        self.finish()
        what = {b"exec": "command", b"shell": "shell", b"subsystem": "subsystem"}[request]
        message = "hoopgw denied this %s: %s" % (what, decision.reason)
        if decision.rule:
            message += " (rule %s)" % (decision.rule,)
        message = (message + "\r\n").encode("utf-8")

        if request == b"subsystem" and self.command.kind != "sftp":
            self._after_reply.append(self.send_close)
            return 0

        def tell():
            self.send_stderr(message)
            self.send_request(b"exit-status", struct.pack(">L", DENIED_EXIT_STATUS))
            self.send_eof()
            self.send_close()

        self._after_reply.append(tell)
        return 1

    def _open_target(self, request, payload):
        target_conn = self.avatar.target
        if target_conn is None or target_conn.closed:
            self.command.outcome.update(status=ERROR, error="the target connection is gone")
            self.finish()
            return 0
        self.target = TargetChannel(self, b"session")
        opening = target_conn.open(self.target)
        opening.addCallback(self._replay, request, payload)
        return opening.addCallbacks(self._target_started, self._target_refused, errbackArgs=(request,))

    @defer.inlineCallbacks
    def _replay(self, _, request, payload):
        target = self.target
        conn = target.conn
        for raw in self.requests.env:
            conn.sendRequest(target, b"env", raw)
        pty = self.requests.pty
        if pty is not None:
            try:
                yield conn.sendRequest(target, b"pty-req", pty["raw"], wantReply=1)
            except ConchError:
                raise ConchError("the target refused to allocate a pty")
        try:
            yield conn.sendRequest(target, request, payload, wantReply=1)
        except ConchError:
            raise ConchError("the target refused the %s request" % (request.decode("ascii"),))

    def _target_started(self, _):
        if self.localClosed or self.remoteClosed:
            self.target.send_close()
            self.command.outcome.update(status=INTERRUPTED, reason="the client left before the command started")
            self.finish()
            return 0
        self.started = True
        command = self.command
        pty = self.requests.pty
        if command.kind == "sftp":
            self.sftp = SftpRelay(self)
        elif command.kind == "shell" or pty is not None:
            pty = pty or {}
            self.cast = casts.Recorder(
                pty.get("cols", 80),
                pty.get("rows", 24),
                term=pty.get("term"),
                title="%s as %s on %s" % (self.session.identity.subject, self.avatar.login, self.settings.target_name),
                command=command.redacted if command.kind == "exec" else None,
                limit=self.settings.max_cast_bytes,
            )
        early, self._early = self._early, []
        for data in early:
            self.dataReceived(data)
        if self._client_eof:
            self.target.send_eof()
        self.release("starting")
        return 1

    def _target_refused(self, failure, request):
        reason = failure.getErrorMessage() if failure.check(ConchError) else "the target failed: %s" % (
            failure.getErrorMessage(),
        )
        if not failure.check(ConchError):
            self.log.failure("Starting a command on the target failed", failure)
        if self.localClosed or self.remoteClosed:
            self.command.outcome.update(status=INTERRUPTED, reason="the client left before the command started")
        else:
            self.command.outcome.update(status=ERROR, error=reason)
        self.finish()
        if self.target is not None:
            self.target.send_close()
        message = ("hoopgw: %s\r\n" % (reason,)).encode("utf-8")

        def tell():
            self.send_stderr(message)
            self.send_close()

        self._after_reply.append(tell)
        return 0

    # Client to target.

    def dataReceived(self, data):
        if not self.started:
            self._early.append(data)
            return
        if self.sftp is not None:
            self.sftp.client_data(data)
            return
        self._stdin += len(data)
        if self.cast is not None:
            self.cast.input(data)
        if not self.target.localClosed:
            self.target.send_data(data)

    def extReceived(self, code, data):
        # A client has no stderr to send; nothing of this kind is relayed.
        pass

    def eofReceived(self):
        self._client_eof = True
        if self.started and not self.target.localClosed:
            self.target.send_eof()

    def closeReceived(self):
        if self._target_may_still_answer():
            # An OpenSSH client that has sent and received EOF closes the
            # channel, and still reads the exit status until the server's
            # CLOSE, which sshd sends after it.  So does the gateway: the
            # target is told, and the client's CLOSE is answered once the
            # target's exit status and CLOSE have come through (or
            # CLOSE_WAIT has passed).
            self.client_closed = True
            self.close_target()
            self._close_wait = self.avatar.factory.reactor.callLater(CLOSE_WAIT, self._close_waited)
            return
        self.close_target()
        if self.command is not None and not self.finished and not self.output.done:
            self.command.outcome.update(status=INTERRUPTED, reason="the client closed the channel")
        RelayChannel.closeReceived(self)

    def _target_may_still_answer(self):
        return (
            self.command is not None
            and self.started
            and self.sftp is None
            and not self.finished
            and not self.output.done
            and self.target is not None
            and not self.target.remoteClosed
        )

    def _close_waited(self):
        self._close_wait = None
        self.output.stop()
        if self.command is not None and not self.finished:
            self.command.outcome.setdefault("status", INTERRUPTED)
            self.command.outcome.setdefault("reason", "the client closed the channel")
        self.send_close()

    def closed(self):
        if self._close_wait is not None and self._close_wait.active():
            self._close_wait.cancel()
        self.avatar.channels.discard(self)
        self.avatar.pending.discard(self)
        if self._deciding is not None:
            # Cancelling the decision finishes the command as interrupted.
            self._deciding.cancel()
        self.close_target()
        if self.sftp is not None:
            self.sftp.close("the channel closed")
        if self.command is None or self.finished:
            return
        if self.target is not None and not self.started:
            # Still starting on the target: that path finishes it.
            return
        self.command.outcome.setdefault("status", "interrupted")
        self.command.outcome.setdefault("reason", "the client disconnected")
        self.finish()

    # Target to client: see L{TargetOutput}.

    def target_output(self, stream, data):
        self.output.output(stream, data)

    def target_eof(self):
        self.output.eof()

    def target_exit(self, name, data):
        self.output.exit(name, data)

    def target_closed(self):
        self.output.closed()

    # Outcome.

    def finish(self):
        """
        The command is over: its byte counts (or sftp operations) go in its
        outcome, its terminal recording is stored, and the chain is told.
        """
        if self.finished or self.command is None:
            return
        self.finished = True
        command = self.command
        if self.started:
            if command.kind == "sftp":
                command.outcome["operations"] = self.sftp.operations if self.sftp is not None else 0
            else:
                command.outcome.update(
                    stdin_bytes=self._stdin,
                    stdout_bytes=self.output.counts["stdout"],
                    stderr_bytes=self.output.counts["stderr"],
                )
        if self.cast is None:
            self.chain.finish(self.session, command)
            return
        # The recording is durable, and its digest in the outcome, before
        # the command's end event commits it.
        writing = casts.commit(self.avatar.store, self.session, command, self.cast)
        writing.addCallback(lambda _: self.chain.finish(self.session, command))
        self.avatar.wait_for(writing)

    def sftp_broken(self, reason):
        self.log.warn("Closing an sftp channel: {reason}", reason=reason)
        if self.command is not None:
            self.command.outcome.update(status=ERROR, error=reason)
        self.close_target()
        self.send_close()
        if self.sftp is not None:
            self.sftp.close(reason)
        self.finish()

    def internal_error(self, failure):
        self.log.failure("Internal error in an SSH channel", failure)
        if self.command is not None:
            self.command.outcome.update(status=ERROR, error="internal error: %s" % (failure.getErrorMessage(),))
        self.close_target()
        self.send_stderr(b"\r\nhoopgw failed internally and closed this channel; the failure is logged\r\n")
        self.send_close()
        self.finish()

    def notify(self, text):
        """
        Tell the client something about its pending command (an approval it
        waits for), on stderr.
        """
        if not self.localClosed:
            if not text.startswith("hoopgw:"):
                text = "hoopgw: " + text
            self.send_stderr(("%s\r\n" % (text,)).encode("utf-8"))


class ForwardChannel(_ClientSide):
    """
    A client's direct-tcpip channel (ssh -L, ssh -W), relayed to the same
    channel type on the target once the chain allowed it.  Tunnelled bytes
    are counted, not inspected.
    """

    def __init__(self, avatar, command, **kwargs):
        RelayChannel.__init__(self, avatar=avatar, **kwargs)
        self.session = avatar.session
        self.chain = avatar.chain
        self.command = command
        self.target = None
        self.finished = False
        self._counts = {"stdout": 0, "stdin": 0}

    def channelOpen(self, data):
        self.avatar.channels.add(self)

    def dataReceived(self, data):
        self._counts["stdin"] += len(data)
        if self.target is not None and not self.target.localClosed:
            self.target.send_data(data)

    def eofReceived(self):
        if self.target is not None:
            self.target.send_eof()

    def target_output(self, stream, data):
        self._counts["stdout"] += len(data)
        self.send_data(data)

    def target_eof(self):
        self.send_eof()

    def target_exit(self, name, data):
        # A forwarded connection has no exit status.
        pass

    def target_closed(self):
        self.send_close()
        self._finish("closed")

    def closed(self):
        self.avatar.channels.discard(self)
        self.close_target()
        self._finish("closed")


    def _finish(self, status):
        if self.finished:
            return
        self.finished = True
        self.command.outcome.setdefault("status", status)
        self.command.outcome.update(bytes_to_target=self._counts["stdin"], bytes_from_target=self._counts["stdout"])
        self.chain.finish(self.session, self.command)


def open_forward(avatar, window, max_packet, data):
    """
    A client asks for a direct-tcpip channel: refused (and recorded) unless
    the connection allows forwarding and the chain allows this one.

    @return: a L{Deferred} firing with a L{ForwardChannel} ready to
        confirm, or failing with L{ChannelRefused}.
    """
    reader = Reader(data)
    host = reader.text()
    port = reader.uint32()
    originator = reader.text()
    originator_port = reader.uint32()
    command = forward_command(host, port, originator, originator_port)
    if not avatar.settings.port_forwarding:
        avatar.refuse(command, "port forwarding is not allowed on this connection", "port_forwarding")
        raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED, "hoopgw does not allow port forwarding here")
    certificate = avatar.certificate
    if certificate is not None and not certificates.permits(certificate, "permit-port-forwarding"):
        avatar.refuse(command, "the certificate does not permit port forwarding", "certificate:permit-port-forwarding")
        raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED, "your certificate does not permit forwarding")
    decision = avatar.chain.submit(avatar.session, command)
    deciding = defer.maybeDeferred(lambda: decision)
    return deciding.addCallback(_forward_decided, avatar, command, window, max_packet, data)


def _forward_decided(decision, avatar, command, window, max_packet, data):
    if decision.denied:
        command.outcome.update(status=DENIED)
        avatar.chain.finish(avatar.session, command)
        raise ChannelRefused(
            connection.OPEN_ADMINISTRATIVELY_PROHIBITED, "hoopgw denied this forward: %s" % (decision.reason,)
        )
    front = ForwardChannel(avatar, command, remoteWindow=window, remoteMaxPacket=max_packet)
    front.target = TargetChannel(front, b"direct-tcpip")

    def failed(reason):
        command.outcome.update(status=ERROR, error=reason)
        avatar.chain.finish(avatar.session, command)
        raise ChannelRefused(connection.OPEN_CONNECT_FAILED, "the target could not open it: %s" % (reason,))

    if avatar.target is None or avatar.target.closed:
        failed("the target connection is gone")
    return avatar.target.open(front.target, data).addCallbacks(
        lambda _: front, lambda failure: failed(failure.getErrorMessage())
    )
