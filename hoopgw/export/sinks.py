"""
Where exported events go.  A sink's C{deliver(documents)} returns a
Deferred that fires once the receiver has everything in the batch (then
the cursor moves past it) or fails (then the same batch is tried again
later).  C{documents} is a list of C{(event, body)}: the record's event
and the bytes to send for it (native or OCSF JSON).
"""

import io
import os
import socket
import time

import orjson
from twisted.internet import defer, error, protocol, ssl, threads
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.logger import Logger
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from hoopgw.export.config import FACILITIES
from hoopgw.store import events as chaining

# RFC 5424 severities.
NOTICE, INFO, WARNING = 5, 6, 4
# An enterprise number reserved for documentation (RFC 5612): the
# structured data element that carries the chain's facts.
SD_ID = "hoopgw@32473"
# A receiver's answer is read for its error message, never more than this.
MAX_ANSWER = 16384


class DeliveryError(Exception):
    """
    The receiver did not take the batch; the message says why.
    """


def _tls_options(server_name, ca, certificate, key):
    """
    TLS client options: the receiver's certificate checked against C{ca}
    (or the system's roots), and our certificate when mutual TLS is asked.
    """
    trust = None
    if ca:
        with open(ca, "rb") as handle:
            authorities = [ssl.Certificate.loadPEM(block) for block in _pem_blocks(handle.read())]
        trust = ssl.trustRootFromCertificates(authorities)
    client = None
    if certificate:
        with open(certificate, "rb") as handle:
            chain = handle.read()
        with open(key, "rb") as handle:
            client = ssl.PrivateCertificate.loadPEM(handle.read() + b"\n" + _pem_blocks(chain)[0])
    return ssl.optionsForClientTLS(server_name, trustRoot=trust, clientCertificate=client)


def _pem_blocks(data):
    marker = b"-----END CERTIFICATE-----"
    return [block + marker + b"\n" for block in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


# ---------------------------------------------------------------- file


class FileSink:
    """
    Appends one JSON document a line to a file that log shippers tail;
    rotates it (PATH.1, PATH.2, ...) past C{max_bytes}, as logrotate does.
    """

    # A write that returned is delivered (see SinkRunner._resend_last).
    unacknowledged = False

    def __init__(self, config, reactor):
        self.config = config
        self.path = config.path
        self._reactor = reactor

    def deliver(self, documents):
        data = b"".join(body + b"\n" for _, body in documents)
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._write, data)

    def _write(self, data):
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size and size + len(data) > self.config.max_bytes:
            self._rotate()
            size = 0
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.config.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if self.config.fsync and not size:
            # A new file's (and a rotation's) names are durable too.
            folder = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def _rotate(self):
        backups = self.config.backups
        if backups == 0:
            os.unlink(self.path)
            return
        for number in range(backups - 1, 0, -1):
            older = "%s.%d" % (self.path, number)
            if os.path.exists(older):
                os.replace(older, "%s.%d" % (self.path, number + 1))
        os.replace(self.path, self.path + ".1")

    def close(self):
        pass


# ---------------------------------------------------------------- HTTPS


@implementer(IPolicyForHTTPS)
class _Policy:
    """
    The collector's certificate checked against the sink's C{ca}; the
    sink's client certificate offered (mutual TLS).
    """

    def __init__(self, config):
        self._config = config

    def creatorForNetloc(self, hostname, port):
        return _tls_options(hostname.decode("ascii"), self._config.ca, self._config.certificate, self._config.key)


class _Bounded(protocol.Protocol):
    """
    Collects at most L{MAX_ANSWER} bytes of a response body.
    """

    transport = None

    def __init__(self, done):
        self.done = done
        self.data = b""

    def dataReceived(self, data):
        if len(self.data) < MAX_ANSWER:
            self.data += data[: MAX_ANSWER - len(self.data)]
        else:
            self.transport.stopProducing()

    def connectionLost(self, reason):
        if not self.done.called:
            self.done.callback(self.data)


class HTTPSink:
    """
    POSTs each batch: a JSON array (preset C{json}, bearer token), or
    Splunk HTTP Event Collector events (preset C{splunk-hec}).  Any 2xx is
    delivery; anything else, or no answer in time, is tried again later.
    """

    # The 2xx is the collector's acknowledgement.
    unacknowledged = False

    log = Logger()

    def __init__(self, config, reactor, hostname=None):
        from twisted.web.client import Agent, HTTPConnectionPool

        self.config = config
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 1
        self._agent = Agent(reactor, contextFactory=_Policy(config), pool=self._pool, connectTimeout=config.timeout)
        self._host = hostname or socket.gethostname()
        self._inflight = set()
        self._closed = False
        self._sourcetype = config.sourcetype or "hoopgw:%s" % (config.format,)

    def body(self, documents):
        if self.config.preset == "splunk-hec":
            parts = []
            for event, body in documents:
                envelope = {
                    "time": round(chaining.epoch(event["ts"]), 6) if event.get("ts") else time.time(),
                    "host": self._host,
                    "source": "hoopgw",
                    "sourcetype": self._sourcetype,
                    "fields": {"hoopgw_seq": event.get("seq"), "hoopgw_type": event.get("type")},
                }
                if self.config.index:
                    envelope["index"] = self.config.index
                # The document goes in as it is (bytes), so a native line keeps its hash.
                parts.append(orjson.dumps(envelope)[:-1] + b',"event":' + body + b"}")
            return b"\n".join(parts)
        return b"[" + b",".join(body for _, body in documents) + b"]"

    @defer.inlineCallbacks
    def deliver(self, documents):
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        if self._closed:
            raise DeliveryError("the sink is closed: the gateway is stopping")

        headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"hoopgw-export"]})
        if self.config.token is not None:
            scheme = b"Splunk " if self.config.preset == "splunk-hec" else b"Bearer "
            headers.setRawHeaders(b"Authorization", [scheme + self.config.token.read_bytes().strip()])
        producer = FileBodyProducer(io.BytesIO(self.body(documents)), cooperator=_immediate(self._reactor))
        request = self._agent.request(b"POST", self.config.url.encode("ascii"), headers, producer)
        reading = []

        def give_up():
            # Before the answer's head: cancel the request; during its body
            # (a collector that never finishes it): cut the body.
            request.cancel()
            for body in reading:
                if body.transport is not None and not body.done.called:
                    body.transport.stopProducing()
                    body.done.errback(defer.CancelledError())

        timer = self._reactor.callLater(self.config.timeout, give_up)
        self._inflight.add(request)
        try:
            response = yield request
            done = defer.Deferred()
            body = _Bounded(done)
            reading.append(body)
            response.deliverBody(body)
            answer = yield done
        except defer.CancelledError:
            raise DeliveryError("no answer from %s within %gs" % (self.config.url, self.config.timeout))
        except Exception as failure:
            raise DeliveryError("POST to %s failed: %s" % (self.config.url, _describe(failure)))
        finally:
            self._inflight.discard(request)
            if timer.active():
                timer.cancel()
        if not 200 <= response.code < 300:
            # The collector's words go into the sink's state and, past its
            # lag bounds, into the record: short and printable only.
            said = "".join(c if 32 <= ord(c) < 127 else "?" for c in answer[:200].decode("utf-8", "replace"))
            raise DeliveryError("%s answered HTTP %d: %s" % (self.config.url, response.code, said))

    def close(self):
        self._closed = True
        for request in list(self._inflight):
            request.cancel()
        return self._pool.closeCachedConnections()


def _describe(failure):
    reasons = getattr(failure, "reasons", None)
    if reasons:
        return "; ".join(reason.getErrorMessage() for reason in reasons)
    return "%s: %s" % (type(failure).__name__, failure)


def _immediate(reactor):
    from twisted.internet import task

    return task.Cooperator(scheduler=lambda work: reactor.callLater(0, work), started=True)


# ---------------------------------------------------------------- syslog


def syslog_message(event, body, config, now=None):
    """
    One RFC 5424 message: the event's time, the type as MSGID, the chain's
    facts (seq, hash) as structured data, the document as the message.
    """
    severity = _severity(event)
    pri = FACILITIES[config.facility] * 8 + severity
    stamp = event.get("ts") or "-"
    msgid = _printable(event.get("type") or "-", 32)
    sd = '[%s seq="%s" hash="%s"]' % (SD_ID, event.get("seq", ""), event.get("hash", ""))
    header = "<%d>1 %s %s %s %d %s %s " % (
        pri, stamp, _printable(config.hostname, 255), _printable(config.app_name, 48), os.getpid(), msgid, sd,
    )
    return header.encode("ascii") + b"\xef\xbb\xbf" + body


def syslog_3164(event, body, config):
    """
    One RFC 3164 (BSD) message, for a UDP collector that reads nothing else.
    """
    pri = FACILITIES[config.facility] * 8 + _severity(event)
    stamp = time.strftime("%b %d %H:%M:%S", time.gmtime())
    stamp = stamp[:4] + stamp[4:6].replace("0", " ", 1) + stamp[6:]
    return ("<%d>%s %s %s[%d]: " % (pri, stamp, config.hostname, config.app_name, os.getpid())).encode("ascii") + body


def _severity(event):
    kind = event.get("type") or ""
    if kind in ("export.lagging", "store.recovered", "gateway.recovered") or kind.endswith(".refused"):
        return WARNING
    decision = event.get("decision") or {}
    if decision.get("verdict") not in (None, "allow", "approved"):
        return WARNING
    if kind.startswith("session.") or kind == "checkpoint":
        return NOTICE
    return INFO


def _printable(text, limit):
    cleaned = "".join(character if 33 <= ord(character) <= 126 else "_" for character in str(text))
    return (cleaned or "-")[:limit]


@implementer(IHandshakeListener)
class _Batch(protocol.Protocol):
    """
    Writes a batch of octet-counted frames, then closes its side.  The
    collector reads to the end and closes: a clean close means it read
    everything; a reset (it died, or stopped without reading) does not.
    Over TLS it writes once the handshake is done, so that closing never
    cuts a handshake short.
    """

    def __init__(self, data, done, tls):
        self._data = data
        self.done = done
        self._tls = tls
        self._written = False

    def connectionMade(self):
        if not self._tls:
            self.handshakeCompleted()

    def handshakeCompleted(self):
        self._written = True
        self.transport.write(self._data)
        if self._tls:
            # TLS sends close_notify and waits for the collector to end the
            # TCP connection (see SyslogSink.deliver).
            self.transport.loseConnection()
        else:
            # Only our side: the collector's own end (FIN, or a reset) is
            # what says whether it read everything.
            self.transport.loseWriteConnection()

    def dataReceived(self, data):
        # A syslog collector does not answer; whatever it sends is ignored.
        pass

    def connectionLost(self, reason):
        if self.done.called:
            return
        # Over TLS, the TCP connection's own end (see SyslogSink.deliver).
        reason = getattr(self.done, "_tcp_reason", reason)
        if self._written and reason.check(error.ConnectionDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)


@implementer(IHalfCloseableProtocol)
class _PlainBatch(_Batch):
    """
    A batch over plain TCP: our side closes (FIN) after the frames, and the
    batch is delivered when the collector then closes its side cleanly.
    """

    def readConnectionLost(self):
        # The collector closed its side after reading ours to the end.
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class SyslogSink:
    """
    RFC 5424 messages, octet-counted (RFC 6587 3.4.1), over TLS (RFC 5425)
    or plain TCP: one connection per batch, counted as delivered once the
    collector has closed it cleanly after reading it all.  Over UDP (RFC
    3164), a datagram per event, with no way to know it arrived.
    """

    def __init__(self, config, reactor):
        self.config = config
        self._reactor = reactor
        # A clean close is all syslog over TCP says: a collector killed
        # after reading a batch, before writing it all, closes cleanly too
        # (its kernel does).  The runner sends the last batch again after a
        # failure (see SinkRunner).
        self.unacknowledged = config.transport != "udp"
        self._udp = None
        # Deliveries under way (a stopping gateway cuts them).
        self._inflight = {}
        self._closed = False

    def frames(self, documents):
        out = []
        for event, body in documents:
            message = syslog_message(event, body, self.config)
            out.append(b"%d %s" % (len(message), message))
        return b"".join(out)

    def deliver(self, documents):
        if self._closed:
            return defer.fail(DeliveryError("the sink is closed: the gateway is stopping"))
        if self.config.transport == "udp":
            return self._deliver_udp(documents)
        endpoint = HostnameEndpoint(self._reactor, self.config.host, self.config.port, timeout=self.config.timeout)
        done = defer.Deferred()
        tls = self.config.transport == "tls"
        batch = _Batch if tls else _PlainBatch
        factory = protocol.Factory.forProtocol(lambda: batch(self.frames(documents), done, tls))
        if tls:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            options = _tls_options(self.config.server_name, self.config.ca, self.config.certificate, self.config.key)
            factory = TLSMemoryBIOFactory(options, True, factory)
        # A connection a batch: not a log line a batch.
        factory.noisy = False
        connecting = endpoint.connect(factory)
        timer = self._reactor.callLater(self.config.timeout, self._give_up, connecting, done)
        self._inflight[done] = connecting

        def connected(connection):
            # What a timeout aborts.
            done._transport = connection.transport
            if tls:
                # A collector closes TCP after reading everything, without
                # a TLS close_notify (rsyslog does): what tells a complete
                # delivery from a cut one is how the TCP connection ended,
                # which the TLS layer below the batch sees.
                lost = connection.connectionLost

                def tcp_lost(reason):
                    done._tcp_reason = reason
                    return lost(reason)

                connection.connectionLost = tcp_lost

        def failed_to_connect(failure):
            if not done.called:
                done.errback(failure)

        connecting.addCallbacks(connected, failed_to_connect)

        def settle(result):
            if timer.active():
                timer.cancel()
            self._inflight.pop(done, None)
            return result

        def explain(failure):
            raise DeliveryError(
                "syslog %s:%d (%s): %s" % (self.config.host, self.config.port, self.config.transport, failure.getErrorMessage())
            )

        return done.addBoth(settle).addErrback(explain)

    def _give_up(self, connecting, done, why=None):
        if done.called:
            return
        transport = getattr(done, "_transport", None)
        if transport is not None:
            transport.abortConnection()
        else:
            connecting.cancel()
        if not done.called:
            done.errback(DeliveryError(why or "no clean close within %gs" % (self.config.timeout,)))

    def _deliver_udp(self, documents):
        # In a thread: the collector's name is resolved (getaddrinfo blocks).
        return threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._send_udp, documents)

    def _send_udp(self, documents):
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self.config.host, self.config.port, type=socket.SOCK_DGRAM
            )[0]
            if self._udp is None or self._udp.family != family:
                self._udp = socket.socket(family, kind, proto)
            for event, body in documents:
                # A datagram has a size limit; RFC 3164 collectors keep 1024 bytes, most take far more.
                self._udp.sendto(syslog_3164(event, body, self.config)[:65000], address)
        except OSError as failure:
            raise DeliveryError("syslog udp %s:%d: %s" % (self.config.host, self.config.port, failure.strerror or failure))

    def close(self):
        self._closed = True
        for done, connecting in list(self._inflight.items()):
            self._give_up(connecting, done, "the gateway is stopping")
        if self._udp is not None:
            self._udp.close()
            self._udp = None


SINKS = {"file": FileSink, "https": HTTPSink, "syslog": SyslogSink}


def make_sink(config, reactor):
    return SINKS[config.type](config, reactor)
