"""
The metrics listener: /metrics scraped and parsed as Prometheus parses it
while real psql sessions run through the gateway, /healthz, and /readyz
turning red (store full, target down, issuer unreachable) and green again.
"""

import json
import os
import subprocess

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from testbed.throwaway import free_port
from tests import support
from tests.support import GatewayHarness, human_token, postgres_connection, psql, token


def app_psql(sql):
    return support.cluster().psql(sql, user="app", password=support.APP_PASSWORD, dbname="payments")


class MetricsGatewayHarness(GatewayHarness):
    """
    A real gateway with its metrics listener (and the admin listener, for
    approvals) on loopback.
    """

    def __init__(self, test, connections=None, metrics=None, providers=None, store_path=None, store=None,
                 **connection_settings):
        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        self.metrics_port = free_port()
        self.admin_port = free_port()
        self.metrics_url = "http://127.0.0.1:%d" % (self.metrics_port,)
        self.admin_url = "http://127.0.0.1:%d" % (self.admin_port,)
        if connections is None:
            connections = {"payments": postgres_connection(self.port, **connection_settings)}
        settings = {"listen": "tcp:%d:interface=127.0.0.1" % (self.metrics_port,), "readiness_cache": "0s"}
        settings.update(metrics or {})
        gateway = {
            "metrics": settings,
            "admin": {"listen": "tcp:%d:interface=127.0.0.1" % (self.admin_port,), "approver_groups": ["dba"]},
        }
        if store_path is not None:
            gateway["store"] = {"path": store_path}
        if store is not None:
            gateway["store"] = store
        self.start(
            test,
            support.configuration_document(
                self.directory, connections, providers=providers or support.providers_with_people(), gateway=gateway
            ),
        )

    @defer.inlineCallbacks
    def get(self, path):
        """
        @return: C{(code, body text)} of a GET on the metrics listener.
        """
        response = yield treq.get(self.metrics_url + path, pool=HTTPConnectionPool(reactor, persistent=False))
        body = yield response.text("utf-8")
        return response.code, body

    @defer.inlineCallbacks
    def scrape(self):
        """
        @return: C{{(sample name, frozenset(labels)): value}} of /metrics,
            parsed by prometheus_client's own parser.
        """
        code, body = yield self.get("/metrics")
        if code != 200:
            raise AssertionError("/metrics answered %d: %s" % (code, body))
        samples = {}
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples


def value(samples, name, **labels):
    """
    The sum of the samples named C{name} whose labels include C{labels}.
    """
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


RULES = [{"name": "no-drop", "kinds": ["DROP"]}]
APPROVALS = [{"name": "unfiltered-writes", "without_where": True, "approvers": ["dba"], "timeout": "30s"}]


class MetricsTests(unittest.TestCase):
    """
    The series move with real sessions.
    """

    def setUp(self):
        app_psql("DROP TABLE IF EXISTS metrics_t; CREATE TABLE metrics_t (id int); INSERT INTO metrics_t VALUES (1)")
        self.gateway = MetricsGatewayHarness(
            self,
            addons=["identity", {"block": {"rules": RULES}}, {"approve": {"rules": APPROVALS}}, "mask", "record"],
        )
        self.token = token()

    @defer.inlineCallbacks
    def approve_when_asked(self):
        broker = self.gateway.gateway.approvals
        for _ in range(200):
            pending = broker.list()
            if pending:
                response = yield treq.post(
                    self.gateway.admin_url + "/api/approvals/%s/approve" % (pending[0].id,),
                    json={"reason": "CHG-1"},
                    headers={"Authorization": ["Bearer " + human_token("alice")]},
                    pool=HTTPConnectionPool(reactor, persistent=False),
                )
                yield response.content()
                return response.code
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("no approval request came")

    @defer.inlineCallbacks
    def test_series_move(self):
        """
        After an allowed query whose result holds a card number, a DROP that
        block denies, an UPDATE approved by a person, and a session refused
        for its group, the scrape (parsed by prometheus_client's parser)
        shows each: sessions started and refused by reason, commands by
        decision and addon, the masked value, the approval's wait, bytes
        both ways, store append and fsync timings, per-addon latency, the
        store's state and free space; and the active-sessions gauge is back
        where it was.
        """
        before = yield self.gateway.scrape()
        labels = {"connection": "payments", "protocol": "postgres"}
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT '4111111111111111' AS pan", password=self.token)
        self.assertEqual((code, out.strip()), (0, "411111******1111"), err)
        out, err, code = yield psql(self.gateway.dsn(), "-c", "DROP TABLE metrics_t", password=self.token)
        self.assertIn("no-drop", err)
        running = psql(self.gateway.dsn(), "-c", "UPDATE metrics_t SET id = 2", password=self.token)
        self.assertEqual((yield self.approve_when_asked()), 200)
        out, err, code = yield running
        self.assertEqual(code, 0, err)
        out, err, code = yield psql(self.gateway.dsn(), "-c", "SELECT 1", password=token(groups=("others",)))
        self.assertNotEqual(code, 0)
        yield self.gateway.wait_for("session.end", 3)
        yield self.gateway.wait_for("session.refused", 1)
        after = yield self.gateway.scrape()

        def moved(name, **extra):
            return value(after, name, **dict(labels, **extra)) - value(before, name, **dict(labels, **extra))

        self.assertEqual(moved("hoopgw_sessions_started_total"), 3)
        self.assertEqual(moved("hoopgw_sessions_refused_total", reason="allowed_groups"), 1)
        self.assertEqual(value(after, "hoopgw_sessions_active", **labels), value(before, "hoopgw_sessions_active", **labels))
        self.assertEqual(moved("hoopgw_commands_total", decision="deny", addon="block"), 1)
        self.assertEqual(moved("hoopgw_commands_total", decision="approved", addon="approve"), 1)
        self.assertGreaterEqual(moved("hoopgw_commands_total", decision="allow"), 1)
        self.assertEqual(
            value(after, "hoopgw_masked_values_total", connection="payments", addon="mask", action="masked")
            - value(before, "hoopgw_masked_values_total", connection="payments", addon="mask", action="masked"),
            1,
        )
        waits = ("hoopgw_approval_wait_seconds_count", {"connection": "payments", "outcome": "approved"})
        self.assertEqual(value(after, waits[0], **waits[1]) - value(before, waits[0], **waits[1]), 1)
        self.assertEqual(value(after, "hoopgw_approvals_pending", connection="payments"), 0)
        self.assertGreater(moved("hoopgw_bytes_relayed_total", direction="from_client"), 0)
        self.assertGreater(moved("hoopgw_bytes_relayed_total", direction="to_client"), 0)
        for name in ("hoopgw_store_append_seconds_count", "hoopgw_store_fsync_seconds_count"):
            self.assertGreater(value(after, name, backend="file") - value(before, name, backend="file"), 0, name)
        for addon in ("identity", "block", "approve", "mask", "record"):
            count = "hoopgw_addon_seconds_count"
            self.assertGreater(
                value(after, count, connection="payments", addon=addon) - value(before, count, connection="payments", addon=addon),
                0,
                addon,
            )
        self.assertEqual(value(after, "hoopgw_store_state", hoopgw_store_state="ok"), 1)
        self.assertGreater(value(after, "hoopgw_store_free_bytes"), 0)

    @defer.inlineCallbacks
    def test_active_during_session(self):
        """
        While a session is open the active-sessions gauge counts it.
        """
        labels = {"connection": "payments", "protocol": "postgres"}
        before = value((yield self.gateway.scrape()), "hoopgw_sessions_active", **labels)
        running = psql(self.gateway.dsn(), "-c", "SELECT pg_sleep(1.5)", password=self.token)
        for _ in range(100):
            during = value((yield self.gateway.scrape()), "hoopgw_sessions_active", **labels)
            if during > before:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(during, before + 1)
        out, err, code = yield running
        self.assertEqual(code, 0, err)

    @defer.inlineCallbacks
    def test_healthz(self):
        """
        /healthz answers 200 while the process serves.
        """
        code, body = yield self.gateway.get("/healthz")
        self.assertEqual((code, json.loads(body)), (200, {"status": "ok"}))

    @defer.inlineCallbacks
    def test_ready(self):
        """
        With the store writable, the key files readable and PostgreSQL up,
        /readyz answers 200 and lists every check it made.
        """
        code, body = yield self.gateway.get("/readyz")
        answer = json.loads(body)
        self.assertEqual(code, 200, body)
        self.assertEqual(sorted(answer["checks"]), ["identity:people", "identity:test", "store", "target:payments"])


class ReadinessTests(unittest.TestCase):
    """
    /readyz says which check failed, with 503, and recovers.
    """

    @defer.inlineCallbacks
    def test_store_disk_full(self):
        """
        A store on a 1 MiB tmpfs: ready; once the disk is full, 503 naming
        the store check and the write error; once space is freed, 200 again.
        """
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", folder], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", folder], check=True)
        gateway = MetricsGatewayHarness(self, store_path=os.path.join(folder, "audit"))
        code, body = yield gateway.get("/readyz")
        self.assertEqual(code, 200, body)
        filler = os.path.join(folder, "filler")
        descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(descriptor, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(descriptor)
        code, body = yield gateway.get("/readyz")
        answer = json.loads(body)
        self.assertEqual((code, answer["failed"]), (503, ["store"]), body)
        self.assertIn("No space left on device", answer["checks"]["store"]["error"])
        os.unlink(filler)
        code, body = yield gateway.get("/readyz")
        self.assertEqual(code, 200, body)

    @defer.inlineCallbacks
    def test_store_failed(self):
        """
        A store that failed (it refuses every append) makes /readyz 503
        with its state, and the metrics show the state.
        """
        gateway = MetricsGatewayHarness(self)
        code, body = yield gateway.get("/readyz")
        self.assertEqual(code, 200, body)
        while gateway.store._commit.syncing or gateway.store._commit.waiting:
            yield task.deferLater(reactor, 0.01, lambda: None)
        gateway.store._fail("a test broke the store")
        code, body = yield gateway.get("/readyz")
        answer = json.loads(body)
        self.assertEqual((code, answer["failed"], answer["checks"]["store"]["state"]), (503, ["store"], "failed"), body)
        samples = yield gateway.scrape()
        self.assertEqual(value(samples, "hoopgw_store_state", hoopgw_store_state="failed"), 1)
        yield gateway.stop()

    @defer.inlineCallbacks
    def test_postgres_store_unreachable(self):
        """
        A gateway on the shared PostgreSQL store: ready once the store has
        reached its database (``connecting`` before); when the store's
        database drops it and refuses it, 503 with the store unreachable;
        once it may log in again and the store has reconnected, 200.
        """
        from tests import test_postgres_store as shared

        settings = yield support.in_thread(shared.store_settings)
        gateway = MetricsGatewayHarness(self, store=settings)
        # Not ready until the store has reached its database.
        for _ in range(600):
            code, body = yield gateway.get("/readyz")
            if code == 200:
                break
            self.assertEqual(json.loads(body)["checks"]["store"]["state"], "connecting", body)
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(code, 200, body)
        yield support.in_thread(shared.superuser, "ALTER ROLE audit_writer NOLOGIN")
        self.addCleanup(shared.superuser, "ALTER ROLE audit_writer LOGIN")
        yield support.in_thread(
            shared.superuser,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            ("hoopgw-store:" + settings["postgres"]["schema"],),
        )
        for _ in range(200):
            code, body = yield gateway.get("/readyz")
            if code == 503:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        answer = json.loads(body)
        self.assertEqual((code, answer["failed"], answer["checks"]["store"]["state"]), (503, ["store"], "unreachable"), body)
        yield support.in_thread(shared.superuser, "ALTER ROLE audit_writer LOGIN")
        for _ in range(600):
            code, body = yield gateway.get("/readyz")
            if code == 200:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(code, 200, body)

    @defer.inlineCallbacks
    def test_target_down(self):
        """
        A connection whose target refuses TCP connections makes /readyz
        503 naming that connection; the reachable one passes.
        """
        port, down = free_port(), free_port()
        connections = {
            "payments": postgres_connection(port),
            "archive": postgres_connection(free_port(), target={"port": down}),
        }
        gateway = MetricsGatewayHarness(self, connections=connections)
        code, body = yield gateway.get("/readyz")
        answer = json.loads(body)
        self.assertEqual((code, answer["failed"]), (503, ["target:archive"]), body)
        self.assertTrue(answer["checks"]["target:payments"]["ok"])
        self.assertIn("127.0.0.1:%d" % (down,), answer["checks"]["target:archive"]["error"])

    @defer.inlineCallbacks
    def test_issuer_unreachable(self):
        """
        An OIDC provider whose JWKS URL does not answer makes /readyz 503
        naming it, and the failed key fetch is counted.
        """
        issuer = "http://127.0.0.1:%d" % (free_port(),)
        providers = support.providers_with_people()
        providers["remote"] = {"issuer": issuer, "audience": support.AUDIENCE, "jwks_url": issuer + "/jwks",
                               "algorithms": ["ES256"], "fetch_timeout": "2s"}
        gateway = MetricsGatewayHarness(self, providers=providers)
        before = value((yield gateway.scrape()), "hoopgw_identity_key_fetches_total", issuer=issuer, outcome="failed")
        code, body = yield gateway.get("/readyz")
        answer = json.loads(body)
        self.assertEqual((code, answer["failed"]), (503, ["identity:remote"]), body)
        after = value((yield gateway.scrape()), "hoopgw_identity_key_fetches_total", issuer=issuer, outcome="failed")
        self.assertEqual(after - before, 1)


class ConfigurationTests(unittest.TestCase):
    """
    gateway.metrics is checked as the rest of the file is.
    """

    def parse(self, metrics):
        from hoopgw import config as configuration

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        document = support.configuration_document(
            directory, {"payments": postgres_connection(free_port())}, gateway={"metrics": metrics}
        )
        return configuration.parse(document, os.path.join(directory, "hoopgw.yaml"))

    def test_defaults(self):
        """
        Only listen is needed; the rest has the documented defaults.
        """
        config = self.parse({"listen": "tcp:9187:interface=127.0.0.1"})
        self.assertEqual(
            config.gateway.metrics,
            {"listen": "tcp:9187:interface=127.0.0.1", "readiness_cache": 5.0, "connect_timeout": 2.0,
             "store_min_free_bytes": 0, "reuse_port": False},
        )

    def test_errors_name_the_key(self):
        """
        A missing listen, a bad duration and an unknown key are refused
        with their key paths.
        """
        from hoopgw.options import ConfigError

        for metrics, where in [
            ({}, "gateway.metrics.listen"),
            ({"listen": "tcp:9187", "connect_timeout": "soon"}, "gateway.metrics.connect_timeout"),
            ({"listen": "tcp:9187", "readyness_cache": "5s"}, "gateway.metrics.readyness_cache"),
        ]:
            error = self.assertRaises(ConfigError, self.parse, metrics)
            self.assertIn(where, str(error))


class ExportingMetricsHarness(MetricsGatewayHarness):
    """
    A gateway with its metrics listener and C{gateway.export} set.
    """

    def __init__(self, test, export, **settings):
        self._export = export
        MetricsGatewayHarness.__init__(self, test, **settings)

    def start(self, test, document):
        document["gateway"]["export"] = self._export
        MetricsGatewayHarness.start(self, test, document)


class ExportMetricsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_sink_down_and_caught_up(self):
        """
        While an export sink's HTTPS collector is down, the scrape shows the
        sink's lag (every event of the record so far), its failures counting
        up and nothing delivered; once the collector is up and the sink has
        caught up, the lag is 0, the delivered counter is the events the
        collector got, and the last success is no earlier than the
        collector's start.
        """
        from tests import siem_receivers

        directory = os.path.abspath(self.mktemp())
        certificates = siem_receivers.test_pki(os.path.join(directory, "pki"))
        collector = siem_receivers.Collector(certificates)
        self.addCleanup(collector.stop)
        sink = "metrics-siem"
        harness = ExportingMetricsHarness(self, {sink: {
            "type": "https", "url": collector.url, "ca": certificates["ca"],
            "poll_interval": "0.05s", "retry_initial": "0.05s", "retry_max": "0.2s",
        }})
        runner = harness.gateway.export.runners[sink]
        _, err, code = yield psql(harness.dsn(), "-c", "SELECT 1", password=token())
        self.assertEqual(code, 0, err)
        yield harness.wait_for("session.end")
        for _ in range(200):
            if runner.state["failures"] >= 2:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        down = yield harness.scrape()
        head = harness.store.seq
        self.assertGreaterEqual(head, 3)
        self.assertEqual(value(down, "hoopgw_export_lag_events", sink=sink), head)
        self.assertGreaterEqual(value(down, "hoopgw_export_failures_total", sink=sink), 2)
        self.assertEqual(value(down, "hoopgw_export_delivered_events_total", sink=sink), 0)
        started = reactor.seconds()
        collector.start()
        for _ in range(200):
            if runner.cursor == harness.store.seq and runner.cursor:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        # Until the next cycle after catching up sets the last success.
        for _ in range(200):
            up = yield harness.scrape()
            if value(up, "hoopgw_export_last_success_timestamp_seconds", sink=sink) >= started:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(value(up, "hoopgw_export_lag_events", sink=sink), harness.store.seq - runner.cursor)
        self.assertEqual(value(up, "hoopgw_export_lag_events", sink=sink), 0)
        self.assertEqual(value(up, "hoopgw_export_delivered_events_total", sink=sink), len(collector.documents))
        self.assertEqual(sorted(collector.seqs()), list(range(1, runner.cursor + 1)))
        self.assertGreaterEqual(value(up, "hoopgw_export_last_success_timestamp_seconds", sink=sink), started)
        self.assertGreaterEqual(value(up, "hoopgw_export_failures_total", sink=sink),
                                value(down, "hoopgw_export_failures_total", sink=sink))
