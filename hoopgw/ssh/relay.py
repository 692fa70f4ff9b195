"""
SSH channels that relay between a client and a target with bounded
memory: a channel's output keeps its order (data, stderr, EOF, requests,
close) and waits for the peer's window, and its input can be held (the
window is not given back) while the other side cannot take more, a
decision is pending or an addon is busy with a result.
"""

import collections
import struct

from twisted.conch.ssh import channel, connection


# Generous windows keep a fast transfer from stalling on round trips;
# holding back a window is what bounds the gateway's memory.
WINDOW = 2 * 1024 * 1024
MAX_PACKET = 32768

_DATA, _STDERR, _EOF, _REQUEST, _CLOSE = range(5)


class RelayChannel(channel.SSHChannel):
    """
    A channel whose output is queued in order and sent as the peer's
    window allows, and whose input can be held for named reasons.

    Subclasses override L{blocked} and L{drained} to hold and release the
    channel that feeds this one.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("localWindow", WINDOW)
        kwargs.setdefault("localMaxPacket", MAX_PACKET)
        channel.SSHChannel.__init__(self, *args, **kwargs)
        self._outbox = collections.deque()
        self._holds = set()
        self._blocked = False
        self.sent_eof = False

    # Output, in order.

    def send_data(self, data):
        self._send_bytes(_DATA, data)

    def send_stderr(self, data):
        self._send_bytes(_STDERR, data)

    def _send_bytes(self, kind, data):
        if not data or self.localClosed:
            return
        if not self._outbox and len(data) <= self.remoteWindowLeft:
            self._send_now(kind, data)
        else:
            self._enqueue(kind, data)

    def send_eof(self):
        if not self.sent_eof:
            self.sent_eof = True
            self._enqueue(_EOF, None)

    def send_request(self, name, payload):
        self._enqueue(_REQUEST, (name, payload))

    def send_close(self):
        self._enqueue(_CLOSE, None)

    def write(self, data):
        self.send_data(data)

    def loseConnection(self):
        self.send_close()

    def _send_now(self, kind, data):
        size = max(self.remoteMaxPacket, 1)
        conn = self.conn
        if kind == _DATA:
            for offset in range(0, len(data), size):
                conn.sendData(self, data[offset : offset + size] if len(data) > size else data)
        else:
            for offset in range(0, len(data), size):
                conn.sendExtendedData(self, connection.EXTENDED_DATA_STDERR, data[offset : offset + size])
        self.remoteWindowLeft -= len(data)

    def _enqueue(self, kind, value):
        self._outbox.append((kind, value))
        self._flush()

    @property
    def is_open(self):
        """
        Whether the peer confirmed this channel (and it is not closed yet).
        """
        return self.conn is not None and self in self.conn.channelsToRemoteChannel

    def _flush(self):
        outbox = self._outbox
        while outbox:
            if self.localClosed or not self.is_open:
                outbox.clear()
                break
            kind, value = outbox[0]
            if kind == _DATA or kind == _STDERR:
                room = self.remoteWindowLeft
                if room <= 0:
                    self._block()
                    return
                if len(value) > room:
                    self._send_now(kind, value[:room])
                    outbox[0] = (kind, value[room:])
                    self._block()
                    return
                self._send_now(kind, value)
            elif kind == _EOF:
                self.conn.sendEOF(self)
            elif kind == _REQUEST:
                self.conn.sendRequest(self, value[0], value[1])
            else:
                self.conn.sendClose(self)
            outbox.popleft()
        if self._blocked:
            self._blocked = False
            self.drained()

    def _block(self):
        if not self._blocked:
            self._blocked = True
            self.blocked()

    def addWindowBytes(self, count):
        self.remoteWindowLeft += count
        self._flush()

    def blocked(self):
        """
        The peer's window is full and output is queued: hold whatever
        feeds this channel.
        """

    def drained(self):
        """
        The queue has drained: release what feeds this channel.
        """

    def closeReceived(self):
        # The peer takes nothing more: what is queued is dropped.
        self._outbox.clear()
        if self._blocked:
            self._blocked = False
            self.drained()
        if not self.localClosed:
            self.conn.sendClose(self)

    # Input, held for reasons.

    def hold(self, reason):
        self._holds.add(reason)

    def release(self, reason):
        if reason in self._holds:
            self._holds.discard(reason)
            if not self._holds and self.conn is not None:
                self.conn.replenish(self)

    @property
    def held(self):
        return bool(self._holds)


class ChannelBooks:
    """
    Mixed into an L{SSHConnection}: the peer's answer to a channel open is
    taken only for a channel being opened.  Conch takes it for any channel,
    and a channel answered twice (refused after it was confirmed, say)
    leaves its books while still open, which raises when the connection
    ends.

    @ivar peer: who is on the other side (C{"client"}, C{"target"}), for
        the error.
    """

    peer = "peer"

    def _opening(self, packet, what):
        """
        @raise ValueError: naming what the peer did, when the channel named
            is not one being opened (the transport ends the connection
            for a message it cannot take).
        """
        (local,) = struct.unpack(">L", packet[:4])
        channel_ = self.channels.get(local)
        if channel_ is None or channel_ in self.channelsToRemoteChannel:
            raise ValueError("the %s %s channel %d, which is not being opened" % (self.peer, what, local))

    def ssh_CHANNEL_OPEN_CONFIRMATION(self, packet):
        self._opening(packet, "confirmed")
        connection.SSHConnection.ssh_CHANNEL_OPEN_CONFIRMATION(self, packet)

    def ssh_CHANNEL_OPEN_FAILURE(self, packet):
        self._opening(packet, "refused")
        connection.SSHConnection.ssh_CHANNEL_OPEN_FAILURE(self, packet)


class FlowControl:
    """
    Mixed into an L{SSHConnection}: a channel's window is given back only
    while the channel is not held, so a slow peer slows its sender down
    instead of filling the gateway's memory.
    """

    def ssh_CHANNEL_DATA(self, packet):
        local, length = struct.unpack(">2L", packet[:8])
        channel_ = self.channels[local]
        if length > channel_.localWindowLeft or length > channel_.localMaxPacket:
            self._log.error("The peer sent more data than the window allows; closing the channel")
            self.sendClose(channel_)
            return
        channel_.localWindowLeft -= length
        channel_.dataReceived(packet[8 : 8 + length])
        self.replenish(channel_)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet):
        local, code, length = struct.unpack(">3L", packet[:12])
        channel_ = self.channels[local]
        if length > channel_.localWindowLeft or length > channel_.localMaxPacket:
            self._log.error("The peer sent more data than the window allows; closing the channel")
            self.sendClose(channel_)
            return
        channel_.localWindowLeft -= length
        channel_.extReceived(code, packet[12 : 12 + length])
        self.replenish(channel_)

    def replenish(self, channel_):
        if channel_.localClosed or getattr(channel_, "held", False):
            return
        left = channel_.localWindowLeft
        if left < channel_.localWindowSize // 2:
            self.adjustWindow(channel_, channel_.localWindowSize - left)

