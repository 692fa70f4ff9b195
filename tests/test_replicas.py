"""
Replicas: several gateway processes on one port (reuse_port) sharing a
PostgreSQL store, with real twistd processes, psycopg2 clients and the
run's PostgreSQL: the kernel spreads connections over both; a cancel
request reaching the process that does not hold the session cancels the
statement on the one that does (recorded once, by it); a cancel naming no
session of any process is recorded as refused once; a token used on one
process is refused on the other.  And the configuration checks of
reuse_port.
"""

import json
import os
import socket
import struct
import threading
import time

import psycopg2
import psycopg2.errors
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from hoopgw import config
from hoopgw.options import ConfigError
from testbed.throwaway import free_port
from tests import support
from tests.support import in_thread, token
from tests.test_postgres_store import GatewayProcess, source_for, store_settings


def replica_document(shared_port):
    """
    A gateway configuration (for L{GatewayProcess}) whose connection
    C{payments} listens on C{shared_port} with reuse_port, whose connection
    C{direct} listens on a port of this process alone, and whose issuer
    has replay protection.
    """

    def document(process):
        process.direct_port = process.port
        process.port = shared_port
        _, jwks_path = support.issuer()
        providers = {
            "test": {
                "issuer": support.ISSUER,
                "audience": support.AUDIENCE,
                "jwks_file": jwks_path,
                "algorithms": ["ES256"],
                "replay_protection": True,
                "max_lifetime": "1h",
            }
        }
        return support.configuration_document(
            process.directory,
            {
                "payments": support.postgres_connection(shared_port, reuse_port=True),
                "direct": support.postgres_connection(process.direct_port),
            },
            providers=providers,
        )

    return document


def events(settings, kind=None):
    """
    The store's events (of type C{kind}), none before a gateway made it.
    """
    source = source_for(settings)
    try:
        return [event for _, _, event in source.entries() if event and (kind is None or event.get("type") == kind)]
    except psycopg2.errors.UndefinedTable:
        return []
    finally:
        source.close()


def connect(port, password):
    return psycopg2.connect(
        "host=127.0.0.1 port=%d dbname=payments user=ci-bot sslmode=require connect_timeout=10" % (port,),
        password=password,
    )


def target_superuser(sql):
    connection = psycopg2.connect(support.cluster().dsn("postgres", dbname="payments"))
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        connection.close()


class ReuseConfigurationTests(unittest.TestCase):
    """
    C{reuse_port} is checked with the rest of the configuration.
    """

    def parse(self, **connection):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        document = support.configuration_document(directory, {"payments": support.postgres_connection(15432, **connection)})
        return config.parse(document)

    def test_default_off(self):
        """
        Without the key, a connection does not share its port.
        """
        self.assertFalse(self.parse().connections["payments"].reuse_port)

    def test_tcp(self):
        """
        On a plain TCP listener it is taken.
        """
        self.assertTrue(self.parse(reuse_port=True).connections["payments"].reuse_port)

    def test_not_tcp(self):
        """
        On a UNIX socket it is refused with the key path and a sentence
        saying what it works with.
        """
        with self.assertRaises(ConfigError) as raised:
            self.parse(reuse_port=True, listen="unix:/tmp/hoopgw-test.sock")
        self.assertIn("connections.payments.reuse_port", str(raised.exception))
        self.assertIn("plain TCP listener on a fixed port", str(raised.exception))

    def test_any_port(self):
        """
        On port 0 (a port the system picks) it is refused: processes could
        not meet on it.
        """
        with self.assertRaises(ConfigError) as raised:
            self.parse(reuse_port=True, listen="tcp:0:interface=127.0.0.1")
        self.assertIn("fixed port", str(raised.exception))

    def test_not_boolean(self):
        """
        A value that is not true or false is refused.
        """
        with self.assertRaises(ConfigError) as raised:
            self.parse(reuse_port="yes")
        self.assertIn("connections.payments.reuse_port", str(raised.exception))

    def test_admin_and_metrics(self):
        """
        The admin and metrics listeners take reuse_port too (replicas of
        one file share them), on TCP only.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        gateway = {
            "admin": {"listen": "tcp:8443:interface=127.0.0.1", "reuse_port": True},
            "metrics": {"listen": "tcp:9187:interface=127.0.0.1", "reuse_port": True},
        }
        document = support.configuration_document(directory, {"payments": support.postgres_connection(15432)}, gateway=gateway)
        parsed = config.parse(document).gateway
        self.assertTrue(parsed.admin["reuse_port"])
        self.assertTrue(parsed.metrics["reuse_port"])
        gateway["metrics"]["listen"] = "unix:/tmp/hoopgw-metrics.sock"
        with self.assertRaises(ConfigError) as raised:
            config.parse(document)
        self.assertIn("gateway.metrics.reuse_port", str(raised.exception))

    def test_ssh_needs_host_keys(self):
        """
        An SSH connection sharing its port must give its host keys: each
        process would otherwise show its own.
        """
        from tests import ssh_support

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        shell = ssh_support.ssh_connection(2222, addons=["identity", "record"], reuse_port=True)
        document = support.configuration_document(directory, {"shell": shell})
        self.assertTrue(config.parse(document).connections["shell"].reuse_port)
        del shell["host_keys"]
        with self.assertRaises(ConfigError) as raised:
            config.parse(document)
        self.assertIn("connections.shell.reuse_port", str(raised.exception))
        self.assertIn("host_keys", str(raised.exception))


class ReplicaTests(unittest.TestCase):
    """
    Two gateway processes on one port, one PostgreSQL store.
    """

    timeout = 300

    @defer.inlineCallbacks
    def setUp(self):
        self.settings = yield in_thread(store_settings)
        shared = free_port()
        self.first = GatewayProcess(self, self.settings, document=replica_document(shared))
        self.second = GatewayProcess(self, self.settings, document=replica_document(shared))
        self.port = shared
        # Each listens (on the shared port and its own) before it records
        # its start.
        for _ in range(600):
            starts = yield in_thread(events, self.settings, "gateway.start")
            if len(starts) == 2:
                break
            for process in (self.first, self.second):
                if process.process.poll() is not None:
                    raise AssertionError(process.output())
            yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            raise AssertionError("the two gateways did not start: %s %s" % (self.first.output(), self.second.output()))
        self.instances = {start["gateway"] for start in starts}
        self.processes = {
            start["gateway"]: next(p for p in (self.first, self.second) if p.process.pid == start["pid"]) for start in starts
        }
        for process in (self.first, self.second):
            yield in_thread(process.wait_listening)

    def session_gateway(self, before):
        """
        The gateway of the newest session started after seq C{before}.
        """
        starts = [event for event in events(self.settings, "session.start") if event["seq"] > before]
        return starts[-1]["gateway"], starts[-1]["session"]

    def last_seq(self):
        every = events(self.settings)
        return every[-1]["seq"] if every else 0

    def test_port_shared(self):
        """
        Connections to the shared port reach both processes (the kernel
        picks one for each).
        """
        return in_thread(self._port_shared)

    def _port_shared(self):
        seen = set()
        for _ in range(40):
            before = self.last_seq()
            connection = connect(self.port, token())
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT 1")
            finally:
                connection.close()
            seen.add(self.session_gateway(before)[0])
            if seen == self.instances:
                break
        self.assertEqual(seen, self.instances)

    def test_cancel_crosses(self):
        """
        A client's cancel request (psycopg2's C{connection.cancel()}, a new
        connection to the shared port) that reaches the other process
        cancels a running C{pg_sleep(30)}: the process holding the session
        records C{command.cancel} once, naming the process it came through
        (C{via}), and nobody records it as a cancel naming no session.
        """
        return in_thread(self._cancel_crosses)

    def _cancel_crosses(self):
        for attempt in range(30):
            before = self.last_seq()
            connection = connect(self.port, token())
            outcome = {}

            def run():
                try:
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_sleep(30)")
                    outcome["done"] = True
                except psycopg2.errors.QueryCanceled as error:
                    outcome["cancelled"] = str(error)
                except psycopg2.Error as error:
                    outcome["error"] = str(error)

            running = threading.Thread(target=run)
            running.start()
            try:
                # The statement runs on the target before it is cancelled.
                for _ in range(300):
                    if target_superuser("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'")[0][0]:
                        break
                    threading.Event().wait(0.05)
                holder, session = self.session_gateway(before)
                connection.cancel()
                running.join(60)
                self.assertIn("cancelled", outcome, outcome)
                self.assertIn("canceling statement due to user request", outcome["cancelled"])
            finally:
                running.join(60)
                connection.close()
            cancels = []
            for _ in range(200):
                cancels = [event for event in events(self.settings, "command.cancel") if event["session"] == session]
                if cancels:
                    break
                threading.Event().wait(0.05)
            self.assertEqual(len(cancels), 1, cancels)
            if "via" in cancels[0]:
                self.assertEqual(cancels[0]["via"], (self.instances - {holder}).pop())
                break
        else:
            self.fail("no cancel reached the other process in 30 attempts")
        # A session the cancel's replica opens afterwards is recorded after
        # anything that replica recorded of the cancel (its appends keep
        # their order): then no refusal of it is to come.
        before = self.last_seq()
        connect(self.processes[cancels[0]["via"]].direct_port, token()).close()
        for _ in range(200):
            if [event for event in events(self.settings, "session.start") if event["seq"] > before]:
                break
            threading.Event().wait(0.05)
        refused = [event for event in events(self.settings, "session.refused") if "cancel-unknown-key" in repr(event)]
        self.assertEqual(refused, [])

    def test_unknown_cancel_key(self):
        """
        A cancel request whose key no process holds is recorded as refused
        once, by the process it reached, after the others had the chance to
        claim it.
        """
        return in_thread(self._unknown_cancel_key)

    def _unknown_cancel_key(self):
        before = self.last_seq()
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(struct.pack("!IIII", 16, 80877102, 12345, 67890))
            # The gateway closes the connection without an answer.
            self.assertEqual(sock.recv(100), b"")
        refused = []
        for _ in range(200):
            refused = [
                event
                for event in events(self.settings, "session.refused")
                if event["seq"] > before and "cancel-unknown-key" in repr(event)
            ]
            if refused:
                break
            threading.Event().wait(0.05)
        self.assertEqual(len(refused), 1, refused)
        self.assertIn(refused[0]["gateway"], self.instances)

    def test_replayed_token_refused_on_the_other(self):
        """
        A token that opened a session on one process (its own port) is
        refused on the other (its own port): the used token is in the
        shared store, not only in the first process's memory; the token
        itself is not stored.
        """
        return in_thread(self._replayed)

    def _replayed(self):
        used = token()
        connection = connect(self.first.direct_port, used)
        connection.close()
        with self.assertRaises(psycopg2.OperationalError) as raised:
            connect(self.second.direct_port, used)
        self.assertIn("already used", str(raised.exception))
        # A fresh token still opens a session there.
        connect(self.second.direct_port, token()).close()
        rows = target_superuser("SELECT 1")
        self.assertEqual(rows, [(1,)])
        stored = []
        connection = psycopg2.connect(
            self.settings["postgres"]["dsn"], password=open(self.settings["postgres"]["password"]["file"]).read().strip()
        )
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT token, gateway FROM %s.used_tokens" % (self.settings["postgres"]["schema"],))
                stored = cursor.fetchall()
        finally:
            connection.close()
        self.assertEqual(len(stored), 2)
        self.assertTrue(all(used not in row[0] for row in stored))
        self.assertEqual({row[1] for row in stored}, self.instances)


class ReusePortEndpointTests(unittest.TestCase):
    """
    The listener reuse_port builds.
    """

    @defer.inlineCallbacks
    def test_two_listeners_one_port(self):
        """
        Two listeners bound with SO_REUSEPORT share a port (in two
        processes as in one), where a plain second listener is refused.
        """
        from twisted.internet import endpoints, error, protocol

        from hoopgw import listeners

        factory = protocol.Factory.forProtocol(protocol.Protocol)
        port = free_port()
        first = yield listeners.ReusePortEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
        self.addCleanup(first.stopListening)
        second = yield listeners.ReusePortEndpoint(reactor, port, interface="127.0.0.1").listen(factory)
        self.addCleanup(second.stopListening)
        self.assertEqual(first.getHost().port, second.getHost().port)
        with self.assertRaises(error.CannotListenError):
            yield endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(factory)


class UnitTests(unittest.TestCase):
    """
    The systemd template running N replicas on one host.
    """

    def test_units_verify(self):
        """
        systemd-analyze verify accepts an instance of the replica template
        and the target grouping them, without a word.
        """
        import subprocess
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name in ("hoopgw-replica@.service", "hoopgw-replicas.target"):
            with open(os.path.join(root, "packaging", "systemd", name)) as handle:
                text = handle.read().replace("/usr/local/bin/", os.path.dirname(sys.executable) + "/")
            with open(os.path.join(directory, name.replace("@.", "@1.")), "w") as handle:
                handle.write(text)
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", "./hoopgw-replica@1.service", "./hoopgw-replicas.target"],
            cwd=directory, capture_output=True, text=True, timeout=120,
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_replicas_share_one_configuration(self):
        """
        Every instance runs the same configuration file and state folder,
        is part of the target (stopped and restarted with it), and keeps
        the hardening of the other units.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "packaging", "systemd", "hoopgw-replica@.service")) as handle:
            lines = set(handle.read().splitlines())
        for line in (
            "ExecStart=/usr/local/bin/twistd --reactor=asyncio --nodaemon --pidfile= hoopgw --config /etc/hoopgw/hoopgw.yaml",
            "PartOf=hoopgw-replicas.target",
            "WantedBy=hoopgw-replicas.target",
            "ReadWritePaths=/var/lib/hoopgw",
            "User=hoopgw",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=",
        ):
            self.assertIn(line, lines)


class _Store:
    """
    The two calls L{CancelPeers} makes of its store, kept for the test.
    """

    class config:
        schema = "hoopgw"

    def __init__(self):
        self.sent = []
        self.callbacks = []

    def notify(self, channel, payload):
        self.sent.append((channel, payload))
        return defer.succeed(None)

    def listen(self, channel, callback):
        self.callbacks.append(callback)
        return defer.succeed(None)


class _Frontend:
    def __init__(self):
        self.cancels = []

    def cancel(self, via=None):
        self.cancels.append(via)


class _Factory:
    def __init__(self, name):
        self.connection = type("Connection", (), {"name": name})()
        self.active = {}


class CancelMessageTests(unittest.TestCase):
    """
    The messages replicas exchange about cancel requests, on a channel any
    role of the store's database may LISTEN and NOTIFY on: only
    well-formed, recent, new messages made with the peering key act.
    """

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        from hoopgw.replicas import CancelPeers

        self.clock = MemoryReactorClock()
        self.key = os.urandom(32)
        self.sender = CancelPeers(_Store(), self.clock, self.key, "g-sender")
        self.holder = CancelPeers(_Store(), self.clock, self.key, "g-holder")
        self.factory = _Factory("payments")
        self.frontend = _Frontend()
        self.session_key = (1234, 5678)
        self.factory.active[self.session_key] = self.frontend
        self.holder.register("payments", self.session_key, self.factory)

    def forwarded(self, key=None, connection="payments"):
        """
        What the sender broadcasts for a cancel of C{key}.
        """
        waiting = self.sender.forward(connection, key or self.session_key)
        return waiting, self.sender.store.sent[-1][1]

    def test_routed(self):
        """
        The holder cancels its session, naming the sender (via), and its
        answer settles the sender's wait with True.  Neither message holds
        the key's secret half.
        """
        waiting, message = self.forwarded()
        self.assertNotIn("5678", message)
        self.holder._received(message)
        self.assertEqual(self.frontend.cancels, ["g-sender"])
        answer = self.holder.store.sent[-1][1]
        self.sender._received(answer)
        self.assertIs(self.successResultOf(waiting), True)

    def test_unknown_key_waits_then_false(self):
        """
        A key nobody holds: no cancel, no answer, and the sender's wait
        ends with False after CANCEL_WAIT.
        """
        from hoopgw.replicas import CANCEL_WAIT

        waiting, message = self.forwarded(key=(1, 2))
        self.holder._received(message)
        self.assertEqual((self.frontend.cancels, self.holder.store.sent), ([], []))
        self.assertNoResult(waiting)
        self.clock.advance(CANCEL_WAIT)
        self.assertIs(self.successResultOf(waiting), False)

    def test_other_connection(self):
        """
        A cancel for the same key on another connection does not cancel
        this connection's session (as locally: keys are per listener).
        """
        _, message = self.forwarded(connection="reports")
        self.holder._received(message)
        self.assertEqual(self.frontend.cancels, [])

    def test_replayed_message(self):
        """
        A message received twice acts once.
        """
        _, message = self.forwarded()
        self.holder._received(message)
        self.holder._received(message)
        self.assertEqual(self.frontend.cancels, ["g-sender"])

    def test_forged_and_malformed(self):
        """
        A message without the peering key's MAC, changed after it was
        made, too old, too large, or not JSON at all does nothing.
        """
        from hoopgw import replicas

        _, message = self.forwarded()
        parsed = json.loads(message)
        forged = dict(parsed, mac=replicas._mac(os.urandom(32), parsed))
        changed = dict(parsed, connection="payments ")
        old = dict(parsed, at=parsed["at"] - 3600)
        old["mac"] = replicas._mac(self.key, old)
        for payload in (json.dumps(forged), json.dumps(changed), json.dumps(old), message + " " * 4096, "{", "[]", None):
            self.holder._received(payload)
        self.assertEqual(self.frontend.cancels, [])
        # The genuine one still acts.
        self.holder._received(message)
        self.assertEqual(self.frontend.cancels, ["g-sender"])

    def test_forged_answer(self):
        """
        An answer not made with the peering key does not settle the
        sender's wait: nobody can hide a refused cancel by answering it.
        """
        waiting, message = self.forwarded(key=(1, 2))
        nonce = json.loads(message)["nonce"]
        self.sender._received(json.dumps({"v": 1, "kind": "held", "nonce": nonce, "to": "g-sender", "at": time.time(),
                                          "from": "g-mallory", "mac": "0" * 64}))
        self.assertNoResult(waiting)

    def test_rate_bound(self):
        """
        Past CANCEL_RATE forwarded cancels at once, a cancel is answered
        False at once without a message.
        """
        from hoopgw.replicas import CANCEL_RATE

        for _ in range(int(CANCEL_RATE)):
            self.sender.forward("payments", (1, 2))
        sent = len(self.sender.store.sent)
        self.assertIs(self.successResultOf(self.sender.forward("payments", (1, 2))), False)
        self.assertEqual(len(self.sender.store.sent), sent)
        self.clock.advance(1)
        self.sender.forward("payments", (1, 2))
        self.assertEqual(len(self.sender.store.sent), sent + 1)

    def test_unregistered(self):
        """
        A session that ended is no longer found.
        """
        self.holder.unregister("payments", self.session_key)
        _, message = self.forwarded()
        self.holder._received(message)
        self.assertEqual(self.frontend.cancels, [])


class KubernetesReplicaTests(unittest.TestCase):
    """
    Two gateway processes (each with its own file store) share a
    Kubernetes connection's port: mitmproxy's socket takes reuse_port too.
    """

    timeout = 180

    def test_both_serve(self):
        """
        Requests without a token to the shared port are refused by both
        processes, each recording the refusal in its own store: both
        listen there.
        """
        return in_thread(self._both_serve)

    def _both_serve(self):
        import ssl
        import urllib.error
        import urllib.request

        from hoopgw.store.sources import FileSource

        shared = free_port()
        certificate, key, ca = support.gateway_certificate()

        def document(process):
            process.port = shared
            connection = {
                "protocol": "kubernetes",
                "listen": "tcp:%d:interface=127.0.0.1" % (shared,),
                "reuse_port": True,
                "tls": {"certificate": certificate, "key": key},
                # Never reached: every request here is refused before.
                "target": {"server": "https://127.0.0.1:%d" % (free_port(),), "ca": ca, "token": {"file": __file__}},
                "allowed_groups": ["payments-bots"],
                "addons": ["identity", "record"],
            }
            return support.configuration_document(process.directory, {"cluster": connection})

        processes = [GatewayProcess(self, {"path": "audit"}, document=document) for _ in range(2)]
        context = ssl.create_default_context(cafile=ca)

        def refused(process):
            return [
                event
                for _, _, event in FileSource(os.path.join(process.directory, "audit")).entries()
                if event and event.get("type") == "session.refused"
            ]

        for _ in range(300):
            if all(process.process.poll() is None for process in processes) and all(
                os.path.isdir(os.path.join(process.directory, "audit")) for process in processes
            ):
                try:
                    urllib.request.urlopen("https://127.0.0.1:%d/api/v1/namespaces" % (shared,), context=context, timeout=10)
                except urllib.error.HTTPError as error:
                    self.assertEqual(error.code, 401)
                except OSError:
                    pass
                if all(refused(process) for process in processes):
                    break
            for process in processes:
                if process.process.poll() is not None:
                    self.fail("a gateway exited: %s" % (process.output(),))
            time.sleep(0.1)
        else:
            self.fail("both processes did not refuse a request: %s" % ([len(refused(p)) for p in processes],))


class SharedReplayCacheTests(unittest.TestCase):
    """
    Used tokens in the store's used_tokens table, as two processes' stores
    see them (a real PostgreSQL).
    """

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.internet.task import Clock

        from hoopgw.replicas import SharedReplayCache
        from tests.test_postgres_store import two_stores

        _, first, second = yield two_stores(self)
        self.clock = Clock()
        self.clock.advance(1000)
        self.first = SharedReplayCache(first, self.clock, "oidc\0https://issuer.test", "g-first")
        self.second = SharedReplayCache(second, self.clock, "oidc\0https://issuer.test", "g-second")

    @defer.inlineCallbacks
    def test_once_across_processes(self):
        """
        The same token offered to both at once is fresh for exactly one;
        afterwards both see it used.
        """
        answers = yield defer.gatherResults([self.first.use("jti-1", 2000), self.second.use("jti-1", 2000)])
        self.assertEqual(sorted(answers), [False, True])
        self.assertTrue((yield self.first.seen("jti-1")))
        self.assertTrue((yield self.second.seen("jti-1")))
        self.assertFalse((yield self.second.seen("jti-2")))

    @defer.inlineCallbacks
    def test_expired_row_free_again(self):
        """
        Once its token expired, a row no longer makes a replay (as the
        in-memory cache forgets it), and another issuer's token of the same
        id is another row.
        """
        from hoopgw.replicas import SharedReplayCache

        self.assertTrue((yield self.first.use("jti-3", 1500)))
        other = SharedReplayCache(self.second.store, self.clock, "oidc\0https://other.test", "g-second")
        self.assertTrue((yield other.use("jti-3", 1500)))
        self.clock.advance(600)
        self.assertTrue((yield self.second.use("jti-3", 2500)))
        self.assertFalse((yield self.first.use("jti-3", 2500)))

    @defer.inlineCallbacks
    def test_store_unreachable(self):
        """
        A token the store cannot check (its connection was cut) is refused
        with a StoreError (the identity provider refuses the login with it)
        and not remembered: once the store has reconnected by itself, the
        same token opens its session.
        """
        from hoopgw.store.errors import StoreError
        from tests.test_postgres_store import superuser

        self.assertTrue((yield self.first.use("jti-0", 2000)))
        store = self.first.store
        yield in_thread(superuser, "ALTER ROLE audit_writer NOLOGIN")
        self.addCleanup(superuser, "ALTER ROLE audit_writer LOGIN")
        yield in_thread(
            superuser,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            ("hoopgw-store:" + store.config.schema,),
        )
        for _ in range(300):
            if store.outage is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield self.assertFailure(self.first.use("jti-4", 2000), StoreError)
        yield in_thread(superuser, "ALTER ROLE audit_writer LOGIN")
        for _ in range(300):
            try:
                fresh = yield self.first.use("jti-4", 2000)
            except StoreError:
                yield task.deferLater(reactor, 0.1, lambda: None)
                continue
            break
        self.assertIs(fresh, True)


class StoreInitTests(unittest.TestCase):
    """
    What C{hoopgw store-init} creates and grants for replicas.
    """

    def test_tables_and_grants(self):
        """
        The DDL creates used_tokens and peering; the gateway role may
        write them, auditors may not read them (neither is evidence, and
        peering holds the key of the replicas' cancel messages).
        """
        from hoopgw.store.postgres import least_privilege_sql

        sql = least_privilege_sql("hoopgw", "gw", ["auditor"])
        self.assertIn("CREATE TABLE IF NOT EXISTS hoopgw.used_tokens", sql)
        self.assertIn("CREATE TABLE IF NOT EXISTS hoopgw.peering", sql)
        self.assertIn('GRANT SELECT, INSERT, UPDATE, DELETE ON hoopgw.used_tokens TO "gw";', sql)
        self.assertIn('GRANT SELECT, INSERT ON hoopgw.peering TO "gw";', sql)
        auditor = [line for line in sql.splitlines() if line.endswith('TO "auditor";')]
        self.assertTrue(auditor)
        self.assertFalse([line for line in auditor if "used_tokens" in line or "peering" in line])
