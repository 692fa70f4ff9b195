"""
The PostgreSQL store set up as the README says for least privilege: one
role owns the schema (created with C{hoopgw store-init}), the gateways
connect as a role that may only read and append, and an auditor's role may
only read: the gateway runs on it, with its approvals index, and the
auditor verifies and reads the record with a DSN and C{PGPASSWORD}.
"""

import io
import os

import psycopg2
from twisted.internet import defer
from twisted.trial import unittest

from hoopgw import cli
from tests import evidence_support as es
from tests import support
from tests.support import in_thread, psql, token
from tests.test_postgres_store import GatewayProcess, audit_database, superuser
from tests.test_shared_approvals import approvals_document


def run_cli(*arguments):
    out = io.StringIO()
    status = cli.main(list(arguments), out=out)
    return status, out.getvalue()


class Roles:
    """
    Three fresh roles in the audit database: the schema's owner, the
    gateway's role and an auditor's.
    """

    def __init__(self):
        audit_database()
        suffix = os.urandom(3).hex()
        self.schema = "lp_" + suffix
        self.owner, self.gateway, self.auditor = ("lp_%s_%s" % (role, suffix) for role in ("owner", "gateway", "auditor"))
        self.passwords = {role: "pw-" + os.urandom(6).hex() for role in (self.owner, self.gateway, self.auditor)}
        for role, password in self.passwords.items():
            superuser("CREATE ROLE %s LOGIN PASSWORD %%s" % (role,), (password,))
        superuser("GRANT CREATE ON DATABASE audit TO %s" % (self.owner,))

    def dsn(self, role, **extra):
        cluster = support.cluster()
        parts = "host=127.0.0.1 port=%d dbname=audit user=%s sslmode=verify-full sslrootcert=%s" % (
            cluster.port, role, cluster.ca_path)
        return " ".join([parts] + ["%s=%s" % item for item in extra.items()])

    def connect(self, role):
        return psycopg2.connect(self.dsn(role), password=self.passwords[role])

    def store(self, directory):
        path = os.path.join(directory, "gateway.password")
        with open(path, "w") as handle:
            handle.write(self.passwords[self.gateway] + "\n")
        return {"backend": "postgres", "postgres": {"dsn": self.dsn(self.gateway), "password": {"file": path}, "schema": self.schema}}


def refused(connection, sql):
    """
    The SQLSTATE with which C{sql} is refused to C{connection}'s role.
    """
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql)
    except psycopg2.Error as error:
        return error.pgcode
    return None


class LeastPrivilegeTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_owner_gateway_and_auditor(self):
        """
        C{hoopgw store-init}, run as the owner, creates the schema and the
        grants; a gateway with the approvals broker starts on the gateway
        role (which cannot create the schema itself), records a session;
        the auditor's role verifies it with C{hoopgw verify DSN} (password
        from PGPASSWORD) and lists it with C{hoopgw events}; neither the
        gateway's role nor the auditor's can change or remove a line.
        """
        roles = yield in_thread(Roles)
        os.environ["PGPASSWORD"] = roles.passwords[roles.owner]
        self.addCleanup(os.environ.pop, "PGPASSWORD", None)
        status, out = yield in_thread(
            run_cli, "store-init", roles.dsn(roles.owner), "--schema", roles.schema,
            "--gateway-role", roles.gateway, "--auditor-role", roles.auditor,
        )
        self.assertEqual(status, 0, out)
        self.assertIn("is ready", out)
        # Run again (idempotent), as an owner upgrading would.
        status, out = yield in_thread(
            run_cli, "store-init", roles.dsn(roles.owner), "--schema", roles.schema, "--gateway-role", roles.gateway,
        )
        self.assertEqual(status, 0, out)

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        process = GatewayProcess(self, roles.store(directory), document=approvals_document)
        yield in_thread(process.wait_listening)
        out, err, code = yield psql(process.dsn(), "-c", "SELECT 41 + 1 AS answer", password=token())
        self.assertEqual(code, 0, err + process.output())
        self.assertIn("42", out)
        yield in_thread(process.stop)
        self.assertNotIn("Traceback", process.output())

        os.environ["PGPASSWORD"] = roles.passwords[roles.auditor]
        auditor_dsn = roles.dsn(roles.auditor, options="'-c search_path=%s'" % (roles.schema,))
        status, out = yield in_thread(run_cli, "verify", auditor_dsn, "--key", es.signing_key()[1])
        self.assertEqual(status, 0, out)
        self.assertIn("chain intact", out)
        status, out = yield in_thread(run_cli, "events", auditor_dsn)
        self.assertEqual(status, 0, out)
        self.assertIn("SELECT 41 + 1 AS answer", out)

        table = roles.schema + ".events"
        gateway = yield in_thread(roles.connect, roles.gateway)
        auditor = yield in_thread(roles.connect, roles.auditor)
        self.addCleanup(gateway.close)
        self.addCleanup(auditor.close)
        for connection, sql in (
            (gateway, "UPDATE %s SET line = line" % (table,)),
            (gateway, "DELETE FROM %s" % (table,)),
            (gateway, "DROP TABLE %s" % (table,)),
            (gateway, "TRUNCATE %s" % (table,)),
            (auditor, "INSERT INTO %s SELECT * FROM %s LIMIT 1" % (table, table)),
            (auditor, "UPDATE %s.approvals SET uses = uses" % (roles.schema,)),
        ):
            code = yield in_thread(refused, connection, sql)
            self.assertEqual(code, "42501", sql)

    @defer.inlineCallbacks
    def test_gateway_role_without_grants(self):
        """
        A gateway whose role may neither create the schema nor use one the
        owner made without grants stops at start with a message naming
        what it lacks and the command that sets it up.
        """
        roles = yield in_thread(Roles)
        yield in_thread(superuser, "CREATE SCHEMA %s AUTHORIZATION %s" % (roles.schema, roles.owner))
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        process = GatewayProcess(self, roles.store(directory))
        yield in_thread(process.process.wait, 60)
        output = process.output()
        self.assertNotEqual(process.process.returncode, 0)
        self.assertIn("hoopgw store-init", output)
        self.assertIn("missing: USAGE on the schema %s" % (roles.schema,), output)
