"""
The protocol-neutral objects every front end produces and every addon sees:
who is connected (L{Identity}, L{Session}), what they asked for (L{Command}),
and what the chain decided about it (L{Decision}).
"""

import itertools
import os
import re
import time

import attr


SERVICE = "service"
HUMAN = "human"


@attr.s(frozen=True, slots=True)
class Identity:
    """
    Who is on the other end of a session, and how that was proven.

    @ivar subject: the stable name of the identity (a token's subject, a
        certificate's common name, an SSH key owner).
    @ivar issuer: who vouched for it (a token issuer, a CA).
    @ivar groups: the groups the gateway decided the identity belongs to.
    @ivar kind: L{SERVICE} for automation, L{HUMAN} for a person.
    @ivar method: how it was proven: C{"oidc"}, C{"mtls"}, C{"ssh-key"},
        C{"ssh-cert"}, C{"ldap"}, C{"saml"}.
    @ivar token_id: the token's C{jti}, or a certificate's serial.
    @ivar provenance: further facts for the auditor (key id, algorithm,
        certificate fingerprint, directory consulted); never a secret.
    """

    subject = attr.ib()
    issuer = attr.ib(default="")
    groups = attr.ib(default=frozenset(), converter=frozenset)
    kind = attr.ib(default=SERVICE)
    method = attr.ib(default="oidc")
    token_id = attr.ib(default=None)
    provenance = attr.ib(factory=dict, hash=False, eq=False)

    def to_json(self):
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "groups": sorted(self.groups),
            "kind": self.kind,
            "method": self.method,
            "token_id": self.token_id,
            "provenance": self.provenance,
        }


@attr.s(slots=True, repr=False)
class Credentials:
    """
    What a client presented to prove who it is.  Held only while the
    identity addon looks at it; never recorded, never logged.
    """

    user = attr.ib(default=None)
    password = attr.ib(default=None)
    client_certificate = attr.ib(default=None)
    ssh_key = attr.ib(default=None)
    extra = attr.ib(factory=dict)

    def __repr__(self):
        return "<Credentials (redacted)>"


# Six decimal digits in a row in a random id.
_DIGITS_IN_A_ROW = re.compile(r"[0-9]{6}")


def random_hex(nbytes=8, end_with_letter=False):
    """
    Random hex for an id the record holds: never six decimal digits in a
    row, so that no id (nor an id and a number written after it, with
    C{end_with_letter}) looks like a card number to a scanner of the
    record.  About 3 in 10 draws of 8 bytes are drawn again.
    """
    while True:
        value = os.urandom(nbytes).hex()
        if _DIGITS_IN_A_ROW.search(value) or (end_with_letter and value[-1].isdigit()):
            continue
        return value


def _new_id(prefix):
    return "%s-%s" % (prefix, random_hex())


@attr.s(slots=True, eq=False)
class Session:
    """
    One client connection.

    The front end creates it with the client's L{Credentials}; the identity
    addon sets L{identity} in C{session_started}.  Addons may keep their own
    per-session state in L{metadata}, keyed by their name.

    @ivar wire: set by a front end whose refusals carry a code of their
        own: C{wire(decision, stage)} (stage C{"session"} or
        C{"command"}) returns the denial with it (PostgreSQL: the
        SQLSTATE), so the record holds the code the client got.
    """

    connection = attr.ib()
    protocol = attr.ib()
    client_address = attr.ib()
    target = attr.ib(default="")
    credentials = attr.ib(factory=Credentials, repr=False)
    identity = attr.ib(default=None)
    id = attr.ib(factory=lambda: _new_id("s"))
    started = attr.ib(factory=time.time)
    attributes = attr.ib(factory=dict)
    metadata = attr.ib(factory=dict, repr=False)
    refusal = attr.ib(default=None)
    notifier = attr.ib(default=None, repr=False)
    wire = attr.ib(default=None, repr=False)

    def notify(self, text):
        """
        Tell the client something while its session goes on (an approval
        it waits for, say), in whatever way its protocol allows.
        """
        if self.notifier is not None:
            self.notifier(text)


ALLOW = "allow"
DENY = "deny"
APPROVED = "approved"

# What kind of refusal a denial is, in no protocol's terms; each front end
# says it on its wire (a SQLSTATE, an SSH exit status or message, an HTTP
# status).
UNAUTHENTICATED = "unauthenticated"
FORBIDDEN = "forbidden"
CANCELLED = "cancelled"
UNAVAILABLE = "unavailable"
FAILED = "failed"
REFUSALS = (UNAUTHENTICATED, FORBIDDEN, CANCELLED, UNAVAILABLE, FAILED)

# What became of a command, as front ends record it in
# C{Command.outcome["status"]}: it ran (L{OK}; an SSH command L{EXITED} or
# was L{SIGNALLED}), the target refused it (L{ERROR}), the chain denied it
# (L{DENIED}), the client or target went away first (L{INTERRUPTED}), an
# addon failed on its results, which were cut (L{WITHHELD}), a statement
# queued behind a failed one never ran (L{NOT_RUN}), a portal stopped at
# its row limit (L{SUSPENDED}).
OK = "ok"
ERROR = "error"
DENIED = "denied"
INTERRUPTED = "interrupted"
WITHHELD = "withheld"
NOT_RUN = "not-run"
SUSPENDED = "suspended"
EXITED = "exited"
SIGNALLED = "signalled"


@attr.s(frozen=True, slots=True)
class Decision:
    """
    What the chain decided about a session or a command.

    @ivar verdict: L{ALLOW}, L{DENY} or L{APPROVED}.
    @ivar rule: the name of the rule that decided, if any.
    @ivar reason: a sentence a user can read.
    @ivar addon: the addon that decided.
    @ivar approval: for L{APPROVED}, a mapping with the approval id, the
        approvers and their reasons.
    @ivar refusal: for L{DENY}, what kind of refusal, one of L{REFUSALS}:
        L{UNAUTHENTICATED} (who the client is was not proven),
        L{FORBIDDEN} (a policy refuses it), L{CANCELLED} (the client gave
        up waiting), L{UNAVAILABLE} (paused or stopping: try later),
        L{FAILED} (an addon failed, so the gateway refuses).
    @ivar sqlstate: the PostgreSQL front end's SQLSTATE for the refusal,
        set by that front end (through L{Session.wire}); addons and the
        core say L{refusal} instead.
    """

    verdict = attr.ib()
    rule = attr.ib(default=None)
    reason = attr.ib(default="")
    addon = attr.ib(default=None)
    approval = attr.ib(default=None)
    sqlstate = attr.ib(default=None)
    refusal = attr.ib(default=None)

    @classmethod
    def allow(cls, reason="", rule=None, addon=None):
        if not (reason or rule or addon):
            return _ALLOW
        return cls(ALLOW, rule=rule, reason=reason, addon=addon)

    @classmethod
    def deny(cls, reason, rule=None, addon=None, sqlstate=None, refusal=FORBIDDEN):
        # sqlstate stays fourth: addons written before refusal pass it so.
        if refusal not in REFUSALS:
            raise ValueError("%r is not a refusal; they are %s" % (refusal, ", ".join(REFUSALS)))
        return cls(DENY, rule=rule, reason=reason, addon=addon, sqlstate=sqlstate, refusal=refusal)

    @classmethod
    def approved(cls, approval, reason="", rule=None, addon=None):
        return cls(APPROVED, rule=rule, reason=reason, addon=addon, approval=approval)

    @property
    def denied(self):
        return self.verdict == DENY

    def to_json(self):
        if self is _ALLOW:
            return {"verdict": ALLOW}
        result = {"verdict": self.verdict}
        for name in ("rule", "reason", "addon", "approval", "refusal", "sqlstate"):
            value = getattr(self, name)
            if value:
                result[name] = value
        return result


_ALLOW = Decision(ALLOW)
_command_numbers = itertools.count(1)
# Unique across processes and restarts without a system call per command.
# Command ids are "c-PREFIX-N": the prefix ends with a letter, so that its
# digits and N never make one long number.
_COMMAND_PREFIX = random_hex(4, end_with_letter=True)


@attr.s(slots=True, eq=False)
class Command:
    """
    One unit of work a client asks for: a SQL statement, an SSH exec, shell
    or sftp request, a Kubernetes API request.

    @ivar kind: what sort of command: C{"sql"}, C{"exec"}, C{"shell"},
        C{"sftp"}, C{"kubernetes"}, C{"function-call"}, ...
    @ivar text: the command as the client sent it.  Addons may read it; it
        is never stored: L{redacted} is.
    @ivar redacted: L{text} with passwords, card numbers and tokens removed,
        the only form that reaches the record.
    @ivar facts: the structured facts that policies match on (statement
        type, argv, verb and resource, ...).
    @ivar parameters: bind parameters, as the client sent them.
    @ivar redacted_parameters: the same, redacted.
    @ivar decision: the chain's decision, once made.
    @ivar outcome: what happened at the target (command tag, row count,
        error code, exit status, ...), filled in by the front end.
    """

    kind = attr.ib()
    text = attr.ib(repr=False)
    redacted = attr.ib(default="")
    facts = attr.ib(factory=dict)
    parameters = attr.ib(default=(), repr=False)
    redacted_parameters = attr.ib(default=())
    id = attr.ib(factory=lambda: "c-%s-%d" % (_COMMAND_PREFIX, next(_command_numbers)))
    received = attr.ib(factory=time.time)
    decision = attr.ib(default=None)
    outcome = attr.ib(factory=dict)
    metadata = attr.ib(factory=dict, repr=False)

    @property
    def digest_input(self):
        """
        The bytes an approval is bound to: the exact command and its
        parameters.
        """
        parts = [self.kind.encode(), self.text.encode("utf-8", "surrogateescape")]
        for value in self.parameters:
            parts.append(b"\x00" if value is None else b"\x01" + bytes(value))
        return b"\x1f".join(parts)


# What the values of a result's column are to a hook (ResultChunk.kinds),
# in no protocol's terms.
TEXT = "text"
NUMBER = "number"
OPAQUE = "opaque"
VALUE_KINDS = (TEXT, NUMBER, OPAQUE)


class ResultChunk:
    """
    A piece of what a target sends back for a command, handed to the
    C{result_received} hooks in order.  Hooks change it in place.

    @ivar kind: C{"rows"} (a batch of SQL rows), C{"stream"} (bytes of an
        output stream), C{"message"} (an error or notice: a mapping of
        fields), C{"body"} (an HTTP body).
    @ivar data: the bytes as they arrived.  For C{"stream"} and C{"body"},
        the content to change; for C{"rows"}, the encoded batch, which a
        hook may scan quickly before it decodes L{rows}.
    @ivar columns: for C{"rows"}, the column names.
    @ivar kinds: for C{"rows"}, what each column's values are; for a
        C{"stream"} the front end knows the form of, one entry for the
        whole stream.  L{TEXT}: characters, which a hook may read and
        rewrite as text (a masked value keeps its length).  L{NUMBER}: a
        number in a form that is not text; its C{decoders} entry gives its
        digits as text (C{"12345.678"}; C{""} when it has none to read); a
        hook may pass it or remove it, never rewrite it.  L{OPAQUE}: bytes
        that are not text, which a hook must not rewrite as text; its
        C{decoders} entry, when there is one, says what they hold (see
        below).  A column with no entry is L{TEXT}.
    @ivar decoders: for C{"rows"}, per column, None for L{TEXT}, else a
        function of one value.  An L{OPAQUE} value's decoder returns None
        (it cannot be read: a hook that cannot tell what it holds removes
        it), a list of C{(start, end, kind, decoder)} (the values inside
        it, at C{value[start:end]}, each of a kind as above: a L{TEXT} one
        may be rewritten in place at the same length; an empty list: it
        holds nothing that could be text or a long number), or a pair
        C{(text, encode)} (it encodes the bytes C{text}; C{encode(new)} is
        the value holding C{new} instead).  A decoder raises
        C{ValueError} for a value it finds malformed.
    @ivar replaceable: for C{"rows"}, per column, whether a value a hook
        removes whole may be replaced by any text (a character string
        column); else it becomes None (SQL NULL).  A column with no entry
        is replaceable.
    @ivar fields: for C{"message"}, a mapping of field name to text.
    @ivar quotes: for C{"message"}, what the front end found quoted in
        its fields: C{{field name: (column names, or None for a whole
        row, the field's text with the quoted values withheld)}}.  A hook
        that must not let a column's values out replaces such a field by
        the second text.
    @ivar stream: for C{"stream"}, its name (stdout, stderr, copy, ...).
    @ivar masked: how many values hooks masked in this chunk.
    @ivar withheld: how many values hooks withheld from this chunk.
    @ivar final: for C{"stream"}, this is the stream's last chunk (possibly
        empty): a hook that held bytes back (a card number that may
        continue in the next chunk) must release them now.  One message
        of a stream may come as several chunks (a large PostgreSQL
        CopyData is handed over in parts of about 1 MiB).
    @ivar locate: for C{"rows"}, if the front end offers it, a function
        C{locate(start, end)} saying where the bytes C{data[start:end]}
        lie: None when certainly inside one value, else the list of
        C{(start, end)} pieces that are inside values.  A hook that
        changes values without changing their lengths uses it to edit
        L{data} in place (see L{replace_data}) instead of decoding rows.
        It may also have C{locate.inside(array, starts, ends)}: given
        C{data} as a numpy array of bytes and the bounds of many runs,
        a numpy array of booleans saying which certainly lie inside one
        value (what C{locate} would answer None for), for hooks that scan
        a batch with vectorised operations.
    """

    __slots__ = (
        "kind", "data", "columns", "kinds", "decoders", "replaceable", "fields", "quotes", "stream",
        "masked", "_rows", "_decode", "rows_changed", "withheld", "final", "locate",
    )

    def __init__(self, kind, data=b"", columns=(), kinds=(), decoders=(), replaceable=(), fields=None,
                 stream=None, rows=None, decode=None, final=False, locate=None, quotes=None):
        self.kind = kind
        self.data = data
        self.columns = columns
        self.kinds = kinds
        self.decoders = decoders
        self.replaceable = replaceable
        self.fields = fields
        self.quotes = quotes
        self.stream = stream
        self.masked = 0
        self.withheld = 0
        self._rows = rows
        self._decode = decode
        self.rows_changed = False
        self.final = final
        self.locate = locate

    @property
    def rows(self):
        """
        For C{"rows"}: a list of rows, each a list of values (C{bytes}, or
        C{None} for SQL NULL), decoded on first use.  Assign to it (or
        change a row and set L{rows_changed}) to change what the client
        gets.
        """
        if self._rows is None and self._decode is not None:
            self._rows = self._decode(self.data)
        return self._rows

    @rows.setter
    def rows(self, rows):
        self._rows = rows
        self.rows_changed = True

    def kind_of(self, index):
        """
        The kind of column C{index}'s values (L{TEXT} when the front end
        gave none).
        """
        kinds = self.kinds
        return kinds[index] if index < len(kinds) else TEXT

    def decoder_of(self, index):
        """
        Column C{index}'s decoder, or None (a L{TEXT} column's).
        """
        decoders = self.decoders
        return decoders[index] if index < len(decoders) else None

    def removed(self, index):
        """
        What a value of column C{index} becomes when a hook removes it
        whole: C{b"***"} where any text may stand in, else None (SQL NULL).
        """
        replaceable = self.replaceable
        return b"***" if index >= len(replaceable) or replaceable[index] else None

    def replace_data(self, data):
        """
        For C{"rows"}: replace the encoded batch with C{data}, the same
        rows with some values changed in place (same framing, same
        lengths).  Rows decoded earlier are decoded again from it.
        """
        if self.rows_changed:
            raise ValueError("the rows were already replaced; change chunk.rows instead")
        self.data = data
        if self._decode is not None:
            self._rows = None

    def __repr__(self):
        return "<ResultChunk %s %d bytes>" % (self.kind, len(self.data))


class Unavailable(Exception):
    """
    Something the gateway relies on (the evidence store) cannot serve now.
    Its message is a sentence saying why, and the service logs its own
    outage; a failure of this kind is logged as a line, not a traceback
    (L{hoopgw.logs.failed}).
    """
