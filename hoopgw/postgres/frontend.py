"""
The PostgreSQL front end: speaks the server side of the wire protocol to
clients, turns every statement into a L{Command} for the addon chain, and
relays what the chain allows to the target, with back-pressure both ways.
"""

import collections
import os
import struct

from twisted.internet import defer, protocol
from twisted.logger import Logger

from hoopgw.flow import Valve
from hoopgw.memorytls import TLSFailed, server_context
from hoopgw.model import DENIED, DENY, INTERRUPTED, Decision
from hoopgw.options import ConfigError
from hoopgw.sql import split_statements
from hoopgw.postgres.commands import function_call_command, sql_command
from hoopgw.postgres import upstream as upstream_module
from hoopgw.postgres import wire
from hoopgw.postgres.startup import (
    CLOSED,
    MAX_PASSWORD_BYTES,
    OPENING,
    PASSWORD,
    READY,
    STARTUP,
    Admission,
    Startup,
    StartupError,
)
from hoopgw.postgres.replies import TargetReplies
from hoopgw.postgres.replies import send as _send


# Sent to the target in place of a denied statement: it fails at once and
# has no effect, so the target's transaction ends up exactly as if the
# denied statement had failed there (aborted, or the implicit transaction
# of a pipeline rolled back), and the error arrives in order.
DENIAL_SQL = "SELECT 1/0 AS hoopgw_statement_denied"

INBOX_HIGH_WATER = 256
# How long a stopping gateway lets a client read its goodbye before
# closing the connection regardless.
CLOSE_GRACE = 5.0

_STARTUP, _PASSWORD, _OPENING, _READY, _CLOSED = STARTUP, PASSWORD, OPENING, READY, CLOSED


class Pending:
    """
    Something sent to the target whose answer is still to come.
    """

    __slots__ = ("kind", "commands", "index", "decision", "target", "failed")

    def __init__(self, kind, commands=(), decision=None, target=None):
        self.kind = kind
        self.commands = list(commands)
        self.index = 0
        self.decision = decision
        self.target = target
        self.failed = False

    @property
    def command(self):
        return self.commands[self.index] if self.index < len(self.commands) else None


class Portal:
    __slots__ = ("sql", "statement", "parameters", "formats", "result_formats", "columns")

    def __init__(self, sql, statement, parameters, formats, result_formats, columns):
        self.sql = sql
        self.statement = statement
        self.parameters = parameters
        self.formats = formats
        self.result_formats = result_formats
        self.columns = columns


class PostgresFrontend(protocol.Protocol):
    """
    One client connection.
    """

    log = Logger()

    def __init__(self, factory):
        self.factory = factory
        self.settings = factory.settings
        self.chain = factory.chain
        self.session = None
        self.upstream = None
        self.backend_key = None
        self._state = _STARTUP
        self._pieces = []
        self._buffered = 0
        self._tls_layer = None
        self.startup = None
        self._inbox = collections.deque()
        self._waiting = None
        self._skipping = False
        # The target skips the client's messages up to the next Sync.
        self._target_skipping = False
        self._expected = collections.deque()
        self._statements = {}
        self._portals = {}
        self._result_hooks = self.chain.has("result_received")
        # Parse each statement only for a chain whose addons read what it
        # says (block, approve, mask): identity and record alone need not.
        self._classify = self.chain.reads("sql")
        self.replies = TargetReplies(self, lambda: self._state == _CLOSED)
        # How many bytes the client's next message needs to be whole.
        self._client_needed = 5
        self._ended = None
        self._admitting = False
        self._to_upstream = []
        # Who waits for this connection to close and its session's end to
        # be recorded (a stopping gateway).
        self._closing = []

    # Connection and framing.

    def connectionMade(self):
        _no_delay(self.transport)
        self.valve = Valve(self.transport)
        peer = self.transport.getPeer()
        host = getattr(peer, "host", peer)
        self.client_address = "%s:%s" % (host, getattr(peer, "port", ""))
        self.startup = Startup(self)
        self.startup.connected(str(host))

    def dataReceived(self, data):
        if self._state == _CLOSED:
            return
        if self._tls_layer is not None:
            try:
                data = self._tls_layer.receive(data)
            except TLSFailed as error:
                self.log.info("TLS with client {client} failed: {error}", client=self.client_address, error=str(error))
                self._tls_layer.transport.loseConnection()
                self._state = _CLOSED
                self.startup.tls_failed(error)
                return
            if not data:
                return
        self._pieces.append(data)
        self._buffered += len(data)
        if self._state == _STARTUP:
            self.startup.data()
        elif self._state in (_PASSWORD, _READY, _OPENING):
            self._client_data()

    def _take(self):
        buffer = b"".join(self._pieces) if len(self._pieces) != 1 else self._pieces[0]
        self._pieces = []
        self._buffered = 0
        return buffer

    def _keep(self, rest):
        if rest:
            self._pieces = [rest]
            self._buffered = len(rest)

    def _client_data(self):
        """
        Split what the client sent into messages and queue them.  A large
        message arriving in many reads is joined once it is whole.
        """
        if self._buffered < self._client_needed:
            return
        if self._client_needed >= wire.LARGE_MESSAGE and self._pieces[0][:1] == b"d":
            # Copy data the gateway only relays: passed on as it was read.
            message, self._pieces = wire.split_pieces(self._pieces, self._client_needed)
            self._buffered -= self._client_needed
            self._inbox.append((b"d", tuple(message), 0, self._client_needed))
        self._client_needed = 5
        buffer = self._take()
        position = 0
        end = len(buffer)
        # Before login only a token is expected: a client not logged in
        # cannot make the gateway hold a message of max_message_bytes.
        maximum = self.settings.max_message_bytes if self._state != _PASSWORD else MAX_PASSWORD_BYTES
        inbox = self._inbox
        while end - position >= 5:
            length = wire.unpack_int32(buffer, position + 1)
            if length < 4 or length > maximum:
                # A length under 4 does not even cover the length field:
                # a framing error, not a message too large.
                short = length < 4
                if self._state == _PASSWORD:
                    self.startup.refuse(
                        StartupError(
                            "08P01",
                            "postgres:password-length",
                            ("a password message's length field says %d bytes, less than its own 4" if short else
                             "a password message of %d bytes is larger than the gateway accepts before login")
                            % (length,),
                        )
                    )
                    return
                if short:
                    self._protocol_error("a message's length field says %d bytes, less than its own 4" % (length,))
                else:
                    self._protocol_error("a message of %d bytes is larger than the gateway accepts" % (length,), "54000")
                return
            stop = position + 1 + length
            if stop > end:
                self._client_needed = stop - position
                break
            inbox.append((buffer[position : position + 1], buffer, position, stop))
            position = stop
        self._keep(buffer[position:])
        if self._state == _PASSWORD:
            self.startup.password()
        elif self._state == _READY:
            self._pump()

    def _protocol_error(self, text, code="08P01"):
        """
        A logged-in client broke the protocol: FATAL, and the session's end
        in the record says how.
        """
        if self.session is not None:
            self.session.attributes.setdefault("end_reason", "protocol violation: %s" % (text,))
        self._fatal("08P01", text, code)

    def logged_in(self, upstream):
        """
        The target session is open: relay between it and the client.
        """
        self.upstream = upstream
        upstream.receiver = self
        self.upstream_valve = Valve(upstream.transport)
        self.transport.registerProducer(self.upstream_valve, True)
        upstream.transport.registerProducer(self.valve, True)
        self.backend_key = self.factory.register(self)
        out = [wire.authentication_ok()]
        for name, value in upstream.statuses.items():
            out.append(wire.parameter_status(name, value))
        out.append(wire.backend_key_data(*self.backend_key))
        out.append(wire.ready_for_query(b"I"))
        self.transport.writeSequence(out)
        self._state = _READY
        self._pump()

    def _notify(self, text):
        if self._state != _CLOSED:
            self.transport.write(wire.notice_response(text))

    # Client messages.

    def _pump(self):
        """
        Handle queued client messages in order; a command waiting for its
        decision holds back everything after it.
        """
        inbox = self._inbox
        while inbox and self._waiting is None and self._state == _READY:
            kind, buffer, start, stop = inbox.popleft()
            try:
                waiting = self._client_message(kind, buffer, start, stop)
            except (struct.error, ValueError, IndexError):
                self._protocol_error("a %r message from the client is malformed" % (kind.decode("ascii", "replace"),))
                return
            if waiting is not None:
                self._waiting = waiting
                waiting.addCallback(self._resume).addErrback(self._internal_error)
        # Messages before a command that waits for its decision are held
        # back with it: they go out together, in one segment.
        if self._waiting is None:
            self._send_held()
        if len(inbox) > INBOX_HIGH_WATER:
            self.valve.pause("inbox")
        else:
            self.valve.resume("inbox")

    def _send_held(self):
        if self._to_upstream and self.upstream is not None:
            _send(self.upstream.transport, self._to_upstream)
            self._to_upstream = []

    def _resume(self, _):
        self._waiting = None
        # The decided command goes out now with what was held before it,
        # not when the inbox is next empty: a client that keeps its inbox
        # full (pipelining without pause) would otherwise have nothing
        # sent to the target at all, its statements piling up unsent.
        self._send_held()
        self._pump()

    def _forward(self, data):
        self._to_upstream.append(data)

    def _client_message(self, kind, buffer, start, stop):
        if kind == b"d" or kind == b"c" or kind == b"f":
            if isinstance(buffer, tuple):
                self._to_upstream.extend(buffer)
            else:
                self._forward(buffer[start:stop])
            return None
        if self._skipping and kind != b"S" and kind != b"X":
            return None
        payload = buffer[start + 5 : stop]
        if kind == b"Q":
            return self._simple_query(payload, buffer[start:stop])
        if kind == b"P":
            name, sql, _ = wire.parse_parse(payload)
            self._statements[name] = (sql.decode("utf-8", "surrogateescape"), None)
            self._expect(Pending("parse", target=name))
        elif kind == b"B":
            portal, statement, formats, values, result_formats = wire.parse_bind(payload)
            if len(formats) > 1 and len(formats) != len(values):
                return self._skip_to_sync(
                    "bind message has %d parameter formats but %d parameters" % (len(formats), len(values))
                )
            prepared = self._statements.get(statement)
            self._portals[portal] = Portal(
                prepared[0] if prepared else None,
                statement,
                values,
                formats,
                result_formats,
                prepared[1] if prepared else None,
            )
            self._expect(Pending("bind"))
        elif kind == b"E":
            return self._execute(payload, buffer[start:stop])
        elif kind == b"D":
            which, name = wire.parse_target(payload)
            self._expect(Pending("describe", target=(which, name)))
            portal = self._portals.get(name) if which == b"P" else None
            if portal is not None and portal.columns is None:
                # Its RowDescription will come before its rows: nothing to inject.
                portal.columns = []
        elif kind == b"C":
            which, name = wire.parse_target(payload)
            (self._statements if which == b"S" else self._portals).pop(name, None)
            self._expect(Pending("close"))
        elif kind == b"S":
            self._skipping = False
            self._expect(Pending("sync"))
        elif kind == b"H":
            pass
        elif kind == b"F":
            return self._function_call(payload, buffer[start:stop])
        elif kind == b"X":
            self._forward(buffer[start:stop])
            self._state = _CLOSED
            self.session.attributes["end_reason"] = "client terminated the session"
            self.upstream.transport.writeSequence(self._to_upstream)
            self._to_upstream = []
            self._close()
            return None
        else:
            self._protocol_error("unexpected message type %r" % (kind.decode("ascii", "replace"),))
            return None
        self._forward(buffer[start:stop])
        return None

    def _skip_to_sync(self, text):
        """
        A message of the extended protocol the target would refuse as
        PostgreSQL does: ERROR (08P01), then every message up to Sync is
        skipped and the session goes on.  The target runs a statement that
        fails in its place (see L{DENIAL_SQL}), so the transaction ends as
        it would there and the error arrives in order; its error is
        replaced by this one.
        """
        self._forward(wire.query(DENIAL_SQL))
        self._expect(Pending("denied", decision=wire.error_response("08P01", text), target="extended"))
        self._skipping = True
        return None

    def _expect(self, pending):
        """
        Note what the target will answer next, in order.  While the target
        skips to the next Sync after an error in the extended protocol
        (L{TargetReplies} says so when the Sync was not read from the
        client yet), what comes before that Sync gets no answer: it ends,
        not run, as it is sent.
        """
        if self._target_skipping:
            if pending.kind != "sync":
                self.replies.not_run(pending, "an earlier message of the pipeline failed")
                return
            self._target_skipping = False
        self._expected.append(pending)

    def _new_command(self, sql, protocol_name, parse_error=None, parameters=(), formats=()):
        return sql_command(sql, protocol_name, self.session, parse_error, parameters, formats, classify=self._classify)

    def _simple_query(self, payload, raw):
        sql = payload.rstrip(b"\x00").decode("utf-8", "surrogateescape")
        statements, parse_error = split_statements(sql)
        if not statements:
            self._forward(raw)
            self._expect(Pending("query"))
            return None
        commands = [self._new_command(text, "simple", parse_error) for text in statements]
        return _then(self._decide(commands), self._query_decided, commands, raw)

    def _abandoned(self, commands):
        """
        The session closed while these commands waited for their decision
        (the client left during an approval or the record's write-ahead):
        each still ends, interrupted, so that no recorded command is left
        without its end.
        """
        if self.session is None:
            return
        for command in commands:
            if not command.outcome or command.outcome.get("status") is None:
                command.outcome.update(status=INTERRUPTED, reason="the session ended before it finished")
                self.chain.finish(self.session, command)

    def _query_decided(self, decision, commands, raw):
        if self._state != _READY:
            self._abandoned(commands)
            return
        if decision.verdict == DENY:
            self._deny(commands, decision, extended=False)
        else:
            self._forward(raw)
            self._expect(Pending("query", commands))

    def _decide(self, commands, index=0):
        """
        Submit each command to the chain in turn.  The first denial denies
        the rest unasked: none of them will run.

        @return: the first denial or the last decision, or a L{Deferred}
            firing with it.
        """
        while True:
            decision = self.chain.submit(self.session, commands[index])
            if isinstance(decision, defer.Deferred):
                if index + 1 == len(commands):
                    return decision
                return decision.addCallback(self._decide_rest, commands, index)
            if decision.verdict == DENY or index + 1 == len(commands):
                return decision
            index += 1

    def _decide_rest(self, decision, commands, index):
        if decision.verdict == DENY or self._state != _READY:
            return decision
        return self._decide(commands, index + 1)

    def _deny(self, commands, decision, extended):
        """
        Refuse C{commands}: the target runs a statement that fails in their
        place (see L{DENIAL_SQL}), and its error is replaced by ours.
        """
        for command in commands:
            if command.decision is None or command.decision.verdict != DENY:
                command.decision = Decision.deny(
                    "another statement in the same query was denied (%s)" % (decision.reason,),
                    rule=decision.rule,
                    addon=decision.addon,
                    sqlstate=decision.sqlstate,
                )
            command.outcome = {"status": DENIED}
            self.chain.finish(self.session, command)
        self._forward(wire.query(DENIAL_SQL))
        self._expect(Pending("denied", decision=decision, target="extended" if extended else "simple"))
        if extended:
            self._skipping = True

    def _execute(self, payload, raw):
        portal_name, _ = wire.parse_execute(payload)
        portal = self._portals.get(portal_name)
        if portal is None or portal.sql is None:
            command = self._new_command("", "extended")
            command.decision = Decision.deny(
                "Execute names a portal or statement the gateway has not seen prepared; it is refused",
                rule="unknown-portal",
                addon="gateway",
                sqlstate="26000",
            )
            self._deny([command], command.decision, extended=True)
            return None
        command = self._new_command(portal.sql, "extended", None, portal.parameters, portal.formats)
        command.facts["statement"] = portal.statement.decode("utf-8", "replace")
        command.facts["portal"] = portal_name.decode("utf-8", "replace")
        return _then(self.chain.submit(self.session, command), self._execute_decided, command, portal, raw)

    def _execute_decided(self, decision, command, portal, raw):
        if self._state != _READY:
            self._abandoned([command])
            return
        if decision.verdict == DENY:
            self._deny([command], decision, extended=True)
        else:
            if self._result_hooks and portal.columns is None:
                # Result hooks need the columns' names and types; ask for
                # them, and keep the answer from the client.
                name = command.facts["portal"].encode("utf-8", "surrogateescape")
                self._forward(wire.message(b"D", b"P" + wire.cstring(name)))
                self._expect(Pending("describe", target=(b"P", name), decision="injected"))
            self._forward(raw)
            pending = Pending("execute", [command])
            pending.target = portal
            self._expect(pending)

    def _function_call(self, payload, raw):
        oid, formats, values = wire.parse_function_call(payload)
        command = function_call_command(oid, formats, values)
        return _then(self.chain.submit(self.session, command), self._function_decided, command, raw)

    def _function_decided(self, decision, command, raw):
        if self._state != _READY:
            self._abandoned([command])
            return
        if decision.verdict == DENY:
            self._deny([command], decision, extended=False)
        else:
            self._forward(raw)
            self._expect(Pending("function", [command]))

    # Target messages: see L{TargetReplies}.

    def upstream_data(self, data):
        self.replies.data_received(data)

    def upstream_lost(self, reason):
        if self._state == _CLOSED:
            return
        self.session.attributes.setdefault("end_reason", "the target closed the connection")
        self._fatal("57P01", "the target database closed the connection")

    # Cancel and teardown.

    def cancel(self, via=None):
        """
        The client sent a CancelRequest with this session's key: stop a
        pending decision, or ask the target to cancel what runs.

        @param via: the gateway process the CancelRequest reached, when it
            was another one sharing the store (hoopgw.replicas).
        """
        command = None
        if self._waiting is not None:
            self._waiting.cancel()
        elif self.upstream is not None and self.upstream.backend_key is not None:
            upstream_module.cancel(self.factory.reactor, self.settings.target, self.upstream.backend_key).addErrback(
                lambda failure: self.log.warn(
                    "Passing session {session}'s cancel request on to its target failed: {why}",
                    session=self.session.id if self.session is not None else None, why=failure.getErrorMessage()))
            head = self._expected[0] if self._expected else None
            command = head.command if head is not None else None
        if self.session is not None:
            # The record addon writes it; an addon that fails is logged by the chain.
            self.chain.cancel(self.session, command, via)

    def _fatal(self, sqlstate, text, code=None):
        """
        Send a FATAL error and close the connection.
        """
        if self._state != _CLOSED:
            self.transport.write(wire.error_response(code or sqlstate, text, severity="FATAL"))
        self._state = _CLOSED
        self._close()

    def end(self, reason):
        """
        End the session without a word more to the client, which has had
        the target's last (a FATAL error): close both connections.
        """
        if self.session is not None:
            self.session.attributes.setdefault("end_reason", reason)
        self._state = _CLOSED
        self._close()

    def disconnect(self, message):
        """
        An operator ended this session (hoopgw.admin): the client reads why
        (SQLSTATE 57P01, as PostgreSQL's own pg_terminate_backend says).
        """
        self._fatal("57P01", message)

    def _close(self):
        """
        Close the client connection, and the target's.  A TLS transport
        does not shut down while a producer is registered with it.
        """
        if self.upstream is not None:
            _unregister(self.transport)
            _unregister(self.upstream.transport)
        self.transport.loseConnection()

    def _internal_error(self, failure):
        self.log.failure("Internal error in a PostgreSQL session", failure)
        if self.session is not None:
            self.session.attributes["end_reason"] = "internal error: %s" % (failure.getErrorMessage(),)
        self._fatal("XX000", "hoopgw failed internally and closed the session; the failure is logged")

    def connectionLost(self, reason):
        if self.startup is not None:
            self.startup.lost(self._state)
        self._state = _CLOSED
        self.factory.open.discard(self)
        if self.backend_key is not None:
            self.factory.unregister(self.backend_key)
        if self._waiting is not None:
            self._waiting.cancel()
        if self.upstream is not None:
            self.upstream.receiver = None
            _unregister(self.upstream.transport)
            if self.upstream.transport.connected and not self.upstream.transport.disconnecting:
                self.upstream.transport.write(wire.terminate())
            self.upstream.transport.loseConnection()
        for pending in self._expected:
            for command in pending.commands[pending.index :]:
                if not command.outcome or command.outcome.get("status") is None:
                    command.outcome.update(status=INTERRUPTED, reason="the session ended before it finished")
                    self.chain.finish(self.session, command)
        self._expected.clear()
        if self.session is not None and self.session.identity is not None and not self._admitting:
            self.session.attributes.setdefault("end_reason", "client disconnected")
            self._end_session(self.session.attributes["end_reason"])
        closing, self._closing = self._closing, []
        for waiter in closing:
            if self._ended is None:
                waiter.callback(None)
            else:
                self._ended.addBoth(lambda result, waiter=waiter: (waiter.callback(None), result)[1])

    def closed(self):
        """
        @return: a L{Deferred} firing once the client's connection is closed
            and its session's end recorded.
        """
        waiter = defer.Deferred()
        self._closing.append(waiter)
        return waiter

    def _end_session(self, reason):
        if self._ended is not None:
            return self._ended
        self.session.attributes.setdefault("end_reason", reason)
        self._ended = self.chain.end_session(self.session)
        self.factory.session_ended(self._ended)
        return self._ended


class PostgresFactory(protocol.ServerFactory):
    """
    The listener of one PostgreSQL connection.
    """

    def __init__(self, connection, gateway, chain, reactor=None):
        from twisted.internet import reactor as default_reactor

        self.connection = connection
        self.settings = connection.settings
        self.gateway = gateway
        self.chain = chain
        self.reactor = reactor or default_reactor
        self.tls_context = _server_context(connection.name, self.settings.tls)
        self.admission = Admission(self.settings)
        self.active = {}
        # Cancel requests for sessions of other processes sharing the store.
        replicas = getattr(gateway, "replicas", None)
        self.peers = replicas.cancels if replicas is not None else None
        self.ending = set()
        self.open = set()

    def buildProtocol(self, address):
        frontend = PostgresFrontend(self)
        self.open.add(frontend)
        return frontend

    def register(self, frontend):
        """
        Give a ready session its own backend key (never the target's).
        """
        while True:
            key = (int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF, int.from_bytes(os.urandom(4), "big"))
            if key not in self.active:
                self.active[key] = frontend
                if self.peers is not None:
                    self.peers.register(self.connection.name, key, self)
                return key

    def unregister(self, key):
        if self.active.pop(key, None) is not None and self.peers is not None:
            self.peers.unregister(self.connection.name, key)

    def cancel(self, process_id, secret):
        """
        @return: whether the key named a session.
        """
        frontend = self.active.get((process_id, secret))
        if frontend is None:
            return False
        frontend.cancel()
        return True

    def session_ended(self, ended):
        self.ending.add(ended)
        ended.addBoth(lambda result: (self.ending.discard(ended), result)[1])

    def close_sessions(self, reason, grace=CLOSE_GRACE):
        """
        End every open session (the gateway is stopping): each client gets
        a FATAL error saying so; its connection closes (aborted after
        C{grace} seconds if the client does not read it) and its session's
        end is recorded before the returned L{Deferred} fires, so the
        record's C{gateway.stop} comes after every session's end.
        """
        closing = []
        for frontend in list(self.open):
            closing.append(frontend.closed())
            if frontend._state != _CLOSED:
                if frontend.session is not None:
                    frontend.session.attributes["end_reason"] = reason
                frontend._fatal("57P01", "hoopgw is shutting down: %s" % (reason,))
            abort = self.reactor.callLater(grace, frontend.transport.abortConnection)
            closing[-1].addBoth(lambda result, abort=abort: (abort.active() and abort.cancel(), result)[1])
        return defer.DeferredList(closing + list(self.ending), consumeErrors=True)


def _then(outcome, callback, *arguments):
    """
    Call C{callback(outcome, *arguments)} now if C{outcome} is a value, or
    when it fires if it is a L{Deferred} (which is then returned).
    """
    if isinstance(outcome, defer.Deferred):
        return outcome.addCallback(callback, *arguments)
    callback(outcome, *arguments)
    return None


def _unregister(transport):
    """
    Drop a transport's producer, if it still has one: a closed TLS
    transport forgets its protocol and cannot be asked.
    """
    if getattr(transport, "connected", False) and getattr(transport, "producer", True) is not None:
        try:
            transport.unregisterProducer()
        except AttributeError:
            pass


def _no_delay(transport):
    """
    Small protocol messages must not wait for Nagle's algorithm.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def _server_context(name, tls):
    """
    The TLS context a connection offers its clients, or None; a certificate,
    key or CA file it cannot use is a configuration error naming them.
    """
    if tls is None:
        return None
    try:
        return server_context(tls.certificate, tls.key, tls.client_ca)
    except OSError as error:  # ssl.SSLError included
        files = ", ".join(path for path in (tls.certificate, tls.key, tls.client_ca) if path)
        raise ConfigError("connections.%s.tls" % (name,), "the gateway cannot use %s: %s" % (files, error.strerror or error))
