"""
Terminal sessions recorded as asciicast v2 (the asciinema format): a
header line, then one JSON array per output, input or resize event.  Card
numbers are masked in both directions before anything is kept, and the
recording stops growing at a size limit.
"""

import codecs
import json
import time

from hoopgw import masking


class Cast:
    """
    One terminal session's recording, built as it happens.

    @ivar truncated: the size limit was reached; later events were dropped.
    """

    def __init__(self, width, height, term=None, title=None, command=None, started=None, limit=None, clock=time.time):
        self._clock = clock
        self.started = clock() if started is None else started
        header = {"version": 2, "width": int(width or 80), "height": int(height or 24), "timestamp": int(self.started)}
        if term:
            header["env"] = {"TERM": term}
        if title:
            header["title"] = title
        if command:
            header["command"] = command
        self._lines = [_line(header)]
        self._size = len(self._lines[0])
        self._limit = limit
        self._maskers = {"o": masking.StreamMasker(), "i": masking.StreamMasker()}
        self._decoders = {code: codecs.getincrementaldecoder("utf-8")("replace") for code in ("o", "i")}
        self.truncated = False
        self.finished = False

    @property
    def masked(self):
        return self._maskers["o"].masked + self._maskers["i"].masked

    def output(self, data):
        self._stream("o", data)

    def input(self, data):
        self._stream("i", data)

    def resize(self, width, height):
        self._event("r", "%dx%d" % (width, height))

    def _stream(self, code, data, final=False):
        data, _ = self._maskers[code].feed(data, final=final)
        text = self._decoders[code].decode(data, final)
        if text:
            self._event(code, text)

    def _event(self, code, text):
        if self.truncated or self.finished:
            return
        line = _line([round(self._clock() - self.started, 6), code, text])
        if self._limit is not None and self._size + len(line) > self._limit:
            self.truncated = True
            note = "recording truncated at %d bytes" % (self._limit,)
            line = _line([round(self._clock() - self.started, 6), "m", note])
        self._lines.append(line)
        self._size += len(line)

    def finish(self):
        """
        Release what the maskers held back and return the recording.

        @rtype: L{bytes}
        """
        if not self.finished:
            for code in ("o", "i"):
                self._stream(code, b"", final=True)
            self.finished = True
        return b"".join(self._lines)


def _line(value):
    return (json.dumps(value, ensure_ascii=False, separators=(", ", ": ")) + "\n").encode("utf-8")


def read(data):
    """
    A recording's header and events, for replay and tests.

    @return: C{(header, [(time, code, text), ...])}.
    """
    lines = data.decode("utf-8").splitlines()
    header = json.loads(lines[0])
    return header, [tuple(json.loads(line)) for line in lines[1:] if line]
