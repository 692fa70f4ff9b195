"""
Tests for L{testbed.throwaway}: a real PostgreSQL cluster, started once for
the module, with TLS and the three password methods.
"""

import atexit
import os
import pwd
import stat

import psycopg2
from twisted.trial import unittest

from testbed import pki
from testbed.throwaway import (
    MD5_USER,
    TRUST_USER,
    PostgresCluster,
    ThrowawayError,
)


APP_USER = "app"
APP_PASSWORD = "app's secret"
MD5_PASSWORD = "md5 secret"


def _server_uid():
    """
    The uid the server's files should belong to: C{nobody} when the tests
    run as root, the current user otherwise.
    """
    if os.geteuid() == 0:
        return pwd.getpwnam("nobody").pw_uid
    return os.geteuid()


def _query(dsn, sql, *args):
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchall()
    finally:
        connection.close()


_shared = {}


def shared_cluster():
    """
    The cluster every L{PostgresClusterTests} test uses, started on first
    use with its roles and database, and stopped when the process exits
    (trial has no class or module fixtures).  A failure to start is
    remembered, so that it is reported once per test, fast.
    """
    if "error" in _shared:
        raise ThrowawayError(
            "the shared cluster did not start: %s" % (_shared["error"],))
    if "cluster" not in _shared:
        cluster = PostgresCluster()
        atexit.register(cluster.stop)
        try:
            cluster.start()
            cluster.create_role(APP_USER, APP_PASSWORD)
            cluster.create_role(MD5_USER, MD5_PASSWORD, method="md5")
            cluster.create_role(TRUST_USER, None, method=None)
            cluster.create_database("appdb", APP_USER)
        except Exception as e:
            _shared["error"] = e
            cluster.stop()
            raise
        _shared["cluster"] = cluster
    return _shared["cluster"]


class PostgresClusterTests(unittest.TestCase):
    """
    Tests for L{PostgresCluster}, against one cluster shared by the module.
    """

    def setUp(self):
        self.cluster = shared_cluster()

    def log(self):
        with open(self.cluster.log_path) as f:
            return f.read()

    def assertAuthenticated(self, user, method):
        """
        Assert the server log says C{user} got in with pg_hba C{method}.
        """
        self.assertIn(
            'connection authenticated: identity="%s" method=%s '
            % (user, method),
            self.log())

    def test_running(self):
        """
        After L{PostgresCluster.start} the server listens on 127.0.0.1 at
        the chosen port and the generated superuser password works.
        """
        self.assertTrue(self.cluster.running)
        self.assertEqual(self.cluster.host, "127.0.0.1")
        self.assertIsInstance(self.cluster.port, int)
        self.assertTrue(self.cluster.superuser_password)
        self.assertEqual(
            self.cluster.psql(
                "SELECT current_setting('port'), inet_server_addr()"),
            "%d|127.0.0.1\n" % (self.cluster.port,))

    def test_settings(self):
        """
        The cluster runs with the throwaway settings: no fsync, 100
        connections, its socket in the cluster folder, TLS on.
        """
        output = self.cluster.psql(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('fsync', 'max_connections', 'unix_socket_directories', "
            "'ssl', 'listen_addresses') ORDER BY name")
        self.assertEqual(
            output.splitlines(),
            ["fsync|off",
             "listen_addresses|127.0.0.1",
             "max_connections|100",
             "ssl|on",
             "unix_socket_directories|%s" % (self.cluster.directory,)])

    def test_verify_full_ip(self):
        """
        psycopg2 connects with C{sslmode=verify-full} to 127.0.0.1 trusting
        only the throwaway CA, over TLS, authenticating with SCRAM.
        """
        dsn = self.cluster.dsn(APP_USER, APP_PASSWORD, dbname="appdb")
        connection = psycopg2.connect(dsn)
        try:
            parameters = connection.get_dsn_parameters()
            self.assertEqual(parameters["sslmode"], "verify-full")
            self.assertEqual(parameters["sslrootcert"], self.cluster.ca_path)
            self.assertEqual(parameters["host"], "127.0.0.1")
            self.assertTrue(connection.info.ssl_in_use)
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT current_user, current_database(), ssl "
                    "FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                self.assertEqual(cursor.fetchone(), (APP_USER, "appdb", True))
        finally:
            connection.close()
        self.assertAuthenticated(APP_USER, "scram-sha-256")

    def test_verify_full_localhost(self):
        """
        The server certificate also names C{localhost}.
        """
        dsn = self.cluster.dsn(APP_USER, APP_PASSWORD, host="localhost")
        self.assertEqual(_query(dsn, "SELECT 1"), [(1,)])

    def test_verify_full_other_ca(self):
        """
        Trusting another CA, C{verify-full} refuses the server: the
        certificate really is checked.
        """
        other = self.mktemp()
        os.mkdir(other)
        other_ca, _ = pki.make_ca().write(other, "other")
        dsn = self.cluster.dsn(APP_USER, APP_PASSWORD, sslrootcert=other_ca)
        error = self.assertRaises(psycopg2.OperationalError,
                                  psycopg2.connect, dsn)
        self.assertIn("certificate verify failed", str(error))

    def test_scram_stored(self):
        """
        Ordinary roles get a SCRAM verifier, not an md5 hash.
        """
        self.assertEqual(
            self.cluster.psql(
                "SELECT left(rolpassword, 14) FROM pg_authid "
                "WHERE rolname = '%s'" % (APP_USER,)),
            "SCRAM-SHA-256$\n")

    def test_md5(self):
        """
        The md5 role's password is stored as an md5 hash, and it logs in
        through pg_hba's md5 method (a SCRAM-stored password would have
        been checked with SCRAM instead).
        """
        self.assertEqual(
            self.cluster.psql(
                "SELECT left(rolpassword, 3) FROM pg_authid "
                "WHERE rolname = '%s'" % (MD5_USER,)),
            "md5\n")
        dsn = self.cluster.dsn(MD5_USER, MD5_PASSWORD)
        self.assertEqual(_query(dsn, "SELECT current_user"), [(MD5_USER,)])
        self.assertAuthenticated(MD5_USER, "md5")

    def test_trust(self):
        """
        The trust role connects with no password at all.
        """
        dsn = self.cluster.dsn(TRUST_USER)
        self.assertNotIn("password", dsn)
        self.assertEqual(_query(dsn, "SELECT current_user"), [(TRUST_USER,)])

    def test_no_password_refused(self):
        """
        Any other role without a password is refused, which is what makes
        L{test_trust} mean something.
        """
        error = self.assertRaises(
            psycopg2.OperationalError,
            psycopg2.connect, self.cluster.dsn(APP_USER))
        self.assertIn("password", str(error))

    def test_wrong_password_scram(self):
        """
        A wrong password is refused for a SCRAM role.
        """
        error = self.assertRaises(
            psycopg2.OperationalError,
            psycopg2.connect, self.cluster.dsn(APP_USER, "wrong"))
        self.assertIn('password authentication failed for user "app"',
                      str(error))

    def test_wrong_password_md5(self):
        """
        A wrong password is refused for the md5 role.
        """
        error = self.assertRaises(
            psycopg2.OperationalError,
            psycopg2.connect, self.cluster.dsn(MD5_USER, "wrong"))
        self.assertIn('password authentication failed for user "md5_user"',
                      str(error))

    def test_hba_rules(self):
        """
        pg_hba.conf puts the md5 and trust exceptions before the SCRAM
        catch-all for TCP from 127.0.0.1.
        """
        rules = self.cluster.psql(
            "SELECT user_name, address, auth_method FROM pg_hba_file_rules "
            "WHERE type = 'host' ORDER BY line_number")
        self.assertEqual(
            rules.splitlines(),
            ["{md5_user}|127.0.0.1|md5",
             "{trust_user}|127.0.0.1|trust",
             "{all}|127.0.0.1|scram-sha-256"])

    def test_psql_error(self):
        """
        L{PostgresCluster.psql} raises L{ThrowawayError} carrying psql's
        standard error when the SQL fails.
        """
        error = self.assertRaises(
            ThrowawayError, self.cluster.psql, "SELECT * FROM no_such_table")
        self.assertIn('relation "no_such_table" does not exist', str(error))

    def test_psql_wrong_password(self):
        """
        L{PostgresCluster.psql} with a wrong password fails rather than
        prompting.
        """
        error = self.assertRaises(
            ThrowawayError, self.cluster.psql, "SELECT 1",
            user=APP_USER, password="wrong")
        self.assertIn("password authentication failed", str(error))

    def test_psql_as_role(self):
        """
        L{PostgresCluster.psql} runs as the given role on the given
        database.
        """
        self.assertEqual(
            self.cluster.psql(
                "SELECT current_user, current_database()",
                user=APP_USER, password=APP_PASSWORD, dbname="appdb"),
            "app|appdb\n")

    def test_database_owner(self):
        """
        L{PostgresCluster.create_database} makes the database with the given
        owner.
        """
        self.assertEqual(
            self.cluster.psql(
                "SELECT pg_get_userbyid(datdba) FROM pg_database "
                "WHERE datname = 'appdb'"),
            "app\n")

    def test_superuser_role(self):
        """
        C{superuser=True} makes a superuser; roles are not superusers
        otherwise.
        """
        name = "admin_" + os.urandom(4).hex()
        self.cluster.create_role(name, "admin secret", superuser=True)
        self.assertEqual(
            self.cluster.psql(
                "SELECT rolname, rolsuper FROM pg_roles "
                "WHERE rolname IN ('%s', 'app') ORDER BY rolname" % (name,)),
            "%s|t\napp|f\n" % (name,))

    def test_files(self):
        """
        The cluster's files belong to the account the server runs as
        (C{nobody} under root), and the TLS key is readable by it alone.
        """
        uid = _server_uid()
        self.assertEqual(os.stat(self.cluster.data_directory).st_uid, uid)
        key_path = os.path.join(self.cluster.directory, "server.key")
        info = os.stat(key_path)
        self.assertEqual(info.st_uid, uid)
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o600)
        self.assertTrue(os.path.exists(self.cluster.log_path))
        self.assertTrue(self.cluster.log_path.startswith(
            self.cluster.directory + os.sep))

    def test_server_not_root(self):
        """
        The server process does not run as root.  (The postmaster, not a
        backend: a backend exits with the psql session that asked for its pid.)
        """
        with open(os.path.join(self.cluster.data_directory, "postmaster.pid")) as handle:
            pid = int(handle.readline())
        self.assertEqual(os.stat("/proc/%d" % (pid,)).st_uid, _server_uid())
        self.assertNotEqual(_server_uid(), 0)


class LifecycleTests(unittest.TestCase):
    """
    Starting and stopping clusters.
    """

    def test_context_manager_without_tls(self):
        """
        As a context manager, a cluster without TLS starts, accepts plain
        connections, and on exit stops and removes its own folder.
        """
        with PostgresCluster(tls=False) as cluster:
            self.assertIsNone(cluster.ca_path)
            self.assertIn("sslmode='disable'", cluster.dsn())
            connection = psycopg2.connect(cluster.dsn())
            try:
                self.assertFalse(connection.info.ssl_in_use)
            finally:
                connection.close()
            directory = cluster.directory
            self.assertTrue(os.path.isdir(directory))
        self.assertFalse(cluster.running)
        self.assertFalse(os.path.exists(directory))
        cluster.stop()  # stopping twice is harmless

    def test_start_failure(self):
        """
        When the server will not start, L{PostgresCluster.start} raises an
        error quoting the server log, and removes the folder it made.
        """
        cluster = PostgresCluster(
            tls=False, settings={"no_such_parameter": "1"})
        error = self.assertRaises(ThrowawayError, cluster.start)
        self.assertIn(
            'unrecognized configuration parameter "no_such_parameter"',
            str(error))
        self.assertFalse(cluster.running)
        self.assertFalse(os.path.exists(cluster.directory))

    def test_missing_binaries(self):
        """
        A wrong C{bin_dir} is reported clearly.
        """
        cluster = PostgresCluster(bin_dir="/nonexistent/bin")
        error = self.assertRaises(ThrowawayError, cluster.start)
        self.assertIn("/nonexistent/bin/initdb", str(error))
