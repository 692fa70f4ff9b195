"""
Deciding a client's request: refused on the gateway's own grounds (plain
HTTP, impersonation headers, a body too large, SPDY), else made into a
L{Command} from the API server's request info and put to the chain; an
allowed request goes on with the gateway's credential in place of the
client's, a denied one is answered with a Kubernetes C{Status}.
"""

import time

from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import admission
from hoopgw.kubernetes.exchange import JSON, KEY, Exchange, status_response, wait
from hoopgw.kubernetes.requestinfo import request_command, request_info
from hoopgw.model import DENY, Decision
from hoopgw.options import ConfigError

# Content types the gateway can read; a client asking for protobuf gets JSON.
_PROTOBUF = "application/vnd.kubernetes.protobuf"


def _bearer(header):
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


class Requests:
    """
    The requests of a L{hoopgw.kubernetes.frontend.Frontend}.
    """

    log = Logger()

    def __init__(self, frontend):
        self.frontend = frontend

    async def received(self, flow):
        frontend = self.frontend
        frontend.connections.requested(flow.client_conn)
        exchange = Exchange(time.time())
        flow.metadata[KEY] = exchange
        if not flow.client_conn.tls_established:
            # mitmproxy reads plain HTTP on the TLS port too: refused before
            # anything of it (its token) is looked at.
            exchange.refused = True
            frontend.connections.record_attempt(
                flow.client_conn, admission.TLS_PLAINTEXT, "the client sent plain HTTP to the gateway's TLS port"
            )
            flow.response = status_response(
                400,
                "hoopgw refused this request: this port speaks HTTPS only; use an https:// URL "
                "(and consider the token sent in clear exposed)",
                close=True,
            )
            return
        try:
            await self._decide(flow, exchange)
        except Exception:
            self.log.failure("The Kubernetes front end failed on a request")
            if exchange.command is not None and (exchange.command.decision is None or not exchange.command.decision.denied):
                exchange.command.decision = Decision.deny(
                    "the gateway failed internally", rule="gateway:error", addon="gateway"
                )
            exchange.refuse(flow, 500, "hoopgw failed internally and refused this request; the failure is logged")

    async def _decide(self, flow, exchange):
        frontend = self.frontend
        request = flow.request
        token = _bearer(request.headers.get("authorization"))
        session = await frontend.sessions.session(flow, token, exchange)
        if session is None:
            return
        path, _, query = request.path.partition("?")
        websocket = request.headers.get("upgrade", "").lower() == "websocket"
        info = exchange.info = request_info(request.method, path, query, websocket)
        exchange.command = request_command(
            info, request.method, request.path, query, websocket, request.headers.get("user-agent", ""),
            request.raw_content,
        )
        state = exchange.client = frontend.sessions.clients.get(flow.client_conn.id)
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
        if len(body) > frontend.settings.max_body_bytes:
            self._gateway_denies(
                flow, exchange, 413, "gateway:max-body-bytes",
                "the request body of %d bytes is larger than the %d this connection accepts"
                % (len(body), frontend.settings.max_body_bytes),
            )
            return
        session.notifier = exchange.warnings.append
        pending = frontend.chain.submit(session, exchange.command)
        if isinstance(pending, defer.Deferred) and not pending.called and state is not None:
            # Should the client give up, the decision (an approval, say) is called off.
            state.wait_for(pending)
        decision = await wait(pending, frontend.loop)
        if decision.verdict == DENY:
            message = "hoopgw denied this request: %s" % (decision.reason,)
            if decision.rule:
                message += " (rule %s)" % (decision.rule,)
            exchange.refuse(flow, 403, message, info=info)
            return
        if "spdy" in request.headers.get("upgrade", "").lower():
            self._gateway_denies(
                flow, exchange, 400, "gateway:spdy",
                "exec, attach and port-forward pass through the gateway over WebSocket only (kubectl 1.30 "
                "or later); SPDY streams cannot be inspected",
            )
            return
        self._credential(request, session, exchange)

    def _gateway_denies(self, flow, exchange, code, rule, reason):
        """
        Refuse a request the gateway itself will not pass, whatever the
        chain says; the command's end records the decision.
        """
        exchange.command.decision = Decision.deny(reason, rule=rule, addon="gateway")
        verb = "denied" if code == 403 else "refused"
        exchange.refuse(flow, code, "hoopgw %s this request: %s" % (verb, reason), info=exchange.info)

    def _credential(self, request, session, exchange):
        """
        The client's token and any impersonation of its own never reach
        the API server; the gateway's credential does.
        """
        settings = self.frontend.settings
        headers = request.headers
        for name in list(headers.keys()):
            lowered = name.lower()
            if lowered in ("authorization", "proxy-authorization") or lowered.startswith("impersonate-"):
                del headers[name]
        if settings.saml_header:
            headers.pop(settings.saml_header, None)
        target = settings.target
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
