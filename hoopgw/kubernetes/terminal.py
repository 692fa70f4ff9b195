"""
C{kubectl exec} and C{attach} over WebSocket, once the API server has
switched protocols: the client's input and terminal size recorded, the
API server's output through the chain's result hooks (masked as it
passes) and recorded, its status read for the exit code, and the
recording committed before the command's end.
"""

import json
import shlex

from twisted.logger import Logger

from hoopgw import cast as casts
from hoopgw.chain import ChainBroken
from hoopgw.kubernetes import bodies, channels, engine as engines
from hoopgw.kubernetes.exchange import JSON, KEY, wait
from hoopgw.model import ResultChunk


class Terminal:
    """
    The exec and attach sessions of a L{hoopgw.kubernetes.frontend.Frontend}.
    """

    log = Logger()

    def __init__(self, frontend):
        self.frontend = frontend

    def start(self, flow, exchange):
        """
        The API server switched protocols: record what follows, in a
        subprotocol the gateway can read.
        """
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
            exchange.withhold(
                flow, 502, "the API server chose the unknown subprotocol %r" % (exchange.subprotocol,), what="stream"
            )
            exchange.finish(self.frontend.chain, flow)

    async def message(self, flow):
        exchange = flow.metadata.get(KEY)
        message = flow.websocket.messages[-1]
        if exchange is None or exchange.cast is None or exchange.broken:
            message.drop()
            return
        try:
            await self._message(flow, exchange, message)
            # mitmproxy keeps every message of a flow; a long terminal
            # session must not grow without bound.
            del flow.websocket.messages[:-1]
        except Exception:
            self.log.failure("The Kubernetes front end failed on an exec message")
            message.drop()
            self.frontend.stream_broken(flow, exchange, "internal error")

    async def _message(self, flow, exchange, message):
        frame = channels.decode(exchange.subprotocol, message.content)
        if message.from_client:
            self._from_client(exchange.cast, frame)
            return
        try:
            await self._from_server(flow, exchange, message, frame)
        except ChainBroken as error:
            # The output goes no further; the client learns why on the error channel.
            message.content = channels.Frame(
                channels.ERROR,
                bodies.status(500, "hoopgw withheld the output because %s; the session is closed" % (error,)),
                frame.base64,
            ).encode()
            self.frontend.stream_broken(flow, exchange, str(error), delay=0.2)

    def _from_client(self, cast, frame):
        if frame.channel == channels.STDIN:
            cast.input(frame.data)
        elif frame.channel == channels.RESIZE:
            size = channels.terminal_size(frame.data)
            if size is not None:
                cast.resize(*size)

    async def _from_server(self, flow, exchange, message, frame):
        """
        @raise ChainBroken: an addon failed on the output.
        """
        hooks = self.frontend.result_hooks
        if frame.channel in (channels.STDOUT, channels.STDERR):
            if hooks:
                # A card number may go on in the stream's next frame: the
                # chain holds its start back until then.
                _replace(message, frame, await self._output(exchange, frame.channel, frame.data, final=False))
            exchange.cast.output(frame.data)
        elif frame.channel == channels.ERROR:
            # The status that ends the output: what was held back goes first.
            await self._release(flow, exchange, frame.base64, message.is_text)
            if not frame.data:
                return
            if hooks:
                # The API server's status (its message) is masked like its output.
                _replace(message, frame, await self._status(exchange, frame.data))
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

    async def _status(self, exchange, data):
        """
        The status that ends an exec through the chain's result hooks, as
        a JSON body.

        @return: the bytes to send.
        @raise ChainBroken: an addon failed on it.
        """
        chunk = ResultChunk("body", data=data, fields={"content_type": JSON, "exec_status": True})
        return await self._result(exchange, chunk)

    async def _output(self, exchange, channel, data, final):
        """
        One stream's output through the chain's result hooks.

        @return: the bytes to send now.
        @raise ChainBroken: an addon failed on it.
        """
        chunk = ResultChunk("stream", data=data, stream=channels.STREAMS[channel], final=final)
        return await self._result(exchange, chunk)

    async def _result(self, exchange, chunk):
        await wait(self.frontend.chain.result(exchange.session, exchange.command, chunk), self.frontend.loop)
        return chunk.data

    async def _held_back(self, exchange):
        """
        The end of each output stream through the chain, once: what the
        chain held back of it until then, as C{(channel, data)} for each
        stream with some.

        @raise ChainBroken: an addon failed on it.
        """
        exchange.released = True
        for channel in (channels.STDOUT, channels.STDERR):
            data = await self._output(exchange, channel, b"", final=True)
            if data:
                yield channel, data

    async def _release(self, flow, exchange, base64_framing, is_text):
        """
        The end of the output: what the chain held back sent (see
        L{engines.SEND_FIRST}) and recorded.
        """
        if not self.frontend.result_hooks or exchange.released:
            return
        first = []
        async for channel, data in self._held_back(exchange):
            exchange.cast.output(data)
            first.append((channels.Frame(channel, data, base64_framing).encode(), is_text))
        if first:
            flow.metadata[engines.SEND_FIRST] = first

    async def end(self, flow):
        """
        The WebSocket closed: the recording committed, then the command's
        end.
        """
        exchange = flow.metadata.get(KEY)
        if exchange is None or exchange.cast is None or exchange.finished:
            return
        frontend = self.frontend
        too_large = flow.metadata.get(engines.TOO_LARGE)
        if too_large and not exchange.broken:
            exchange.broken = too_large
        command = exchange.command
        if frontend.result_hooks and not exchange.released and not exchange.broken:
            # The stream closed without a status: what the chain still held
            # back can no longer be sent (and is not recorded as sent).
            unsent = 0
            try:
                async for _, data in self._held_back(exchange):
                    unsent += len(data)
            except ChainBroken as error:
                exchange.broken = str(error)
            if unsent:
                command.outcome["unsent_output_bytes"] = unsent
        # The recording is durable, and its digest in the outcome, before
        # the command's end event commits it.
        try:
            await wait(casts.commit(frontend.gateway.store, exchange.session, command, exchange.cast), frontend.loop)
        finally:
            exchange.finish(frontend.chain, flow)


def _replace(message, frame, data):
    """
    Send C{data} in place of C{frame}'s, if the chain changed it.
    """
    if data is not frame.data:
        frame.data = data
        message.content = frame.encode()


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
