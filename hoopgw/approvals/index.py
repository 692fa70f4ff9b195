"""
The approvals index of a shared PostgreSQL store: the table beside the
events that names, per request or grant, the seq of the events that
opened, voted on and closed it.  Every request or grant is rebuilt from
those events themselves, checked to be what the index says; the index only
moves on in the transaction that appends the event it points to.
"""

import hashlib
import json

from twisted.internet import defer

from hoopgw.approvals import model
from hoopgw.approvals.model import ApprovalRule, Grant, Request
from hoopgw.model import SERVICE, Decision, Identity
from hoopgw.store.errors import StoreError
from hoopgw.store.postgres import APPROVALS_PRIVILEGES, LOCK_CLASS, run_schema

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


def recorded_decision(outcome):
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


class ApprovalsIndex:
    """
    The approvals index of C{store} (a
    L{hoopgw.store.postgres.PostgresStore}): reads rebuild requests and
    grants from the chain; writes go in the chain's transaction
    (L{PostgresStore.append_checked}'s C{cursor} and C{append}).

    @param ledger: the L{hoopgw.approvals.ledger.Ledger} outcomes are
        built by.
    """

    def __init__(self, store, ledger):
        self.store = store
        self.ledger = ledger
        self.schema = store.config.schema
        self.channel = channel(self.schema)

    def prepare(self):
        """
        Check that the index exists and this role may use it (creating it
        where the role owns the schema).
        """
        run_schema(
            self.store.config,
            schema_sql(self.schema),
            "the approvals index %s.approvals of the PostgreSQL store" % (self.schema,),
            "create it as the schema's owner with 'hoopgw store-init' (it grants this role SELECT, INSERT and "
            "UPDATE on it)",
            APPROVALS_PRIVILEGES,
        )

    def read(self, kind, where, parameters=(), newest=None):
        """
        L{load} in a transaction of its own.
        """
        return self.store.read(lambda cursor: self.load(cursor, kind, where, parameters, newest))


    @defer.inlineCallbacks
    def load(self, cursor, kind, where, parameters=(), newest=None):
        """
        The requests or grants matching C{where}, rebuilt from the chain;
        the C{newest} ones only when given, oldest first.
        """
        order = "opened DESC LIMIT %d" % (newest,) if newest else "opened"
        yield cursor.execute(
            "SELECT id, status, opened, votes, closed, uses FROM {s}.approvals WHERE kind = %s AND ({w}) ORDER BY {o}".format(
                s=self.schema, w=where, o=order
            ),
            (kind,) + tuple(parameters),
        )
        rows = cursor.fetchall()
        if newest:
            rows.reverse()
        seqs = sorted({seq for row in rows for seq in [row[2], row[4]] + list(row[3]) if seq is not None})
        lines = {}
        if seqs:
            yield cursor.execute("SELECT seq, line FROM {s}.events WHERE seq = ANY(%s)".format(s=self.schema), (seqs,))
            lines = {seq: json.loads(line) for seq, line in cursor.fetchall()}
        build = _request if kind == "request" else _grant
        return [build(row, lines) for row in rows]

    @defer.inlineCallbacks
    def request(self, cursor, request_id):
        found = yield self.load(cursor, "request", "id = %s", (request_id,))
        if not found:
            raise model.no_request(request_id)
        return found[0]

    @defer.inlineCallbacks
    def running(self, cursor):
        """
        The locks of the gateways running on the store
        (L{hoopgw.store.postgres.gateway_lock} of their run): a request whose
        gateway holds none has nobody left to end it.
        """
        yield cursor.execute(
            "SELECT objid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND granted", (LOCK_CLASS,)
        )
        return {int(objid) for (objid,) in cursor.fetchall()}

    # Writing in the chain's transaction.

    @defer.inlineCallbacks
    def update(self, cursor, sql, parameters):
        """
        Move one open row of the index on; anything else is a bug or a
        tampered index, and undoes the work.
        """
        yield cursor.execute(sql.format(s=self.schema), parameters)
        if cursor.rowcount != 1:
            raise StoreError("the approvals index has no open row %s to update; nothing was decided" % (parameters[-1],))

    def used(self, cursor, grant_id):
        return self.update(cursor, "UPDATE {s}.approvals SET uses = uses + 1 WHERE closed IS NULL AND id = %s", (grant_id,))

    def voted(self, cursor, request_id, seq):
        return self.update(
            cursor,
            "UPDATE {s}.approvals SET votes = array_append(votes, %s) WHERE closed IS NULL AND id = %s",
            (seq, request_id),
        )

    def revoked(self, cursor, grant_id, seq):
        return self.update(
            cursor,
            "UPDATE {s}.approvals SET status = 'revoked', closed = %s WHERE closed IS NULL AND id = %s",
            (seq, grant_id),
        )

    def wake(self, cursor, item_id, what):
        # Sent when the transaction commits, and only then.
        return cursor.execute("SELECT pg_notify(%s, %s)", (self.channel, json.dumps({"approval": item_id, "event": what})))

    @defer.inlineCallbacks
    def close(self, cursor, append, request, status, decision):
        """
        Record C{request}'s outcome; the index says it is closed.
        """
        request.status = status
        request.outcome = decision.to_json()
        event = yield append(self.ledger.outcome(request))
        yield self.update(
            cursor,
            "UPDATE {s}.approvals SET status = %s, closed = %s WHERE closed IS NULL AND id = %s",
            (status, event["seq"], request.id),
        )
        yield self.wake(cursor, request.id, status)

    @defer.inlineCallbacks
    def open(self, cursor, append, event, row):
        """
        Record a new request or grant (C{event}), and index it (C{row}: its
        id, kind, status, connection, rule, subject, gateway, expiry).
        """
        event = yield append(event)
        yield cursor.execute(
            "INSERT INTO {s}.approvals (id, kind, status, connection, rule, subject, gateway, expires, opened) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)".format(s=self.schema),
            tuple(row) + (event["seq"],),
        )
