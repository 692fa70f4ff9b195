"""
The API server's answers to allowed requests, on their way back to the
client: headers masked and the chain's warnings added, a body through the
chain's result hooks (Secret values opened for them), a watch or a
followed log streamed through them piece by piece (L{streams}), an exec
handed to L{terminal}; and each request's end in the record.
"""

from twisted.logger import Logger

from hoopgw import cards
from hoopgw.chain import ChainBroken
from hoopgw.kubernetes import bodies, streams
from hoopgw.kubernetes.exchange import KEY, status_response, wait
from hoopgw.model import ResultChunk


class Responses:
    """
    The responses of a L{hoopgw.kubernetes.frontend.Frontend}.
    """

    log = Logger()

    def __init__(self, frontend):
        self.frontend = frontend

    def headers(self, flow):
        """
        The response's headers have come: decide how its body passes.
        """
        exchange = flow.metadata.get(KEY)
        if exchange is None or exchange.refused or exchange.command is None:
            return
        frontend = self.frontend
        response = flow.response
        if frontend.result_hooks:
            _mask_headers(response.headers)
        exchange.add_warnings(response.headers)
        info = exchange.info
        if response.status_code == 101:
            return
        if info.verb == "watch" or exchange.command.facts.get("follow"):
            exchange.streamed = True
            if not frontend.result_hooks:
                response.stream = True
            elif info.verb == "watch":
                response.stream = streams.WatchStream(frontend, flow, exchange, frontend.settings.max_body_bytes)
            else:
                response.stream = streams.LogStream(frontend, flow, exchange)

    async def complete(self, flow):
        """
        The whole response has come (or the API server switched protocols
        for an exec).
        """
        exchange = flow.metadata.get(KEY)
        if exchange is None:
            return
        chain = self.frontend.chain
        try:
            if exchange.command is None:
                return
            if flow.response.status_code == 101 and not exchange.refused:
                self.frontend.terminal.start(flow, exchange)
                return
            if not exchange.refused and not exchange.streamed and self.frontend.result_hooks:
                await self._filter_body(flow, exchange)
            exchange.finish(chain, flow)
        except Exception:
            self.log.failure("The Kubernetes front end failed on a response")
            exchange.broken = "internal error"
            flow.response = status_response(
                500, "hoopgw failed internally and withheld the response; the failure is logged"
            )
            exchange.finish(chain, flow)

    def failed(self, flow):
        """
        The exchange failed (the API server or the client went away).
        """
        exchange = flow.metadata.get(KEY)
        if exchange is None or exchange.command is None or exchange.finished:
            return
        exchange.finish(self.frontend.chain, flow, error=flow.error.msg if flow.error else "the exchange failed")

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
            chunk, opened = bodies.body_chunk(content, content_type)
        original = chunk.data
        try:
            await wait(self.frontend.chain.result(exchange.session, exchange.command, chunk), self.frontend.loop)
        except ChainBroken as error:
            self._withhold(flow, exchange, str(error))
            return
        data = bodies.body_bytes(chunk, opened)
        if data is not original:
            response.content = data

    def _withhold(self, flow, exchange, reason):
        self.log.error("Withholding a Kubernetes response: {reason}", reason=reason)
        exchange.withhold(flow, 500, reason)


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
