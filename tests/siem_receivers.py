"""
Throwaway receivers for the SIEM export tests: a real rsyslogd taking
RFC 5425 (syslog over TLS), and an HTTPS collector (a small twisted.web
server playing the SIEM's HTTP endpoint).  Both can be stopped and started
again on the same port, as a real receiver restarts.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

from twisted.internet import defer, reactor, ssl, task
from twisted.web import resource, server

from testbed import pki
from tests.support import free_port

_pki = {}


def test_pki(directory):
    """
    A CA and a server certificate for 127.0.0.1/localhost, and a client
    certificate, written into C{directory}.
    """
    os.makedirs(directory, exist_ok=True)
    ca = pki.make_ca("hoopgw export test CA")
    ca_path = os.path.join(directory, "ca.pem")
    with open(ca_path, "wb") as handle:
        handle.write(ca.certificate_pem())
    server_cert, server_key = ca.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]).write(
        directory, "receiver"
    )
    client_cert, client_key = ca.issue("hoopgw-gateway", client=True, server=False).write(directory, "gateway")
    return {"ca": ca_path, "cert": server_cert, "key": server_key, "client_cert": client_cert, "client_key": client_key}


RSYSLOG_CONF = """
global(workDirectory="{work}" maxMessageSize="256k"
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
input(type="imtcp" port="{tcp_port}" address="127.0.0.1" streamDriver.name="ptcp" streamDriver.mode="0")
module(load="imudp")
input(type="imudp" port="{udp_port}" address="127.0.0.1")
template(name="exported" type="string" string="%msgid% %structured-data% %msg%\\n")
# Each message is written (to the page cache) before the next is read, so a
# message rsyslogd has read survives its being killed: what it acknowledged
# by closing cleanly is in the file.
main_queue(queue.type="Direct")
action(type="omfile" file="{output}" template="exported" flushOnTXEnd="on" asyncWriting="off")
"""


class Rsyslog:
    """
    An rsyslogd of the test's own (its configuration, pid file, work folder
    and port under a temporary folder), in the foreground, taking syslog
    over TLS and writing each message's MSGID, structured data and message
    to a file.
    """

    def __init__(self, directory, certificates):
        self.directory = directory
        os.makedirs(os.path.join(directory, "work"), exist_ok=True)
        self.port = free_port()
        self.udp_port = free_port()
        self.tcp_port = free_port()
        self.output = os.path.join(directory, "received.log")
        self.conf = os.path.join(directory, "rsyslog.conf")
        self.pidfile = os.path.join(directory, "rsyslogd.pid")
        with open(self.conf, "w") as handle:
            handle.write(RSYSLOG_CONF.format(
                work=os.path.join(directory, "work"), ca=certificates["ca"], cert=certificates["cert"],
                key=certificates["key"], port=self.port, udp_port=self.udp_port, tcp_port=self.tcp_port, output=self.output,
            ))
        self.process = None

    def start(self):
        """
        Start rsyslogd and wait until it accepts connections.
        """
        executable = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        if os.path.exists(self.pidfile):
            # Left by a killed rsyslogd.
            os.unlink(self.pidfile)
        self.log = open(os.path.join(self.directory, "rsyslogd.log"), "ab")
        self.process = subprocess.Popen(
            [executable, "-n", "-f", self.conf, "-i", self.pidfile], stdout=self.log, stderr=subprocess.STDOUT
        )
        import socket

        for _ in range(200):
            if self.process.poll() is not None:
                raise RuntimeError("rsyslogd exited: see %s" % (os.path.join(self.directory, "rsyslogd.log"),))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("rsyslogd did not listen on %d" % (self.port,))

    def stop(self, sig=signal.SIGTERM):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)
        self.process = None
        if getattr(self, "log", None):
            self.log.close()
            self.log = None

    def received(self):
        """
        C{(msgid, structured data, message)} of every message written so far.
        """
        try:
            with open(self.output, "rb") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            match = re.match(rb"^(\S+) (\[.*?\]|-) (.*)$", line)
            if match:
                found.append((match.group(1).decode(), match.group(2).decode(), match.group(3)))
        return found

    def seqs(self):
        return [int(re.search(r'seq="(\d+)"', sd).group(1)) for _, sd, _ in self.received()]


class _Collect(resource.Resource):
    isLeaf = True

    def __init__(self, collector):
        resource.Resource.__init__(self)
        self.collector = collector

    def render_POST(self, request):
        self.collector.requests.append({
            "path": request.path,
            "authorization": request.getHeader(b"authorization"),
            "client_certificate": request.transport.getPeerCertificate() is not None
            if hasattr(request.transport, "getPeerCertificate") else False,
        })
        if self.collector.token and request.getHeader(b"authorization") != self.collector.token:
            request.setResponseCode(401)
            return b'{"text":"Invalid token"}'
        body = request.content.read()
        if self.collector.preset == "splunk-hec":
            decoder = json.JSONDecoder()
            text, position = body.decode("utf-8"), 0
            while position < len(text):
                envelope, position = decoder.raw_decode(text, position)
                while position < len(text) and text[position] in " \n":
                    position += 1
                self.collector.documents.append(envelope)
        else:
            self.collector.documents.extend(json.loads(body))
        request.setHeader(b"content-type", b"application/json")
        return b'{"text":"Success","code":0}'


class Collector:
    """
    An HTTPS collector on loopback (TLS with the test PKI, optionally
    asking for a client certificate), storing the documents it is sent.
    """

    def __init__(self, certificates, token=None, preset="json", require_client_certificate=False):
        self.certificates = certificates
        self.token = token
        self.preset = preset
        self.require = require_client_certificate
        self.port = free_port()
        self.documents = []
        self.requests = []
        self._port = None
        self._site = None

    def start(self):
        with open(self.certificates["cert"], "rb") as handle:
            cert = handle.read()
        with open(self.certificates["key"], "rb") as handle:
            key = handle.read()
        with open(self.certificates["ca"], "rb") as handle:
            ca = ssl.Certificate.loadPEM(handle.read())
        options = ssl.PrivateCertificate.loadPEM(key + cert).options(ca) if self.require else (
            ssl.PrivateCertificate.loadPEM(key + cert).options()
        )
        self._site = _Site(_Collect(self))
        self._port = reactor.listenSSL(self.port, self._site, options, interface="127.0.0.1")

    @defer.inlineCallbacks
    def stop(self):
        """
        Stop listening and drop open connections: the receiver is down.
        """
        port, self._port = self._port, None
        if port is not None:
            yield port.stopListening()
        # Persistent connections the gateway holds are cut as well.
        for channel in list(self._site.live if self._site is not None else ()):
            transport = getattr(channel, "transport", None) or getattr(getattr(channel, "_channel", None), "transport", None)
            if transport is not None:
                transport.abortConnection()
        yield task.deferLater(reactor, 0, lambda: None)

    @property
    def url(self):
        return "https://127.0.0.1:%d/collect" % (self.port,)

    def seqs(self):
        found = []
        for document in self.documents:
            if self.preset == "splunk-hec":
                document = document["event"]
            found.append(document["seq"] if "seq" in document else document["metadata"]["sequence"])
        return found


class _Site(server.Site):
    """
    A site that knows its open connections, so that stopping the receiver
    can cut them.
    """

    def __init__(self, *args, **kwargs):
        server.Site.__init__(self, *args, **kwargs)
        self.live = set()

    def buildProtocol(self, address):
        channel = server.Site.buildProtocol(self, address)
        self.live.add(channel)
        lost = channel.connectionLost

        def connection_lost(reason):
            self.live.discard(channel)
            return lost(reason)

        channel.connectionLost = connection_lost
        return channel
