"""
The approvals broker of gateways that share a PostgreSQL store: a
statement waiting on one gateway is approved, denied or covered by a grant
through any of them, and decided exactly once.

- The chain is the record of truth.  Requests, votes, outcomes, grants,
  revocations and uses are the same chain events the single broker
  records; the table C{approvals} beside the events is only their index:
  one row per request or grant naming the seq of the events that opened,
  voted on and closed it.  A row is written in the transaction that
  appends the event it points to, a trigger lets it change only by
  recording what comes next (a closed row never changes again), and every
  request or grant a broker acts on is rebuilt from the chain's events
  themselves.
- Every decision is taken under the chain's lock
  (L{PostgresStore.append_checked}): the broker reads the request from the
  store, checks the vote exactly as the single broker does, and appends the
  vote and the outcome in the same transaction, so two gateways can never
  both decide one request, nor a late vote beat the timeout.
- The gateway holding the statement learns of a decision by LISTEN/NOTIFY,
  sent in the deciding transaction (so only once it is committed).  A
  notification is only a wake-up call: the waiting gateway reads the
  outcome event from the chain and checks that it is bound to its
  statement before it releases anything.  A slow sweep is the safety net:
  it settles this gateway's requests whose wake-up was lost, ends requests
  whose gateway is gone (its lock in the store is free: a crash or a kill)
  and those long past their timeout.
"""

import hashlib
import json

from twisted.internet import defer, task
from twisted.logger import Logger

from hoopgw.approvals import model
from hoopgw.approvals.broker import FINISHED_KEPT, Broker
from hoopgw.approvals.model import ApprovalError, ApprovalRule, Grant, Request
from hoopgw.model import SERVICE, Decision, Identity
from hoopgw.store.errors import StoreError
from hoopgw.store.postgres import APPROVALS_PRIVILEGES, LOCK_CLASS, gateway_lock, run_schema

# How often a gateway looks for what a lost wake-up or a dead gateway left
# pending; and how long after its timeout another gateway's request is
# ended by whoever sees it (its own gateway normally ends it on time).
RECONCILE_INTERVAL = 30.0
GRACE = 5.0

OUTCOMES = ("approval.approved", "approval.denied", "approval.expired", "approval.cancelled", "approval.failed")


def schema_sql(schema):
    """
    The DDL of the approvals index, idempotent.
    """
    return """
CREATE TABLE IF NOT EXISTS {s}.approvals (
    id text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('request', 'grant')),
    status text NOT NULL,
    connection text NOT NULL,
    rule text NOT NULL,
    subject text NOT NULL,
    gateway text,
    expires double precision NOT NULL,
    opened bigint NOT NULL UNIQUE REFERENCES {s}.events (seq),
    votes bigint[] NOT NULL DEFAULT '{{}}',
    closed bigint UNIQUE REFERENCES {s}.events (seq),
    uses integer NOT NULL DEFAULT 0,
    CHECK ((closed IS NULL) = (status IN ('pending', 'active')))
);
CREATE INDEX IF NOT EXISTS approvals_open ON {s}.approvals (kind, expires) WHERE closed IS NULL;
CREATE INDEX IF NOT EXISTS approvals_grants ON {s}.approvals (connection, rule, subject) WHERE kind = 'grant' AND closed IS NULL;
CREATE INDEX IF NOT EXISTS approvals_recent ON {s}.approvals (kind, status, opened);
CREATE OR REPLACE FUNCTION {s}.approvals_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' OR OLD.closed IS NOT NULL
       OR (NEW.id, NEW.kind, NEW.connection, NEW.rule, NEW.subject, NEW.gateway, NEW.expires, NEW.opened)
          IS DISTINCT FROM (OLD.id, OLD.kind, OLD.connection, OLD.rule, OLD.subject, OLD.gateway, OLD.expires, OLD.opened)
       OR NEW.votes[1:cardinality(OLD.votes)] IS DISTINCT FROM OLD.votes
       OR NEW.uses < OLD.uses THEN
        RAISE EXCEPTION 'the approvals index %.% only follows the chain: % of %''s row % is refused',
            TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP, OLD.kind, OLD.id
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'a decided request or an ended grant never changes; its events are in the chain';
    END IF;
    RETURN NEW;
END
$$;
CREATE OR REPLACE TRIGGER follows_chain BEFORE UPDATE OR DELETE ON {s}.approvals
    FOR EACH ROW EXECUTE FUNCTION {s}.approvals_guard();
CREATE OR REPLACE TRIGGER append_only_truncate BEFORE TRUNCATE ON {s}.approvals
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.refuse_change();
""".format(s=schema)


def channel(schema):
    """
    The NOTIFY channel of one store's approvals (stores in other schemas of
    the same database have their own).
    """
    name = "hoopgw_approvals_" + schema
    if len(name) > 63:
        name = "hoopgw_approvals_" + hashlib.sha256(schema.encode()).hexdigest()[:32]
    return name


def _key(event):
    if event.get("type", "").startswith("grant."):
        return (event.get("grant") or {}).get("id")
    return event.get("approval")


def _chained(lines, seq, kinds, expected):
    """
    The event at C{seq}, checked to be what the index says it is.

    @raise StoreError: if the index and the chain disagree (someone wrote
        the index by hand): the broker decides nothing on it.
    """
    event = lines.get(seq)
    if event is None or event.get("type") not in kinds or _key(event) != expected:
        raise StoreError(
            "the approvals index points at event %s for %s, which the chain does not hold as such; "
            "run hoopgw verify on the store and rebuild the index" % (seq, expected)
        )
    return event


def _request(row, lines):
    """
    A request as the chain tells it: its event, its votes, its outcome.
    """
    request_id, _, opened, votes, closed, _ = row
    event = _chained(lines, opened, ("approval.request",), request_id)
    requester = event.get("requester") or {"subject": event["subject"]}
    rule = ApprovalRule(
        name=event["rule"],
        approvers=event["approver_groups"],
        approvals=event["approvals_required"],
        timeout=event.get("timeout", event["expires"] - event.get("created", event["expires"])),
    )
    request = Request(
        id=request_id,
        connection=event["connection"],
        session=event.get("session"),
        command=event.get("command"),
        rule=rule,
        requester=Identity(
            subject=requester["subject"], issuer=requester.get("issuer", ""), kind=requester.get("kind", SERVICE)
        ),
        text=event.get("text", ""),
        parameters=tuple(event.get("parameters", ())),
        facts=event.get("facts") or {},
        digest=event["digest"],
        created=event.get("created"),
        expires=event["expires"],
        gateway=event.get("gateway"),
        noun=event.get("noun", "statement"),
    )
    for seq in votes:
        vote = _chained(lines, seq, ("approval.vote",), request_id)
        request.approvals.append(
            {
                "subject": vote["approver"]["subject"],
                "issuer": vote["approver"].get("issuer", ""),
                "verdict": vote["verdict"],
                "reason": vote["reason"],
                "at": vote.get("at"),
            }
        )
    if closed is not None:
        end = _chained(lines, closed, OUTCOMES, request_id)
        request.status = end["type"][len("approval.") :]
        request.outcome = end.get("outcome")
    return request


def _grant(row, lines):
    """
    A grant as the chain tells it, with its uses and its revocation.
    """
    grant_id, _, opened, _, closed, uses = row
    made = _chained(lines, opened, ("grant.create",), grant_id)["grant"]
    grant = Grant(
        id=grant_id,
        connection=made["connection"],
        rule=made["rule"],
        subject=made["subject"],
        granted_by=made["granted_by"],
        reason=made["reason"],
        created=made["created"],
        expires=made["expires"],
        uses=uses,
        approvers=tuple(made.get("approver_groups", ())),
    )
    if closed is not None:
        grant.revoked = _chained(lines, closed, ("grant.revoke",), grant_id)["grant"].get("revoked")
    return grant


def _decision(outcome):
    """
    A L{Decision} from its recorded JSON form.
    """
    return Decision(
        outcome.get("verdict", "deny"),
        rule=outcome.get("rule"),
        reason=outcome.get("reason", ""),
        addon=outcome.get("addon"),
        approval=outcome.get("approval"),
        sqlstate=outcome.get("sqlstate"),
        refusal=outcome.get("refusal") or ("forbidden" if outcome.get("verdict", "deny") == "deny" else None),
    )


class _Holding:
    """
    A statement being held: its request, once recorded, and whether its
    client gave up before that.
    """

    def __init__(self):
        self.request = None
        self.cancelled = False


class SharedBroker(Broker):
    """
    The approvals of every gateway sharing C{store} (a
    L{hoopgw.store.postgres.PostgresStore}).  Its reads answer with
    L{Deferred}s.
    """

    log = Logger()

    def __init__(self, reactor, store, record, reconcile_interval=RECONCILE_INTERVAL, **options):
        Broker.__init__(self, reactor, record, **options)
        self.store = store
        self.reconcile_interval = reconcile_interval
        self._schema = store.config.schema
        self._channel = channel(self._schema)
        self._waiting = {}
        self._loop = None
        self._closed = False
        run_schema(
            store.config,
            schema_sql(self._schema),
            "the approvals index %s.approvals of the PostgreSQL store" % (self._schema,),
            "create it as the schema's owner with 'hoopgw store-init' (it grants this role SELECT, INSERT and "
            "UPDATE on it)",
            APPROVALS_PRIVILEGES,
        )

    def start(self):
        """
        Listen for decisions, and sweep now and every so often.
        """
        self.store.listen(self._channel, self._notified).addErrback(
            lambda failure: self.log.failure("Listening for approvals on the shared store failed", failure)
        )
        self._loop = task.LoopingCall(self._reconcile)
        self._loop.clock = self.reactor
        self._loop.start(self.reconcile_interval, now=True)

    def close(self):
        self._closed = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        for request in self._waiting.values():
            request.stop_timer()
        Broker.close(self)

    # Reading the store.

    @defer.inlineCallbacks
    def _load(self, cursor, kind, where, parameters=(), newest=None):
        """
        The requests or grants matching C{where}, rebuilt from the chain;
        the C{newest} ones only when given, oldest first.
        """
        order = "opened DESC LIMIT %d" % (newest,) if newest else "opened"
        yield cursor.execute(
            "SELECT id, status, opened, votes, closed, uses FROM {s}.approvals WHERE kind = %s AND ({w}) ORDER BY {o}".format(
                s=self._schema, w=where, o=order
            ),
            (kind,) + tuple(parameters),
        )
        rows = cursor.fetchall()
        if newest:
            rows.reverse()
        seqs = sorted({seq for row in rows for seq in [row[2], row[4]] + list(row[3]) if seq is not None})
        lines = {}
        if seqs:
            yield cursor.execute("SELECT seq, line FROM {s}.events WHERE seq = ANY(%s)".format(s=self._schema), (seqs,))
            lines = {seq: json.loads(line) for seq, line in cursor.fetchall()}
        build = _request if kind == "request" else _grant
        return [build(row, lines) for row in rows]

    @defer.inlineCallbacks
    def _one(self, cursor, request_id):
        found = yield self._load(cursor, "request", "id = %s", (request_id,))
        if not found:
            raise model.no_request(request_id)
        return found[0]

    def get(self, request_id):
        return self.store.read(lambda cursor: self._one(cursor, request_id))

    def list(self, status="pending"):
        """
        The requests of every gateway sharing the store: those pending, or
        the latest ones (of one status).
        """
        if status == "pending":
            return self.store.read(lambda cursor: self._load(cursor, "request", "closed IS NULL"))
        if status:
            return self.store.read(lambda cursor: self._load(cursor, "request", "status = %s", (status,), FINISHED_KEPT))
        return self.store.read(lambda cursor: self._load(cursor, "request", "true", (), FINISHED_KEPT))

    def grants_list(self, include_inactive=False):
        if include_inactive:
            return self.store.read(lambda cursor: self._load(cursor, "grant", "true", (), FINISHED_KEPT))
        now = self.now()
        found = self.store.read(lambda cursor: self._load(cursor, "grant", "closed IS NULL AND expires > %s", (now,)))
        return found.addCallback(lambda grants: [grant for grant in grants if grant.active(now)])

    # Writing in the chain's transaction.

    @defer.inlineCallbacks
    def _update(self, cursor, sql, parameters):
        """
        Move one open row of the index on; anything else is a bug or a
        tampered index, and undoes the work.
        """
        yield cursor.execute(sql.format(s=self._schema), parameters)
        if cursor.rowcount != 1:
            raise StoreError("the approvals index has no open row %s to update; nothing was decided" % (parameters[-1],))

    def _wake(self, cursor, item_id, what):
        # Sent when the transaction commits, and only then.
        return cursor.execute("SELECT pg_notify(%s, %s)", (self._channel, json.dumps({"approval": item_id, "event": what})))

    @defer.inlineCallbacks
    def _close(self, cursor, append, request, status, decision):
        """
        Record C{request}'s outcome; the index says it is closed.
        """
        request.status = status
        request.outcome = decision.to_json()
        event = yield append(self.ledger.outcome(request))
        yield self._update(
            cursor,
            "UPDATE {s}.approvals SET status = %s, closed = %s WHERE closed IS NULL AND id = %s",
            (status, event["seq"], request.id),
        )
        yield self._wake(cursor, request.id, status)

    @defer.inlineCallbacks
    def _open(self, cursor, append, event, row):
        """
        Record a new request or grant (C{event}), and index it (C{row}: its
        id, kind, status, connection, rule, subject, gateway, expiry).
        """
        event = yield append(event)
        yield cursor.execute(
            "INSERT INTO {s}.approvals (id, kind, status, connection, rule, subject, gateway, expires, opened) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)".format(s=self._schema),
            tuple(row) + (event["seq"],),
        )

    # Requests.

    def decide(self, session, command, rule):
        """
        In one transaction under the chain's lock: use an active grant for
        C{command} (from any gateway), or record a request for approvers.
        """
        return self._hold(session, command, rule, grants=True)

    def submit(self, session, command, rule):
        return self._hold(session, command, rule, grants=False)

    def active_grant(self, connection, rule_name, identity):
        raise NotImplementedError("on a shared store a grant is checked and used under the chain's lock: call decide()")

    def use_grant(self, grant, session, command):
        raise NotImplementedError("on a shared store a grant is checked and used under the chain's lock: call decide()")

    def _hold(self, session, command, rule, grants):
        holding = _Holding()
        waiting = defer.Deferred(lambda _: self._gave_up(holding))

        @defer.inlineCallbacks
        def work(cursor, append):
            now = self.now()
            if grants:
                found = yield self._load(
                    cursor,
                    "grant",
                    "closed IS NULL AND connection = %s AND rule = %s AND subject = %s AND expires > %s",
                    (session.connection, rule.name, session.identity.subject, now),
                )
                grant = next((grant for grant in found if grant.active(now)), None)
                if grant is not None:
                    event = yield append(self.ledger.grant_use(grant, session, command))
                    yield self._update(
                        cursor, "UPDATE {s}.approvals SET uses = uses + 1 WHERE closed IS NULL AND id = %s", (grant.id,)
                    )
                    return model.grant_decision(grant, event["digest"])
            request = model.new_request(session, command, rule, now, self.instance)
            yield self._open(
                cursor,
                append,
                self.ledger.request(request),
                (request.id, "request", "pending", request.connection, rule.name, session.identity.subject,
                 self.instance, request.expires),
            )
            # Known as waiting before the commit, so that no wake-up can come first.
            request.deferred = waiting
            self._waiting[request.id] = request
            holding.request = request
            return request

        def held(result):
            if isinstance(result, Decision):
                if not waiting.called:
                    waiting.callback(result)
                return
            request = result
            if holding.cancelled or waiting.called:
                # The client went away while the request was being recorded.
                self._waiting.pop(request.id, None)
                self._end_if_pending(request.id, "cancelled", "the client gave up waiting")
                return
            request.timer = self.reactor.callLater(max(0.0, request.expires - self.now()), self._expire, request)
            self.notifier.waiting(session, request)

        def unrecorded(failure):
            self.log.failure("An approval request could not be recorded", failure)
            if holding.request is not None:
                self._waiting.pop(holding.request.id, None)
            if not waiting.called:
                waiting.callback(model.unrecorded(rule.name, failure))

        self.store.append_checked(work).addCallbacks(held, unrecorded)
        return waiting

    def _gave_up(self, holding):
        """
        The client went away: its request, once recorded, is cancelled.
        """
        request = holding.request
        if request is None:
            holding.cancelled = True
            return
        if self._waiting.pop(request.id, None) is not None:
            request.stop_timer()
            self._end_if_pending(request.id, "cancelled", "the client gave up waiting")

    def _expire(self, request):
        request.timer = None
        self._end_if_pending(request.id, "expired")

    def _end_if_pending(self, request_id, status, reason=None):
        """
        End a request (it timed out, its client gave up) unless a decision
        came first, in which case that decision applies.
        """

        @defer.inlineCallbacks
        def work(cursor, append):
            request = yield self._one(cursor, request_id)
            if request.status != "pending":
                return request, False
            decision = model.timed_out(request) if status == "expired" else model.gave_up(request, reason)
            yield self._close(cursor, append, request, status, decision)
            return request, True

        def ended(result):
            request, here = result
            if here:
                self.notifier.ended(request)
            self._apply(request)

        def failed(failure):
            self.log.failure("Ending approval request {id} failed", failure, id=request_id)
            self._fail_waiting(request_id, failure)

        return self.store.append_checked(work).addCallbacks(ended, failed)

    def _fail_waiting(self, request_id, failure):
        # Fail closed: the statement is refused when its fate cannot be recorded.
        request = self._waiting.pop(request_id, None)
        if request is None:
            return
        request.stop_timer()
        if not request.deferred.called:
            request.deferred.callback(model.unrecorded(request.rule.name, failure, "decided in the record"))

    def _apply(self, final):
        """
        Release or refuse the statement this gateway holds for C{final}, a
        request the chain says is decided.
        """
        request = self._waiting.get(final.id)
        if request is None or final.status == "pending":
            return
        del self._waiting[final.id]
        request.stop_timer()
        if request.deferred.called:
            return
        request.deferred.callback(self._bound_decision(request, final))

    def _bound_decision(self, request, final):
        """
        The decision recorded for C{final}, if it is bound to the statement
        held as C{request}; a refusal otherwise.
        """
        outcome = final.outcome or {}
        approval = outcome.get("approval") or {}
        if (
            final.digest != request.digest
            or final.connection != request.connection
            or (outcome.get("verdict") == "approved" and approval.get("digest") != request.digest)
        ):
            return Decision.deny(
                "the decision recorded for %s is not bound to this statement; it is refused" % (request.id,),
                rule="approve:%s:error" % (request.rule.name,),
            )
        return _decision(outcome) if outcome else model.gave_up(request, "the request ended without a decision")

    def _vote(self, request_id, approver, reason, digest, approve):
        action = "approve" if approve else "deny"
        late = []

        @defer.inlineCallbacks
        def work(cursor, append):
            request = yield self._one(cursor, request_id)
            if request.status == "pending" and self.now() >= request.expires:
                # The time ran out before this vote: the timeout denies, as it
                # does on the gateway holding the statement.
                yield self._close(cursor, append, request, "expired", model.timed_out(request))
                late.append(request)
                return request
            vote, settled = self._cast(request, approver, reason, digest, approve)
            vote = yield append(vote)
            yield self._update(
                cursor,
                "UPDATE {s}.approvals SET votes = array_append(votes, %s) WHERE closed IS NULL AND id = %s",
                (vote["seq"], request.id),
            )
            if settled is not None:
                yield self._close(cursor, append, request, *settled)
            else:
                yield self._wake(cursor, request.id, "vote")
            return request

        def voted(request):
            if request.status != "pending":
                self.notifier.ended(request)
                self._apply(request)
            if late:
                error = ApprovalError("request %s is expired; it can no longer be %sd" % (request.id, action), 409)
                return self.ledger.refused(error, approver, approval=request_id, action=action)
            return request

        def refused(failure):
            failure.trap(ApprovalError)
            if request_id in self._waiting:
                # Decided already, perhaps through another gateway whose
                # wake-up is still on its way: apply what the chain says.
                self._settle([request_id])
            return self.ledger.refused(failure.value, approver, approval=request_id, action=action)

        return self.store.append_checked(work).addCallbacks(voted, refused)

    # Wake-ups and the sweep.

    def _notified(self, payload):
        if self._closed:
            return
        try:
            request_id = json.loads(payload).get("approval")
        except (ValueError, AttributeError):
            return
        if request_id in self._waiting:
            self._settle([request_id])

    def _settle(self, request_ids):
        """
        Apply what the chain says of requests this gateway holds.
        """
        read = self.store.read(lambda cursor: self._load(cursor, "request", "id = ANY(%s)", (list(request_ids),)))
        read.addCallback(lambda requests: [self._apply(request) for request in requests])
        read.addErrback(lambda failure: self.log.failure("Reading approval decisions failed", failure))
        return read

    def _reconcile(self):
        if self._closed:
            return None
        if self._waiting:
            self._settle(list(self._waiting))
        swept = self.store.append_checked(self._sweep)
        swept.addCallback(lambda ended: [self.notifier.ended(request) for request in ended])
        swept.addErrback(lambda failure: self.log.failure("Sweeping the shared approvals failed", failure))
        return swept

    @defer.inlineCallbacks
    def _sweep(self, cursor, append):
        """
        End other gateways' requests that nobody will end: their gateway is
        gone (its lock is free), or they are long past their timeout.
        """
        found = yield self._load(cursor, "request", "closed IS NULL AND gateway IS DISTINCT FROM %s", (self.instance,))
        if not found:
            return []
        yield cursor.execute(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND granted", (LOCK_CLASS,)
        )
        running = {int(objid) for (objid,) in cursor.fetchall()}
        now = self.now()
        ended = []
        for request in found:
            if request.gateway is None or gateway_lock(request.gateway) not in running:
                reason = (
                    "the gateway %s holding this statement stopped without deciding it (a crash or a kill); "
                    "its client is gone" % (request.gateway,)
                )
                yield self._close(cursor, append, request, "cancelled", model.gave_up(request, reason))
            elif now >= request.expires + GRACE:
                yield self._close(cursor, append, request, "expired", model.timed_out(request))
            else:
                continue
            ended.append(request)
        return ended

    # Grants.

    def _keep(self, grant):
        @defer.inlineCallbacks
        def work(cursor, append):
            yield self._open(
                cursor,
                append,
                self.ledger.grant(grant),
                (grant.id, "grant", "active", grant.connection, grant.rule, grant.subject, None, grant.expires),
            )
            yield self._wake(cursor, grant.id, "grant.create")
            return grant

        return self.store.append_checked(work)

    def revoke(self, grant_id, approver, reason):
        @defer.inlineCallbacks
        def work(cursor, append):
            found = yield self._load(cursor, "grant", "id = %s", (grant_id,))
            if not found:
                raise model.no_grant(grant_id)
            grant = found[0]
            self.judge.revoke(grant, approver, reason)
            event = yield append(self.ledger.revoke(grant))
            yield self._update(
                cursor,
                "UPDATE {s}.approvals SET status = 'revoked', closed = %s WHERE closed IS NULL AND id = %s",
                (event["seq"], grant.id),
            )
            yield self._wake(cursor, grant.id, "grant.revoke")
            return grant

        def refused(failure):
            failure.trap(ApprovalError)
            return self.ledger.refused(failure.value, approver, action="revoke", grant=grant_id)

        return self.store.append_checked(work).addErrback(refused)

