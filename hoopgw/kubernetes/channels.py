"""
The channel protocols of C{kubectl exec} and C{attach} over WebSocket
(C{v5.channel.k8s.io} that kubectl 1.30+ speaks, C{v4.channel.k8s.io},
C{channel.k8s.io} and C{base64.channel.k8s.io}): each message is one
channel's bytes behind a channel byte.
"""

import base64
import binascii
import json

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


def terminal_size(data):
    """
    The size a resize message (C{{"Width": w, "Height": h}}) asks for.

    @return: C{(width, height)}, or None if the message does not parse.
    """
    try:
        size = json.loads(data)
        return int(size["Width"]), int(size["Height"])
    except (ValueError, KeyError, TypeError):
        return None
