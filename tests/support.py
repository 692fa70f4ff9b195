"""
What the integration tests share: one throwaway PostgreSQL cluster for the
whole run, a demo token issuer, a gateway certificate, and a harness that
runs a real gateway in the test's reactor with a configuration the test
writes.
"""

import atexit
import json
import os
import shutil
import tempfile

import yaml
from twisted.internet import defer, reactor, threads
from twisted.internet.utils import getProcessOutputAndValue

from hoopgw import config as configuration
from testbed import pki
from hoopgw.gateway import Gateway
from hoopgw.identity import dev
from hoopgw.store import open_store
from hoopgw.store.file import read_events
from testbed.throwaway import PostgresCluster, free_port

ISSUER = "https://issuer.test"
AUDIENCE = "hoopgw-test"
APP_PASSWORD = "app-secret-do-not-leak"
PSQL = shutil.which("psql") or "/usr/bin/psql"
PGBENCH = shutil.which("pgbench") or "/usr/lib/postgresql/15/bin/pgbench"

_shared = {}


def workspace():
    """
    A folder for this run's shared files (keys, certificates).
    """
    if "workspace" not in _shared:
        directory = tempfile.mkdtemp(prefix="hoopgw-tests-")
        atexit.register(shutil.rmtree, directory, True)
        _shared["workspace"] = directory
    return _shared["workspace"]


def cluster():
    """
    The run's PostgreSQL cluster, started on first use, with the role
    C{app} owning the database C{payments}.
    """
    if "cluster" not in _shared:
        instance = PostgresCluster()
        instance.start()
        atexit.register(instance.stop)
        instance.create_role("app", APP_PASSWORD)
        instance.create_database("payments", "app")
        instance.create_role("md5_user", APP_PASSWORD, method="md5")
        instance.create_role("trust_user", None, method=None)
        instance.psql("GRANT ALL ON DATABASE payments TO md5_user, trust_user")
        instance.psql("GRANT ALL ON SCHEMA public TO md5_user, trust_user", dbname="payments")
        _shared["cluster"] = instance
    return _shared["cluster"]


def issuer():
    """
    The demo issuer's key and JWKS: C{(private key PEM, JWKS path)}.
    """
    if "issuer" not in _shared:
        key_path, jwks_path = dev.generate_key(os.path.join(workspace(), "issuer"), kid="test-1")
        with open(key_path, "rb") as handle:
            _shared["issuer"] = (handle.read(), jwks_path)
    return _shared["issuer"]


def token(subject="ci-bot", groups=("payments-bots",), **overrides):
    """
    A token from the test issuer; C{overrides} go to L{dev.mint}.
    """
    pem, _ = issuer()
    arguments = dict(subject=subject, issuer=ISSUER, audience=AUDIENCE, groups=groups, kid="test-1")
    arguments.update(overrides)
    return dev.mint(pem, **arguments)


def gateway_certificate():
    """
    C{(certificate path, key path, CA path)} for the gateway's TLS.
    """
    if "certificate" not in _shared:
        directory = os.path.join(workspace(), "tls")
        os.makedirs(directory, exist_ok=True)
        authority = pki.make_ca("hoopgw test gateway CA")
        certificate, key = authority.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]).write(
            directory, "gateway"
        )
        ca_path, _ = authority.write(directory, "gateway-ca")
        _shared["certificate"] = (certificate, key, ca_path)
    return _shared["certificate"]


def password_file():
    path = os.path.join(workspace(), "app.password")
    if not os.path.exists(path):
        with open(path, "w") as handle:
            handle.write(APP_PASSWORD + "\n")
    return path


def postgres_connection(port, addons=("identity", "record"), target=None, **settings):
    """
    The configuration of one PostgreSQL connection to the run's cluster.
    """
    instance = cluster()
    certificate, key, _ = gateway_certificate()
    connection = {
        "protocol": "postgres",
        "listen": "tcp:%d:interface=127.0.0.1" % (port,),
        "tls": {"certificate": certificate, "key": key},
        "target": {
            "host": "127.0.0.1",
            "port": instance.port,
            "database": "payments",
            "user": "app",
            "password": {"file": password_file()},
            "tls": "verify-full",
            "ca": instance.ca_path,
        },
        "allowed_groups": ["payments-bots"],
        "addons": list(addons),
    }
    if target:
        connection["target"].update(target)
        connection["target"] = {key: value for key, value in connection["target"].items() if value is not None}
    connection.update(settings)
    return connection


def configuration_document(directory, connections, providers=None, gateway=None):
    _, jwks_path = issuer()
    document = {
        "gateway": {"store": {"path": os.path.join(directory, "audit")}, "state_dir": os.path.join(directory, "state")},
        "identity_providers": providers
        or {
            "test": {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "jwks_file": jwks_path,
                "algorithms": ["ES256"],
            }
        },
        "connections": connections,
    }
    if gateway:
        document["gateway"].update(gateway)
    return document


class GatewayHarness:
    """
    A real gateway in the test's reactor.

    @ivar port: the port of the connection named C{"payments"}.
    @ivar store_path: the folder of its evidence store.
    """

    def __init__(self, test, connections=None, **connection_settings):
        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        if connections is None:
            connections = {"payments": postgres_connection(self.port, **connection_settings)}
        self.start(test, configuration_document(self.directory, connections))

    def start(self, test, document):
        """
        Write C{document} as the configuration file, open its store and
        start the gateway; it stops when the test ends.
        """
        self.document = document
        self.config_path = os.path.join(self.directory, "hoopgw.yaml")
        with open(self.config_path, "w") as handle:
            yaml.safe_dump(self.document, handle)
        self.config = configuration.load(self.config_path)
        self.store_path = self.config.gateway.store.path
        self.store = open_store(self.config.gateway.store, reactor)
        try:
            self.gateway = Gateway(self.config, reactor, self.store)
        except Exception:
            # As twistd's start does (hoopgw.tap): the store closes.
            self.store.close()
            raise
        self.gateway.startService()
        test.addCleanup(self.stop)

    def stop(self):
        if self.gateway.running:
            return self.gateway.stopService()
        return None

    @defer.inlineCallbacks
    def wait_for(self, kind, count=1, timeout=10):
        """
        Wait until the store holds C{count} events of type C{kind} (the end
        of a session is recorded after the client has gone).
        """
        from twisted.internet import task

        for _ in range(int(timeout / 0.05)):
            found = self.events(kind)
            if len(found) >= count:
                return found
            yield task.deferLater(reactor, 0.05, lambda: None)
        raise AssertionError("no %d %s events after %s seconds: %r" % (count, kind, timeout, self.events()))

    def events(self, kind=None):
        """
        The events in the store, optionally only those of type C{kind}.
        """
        found = [event for _, _, _, event in read_events(self.store_path)]
        if kind is not None:
            found = [event for event in found if event.get("type") == kind]
        return found

    def raw_store(self):
        """
        Every byte of the store's segments, to search for leaks.
        """
        from hoopgw.store.file import RESERVE

        data = b""
        for name in sorted(os.listdir(self.store_path)):
            path = os.path.join(self.store_path, name)
            # The reserve is room kept free for the store, nothing written.
            if os.path.isfile(path) and name != RESERVE:
                with open(path, "rb") as handle:
                    data += handle.read()
        return data

    def dsn(self, user="ci-bot", sslmode="require", password=None, **extra):
        parts = {
            "host": "127.0.0.1",
            "port": self.port,
            "dbname": "payments",
            "user": user,
            "sslmode": sslmode,
            "connect_timeout": 10,
        }
        if password is not None:
            parts["password"] = password
        parts.update(extra)
        return " ".join("%s=%s" % (key, _quote(value)) for key, value in parts.items())


def _quote(value):
    value = str(value)
    if not value or any(character in value for character in " '\\"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return value


def psql(dsn, *arguments, password=None, stdin=None):
    """
    Run the real psql.  @return: a Deferred firing with C{(stdout, stderr,
    exit code)} as text.
    """
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGCONNECT_TIMEOUT": "10"}
    if password is not None:
        environment["PGPASSWORD"] = password
    args = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn] + list(arguments)
    if stdin is not None:
        d = _run_with_stdin(PSQL, args, environment, stdin)
    else:
        d = getProcessOutputAndValue(PSQL, args, env=environment)
    return d.addCallback(lambda result: (result[0].decode(), result[1].decode(), result[2]))


def _run_with_stdin(executable, args, environment, data):
    from twisted.internet import protocol

    done = defer.Deferred()

    class Collect(protocol.ProcessProtocol):
        def __init__(self):
            self.out, self.err = [], []

        def connectionMade(self):
            self.transport.write(data)
            self.transport.closeStdin()

        def outReceived(self, chunk):
            self.out.append(chunk)

        def errReceived(self, chunk):
            self.err.append(chunk)

        def processEnded(self, reason):
            done.callback((b"".join(self.out), b"".join(self.err), reason.value.exitCode))

    reactor.spawnProcess(Collect(), executable, [executable] + args, env=environment)
    return done


def in_thread(function, *args, **kwargs):
    """
    Run a blocking client (psycopg2) off the reactor thread, where the
    gateway under test runs.
    """
    return threads.deferToThread(function, *args, **kwargs)


def as_json(event):
    return json.dumps(event, sort_keys=True)


PEOPLE_ISSUER = "https://people.test"


def people_issuer():
    """
    A second demo issuer, for people (approvers): C{(private key PEM, JWKS
    path)}.
    """
    if "people" not in _shared:
        key_path, jwks_path = dev.generate_key(os.path.join(workspace(), "people"), kid="people-1", stem="people")
        with open(key_path, "rb") as handle:
            _shared["people"] = (handle.read(), jwks_path)
    return _shared["people"]


def human_token(subject="alice", groups=("dba",), **overrides):
    """
    A token for a person, from the people issuer.
    """
    pem, _ = people_issuer()
    arguments = dict(subject=subject, issuer=PEOPLE_ISSUER, audience=AUDIENCE, groups=groups, kid="people-1")
    arguments.update(overrides)
    return dev.mint(pem, **arguments)


def providers_with_people():
    """
    The test issuer for services, and the people issuer (kind: human).
    """
    _, jwks_path = issuer()
    _, people_jwks = people_issuer()
    return {
        "test": {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": jwks_path, "algorithms": ["ES256"]},
        "people": {
            "issuer": PEOPLE_ISSUER,
            "audience": AUDIENCE,
            "jwks_file": people_jwks,
            "algorithms": ["ES256"],
            "kind": "human",
        },
    }


class AdminGatewayHarness(GatewayHarness):
    """
    A real gateway in the test's reactor with its admin listener on
    (approvals API) and the people issuer besides the services' one.

    @ivar admin_url: where the admin API listens.
    """

    def __init__(self, test, connections=None, admin=None, **connection_settings):
        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        self.admin_port = free_port()
        self.admin_url = "http://127.0.0.1:%d" % (self.admin_port,)
        if connections is None:
            connections = {"payments": postgres_connection(self.port, **connection_settings)}
        settings = {"listen": "tcp:%d:interface=127.0.0.1" % (self.admin_port,)}
        settings.update(admin or {})
        self.start(
            test,
            configuration_document(self.directory, connections, providers=providers_with_people(), gateway={"admin": settings}),
        )
