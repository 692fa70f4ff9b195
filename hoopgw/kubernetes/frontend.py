"""
The Kubernetes front end: the mitmproxy hooks of one connection.  Every
request becomes a L{Command} for the addon chain (with the facts of the API
server's request info); an allowed request goes to the API server with the
gateway's own credential, a denied one is answered with a Kubernetes
C{Status}; responses, watch events, log streams and exec output pass
through the chain's result hooks on their way back; every request leaves an
audit event.
"""

import hashlib
import json
import shlex
import time

from mitmproxy import http
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import admission
from hoopgw import cards
from hoopgw import cast as casts
from hoopgw import redact
from hoopgw.chain import ChainBroken, settled
from hoopgw.identity.certificates import as_certificate, fingerprint
from hoopgw.kubernetes import bodies, channels, engine as engines, tls
from hoopgw.kubernetes.requestinfo import request_command, request_info
from hoopgw.model import DENIED, DENY, ERROR, FAILED, OK, UNAUTHENTICATED, UNAVAILABLE, WITHHELD, Credentials, Decision, ResultChunk, Session
from hoopgw.options import ConfigError

KEY = "hoopgw"
JSON = "application/json"
# Content types the gateway can read; a client asking for protobuf gets JSON.
_PROTOBUF = "application/vnd.kubernetes.protobuf"


def refusal_status(decision):
    """
    The HTTP status for a refused session: 401 when who the client is was
    not proven (or the identity addon failed to say), 503 when the
    connection is paused or the gateway stopping, else 403.
    """
    if decision.refusal == UNAUTHENTICATED or (decision.refusal == FAILED and decision.addon == "identity"):
        return 401
    if decision.refusal == UNAVAILABLE:
        return 503
    return 403


class Exchange:
    """
    What the front end knows about one request while it is in flight.
    """

    __slots__ = (
        "received", "session", "command", "info", "refused", "streamed", "finished",
        "warnings", "subprotocol", "cast", "exit", "broken", "impersonated", "client", "released",
    )

    def __init__(self, received):
        self.received = received
        self.session = None
        self.command = None
        self.info = None
        self.refused = False
        self.streamed = False
        self.finished = False
        self.warnings = []
        self.subprotocol = None
        self.cast = None
        self.exit = None
        self.broken = None
        self.impersonated = None
        self.client = None
        self.released = False


async def _wait(value, loop):
    """
    The result of C{value}, waiting on the asyncio loop if it is a
    L{Deferred} that has not fired.
    """
    done, result = settled(value)
    if done:
        return result
    return await result.asFuture(loop)


def _bearer(header):
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def _address(peername):
    if not peername:
        return "unknown"
    return "%s:%s" % (peername[0], peername[1])


# How long a closing connection's requests get to finish before its
# sessions end regardless.
DRAIN_SECONDS = 2.0


class _ClientState:
    """
    The sessions of one client connection, one per token it presented,
    the decisions its requests wait for, and its requests in flight.
    """

    __slots__ = ("sessions", "waiting", "open", "drained")

    def __init__(self):
        self.sessions = {}
        self.waiting = set()
        self.open = set()
        self.drained = []

    def finished(self, exchange):
        self.open.discard(exchange)
        if not self.open:
            drained, self.drained = self.drained, []
            for waiter in drained:
                if not waiter.called:
                    waiter.callback(None)

    def drain(self, reactor):
        """
        @return: a L{Deferred} firing once no request is in flight, or after
            L{DRAIN_SECONDS}.
        """
        if not self.open:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self.drained.append(waiter)
        timeout = reactor.callLater(DRAIN_SECONDS, lambda: waiter.called or waiter.callback(None))
        return waiter.addBoth(lambda result: (timeout.active() and timeout.cancel(), result)[1])


class Frontend:
    """
    The hooks of one Kubernetes connection, called by the engine's router.
    """

    log = Logger()

    def __init__(self, connection, gateway, chain, reactor, loop):
        self.connection = connection
        self.settings = connection.settings
        self.gateway = gateway
        self.chain = chain
        self.reactor = reactor
        self.loop = loop
        self.engine = None
        self.clients = {}
        self.ending = set()
        self.client_tls = tls.client_context(self.settings.tls)
        self.tls_connections = {}
        self.upstream_tls = tls.upstream_context(self.settings.target)
        self.result_hooks = chain.has("result_received")
        self.admission = admission.Admission(
            self.settings.max_unauthenticated, self.settings.max_unauthenticated_per_source
        )
        # Client connections no request of which the chain let in yet: their
        # source address and the calls that close them when overdue.
        self.unproven = {}
        # Client connections whose attempts are in the record (a request
        # came, a limit or the handshake refused them).
        self.attempted = set()

    # Before login.

    def client_connected(self, client):
        source = client.peername[0] if client.peername else "unknown"
        refused = self.admission.refusal(source)
        if refused is not None:
            # mitmproxy closes it before TLS: nothing can be said over HTTP.
            client.error = refused[1]
            self.attempted.add(client.id)
            self._record_attempt(client, *refused, stage="connect")
            return
        self.admission.enter(source)
        settings = self.settings
        due = [
            self.reactor.callLater(settings.tls_handshake_timeout, self._handshake_due, client),
            self.reactor.callLater(settings.login_timeout, self._login_due, client),
        ]
        self.unproven[client.id] = (source, due)

    def _proven(self, client):
        """
        C{client} no longer counts against the limits before login: the
        chain let one of its requests in, or it has gone.
        """
        entry = self.unproven.pop(client.id, None)
        if entry is None:
            return
        source, due = entry
        self.admission.leave(source)
        for call in due:
            if call.active():
                call.cancel()

    def _handshake_due(self, client):
        if client.id not in self.unproven or client.tls_established:
            return
        self._close_attempt(
            client, admission.TLS_HANDSHAKE_TIMEOUT,
            "the client did not complete its TLS handshake within %g seconds (tls_handshake_timeout)"
            % (self.settings.tls_handshake_timeout,),
        )

    def _login_due(self, client):
        if client.id not in self.unproven:
            return
        self._close_attempt(
            client, admission.LOGIN_TIMEOUT,
            "no request on this connection was let in within %g seconds (login_timeout)" % (self.settings.login_timeout,),
        )

    def _close_attempt(self, client, rule, message):
        self.attempted.add(client.id)
        self._record_attempt(client, rule, message)
        handler = self.engine.proxyserver.connections.get(client.id) if self.engine is not None else None
        if handler is not None:
            _close_client(handler)

    def tls_failed_client(self, data):
        client = data.context.client
        if client.id in self.attempted:
            # Closed by a limit during the handshake: recorded already.
            return
        self.attempted.add(client.id)
        self._record_attempt(
            client, admission.TLS_HANDSHAKE_FAILED,
            "the TLS handshake failed: %s" % (admission.client_text(data.conn.error or "no reason given"),),
        )

    def _record_attempt(self, client, rule, message, **attributes):
        """
        Record an attempt refused before any session began (C{session.refused}
        naming C{rule}).
        """
        attributes.setdefault("stage", "request" if client.tls_established else "tls")
        if client.sni:
            attributes["sni"] = admission.client_text(client.sni)
        recorded = admission.record_refusal(
            self.chain, self.connection.name, "kubernetes", _address(client.peername), self.settings.target_name,
            rule, message, **attributes
        )
        self.ending.add(recorded)
        recorded.addBoth(lambda result: (self.ending.discard(recorded), result)[1])

    # TLS.

    def tls_start_client(self, data):
        data.ssl_conn = tls.accept(self.client_tls)
        if self.settings.tls.client_ca is not None:
            # Read again once a request comes: what OpenSSL made of the
            # client's certificate.
            self.tls_connections[data.context.client.id] = data.ssl_conn

    def tls_start_server(self, data):
        data.ssl_conn = tls.connect(self.upstream_tls, self.settings.target)

    # Requests.

    async def request(self, flow):
        # Whatever becomes of it, this request leaves an event.
        self.attempted.add(flow.client_conn.id)
        exchange = Exchange(time.time())
        flow.metadata[KEY] = exchange
        if not flow.client_conn.tls_established:
            # mitmproxy reads plain HTTP on the TLS port too: refused before
            # anything of it (its token) is looked at.
            exchange.refused = True
            self._record_attempt(
                flow.client_conn, admission.TLS_PLAINTEXT, "the client sent plain HTTP to the gateway's TLS port"
            )
            flow.response = http.Response.make(
                400,
                bodies.status(400, "hoopgw refused this request: this port speaks HTTPS only; use an https:// URL "
                                   "(and consider the token sent in clear exposed)"),
                {"content-type": JSON, "connection": "close"},
            )
            return
        try:
            await self._request(flow, exchange)
        except Exception:
            self.log.failure("The Kubernetes front end failed on a request")
            if exchange.command is not None and (exchange.command.decision is None or not exchange.command.decision.denied):
                exchange.command.decision = Decision.deny(
                    "the gateway failed internally", rule="gateway:error", addon="gateway"
                )
            self._refuse(flow, exchange, 500, "hoopgw failed internally and refused this request; the failure is logged")

    async def _request(self, flow, exchange):
        request = flow.request
        token = _bearer(request.headers.get("authorization"))
        session = await self._session(flow, token, exchange)
        if session is None:
            return
        path, _, query = request.path.partition("?")
        websocket = request.headers.get("upgrade", "").lower() == "websocket"
        info = exchange.info = request_info(request.method, path, query, websocket)
        command = exchange.command = self._command(flow, info, query, websocket)
        state = exchange.client = self.clients.get(flow.client_conn.id)
        if state is not None:
            state.open.add(exchange)
        if any(name.lower().startswith("impersonate-") for name in request.headers.keys()):
            self._gateway_denies(
                flow, exchange, 403, "gateway:impersonation",
                "requests through the gateway may not carry Impersonate-* headers; the gateway acts "
                "for your own identity only",
            )
            return
        body = request.raw_content or b""
        if len(body) > self.settings.max_body_bytes:
            self._gateway_denies(
                flow, exchange, 413, "gateway:max-body-bytes",
                "the request body of %d bytes is larger than the %d this connection accepts"
                % (len(body), self.settings.max_body_bytes),
            )
            return
        session.notifier = exchange.warnings.append
        pending = self.chain.submit(session, command)
        if isinstance(pending, defer.Deferred) and not pending.called and state is not None:
            # Should the client give up, the decision (an approval, say) is called off.
            state.waiting.add(pending)
            pending.addBoth(lambda result: (state.waiting.discard(pending), result)[1])
        decision = await _wait(pending, self.loop)
        if decision.verdict == DENY:
            message = "hoopgw denied this request: %s" % (decision.reason,)
            if decision.rule:
                message += " (rule %s)" % (decision.rule,)
            self._refuse(flow, exchange, 403, message, info=info)
            return
        if "spdy" in request.headers.get("upgrade", "").lower():
            self._gateway_denies(
                flow, exchange, 400, "gateway:spdy",
                "exec, attach and port-forward pass through the gateway over WebSocket only (kubectl 1.30 "
                "or later); SPDY streams cannot be inspected",
            )
            return
        self._credential(request, session, exchange)

    def _command(self, flow, info, query, websocket):
        request = flow.request
        return request_command(
            info, request.method, request.path, query, websocket, request.headers.get("user-agent", ""), request.raw_content
        )

    def _credential(self, request, session, exchange):
        """
        The client's token and any impersonation of its own never reach
        the API server; the gateway's credential does.
        """
        headers = request.headers
        for name in list(headers.keys()):
            lowered = name.lower()
            if lowered in ("authorization", "proxy-authorization") or lowered.startswith("impersonate-"):
                del headers[name]
        if self.settings.saml_header:
            headers.pop(self.settings.saml_header, None)
        target = self.settings.target
        if target.token is not None:
            try:
                token = target.token.read_text()
            except ConfigError as error:
                raise RuntimeError("the gateway's credential for the API server is unavailable: %s" % (error,))
            headers["authorization"] = "Bearer %s" % (token,)
        if target.impersonate is not None:
            identity = session.identity
            user = target.impersonate.user_prefix + identity.subject
            headers["impersonate-user"] = user
            groups = sorted(identity.groups) if target.impersonate.groups else []
            if groups:
                headers.set_all("impersonate-group", groups)
            exchange.impersonated = {"username": user, "groups": groups}
        info = exchange.info
        if info.verb == "watch" or info.subresource in ("log", "exec", "attach"):
            # A stream is masked as it passes: it must come uncompressed.
            headers.pop("accept-encoding", None)
            # Nor compressed WebSocket messages (permessage-deflate), whose
            # size the gateway could not bound before inflating them.
            headers.pop("sec-websocket-extensions", None)
        accept = headers.get("accept")
        if accept and _PROTOBUF in accept:
            kept = [part for part in accept.split(",") if _PROTOBUF not in part]
            headers["accept"] = ",".join(kept) or JSON

    # Sessions.

    async def _session(self, flow, token, exchange):
        client = flow.client_conn
        saml_header = self.settings.saml_header
        assertion = flow.request.headers.get(saml_header, "").strip() if saml_header else ""
        if assertion:
            if token:
                message = (
                    "hoopgw refused the request: it carries both a bearer token and a %s header; send one "
                    "credential, the SAML assertion in %s or the token as the bearer token" % (saml_header, saml_header)
                )
                # A failed access attempt (PCI DSS 10.2.1.4): recorded as a
                # refused session, without either credential.
                session = self._new_session(flow, None)
                session.attributes["identity_refused"] = "ambiguous-credentials"
                refusal = Decision.deny(message, rule="identity:ambiguous-credentials", addon="gateway")
                await _wait(self.chain.refuse_session(session, refusal), self.loop)
                self._refuse(flow, exchange, 400, message)
                return None
            # The identity addon tells a SAML assertion from a JWT itself,
            # as it does for a PostgreSQL password.
            token = assertion
        state = self.clients.get(client.id)
        if state is None:
            state = self.clients[client.id] = _ClientState()
        key = hashlib.sha256(token.encode("utf-8")).hexdigest() if token else ""
        session = state.sessions.get(key)
        if session is not None:
            expires = session.identity.provenance.get("expires_at") if session.identity is not None else None
            if expires is None or time.time() < expires:
                exchange.session = session
                return session
            # The token ran out while the connection stayed open: it is checked anew.
            del state.sessions[key]
            session.attributes["end_reason"] = "the token expired"
            self._end(session)
        session = self._new_session(flow, token)
        decision = await _wait(self.chain.start_session(session), self.loop)
        if decision.verdict == DENY:
            code = refusal_status(decision)
            message = "hoopgw refused the session: %s" % (decision.reason,)
            # kubectl meets the refusal in its discovery request, whose
            # errors it prints without the Status message ("You must be
            # logged in to the server"); it does print Warning headers.
            exchange.warnings.append(message)
            self._refuse(flow, exchange, code, message)
            return None
        if client.id not in self.clients:
            # The client went away while its token was checked.
            session.attributes["end_reason"] = "client disconnected"
            self._end(session)
            return None
        state.sessions[key] = session
        exchange.session = session
        self._proven(client)
        return session

    def _new_session(self, flow, token):
        client = flow.client_conn
        return Session(
            connection=self.connection.name,
            protocol="kubernetes",
            client_address=_address(client.peername),
            target=self.settings.target_name,
            credentials=self._credentials(client, token),
            attributes={
                "user_agent": flow.request.headers.get("user-agent", ""),
                "tls": client.tls_established,
                "sni": client.sni or "",
            },
        )

    def _credentials(self, client, token):
        """
        What the client presented: its token, and the certificate it
        proved it holds in the TLS handshake (asked for only with
        C{tls.client_ca}).  A certificate OpenSSL could not verify against
        C{tls.client_ca} is not handed over as one: the identity addon
        learns why, and refuses.
        """
        certificate, problem = tls.client_certificate(self.tls_connections.get(client.id))
        credentials = Credentials(password=token, client_certificate=certificate)
        if problem is not None:
            credentials.client_certificate = None
            evidence = {"reason": problem}
            try:
                parsed = as_certificate(certificate)
                evidence.update(
                    certificate_fingerprint=fingerprint(parsed), certificate_subject=parsed.subject.rfc4514_string()
                )
            except ValueError:
                # What cryptography cannot read is still named in the record.
                evidence["certificate_fingerprint"] = certificate.digest("sha256").decode("ascii").lower()
            credentials.extra["client_certificate_refused"] = evidence
        return credentials

    def _end(self, session):
        ended = self.chain.end_session(session)
        self.ending.add(ended)
        ended.addBoth(lambda result: (self.ending.discard(ended), result)[1])
        return ended

    def _leave(self, state, reason):
        """
        A client connection is over: call off what its requests wait for,
        let them finish, then end its sessions (so a session's end follows
        its commands' in the record).
        """
        for waiting in list(state.waiting):
            waiting.cancel()

        def end(_):
            for session in state.sessions.values():
                session.attributes.setdefault("end_reason", reason)
                self._end(session)

        leaving = state.drain(self.reactor).addCallback(end)
        self.ending.add(leaving)
        leaving.addBoth(lambda result: (self.ending.discard(leaving), result)[1])
        return leaving

    def client_disconnected(self, client):
        self.tls_connections.pop(client.id, None)
        self._proven(client)
        state = self.clients.pop(client.id, None)
        if state is not None:
            self._leave(state, "client disconnected")
        if client.id not in self.attempted:
            # Gone before any request (a probe, a client that is not TLS, a
            # request mitmproxy could not read): recorded all the same.
            message = "the connection closed before any request reached the gateway"
            if client.error:
                message += ": %s" % (admission.client_text(client.error),)
            self._record_attempt(client, "kubernetes:closed-before-request", message)
        self.attempted.discard(client.id)

    def close_sessions(self, reason):
        """
        End every session (the gateway is stopping): close the clients'
        connections and tell the chain.

        @return: a L{Deferred} firing once every session has ended.
        """
        handlers = self.engine.proxyserver.connections if self.engine is not None else {}
        for _, due in self.unproven.values():
            for call in due:
                if call.active():
                    call.cancel()
        for client_id in list(self.clients):
            handler = handlers.get(client_id)
            state = self.clients.pop(client_id)
            if handler is not None:
                _close_client(handler)
            self._leave(state, reason)
        return _all_of(self.ending)

    # Refusals.

    def _gateway_denies(self, flow, exchange, code, rule, reason):
        """
        Refuse a request the gateway itself will not pass, whatever the
        chain says; the command's end records the decision.
        """
        exchange.command.decision = Decision.deny(reason, rule=rule, addon="gateway")
        verb = "denied" if code == 403 else "refused"
        self._refuse(flow, exchange, code, "hoopgw %s this request: %s" % (verb, reason), info=exchange.info)

    def _refuse(self, flow, exchange, code, message, info=None):
        exchange.refused = True
        details = bodies.denial_details(info) if info is not None and code == 403 else None
        flow.response = http.Response.make(
            code, bodies.status(code, message, details=details), {"content-type": JSON}
        )
        for warning in exchange.warnings:
            flow.response.headers.add("warning", _warning(warning))

    # Responses.

    def responseheaders(self, flow):
        exchange = flow.metadata.get(KEY)
        if exchange is None or exchange.refused or exchange.command is None:
            return
        response = flow.response
        if self.result_hooks:
            _mask_headers(response.headers)
        for warning in exchange.warnings:
            response.headers.add("warning", _warning(warning))
        info = exchange.info
        if response.status_code == 101:
            return
        if info.verb == "watch" or exchange.command.facts.get("follow"):
            exchange.streamed = True
            if not self.result_hooks:
                response.stream = True
            elif info.verb == "watch":
                response.stream = _WatchStream(self, flow, exchange, self.settings.max_body_bytes)
            else:
                response.stream = _LogStream(self, flow, exchange)

    async def response(self, flow):
        exchange = flow.metadata.get(KEY)
        if exchange is None:
            return
        try:
            if exchange.command is None:
                return
            if flow.response.status_code == 101 and not exchange.refused:
                self._start_terminal(flow, exchange)
                return
            if not exchange.refused and not exchange.streamed and self.result_hooks:
                await self._filter_body(flow, exchange)
            self._finish(flow, exchange)
        except Exception:
            self.log.failure("The Kubernetes front end failed on a response")
            exchange.broken = "internal error"
            flow.response = http.Response.make(
                500, bodies.status(500, "hoopgw failed internally and withheld the response; the failure is logged"),
                {"content-type": JSON},
            )
            self._finish(flow, exchange)

    async def _filter_body(self, flow, exchange):
        response = flow.response
        try:
            content = response.content
        except ValueError:
            # An encoding the gateway cannot read cannot be checked either.
            content = None
        if content is None:
            self._withhold(flow, exchange, "the response's content encoding is not one the gateway can read")
            return
        if not content:
            return
        content_type = response.headers.get("content-type", "")
        if content_type.startswith("text/"):
            chunk = ResultChunk("stream", data=content, stream="log", final=True)
            opened = None
        else:
            chunk, opened = self._body_chunk(content, content_type)
        original = chunk.data
        try:
            await _wait(self.chain.result(exchange.session, exchange.command, chunk), self.loop)
        except ChainBroken as error:
            self._withhold(flow, exchange, str(error))
            return
        if opened:
            document = json.loads(chunk.data)
            bodies.close_secrets(document, opened)
            response.content = json.dumps(document, separators=(",", ":")).encode("utf-8")
        elif chunk.data is not original:
            response.content = chunk.data

    def _body_chunk(self, content, content_type):
        """
        The chunk the chain sees for a JSON body: Secret values opened.
        """
        opened = None
        data = content
        if b'"Secret' in content or b'"binaryData"' in content:
            try:
                document = json.loads(content)
            except ValueError:
                document = None
            if document is not None:
                opened = bodies.open_secrets(document)
                if opened:
                    data = json.dumps(document, separators=(",", ":")).encode("utf-8")
        fields = {"content_type": content_type}
        if opened:
            fields["base64_opened"] = bodies.describe_opened(opened)
        return ResultChunk("body", data=data, fields=fields), opened

    def _withhold(self, flow, exchange, reason):
        self.log.error("Withholding a Kubernetes response: {reason}", reason=reason)
        exchange.broken = reason
        flow.response = http.Response.make(
            500, bodies.status(500, "hoopgw withheld the response because %s" % (reason,)), {"content-type": JSON}
        )

    def _stream_broken(self, flow, exchange, reason, delay=None):
        """
        A streamed response may not go on (an addon failed on it): close
        the client's connection.
        """
        self.log.error("Withholding the rest of a Kubernetes stream: {reason}", reason=reason)
        exchange.broken = reason
        handler = self.engine.proxyserver.connections.get(flow.client_conn.id) if self.engine else None
        if handler is not None:
            # After what is on its way out (a status frame) has been written.
            if delay is None:
                self.loop.call_soon(_close_client, handler)
            else:
                self.loop.call_later(delay, _close_client, handler)

    def error(self, flow):
        exchange = flow.metadata.get(KEY)
        if exchange is None or exchange.command is None or exchange.finished:
            return
        self._finish(flow, exchange, error=flow.error.msg if flow.error else "the exchange failed")

    def _finish(self, flow, exchange, error=None):
        if exchange.finished or exchange.command is None:
            return
        exchange.finished = True
        command = exchange.command
        response = flow.response
        code = response.status_code if response is not None else 502
        failure = None
        if code >= 400 and response is not None and len(response.raw_content or b"") < 65536:
            failure = _status_of(response)
        outcome = command.outcome
        if command.decision is not None and command.decision.denied:
            outcome["status"] = DENIED
        elif exchange.broken:
            outcome.update(status=WITHHELD, reason=exchange.broken)
        elif error is not None and exchange.streamed and response is not None:
            # A watch or a followed log ends when the client closes it.
            outcome.update(status=OK, ended=redact.redact_text(error)[0])
        elif error is not None:
            outcome.update(status=ERROR, error=redact.redact_text(error)[0])
        else:
            outcome["status"] = OK if code < 400 else "error"
        outcome["code"] = code
        if exchange.exit is not None:
            outcome["exit"] = exchange.exit
        request = flow.request
        outcome["audit"] = bodies.audit_event(
            exchange.session,
            command,
            exchange.info,
            command.redacted.partition(" ")[2],
            code,
            "ResponseComplete" if response is not None else "Panic",
            exchange.received,
            time.time(),
            _address(flow.client_conn.peername).rpartition(":")[0],
            request.headers.get("user-agent", ""),
            impersonated=exchange.impersonated,
            failure=failure,
        )
        self.chain.finish(exchange.session, command)
        if exchange.client is not None:
            # Last: the client's sessions may be waiting for this to end.
            exchange.client.finished(exchange)

    # Exec and attach.

    def _start_terminal(self, flow, exchange):
        exchange.subprotocol = flow.response.headers.get("sec-websocket-protocol", "").strip()
        facts = exchange.command.facts
        info = exchange.info
        exchange.cast = casts.Recorder(
            term="xterm" if facts.get("tty") else None,
            title="%s: kubectl %s %s/%s" % (exchange.session.identity.subject if exchange.session.identity else "?",
                                            info.subresource, info.namespace, info.name),
            command=shlex.join(facts.get("command") or []) or None,
        )
        if exchange.subprotocol not in channels.BINARY_PROTOCOLS + channels.BASE64_PROTOCOLS:
            # Frames the gateway cannot read cannot be masked or recorded.
            exchange.broken = "the API server chose the unknown subprotocol %r" % (exchange.subprotocol,)
            flow.response = http.Response.make(
                502, bodies.status(502, "hoopgw withheld the stream because %s" % (exchange.broken,)),
                {"content-type": JSON},
            )
            self._finish(flow, exchange)

    async def websocket_message(self, flow):
        exchange = flow.metadata.get(KEY)
        message = flow.websocket.messages[-1]
        if exchange is None or exchange.cast is None or exchange.broken:
            message.drop()
            return
        try:
            await self._terminal_message(flow, exchange, message)
            # mitmproxy keeps every message of a flow; a long terminal
            # session must not grow without bound.
            del flow.websocket.messages[:-1]
        except Exception:
            self.log.failure("The Kubernetes front end failed on an exec message")
            message.drop()
            self._stream_broken(flow, exchange, "internal error")

    async def _terminal_message(self, flow, exchange, message):
        frame = channels.decode(exchange.subprotocol, message.content)
        cast = exchange.cast
        if message.from_client:
            if frame.channel == channels.STDIN:
                cast.input(frame.data)
            elif frame.channel == channels.RESIZE:
                size = channels.terminal_size(frame.data)
                if size is not None:
                    cast.resize(*size)
            return
        if frame.channel in (channels.STDOUT, channels.STDERR):
            if self.result_hooks:
                try:
                    # A card number may go on in the stream's next frame:
                    # the chain holds its start back until then.
                    data = await self._terminal_output(exchange, frame.channel, frame.data, final=False)
                except ChainBroken as error:
                    self._terminal_broken(flow, exchange, message, frame, error)
                    return
                if data is not frame.data:
                    frame.data = data
                    message.content = frame.encode()
            cast.output(frame.data)
        elif frame.channel == channels.ERROR:
            # The status that ends the output: what was held back goes first.
            try:
                await self._release_output(flow, exchange, frame.base64, message.is_text)
            except ChainBroken as error:
                self._terminal_broken(flow, exchange, message, frame, error)
                return
            if not frame.data:
                return
            if self.result_hooks:
                # The API server's status (its message) is masked like its output.
                try:
                    data = await self._terminal_status(exchange, frame.data)
                except ChainBroken as error:
                    self._terminal_broken(flow, exchange, message, frame, error)
                    return
                if data is not frame.data:
                    frame.data = data
                    message.content = frame.encode()
            try:
                result = json.loads(frame.data)
            except ValueError:
                return
            exchange.exit = _exit_code(result)
        elif frame.channel not in channels.STREAMS or frame.data:
            # A channel the protocol does not have (or no channel at all), or
            # data on one the API server does not write to: nothing the
            # gateway has not read passes.  (An empty frame, which opens a
            # channel, does.)
            message.drop()

    async def _terminal_status(self, exchange, data):
        """
        The status that ends an exec through the chain's result hooks, as
        a JSON body.

        @return: the bytes to send.
        @raise ChainBroken: an addon failed on it.
        """
        chunk = ResultChunk("body", data=data, fields={"content_type": JSON, "exec_status": True})
        await _wait(self.chain.result(exchange.session, exchange.command, chunk), self.loop)
        return chunk.data

    async def _terminal_output(self, exchange, channel, data, final):
        """
        One stream's output through the chain's result hooks.

        @return: the bytes to send now.
        @raise ChainBroken: an addon failed on it.
        """
        chunk = ResultChunk("stream", data=data, stream=channels.STREAMS[channel], final=final)
        await _wait(self.chain.result(exchange.session, exchange.command, chunk), self.loop)
        return chunk.data

    async def _release_output(self, flow, exchange, base64_framing, is_text):
        """
        The end of the output: each stream's last chunk through the chain,
        and what it releases sent (see L{engines.SEND_FIRST}).
        """
        if not self.result_hooks or exchange.released:
            return
        exchange.released = True
        first = []
        for channel in (channels.STDOUT, channels.STDERR):
            data = await self._terminal_output(exchange, channel, b"", final=True)
            if data:
                exchange.cast.output(data)
                first.append((channels.Frame(channel, data, base64_framing).encode(), is_text))
        if first:
            flow.metadata[engines.SEND_FIRST] = first

    def _terminal_broken(self, flow, exchange, message, frame, error):
        # The output goes no further; the client learns why on the error channel.
        message.content = channels.Frame(
            channels.ERROR,
            bodies.status(500, "hoopgw withheld the output because %s; the session is closed" % (error,)),
            frame.base64,
        ).encode()
        self._stream_broken(flow, exchange, str(error), delay=0.2)

    async def websocket_end(self, flow):
        exchange = flow.metadata.get(KEY)
        if exchange is None or exchange.cast is None or exchange.finished:
            return
        too_large = flow.metadata.get(engines.TOO_LARGE)
        if too_large and not exchange.broken:
            exchange.broken = too_large
        command = exchange.command
        if self.result_hooks and not exchange.released and not exchange.broken:
            # The stream closed without a status: what the chain still held
            # back can no longer be sent (and is not recorded as sent).
            exchange.released = True
            unsent = 0
            try:
                for channel in (channels.STDOUT, channels.STDERR):
                    unsent += len(await self._terminal_output(exchange, channel, b"", final=True))
            except ChainBroken as error:
                exchange.broken = str(error)
            if unsent:
                command.outcome["unsent_output_bytes"] = unsent
        # The recording is durable, and its digest in the outcome, before
        # the command's end event commits it.
        try:
            await _wait(casts.commit(self.gateway.store, exchange.session, exchange.command, exchange.cast), self.loop)
        finally:
            self._finish(flow, exchange)


def _all_of(ending):
    """
    A L{Deferred} firing once every one of C{ending} (a set that may grow
    meanwhile, as sessions end after their requests) has fired.
    """
    if not ending:
        return defer.succeed(None)
    return defer.DeferredList(list(ending), consumeErrors=True).addCallback(lambda _: _all_of(ending))


def _warning(text):
    """
    A C{Warning} header kubectl prints (C{Warning: text}): what the chain
    told the client while its request waited (an approval, say).
    """
    return '299 - "%s"' % (text.replace("\\", "\\\\").replace('"', "'").replace("\n", " "),)


def _mask_headers(headers):
    """
    Mask card numbers in the API server's response headers (a C{Warning}
    kubectl prints, say): its words are as untrusted as its bodies.
    """
    for name in list(headers.keys()):
        values = headers.get_all(name)
        masked = [cards.mask_text(value)[0] for value in values]
        if masked != values:
            headers.set_all(name, masked)


def _close_client(handler):
    """
    Close a client's connection through its mitmproxy connection handler
    (unless it is closed already).
    """
    if handler.client in handler.transports:
        handler.close_connection(handler.client)


def _status_of(response):
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return None
    if not isinstance(body, dict) or body.get("kind") != "Status":
        return None
    # The API server's words are as untrusted as any: text, bounded, and
    # redacted before the record holds them.
    return {field: redact.redact_text(_text(body.get(field, ""))[:4096])[0] for field in ("reason", "message")}


def _text(value):
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _exit_code(result):
    # The API server's JSON, read without trusting its shape.
    if not isinstance(result, dict):
        return None
    if result.get("status") == "Success":
        return 0
    details = result.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    for cause in causes if isinstance(causes, list) else ():
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            try:
                return int(cause.get("message"))
            except (TypeError, ValueError):
                pass
    return None


# What a stream callable returns when it has nothing to send yet.  Not
# C{b""}: mitmproxy writes each returned chunk as it is, and an empty
# chunk of a chunked HTTP/1.1 response is the one that ends it.
_NOTHING_YET = ()


def _chunks(data):
    return [data] if data else _NOTHING_YET


class _WatchStream:
    """
    A watch's events, one JSON object a line, each through the chain as it
    arrives.  Result hooks on a stream must answer at once: mitmproxy
    streams synchronously, so a hook that would make it wait stops it.

    An event is read whole before any of it is sent, so an event cut
    across chunks waits for its end; one longer than C{limit} bytes ends
    the stream with an C{ERROR} event, as the API server ends a watch it
    cannot continue.
    """

    def __init__(self, frontend, flow, exchange, limit):
        self.frontend = frontend
        self.flow = flow
        self.exchange = exchange
        self.limit = limit
        self.pending = b""

    def __call__(self, data):
        exchange = self.exchange
        if exchange.broken:
            return _NOTHING_YET
        final = not data
        if data:
            data = self.pending + data
            cut = data.rfind(b"\n") + 1
            self.pending, data = data[cut:], data[:cut]
            if len(self.pending) > self.limit or (data and _longest_line(data) > self.limit):
                self.pending = b""
                return self._broken(
                    "the API server sent a watch event longer than the %d bytes this connection accepts "
                    "(max_body_bytes)" % (self.limit,),
                    _longest_prefix(data, self.limit),
                )
        else:
            data, self.pending = self.pending, b""
        out = []
        for line in data.splitlines(keepends=True):
            filtered = self._event(line)
            if filtered is None:
                break
            out.append(filtered)
        if final:
            # The end of the response: always written, so what was held
            # back goes out before the chunk that ends it.
            return b"".join(out)
        return _chunks(b"".join(out))

    def _broken(self, reason, sent):
        """
        End the stream: the events before the bad one, then an C{ERROR}
        event saying why (kubectl prints its message).
        """
        out = []
        for line in sent.splitlines(keepends=True):
            filtered = self._event(line)
            if filtered is None:
                return _chunks(b"".join(out))
            out.append(filtered)
        # After the ERROR event has been written.
        self.frontend._stream_broken(self.flow, self.exchange, reason, delay=0.2)
        out.append(_error_event(500, "hoopgw ended the watch because %s" % (reason,)))
        return b"".join(out)

    def _event(self, line):
        frontend, exchange = self.frontend, self.exchange
        body, newline = (line[:-1], b"\n") if line.endswith(b"\n") else (line, b"")
        if not body.strip():
            return line
        chunk, opened = frontend._body_chunk(body, JSON)
        original = chunk.data
        chunk.fields["watch_event"] = True
        try:
            waiting = frontend.chain.result(exchange.session, exchange.command, chunk)
        except ChainBroken as error:
            frontend._stream_broken(self.flow, exchange, str(error))
            return None
        if waiting is not None and not settled(waiting)[0]:
            waiting.cancel()
            frontend._stream_broken(self.flow, exchange, "an addon would make the watch stream wait")
            return None
        if opened:
            document = json.loads(chunk.data)
            bodies.close_secrets(document, opened)
            return json.dumps(document, separators=(",", ":")).encode("utf-8") + newline
        if chunk.data is original:
            return line
        return chunk.data + newline


def _longest_line(data):
    return max(len(line) for line in data.split(b"\n"))


def _longest_prefix(data, limit):
    """
    The whole lines of C{data} before the first one longer than C{limit}.
    """
    kept = []
    for line in data.splitlines(keepends=True):
        if len(line) > limit:
            break
        kept.append(line)
    return b"".join(kept)


def _error_event(code, message):
    return json.dumps({"type": "ERROR", "object": json.loads(bodies.status(code, message))}).encode("utf-8") + b"\n"


class _LogStream:
    """
    C{logs -f}: each piece of text through the chain as it arrives, the
    last one marked final (what the masker held back comes out then).
    """

    def __init__(self, frontend, flow, exchange):
        self.frontend = frontend
        self.flow = flow
        self.exchange = exchange

    def __call__(self, data):
        frontend, exchange = self.frontend, self.exchange
        if exchange.broken:
            return _NOTHING_YET
        final = not data
        chunk = ResultChunk("stream", data=data, stream="log", final=final)
        try:
            waiting = frontend.chain.result(exchange.session, exchange.command, chunk)
        except ChainBroken as error:
            frontend._stream_broken(self.flow, exchange, str(error))
            return _NOTHING_YET
        if waiting is not None and not settled(waiting)[0]:
            waiting.cancel()
            frontend._stream_broken(self.flow, exchange, "an addon would make the log stream wait")
            return _NOTHING_YET
        if final:
            return chunk.data
        return _chunks(chunk.data)


class KubernetesService(service.Service):
    """
    The listener of one Kubernetes connection: a reverse-proxy mode of the
    process's mitmproxy master.  The gateway adds it as it is (it is its
    own service, not a factory for C{strports}).

    @ivar listening: a L{Deferred} firing once the mode serves.
    """

    log = Logger()

    def __init__(self, connection, gateway, chain, reactor):
        self.connection = connection
        self.reactor = reactor
        loop = getattr(reactor, "_asyncioEventloop", None)
        self.frontend = Frontend(connection, gateway, chain, reactor, loop)
        self.listening = None
        self._server = None
        self._stopped = None

    def startService(self):
        service.Service.startService(self)
        self._stopped = None
        engine = engines.acquire(self.reactor)
        settings = self.connection.settings
        try:
            self.listening = engine.listen(
                settings.mode, settings.listen_host, settings.listen_port, self.frontend, settings.max_body_bytes,
                reuse_port=self.connection.reuse_port,
            )
        except OSError:
            engines.release(engine)
            raise
        self.frontend.engine = engine
        self.listening.addCallback(self._serving)

    def _serving(self, server):
        self._server = server
        return server

    def stopService(self):
        service.Service.stopService(self)
        if self._stopped is not None:
            return self._stopped
        engine = self.frontend.engine
        if self._server is not None:
            self._server.close()
            self._server = None
        ending = self.frontend.close_sessions("the gateway is stopping")

        def release(result):
            engine.forget(self.connection.settings.mode)
            engines.release(engine)
            self.frontend.engine = None
            return result

        self._stopped = ending.addBoth(release)
        return self._stopped

    def close_sessions(self, reason):
        if self.frontend.engine is None:
            return self._stopped or defer.succeed(None)
        return self.frontend.close_sessions(reason)

