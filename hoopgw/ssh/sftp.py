"""
The sftp subsystem, relayed packet by packet between the client and the
target's sftp-server (SFTP version 3, as OpenSSH speaks it): every
operation that reads or changes files (open, list, remove, rename,
mkdir, rmdir, setstat, symlink, links and copies) is a L{Command} through
the chain, refused with SSH_FX_PERMISSION_DENIED when denied; reads and
writes are counted against the open that allowed them and recorded when
the file is closed.  File contents pass unchanged (not masked).
"""

import collections
import struct

from twisted.internet import defer
from twisted.logger import Logger

from hoopgw.model import DENIED, INTERRUPTED, OK
from hoopgw.ssh.commands import sftp_command
from hoopgw.ssh.publickeys import Reader, WireError, string


INIT, VERSION, OPEN, CLOSE, READ, WRITE, LSTAT, FSTAT, SETSTAT, FSETSTAT = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10
OPENDIR, READDIR, REMOVE, MKDIR, RMDIR, REALPATH, STAT, RENAME, READLINK, SYMLINK = range(11, 21)
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
EXTENDED, EXTENDED_REPLY = 200, 201

FX_OK, FX_EOF, FX_PERMISSION_DENIED, FX_FAILURE = 0, 1, 3, 4
STATUS_NAMES = {
    0: "ok",
    1: "eof",
    2: "no-such-file",
    3: "permission-denied",
    4: "failure",
    5: "bad-message",
    6: "no-connection",
    7: "connection-lost",
    8: "operation-unsupported",
}

OPEN_READ, OPEN_WRITE, OPEN_APPEND, OPEN_CREAT, OPEN_TRUNC, OPEN_EXCL = 1, 2, 4, 8, 16, 32
_FLAG_NAMES = ((OPEN_READ, "read"), (OPEN_WRITE, "write"), (OPEN_APPEND, "append"), (OPEN_CREAT, "create"),
               (OPEN_TRUNC, "truncate"), (OPEN_EXCL, "exclusive"))

_REPLIES = frozenset([STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED_REPLY])

# Extensions that only read metadata or flush what is already allowed:
# relayed without a command.
_PASSIVE_EXTENSIONS = frozenset(
    [
        b"statvfs@openssh.com",
        b"fstatvfs@openssh.com",
        b"limits@openssh.com",
        b"expand-path@openssh.com",
        b"home-directory",
        b"users-groups-by-id@openssh.com",
        b"fsync@openssh.com",
    ]
)

# OpenSSH's sftp-server accepts messages up to 256 KiB.
MAX_PACKET = 256 * 1024 + 1024


class ProtocolError(Exception):
    """
    The sftp stream is malformed; the channel is closed.
    """


def status(request_id, code, message):
    """
    An SSH_FXP_STATUS reply.
    """
    payload = bytes((STATUS,)) + struct.pack(">LL", request_id, code) + string(message.encode("utf-8")) + string(b"")
    return struct.pack(">L", len(payload)) + payload


def split_packets(buffer):
    """
    Take the complete packets off the front of C{buffer} (a bytearray).

    @return: a list of packets, each with its length prefix.
    @raise ProtocolError: for a packet larger than sftp allows.
    """
    packets = []
    position = 0
    end = len(buffer)
    while end - position >= 4:
        length = struct.unpack_from(">L", buffer, position)[0]
        if length < 1 or length > MAX_PACKET:
            raise ProtocolError("an sftp packet of %d bytes is larger than allowed" % (length,))
        stop = position + 4 + length
        if stop > end:
            break
        packets.append(bytes(buffer[position:stop]))
        position = stop
    if position:
        del buffer[:position]
    return packets


def _path(value):
    return value.decode("utf-8", "surrogateescape")


class _Handle:
    __slots__ = ("command", "read", "written")

    def __init__(self, command):
        self.command = command
        self.read = 0
        self.written = 0


class SftpRelay:
    """
    The sftp stream of one channel.

    @param front: the client-facing channel: it has C{session}, C{chain},
        C{avatar}, C{target} (the target-facing channel) and C{send_data},
        C{hold}, C{release}.
    """

    log = Logger()

    def __init__(self, front):
        self.front = front
        self.chain = front.chain
        self.session = front.session
        self._from_client = bytearray()
        self._from_target = bytearray()
        self._queue = collections.deque()
        self._waiting = None
        self._requests = {}
        self._handles = {}
        self.operations = 0
        self.closed = False

    # Client to target.

    def client_data(self, data):
        self._from_client += data
        try:
            self._queue.extend(split_packets(self._from_client))
        except ProtocolError as problem:
            self.front.sftp_broken(str(problem))
            return
        self._pump()

    def _pump(self):
        while self._queue and self._waiting is None and not self.closed:
            packet = self._queue.popleft()
            try:
                waiting = self._client_packet(packet)
            except (WireError, IndexError, struct.error):
                self.front.sftp_broken("a malformed sftp request from the client")
                return
            if waiting is not None:
                self._waiting = waiting
                self.front.hold("sftp-decision")
                waiting.addCallback(self._resume).addErrback(self.front.internal_error)

    def _resume(self, _):
        self._waiting = None
        self.front.release("sftp-decision")
        self._pump()

    def _client_packet(self, packet):
        kind = packet[4]
        if kind == INIT or len(packet) < 9:
            return self._forward(packet)
        reader = Reader(packet, 5)
        request_id = reader.uint32()
        if kind == WRITE:
            handle = reader.string()
            reader.uint64()
            length = reader.uint32()
            state = self._handles.get(handle)
            if state is not None:
                state.written += length
            return self._forward(packet)
        if kind == READ or kind == CLOSE:
            handle = reader.string()
            if handle in self._handles:
                self._requests[request_id] = ("read" if kind == READ else "close", handle)
            return self._forward(packet)
        if kind == OPEN:
            path = _path(reader.string())
            flags = reader.uint32()
            writing = bool(flags & (OPEN_WRITE | OPEN_APPEND | OPEN_CREAT | OPEN_TRUNC))
            access = "read-write" if writing and flags & OPEN_READ else "write" if writing else "read"
            command = sftp_command(
                "open",
                path,
                access=access,
                transfer="upload" if writing else "download",
                flags=[name for bit, name in _FLAG_NAMES if flags & bit],
            )
            return self._submit(command, request_id, packet, "open")
        if kind == OPENDIR:
            return self._submit(sftp_command("list", _path(reader.string())), request_id, packet, "open")
        if kind in (REMOVE, MKDIR, RMDIR, SETSTAT):
            operation = {REMOVE: "remove", MKDIR: "mkdir", RMDIR: "rmdir", SETSTAT: "setstat"}[kind]
            return self._submit(sftp_command(operation, _path(reader.string())), request_id, packet, "command")
        if kind == RENAME or kind == SYMLINK:
            first = _path(reader.string())
            second = _path(reader.string())
            operation = "rename" if kind == RENAME else "symlink"
            return self._submit(sftp_command(operation, first, target=second), request_id, packet, "command")
        if kind == EXTENDED:
            return self._extended(reader, request_id, packet)
        return self._forward(packet)

    def _extended(self, reader, request_id, packet):
        name = reader.string()
        if name in _PASSIVE_EXTENSIONS:
            return self._forward(packet)
        if name in (b"posix-rename@openssh.com", b"hardlink@openssh.com"):
            first = _path(reader.string())
            second = _path(reader.string())
            operation = "rename" if name.startswith(b"posix-rename") else "hardlink"
            command = sftp_command(operation, first, target=second, extension=name.decode("ascii"))
        elif name == b"lsetstat@openssh.com":
            command = sftp_command("setstat", _path(reader.string()), extension=name.decode("ascii"))
        elif name == b"copy-data":
            command = sftp_command("copy", extension=name.decode("ascii"))
        else:
            command = sftp_command("extended", extension=name.decode("utf-8", "replace"))
        return self._submit(command, request_id, packet, "command")

    def _forward(self, packet):
        self.front.target.send_data(packet)
        return None

    def _submit(self, command, request_id, packet, kind):
        self.operations += 1
        self.front.avatar.pending.add(self.front)
        decision = self.chain.submit(self.session, command)
        if isinstance(decision, defer.Deferred):
            return decision.addCallback(self._decided, command, request_id, packet, kind)
        self._decided(decision, command, request_id, packet, kind)
        return None

    def _decided(self, decision, command, request_id, packet, kind):
        self.front.avatar.pending.discard(self.front)
        if self.closed:
            command.outcome.update(status=INTERRUPTED, reason="the sftp session ended before it ran")
            self.chain.finish(self.session, command)
            return
        if decision.denied:
            command.outcome.update(status=DENIED)
            self.chain.finish(self.session, command)
            reason = "hoopgw denied this: %s" % (decision.reason,)
            self.front.send_data(status(request_id, FX_PERMISSION_DENIED, reason))
            return
        self._requests[request_id] = (kind, command)
        self._forward(packet)

    # Target to client.

    def target_data(self, data):
        self._from_target += data
        try:
            packets = split_packets(self._from_target)
        except ProtocolError as problem:
            self.front.sftp_broken("the target's sftp server: %s" % (problem,))
            return
        for packet in packets:
            if len(packet) >= 9 and packet[4] in _REPLIES:
                entry = self._requests.pop(struct.unpack_from(">L", packet, 5)[0], None)
                if entry is not None:
                    try:
                        self._answered(entry, packet)
                    except (WireError, IndexError, struct.error):
                        self.front.sftp_broken("a malformed sftp reply from the target")
                        return
        if packets:
            self.front.send_data(packets[0] if len(packets) == 1 else b"".join(packets))

    def _answered(self, entry, packet):
        kind, value = entry
        reply = packet[4]
        if kind == "read":
            state = self._handles.get(value)
            if state is not None and reply == DATA:
                state.read += struct.unpack_from(">L", packet, 9)[0]
            return
        if kind == "close":
            state = self._handles.pop(value, None)
            if state is not None:
                outcome = self._status_outcome(packet) if reply == STATUS else {"status": OK}
                outcome.update(bytes_read=state.read, bytes_written=state.written)
                state.command.outcome.update(outcome)
                self.chain.finish(self.session, state.command)
            return
        command = value
        if kind == "open" and reply == HANDLE:
            self._handles[Reader(packet, 9).string()] = _Handle(command)
            return
        command.outcome.update(self._status_outcome(packet) if reply == STATUS else {"status": OK})
        self.chain.finish(self.session, command)

    @staticmethod
    def _status_outcome(packet):
        reader = Reader(packet, 9)
        code = reader.uint32()
        outcome = {"status": OK if code == FX_OK else "error", "code": STATUS_NAMES.get(code, str(code))}
        if code != FX_OK and reader.remaining >= 4:
            outcome["message"] = reader.string().decode("utf-8", "replace")[:200]
        return outcome

    def close(self, reason):
        """
        The channel is gone: what is still open or pending is recorded as
        interrupted.
        """
        if self.closed:
            return
        self.closed = True
        if self._waiting is not None:
            self._waiting.cancel()
        for state in self._handles.values():
            state.command.outcome.update(
                status=INTERRUPTED, reason=reason, bytes_read=state.read, bytes_written=state.written
            )
            self.chain.finish(self.session, state.command)
        self._handles.clear()
        for kind, value in self._requests.values():
            if kind in ("open", "command"):
                value.outcome.update(status=INTERRUPTED, reason=reason)
                self.chain.finish(self.session, value)
        self._requests.clear()
