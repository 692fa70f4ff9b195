"""
The target's replies to one client session: framed without copying a large
message more than once, every message checked (L{hoopgw.postgres.backend})
before any of it reaches the client, the client's statements' outcomes
kept, and results passed through the addon chain.
"""

import re
import struct

from twisted.logger import Logger

from hoopgw import cards, redact
from hoopgw.chain import ChainBroken
from hoopgw.model import ERROR, NOT_RUN, OK, OPAQUE, SUSPENDED, TEXT, ResultChunk
from hoopgw.postgres import backend, values, wire

# The size of the parts in which a large CopyData's data is handed to
# result hooks: the reads that brought it are joined up to it.
STREAM_PART = wire.LARGE_MESSAGE
# Stream data of this size or more is framed without being copied.
STREAM_FRAMED = 1 << 16

_SQLSTATE = re.compile(r"[0-9A-Z]{5}")

# What hooks are told of a COPY stream in text (or CSV) and in binary.
_TEXT_STREAM = (TEXT,)
_OPAQUE_STREAM = (OPAQUE,)
# A function's result: binary, of a type not known here.
_FUNCTION_RESULT = values.describe([0], [1])

# Whether rows may arrive now: not outside a result (NO_ROWS); in a result
# whose field count the first row tells (None); else that count.
NO_ROWS = -1


class TargetReplies:
    """
    What the target sends a L{PostgresFrontend} after login.

    @ivar frontend: the client's connection; this reads its pending
        statements (C{_expected}), prepared statements and portals.
    """

    log = Logger()

    def __init__(self, frontend, closed):
        self.frontend = frontend
        self.chain = frontend.chain
        self.settings = frontend.settings
        self._closed = closed
        self._pieces = []
        self._buffered = 0
        # How many bytes must be buffered before the next message is whole:
        # a large message arriving in many reads is joined once.
        self._needed = 5
        self._waiting = None
        self._columns = ()
        self._rows = NO_ROWS
        self._copy = None
        self._copy_kinds = _TEXT_STREAM
        # Why the session ends once what is being relayed is out: the
        # target sent a FATAL (or PANIC) error, after which nothing is valid.
        self._ending = None
        # The last result description read for hooks: (its columns, the
        # result formats, what hooks are told of it).
        self._described_for_hooks = None
        self._handlers = {
            wire.ROW_DESCRIPTION: self._row_description,
            wire.COMMAND_COMPLETE: self._command_complete,
            wire.EMPTY_QUERY_RESPONSE: self._command_complete,
            wire.READY_FOR_QUERY: self._ready_for_query,
            wire.ERROR_RESPONSE: self._error,
            wire.PARSE_COMPLETE: self._complete,
            wire.BIND_COMPLETE: self._complete,
            wire.CLOSE_COMPLETE: self._complete,
            wire.NO_DATA: self._complete,
            wire.COPY_OUT_RESPONSE: self._copy_out,
            wire.COPY_IN_RESPONSE: self._copy_in,
            wire.COPY_DONE: self._copy_done,
            wire.PORTAL_SUSPENDED: self._portal_suspended,
            wire.FUNCTION_CALL_RESPONSE: self._function_result,
            wire.NOTICE_RESPONSE: self._notice,
            wire.NOTIFICATION_RESPONSE: self._notification,
            wire.PARAMETER_STATUS: self._parameter_status,
            wire.PARAMETER_DESCRIPTION: self._relay_as_is,
        }

    @property
    def _head(self):
        expected = self.frontend._expected
        return expected[0] if expected else None

    # Framing.

    def data_received(self, data):
        self._pieces.append(data)
        self._buffered += len(data)
        if self._waiting is None and self._buffered >= self._needed:
            self._relay()

    def _relay(self):
        """
        Pass the target's messages to the client: runs of rows straight
        through when no addon looks at results, everything else through
        the bookkeeping and the chain.  A message that fails its check ends
        the session, and nothing of it is sent.
        """
        hooks = self.frontend._result_hooks
        if (
            self._needed >= wire.LARGE_MESSAGE
            and self._buffered >= self._needed
            and self._copy == "out"
            and self._pieces[0][0] == wire.COPY_DATA
        ):
            waiting = self._large_copy_data(hooks)
            if waiting is not None:
                self._suspend(waiting, b"", [])
                return
            if self._buffered < 5 or self._closed():
                return
        pieces = self._pieces
        buffer = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self._pieces = []
        self._buffered = 0
        self._needed = 5
        end = len(buffer)
        out = []
        position = 0
        span = 0
        maximum = self.settings.max_message_bytes
        unpack = wire.unpack_int32
        handlers = self._handlers
        layouts = backend.LAYOUTS
        try:
            while end - position >= 5:
                kind = buffer[position]
                length = unpack(buffer, position + 1)
                stop = position + 1 + length
                if length < 4 or length > maximum:
                    self._broken("the target sent a malformed or oversized %s" % (wire.backend_name(kind),))
                    return
                if stop > end:
                    self._needed = stop - position
                    break
                if kind == wire.DATA_ROW or kind == wire.COPY_DATA:
                    if kind == wire.DATA_ROW:
                        batch_end = self._check_rows(buffer, position, end, maximum)
                    elif self._copy != "out":
                        raise backend.MalformedTarget(kind, "outside a COPY TO")
                    else:
                        batch_end = wire.run_end(buffer, position, end, maximum)
                    if not hooks and not self._denying():
                        position = batch_end
                        continue
                    if span < position:
                        out.append(buffer[span:position])
                    if self._denying():
                        # The stand-in for a denied statement has no result
                        # the client may see (a lying target gave one).
                        position = span = batch_end
                        continue
                    waiting = self._result(kind, buffer, position, batch_end, out)
                    position = span = batch_end
                else:
                    handler = handlers.get(kind)
                    if handler is None:
                        raise backend.MalformedTarget(kind, "after login")
                    payload = buffer[position + 5 : stop]
                    layouts[kind](kind, payload)
                    if span < position:
                        out.append(buffer[span:position])
                    waiting = handler(kind, payload, buffer[position:stop], out)
                    position = span = stop
                if waiting is not None:
                    self._suspend(waiting, buffer[position:], out)
                    return
                if self._closed():
                    return
                if self._ending is not None:
                    self._end(out)
                    return
        except backend.MalformedTarget as error:
            self._broken(str(error))
            return
        except (struct.error, ValueError, IndexError):
            self._broken("the target sent a malformed %s" % (wire.backend_name(buffer[position]),))
            return
        if span < position:
            out.append(buffer[span:position])
        if position < end:
            self._pieces = [buffer[position:]]
            self._buffered = end - position
        if out:
            send(self.frontend.transport, out)

    def _large_copy_data(self, hooks):
        """
        A large CopyData is passed on as the reads that brought it when no
        addon looks at results.  Else its data goes through the hooks in
        parts of about L{STREAM_PART} bytes (the reads joined up to that
        size), each part sent on as a CopyData of its own as soon as the
        hooks are done with it (the protocol lets a stream be cut into
        messages anywhere).  A card number across two parts is caught as
        one across two messages is: the stream masker holds back what may
        be the start of one.  No buffer of the whole message's size is
        made, and no part is kept once sent, so one message costs what as
        many bytes in smaller messages cost.

        @return: None, or a Deferred while a hook is waiting.
        """
        message, self._pieces = wire.split_pieces(self._pieces, self._needed)
        self._buffered -= self._needed
        self._needed = 5
        if not hooks:
            send(self.frontend.transport, message)
            return None
        message[0] = message[0][5:]
        head = self._head
        command = head.command if head is not None else None
        return self._copy_parts(command, wire.regroup(message, STREAM_PART))

    def _copy_parts(self, command, parts):
        """
        Pass the parts of one CopyData through the chain in order, and send
        what the hooks give back for each.

        @return: None when done (or the result was withheld), or a Deferred
            firing once a hook that is waiting and the parts after it are.
        """
        for part in parts:
            chunk = ResultChunk("stream", data=part, stream="copy", kinds=self._copy_kinds)
            out = []
            waiting = self._through_chain(command, chunk, out, lambda chunk=chunk: self._encode_chunk(wire.COPY_DATA, chunk))
            if waiting is not None:
                return waiting.addCallback(self._copy_part_done, command, parts)
            if self._closed():
                return None
            if out:
                send(self.frontend.transport, out)
        return None

    def _copy_part_done(self, encoded, command, parts):
        if self._closed():
            return None
        if encoded:
            send(self.frontend.transport, _pieces(encoded))
        return self._copy_parts(command, parts)

    def _suspend(self, waiting, rest, out):
        """
        An addon answered a result with a Deferred: hold the rest of the
        target's output until it fires.
        """
        frontend = self.frontend
        if out:
            frontend.transport.writeSequence(out)
        if rest:
            self._pieces.insert(0, rest)
            self._buffered += len(rest)
        self._waiting = waiting
        frontend.upstream_valve.pause("addon")

        def done(chunk_bytes):
            self._waiting = None
            if self._closed():
                return
            if isinstance(chunk_bytes, list):
                frontend.transport.writeSequence(chunk_bytes)
            elif chunk_bytes:
                frontend.transport.write(chunk_bytes)
            if self._ending is not None:
                self._end([])
                return
            frontend.upstream_valve.resume("addon")
            if self._pieces:
                self._relay()

        waiting.addCallback(done).addErrback(self._result_failed)

    def _end(self, out):
        """
        The target ended the session with a FATAL error: the client has it
        (masked as any error is), nothing the target sends after it is
        relayed, and both connections close, whether or not the target
        closes its own (one that kept it open would leave the client
        waiting for a ReadyForQuery that cannot come).
        """
        self._pieces = []
        self._buffered = 0
        if out:
            send(self.frontend.transport, out)
        self.frontend.end(self._ending)

    def _broken(self, reason):
        """
        The target broke the protocol: the client gets a FATAL error saying
        so, the record the reason (which names the kind of message, never
        what it held), and the session ends.
        """
        self.log.warn("Closing a session: {reason}", reason=reason)
        self._pieces = []
        self._buffered = 0
        frontend = self.frontend
        frontend.session.attributes["end_reason"] = reason
        frontend._fatal("08P01", "%s; the session is closed" % (reason,))

    # Rows and copy data.

    def _check_rows(self, buffer, start, end, maximum):
        """
        Find and check the run of rows at C{start}.

        @return: where it ends.
        """
        count = self._rows
        if count == NO_ROWS:
            head = self._head
            if head is None or head.kind != "execute":
                raise backend.MalformedTarget(wire.DATA_ROW, "outside a result")
            # An Execute's rows follow no RowDescription: its portal's
            # description, if the client asked for one, says how many
            # fields they hold; else every row holds as many as the first.
            portal = head.target
            count = len(portal.columns) if portal is not None and portal.columns else None
        stop, self._rows = backend.row_run(buffer, start, end, maximum, count)
        return stop

    def _result(self, kind, buffer, start, stop, out):
        """
        Run rows or copy data through the C{result_received} hooks.
        """
        head = self._head
        command = head.command if head is not None else None
        if kind == wire.DATA_ROW:
            names, kinds, decoders, replaceable = self._row_columns(head)
            data = buffer[start:stop]
            chunk = ResultChunk(
                "rows",
                data=data,
                columns=names,
                kinds=kinds,
                decoders=decoders,
                replaceable=replaceable,
                decode=wire.decode_data_rows,
                locate=wire.DataRowValues(data, self.settings.max_message_bytes < 1 << 29),
            )
        else:
            chunk = ResultChunk(
                "stream", data=wire.copy_data_payloads(buffer, start, stop), stream="copy", kinds=self._copy_kinds
            )
        return self._through_chain(command, chunk, out, lambda: self._encode_chunk(kind, chunk))

    def _row_columns(self, head):
        """
        The names of the columns of the rows now arriving, and their kinds,
        decoders and replaceable flags (L{hoopgw.postgres.values}), worked
        out once per description, not per batch of rows.  An Execute's
        rows follow no RowDescription unless the client described the
        portal: its columns come from the portal's (or its statement's)
        description, its formats from its Bind.
        """
        columns = self._columns
        result_formats = None
        if head is not None and head.kind == "execute" and head.target is not None:
            portal = head.target
            columns = portal.columns or columns
            result_formats = portal.result_formats
        described = self._described_for_hooks
        if described is not None and described[0] is columns and described[1] is result_formats:
            return described[2]
        if result_formats is not None:
            formats = [wire.parameter_format(result_formats, index) for index in range(len(columns))]
        else:
            formats = [column[2] for column in columns]
        told = ([column[0] for column in columns],) + values.describe([column[1] for column in columns], formats)
        self._described_for_hooks = (columns, result_formats, told)
        return told

    def _encode_chunk(self, kind, chunk):
        if chunk.kind == "rows":
            return wire.encode_data_rows(chunk.rows) if chunk.rows_changed else chunk.data
        if chunk.kind == "stream":
            if len(chunk.data) >= STREAM_FRAMED:
                # Framed without copying the data once more.
                return [b"d" + wire.int32(len(chunk.data) + 4), chunk.data]
            return wire.message(b"d", chunk.data) if chunk.data else b""
        if kind == wire.NOTIFICATION_RESPONSE:
            return wire.notification(chunk.fields["process_id"], chunk.fields["channel"], chunk.fields["payload"])
        if kind == wire.PARAMETER_STATUS:
            return wire.parameter_status(chunk.fields["name"], chunk.fields["value"])
        return wire.fields_message(bytes((kind,)), chunk.fields)

    def _through_chain(self, command, chunk, out, encode):
        try:
            waiting = self.chain.result(self.frontend.session, command, chunk)
        except ChainBroken as error:
            self._withhold(error)
            return None
        if waiting is None:
            encoded = encode()
            if isinstance(encoded, list):
                out.extend(encoded)
            else:
                out.append(encoded)
            return None
        return waiting.addCallback(lambda _: encode())

    def _result_failed(self, failure):
        if failure.check(ChainBroken):
            self._withhold(failure.value)
        else:
            self.frontend._internal_error(failure)

    def _withhold(self, error):
        """
        An addon failed on a result: nothing more of it may reach the
        client (fail closed).
        """
        self.log.error("Withholding a result: {error}", error=str(error))
        frontend = self.frontend
        frontend.session.attributes["end_reason"] = "result withheld: %s" % (error,)
        frontend._fatal("XX000", "hoopgw withheld a result because %s; the session is closed" % (error,))

    # Each other kind of message: check it belongs here, keep track of what
    # it answers, relay it.  A handler returns a Deferred when the message
    # waits for an addon.

    def _relay_as_is(self, kind, payload, raw, out):
        if not self._denying():
            out.append(raw)

    def _denying(self):
        """
        Whether the target is answering the stand-in for a denied
        statement (L{hoopgw.postgres.frontend.DENIAL_SQL}): it must fail,
        and nothing it answers but its failure (replaced by the denial) may
        reach the client.
        """
        expected = self.frontend._expected
        return bool(expected) and expected[0].kind == "denied"

    def _denial(self, head):
        """
        The error the client gets for a denied statement, once.
        """
        head.failed = True
        decision = head.decision
        if isinstance(decision, bytes):
            # The gateway's own answer to a client's protocol error.
            return decision
        return wire.error_response(
            decision.sqlstate or "42501",
            "hoopgw denied this statement: %s" % (decision.reason,),
            detail="rule: %s" % (decision.rule,) if decision.rule else None,
        )

    def _row_description(self, kind, payload, raw, out):
        # Columns matter to result hooks, to prepared statements'
        # descriptions, and to checking the rows that follow.
        columns = backend.row_description(payload)
        if self._denying():
            # A lying target's result for the denial's stand-in: its rows
            # are checked, and withheld.
            self._columns = columns
            self._rows = len(columns)
            return None
        if self.frontend._result_hooks and cards.might_hold_pan(payload):
            # A column's name is the client's alias or the target's
            # catalog: either may be a card number ("AS x6011...").
            payload = _mask_column_names(payload)
            raw = raw[:5] + payload
            columns = backend.row_description(payload)
        self._columns = columns
        head = self._head
        if head is not None and head.kind == "describe":
            self._described(head, columns)
            self.frontend._expected.popleft()
            if head.decision == "injected":
                return None
        else:
            self._rows = len(columns)
        out.append(raw)
        return None

    def _command_complete(self, kind, payload, raw, out):
        if self._denying():
            self._end_result()
            return None
        tag = payload.rstrip(b"\x00").decode("utf-8", "replace") if kind == wire.COMMAND_COMPLETE else ""
        head = self._head
        if head is not None and head.kind in ("query", "execute"):
            command = head.command
            if command is not None:
                command.outcome.update(status=OK, tag=tag, rows=wire.rows_from_tag(tag))
                self.chain.finish(self.frontend.session, command)
            head.index += 1
            if head.kind == "execute":
                self.frontend._expected.popleft()
        self._end_result()
        out.append(raw)
        return None

    def _end_result(self):
        self._columns = ()
        self._rows = NO_ROWS
        self._copy = None

    def _ready_for_query(self, kind, payload, raw, out):
        self._end_result()
        head = self._head
        if head is not None and head.kind == "denied" and not head.failed:
            # The target did not fail the denial's stand-in as it must: the
            # client gets the denial all the same.
            self.log.warn("The target answered the stand-in for a denied statement without failing it")
            out.append(self._denial(head))
        if head is not None and head.kind in ("query", "sync", "function", "denied"):
            self.frontend._expected.popleft()
            self._not_run(head, "the query ended before this statement ran")
            if head.kind == "denied" and head.target == "extended":
                return None
        out.append(raw)
        return None

    def _complete(self, kind, payload, raw, out):
        head = self._head
        if head is not None and head.kind == "denied":
            return None
        if head is not None and head.kind in ("parse", "bind", "close", "describe"):
            self.frontend._expected.popleft()
            if kind == wire.NO_DATA and head.decision == "injected":
                self._described(head, [])
                return None
        out.append(raw)
        return None

    def _copy_out(self, kind, payload, raw, out):
        if self._denying():
            raise backend.MalformedTarget(kind, "in answer to a statement the gateway denied")
        self._copy_kinds = _TEXT_STREAM if backend.copy_response(kind, payload) == 0 else _OPAQUE_STREAM
        self._copy = "out"
        out.append(raw)
        return None

    def _copy_in(self, kind, payload, raw, out):
        if self._denying():
            raise backend.MalformedTarget(kind, "in answer to a statement the gateway denied")
        self._copy = "in"
        out.append(raw)
        return None

    def _copy_done(self, kind, payload, raw, out):
        if self._copy != "out":
            raise backend.MalformedTarget(kind, "outside a COPY TO")
        self._copy = None
        if not self.frontend._result_hooks:
            out.append(raw)
            return None
        # The end of a copy stream: what a hook held back is released.
        head = self._head
        command = head.command if head is not None else None
        chunk = ResultChunk("stream", stream="copy", kinds=self._copy_kinds, final=True)
        return self._through_chain(command, chunk, out, lambda: _pieces(self._encode_chunk(wire.COPY_DATA, chunk)) + [raw])

    def _portal_suspended(self, kind, payload, raw, out):
        head = self._head
        if head is not None and head.kind == "denied":
            raise backend.MalformedTarget(kind, "in answer to a statement the gateway denied")
        if head is not None and head.kind == "execute":
            command = head.command
            command.outcome.update(status=SUSPENDED)
            self.chain.finish(self.frontend.session, command)
            self.frontend._expected.popleft()
        self._rows = NO_ROWS
        out.append(raw)
        return None

    def _function_result(self, kind, payload, raw, out):
        head = self._head
        if head is None or head.kind != "function" or head.command is None:
            # A FunctionCall is answered once; a second answer, or one
            # to nothing, is not PostgreSQL's.
            raise backend.MalformedTarget(kind, "that answers no FunctionCall")
        command = head.command
        command.outcome.update(status=OK)
        self.chain.finish(self.frontend.session, command)
        head.index += 1
        if not self.frontend._result_hooks:
            out.append(raw)
            return None
        # The result's format and type are not known here: it is checked
        # as an opaque binary value.
        length = wire.unpack_int32(payload)
        value = None if length == 0xFFFFFFFF else payload[4 : 4 + length]
        kinds, decoders, replaceable = _FUNCTION_RESULT
        chunk = ResultChunk(
            "rows", columns=["result"], kinds=kinds, decoders=decoders, replaceable=replaceable, rows=[[value]]
        )
        return self._through_chain(command, chunk, out, lambda: wire.function_call_response(chunk.rows[0][0]))

    def _notice(self, kind, payload, raw, out):
        if not self.frontend._result_hooks:
            out.append(raw)
            return None
        head = self._head
        fields = wire.parse_fields(payload)
        chunk = ResultChunk("message", fields=fields, stream="notice", quotes=values.quotes(fields))
        command = head.command if head is not None else None
        return self._through_chain(command, chunk, out, lambda: self._encode_chunk(kind, chunk))

    def _notification(self, kind, payload, raw, out):
        if not self.frontend._result_hooks:
            out.append(raw)
            return None
        process_id, channel, text = wire.parse_notification(payload)
        fields = {"process_id": process_id, "channel": channel, "payload": text}
        chunk = ResultChunk("message", fields=fields, stream="notification")
        return self._through_chain(None, chunk, out, lambda: self._encode_chunk(kind, chunk))

    def _parameter_status(self, kind, payload, raw, out):
        # A setting's value is the target's text too (a SET of a custom
        # setting can carry anything): it is masked as a notice is.
        if not self.frontend._result_hooks:
            out.append(raw)
            return None
        name, value = backend.parameter_status(kind, payload)
        chunk = ResultChunk("message", fields={"name": name, "value": value}, stream="parameter")
        return self._through_chain(None, chunk, out, lambda: self._encode_chunk(kind, chunk))

    def _error(self, kind, payload, raw, out):
        self._rows = NO_ROWS
        self._copy = None
        fields = wire.parse_fields(payload)
        frontend = self.frontend
        expected = frontend._expected
        head = self._head
        severity = fields.get("severity_nonlocalized") or fields.get("severity")
        if severity in ("FATAL", "PANIC"):
            # The record's reason names the SQLSTATE, never the target's text.
            code = fields.get("code", "")
            self._ending = "the target ended the session: %s %s" % (
                severity, code if _SQLSTATE.fullmatch(code) else "(no valid SQLSTATE)")
        if head is not None and head.kind == "denied":
            if not head.failed:
                out.append(self._denial(head))
            return None
        message = redact.redact_text(fields.get("message", ""))[0]
        outcome = {"status": ERROR, "sqlstate": fields.get("code"), "error": message}

        if head is not None and head.kind in ("query", "function"):
            command = head.command
            if command is not None:
                command.outcome.update(outcome)
                self.chain.finish(frontend.session, command)
                head.index += 1
        elif head is not None and head.kind != "sync":
            # The extended protocol: the target skips everything up to Sync.
            failed = expected.popleft()
            if failed.kind == "execute":
                failed.command.outcome.update(outcome)
                self.chain.finish(frontend.session, failed.command)
            while expected and expected[0].kind != "sync":
                skipped = expected.popleft()
                self._not_run(skipped, "an earlier message of the pipeline failed")
            if not expected:
                # The Sync is still to come from the client (a decision
                # held the rest back while the first part ran): what is
                # sent before it is skipped as well.
                frontend._target_skipping = True
        if frontend._result_hooks:
            command = head.command if head is not None else None
            chunk = ResultChunk("message", fields=fields, stream="error", quotes=values.quotes(fields))
            return self._through_chain(command, chunk, out, lambda: self._encode_chunk(kind, chunk))
        out.append(raw)
        return None

    def _described(self, head, columns):
        which, name = head.target
        frontend = self.frontend
        if which == b"P" and name in frontend._portals:
            frontend._portals[name].columns = columns
        elif which == b"S" and name in frontend._statements:
            frontend._statements[name] = (frontend._statements[name][0], columns)

    def not_run(self, pending, reason):
        """
        End the commands of C{pending}, which the target will not answer
        (it skips to a Sync), as not run.
        """
        self._not_run(pending, reason)

    def _not_run(self, pending, reason):
        for command in pending.commands[pending.index :]:
            if not command.outcome:
                command.outcome.update(status=NOT_RUN, reason=reason)
                self.chain.finish(self.frontend.session, command)
        pending.index = len(pending.commands)


def _pieces(encoded):
    return encoded if isinstance(encoded, list) else [encoded]


def send(transport, pieces):
    """
    Write a batch of messages now.  Twisted's TLS layer holds small writes
    back until the next reactor iteration to aggregate them; the front end
    already writes whole batches, so waiting only adds an iteration and a
    timer to every statement.
    """
    transport.writeSequence(pieces)
    aggregator = getattr(getattr(transport, "protocol", None), "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()


def _mask_column_names(payload):
    """
    A checked RowDescription's payload with card numbers in its column
    names masked (same length: the framing does not change).
    """
    masked = bytearray(payload)
    offset = 2
    for _ in range(struct.unpack_from("!H", payload, 0)[0]):
        end = payload.index(b"\x00", offset)
        masked[offset:end] = cards.mask_bytes(payload[offset:end])[0]
        offset = end + 19
    return bytes(masked)
