"""
A record read back as sessions: which identity, from where, the commands
with their decisions, approvals and outcomes, the masked results as
recorded, and the terminal recordings (each with the command that made
it), with the filters auditors search by.
"""

import calendar
import re
import time

import attr

from hoopgw.cast import committed
from hoopgw.options import ConfigError, duration
from hoopgw.store import events as chaining


@attr.s(eq=False)
class CommandRecord:
    """
    One command of a session: what was asked (the C{command} event) and
    how it ended (the C{command.end} event, when there is one).
    """

    id = attr.ib()
    asked = attr.ib(default=None)
    ended = attr.ib(default=None)

    @property
    def event(self):
        return self.asked or self.ended or {}

    @property
    def text(self):
        return self.event.get("text", "")

    @property
    def kind(self):
        return self.event.get("kind", "")

    @property
    def decision(self):
        ended = (self.ended or {}).get("decision")
        return ended or self.event.get("decision") or {}

    @property
    def verdict(self):
        return self.decision.get("verdict", "")

    @property
    def outcome(self):
        return (self.ended or {}).get("outcome") or {}

    @property
    def results(self):
        return (self.ended or {}).get("results")

    @property
    def masked(self):
        return (self.ended or {}).get("masked", 0)

    @property
    def cast(self):
        """
        The terminal recording this command committed (C{name},
        C{sha256}, ...), or None.
        """
        return committed(self.ended)

    @property
    def ts(self):
        return self.event.get("ts", "")

    @property
    def seqs(self):
        return [event["seq"] for event in (self.asked, self.ended) if event]


@attr.s(eq=False)
class SessionRecord:
    """
    One session as the record tells it.
    """

    id = attr.ib()
    start = attr.ib(default=None)
    end = attr.ib(default=None)
    commands = attr.ib(factory=list)
    others = attr.ib(factory=list)

    @property
    def first(self):
        return self.start or self.end or {}

    @property
    def refused(self):
        return bool(self.end and self.end.get("type") == "session.refused")

    @property
    def identity(self):
        return (self.end or {}).get("identity") or self.first.get("identity") or {}

    @property
    def subject(self):
        return self.identity.get("subject") or self.first.get("subject") or ""

    @property
    def connection(self):
        return self.first.get("connection", "")

    @property
    def protocol(self):
        return self.first.get("protocol", "")

    @property
    def client(self):
        return self.first.get("client", "")

    @property
    def target(self):
        return self.first.get("target", "")

    @property
    def started(self):
        return self.first.get("ts", "")

    @property
    def ended(self):
        return (self.end or {}).get("ts", "")

    @property
    def recordings(self):
        """
        C{(number in the timeline, command)} of each command that left a
        terminal recording.
        """
        return [(number, command) for number, command in enumerate(self.commands, 1) if command.cast]

    @property
    def blocked(self):
        return sum(1 for command in self.commands if command.verdict == "deny")

    @property
    def approved(self):
        return sum(1 for command in self.commands if command.verdict == "approved")

    @property
    def masked(self):
        return sum(command.masked or 0 for command in self.commands)

    @property
    def seqs(self):
        found = [event["seq"] for event in (self.start, self.end) if event]
        for command in self.commands:
            found.extend(command.seqs)
        found.extend(event["seq"] for event in self.others)
        return found

    @property
    def status(self):
        if self.refused:
            return "refused"
        if self.end is None:
            return "open"
        return "ended"

    def flags(self):
        flags = []
        if self.blocked:
            flags.append("blocked:%d" % (self.blocked,))
        if self.approved:
            flags.append("approved:%d" % (self.approved,))
        if self.masked:
            flags.append("masked:%d" % (self.masked,))
        recordings = len(self.recordings)
        if recordings:
            flags.append("casts:%d" % (recordings,))
        return flags


class Index:
    """
    The sessions of a record, in the order they started, and what else the
    chain holds (gateway runs, checkpoints).
    """

    def __init__(self, entries):
        self.sessions = {}
        self.order = []
        self.checkpoints = []
        self.gateway_events = []
        self.views = []
        self.first_seq = None
        self.last_seq = None
        self.events = 0
        self.counts = {}
        for _, _, event in entries:
            if isinstance(event, dict):
                self._add(event)

    def _session(self, session_id):
        record = self.sessions.get(session_id)
        if record is None:
            record = self.sessions[session_id] = SessionRecord(session_id)
            self.order.append(record)
        return record

    def _add(self, event):
        self.events += 1
        kind = event.get("type", "")
        self.counts[kind] = self.counts.get(kind, 0) + 1
        seq = event.get("seq")
        if self.first_seq is None:
            self.first_seq = seq
        self.last_seq = seq
        if kind == chaining.CHECKPOINT:
            self.checkpoints.append(event)
            return
        if kind.startswith("gateway.") or kind.startswith("store."):
            self.gateway_events.append(event)
            return
        session_id = event.get("session")
        if not session_id:
            return
        record = self._session(session_id)
        if kind == "session.start":
            record.start = event
        elif kind in ("session.end", "session.refused"):
            record.end = event
        elif kind in ("command", "command.end"):
            command_id = event.get("command")
            command = next((each for each in record.commands if each.id == command_id), None)
            if command is None:
                command = CommandRecord(command_id)
                record.commands.append(command)
            if kind == "command":
                command.asked = event
            else:
                command.ended = event
        else:
            record.others.append(event)

    def signed_through(self):
        """
        The last event a checkpoint in this record covers.
        """
        return self.checkpoints[-1]["covers"]["seq"] if self.checkpoints else None

    def select(self, subject=None, connection=None, protocol=None, since=None, until=None, decision=None):
        """
        The sessions matching every filter given.

        @param since: epoch seconds; sessions that ended before are left out.
        @param until: epoch seconds; sessions that started after are left out.
        @param decision: C{"blocked"}, C{"approved"}, C{"masked"} or C{"refused"}.
        """
        chosen = []
        for record in self.order:
            if subject and subject.lower() not in record.subject.lower():
                continue
            if connection and record.connection != connection:
                continue
            if protocol and record.protocol != protocol:
                continue
            if since is not None and to_epoch(record.ended or record.started or "") < since and record.end is not None:
                continue
            if until is not None and to_epoch(record.started) > until:
                continue
            if decision == "blocked" and not (record.blocked or record.refused):
                continue
            if decision == "approved" and not record.approved:
                continue
            if decision == "masked" and not record.masked:
                continue
            if decision == "refused" and not record.refused:
                continue
            chosen.append(record)
        return chosen


DECISIONS = ("blocked", "approved", "masked", "refused")

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?Z?$")


def to_epoch(timestamp):
    """
    Epoch seconds of an RFC 3339 UTC timestamp as the store writes them
    (C{2026-01-31T12:00:00.000000Z}).
    """
    if not timestamp:
        return 0.0
    text = timestamp.rstrip("Z").replace(" ", "T")
    whole, _, fraction = text.partition(".")
    for layout in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            parsed = time.strptime(whole, layout)
        except ValueError:
            continue
        return calendar.timegm(parsed) + (float("0." + fraction) if fraction else 0.0)
    raise ValueError(timestamp)


def parse_time(text, name, now=None):
    """
    A time an auditor types: a date (C{2026-01-31}), a UTC date and time
    (C{2026-01-31T12:00:00Z}), or a duration back from now (C{24h}, C{90d}).

    @return: epoch seconds.
    @raise ConfigError: naming the option, with the forms accepted.
    """
    text = text.strip()
    if _DATE.match(text):
        return to_epoch(text)
    try:
        return (time.time() if now is None else now) - duration(text, name)
    except ConfigError:
        raise ConfigError(
            name, "expected a UTC date (2026-01-31), a date and time (2026-01-31T12:00:00Z) or an age (24h, 90d), got %r" % (text,)
        )
