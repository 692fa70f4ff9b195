"""
The channel protocols of C{kubectl exec} and C{attach} over WebSocket
(C{v5.channel.k8s.io} that kubectl 1.30+ speaks, C{v4.channel.k8s.io},
C{channel.k8s.io} and C{base64.channel.k8s.io}): each message is one
channel's bytes behind a channel byte; and the asciicast v2 recording a
terminal session leaves in the evidence store.
"""

import base64
import binascii
import json
import time

from hoopgw import redact

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
CLOSE = 255
STREAMS = {STDIN: "stdin", STDOUT: "stdout", STDERR: "stderr", ERROR: "error", RESIZE: "resize"}
BINARY_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io")
BASE64_PROTOCOLS = ("v4.base64.channel.k8s.io", "base64.channel.k8s.io")


class Frame:
    """
    One message of a channel protocol.

    @ivar channel: the channel number (L{STDIN}, L{STDOUT}, ...), or None
        when the message is not one of the protocol's.
    @ivar data: the channel's bytes.
    """

    __slots__ = ("channel", "data", "base64")

    def __init__(self, channel, data, base64_framing=False):
        self.channel = channel
        self.data = data
        self.base64 = base64_framing

    def encode(self):
        """
        The message again, with L{data} as it is now.
        """
        if self.base64:
            return (str(self.channel) + base64.b64encode(self.data).decode("ascii")).encode("ascii")
        return bytes((self.channel,)) + self.data


def decode(subprotocol, content):
    """
    Read one message of C{subprotocol}.

    @return: a L{Frame}; its channel is None if the message does not parse.
    """
    if not content:
        return Frame(None, b"")
    if subprotocol in BASE64_PROTOCOLS:
        try:
            channel = int(chr(content[0]))
            return Frame(channel, base64.b64decode(content[1:], validate=True), True)
        except (ValueError, binascii.Error):
            return Frame(None, content)
    return Frame(content[0], content[1:])


class Asciicast:
    """
    A terminal session as asciicast v2: a header line, then one
    C{[seconds, "o"|"i", text]} line per output or input.  Input is kept
    with card numbers, tokens and key=value secrets redacted; output is
    kept as the client saw it (after the chain masked it).
    """

    def __init__(self, command, width=80, height=24, now=None):
        self.started = now if now is not None else time.time()
        self.header = {
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": int(self.started),
            "command": command,
            "env": {"TERM": "xterm"},
        }
        self.lines = []
        self.output_bytes = 0
        self.input_bytes = 0

    def _offset(self, now):
        return round((now if now is not None else time.time()) - self.started, 6)

    def output(self, data, now=None):
        if data:
            self.output_bytes += len(data)
            self.lines.append(json.dumps([self._offset(now), "o", data.decode("utf-8", "replace")]))

    def input(self, data, now=None):
        if data:
            self.input_bytes += len(data)
            text, _ = redact.redact_text(data.decode("utf-8", "replace"))
            self.lines.append(json.dumps([self._offset(now), "i", text]))

    def resize(self, data):
        """
        A resize message ({"Width": w, "Height": h}): the first one sets
        the terminal size of the recording.
        """
        try:
            size = json.loads(data)
            width, height = int(size["Width"]), int(size["Height"])
        except (ValueError, KeyError, TypeError):
            return
        if not self.lines:
            self.header["width"], self.header["height"] = width, height

    def render(self):
        return ("\n".join([json.dumps(self.header)] + self.lines) + "\n").encode("utf-8")
