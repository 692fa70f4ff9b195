"""
The target's catalog, read with the gateway's own credentials on a
connection of its own: relations, their columns, view definitions,
functions outside pg_catalog and the search path, for the column lineage
(L{hoopgw.postgres.lineage}); and bounded samples of columns, for
C{hoopgw discover}.  Every read runs in a read-only transaction with a
statement timeout.
"""

import json
import struct

from twisted.internet import defer, endpoints

from hoopgw.postgres import upstream as upstream_module
from hoopgw.postgres import wire


# How long one catalog query may run at the target.
STATEMENT_TIMEOUT_MS = 10000
# The largest answer accepted (the whole catalog is one JSON value).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

CATALOG_SQL = """
SELECT json_build_object(
  'database', current_database(),
  'user', current_user,
  'search_path', current_schemas(false),
  'relations', (
    SELECT coalesce(json_agg(json_build_object(
      'schema', n.nspname, 'name', c.relname, 'kind', c.relkind,
      'definition', CASE WHEN c.relkind IN ('v', 'm') THEN pg_get_viewdef(c.oid) END,
      'parents', (
        SELECT coalesce(json_agg(json_build_array(pn.nspname, pc.relname)), '[]')
        FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = pc.relnamespace
        WHERE i.inhrelid = c.oid),
      'columns', (
        SELECT coalesce(json_agg(json_build_array(
          a.attname, format_type(a.atttypid, a.atttypmod),
          CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END) ORDER BY a.attnum), '[]')
        FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped))), '[]')
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'v', 'm', 'f', 'p')
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'),
  'functions', (
    SELECT coalesce(json_agg(json_build_object(
      'oid', p.oid, 'schema', n.nspname, 'name', p.proname, 'language', l.lanname, 'body', p.prosrc)), '[]')
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))
)::text
"""


class CatalogError(Exception):
    """
    The catalog could not be read; C{str()} says why, without secrets.
    """


class QueryClient:
    """
    Runs simple queries on a ready L{upstream_module.UpstreamProtocol} and
    collects their rows as text.
    """

    def __init__(self, upstream, max_bytes=MAX_MESSAGE_BYTES):
        self.upstream = upstream
        self.max_bytes = max_bytes
        upstream.receiver = self
        self._buffer = b""
        self._waiting = None
        self._rows = []
        self._received = 0
        self._error = None

    def run(self, sql):
        """
        @return: a L{Deferred} firing with the rows of every result, each a
            list of text values (or None), once the target is ready again.
        """
        self._waiting = defer.Deferred()
        self._rows = []
        self._received = 0
        self._error = None
        self.upstream.transport.write(wire.query(sql))
        return self._waiting

    def upstream_data(self, data):
        self._buffer += data
        while len(self._buffer) >= 5:
            kind = self._buffer[:1]
            length = wire.unpack_int32(self._buffer, 1)
            if length < 4 or length > self.max_bytes:
                self._fail(CatalogError("the target sent a malformed message"))
                return
            if len(self._buffer) < length + 1:
                return
            payload = self._buffer[5 : length + 1]
            self._buffer = self._buffer[length + 1 :]
            self._received += length
            if self._received > self.max_bytes:
                self._fail(CatalogError("the target's answer is larger than %d bytes" % (self.max_bytes,)))
                return
            try:
                self._message(kind, payload)
            except (struct.error, ValueError, IndexError):
                self._fail(CatalogError("the target sent a malformed message"))
                return

    def _message(self, kind, payload):
        if kind == b"D":
            (row,) = wire.decode_data_rows(b"D" + wire.int32(len(payload) + 4) + payload)
            self._rows.append([None if value is None else value.decode("utf-8", "replace") for value in row])
        elif kind == b"E":
            fields = wire.parse_fields(payload)
            self._error = CatalogError("the target refused: %s" % (fields.get("message", "unknown error"),))
        elif kind == b"Z":
            waiting, self._waiting = self._waiting, None
            if waiting is not None:
                if self._error is not None:
                    waiting.errback(self._error)
                else:
                    waiting.callback(self._rows)

    def _fail(self, error):
        waiting, self._waiting = self._waiting, None
        self.upstream.transport.loseConnection()
        if waiting is not None:
            waiting.errback(error)

    def upstream_lost(self, reason):
        self._fail(CatalogError("the target closed the catalog connection"))

    def close(self):
        self.upstream.transport.write(wire.terminate())
        self.upstream.transport.loseConnection()


def read_only(sql, timeout_ms=STATEMENT_TIMEOUT_MS):
    """
    C{sql} in a read-only transaction with a statement timeout.
    """
    return "BEGIN READ ONLY; SET LOCAL statement_timeout = %d; %s; COMMIT" % (int(timeout_ms), sql)


# How long reading the catalog may take, connecting included.
FETCH_TIMEOUT = 30.0


def fetch(reactor, target, timeout_ms=STATEMENT_TIMEOUT_MS, deadline=None):
    """
    Read the target's catalog on a session of its own, with the gateway's
    credentials; given up after C{deadline} seconds (L{FETCH_TIMEOUT}),
    the connection closed, whatever the target does.

    @return: a L{Deferred} firing with the catalog document (a dict, see
        L{hoopgw.postgres.lineage.Catalog.from_json}), or failing with
        L{CatalogError}.
    """
    deadline = FETCH_TIMEOUT if deadline is None else deadline
    parameters = {"user": target.user, "database": target.database, "application_name": "hoopgw:catalog"}
    try:
        endpoint = endpoints.HostnameEndpoint(reactor, target.host, target.port, timeout=target.connect_timeout)
    except Exception as error:
        return defer.fail(CatalogError(str(error)))
    upstream = upstream_module.UpstreamProtocol(target, target.password, parameters, MAX_MESSAGE_BYTES)
    state = {"expired": False}
    connecting = endpoints.connectProtocol(endpoint, upstream)

    def expire():
        state["expired"] = True
        if upstream.transport is not None:
            upstream.transport.abortConnection()
        else:
            connecting.cancel()

    timer = reactor.callLater(deadline, expire)

    def ready(_):
        return upstream.ready

    def query(_):
        client = QueryClient(upstream)
        return client.run(read_only(CATALOG_SQL, timeout_ms)).addBoth(lambda result: (client.close(), result)[1])

    def parsed(rows):
        if not rows or rows[0][0] is None:
            raise CatalogError("the target returned no catalog")
        try:
            return json.loads(rows[0][0])
        except ValueError:
            raise CatalogError("the target's catalog is not JSON")

    def failed(failure):
        if state["expired"]:
            raise CatalogError("the target did not answer within %g seconds" % (deadline,))
        if failure.check(CatalogError):
            return failure
        raise CatalogError(str(failure.value) or "the gateway cannot reach the target database")

    def done(result):
        if timer.active():
            timer.cancel()
        return result

    return connecting.addCallback(ready).addCallback(query).addCallback(parsed).addErrback(failed).addBoth(done)


def connect_blocking(target, purpose="catalog"):
    """
    A psycopg2 connection with the gateway's credentials, for the command
    line tools (C{hoopgw explain}, C{hoopgw discover}): read-only, with a
    statement timeout.
    """
    import psycopg2

    password = target.password.read_text() if target.password is not None else None
    parameters = {
        "host": target.host,
        "port": target.port,
        "dbname": target.database,
        "user": target.user,
        "sslmode": target.tls,
        "connect_timeout": max(1, int(target.connect_timeout)),
        "application_name": "hoopgw:%s" % (purpose,),
        "options": "-c statement_timeout=%d -c default_transaction_read_only=on" % (STATEMENT_TIMEOUT_MS,),
    }
    if password is not None:
        parameters["password"] = password
    if target.ca is not None and target.tls in ("verify-ca", "verify-full"):
        parameters["sslrootcert"] = target.ca
    try:
        connection = psycopg2.connect(**parameters)
    except psycopg2.Error as error:
        raise CatalogError("cannot connect to the target: %s" % (str(error).strip().splitlines()[0],))
    connection.set_session(readonly=True)
    return connection


def fetch_blocking(target):
    """
    The catalog document, read synchronously (see L{fetch}).
    """
    import psycopg2

    connection = connect_blocking(target)
    try:
        with connection.cursor() as cursor:
            cursor.execute(CATALOG_SQL)
            (text,) = cursor.fetchone()
        connection.rollback()
    except psycopg2.Error as error:
        raise CatalogError("the target refused the catalog query: %s" % (str(error).strip().splitlines()[0],))
    finally:
        connection.close()
    return json.loads(text)
