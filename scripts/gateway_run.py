"""
A throwaway PostgreSQL and a hoopgw gateway in front of it, run as a real
twistd process, for the scripts that attack or measure the gateway
(scripts/fuzz-postgres-startup, scripts/bench-floods).  Not a test
helper: the scripts report figures, they assert nothing.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".venv", "bin")


def bootstrap():
    """
    Run under the project's virtual environment, with the worktree's
    package first on the path.
    """
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(ROOT, ".venv")):
        subprocess.run([os.path.join(ROOT, "scripts", "setup")], check=True)
        os.execv(os.path.join(VENV, "python"), [os.path.join(VENV, "python")] + sys.argv)
    sys.path.insert(0, ROOT)


def wait_for_port(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit("nothing listens on port %d" % (port,))


class GatewayRun:
    """
    The cluster, the gateway's configuration and its process.

    @ivar token: a valid token for the C{bench-bot} identity.
    """

    def __init__(self, connection_settings=None, gateway_settings=None, tls=False, extra_connections=None):
        self.tls = tls
        # More listeners, by name: each a connection's settings (its
        # "listen" and "target" included); their ports go in self.ports.
        self.extra_connections = extra_connections or {}
        self.ports = {}
        self.directory = tempfile.mkdtemp(prefix="hoopgw-run-")
        self.connection_settings = connection_settings or {}
        self.gateway_settings = gateway_settings or {}
        self.cluster = None
        self.process = None

    def start(self):
        import yaml

        from hoopgw.identity import dev
        from testbed.throwaway import PostgresCluster, free_port

        password = os.urandom(8).hex()
        self.cluster = PostgresCluster()
        self.cluster.start()
        self.cluster.create_role("bench", password)
        self.cluster.create_database("bench", "bench")
        with open(os.path.join(self.directory, "bench.password"), "w") as handle:
            handle.write(password + "\n")
        key_path, jwks = dev.generate_key(self.directory)
        self.port = free_port()
        self.store_path = os.path.join(self.directory, "audit")
        connection = {
            "protocol": "postgres",
            "listen": "tcp:%d:interface=127.0.0.1" % (self.port,),
            "allow_plaintext_password": True,
            "target": {
                "host": "127.0.0.1",
                "port": self.cluster.port,
                "database": "bench",
                "user": "bench",
                "password": {"file": os.path.join(self.directory, "bench.password")},
                "tls": "verify-full",
                "ca": self.cluster.ca_path,
            },
            "allowed_groups": ["bench"],
            "addons": ["identity", "record"],
        }
        if self.tls:
            from testbed import pki

            authority = pki.make_ca("run CA")
            certificate, key = authority.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]).write(
                self.directory, "gateway"
            )
            connection["tls"] = {"certificate": certificate, "key": key}
        connection.update(self.connection_settings)
        gateway = {"store": {"path": self.store_path}}
        gateway.update(self.gateway_settings)
        config = {
            "gateway": gateway,
            "identity_providers": {
                "bench": {
                    "issuer": "https://issuer.bench",
                    "audience": "hoopgw-bench",
                    "jwks_file": jwks,
                    "algorithms": ["ES256"],
                }
            },
            "connections": {"bench": connection},
        }
        for name, settings in self.extra_connections.items():
            self.ports[name] = free_port()
            extra = {"protocol": "postgres", "listen": "tcp:%d:interface=127.0.0.1" % (self.ports[name],),
                     "allowed_groups": ["bench"]}
            extra.update(settings)
            config["connections"][name] = extra
        path = os.path.join(self.directory, "hoopgw.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(config, handle)
        self.log_path = os.path.join(self.directory, "gateway.log")
        self.process = subprocess.Popen(
            [os.path.join(VENV, "twistd"), "--reactor=asyncio", "-n", "--pidfile=", "-l", self.log_path,
             "hoopgw", "--config", path],
            cwd=ROOT,
            # This worktree's package, not the copy installed in the venv.
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        wait_for_port(self.port)
        for port in self.ports.values():
            wait_for_port(port)
        with open(key_path, "rb") as handle:
            self.token = dev.mint(handle.read(), "bench-bot", "https://issuer.bench", "hoopgw-bench", ["bench"], lifetime=3600)

    def dsn(self):
        return "host=127.0.0.1 port=%d dbname=bench user=bench-bot password=%s sslmode=disable" % (self.port, self.token)

    def rss_kib(self):
        with open("/proc/%d/status" % (self.process.pid,)) as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def log_text(self):
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def store_bytes(self):
        total = 0
        for name in os.listdir(self.store_path):
            path = os.path.join(self.store_path, name)
            if os.path.isfile(path) and name.endswith(".jsonl"):
                total += os.path.getsize(path)
        return total

    def bytes_by_type(self, since=0):
        """
        The bytes the store's lines take, by event type, from the
        C{since}-th byte of its segments on.
        """
        import json

        sizes = {}
        offset = 0
        for name in sorted(os.listdir(self.store_path)):
            path = os.path.join(self.store_path, name)
            if not (os.path.isfile(path) and name.endswith(".jsonl")):
                continue
            with open(path, "rb") as handle:
                for line in handle:
                    if offset >= since:
                        kind = json.loads(line).get("type")
                        sizes[kind] = sizes.get(kind, 0) + len(line)
                    offset += len(line)
        return sizes

    def events(self):
        from hoopgw.store.file import read_events

        return [event for _, _, _, event in read_events(self.store_path)]

    def stop_gateway(self):
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def cleanup(self):
        self.stop_gateway()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
