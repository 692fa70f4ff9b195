"""
Terminal sessions (an SSH shell or a command run with a pty, a
C{kubectl exec} or C{attach}) recorded as asciicast v2, the asciinema
format: a JSON header line, then one JSON line per event,
C{[seconds since start, code, text]} with code C{"o"} (output), C{"i"}
(input), C{"r"} (resize, C{"COLSxROWS"}) or C{"m"} (a marker).

The one place that writes a recording (L{Recorder}, used by every front
end), stores and commits it (L{commit}), says where the chain commits it
(L{committed}) and reads it back (L{parse}, for verify, replay and export).

The convention: a recording belongs to the command that produced it.  It
is written to the store (C{write_attachment}, durably) before that
command's C{command.end} event, whose C{outcome} carries
C{"cast": {"name": NAME, "sha256": HEX, ...}}; so the chain commits to
each recording as soon as it is complete, a session may hold several
(several shell channels, several execs), and verify checks each one.
"""

import codecs
import json
import time

import attr
from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import logs, masking, redact

# The key of a command's outcome that commits its recording.
CAST = "cast"
# The key saying why a command's recording could not be stored.
CAST_ERROR = "cast_error"
# The most bytes one recording keeps unless its front end says otherwise.
DEFAULT_LIMIT = 64 * 1024 * 1024

log = Logger()


class _Masking:
    """
    What a recording passes through before anything is kept: card numbers
    masked on the stream (a PAN split across two chunks is still caught),
    then tokens and key=value secrets redacted in the text released.  The
    only place this module calls the masking engine.
    """

    def __init__(self):
        self._stream = masking.StreamMasker()

    @property
    def masked(self):
        return self._stream.masked

    def feed(self, data, final=False):
        """
        @return: the bytes that can be kept now.
        """
        return self._stream.feed(data, final=final)[0]

    @staticmethod
    def text(text):
        return redact.redact_secrets(text)


class Recorder:
    """
    One terminal session's recording, built as it happens.  Output and
    input are masked before they are kept; past C{limit} bytes the
    recording says it was cut and keeps nothing more.

    @ivar truncated: the size limit was reached; later events were dropped.
    @ivar masked: how many card numbers were masked, both directions.
    """

    def __init__(self, width=80, height=24, term=None, title=None, command=None, started=None, limit=DEFAULT_LIMIT,
                 clock=time.time):
        self._clock = clock
        self.started = clock() if started is None else started
        self.header = {
            "version": 2, "width": int(width or 80), "height": int(height or 24), "timestamp": int(self.started)
        }
        if term:
            self.header["env"] = {"TERM": term}
        if title:
            self.header["title"] = title
        if command:
            self.header["command"] = command
        self._lines = []
        self._size = len(_line(self.header))
        self._limit = limit
        self._masking = {"o": _Masking(), "i": _Masking()}
        self._decoders = {code: codecs.getincrementaldecoder("utf-8")("replace") for code in ("o", "i")}
        self.output_bytes = 0
        self.input_bytes = 0
        self.truncated = False
        self.finished = False

    @property
    def masked(self):
        return self._masking["o"].masked + self._masking["i"].masked

    def output(self, data):
        """
        Bytes the terminal printed (as the client received them).
        """
        self.output_bytes += len(data)
        self._stream("o", data)

    def input(self, data):
        """
        Bytes the client typed or sent.
        """
        self.input_bytes += len(data)
        self._stream("i", data)

    def resize(self, width, height):
        """
        The terminal's new size; before anything was recorded, the size
        the recording starts with.
        """
        if not self._lines:
            self.header["width"], self.header["height"] = int(width), int(height)
            return
        self._event("r", "%dx%d" % (width, height))

    def _stream(self, code, data, final=False):
        seam = self._masking[code]
        data = seam.feed(data, final=final)
        text = self._decoders[code].decode(data, final)
        if text:
            self._event(code, seam.text(text))

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
        return _line(self.header) + b"".join(self._lines)


def _line(value):
    return (json.dumps(value, ensure_ascii=False, separators=(", ", ": ")) + "\n").encode("utf-8")


def attachment_name(session, command):
    """
    The name a command's recording is stored under.
    """
    return "%s-%s.cast" % (session.id, command.id)


def commit(store, session, command, recorder):
    """
    Finish C{recorder}, write the recording to C{store} durably, and put
    its digest in C{command}'s outcome (L{CAST}), so that the command's end
    event commits it to the chain.  Finish the command only once this has
    fired.

    @return: a L{Deferred} firing with None; it does not fail: a recording
        that cannot be stored is said in the outcome (L{CAST_ERROR}).
    """
    data = recorder.finish()
    name = attachment_name(session, command)
    writing = defer.maybeDeferred(store.write_attachment, name, data)

    def written(digest):
        entry = {
            "name": name,
            "sha256": digest,
            "bytes": len(data),
            "output_bytes": recorder.output_bytes,
            "input_bytes": recorder.input_bytes,
        }
        if recorder.truncated:
            entry["truncated"] = True
            logs.limit_hit("terminal recording of command %s truncated" % (command.id,), "%d bytes" % (recorder._limit,),
                           session=session)
        command.outcome[CAST] = entry

    def failed(failure):
        logs.failed(log, failure, "Storing the terminal recording {name} failed", name=name)
        command.outcome[CAST_ERROR] = "the recording could not be stored: %s" % (
            redact.redact_text(failure.getErrorMessage())[0],)

    return writing.addCallbacks(written, failed)


def committed(event):
    """
    The recording an event of the chain commits: the C{outcome.cast} of a
    C{command.end}, or None.
    """
    if not isinstance(event, dict) or event.get("type") != "command.end":
        return None
    outcome = event.get("outcome")
    entry = outcome.get(CAST) if isinstance(outcome, dict) else None
    return entry if isinstance(entry, dict) else None


class CastError(Exception):
    """
    The recording is not an asciicast v2 file.
    """


@attr.s(frozen=True)
class Recording:
    """
    A recording read back: its header and its events, C{(seconds, code,
    text)}.
    """

    width = attr.ib()
    height = attr.ib()
    header = attr.ib()
    frames = attr.ib()

    @property
    def duration(self):
        return self.frames[-1][0] if self.frames else 0.0

    def text(self, code="o"):
        """
        Everything of one kind in one string: what the terminal printed
        (C{"o"}), or what was typed (C{"i"}).
        """
        return "".join(data for _, kind, data in self.frames if kind == code)


def parse(data):
    """
    @param data: the file's bytes.
    @raise CastError: naming the line that is not valid.
    """
    lines = data.decode("utf-8", "replace").splitlines()
    if not lines:
        raise CastError("the recording is empty")
    try:
        header = json.loads(lines[0])
    except ValueError:
        raise CastError("the recording's first line is not an asciicast header")
    if not isinstance(header, dict) or header.get("version") != 2:
        raise CastError("only asciicast version 2 recordings can be played")
    frames = []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            when, code, payload = json.loads(line)
            frames.append((float(when), str(code), str(payload)))
        except (ValueError, TypeError):
            raise CastError("line %d of the recording is not an asciicast event" % (number,))
    return Recording(width=header.get("width", 80), height=header.get("height", 24), header=header, frames=frames)
