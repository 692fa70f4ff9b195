"""
What gateway processes sharing a PostgreSQL store share besides the
record (docs/replicas.rst): the tokens already used (JWT replay
protection), and PostgreSQL cancel requests, routed to the process that
holds the session they name.

- Used tokens: a row per token in C{<schema>.used_tokens} (a digest of the
  issuer and the token id, never the token), inserted when a token opens a
  session; a second insert of a live row is a replay, whichever process
  made the first.  Expired rows are purged every L{PURGE_INTERVAL}.
- Cancels: a CancelRequest naming no session of the process it reached is
  broadcast on C{hoopgw_cancel_<schema>} as a keyed digest of its key
  (HMAC with the replicas' peering key, kept in C{<schema>.peering}, which
  only the gateway role reads); the process holding the session cancels it,
  records C{command.cancel} with C{via} naming the process the client
  reached, and answers; without an answer within L{CANCEL_WAIT} the
  process the client reached records the refusal, as for a key it does not
  know alone.  Messages carry a time, a nonce and a MAC, so that a role
  that may LISTEN or NOTIFY in the store's database can neither read a
  session's key, forge a cancel or an answer, nor replay one.
"""

import hashlib
import hmac
import json
import os
import time

from twisted.internet import defer, task
from twisted.logger import Logger

from hoopgw import logs
from hoopgw.identity.replay import ReplayCache

# How long a process that forwarded a cancel waits for the process holding
# the session to answer before it records the cancel as naming no session.
CANCEL_WAIT = 2.0
# Forwarded cancels a process sends per second at most (a burst of as many):
# past it, a cancel for a key it does not hold is refused at once, so that
# a flood of guessed keys does not become a flood of notifications.
CANCEL_RATE = 100.0
# A message older or newer than this (seconds, the hosts' clocks apart
# included) is dropped; nonces are remembered as long.
MESSAGE_WINDOW = 30.0
MAX_NONCES = 100000
# The largest message read from the channel (NOTIFY allows 8000 bytes).
MAX_MESSAGE = 2048
# How often each process deletes expired rows of used_tokens.
PURGE_INTERVAL = 60.0


def cancel_channel(schema):
    name = "hoopgw_cancel_" + schema
    if len(name) > 63:
        name = "hoopgw_cancel_" + hashlib.sha256(schema.encode()).hexdigest()[:32]
    return name


def peering_key(config):
    """
    The replicas' shared key, made by the first process to need it
    (blocking; at start-up).
    """
    import psycopg2

    from hoopgw.store.errors import StoreError
    from hoopgw.store.postgres import _connect_arguments

    try:
        connection = psycopg2.connect(**_connect_arguments(config))
    except psycopg2.Error as error:
        raise StoreError("cannot connect to the PostgreSQL store (%s): %s" % (config.dsn, str(error).strip()))
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO {s}.peering (id, key) VALUES (1, %s) ON CONFLICT (id) DO NOTHING".format(s=config.schema),
                (psycopg2.Binary(os.urandom(32)),),
            )
            cursor.execute("SELECT key FROM {s}.peering WHERE id = 1".format(s=config.schema))
            return bytes(cursor.fetchone()[0])
    except psycopg2.Error as error:
        raise StoreError(
            "cannot read the replicas' key in %s.peering: %s; run 'hoopgw store-init' again as the schema's owner"
            % (config.schema, str(error).strip())
        )
    finally:
        connection.close()


class SharedReplayCache:
    """
    Replay protection across every process sharing the store: the local
    L{ReplayCache} first (a token this process saw is refused without a
    query), then the store's C{used_tokens}.  Answers with L{Deferred}s.
    """

    def __init__(self, store, clock, scope, gateway=None, local=None):
        self.store = store
        self.clock = clock
        self.scope = scope
        self.gateway = gateway
        self.local = local if local is not None else ReplayCache(clock)
        self._table = store.config.schema + ".used_tokens"

    def _digest(self, token_id):
        return hashlib.sha256(("%s\0%s" % (self.scope, token_id)).encode("utf-8")).hexdigest()

    def seen(self, token_id):
        if self.local.seen(token_id):
            return defer.succeed(True)
        token, now = self._digest(token_id), self.clock.seconds()

        def look(cursor):
            return cursor.execute(
                "SELECT 1 FROM {t} WHERE token = %s AND expires > %s".format(t=self._table), (token, now)
            ).addCallback(lambda _: cursor.fetchone() is not None)

        return self.store.read(look).addErrback(_unchecked)

    def use(self, token_id, expires):
        """
        The store decides (its unique key), so two logins with one token
        at once are told apart there too; this process remembers the token
        only once the store took it, so a login the store could not check
        (an outage) may be tried again.

        @return: a L{Deferred} firing with C{True} if the token is fresh on
            every replica, C{False} if any used it; failing with
            L{OverflowError} when the local cache is full.
        """
        if self.local.seen(token_id):
            return defer.succeed(False)
        if len(self.local) >= self.local._limit:
            # Refused before the store takes it, which would spend the token.
            return defer.fail(OverflowError("too many credentials in use at once"))
        token, now = self._digest(token_id), self.clock.seconds()

        def remember(fresh):
            if fresh:
                self.local.use(token_id, expires)
            return fresh

        def insert(cursor):
            # A row whose token expired is free again, as the local cache forgets it.
            return cursor.execute(
                "INSERT INTO {t} (token, expires, gateway) VALUES (%s, %s, %s) "
                "ON CONFLICT (token) DO UPDATE SET expires = EXCLUDED.expires, gateway = EXCLUDED.gateway "
                "WHERE {t}.expires <= %s RETURNING 1".format(t=self._table),
                (token, expires, self.gateway, now),
            ).addCallback(lambda _: cursor.fetchone() is not None)

        return self.store.read(insert).addErrback(_unchecked).addCallback(remember)


def _unchecked(failure):
    """
    Whatever kept the store from answering (an outage, a lost connection,
    a database error) is a L{StoreError}: the token is refused, not let in.
    """
    from hoopgw.store.errors import StoreError

    if failure.check(StoreError):
        return failure
    raise StoreError("the store did not answer: %s" % (failure.getErrorMessage().strip() or failure.type.__name__,))


def _mac(key, message):
    body = json.dumps({name: value for name, value in message.items() if name != "mac"}, sort_keys=True)
    return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()


class CancelPeers:
    """
    PostgreSQL cancel requests between the processes sharing a store.
    """

    log = Logger()

    def __init__(self, store, reactor, key, instance):
        self.store = store
        self.reactor = reactor
        self._key = key
        self.instance = instance
        self.channel = cancel_channel(store.config.schema)
        self._sessions = {}
        self._pending = {}
        self._nonces = {}
        self._tokens = CANCEL_RATE
        self._refilled = None

    def tag(self, connection, key):
        """
        The keyed digest naming a session's (process id, secret key) on
        the channel: the key itself never leaves the process.
        """
        text = "cancel\0%s\0%d\0%d" % (connection, key[0], key[1])
        return hmac.new(self._key, text.encode("utf-8"), hashlib.sha256).hexdigest()

    def register(self, connection, key, factory):
        self._sessions[self.tag(connection, key)] = (factory, key)

    def unregister(self, connection, key):
        self._sessions.pop(self.tag(connection, key), None)

    def start(self):
        return self.store.listen(self.channel, self._received).addErrback(
            lambda failure: logs.failed(self.log, failure, "Listening for other replicas' cancel requests failed")
        )

    def close(self):
        pending, self._pending = self._pending, {}
        for waiting, timer in pending.values():
            if timer.active():
                timer.cancel()
            waiting.callback(False)

    # Sending.

    def _allowed(self):
        now = self.reactor.seconds()
        if self._refilled is not None:
            self._tokens = min(CANCEL_RATE, self._tokens + (now - self._refilled) * CANCEL_RATE)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def forward(self, connection, key):
        """
        Ask the other processes to cancel the session of C{connection} with
        C{key}.

        @return: a L{Deferred} firing with whether one held it (C{False}
            after L{CANCEL_WAIT}, when the store cannot be reached, or past
            L{CANCEL_RATE}).
        """
        if not self._allowed():
            return defer.succeed(False)
        nonce = os.urandom(16).hex()
        message = {
            "v": 1,
            "kind": "cancel",
            "connection": connection,
            "tag": self.tag(connection, key),
            "at": time.time(),
            "nonce": nonce,
            "from": self.instance,
        }
        message["mac"] = _mac(self._key, message)
        waiting = defer.Deferred()
        timer = self.reactor.callLater(CANCEL_WAIT, self._settle, nonce, False)
        self._pending[nonce] = (waiting, timer)

        def unsent(failure):
            self.log.warn("A cancel request could not be forwarded to the other replicas: {why}", why=failure.getErrorMessage())
            self._settle(nonce, False)

        self.store.notify(self.channel, json.dumps(message)).addErrback(unsent)
        return waiting

    def _settle(self, nonce, held):
        entry = self._pending.pop(nonce, None)
        if entry is None:
            return
        waiting, timer = entry
        if timer.active():
            timer.cancel()
        waiting.callback(held)

    # Receiving.

    def _received(self, payload):
        message = self._checked(payload)
        if message is None or message["from"] == self.instance:
            return
        if message["kind"] == "held":
            if message.get("to") == self.instance:
                self._settle(message["nonce"], True)
            return
        held = self._sessions.get(message["tag"]) if isinstance(message.get("tag"), str) else None
        if held is None:
            return
        factory, key = held
        if factory.connection.name != message.get("connection"):
            return
        frontend = factory.active.get(key)
        if frontend is None:
            return
        frontend.cancel(via=message["from"])
        answer = {"v": 1, "kind": "held", "nonce": message["nonce"], "to": message["from"], "at": time.time(),
                  "from": self.instance}
        answer["mac"] = _mac(self._key, answer)
        self.store.notify(self.channel, json.dumps(answer)).addErrback(
            lambda failure: self.log.warn("Answering a forwarded cancel failed: {why}", why=failure.getErrorMessage())
        )

    def _checked(self, payload):
        """
        The message in C{payload} if it is well formed, recent, new and
        made with the peering key; None otherwise (dropped quietly: the
        channel is open to any role of the database).
        """
        if not isinstance(payload, str) or len(payload) > MAX_MESSAGE:
            return None
        try:
            message = json.loads(payload)
        except ValueError:
            return None
        if not isinstance(message, dict) or message.get("v") != 1 or message.get("kind") not in ("cancel", "held"):
            return None
        if not all(isinstance(message.get(name), str) for name in ("nonce", "from", "mac")):
            return None
        at = message.get("at")
        now = time.time()
        if not isinstance(at, (int, float)) or abs(now - at) > MESSAGE_WINDOW:
            return None
        if not hmac.compare_digest(_mac(self._key, message), message["mac"]):
            return None
        # Replayed messages are dropped: a nonce is remembered for as long
        # as its message is recent enough to be taken.
        for nonce in [nonce for nonce, seen in self._nonces.items() if now - seen > MESSAGE_WINDOW]:
            del self._nonces[nonce]
        identity = (message["kind"], message["nonce"])
        if identity in self._nonces or len(self._nonces) >= MAX_NONCES:
            return None
        self._nonces[identity] = now
        return message


class Replicas:
    """
    A gateway's part in what the processes sharing its PostgreSQL store
    share: built for a gateway whose store is PostgreSQL, None otherwise.
    """

    log = Logger()

    @classmethod
    def for_gateway(cls, gateway):
        from hoopgw.store.postgres import PostgresStore

        if not isinstance(gateway.store, PostgresStore):
            return None
        return cls(gateway)

    def __init__(self, gateway):
        self.store = gateway.store
        self.reactor = gateway.reactor
        self.instance = gateway.instance
        self.cancels = CancelPeers(self.store, self.reactor, peering_key(self.store.config), gateway.instance)
        for provider in gateway.identity_providers.values():
            local = getattr(provider, "replay", None)
            if isinstance(local, ReplayCache) and getattr(provider, "method", None) == "oidc":
                provider.replay = SharedReplayCache(
                    self.store, self.reactor, "oidc\0" + provider.config.issuer, gateway.instance, local
                )
        self._purge = None

    def start(self):
        self.cancels.start()
        self._purge = task.LoopingCall(self.purge)
        self._purge.clock = self.reactor
        self._purge.start(PURGE_INTERVAL, now=False)

    def purge(self):
        """
        Delete the used tokens that expired (any process may: they are the
        same rows for all).
        """
        now = self.reactor.seconds()
        table = self.store.config.schema + ".used_tokens"
        return self.store.read(lambda cursor: cursor.execute("DELETE FROM {t} WHERE expires <= %s".format(t=table), (now,))).addErrback(
            lambda failure: self.log.warn("Purging expired used tokens failed: {why}", why=failure.getErrorMessage())
        )

    def stop(self):
        if self._purge is not None and self._purge.running:
            self._purge.stop()
        self.cancels.close()
