"""
A hostile PostgreSQL target: it logs the gateway in as a real server does
(trust authentication, the usual ParameterStatus messages, BackendKeyData,
ReadyForQuery), then answers each query with whatever bytes a test gives
it, malformed or not.  No real server sends such messages; a compromised or
buggy one could.
"""

import struct

from twisted.internet import protocol, reactor

from hoopgw.postgres import wire

PAN = "5105105105105100"
MASKED_PAN = "510510******5100"

# What PostgreSQL 15 sends after AuthenticationOk (trust), as recorded from
# the throwaway cluster.
LOGIN_STATUSES = (
    ("application_name", "hoopgw"),
    ("client_encoding", "UTF8"),
    ("DateStyle", "ISO, MDY"),
    ("default_transaction_read_only", "off"),
    ("in_hot_standby", "off"),
    ("integer_datetimes", "on"),
    ("IntervalStyle", "postgres"),
    ("is_superuser", "off"),
    ("server_encoding", "UTF8"),
    ("server_version", "15.5"),
    ("session_authorization", "app"),
    ("standard_conforming_strings", "on"),
    ("TimeZone", "Etc/UTC"),
)


def authentication(code, data=b""):
    return wire.message(b"R", wire.int32(code) + data)


def trust_login():
    return (
        authentication(0)
        + b"".join(wire.parameter_status(name, value) for name, value in LOGIN_STATUSES)
        + wire.backend_key_data(4242, 123456)
        + wire.ready_for_query(b"I")
    )


def row_description(*names):
    """
    A RowDescription of text columns.
    """
    body = struct.pack("!H", len(names))
    for name in names:
        body += wire.cstring(name) + struct.pack("!IhIhih", 0, 0, 25, -1, -1, 0)
    return wire.message(b"T", body)


def data_row(*values):
    return wire.encode_data_rows([[None if value is None else value.encode() for value in values]])


def raw_data_row(count, body):
    """
    A DataRow with a field count and a body as given, framed correctly.
    """
    return wire.message(b"D", struct.pack("!H", count) + body)


def command_complete(tag):
    return wire.message(b"C", wire.cstring(tag))


def result(*rows, columns=("x",)):
    """
    A whole simple-query answer: RowDescription, rows, CommandComplete,
    ReadyForQuery.
    """
    return (
        row_description(*columns)
        + b"".join(rows)
        + command_complete("SELECT %d" % (len(rows),))
        + wire.ready_for_query(b"I")
    )


class HostileTarget(protocol.Protocol):
    """
    One connection from the gateway.  The factory's C{login} answers the
    startup packet; C{answer(target, kind, payload)} each message after it.
    """

    def connectionMade(self):
        self.buffer = b""
        self.started = False
        self.factory.connections.append(self)

    def dataReceived(self, data):
        self.buffer += data
        if not self.started:
            if len(self.buffer) < 8:
                return
            length = wire.unpack_int32(self.buffer)
            if len(self.buffer) < length:
                return
            self.startup, self.buffer = self.buffer[:length], self.buffer[length:]
            self.started = True
            login = self.factory.login
            if login is not None:
                self.transport.write(login() if callable(login) else login)
        while len(self.buffer) >= 5:
            length = wire.unpack_int32(self.buffer, 1)
            if len(self.buffer) < length + 1:
                return
            kind, payload = self.buffer[:1], self.buffer[5 : length + 1]
            self.buffer = self.buffer[length + 1 :]
            self.factory.received.append((kind, payload))
            if kind == b"X":
                self.transport.loseConnection()
                return
            self.factory.answer(self, kind, payload)


class HostileTargetFactory(protocol.Factory):
    """
    @ivar replies: what to send for each query, by SQL text; a query not
        there is answered with C{default}.
    """

    protocol = HostileTarget

    def __init__(self, login=trust_login, replies=None, default=None):
        self.login = login
        self.replies = dict(replies or {})
        self.default = default if default is not None else result(data_row("1"))
        self.received = []
        self.connections = []

    def answer(self, target, kind, payload):
        if kind == b"Q":
            sql = payload.rstrip(b"\x00").decode()
            target.transport.write(self.replies.get(sql, self.default))


def listen(test, factory):
    """
    Listen on a loopback port for the length of C{test}.

    @return: the port number.
    """
    port = factory.listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    test.addCleanup(lambda: [connection.transport.abortConnection() for connection in factory.connections])
    return port.getHost().port
