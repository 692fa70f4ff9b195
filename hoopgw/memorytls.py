"""
TLS over a connection that is already open, with the standard library's
L{ssl.SSLObject} on memory buffers.

A protocol that has to switch to TLS in the middle of its own exchange
(PostgreSQL's SSLRequest) could use C{ITLSTransport.startTLS}.  This layer
costs less and delivers more at once:

    - the standard library's C{ssl} module encrypts and decrypts a record
      in about half the time pyOpenSSL's bindings take;
    - everything one read from the socket decrypts (several TLS records)
      reaches the protocol in one C{dataReceived}, so that work done per
      delivery, such as scanning rows for card numbers, is done per
      socket read and not per record;
    - a write is encrypted when it is made, without the timer Twisted's TLS
      layer starts to gather small writes (callers here already gather),
      and sent at once when nothing is waiting before it (L{send_now}).

The protocol keeps its TCP transport: it passes what it receives through
L{MemoryTLS.receive} and writes through the L{MemoryTLS}, which it uses as
its transport from then on.
"""

import ssl

from OpenSSL import crypto
from zope.interface import implementer

from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport


class TLSFailed(Exception):
    """
    The TLS handshake or a record failed; C{str()} says why (a certificate
    that does not verify, a protocol error), never a secret.
    """


def client_context(verify, ca_file=None, check_hostname=True):
    """
    An L{ssl.SSLContext} for connecting to a server.

    @param verify: whether the server's certificate must chain to
        C{ca_file}; without it the connection is encrypted but the server
        not authenticated (libpq's C{sslmode=require}).
    @param check_hostname: whether the certificate must also name the
        server (C{verify-full}).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        context.load_verify_locations(cafile=ca_file)
        context.check_hostname = check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def server_context(certificate, key, client_ca=None):
    """
    An L{ssl.SSLContext} for serving clients: the certificate file (with
    any intermediates after it) and its key; with C{client_ca}, clients
    may present a certificate, which must then chain to it.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


@implementer(ITransport, IConsumer, IPushProducer)
class MemoryTLS:
    """
    TLS over an open TCP transport, as the client (call L{start}) or as the
    server (the client's hello arrives through L{receive}).

    @ivar handshake_done: whether the handshake has finished; until it has,
        writes are held and sent after it.
    """

    def __init__(self, transport, context, server_side=False, server_hostname=None):
        self.transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._held = []
        self.handshake_done = False
        self._closing = False

    def start(self):
        """
        Send the ClientHello.
        """
        self._handshake()

    def getPeerCertificate(self):
        """
        The certificate the peer presented and the handshake verified, as
        pyOpenSSL's C{X509} (what Twisted's TLS transports return), or
        None.
        """
        if not self.handshake_done:
            return None
        der = self._tls.getpeercert(binary_form=True)
        if der is None:
            return None
        return crypto.load_certificate(crypto.FILETYPE_ASN1, der)

    def _handshake(self):
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as error:
            self._flush()
            raise TLSFailed(_describe(error))
        self.handshake_done = True
        held, self._held = self._held, []
        if held:
            self.writeSequence(held)
        else:
            self._flush()

    def receive(self, data):
        """
        Take bytes from the socket.

        @return: the plaintext they complete, all of it in one piece
            (C{b""} when they complete none).
        @raise TLSFailed: when the handshake or a record fails.
        """
        self._incoming.write(data)
        if not self.handshake_done:
            self._handshake()
            if not self.handshake_done:
                return b""
        pieces = []
        read = self._tls.read
        # With no more bytes yet, read raises SSLWantReadError; an empty
        # read is the peer's close_notify (the ssl module's clean end).
        closed = False
        try:
            while True:
                piece = read(262144)
                if not piece:
                    closed = True
                    break
                pieces.append(piece)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            closed = True
        except ssl.SSLError as error:
            self._flush()
            raise TLSFailed(_describe(error))
        if self._outgoing.pending:
            # Answers the peer asked for (a key update).
            self._flush()
        if closed:
            # The peer sends nothing more.  One that says so and keeps the
            # TCP connection open (asyncio waits up to 30 s for the
            # answering alert) would otherwise leave the session, and the
            # client behind it, waiting: close our side now; what the peer
            # sent before the alert is still handed on (Twisted closes
            # after this call returns).
            self.loseConnection()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _flush(self):
        if self._outgoing.pending:
            self.transport.write(self._outgoing.read())

    # ITransport

    def write(self, data):
        if not self.handshake_done:
            self._held.append(data)
            return
        if self._closing:
            return
        self._tls.write(data)
        send_now(self.transport, self._outgoing.read())

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseConnection(self):
        """
        Send the close_notify alert, then close.
        """
        if self.handshake_done and not self._closing:
            self._closing = True
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass
            self._flush()
        self.transport.loseConnection()

    def abortConnection(self):
        self.transport.abortConnection()

    def getPeer(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    @property
    def connected(self):
        return self.transport.connected

    @property
    def disconnecting(self):
        return self.transport.disconnecting or self._closing

    # IConsumer, IPushProducer: the TCP transport's own.

    def registerProducer(self, producer, streaming):
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self):
        self.transport.unregisterProducer()

    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        self.transport.stopProducing()


def _describe(error):
    reason = getattr(error, "verify_message", None) or getattr(error, "reason", None) or str(error)
    if isinstance(error, ssl.SSLCertVerificationError):
        return "certificate verify failed: %s" % (reason,)
    return "TLS failed: %s" % (reason,)


def send_now(transport, data):
    """
    Write C{data} to a TCP transport, sending what the socket takes at once
    when nothing is buffered before it.

    Twisted's C{write} always buffers and sends on the next writable event:
    an answer of a few hundred bytes then costs two changes of the poll set
    and a turn of the loop.  What the socket does not take, and anything
    written while data is buffered, goes through C{write} as usual (order,
    back-pressure and error handling are Twisted's).  A transport without
    the attributes this reads is simply written to.
    """
    if (
        getattr(transport, "_tempDataLen", None) == 0
        and getattr(transport, "dataBuffer", None) == b""
        and transport.connected
        and not transport.disconnecting
        and not getattr(transport, "_writeDisconnected", True)
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
    if data:
        transport.write(data)
