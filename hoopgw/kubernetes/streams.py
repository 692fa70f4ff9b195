"""
Responses the API server streams, passed to the client piece by piece
through the chain's result hooks: a watch's events and a followed log
(C{logs -f}).  mitmproxy calls a stream synchronously for each piece it
reads, so a result hook on a stream must answer at once: one that would
make it wait ends the stream.
"""

import json

from hoopgw.chain import ChainBroken, settled
from hoopgw.kubernetes import bodies
from hoopgw.kubernetes.exchange import JSON
from hoopgw.model import ResultChunk

# What a stream callable returns when it has nothing to send yet.  Not
# C{b""}: mitmproxy writes each returned chunk as it is, and an empty
# chunk of a chunked HTTP/1.1 response is the one that ends it.
_NOTHING_YET = ()


def _chunks(data, final=False):
    """
    What a stream callable returns to send C{data}: the end of the
    response is always written, so what was held back goes out before the
    chunk that ends it.
    """
    if final:
        return data
    return [data] if data else _NOTHING_YET


class _Stream:
    """
    One streamed response of a L{hoopgw.kubernetes.frontend.Frontend},
    called by mitmproxy with each piece the API server sends, then with
    C{b""} at its end.
    """

    what = "stream"

    def __init__(self, frontend, flow, exchange):
        self.frontend = frontend
        self.flow = flow
        self.exchange = exchange

    def __call__(self, data):
        if self.exchange.broken:
            return _NOTHING_YET
        return self._piece(data, final=not data)

    def _through_chain(self, chunk):
        """
        C{chunk} through the chain's result hooks, at once.

        @return: False if the stream may not go on (and is being ended).
        """
        frontend, exchange = self.frontend, self.exchange
        try:
            waiting = frontend.chain.result(exchange.session, exchange.command, chunk)
        except ChainBroken as error:
            frontend.stream_broken(self.flow, exchange, str(error))
            return False
        if waiting is not None and not settled(waiting)[0]:
            waiting.cancel()
            frontend.stream_broken(self.flow, exchange, "an addon would make the %s wait" % (self.what,))
            return False
        return True


class WatchStream(_Stream):
    """
    A watch's events, one JSON object a line, each through the chain as it
    arrives.

    An event is read whole before any of it is sent, so an event cut
    across chunks waits for its end; one longer than C{limit} bytes ends
    the stream with an C{ERROR} event, as the API server ends a watch it
    cannot continue.
    """

    what = "watch stream"

    def __init__(self, frontend, flow, exchange, limit):
        _Stream.__init__(self, frontend, flow, exchange)
        self.limit = limit
        self.pending = b""

    def _piece(self, data, final):
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
        events, _ = self._events(data)
        return _chunks(events, final)

    def _events(self, data):
        """
        The whole lines of C{data} through the chain, up to the first the
        stream may not go on after.

        @return: what to send, and whether every line went through.
        """
        out = []
        for line in data.splitlines(keepends=True):
            filtered = self._event(line)
            if filtered is None:
                return b"".join(out), False
            out.append(filtered)
        return b"".join(out), True

    def _broken(self, reason, sent):
        """
        End the stream: the events before the bad one, then an C{ERROR}
        event saying why (kubectl prints its message).
        """
        events, whole = self._events(sent)
        if not whole:
            return _chunks(events)
        # After the ERROR event has been written.
        self.frontend.stream_broken(self.flow, self.exchange, reason, delay=0.2)
        return events + _error_event(500, "hoopgw ended the watch because %s" % (reason,))

    def _event(self, line):
        body, newline = (line[:-1], b"\n") if line.endswith(b"\n") else (line, b"")
        if not body.strip():
            return line
        chunk, opened = bodies.body_chunk(body, JSON)
        original = chunk.data
        chunk.fields["watch_event"] = True
        if not self._through_chain(chunk):
            return None
        data = bodies.body_bytes(chunk, opened)
        if data is original:
            return line
        return data + newline


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


class LogStream(_Stream):
    """
    C{logs -f}: each piece of text through the chain as it arrives, the
    last one marked final (what the masker held back comes out then).
    """

    what = "log stream"

    def _piece(self, data, final):
        chunk = ResultChunk("stream", data=data, stream="log", final=final)
        if not self._through_chain(chunk):
            return _NOTHING_YET
        return _chunks(chunk.data, final)
