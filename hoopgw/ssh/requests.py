"""
The requests a client sends on an SSH session channel: environment
variables and a pty are kept for the target; one exec, shell or subsystem
request becomes the channel's command; a window change or a signal is
passed on while the command runs; X11 and agent forwarding are refused.
Every request is read as untrusted input: a malformed one is refused.
"""

import struct

from hoopgw.model import Decision
from hoopgw.ssh import certificates
from hoopgw.ssh.commands import exec_command, refused_request, sftp_command, shell_command
from hoopgw.ssh.publickeys import Reader, WireError, string


class SessionRequests:
    """
    The requests of one client's session channel (a
    L{hoopgw.ssh.channels.SessionChannel}), which starts the command they
    make.

    @ivar env: the C{env} requests allowed, as received, for the target.
    @ivar pty: the pty asked for (C{term}, C{cols}, C{rows}, C{raw}), or
        None.
    """

    _HANDLERS = {
        b"env": "_env",
        b"pty-req": "_pty",
        b"exec": "_exec",
        b"shell": "_shell",
        b"subsystem": "_subsystem",
        b"window-change": "_window_change",
        b"signal": "_signal",
        b"x11-req": "_x11",
        b"auth-agent-req@openssh.com": "_agent",
    }

    def __init__(self, channel):
        self.channel = channel
        self.avatar = channel.avatar
        self.settings = channel.settings
        self.env = []
        self.pty = None

    def received(self, request_type, data):
        """
        @return: 1 if the request is granted, else 0 (unknown, malformed,
            too late or refused); a command's request may answer later.
        """
        method = self._HANDLERS.get(request_type)
        if method is None:
            return 0
        try:
            return getattr(self, method)(data)
        except (WireError, struct.error):
            # Malformed (a window-change shorter than its two sizes...):
            # refused, as OpenSSH's sshd refuses it.
            return 0

    # Kept for the target, before the command.

    def _env(self, data):
        reader = Reader(data)
        name = reader.string()
        reader.string()
        if self.channel.command is not None or not self.settings.forwards_env(name.decode("utf-8", "replace")):
            return 0
        self.env.append(data)
        return 1

    def _pty(self, data):
        if self.channel.command is not None:
            return 0
        reader = Reader(data)
        term = reader.text()
        cols, rows = reader.uint32(), reader.uint32()
        certificate = self.avatar.certificate
        if certificate is not None and not certificates.permits(certificate, "permit-pty"):
            self.avatar.refuse(
                refused_request("pty", "pty-req", term=term),
                "the certificate does not permit a pty (ssh-keygen -O permit-pty)",
                "certificate:permit-pty",
            )
            return 0
        self.pty = {"term": term, "cols": cols, "rows": rows, "raw": data}
        return 1

    # Passed on while the command runs.

    def _window_change(self, data):
        channel = self.channel
        cols, rows = struct.unpack(">2L", data[:8])
        if self.pty is not None:
            self.pty["cols"], self.pty["rows"] = cols, rows
        if channel.cast is not None:
            channel.cast.resize(cols, rows)
        if channel.running():
            channel.target.send_request(b"window-change", data)
        return 1

    def _signal(self, data):
        if self.channel.running():
            self.channel.target.send_request(b"signal", data)
            return 1
        return 0

    # Never allowed.

    def _x11(self, data):
        self.avatar.refuse(
            refused_request("x11-forwarding", "x11-req"), "X11 forwarding is never allowed through hoopgw"
        )
        return 0

    def _agent(self, data):
        self.avatar.refuse(
            refused_request("agent-forwarding", "auth-agent-req@openssh.com"),
            "agent forwarding is never allowed through hoopgw",
        )
        return 0

    # The command: one per channel.

    def _exec(self, data):
        if self.channel.command is not None:
            return 0
        line = Reader(data).string()
        command = exec_command(line.decode("utf-8", "surrogateescape"), self.avatar.login, self.pty is not None)
        if self.env:
            command.facts["env"] = sorted(Reader(raw).text() for raw in self.env)
        return self.channel.start(command, b"exec", string(line))

    def _shell(self, data):
        if self.channel.command is not None:
            return 0
        command = shell_command(self.avatar.login, self.pty is not None, self.pty and self.pty["term"])
        denial = None
        identity = self.channel.session.identity
        if not self.settings.shell_allowed(identity):
            denial = Decision.deny(
                "interactive shells are not allowed for %s identities on this connection; "
                "run a command instead (ssh %s@gateway COMMAND)" % (identity.kind, self.avatar.login),
                rule="shell",
                addon="gateway",
            )
        return self.channel.start(command, b"shell", b"", denial)

    def _subsystem(self, data):
        if self.channel.command is not None:
            return 0
        name = Reader(data).string()
        if name != b"sftp":
            command = refused_request("subsystem", "subsystem %s" % (name.decode("utf-8", "replace"),))
            denial = Decision.deny("only the sftp subsystem is relayed", rule="subsystem", addon="gateway")
            return self.channel.start(command, b"subsystem", data, denial)
        command = sftp_command("start")
        denial = None
        if not self.settings.sftp:
            denial = Decision.deny("sftp is not allowed on this connection", rule="sftp", addon="gateway")
        return self.channel.start(command, b"subsystem", data, denial)
