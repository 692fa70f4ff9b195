"""
The record addon: every session and command goes into the evidence store,
and a command's event is durable before the command reaches the target.
If the store cannot take it, the command is refused (fail closed).

A terminal recording is committed by the C{command.end} event of the
command that produced it: the front end stores it and puts its digest in
the command's outcome before finishing the command (L{hoopgw.cast.commit}).
"""

import time

from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import cards
from hoopgw import options as o
from hoopgw.addon import AddonFactory
from hoopgw.chain import settled
from hoopgw.model import TEXT


def session_fields(session):
    """
    The fields every event of a session carries, built once per session
    once its identity is known.
    """
    cached = session.metadata.get("record_fields")
    if cached is not None:
        return cached
    fields = {
        "session": session.id,
        "connection": session.connection,
        "protocol": session.protocol,
        "target": session.target,
        "client": session.client_address,
    }
    if session.identity is not None:
        fields["subject"] = session.identity.subject
        session.metadata["record_fields"] = fields
    return fields


class Record:
    """
    Write sessions, commands and outcomes to the evidence store, write-ahead.
    """

    name = "record"
    log = Logger()
    options = (
        o.Option(
            "result_rows",
            o.integer(minimum=0),
            10,
            "How many result rows of each command the record keeps, as they left the gateway "
            "(card numbers masked), so an auditor can see what a statement returned. 0 keeps none.",
        ),
        o.Option(
            "result_bytes",
            o.integer(minimum=0),
            4096,
            "How many bytes of each command's output stream the record keeps, masked.",
        ),
    )

    def __init__(self, options, context):
        self._store = context.store
        self._gateway = getattr(context.gateway, "instance", None)
        # One account of refusals for the whole gateway, whatever the protocol.
        self._floods = getattr(context.gateway, "refusals", None)
        self._rows = options["result_rows"]
        self._bytes = options["result_bytes"]
        if not (self._rows or self._bytes):
            # Nobody needs the results decoded: let the front end relay them untouched.
            self.result_received = None

    def _append(self, event, urgent=True):
        """
        Hand C{event} to the store.

        @return: None once it is written (as write-ahead asks, durable or
            not), else a L{Deferred} firing with None when it is, or
            failing if the store cannot take it.
        """
        # A store that raises instead of failing its Deferred still fails
        # the command closed, with a sentence rather than a traceback.
        written = defer.maybeDeferred(self._store.append, event, urgent=urgent)
        done, _ = settled(written)
        if done:
            # The common case: no callbacks to run on every event.
            return None
        return written.addCallbacks(_nothing, self._unwritten, errbackArgs=(event,))

    def _unwritten(self, failure, event):
        self.log.error(
            "The record could not take a {kind} event ({error}); what it records is refused",
            kind=event.get("type"),
            error=failure.getErrorMessage(),
        )
        return failure

    def session_started(self, session):
        session.metadata["record"] = {"commands": 0, "started": True}
        event = dict(session_fields(session), type="session.start", attributes=session.attributes)
        if self._gateway:
            event["gateway"] = self._gateway
        if session.identity is not None:
            event["identity"] = session.identity.to_json()
        return self._append(event)

    def command_received(self, session, command):
        state = session.metadata.setdefault("record", {"commands": 0})
        state["commands"] += 1
        command.metadata["recorded"] = True
        event = dict(
            session_fields(session),
            type="command",
            command=command.id,
            kind=command.kind,
            text=command.redacted,
            facts=command.facts,
            decision=command.decision.to_json(),
        )
        if command.redacted_parameters:
            event["parameters"] = list(command.redacted_parameters)
        return self._append(event)

    def result_received(self, session, command, chunk):
        if command is None:
            return
        sample = command.metadata.get("record_sample")
        if sample is None:
            sample = command.metadata["record_sample"] = {"rows": [], "bytes": b"", "masked": 0}
        # What the mask addon changed, counted for the evidence report.
        sample["masked"] += chunk.masked + chunk.withheld
        if chunk.kind == "rows":
            room = self._rows - len(sample["rows"])
            if room > 0:
                if not sample.get("columns"):
                    # A column's name may be a card number (an alias).
                    sample["columns"] = [cards.mask_text(name)[0] for name in chunk.columns]
                for row in chunk.rows[:room]:
                    sample["rows"].append(
                        [_sample_value(value, chunk.kind_of(index) != TEXT) for index, value in enumerate(row)]
                    )
        elif chunk.kind == "stream" and len(sample["bytes"]) < self._bytes:
            sample["bytes"] += chunk.data[: self._bytes - len(sample["bytes"])]

    def command_finished(self, session, command):
        event = dict(
            session_fields(session),
            type="command.end",
            command=command.id,
            decision=command.decision.to_json() if command.decision is not None else None,
            outcome=command.outcome,
            duration_ms=round((time.time() - command.received) * 1000, 3),
        )
        if not command.metadata.get("recorded"):
            # Refused before it reached this addon: the record still says what was asked.
            event.update(kind=command.kind, text=command.redacted, facts=command.facts)
            if command.redacted_parameters:
                event["parameters"] = list(command.redacted_parameters)
        sample = command.metadata.get("record_sample")
        if sample is not None and sample.get("masked"):
            event["masked"] = sample["masked"]
        if sample is not None and (sample["rows"] or sample["bytes"]):
            event["results"] = {
                "columns": sample.get("columns", []),
                "rows": sample["rows"],
                "text": cards.mask_text(sample["bytes"].decode("utf-8", "replace"))[0],
            }
        # The outcome is not waited for: the client has its answer already,
        # so it rides with the next command's write-ahead sync (or a short
        # delay).  Should the store fail, it refuses every later command.
        written = self._append(event, urgent=False)
        if written is not None:
            written.addErrback(self._lost)

    def _lost(self, failure):
        # Already logged by _unwritten; the store refuses later commands.
        return None

    def cancel_requested(self, session, command, via):
        event = dict(session_fields(session), type="command.cancel")
        if command is not None:
            event["command"] = command.id
        if via is not None:
            event["via"] = via
        if self._gateway:
            event["gateway"] = self._gateway
        return self._append(event)

    def session_ended(self, session):
        state = session.metadata.get("record") or {}
        event = dict(
            session_fields(session),
            duration_ms=round((time.time() - session.started) * 1000, 3),
            commands=state.get("commands", 0),
        )
        if session.refusal is not None:
            event["refusal"] = session.refusal.to_json()
        if not state.get("started"):
            if self._floods is not None and not self._floods.admit(session):
                # One of a flood: counted in its address's summary event.
                return None
            # Refused before it reached this addon: a failed logon attempt (PCI DSS 10.2.1.4).
            event.update(type="session.refused", attributes=session.attributes)
        else:
            event.update(type="session.end", reason=session.attributes.get("end_reason", ""))
        if session.identity is not None:
            event["identity"] = session.identity.to_json()
        if self._gateway:
            event["gateway"] = self._gateway
        return self._append(event)


def _nothing(_):
    return None


def _sample_value(value, binary):
    if value is None:
        return None
    if binary:
        return "<binary, %d bytes>" % (len(value),)
    text = bytes(value).decode("utf-8", "replace")
    return cards.mask_text(text)[0]


factory = AddonFactory(Record)
