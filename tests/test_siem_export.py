"""
Streaming the record to a SIEM: real receivers (rsyslogd over TLS, an
HTTPS collector, the file sink read back), receivers stopped mid-stream
and restarted, a restart resuming from the cursor, lag alerts, OCSF
documents checked against the OCSF 1.3.0 schema's required attributes, and
the exported native lines verified against their chain.
"""

import io
import json
import os
import signal

import jsonschema
import orjson
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial import unittest
from zope.interface import implementer

from hoopgw import cli
from hoopgw.export import formats
from hoopgw.export.config import parse_export
from hoopgw.export.service import ExportService
from hoopgw.options import ConfigError
from hoopgw.store.file import FileStore, read_events
from hoopgw.store.signing import Signer
from tests import evidence_support, siem_receivers

SCHEMA_PATH = os.path.join(os.path.dirname(__file__), "ocsf", "ocsf-1.3.0-minimal.schema.json")

IDENTITY = {"subject": "ci-bot", "issuer": "https://issuer.test", "groups": ["payments-bots"], "kind": "service",
            "method": "oidc", "token_id": "t-1", "provenance": None}
SESSION = {"session": "s-1", "connection": "payments", "protocol": "postgres", "target": "db:5432",
           "client": "127.0.0.1:50000", "subject": "ci-bot"}


def session_events(number=1, connection="payments", protocol="postgres"):
    """
    The events one session leaves in the record, as the record addon
    writes them: a start, an allowed statement and its end (with masked
    card numbers), a refused one, the end.
    """
    fields = dict(SESSION, session="s-%d" % (number,), connection=connection, protocol=protocol)
    return [
        dict(fields, type="session.start", attributes={}, identity=IDENTITY, gateway="g-1"),
        dict(fields, type="command", command="c-%d-1" % (number,), kind="sql", text="SELECT pan FROM cards",
             facts={"statement_type": "SELECT"}, decision={"verdict": "allow"}),
        dict(fields, type="command.end", command="c-%d-1" % (number,), decision={"verdict": "allow"},
             outcome={"rows": 2}, duration_ms=1.5, masked=2),
        dict(fields, type="command", command="c-%d-2" % (number,), kind="sql", text="DROP TABLE cards",
             facts={"statement_type": "DROP"}, decision={"verdict": "deny", "rule": "no-ddl", "reason": "DDL is refused"}),
        dict(fields, type="session.end", reason="client closed", identity=IDENTITY, duration_ms=20.0, commands=2),
    ]


def wait_until(predicate, timeout=60.0, step=0.02):
    """
    Poll C{predicate} in the reactor until it holds (an event-driven wait:
    the test asserts on what arrived, never on how fast).
    """

    @defer.inlineCallbacks
    def poll():
        for _ in range(int(timeout / step)):
            if predicate():
                return True
            yield task.deferLater(reactor, step, lambda: None)
        raise AssertionError("the condition did not hold within %s seconds" % (timeout,))

    return poll()


class ExportTestCase(unittest.TestCase):
    """
    A real file store, signed, and an export service over it.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.state_dir = os.path.join(self.directory, "state")
        self.store_path = os.path.join(self.directory, "audit")
        self.key_path, self.public_path = evidence_support.signing_key("export")
        self.store = None
        self.service = None

    def open_store(self, **options):
        store = FileStore(self.store_path, reactor, **options)
        store.open()
        with open(self.key_path, "rb") as handle:
            store.use_signer(Signer.from_pem(handle.read()), every_events=7, every_seconds=3600)
        self.store = store
        self.addCleanup(self.close_store)
        return store

    def close_store(self):
        store, self.store = self.store, None
        if store is not None and store._segment.fd is not None:
            return store.close()

    def start_export(self, sinks):
        configs = parse_export(sinks, "gateway.export")
        self.service = ExportService(configs, self.state_dir, reactor, self.store, self.store.append)
        self.service.start()
        self.addCleanup(self.service.stop, drain=0)
        return self.service

    @defer.inlineCallbacks
    def append_sessions(self, first, count, **kwargs):
        for number in range(first, first + count):
            for event in session_events(number, **kwargs):
                yield self.store.append(event)

    def record_lines(self):
        return [raw for _, _, raw, _ in read_events(self.store_path)]

    def record_seqs(self):
        return [event["seq"] for _, _, _, event in read_events(self.store_path)]

    def fast(self, **options):
        """
        Sink options that make a test quick: short polls and back-off.
        """
        return dict({"poll_interval": "0.05s", "retry_initial": "0.05s", "retry_max": "0.2s"}, **options)

    def runner(self, name):
        return self.service.runners[name]


class FileSinkTests(ExportTestCase):
    @defer.inlineCallbacks
    def test_native_lines_are_the_record(self):
        """
        The file sink writes each event exactly as the store holds it: the
        file read back is the record, line for line, and verifies against
        its chain and checkpoint signatures.
        """
        self.open_store()
        out = os.path.join(self.directory, "export", "events.jsonl")
        yield self.append_sessions(1, 3)
        self.start_export({"file": self.fast(type="file", path=out)})
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        with open(out, "rb") as handle:
            self.assertEqual(handle.read().splitlines(True), self.record_lines())
        output = io.StringIO()
        self.assertEqual(cli.main(["verify", "--siem-file", out, "--key", self.public_path], output), 0, output.getvalue())
        self.assertIn("checkpoints verified (with your key)", output.getvalue())
        self.assertIn("signed: seq 1 to", output.getvalue())

    @defer.inlineCallbacks
    def test_restart_resumes_from_cursor(self):
        """
        A gateway restart resumes from the persisted cursor: events
        written while the export was stopped arrive, none twice, in order.
        """
        self.open_store()
        out = os.path.join(self.directory, "events.jsonl")
        sinks = {"file": self.fast(type="file", path=out)}
        yield self.append_sessions(1, 2)
        self.start_export(sinks)
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        yield self.service.stop(drain=0)
        yield self.append_sessions(3, 2)
        yield self.close_store()
        self.open_store()
        yield self.append_sessions(5, 1)
        self.start_export(sinks)
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        with open(out, "rb") as handle:
            seqs = [json.loads(line)["seq"] for line in handle]
        self.assertEqual(seqs, self.record_seqs())

    @defer.inlineCallbacks
    def test_store_segments(self):
        """
        The sink follows the store across its segments (the store starts a
        new one every few events here), and a sink that starts later
        finds its place by the segments' names.
        """
        self.open_store(segment_bytes=2048)
        out = os.path.join(self.directory, "events.jsonl")
        yield self.append_sessions(1, 4)
        self.start_export({"file": self.fast(type="file", path=out, batch_size=3)})
        yield self.append_sessions(5, 4)
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        self.assertGreater(len(os.listdir(self.store_path)), 5)
        with open(out, "rb") as handle:
            self.assertEqual(handle.read().splitlines(True), self.record_lines())

    @defer.inlineCallbacks
    def test_replaced_store(self):
        """
        A store replaced under a sink's cursor (another record, shorter
        than the cursor) is noticed: the sink starts again at the
        beginning rather than skip the new record's events.
        """
        self.open_store()
        out = os.path.join(self.directory, "events.jsonl")
        sinks = {"file": self.fast(type="file", path=out)}
        yield self.append_sessions(1, 3)
        self.start_export(sinks)
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        yield self.service.stop(drain=0)
        yield self.close_store()
        import shutil

        shutil.rmtree(self.store_path)
        os.unlink(out)
        self.open_store()
        yield self.append_sessions(1, 1)
        self.start_export(sinks)
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        with open(out, "rb") as handle:
            self.assertEqual(handle.read().splitlines(True), self.record_lines())
        self.assertIn("was replaced", self.runner("file").state["cursor_reset"]["why"])

    @defer.inlineCallbacks
    def test_start_at_end(self):
        """
        A new sink with start: end sends only what is written after it
        starts; a sink whose state file is unreadable starts as configured.
        """
        self.open_store()
        out = os.path.join(self.directory, "events.jsonl")
        yield self.append_sessions(1, 2)
        first_new = self.store.seq + 1
        os.makedirs(os.path.join(self.state_dir, "export"))
        with open(os.path.join(self.state_dir, "export", "file.json"), "w") as handle:
            handle.write("{not json")
        self.start_export({"file": self.fast(type="file", path=out, start="end")})
        yield self.append_sessions(3, 1)
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        with open(out, "rb") as handle:
            seqs = [json.loads(line)["seq"] for line in handle]
        self.assertEqual(seqs, list(range(first_new, self.store.seq + 1)))

    @defer.inlineCallbacks
    def test_rotation(self):
        """
        The file rotates past max_bytes, keeping the configured number of
        older files, and the files together still verify.
        """
        self.open_store()
        out = os.path.join(self.directory, "events.jsonl")
        yield self.append_sessions(1, 12)
        self.start_export({"file": self.fast(type="file", path=out, max_bytes=4096, backups=50, batch_size=5)})
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        rotated = sorted((name for name in os.listdir(self.directory) if name.startswith("events.jsonl.")),
                         key=lambda name: -int(name.rsplit(".", 1)[1]))
        self.assertTrue(rotated)
        files = [os.path.join(self.directory, name) for name in rotated] + [out]
        lines = b"".join(open(path, "rb").read() for path in files).splitlines(True)
        self.assertEqual(lines, self.record_lines())
        self.assertEqual(cli.main(["verify", "--key", self.public_path] + sum((["--siem-file", f] for f in files), []),
                                  io.StringIO()), 0)

    @defer.inlineCallbacks
    def test_filter_and_allow_list(self):
        """
        A sink sends only the event types and connections it is given, and
        only the allowed fields (plus the chain's own).
        """
        self.open_store()
        out = os.path.join(self.directory, "events.jsonl")
        yield self.append_sessions(1, 1, connection="payments")
        yield self.append_sessions(2, 1, connection="other")
        self.start_export({"file": self.fast(type="file", path=out, events=["session.*"], connections=["payments"],
                                             fields=["session", "connection"])})
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq)
        with open(out, "rb") as handle:
            exported = [json.loads(line) for line in handle]
        self.assertEqual([(event["type"], event["connection"]) for event in exported],
                         [("session.start", "payments"), ("session.end", "payments")])
        for event in exported:
            self.assertEqual(set(event), {"seq", "ts", "type", "prev", "hash", "session", "connection"})

    @defer.inlineCallbacks
    def test_export_status(self):
        """
        export-status shows each sink's cursor and lag from the state files,
        and a failing sink's last error, with exit status 3.
        """
        self.open_store()
        out = os.path.join(self.directory, "events.jsonl")
        refused = siem_receivers.free_port()
        sinks = {
            "file": self.fast(type="file", path=out),
            "down": self.fast(type="https", url="http://127.0.0.1:%d/collect" % (refused,)),
        }
        yield self.append_sessions(1, 1)
        self.start_export(sinks)
        yield wait_until(lambda: self.runner("file").cursor == self.store.seq and self.runner("down").state["failures"] >= 2)
        from hoopgw.config import Config, GatewayConfig, StoreConfig
        from hoopgw.export.check import export_status

        store = StoreConfig(backend="file", path=self.store_path, fsync=True, segment_bytes=1 << 20)
        config = Config(path="hoopgw.yaml", identity_providers={}, connections={}, digest="",
                        gateway=GatewayConfig(state_dir=self.state_dir, store=store, admin=None, signing_key=None,
                                              export=parse_export(sinks, "gateway.export")))
        output = io.StringIO()
        status = export_status(config, output)
        text = output.getvalue()
        self.assertEqual(status, 3, text)
        self.assertIn("file (file, native) -> %s" % (out,), text)
        self.assertIn("cursor: seq %d of %d; lag 0 events" % (self.store.seq, self.store.seq), text)
        self.assertIn("Connection was refused", text)
        output = io.StringIO()
        export_status(config, output, as_json=True)
        rows = {row["sink"]: row for row in json.loads(output.getvalue())}
        self.assertEqual(rows["down"]["cursor"], 0)
        self.assertEqual(rows["down"]["lag_events"], self.store.seq)


class LagTests(ExportTestCase):
    @defer.inlineCallbacks
    def test_lagging_and_recovered(self):
        """
        A sink whose receiver is down falls behind without slowing appends;
        past max_lag_events it records export.lagging, and once the
        receiver is back and it has caught up, export.recovered; every
        event arrives.
        """
        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        collector = siem_receivers.Collector(certificates)
        self.open_store()
        self.start_export({"siem": self.fast(type="https", url=collector.url, ca=certificates["ca"], max_lag_events=10)})
        yield self.append_sessions(1, 4)
        yield wait_until(lambda: [e for _, _, _, e in read_events(self.store_path) if e.get("type") == "export.lagging"])
        collector.start()
        self.addCleanup(collector.stop)
        yield wait_until(lambda: any(e.get("type") == "export.recovered" for _, _, _, e in read_events(self.store_path)))
        (alert,) = [e for _, _, _, e in read_events(self.store_path) if e.get("type") == "export.lagging"]
        self.assertEqual(alert["sink"], "siem")
        self.assertGreater(alert["lag_events"], 10)
        self.assertIn("refused", alert["last_error"])
        yield wait_until(lambda: self.runner("siem").cursor == self.store.seq)
        self.assertEqual(sorted(set(collector.seqs())), self.record_seqs())
        # The alerts are ordinary events of the chain: the record still verifies.
        from hoopgw.store.verify import verify_store

        yield self.close_store()
        report = verify_store(self.store_path, self.public_path)
        self.assertTrue(report.ok, report.problem)

    @defer.inlineCallbacks
    def test_alert_not_recorded_is_made_again(self):
        """
        An export.lagging the store refuses (it is closing, or failed) is
        not taken as made: the sink makes it again at a later check.
        """
        from hoopgw.store.errors import StoreError

        self.open_store()
        attempts = []

        def record(event):
            attempts.append(event["type"])
            if len(attempts) == 1:
                return defer.fail(StoreError("the store is not open"))
            return self.store.append(event)

        refused = siem_receivers.free_port()
        configs = parse_export({"siem": self.fast(type="https", url="http://127.0.0.1:%d/" % (refused,), max_lag_events=3)},
                               "gateway.export")
        self.service = ExportService(configs, self.state_dir, reactor, self.store, record)
        self.service.start()
        self.addCleanup(self.service.stop, drain=0)
        yield self.append_sessions(1, 1)
        yield wait_until(lambda: any(e.get("type") == "export.lagging" for _, _, _, e in read_events(self.store_path)))
        self.assertEqual(attempts[:2], ["export.lagging", "export.lagging"])

    @defer.inlineCallbacks
    def test_hanging_receiver_does_not_hold_the_stop(self):
        """
        A collector that accepts connections and never reads holds a
        delivery until the sink's timeout; a stopping gateway does not wait
        for it past its drain time (here the timeout is longer than the
        test's own limit, so waiting for it would fail the test).
        """
        import socket

        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        hanging = socket.socket()
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(10)
        self.addCleanup(hanging.close)
        self.open_store()
        yield self.append_sessions(1, 1)
        service = self.start_export({"siem": self.fast(type="syslog", host="127.0.0.1", port=hanging.getsockname()[1],
                                                       ca=certificates["ca"], timeout="600s")})
        yield wait_until(lambda: service.runners["siem"]._busy is not None)
        yield service.stop(drain=0.2)
        self.assertEqual(service.runners["siem"].cursor, 0)


class HTTPSTests(ExportTestCase):
    @defer.inlineCallbacks
    def test_collector_down_and_back(self):
        """
        The HTTPS collector (bearer token, mutual TLS) is stopped in the
        middle of the stream and started again: every event of the record
        arrives, in order (duplicates only as repeats, told apart by seq).
        """
        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        token_path = os.path.join(self.directory, "token")
        with open(token_path, "w") as handle:
            handle.write("s3cret-token\n")
        collector = siem_receivers.Collector(certificates, token=b"Bearer s3cret-token", require_client_certificate=True)
        collector.start()
        self.addCleanup(collector.stop)
        self.open_store()
        self.start_export({"siem": self.fast(
            type="https", url=collector.url, ca=certificates["ca"], token={"file": token_path},
            certificate=certificates["client_cert"], key=certificates["client_key"], batch_size=4,
        )})
        yield self.append_sessions(1, 3)
        yield wait_until(lambda: len(collector.documents) >= 5)
        yield collector.stop()
        yield self.append_sessions(4, 3)
        yield wait_until(lambda: self.runner("siem").state["failures"] >= 2)
        collector.start()
        yield self.append_sessions(7, 2)
        yield wait_until(lambda: self.runner("siem").cursor == self.store.seq)
        seqs = collector.seqs()
        self.assertEqual(sorted(set(seqs)), self.record_seqs())
        # In order: a repeat only ever goes back to resend a batch.
        self.assertEqual(list(dict.fromkeys(seqs)), sorted(set(seqs)))
        self.assertTrue(all(request["authorization"] == b"Bearer s3cret-token" for request in collector.requests))

    @defer.inlineCallbacks
    def test_refused_token(self):
        """
        A collector that refuses the token (401) is a failed delivery: the
        cursor stays, the error names the answer, and nothing is lost once
        the token is right.
        """
        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        token_path = os.path.join(self.directory, "token")
        with open(token_path, "w") as handle:
            handle.write("old-token\n")
        collector = siem_receivers.Collector(certificates, token=b"Bearer new-token")
        collector.start()
        self.addCleanup(collector.stop)
        self.open_store()
        yield self.append_sessions(1, 1)
        self.start_export({"siem": self.fast(type="https", url=collector.url, ca=certificates["ca"], token={"file": token_path})})
        yield wait_until(lambda: self.runner("siem").state["failures"] >= 2)
        self.assertEqual(self.runner("siem").cursor, 0)
        self.assertIn("answered HTTP 401: {\"text\":\"Invalid token\"}", self.runner("siem").state["last_error"])
        # The token is read at each POST: a rotated token is picked up.
        with open(token_path, "w") as handle:
            handle.write("new-token\n")
        yield wait_until(lambda: self.runner("siem").cursor == self.store.seq)
        self.assertEqual(sorted(set(collector.seqs())), self.record_seqs())

    @defer.inlineCallbacks
    def test_collector_that_never_finishes(self):
        """
        A hostile collector answers 200 and then never finishes the body
        (nor sends much of it): the sink's timeout cuts the delivery, which
        counts as failed, and the cursor does not move past the batch.
        """
        from twisted.web import resource, server

        class Dribble(resource.Resource):
            isLeaf = True

            def render_POST(self, request):
                request.setHeader(b"content-length", b"1000000")
                request.write(b"{")
                return server.NOT_DONE_YET

        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        collector = siem_receivers.Collector(certificates)
        collector.start()
        self.addCleanup(collector.stop)
        collector._site.resource = Dribble()
        self.open_store()
        yield self.append_sessions(1, 1)
        self.start_export({"siem": self.fast(type="https", url=collector.url, ca=certificates["ca"], timeout="0.3s")})
        yield wait_until(lambda: self.runner("siem").state["failures"] >= 2)
        self.assertEqual(self.runner("siem").cursor, 0)
        self.assertIn("no answer from %s within 0.3s" % (collector.url,), self.runner("siem").state["last_error"])

    @defer.inlineCallbacks
    def test_splunk_hec_ocsf(self):
        """
        The splunk-hec preset sends HEC events ('Authorization: Splunk
        TOKEN', time, sourcetype, the document as event); with format ocsf
        every document validates against OCSF 1.3.0's required attributes,
        and the documents, as the SIEM holds them, verify against the chain.
        """
        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        os.environ["HOOPGW_TEST_HEC_TOKEN"] = "hec-token"
        self.addCleanup(os.environ.pop, "HOOPGW_TEST_HEC_TOKEN", None)
        collector = siem_receivers.Collector(certificates, token=b"Splunk hec-token", preset="splunk-hec")
        collector.start()
        self.addCleanup(collector.stop)
        self.open_store()
        yield self.append_sessions(1, 2)
        self.start_export({"hec": self.fast(type="https", preset="splunk-hec", format="ocsf", url=collector.url,
                                            ca=certificates["ca"], token={"env": "HOOPGW_TEST_HEC_TOKEN"}, index="pci")})
        yield wait_until(lambda: self.runner("hec").cursor == self.store.seq)
        schema = json.load(open(SCHEMA_PATH))
        self.assertEqual(sorted(collector.seqs()), self.record_seqs())
        for envelope in collector.documents:
            self.assertEqual(envelope["sourcetype"], "hoopgw:ocsf")
            self.assertEqual(envelope["index"], "pci")
            jsonschema.validate(envelope["event"], schema)
        # What the SIEM holds verifies against the chain: each OCSF document
        # carries its native event.
        path = os.path.join(self.directory, "hec.jsonl")
        with open(path, "wb") as handle:
            handle.writelines(orjson.dumps(envelope) + b"\n" for envelope in collector.documents)
        output = io.StringIO()
        self.assertEqual(cli.main(["verify", "--siem-file", path, "--key", self.public_path], output), 0, output.getvalue())
        self.assertIn("checkpoints verified", output.getvalue())


class RsyslogTests(ExportTestCase):
    @defer.inlineCallbacks
    def test_rsyslog_tls_down_and_back(self):
        """
        A real rsyslogd takes RFC 5424 messages over TLS (RFC 5425,
        octet-counted); it is killed mid-stream and started again: every
        event arrives (by seq, in order, repeats only as resent batches),
        and the messages hold the native events, which verify.
        """
        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        rsyslog = siem_receivers.Rsyslog(os.path.join(self.directory, "rsyslog"), certificates)
        rsyslog.start()
        self.addCleanup(rsyslog.stop)
        self.open_store()
        self.start_export({"syslog": self.fast(type="syslog", host="127.0.0.1", port=rsyslog.port, ca=certificates["ca"],
                                               server_name="localhost", batch_size=3)})
        yield self.append_sessions(1, 2)
        yield wait_until(lambda: len(rsyslog.seqs()) >= 4)
        rsyslog.stop(signal.SIGKILL)
        yield self.append_sessions(3, 3)
        yield wait_until(lambda: self.runner("syslog").state["failures"] >= 2)
        rsyslog.start()
        yield self.append_sessions(6, 1)
        yield wait_until(lambda: self.runner("syslog").cursor == self.store.seq)
        yield wait_until(lambda: set(rsyslog.seqs()) >= set(self.record_seqs()))
        seqs = rsyslog.seqs()
        self.assertEqual(sorted(set(seqs)), self.record_seqs())
        self.assertEqual(list(dict.fromkeys(seqs)), sorted(set(seqs)))
        received = rsyslog.received()
        self.assertEqual(received[0][0], "session.start")
        # What rsyslogd wrote (MSGID, structured data, message) verifies as it is.
        output = io.StringIO()
        self.assertEqual(cli.main(["verify", "--siem-file", rsyslog.output, "--key", self.public_path], output), 0,
                         output.getvalue())
        self.assertIn("duplicates", output.getvalue())


class _ForgetfulCollector(protocol.Protocol):
    """
    A syslog collector over plain TCP that reads a batch to its end and
    closes cleanly, as a collector killed after reading does (its kernel
    closes for it): the first batch is forgotten, later ones kept.
    """

    def connectionMade(self):
        self.data = []

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.factory.batches.append(b"".join(self.data))


@implementer(IHalfCloseableProtocol)
class _ResettingCollector(protocol.Protocol):
    """
    A syslog collector over plain TCP that reads a batch to its end, then,
    for its first C{factory.resets} connections, resets the connection
    (as one that died with the batch unwritten may) instead of closing it.
    """

    def connectionMade(self):
        self.data = []

    def dataReceived(self, data):
        self.data.append(data)

    def readConnectionLost(self):
        if self.factory.resets > 0:
            self.factory.resets -= 1
            self.transport.abortConnection()
            return
        self.factory.batches.append(b"".join(self.data))
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class ResendTests(ExportTestCase):
    @defer.inlineCallbacks
    def test_last_batch_again_after_a_failure(self):
        """
        Syslog acknowledges nothing: a collector that died having read a
        batch (its clean close looks like a delivery) and is down at the
        next attempt gets that batch again once it is back, so every event
        arrives (here the first batch was lost by the collector).
        """
        import re

        from testbed.throwaway import free_port

        port = free_port()
        factory = protocol.Factory.forProtocol(_ForgetfulCollector)
        factory.batches = []
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")
        self.open_store()
        yield self.append_sessions(1, 1)
        self.start_export({"syslog": self.fast(type="syslog", transport="tcp", host="127.0.0.1", port=port, batch_size=100)})
        yield wait_until(lambda: self.runner("syslog").cursor == self.store.seq)
        first = list(self.record_seqs())
        # The collector "dies": what it read is lost, and it is down.
        factory.batches.clear()
        yield listening.stopListening()
        yield self.append_sessions(2, 1)
        yield wait_until(lambda: self.runner("syslog").state["failures"] >= 1)
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        yield wait_until(lambda: self.runner("syslog").cursor == self.store.seq)
        received = [int(seq) for batch in factory.batches for seq in re.findall(rb'seq="(\d+)"', batch)]
        self.assertEqual(sorted(set(received)), self.record_seqs())
        self.assertTrue(set(first) <= set(received))


    @defer.inlineCallbacks
    def test_reset_is_not_delivered(self):
        """
        Over plain TCP a batch counts only once the collector has closed its
        side cleanly: one that read the batch and reset the connection did
        not take it, and it is sent again.
        """
        import re

        from testbed.throwaway import free_port

        port = free_port()
        factory = protocol.Factory.forProtocol(_ResettingCollector)
        factory.batches, factory.resets = [], 1
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.open_store()
        yield self.append_sessions(1, 2)
        self.start_export({"syslog": self.fast(type="syslog", transport="tcp", host="127.0.0.1", port=port, batch_size=100)})
        yield wait_until(lambda: self.runner("syslog").cursor == self.store.seq and factory.batches)
        self.assertGreaterEqual(self.runner("syslog").state["delivered"], len(self.record_seqs()))
        received = [int(seq) for batch in factory.batches for seq in re.findall(rb'seq="(\d+)"', batch)]
        self.assertEqual(sorted(set(received)), self.record_seqs())
        self.assertEqual(factory.resets, 0)


class OCSFTests(unittest.TestCase):
    def setUp(self):
        with open(SCHEMA_PATH) as handle:
            self.schema = json.load(handle)

    def ocsf(self, event, seq=1):
        event = dict(event, seq=seq, ts="2026-12-04T10:00:00.000000Z", prev="0" * 64, hash="a" * 64)
        document = orjson.loads(orjson.dumps(formats.ocsf(event)))
        jsonschema.validate(document, self.schema)
        return document

    def test_mapping(self):
        """
        Each kind of event maps to its OCSF class and activity, and every
        document validates against OCSF 1.3.0's required attributes.
        """
        start, command, end, refused_command, session_end = session_events()
        refused = dict(SESSION, type="session.refused", attributes={"user": "mallory"},
                       refusal={"kind": "unauthenticated", "reason": "the token expired"})
        kube = dict(SESSION, protocol="kubernetes", type="command", kind="kubernetes",
                    facts={"verb": "delete", "resource": "pods", "namespace": "pay", "name": "api-1"},
                    decision={"verdict": "approved", "approval": "a-1"})
        ssh = dict(SESSION, protocol="ssh", type="command", kind="exec", facts={"argv": ["ls"]},
                   decision={"verdict": "allow"})
        table = [
            (start, 3002, 1, formats.SUCCESS),
            (refused, 3002, 1, formats.FAILURE),
            (session_end, 3002, 2, formats.SUCCESS),
            (command, 6005, 1, formats.SUCCESS),
            # An allowed command's end carries no statement: a Query.
            (end, 6005, 4, formats.SUCCESS),
            (refused_command, 6005, 7, formats.FAILURE),
            (kube, 6003, 4, formats.SUCCESS),
            (dict(ssh, type="command.end", outcome={"status": "exited", "exit_status": 2}), 6003, 99, formats.FAILURE),
            (dict(ssh, type="command.end", outcome={"status": "exited", "exit_status": 0}), 6003, 99, formats.SUCCESS),
            (dict(end, outcome={"status": "error", "sqlstate": "42P01", "error": "no such table"}), 6005, 4, formats.FAILURE),
            (ssh, 6003, 99, formats.SUCCESS),
            ({"type": "checkpoint", "covers": {"seq": 0}}, 0, 99, None),
            ({"type": "export.lagging", "sink": "siem"}, 0, 99, formats.FAILURE),
        ]
        for event, class_uid, activity, status in table:
            document = self.ocsf(event)
            self.assertEqual((document["class_uid"], document["activity_id"], document.get("status_id")),
                             (class_uid, activity, status), event["type"])
            self.assertEqual(document["type_uid"], class_uid * 100 + activity)
            self.assertEqual(document["metadata"]["version"], "1.3.0")
            self.assertEqual(document["unmapped"]["hoopgw"]["seq"], 1)
        denied = self.ocsf(refused_command)
        self.assertEqual((denied["action"], denied["status_detail"]), ("Denied", "DDL is refused"))
        self.assertEqual(self.ocsf(end)["unmapped"]["masked"], 2)
        self.assertEqual(self.ocsf(kube)["unmapped"]["approval"], "a-1")
        self.assertEqual(self.ocsf(kube)["unmapped"]["decision"], {"verdict": "approved", "approval": "a-1"})
        self.assertEqual(self.ocsf(refused)["status_detail"], "the token expired")

    def test_odd_event(self):
        """
        An event whose facts its class cannot take (facts of the wrong type,
        a timestamp that is not one) still becomes a valid document, a Base
        Event carrying the event, rather than stopping the sink.
        """
        odd = {"type": "command", "seq": 3, "ts": "yesterday", "hash": "h", "prev": "p", "facts": ["x"],
               "protocol": "postgres", "text": "SELECT 1"}
        document = orjson.loads(orjson.dumps(formats.ocsf_or_base(odd)))
        jsonschema.validate(document, self.schema)
        self.assertEqual((document["class_uid"], document["unmapped"]["hoopgw"]), (0, odd))

    def test_schema_catches_a_missing_attribute(self):
        """
        The vendored schema is not vacuous: a document without a required
        attribute (the user of an Authentication), or with one its class
        or object does not define, fails it.
        """
        document = self.ocsf(session_events()[0])
        del document["user"]
        self.assertRaises(jsonschema.ValidationError, jsonschema.validate, document, self.schema)
        # Nor does an attribute the class does not define, at the top or in an object.
        for where, extra in [((), "action_id"), (("user",), "colour")]:
            document = self.ocsf(session_events()[0])
            target = document
            for key in where:
                target = target[key]
            target[extra] = 1
            self.assertRaises(jsonschema.ValidationError, jsonschema.validate, document, self.schema)


class SiemVerifyTests(ExportTestCase):
    @defer.inlineCallbacks
    def test_tampering_detected(self):
        """
        verify --siem-file names an exported event that was changed, and a
        checkpoint not signed by the key given.
        """
        self.open_store()
        yield self.append_sessions(1, 2)
        yield self.store.checkpoint("test")
        lines = self.record_lines()
        path = os.path.join(self.directory, "siem.jsonl")
        with open(path, "wb") as handle:
            handle.writelines(lines[:1] + [lines[1].replace(b"SELECT", b"SELEKT")] + lines[2:])
        output = io.StringIO()
        self.assertEqual(cli.main(["verify", "--siem-file", path, "--key", self.public_path], output), 1)
        self.assertIn("(seq 2) does not match its hash", output.getvalue())
        other = evidence_support.signing_key("other")[1]
        with open(path, "wb") as handle:
            handle.writelines(lines)
        output = io.StringIO()
        self.assertEqual(cli.main(["verify", "--siem-file", path, "--key", other], output), 1)
        self.assertIn("not by the key you gave", output.getvalue())


class ConfigTests(unittest.TestCase):
    def test_errors_name_the_key(self):
        """
        A bad sink is refused with its key path and what to do.
        """
        cases = [
            ({"s": {"type": "syslog", "host": "h"}}, "gateway.export.s.ca"),
            ({"s": {"type": "https", "url": "http://siem.example/x"}}, "gateway.export.s.url"),
            ({"s": {"type": "kafka"}}, "gateway.export.s.type"),
            ({"s": {"type": "file", "path": "x", "colour": 1}}, "gateway.export.s.colour"),
            ({"bad name": {"type": "file", "path": "x"}}, "gateway.export.bad name"),
        ]
        for raw, where in cases:
            with self.assertRaises(ConfigError) as caught:
                parse_export(raw, "gateway.export")
            self.assertEqual(caught.exception.path, where, str(caught.exception))

    def test_warnings(self):
        """
        check-config warns of sinks whose events the SIEM cannot verify: an
        allow-list, or an event filter without checkpoints.
        """
        from hoopgw.export.config import warnings

        (plain, cut, filtered, kept) = parse_export({
            "plain": {"type": "file", "path": "a"},
            "cut": {"type": "file", "path": "b", "fields": ["session"]},
            "filtered": {"type": "file", "path": "c", "events": ["session.*"]},
            "kept": {"type": "file", "path": "d", "events": ["session.*", "check*"]},
        }, "gateway.export")
        self.assertEqual([len(warnings(sink)) for sink in (plain, cut, filtered, kept)], [0, 1, 1, 0])
        self.assertIn("no longer match their hashes", warnings(cut)[0])

    def test_defaults(self):
        """
        Defaults: native format, tls syslog on 6514, authpriv.
        """
        (sink,) = parse_export({"s": {"type": "syslog", "host": "h", "ca": __file__}}, "gateway.export")
        self.assertEqual((sink.format, sink.transport, sink.port, sink.facility, sink.batch_size),
                         ("native", "tls", 6514, "authpriv", 500))


class ExportingGateway(evidence_support.SignedGateway):
    """
    A real, signed gateway in the test's reactor with C{gateway.export} set.
    """

    def __init__(self, test, export, store=None):
        self._export = export
        evidence_support.SignedGateway.__init__(self, test, store=store, key="export")

    def start(self, test, document):
        document["gateway"]["export"] = self._export
        evidence_support.SignedGateway.start(self, test, document)


class GatewayExportTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_sessions_through_the_gateway(self):
        """
        A real gateway with psql sessions (one allowed, with a card number
        in its result; one refused) exports its whole record: the file sink
        holds every line, its stop and closing checkpoint included (drained
        after the store's last event), and verifies signed to the end; the
        OCSF collector got every event as a valid OCSF 1.3.0 document, and
        no card number in clear reached either.  check-config lists the
        sinks and export-status shows them caught up.
        """
        from tests.support import psql, token

        directory = os.path.abspath(self.mktemp())
        certificates = siem_receivers.test_pki(os.path.join(directory, "pki"))
        collector = siem_receivers.Collector(certificates)
        collector.start()
        self.addCleanup(collector.stop)
        out = os.path.join(directory, "siem", "events.jsonl")
        fast = {"poll_interval": "0.05s", "retry_initial": "0.05s", "retry_max": "0.2s"}
        harness = ExportingGateway(self, {
            "file": dict(fast, type="file", path=out),
            "ocsf": dict(fast, type="https", format="ocsf", url=collector.url, ca=certificates["ca"]),
        })
        _, err, code = yield psql(harness.dsn(), "-c", "SELECT '4111 1111 1111 1111' AS pan", password=token())
        self.assertEqual(code, 0, err)
        yield psql(harness.dsn(user="intruder"), "-c", "SELECT 1", password=token(subject="intruder", groups=["marketing"]))
        yield harness.wait_for("session.end", 1)
        yield harness.wait_for("session.refused", 1)
        yield harness.stop()
        record = [raw for _, _, raw, _ in read_events(harness.store_path)]
        with open(out, "rb") as handle:
            exported = handle.read()
        self.assertEqual(exported.splitlines(True), record)
        self.assertEqual(json.loads(record[-1])["type"], "checkpoint")
        output = io.StringIO()
        self.assertEqual(cli.main(["verify", "--siem-file", out, "--key", evidence_support.signing_key("export")[1]], output), 0, output.getvalue())
        self.assertIn("signed: seq 1 to %d" % (len(record),), output.getvalue())
        schema = json.load(open(SCHEMA_PATH))
        self.assertEqual(sorted(set(collector.seqs())), list(range(1, len(record) + 1)))
        classes = set()
        for document in collector.documents:
            jsonschema.validate(document, schema)
            classes.add((document["class_uid"], document["status_id"] if "status_id" in document else None))
        self.assertIn((3002, formats.FAILURE), classes)
        self.assertIn((6005, formats.SUCCESS), classes)
        self.assertNotIn(b"4111 1111 1111 1111", exported)
        self.assertNotIn("4111 1111 1111 1111", json.dumps(collector.documents))
        output = io.StringIO()
        self.assertEqual(cli.main(["check-config", harness.config_path], output), 0)
        self.assertIn("export ocsf: https, ocsf -> %s" % (collector.url,), output.getvalue())
        output = io.StringIO()
        self.assertEqual(cli.main(["export-status", "--config", harness.config_path], output), 0, output.getvalue())
        self.assertIn("cursor: seq %d of %d; lag 0 events" % (len(record), len(record)), output.getvalue())


class PostgresStoreExportTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_postgres_store(self):
        """
        With the shared PostgreSQL store, a sink reads committed events on a
        connection of its own (woken by the store's NOTIFY): after a psql
        session and a stop, the file sink holds the whole chain, stop and
        closing checkpoint included, and it verifies; export-status reads
        the store's head from PostgreSQL.
        """
        from tests.support import psql, token
        from tests.test_postgres_store import store_settings

        directory = os.path.abspath(self.mktemp())
        out = os.path.join(directory, "events.jsonl")
        harness = ExportingGateway(
            self, {"file": {"type": "file", "path": out, "poll_interval": "0.05s", "retry_initial": "0.05s"}},
            store=store_settings(),
        )
        _, err, code = yield psql(harness.dsn(), "-c", "SELECT 1", password=token())
        self.assertEqual(code, 0, err)
        yield harness.stop()
        with open(out, "rb") as handle:
            exported = [json.loads(line) for line in handle]
        self.assertEqual([event["seq"] for event in exported], list(range(1, len(exported) + 1)))
        self.assertEqual([event["type"] for event in exported[-2:]], ["gateway.stop", "checkpoint"])
        self.assertIn("command", [event["type"] for event in exported])
        output = io.StringIO()
        self.assertEqual(cli.main(["verify", "--siem-file", out, "--key", evidence_support.signing_key("export")[1]], output),
                         0, output.getvalue())
        output = io.StringIO()
        self.assertEqual(cli.main(["export-status", "--config", harness.config_path], output), 0, output.getvalue())
        self.assertIn("cursor: seq %d of %d; lag 0 events" % (len(exported), len(exported)), output.getvalue())


class SyslogTCPTests(ExportTestCase):
    @defer.inlineCallbacks
    def test_plain_tcp(self):
        """
        transport tcp: the same octet-counted RFC 5424 messages without TLS
        (for loopback), received whole by rsyslogd.
        """
        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        rsyslog = siem_receivers.Rsyslog(os.path.join(self.directory, "rsyslog"), certificates)
        rsyslog.start()
        self.addCleanup(rsyslog.stop)
        self.open_store()
        yield self.append_sessions(1, 2)
        self.start_export({"tcp": self.fast(type="syslog", transport="tcp", host="127.0.0.1", port=rsyslog.tcp_port)})
        yield wait_until(lambda: self.runner("tcp").cursor == self.store.seq)
        yield wait_until(lambda: len(rsyslog.seqs()) >= self.store.seq)
        self.assertEqual(rsyslog.seqs(), self.record_seqs())


class SyslogUDPTests(ExportTestCase):
    @defer.inlineCallbacks
    def test_rfc3164_over_udp(self):
        """
        Asked for, the syslog sink sends RFC 3164 messages over UDP (no
        delivery guarantee: nothing tells it a datagram arrived); rsyslogd
        receives each event's native document.
        """
        certificates = siem_receivers.test_pki(os.path.join(self.directory, "pki"))
        rsyslog = siem_receivers.Rsyslog(os.path.join(self.directory, "rsyslog"), certificates)
        rsyslog.start()
        self.addCleanup(rsyslog.stop)
        self.open_store()
        yield self.append_sessions(1, 1)
        self.start_export({"udp": self.fast(type="syslog", transport="udp", host="127.0.0.1", port=rsyslog.udp_port)})
        yield wait_until(lambda: self.runner("udp").cursor == self.store.seq)
        yield wait_until(lambda: len(rsyslog.received()) >= self.store.seq)
        documents = [json.loads(message) for _, _, message in rsyslog.received()]
        self.assertEqual([document["seq"] for document in documents], self.record_seqs())


class TwistdExportTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_twistd_gateway(self):
        """
        C{twistd hoopgw} with gateway.export: a psql session, then SIGTERM;
        the file sink holds the whole record (its stop and closing
        checkpoint too), which verifies with the gateway's key, and the
        sink's cursor file says so.
        """
        from tests.support import configuration_document, in_thread, postgres_connection, psql, token
        from tests.test_postgres_store import GatewayProcess

        out = {}

        def document(process):
            out["path"] = os.path.join(process.directory, "siem", "events.jsonl")
            return configuration_document(
                process.directory, {"payments": postgres_connection(process.port)},
                gateway={"export": {"file": {"type": "file", "path": out["path"], "poll_interval": "0.1s"}}},
            )

        directory = os.path.abspath(self.mktemp())
        process = GatewayProcess(self, {"backend": "file", "path": os.path.join(directory, "audit")}, document=document)
        yield in_thread(process.wait_listening)
        _, err, code = yield psql(process.dsn(), "-c", "SELECT 1", password=token())
        self.assertEqual(code, 0, err)
        yield in_thread(process.stop)
        record = [raw for _, _, raw, _ in read_events(os.path.join(directory, "audit"))]
        with open(out["path"], "rb") as handle:
            self.assertEqual(handle.read().splitlines(True), record, process.output())
        output = io.StringIO()
        self.assertEqual(cli.main(["verify", "--siem-file", out["path"], "--key", evidence_support.signing_key()[1]], output),
                         0, output.getvalue())
        with open(os.path.join(process.directory, "state", "export", "file.json")) as handle:
            state = json.load(handle)
        self.assertEqual(state["cursor"]["seq"], len(record))


class SSHExportTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_ssh_session_in_ocsf(self):
        """
        An ssh exec through a real gateway reaches an OCSF collector as an
        Authentication logon and logoff and an API Activity for the
        command, all valid OCSF 1.3.0, with every event of the record.
        """
        from tests import ssh_support

        directory = os.path.abspath(self.mktemp())
        certificates = siem_receivers.test_pki(os.path.join(directory, "pki"))
        collector = siem_receivers.Collector(certificates)
        collector.start()
        self.addCleanup(collector.stop)
        export = {"ocsf": {"type": "https", "format": "ocsf", "url": collector.url, "ca": certificates["ca"],
                           "poll_interval": "0.05s", "retry_initial": "0.05s"}}

        class ExportingSSH(ssh_support.SSHGateway):
            def start(self, test, document):
                document["gateway"]["export"] = export
                ssh_support.SSHGateway.start(self, test, document)

        harness = ExportingSSH(self)
        out, err, code = yield harness.ssh("echo exported")
        self.assertEqual((out.strip(), code), (b"exported", 0), err)
        yield harness.wait_for("session.end")
        yield harness.stop()
        record = harness.events()
        self.assertEqual(sorted(set(collector.seqs())), [event["seq"] for event in record])
        schema = json.load(open(SCHEMA_PATH))
        found = []
        for document in collector.documents:
            jsonschema.validate(document, schema)
            found.append((document["unmapped"]["hoopgw"]["type"], document["class_uid"], document["activity_id"]))
        self.assertIn(("session.start", 3002, 1), found)
        self.assertIn(("session.end", 3002, 2), found)
        self.assertIn(("command", 6003, 99), found)
        (command,) = [d for d in collector.documents if d["unmapped"]["hoopgw"]["type"] == "command"]
        self.assertEqual((command["api"]["operation"], command["actor"]["user"]["name"]), ("exec", "deploy-bot"))


class KubernetesExportTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_kubectl_in_ocsf(self):
        """
        kubectl get pods through a real gateway reaches an OCSF collector as
        an API Activity Read of pods, valid OCSF 1.3.0, with every event of
        the record.
        """
        from tests import support, test_kubernetes_gateway as kubernetes

        directory = os.path.abspath(self.mktemp())
        certificates = siem_receivers.test_pki(os.path.join(directory, "pki"))
        collector = siem_receivers.Collector(certificates)
        collector.start()
        self.addCleanup(collector.stop)
        export = {"ocsf": {"type": "https", "format": "ocsf", "url": collector.url, "ca": certificates["ca"],
                           "poll_interval": "0.05s", "retry_initial": "0.05s"}}

        class ExportingHarness(support.GatewayHarness):
            def start(self, test, document):
                document["gateway"]["export"] = export
                support.GatewayHarness.start(self, test, document)

        self.patch(kubernetes, "GatewayHarness", ExportingHarness)
        cluster = kubernetes.Cluster(self)
        yield cluster.ready()
        cluster.api.create(("", "v1", "pods"), "default", {"metadata": {"name": "web-1"}})
        out, err, code = yield cluster.kubectl("get", "pods")
        self.assertEqual(code, 0, err)
        yield cluster.wait_for_end("list", "pods")
        yield cluster.harness.stop()
        record = cluster.harness.events()
        self.assertEqual(sorted(set(collector.seqs())), [event["seq"] for event in record])
        schema = json.load(open(SCHEMA_PATH))
        commands = []
        for document in collector.documents:
            jsonschema.validate(document, schema)
            if document["unmapped"]["hoopgw"]["type"] == "command":
                commands.append(document)
        listed = [d for d in commands if d["api"]["operation"] == "list"]
        self.assertTrue(listed, commands)
        self.assertEqual((listed[0]["class_uid"], listed[0]["activity_id"]), (6003, 2))
        self.assertEqual(listed[0]["resources"][0]["type"], "pods")
