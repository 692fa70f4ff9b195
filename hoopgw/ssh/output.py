"""
The target's side of an SSH session channel, on its way to the client:
stdout and stderr through the chain's result hooks (in order, one chunk at
a time, holding the target while an addon works; an addon that fails cuts
the output), then the exit status or signal, the end of file and the
close, each passed on only after what came before it.
"""

import collections
import struct

from twisted.logger import Logger

from hoopgw import admission
from hoopgw.chain import ChainBroken
from hoopgw.model import EXITED, INTERRUPTED, SIGNALLED, WITHHELD, ResultChunk
from hoopgw.ssh.publickeys import Reader, WireError, string


_STREAMS = ("stdout", "stderr")


class TargetOutput:
    """
    What the target sends on one session channel (a
    L{hoopgw.ssh.channels.SessionChannel}), relayed to its client.

    @ivar counts: the bytes of stdout and stderr the target sent.
    @ivar done: whether the target closed the channel and all it sent
        before went out.
    """

    log = Logger()

    def __init__(self, channel):
        self.channel = channel
        self.counts = {"stdout": 0, "stderr": 0}
        self.done = False
        self._hooks = channel.chain.has("result_received")
        self._pipeline = collections.deque()
        self._busy = None
        self._withheld = False
        self._finals_sent = False

    @property
    def command(self):
        return self.channel.command

    def output(self, stream, data):
        channel = self.channel
        self.counts[stream] += len(data)
        if channel.sftp is not None and stream == "stdout":
            channel.sftp.target_data(data)
            return
        if not self._hooks and self._busy is None and not self._pipeline:
            self._emit(stream, data)
            return
        self._queue(("chunk", ResultChunk("stream", data=data, stream=stream)))

    def eof(self):
        self._queue_finals()
        self._queue(("eof", None))

    def exit(self, name, data):
        """
        The target's exit status or signal: recorded, and passed on as the
        gateway re-encodes it (the signal's message masked and redacted
        like any text from the target); a malformed one is not passed on.
        """
        if self.done:
            # Too late: the command's end is already recorded.
            return
        outcome = self.command.outcome
        try:
            reader = Reader(data)
            if name == b"exit-status":
                code = reader.uint32()
                outcome.update(status=EXITED, exit_status=code)
                data = struct.pack(">L", code)
            else:
                signal = admission.client_text(reader.string()[:32])
                core_dumped = reader.boolean()
                message = admission.client_text(reader.string())
                language = reader.string()[:32] if reader.remaining else b""
                outcome.update(status=SIGNALLED, signal=signal, core_dumped=core_dumped)
                if message:
                    outcome["error"] = message[:200]
                data = (
                    string(signal.encode("utf-8")) + bytes((core_dumped,)) + string(message.encode("utf-8"))
                    + string(language if language.isascii() else b"")
                )
        except WireError:
            outcome.update(status=EXITED, exit_status=None, error="the target sent a malformed %s" % (name.decode(),))
            return
        self._queue(("request", (name, data)))

    def closed(self):
        self._queue_finals()
        self._queue(("close", None))

    def _queue_finals(self):
        if self._finals_sent or not self._hooks or self.channel.sftp is not None:
            return
        self._finals_sent = True
        for stream in _STREAMS:
            self._queue(("chunk", ResultChunk("stream", data=b"", stream=stream, final=True)))

    def _queue(self, action):
        if self.done:
            return
        self._pipeline.append(action)
        if self._busy is None:
            self._drain()

    def _drain(self):
        channel = self.channel
        pipeline = self._pipeline
        while pipeline and self._busy is None and not self._withheld:
            kind, value = pipeline.popleft()
            if kind == "chunk":
                self._through_chain(value)
            elif kind == "eof":
                channel.send_eof()
            elif kind == "request":
                channel.send_request(*value)
            else:
                self._finished()
        if self._busy is None and channel.target is not None:
            channel.target.release("addon")

    def _through_chain(self, chunk):
        channel = self.channel
        try:
            waiting = channel.chain.result(channel.session, self.command, chunk)
        except ChainBroken as problem:
            self._withhold(problem)
            return
        if waiting is None:
            self._chunk_done(None, chunk)
            return
        self._busy = waiting
        if channel.target is not None:
            channel.target.hold("addon")
        waiting.addCallbacks(self._chunk_done, self._chunk_failed, callbackArgs=(chunk,))
        waiting.addCallback(self._resume_drain)

    def _chunk_done(self, _, chunk):
        self._busy = None
        self._emit(chunk.stream, chunk.data)

    def _chunk_failed(self, failure):
        self._busy = None
        if failure.check(ChainBroken):
            self._withhold(failure.value)
        else:
            self.channel.internal_error(failure)

    def _resume_drain(self, _):
        self._drain()

    def _emit(self, stream, data):
        if not data:
            return
        channel = self.channel
        if stream == "stdout":
            channel.send_data(data)
        else:
            channel.send_stderr(data)
        if channel.cast is not None:
            channel.cast.output(data)

    def _withhold(self, problem):
        """
        An addon failed on the output: nothing more of it may reach the
        client (fail closed).
        """
        channel = self.channel
        self.log.error("Withholding a command's output: {problem}", problem=str(problem))
        self._withheld = True
        self._pipeline.clear()
        self.command.outcome.update(status=WITHHELD, error=str(problem))
        channel.close_target()
        channel.send_stderr(("\r\nhoopgw withheld this command's output because %s\r\n" % (problem,)).encode("utf-8"))
        channel.send_close()
        channel.finish()

    def stop(self):
        """
        Nothing more of the target's reaches the client (it closed the
        channel and the wait for the target is over).
        """
        self.done = True
        self._pipeline.clear()

    def _finished(self):
        channel = self.channel
        self.done = True
        if channel.client_closed:
            # The client closed first, and what it waited for has gone out:
            # the command is over before the CLOSE that ends the channel.
            if "status" not in self.command.outcome:
                self.command.outcome.update(status=INTERRUPTED, reason="the client closed the channel")
            channel.finish()
            channel.send_close()
            return
        if not channel.sent_eof:
            channel.send_eof()
        channel.send_close()
        self.command.outcome.setdefault("status", "closed")
        channel.finish()
