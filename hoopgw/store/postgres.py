"""
The shared evidence store: one append-only table in PostgreSQL that
several gateway processes write to, keeping ONE hash chain with signed
checkpoints, exactly as the file store does in a folder.

- Append-only: triggers refuse UPDATE, DELETE and TRUNCATE on the events,
  attachments and keys tables.  (A superuser can still disable a trigger:
  that is what the chain and the signatures are for.)
- One chain across processes: each batch of appends runs in a transaction
  that first takes a transaction-level advisory lock, reads the head, seals
  its events after it and inserts them; the next process's batch waits for
  the lock, so sequence numbers and links never fork.
- Write-ahead, group-committed: appends that arrive while a batch commits
  go together in the next one, and an append's Deferred fires only once its
  transaction has committed (synchronous_commit on; off with durability
  write-ahead: committed in the server, its WAL flushed moments later).
- Each running gateway holds a session-level advisory lock named after its
  instance, taken in the transaction that records its start: a gateway
  whose start has no stop and whose lock is free has crashed, which the
  next gateway to start records (gateway.recovered).
- Every commit sends NOTIFY on the events channel with the last seq, and
  L{PostgresStore.notify} / L{PostgresStore.listen} carry any other
  channel on the same connection: the approvals broker shares approvals
  between gateways this way.
- L{PostgresStore.append_checked} runs a caller's reads and appends inside
  the batch's transaction, under the chain's lock, so that what it checked
  cannot change before what it appends commits (the approvals broker
  decides each request exactly once across gateways with it).
- A lost connection is an outage, not the end: every append is refused
  while it lasts (so commands are refused: fail closed), the store
  reconnects with a growing delay, takes its gateway's lock again, listens
  again, and records C{store.reconnected} (when the outage began, why, how
  many events it refused, the sessions that ended unrecorded and those
  still open) before it takes events again.  An error the database gives
  on a live connection (a trigger refusing a write) still stops the store
  for good - except a full disk (SQLSTATE class 53), which is an outage
  too: the store resumes by itself once the database can write.
- With C{max_bytes}, the store measures the database's size
  (pg_database_size) every C{space_check_interval}; when the room left
  under the maximum falls below the low-water mark it refuses new
  sessions (C{store.low-space}, once) and admits them again when room
  returns (C{store.space-ok}).
"""

import functools
import hashlib
import json
import re
import time

import attr
import psycopg2
import psycopg2.errors
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hoopgw import logs
from hoopgw import options as o
from hoopgw.interfaces import IStore
from hoopgw.options import ConfigError
from hoopgw.store import events as chaining
from hoopgw.store import space
from hoopgw.store.checkpoints import (
    GATEWAY_START,
    GATEWAY_STOP,
    STORE_RECONNECTED,
    ChainState,
    CheckpointSchedule,
)
from hoopgw.store.commit import WRITE_AHEAD, WRITE_AHEAD_FSYNC
from hoopgw.store.errors import SourceError, StoreError

# The advisory lock namespace (pg_advisory_lock(int, int)'s first key):
# "hoop" in ASCII.  Object 0 serialises appends; other objects are gateways.
LOCK_CLASS = 0x686F6F70
APPEND_LOCK = 0
EVENTS_CHANNEL = "hoopgw_events"
# Reconnecting after an outage: the first retry, and the longest wait.
# The state of a store that has not reached its database yet.
CONNECTING = "connecting"

RETRY_FIRST = 0.5
RETRY_MOST = 10.0

_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _schema_name(value, path):
    value = o.string(value, path)
    if not _SCHEMA_NAME.match(value):
        raise ConfigError(path, "expected a lower-case SQL name (letters, digits, _), got %r" % (value,))
    return value


OPTIONS = (
    o.Option(
        "dsn",
        o.string,
        o.REQUIRED,
        "A libpq connection string for the audit database, without the password "
        "(host=db port=5432 dbname=audit user=hoopgw sslmode=verify-full sslrootcert=ca.crt).",
    ),
    o.Option("password", o.secret, None, "The password of the store's role: {file: PATH} or {env: VARIABLE}."),
    o.Option("schema", _schema_name, "hoopgw", "The schema holding the events, attachments and keys tables."),
    o.Option(
        "max_bytes",
        lambda value, path: space.size(value, path),
        None,
        "The most the audit database may hold (such as 50GiB): with it, new sessions are refused while the "
        "room left (max_bytes - pg_database_size) is below gateway.store.low_water; none when absent.",
    ),
)


@attr.s(frozen=True)
class PostgresStoreConfig:
    dsn = attr.ib()
    password = attr.ib(repr=False)
    schema = attr.ib()
    max_bytes = attr.ib(default=None)


def parse_options(raw, path):
    return PostgresStoreConfig(**o.parse_options(OPTIONS, raw, path))


def gateway_lock(instance):
    """
    The advisory lock object (a positive 31-bit integer) naming a gateway run.
    """
    return int(hashlib.sha256(instance.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def schema_sql(schema):
    """
    The DDL of the store, idempotent.  C{used_tokens} (JWT replay
    protection) and C{peering} (the key of cancel requests between
    replicas) are what replicas share besides the record (hoopgw.replicas):
    not evidence, so not append-only, and not for auditors.
    """
    return """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.events (
    seq bigint PRIMARY KEY,
    ts text NOT NULL,
    type text NOT NULL,
    session text,
    hash text NOT NULL UNIQUE,
    line text NOT NULL
);
CREATE INDEX IF NOT EXISTS events_type ON {s}.events (type, seq);
CREATE INDEX IF NOT EXISTS events_session ON {s}.events (session) WHERE session IS NOT NULL;
CREATE TABLE IF NOT EXISTS {s}.attachments (
    name text PRIMARY KEY,
    sha256 text NOT NULL,
    data bytea NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.keys (
    key_id text PRIMARY KEY,
    public_key text NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.used_tokens (
    token text PRIMARY KEY,
    expires double precision NOT NULL,
    gateway text
);
CREATE INDEX IF NOT EXISTS used_tokens_expires ON {s}.used_tokens (expires);
CREATE TABLE IF NOT EXISTS {s}.peering (
    id integer PRIMARY KEY CHECK (id = 1),
    key bytea NOT NULL
);
CREATE OR REPLACE FUNCTION {s}.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit table %.% is append-only: % is refused', TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'hoopgw evidence is never changed; archive it with hoopgw export';
END
$$;
CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON {s}.events
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change();
CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON {s}.events
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change();
CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON {s}.attachments
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change();
CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON {s}.attachments
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change();
CREATE OR REPLACE TRIGGER append_only BEFORE UPDATE OR DELETE ON {s}.keys
    FOR EACH ROW EXECUTE FUNCTION {s}.refuse_change();
CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON {s}.keys
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change();
""".format(s=schema)


def _connect_arguments(config):
    arguments = {"dsn": config.dsn}
    if "application_name" not in config.dsn:
        # What the database's operators see in pg_stat_activity: whose
        # connections these are, and to which store.
        arguments["application_name"] = ("hoopgw-store:%s" % (config.schema,))[:63]
    if config.password is not None:
        arguments["password"] = config.password.read_text()
    return arguments


def prepare_schema(config):
    """
    Create the store's tables if they are missing (blocking; at start-up).

    @raise StoreError: if the database cannot be reached or changed.
    """
    run_schema(
        config,
        schema_sql(config.schema),
        "the schema %s of the PostgreSQL store" % (config.schema,),
        "create it as its owner with 'hoopgw store-init' (it grants this role SELECT and INSERT)",
        GATEWAY_PRIVILEGES,
    )


# What the gateway's role needs on each table of a schema another role
# owns (the approvals index is updated as requests are decided), and what
# an auditor's role needs to verify and read the record.
GATEWAY_PRIVILEGES = {
    "events": "SELECT, INSERT",
    "attachments": "SELECT, INSERT",
    "keys": "SELECT, INSERT",
    "used_tokens": "SELECT, INSERT, UPDATE, DELETE",
    "peering": "SELECT, INSERT",
}
APPROVALS_PRIVILEGES = {"approvals": "SELECT, INSERT, UPDATE"}
AUDITOR_TABLES = ("events", "attachments", "keys", "approvals")


def least_privilege_sql(schema, gateway_role, auditor_roles=(), extra_ddl=()):
    """
    The DDL of the whole store for the role that owns it to run, and the
    grants that let C{gateway_role} write the record and C{auditor_roles}
    only read it.

    @param extra_ddl: the DDL of what the store's users keep in its schema
        (the approvals index), run after the store's own.
    """
    quoted = _identifier(gateway_role)
    grants = ["GRANT USAGE ON SCHEMA {s} TO %s;" % (quoted,)]
    for table, privileges in sorted({**GATEWAY_PRIVILEGES, **APPROVALS_PRIVILEGES}.items()):
        grants.append("GRANT %s ON {s}.%s TO %s;" % (privileges, table, quoted))
    for auditor in auditor_roles:
        quoted = _identifier(auditor)
        grants.append("GRANT USAGE ON SCHEMA {s} TO %s;" % (quoted,))
        grants.append("GRANT SELECT ON %s TO %s;" % (", ".join("{s}." + table for table in AUDITOR_TABLES), quoted))
    return schema_sql(schema) + "".join(extra_ddl) + "\n".join(grants).format(s=schema) + "\n"


def _identifier(name):
    if not name or not all(character.isalnum() or character in "_-" for character in name):
        raise ValueError("%r is not a role name this command quotes (letters, digits, _ and -)" % (name,))
    return '"%s"' % (name,)


def run_schema(config, sql, what, hint, privileges):
    """
    Run idempotent DDL in the store's database (blocking; at start-up),
    serialised with other gateways starting at the same time.  A role that
    may not run it (the schema belongs to another role, as in a
    least-privilege setup) goes on when every table is there and the role
    holds C{privileges} on it.

    @param privileges: table name -> the privileges the gateway needs.
    @raise StoreError: if the database cannot be reached or changed.
    """
    try:
        connection = psycopg2.connect(**_connect_arguments(config))
    except psycopg2.Error as error:
        raise StoreError("cannot connect to the PostgreSQL store (%s): %s" % (config.dsn, str(error).strip()))
    try:
        try:
            with connection, connection.cursor() as cursor:
                # Two gateways starting at once must not race on CREATE.
                cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, APPEND_LOCK))
                cursor.execute(sql)
        except psycopg2.errors.InsufficientPrivilege as error:
            missing = _missing_privileges(connection, config.schema, privileges)
            if missing:
                raise StoreError("cannot prepare %s: %s; %s (missing: %s)" % (what, str(error).strip(), hint, missing))
    except psycopg2.Error as error:
        raise StoreError("cannot prepare %s: %s; %s" % (what, str(error).strip(), hint))
    finally:
        connection.close()


def _missing_privileges(connection, schema, privileges):
    """
    What this role lacks of C{privileges} on the schema's tables, as a
    sentence; empty when it has them all.
    """
    missing = []
    with connection, connection.cursor() as cursor:
        cursor.execute("SELECT to_regnamespace(%s) IS NOT NULL", (schema,))
        if not cursor.fetchone()[0]:
            return "the schema %s does not exist" % (schema,)
        cursor.execute("SELECT has_schema_privilege(%s, 'USAGE')", (schema,))
        if not cursor.fetchone()[0]:
            return "USAGE on the schema %s" % (schema,)
        for table, wanted in sorted(privileges.items()):
            name = "%s.%s" % (schema, table)
            cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
            if not cursor.fetchone()[0]:
                missing.append("the table %s does not exist" % (name,))
                continue
            for privilege in wanted.split(", "):
                cursor.execute("SELECT has_table_privilege(%s, %s)", (name, privilege))
                if not cursor.fetchone()[0]:
                    missing.append("%s on %s" % (privilege, name))
    return "; ".join(missing)


@implementer(IStore)
class PostgresStore:
    """
    The evidence store in a PostgreSQL database, shared by gateway
    processes.
    """

    log = Logger()

    def __init__(self, config, reactor, low_water=256 * 1024 * 1024, low_water_percent=5.0, space_check_interval=5.0,
                 durability=WRITE_AHEAD_FSYNC):
        self.config = config
        # write-ahead: a batch's commit returns once PostgreSQL holds it,
        # before its WAL is flushed (synchronous_commit off; the server's
        # WAL writer flushes it within 3 x wal_writer_delay).
        self.durability = durability
        self._reactor = reactor
        self._table = config.schema + ".events"
        self._connection = None
        self._connecting = None
        self._waiters = []
        self._queue = []
        self._writing = False
        self._broken = None
        self._closed = False
        self._first_batch = True
        # Whether the store's database was ever reached: losing it after
        # that is an outage, retried; never reaching it is a failure.
        self._reached = False
        self.signer = None
        self._schedule = None
        self.unsigned = 0
        self.seq = 0
        self.head = chaining.GENESIS
        # What an outage needs to resume: this process's gateway (its lock),
        # its open sessions, the channels it listens on.
        self._gateway = None
        self._sessions = set()
        self._observers = []
        self.outage = None
        self._retry = None
        self._recovering = None
        self._witness = None
        self._publish = []
        self._guard = space.LowWater(low_water, low_water_percent, "postgres")
        self._space_interval = space_check_interval
        self._space_timer = None

    def state(self):
        """
        What monitoring and readiness checks read: C{"ok"}, C{"low-space"}
        (new sessions refused until the database has room again),
        C{"connecting"} (the database not reached yet since the gateway
        started: events wait for it) or C{"failed"} (unreachable, or failed
        for good: every command is refused).
        """
        if self._broken is not None or self.outage is not None or self._closed:
            return space.FAILED
        if not self._reached:
            return CONNECTING
        return space.LOW_SPACE if self._guard.low else space.OK

    def use_witness(self, witness):
        """
        Publish every signed checkpoint this process writes, once committed,
        to C{witness} (a L{hoopgw.store.witness.FileWitness}).
        """
        self._witness = witness

    def check_space(self):
        """
        Measure the database against C{max_bytes}; record a change of
        state (C{store.low-space}, C{store.space-ok}).

        @return: a L{Deferred}.
        """
        if self.config.max_bytes is None or self._closed or self.outage is not None or self._broken is not None:
            return defer.succeed(None)

        def measure(cursor):
            return cursor.execute("SELECT pg_database_size(current_database())").addCallback(
                lambda _: cursor.fetchone()[0])

        def measured(used):
            total = self.config.max_bytes
            change = self._guard.measured(max(total - used, 0), total, chaining.timestamp())
            if change is not None:
                change["database_bytes"] = used
                return self._enqueue(change)

        return self.read(measure).addCallback(measured).addErrback(
            lambda failure: self.log.warn("Measuring the store's size failed: {why}", why=failure.getErrorMessage()))

    def open(self):
        prepare_schema(self.config)

    def use_signer(self, signer, every_events=1000, every_seconds=60.0):
        self.signer = signer
        self._schedule = CheckpointSchedule(self, self._reactor, every_events, every_seconds)

    def start(self, instance=None):
        """
        Connect; the first batch records what it finds of crashed gateways.

        @param instance: the id of the gateway run starting: the recovery
            event names it, so the checkpoint signing the recovery does too.
        """
        self._recovering = instance
        if self._schedule is not None:
            self._schedule.start()
        if self.config.max_bytes is not None and self._space_interval and self._space_timer is None:
            self._space_timer = space.every(self._reactor, self._space_interval, self.check_space, now=False)
        return self._connect().addCallback(lambda _: self.check_space())

    def _connect(self):
        if self._connection is not None and self._connection.closed:
            self._lost("the connection to the store closed")
        if self.outage is not None and self._retry is not None:
            return defer.fail(self._unreachable())
        if self._connection is not None:
            return defer.succeed(self._connection)
        waiting = defer.Deferred()
        self._waiters.append(waiting)
        if self._connecting is None:
            connection = _connection_class()(reactor=self._reactor)
            connection.on_lost = self._connection_lost
            self._connecting = connection.connect(**_connect_arguments(self.config))

            def connected(_):
                if self._closed:
                    # Closed while this connection was being made.
                    connection.close()
                    raise StoreError("the store is closed")
                self._connection = connection
                self._reached = True
                # Each statement of a batch must see what the batch before it
                # committed (it reads the head, and checked work reads state,
                # only once it holds the lock): read committed, whatever the
                # database's default.
                return connection.runOperation(
                    "SET synchronous_commit = %s; SET default_transaction_isolation = 'read committed'"
                    % ("off" if self.durability == WRITE_AHEAD else "on",)
                ).addCallback(lambda _: connection)

            def failed(failure):
                self._connecting = None
                reason = "connecting to the PostgreSQL store failed: %s" % (failure.getErrorMessage().strip(),)
                if self._reached:
                    # It was there before (whether or not an event was
                    # written yet): an outage, retried.
                    self._lost(reason)
                else:
                    self._fail(reason)
                return failure

            def settle(result):
                waiters, self._waiters = self._waiters, []
                for waiting in waiters:
                    if isinstance(result, Failure):
                        waiting.errback(result)
                    else:
                        waiting.callback(result)

            self._connecting.addCallbacks(connected, failed).addBoth(settle)
        return waiting

    def _fail(self, reason):
        if self._broken is None:
            self._broken = reason
            logs.store_state("failed", "%s; every event is refused (fail closed)" % (reason,),
                             backend="postgres")

    # Outages.

    def _connection_lost(self, connection, reason):
        if connection is self._connection and not self._closed:
            self._lost(reason)

    def _unreachable(self):
        return StoreError(
            "the PostgreSQL store is unreachable (%s); nothing is let through until it is back"
            % (without_address(self.outage["reason"]),)
        )

    def _lost(self, reason):
        """
        The connection is gone: refuse appends from now on, and try again
        later.
        """
        connection, self._connection = self._connection, None
        self._connecting = None
        if connection is not None and not connection.closed:
            connection.close()
        if self.outage is None:
            logs.store_state("unreachable", "lost its PostgreSQL database: %s; every event is refused until it is back"
                             % (reason,), backend="postgres")
            self.outage = {"since": chaining.timestamp(), "began": time.monotonic(), "reason": reason, "refused": 0,
                           "ended": [], "delay": RETRY_FIRST}
        if self._retry is None and not self._closed:
            self._retry = self._reactor.callLater(self.outage["delay"], self._reconnect)
            self.outage["delay"] = min(self.outage["delay"] * 2, RETRY_MOST)

    def _refuse(self, item):
        """
        Count an event refused during an outage; a session's end is named
        in the C{store.reconnected} event, so the record knows it ended.
        """
        self.outage["refused"] += 1
        if isinstance(item, dict) and item.get("type") == "session.end" and item.get("session") in self._sessions:
            self.outage["ended"].append(item["session"])
            self._sessions.discard(item["session"])

    @defer.inlineCallbacks
    def _reconnect(self):
        self._retry = None
        if self._closed:
            return
        try:
            connection = yield self._connect()
            if self._gateway is not None:
                yield connection.runOperation("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, gateway_lock(self._gateway)))
            for channel, observer in self._observers:
                connection.addNotifyObserver(observer)
                yield connection.runOperation('LISTEN "%s"' % (channel,))
        except Exception as error:
            if self._closed:
                # Closed meanwhile: nothing to retry.
                return
            if self._connection is not None:
                self._lost("reconnecting failed: %s" % (str(error).strip() or type(error).__name__,))
            elif self._retry is None:
                self._lost(self.outage["reason"])
            return
        outage, self.outage = self.outage, None
        seconds = round(time.monotonic() - outage["began"], 3)
        logs.store_state("reconnected", "its PostgreSQL database is back after %s s; %d event(s) were refused meanwhile"
                         % (seconds, outage["refused"]), backend="postgres", seconds=seconds, refused=outage["refused"])
        event = {
            "type": STORE_RECONNECTED,
            "gateway": self._gateway,
            "since": outage["since"],
            "seconds": seconds,
            "reason": outage["reason"],
            "refused": outage["refused"],
            "sessions_ended": sorted(set(outage["ended"])),
            "sessions_open": sorted(self._sessions),
        }
        try:
            yield self._enqueue(event)
        except Exception:
            # Lost again before it was written: the next reconnection says it.
            pass

    def append(self, event, urgent=True):
        # Every batch is one transaction: urgent or not, events go with the next.
        screened = self._guard.screen(event, StoreError)
        if screened is not None:
            return screened
        return self._enqueue(event)

    def append_checked(self, work):
        """
        Run C{work(cursor, append)} inside the transaction that extends the
        chain, once the chain's lock is held: what it reads (with the
        txpostgres C{cursor}) cannot change until what it appends commits.
        C{append(event)} seals and inserts one event there and returns a
        L{Deferred} firing with it sealed; C{work} may also write tables of
        its own in the same transaction, and may return a L{Deferred}.

        Whatever C{work} raises undoes what it did (a savepoint) and fails
        the returned L{Deferred} with that error, without touching the other
        events committed with it.

        @return: a L{Deferred} firing with what C{work} returned, once it is
            committed.
        """
        return self._enqueue(_Checked(work))

    def _enqueue(self, item):
        if self._broken is not None:
            return defer.fail(
                StoreError("the store failed earlier and takes no more events: %s" % (without_address(self._broken),))
            )
        if self._closed:
            return defer.fail(StoreError("the store is closed"))
        if self.outage is not None:
            self._refuse(item)
            return defer.fail(self._unreachable())
        d = defer.Deferred()
        self._queue.append((d, item))
        if not self._writing:
            self._write()
        return d

    def read(self, work):
        """
        Run C{work(cursor)} in a transaction of its own, outside the chain's
        lock (it sees what is committed).

        @return: a L{Deferred} firing with what C{work} returned.
        """
        if self._closed:
            return defer.fail(StoreError("the store is closed"))

        def failed(failure):
            if failure.check(StoreError) or not _connection_gone(failure.value, self._connection):
                return failure
            reason = "reading the PostgreSQL store failed: %s" % (_why(failure.value),)
            if self._reached and self.outage is None and (self._connection is None or self._connection.closed):
                # A database never reached is the connection's failure (failed
                # for good), not an outage.
                self._lost(reason)
            return Failure(StoreError("the PostgreSQL store could not be read (%s)" % (without_address(reason),)))

        return self._connect().addCallback(lambda connection: connection.runInteraction(work)).addErrback(failed)

    def unsigned_events(self):
        return self.unsigned

    def checkpoint(self, reason):
        return self.append({"type": chaining.CHECKPOINT, "reason": reason})

    @defer.inlineCallbacks
    def _write(self):
        self._writing = True
        try:
            while self._queue and self._broken is None:
                batch, self._queue = self._queue, []
                try:
                    connection = yield self._connect()
                    results = yield connection.runInteraction(self._append_batch, [item for _, item in batch])
                except Exception as error:
                    reason = "writing to the PostgreSQL store failed: %s" % (_why(error),)
                    if self.outage is not None or _connection_gone(error, self._connection) or _no_room(error):
                        self._lost(reason)
                        failed = self._unreachable()
                        for _, item in batch + self._queue:
                            self._refuse(item)
                    else:
                        self._fail(reason)
                        failed = StoreError(without_address(self._broken))
                    for d, _ in batch + self._queue:
                        d.errback(failed)
                    self._queue = []
                    return
                published, self._publish = self._publish, []
                if self._witness is not None:
                    for checkpoint in published:
                        self._witness.publish(checkpoint)
                for (d, _), result in zip(batch, results):
                    if isinstance(result, Failure):
                        d.errback(result)
                    else:
                        d.callback(result)
                if self._schedule is not None:
                    self._schedule.appended(self.unsigned)
        finally:
            self._writing = False

    @defer.inlineCallbacks
    def _append_batch(self, cursor, batch):
        """
        In one transaction: lock the chain, read its head, seal and insert
        the batch (running checked work where it stands in it), tell
        listeners.  The first batch of this process first records gateways
        found crashed.

        @return: for each item of C{batch}, the sealed event, what its work
            returned, or the L{Failure} its work raised.
        """
        yield cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, APPEND_LOCK))
        yield cursor.execute("SELECT seq, hash FROM {t} ORDER BY seq DESC LIMIT 1".format(t=self._table))
        row = cursor.fetchone()
        chain = _Head(*(row if row else (0, chaining.GENESIS)), unsigned=self.unsigned)
        if self._first_batch:
            recovered = yield self._recovery(cursor)
            if recovered is not None:
                yield self._insert(cursor, chain, recovered)
                if self.signer:
                    yield self._insert(cursor, chain, {"type": chaining.CHECKPOINT, "reason": "recovered"})
        results = []
        for item in batch:
            if not isinstance(item, _Checked):
                try:
                    results.append((yield self._insert(cursor, chain, item)))
                except chaining.UnserialisableEvent:
                    # Refused before anything was written: the rest of the batch goes on.
                    results.append(Failure())
                continue
            before = (chain.seq, chain.head, chain.unsigned)
            yield cursor.execute("SAVEPOINT hoopgw_checked")
            try:
                result = yield defer.maybeDeferred(item.work, cursor, lambda event: self._insert(cursor, chain, event))
            except Exception:
                results.append(Failure())
                yield cursor.execute("ROLLBACK TO SAVEPOINT hoopgw_checked")
                chain.seq, chain.head, chain.unsigned = before
            else:
                results.append(result)
                yield cursor.execute("RELEASE SAVEPOINT hoopgw_checked")
        yield cursor.execute("SELECT pg_notify(%s, %s)", (EVENTS_CHANNEL, str(chain.seq)))
        # Published to the witness once the transaction has committed.
        self._publish = list(chain.checkpoints)
        self._first_batch = False
        self.seq, self.head, self.unsigned = chain.seq, chain.head, chain.unsigned
        return results

    @defer.inlineCallbacks
    def _insert(self, cursor, chain, event):
        """
        Seal C{event} after C{chain}'s head and insert it; a gateway's start
        and stop take and free its lock.
        """
        if event.get("type") == chaining.CHECKPOINT:
            state = yield self._state(cursor)
            event.update(state.checkpoint_fields())
        line = chaining.seal(event, chain.seq + 1, chain.head, signer=self.signer)
        chain.seq, chain.head = event["seq"], event["hash"]
        if event.get("type") == chaining.CHECKPOINT and self.signer is not None:
            chain.checkpoints.append(event)
        yield cursor.execute(
            "INSERT INTO {t} (seq, ts, type, session, hash, line) VALUES (%s, %s, %s, %s, %s, %s)".format(t=self._table),
            (chain.seq, event["ts"], event["type"], event.get("session"), chain.head, line.decode("utf-8").rstrip("\n")),
        )
        kind = event["type"]
        if kind == "session.start":
            self._sessions.add(event.get("session"))
        elif kind in ("session.end", "session.refused"):
            self._sessions.discard(event.get("session"))
        if kind == GATEWAY_START and event.get("gateway"):
            self._gateway = event["gateway"]
            # Held for as long as this process's connection lives: a crash frees it.
            yield cursor.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, gateway_lock(event["gateway"])))
            declared = event.get("signing_key")
            if declared:
                yield cursor.execute(
                    "INSERT INTO {s}.keys (key_id, public_key) VALUES (%s, %s) ON CONFLICT (key_id) DO NOTHING".format(
                        s=self.config.schema),
                    (declared["key_id"], declared["public_key"]),
                )
        elif kind == GATEWAY_STOP and event.get("gateway"):
            yield cursor.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, gateway_lock(event["gateway"])))
        chain.unsigned = 0 if kind == chaining.CHECKPOINT else chain.unsigned + 1
        return event

    @defer.inlineCallbacks
    def _state(self, cursor):
        """
        The chain's summary so far (within the transaction): the last
        checkpoint and the events after it.
        """
        yield cursor.execute(
            "SELECT line FROM {t} WHERE seq >= coalesce((SELECT max(seq) FROM {t} WHERE type = %s), 1) ORDER BY seq".format(
                t=self._table),
            (chaining.CHECKPOINT,),
        )
        rows = cursor.fetchall()
        return ChainState.rebuild(json.loads(line) for (line,) in rows)

    @defer.inlineCallbacks
    def _recovery(self, cursor):
        """
        A gateway.recovered event for the gateways the chain says are running
        but whose lock nobody holds, or None.
        """
        state = yield self._state(cursor)
        if not state.running:
            return None
        yield cursor.execute(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND granted",
            (LOCK_CLASS,),
        )
        held = {int(objid) for (objid,) in cursor.fetchall()}
        crashed = sorted(gateway for gateway in state.running if gateway_lock(gateway) not in held)
        if not crashed:
            return None
        # The events after the last checkpoint: the crashed runs' among
        # them were never signed by their writer; the checkpoint written
        # with this event signs them.
        return state.recovered(
            crashed, self.signer is not None,
            "these gateways' runs ended without stopping (a crash or a kill); their connection to the store is gone",
            by=self._recovering,
        )

    def write_attachment(self, name, data):
        """
        Store a blob (an asciicast) in the attachments table, durably.
        """
        if "/" in name or name.startswith("."):
            return defer.fail(ValueError("attachment names are plain file names, not %r" % (name,)))
        digest = hashlib.sha256(data).hexdigest()

        def insert(connection):
            return connection.runOperation(
                "INSERT INTO {s}.attachments (name, sha256, data) VALUES (%s, %s, %s)".format(s=self.config.schema),
                (name, digest, psycopg2.Binary(data)),
            )

        return self._connect().addCallback(insert).addCallback(lambda _: digest)

    def notify(self, channel, payload):
        """
        Send C{payload} (text) to every process listening on C{channel}.
        """
        return self._connect().addCallback(
            lambda connection: connection.runOperation("SELECT pg_notify(%s, %s)", (channel, payload))
        )

    def listen(self, channel, callback):
        """
        Call C{callback(payload)} for every notification on C{channel}.

        @return: a Deferred firing once listening.
        """

        channel = channel.replace('"', "")

        def observer(notify):
            if notify.channel == channel:
                return callback(notify.payload)

        self._observers.append((channel, observer))

        def start(connection):
            connection.addNotifyObserver(observer)
            return connection.runOperation('LISTEN "%s"' % (channel,))

        return self._connect().addCallback(start)

    @defer.inlineCallbacks
    def close(self):
        """
        Sign what this process wrote since its last checkpoint, wait for the
        queue, and disconnect (which frees this process's gateway locks).
        """
        if self._schedule is not None:
            self._schedule.stop()
        if self._space_timer is not None and self._space_timer.running:
            self._space_timer.stop()
        if self.signer is not None and self.unsigned and self._broken is None:
            try:
                yield self.checkpoint("stop")
            except Exception:
                logs.failed(self.log, Failure(), "The closing checkpoint failed")
        while self._writing:
            yield _later(self._reactor)
        self._closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@functools.lru_cache(maxsize=None)
def _connection_class():
    """
    txpostgres's connection, telling its store when the server goes away
    while it is idle (listening), instead of raising into the reactor.
    """
    from twisted.internet import error as internet_error
    from txpostgres import txpostgres

    class Connection(txpostgres.Connection):
        on_lost = None

        def doRead(self):
            try:
                txpostgres.Connection.doRead(self)
            except psycopg2.Error as error:
                reason = "the connection to the store was lost: %s" % (str(error).strip(),)
                if self.on_lost is not None:
                    self.on_lost(self, reason)
                return internet_error.ConnectionLost(reason)

        def _runInteraction(self, interaction, *args, **kwargs):
            # txpostgres's own, less its log.err of a rollback that failed:
            # that happens whenever the connection is lost mid-transaction,
            # an outage the store reports in a sentence of its own, not a
            # traceback in the gateway's log.
            cursor = self.cursor()

            def commit(result):
                return cursor.execute("commit").addCallback(lambda _: result)

            def roll_back(failed):
                return defer.maybeDeferred(cursor.execute, "rollback").addCallbacks(
                    lambda _: failed, lambda _: Failure(txpostgres.RollbackFailed(self, failed)))

            d = cursor.execute("begin")
            d.addCallback(interaction, *args, **kwargs)
            return d.addCallback(commit).addErrback(roll_back)

    return Connection


def _why(error):
    """
    What went wrong, in the database's words: a failed rollback says what
    failed before it.
    """
    from txpostgres import txpostgres

    if isinstance(error, txpostgres.RollbackFailed):
        error = error.originalFailure.value
    return str(error).strip() or type(error).__name__


def _no_room(error):
    """
    Whether the database refused a write for want of room (SQLSTATE class
    53: disk full, out of memory): it may take it once room is made.
    """
    return str(getattr(error, "pgcode", None) or "").startswith("53")


def _connection_gone(error, connection):
    """
    Whether C{error} means the connection to the store is gone (the
    server went away, the network failed), not that the database refused
    what was written on a live one.
    """
    from txpostgres import txpostgres

    if connection is None or connection.closed:
        return True
    return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError, txpostgres.RollbackFailed))


@attr.s
class _Head:
    """
    The chain's head as a transaction extends it.
    """

    seq = attr.ib()
    head = attr.ib()
    unsigned = attr.ib()
    # The signed checkpoints this transaction wrote, for the witness.
    checkpoints = attr.ib(factory=list)


@attr.s(frozen=True)
class _Checked:
    """
    Work to run under the chain's lock (L{PostgresStore.append_checked}).
    """

    work = attr.ib()


def _later(reactor, delay=0.01):
    from twisted.internet import task

    return task.deferLater(reactor, delay, lambda: None)


class _Running:
    """
    The gateways holding their lock now, asked by id.
    """

    def __init__(self, objids):
        self._objids = objids

    def __contains__(self, instance):
        return isinstance(instance, str) and gateway_lock(instance) in self._objids

    def __bool__(self):
        return bool(self._objids)


class PostgresSource:
    """
    A PostgreSQL store read for verify, the CLI and the replay server
    (blocking psycopg2; run it off the reactor thread).
    """

    kind = "store"
    anchor = None

    def __init__(self, dsn, schema=None, password=None):
        self.dsn = dsn
        self.name = _without_password(dsn)
        self.schema = schema
        try:
            self._connection = psycopg2.connect(dsn, password=password) if password else psycopg2.connect(dsn)
        except psycopg2.Error as error:
            raise SourceError("cannot connect to the PostgreSQL store %s: %s" % (self.name, str(error).strip()))
        self._connection.set_session(readonly=True, autocommit=True)
        if self.schema is None:
            # The store's schema: the first of the search path (options='-c
            # search_path=...') holding an events table, else hoopgw.
            with self._connection.cursor() as cursor:
                cursor.execute(
                    "SELECT s FROM unnest(current_schemas(false)) AS s "
                    "WHERE to_regclass(quote_ident(s) || '.events') IS NOT NULL LIMIT 1"
                )
                row = cursor.fetchone()
            self.schema = row[0] if row else "hoopgw"

    def entries(self, page=5000):
        last = None
        while True:
            with self._connection.cursor() as cursor:
                cursor.execute(
                    "SELECT seq, line FROM {s}.events WHERE %s IS NULL OR seq > %s ORDER BY seq LIMIT %s".format(
                        s=self.schema),
                    (last, last, page),
                )
                rows = cursor.fetchall()
            for seq, line in rows:
                raw = line.encode("utf-8") + b"\n"
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                yield "row seq %d" % (seq,), raw, event
            if len(rows) < page:
                return
            last = rows[-1][0]

    def attachment(self, name):
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT data FROM {s}.attachments WHERE name = %s".format(s=self.schema), (name,))
            row = cursor.fetchone()
        return bytes(row[0]) if row else None

    def published_keys(self):
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT key_id, public_key FROM {s}.keys".format(s=self.schema))
            return dict(cursor.fetchall())

    def live(self):
        return False

    def running_gateways(self):
        with self._connection.cursor() as cursor:
            cursor.execute(
                "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND granted AND objid <> %s",
                (LOCK_CLASS, APPEND_LOCK),
            )
            return _Running({int(objid) for (objid,) in cursor.fetchall()})

    def views(self):
        return None

    def fingerprint(self):
        with self._connection.cursor() as cursor:
            cursor.execute("SELECT max(seq) FROM {s}.events".format(s=self.schema))
            return cursor.fetchone()[0]

    def close(self):
        self._connection.close()


def _without_password(dsn):
    return re.sub(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", dsn)


# Where the audit database is (libpq quotes host names, addresses and
# socket paths, and names the port) is no business of a client that is
# refused because the store failed: the gateway's log keeps the details.
_QUOTED = re.compile(r'"[^"]*"(\s*\([^)]*\))?')
_PORT = re.compile(r",?\s*(?:on\s+)?port\s+\d+")
_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")


def without_address(text):
    """
    A store failure's reason as a client may read it: host names,
    addresses, socket paths and ports left out.
    """
    text = _QUOTED.sub("[withheld]", text)
    text = _ADDRESS.sub("[withheld]", text)
    return _PORT.sub("", text)
