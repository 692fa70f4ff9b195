"""
The mask addon: card numbers never leave in clear text.  Every PAN in
what a target sends back (rows, streams, error and notice fields,
notifications, bodies) is shown as at most BIN and last four; values of
sensitive columns (CVV, track data, PIN) are replaced whole; whatever
cannot be checked is withheld.  Groups with a documented business need
may be exempted; their unmasked results are counted and recorded as such.

With C{sensitive_columns}, a PostgreSQL connection also knows its card
data as C{schema.table.column} of the target's catalog and follows every
statement's columns to them before it runs (L{hoopgw.postgres.guard}): a
card number leaves only as a plain column, masked; sensitive
authentication data never leaves.
"""

from twisted.logger import Logger

from hoopgw import cards
from hoopgw import columnpolicy
from hoopgw import masking
from hoopgw import options as o
from hoopgw import sqlfacts
from hoopgw.addon import AddonFactory
from hoopgw.model import TEXT, Decision
from hoopgw.options import ConfigError, join

# The approval rule a connection's "approve" column policies go through.
APPROVAL_RULE = "sensitive-columns"


class Mask:
    """
    Mask card numbers (PCI DSS 3.4.1) and sensitive columns (3.3.1) in everything a target returns.
    """

    name = "mask"
    # The statement classification (hoopgw.sqlfacts) the front end makes.
    reads = ("sql",)
    log = Logger()
    options = (
        o.Option(
            "style",
            o.choice(*cards.STYLES),
            cards.BIN_AND_LAST_FOUR,
            "How a card number is shown: bin+last4 (first six and last four digits) or last4.",
        ),
        o.Option(
            "columns",
            o.list_of(o.regex),
            [masking.re.compile(pattern, masking.re.I) for pattern in masking.DEFAULT_COLUMNS],
            "Regular expressions (case-insensitive) for the names of columns whose values are replaced "
            "whole: card verification codes, track data, PINs.  Followed through aliases and subqueries.",
        ),
        o.Option(
            "exempt_groups",
            o.string_set,
            frozenset(),
            "Groups with a documented business need to see card numbers in clear.  Their results are not "
            "masked; every such result is recorded as unmasked, with the number of card numbers it held.",
        ),
        o.Option(
            "sensitive_columns",
            columnpolicy.sensitive_columns,
            {},
            "PostgreSQL only: the target's card data, DATABASE.SCHEMA.TABLE.COLUMN (or SCHEMA.TABLE.COLUMN) to "
            "its kind: pan (card numbers: leave only as a plain column, masked) or sad (CVV, track data, PIN: "
            "never leave).  Statements are followed to these columns through the target's catalog before they run.",
        ),
        o.Option(
            "sensitive_columns_file",
            columnpolicy.sensitive_columns_file,
            None,
            "A YAML file with a sensitive_columns mapping (as hoopgw discover --write writes it), added to "
            "sensitive_columns.",
        ),
        o.Option(
            "column_policy",
            columnpolicy.Policy.parse,
            columnpolicy.Policy(),
            "What may happen to sensitive columns: transform, equality, pattern, range, expression, sort, "
            "sad_predicates, ddl, each allow, deny or approve (see docs/sensitive-columns.rst).",
        ),
        o.Option(
            "approvers",
            o.string_set,
            frozenset(),
            "The groups whose members approve statements a column policy set to approve holds.",
        ),
        o.Option(
            "approval_timeout",
            o.duration,
            300.0,
            "How long such a statement waits for its approval before it is refused.",
        ),
        o.Option(
            "catalog_refresh",
            o.duration,
            300.0,
            "How old the target's catalog may grow before it is read again (it is also read again after DDL "
            "and when a statement names a relation it does not have).",
        ),
    )

    @staticmethod
    def check_connection(options, connection, providers, path):
        if not (options["sensitive_columns"] or options["sensitive_columns_file"]):
            return
        if connection.protocol != "postgres":
            raise ConfigError(join(path, "sensitive_columns"), "applies to PostgreSQL connections only")
        if options["column_policy"].uses_approval() and not options["approvers"]:
            raise ConfigError(
                join(path, "approvers"), "a column policy is set to approve: name the groups that approve"
            )

    def __init__(self, options, context):
        columns = [
            pattern if hasattr(pattern, "search") else masking.re.compile(pattern, masking.re.I)
            for pattern in options["columns"]
        ]
        self.masker = masking.Masker(options["style"], columns)
        self.exempt_groups = options["exempt_groups"]
        self.guard = None
        self.approval_rule = None
        self.broker = None
        sensitive = dict(options["sensitive_columns_file"] or {})
        sensitive.update(options["sensitive_columns"])
        target = getattr(getattr(context.connection, "settings", None), "target", None)
        if sensitive and target is not None:
            from hoopgw.postgres import guard

            self.guard = guard.ColumnGuard(
                sensitive,
                columns,
                options["column_policy"],
                guard.target_fetcher(context.reactor, target),
                context.reactor.seconds,
                options["catalog_refresh"],
            )
            from_file = options["sensitive_columns_file"] or {}
            self.guard.origins = {
                "%s.%s.%s" % key[1:]: getattr(from_file, "origin", "configured")
                for key in from_file
                if key not in options["sensitive_columns"]
            }
        if sensitive:
            # A constraint violation's detail quoting the key of a
            # sensitive column is withheld, whatever the column's name.
            self.masker.detail_names = frozenset(name[3] for name in sensitive)
        if sensitive and options["column_policy"].uses_approval():
            from hoopgw.approvals import ApprovalRule

            self.approval_rule = ApprovalRule(
                name=APPROVAL_RULE,
                approvers=options["approvers"],
                timeout=options["approval_timeout"],
                reason="a statement uses a sensitive column in a way this connection's column policy "
                "lets through only with approval",
            )
            self.broker = context.approvals
            if self.broker is not None:
                self.broker.register(context.connection.name, self.approval_rule)

    def _exempt(self, session):
        state = session.metadata.get("mask")
        if state is None:
            groups = session.identity.groups if session.identity is not None else frozenset()
            found = sorted(groups & self.exempt_groups)
            state = session.metadata["mask"] = {"exempt": found[0] if found else None}
        return state["exempt"]

    def session_started(self, session):
        if session.identity is not None:
            exempt = self._exempt(session)
            if exempt:
                session.attributes["mask_exempt"] = exempt
        if self.guard is not None:
            return self.guard.session_started(session)
        return None

    def command_received(self, session, command):
        if command.kind == "function-call" and self.guard is not None and not self._exempt(session):
            return self._function_call(command)
        # Binary COPY output carries no column types: it cannot be checked.
        if command.kind != "sql" or self._exempt(session):
            return None
        facts = sqlfacts.facts_of(session, command)
        if "COPY BINARY" in facts.labels and "COPY TO" in facts.kinds:
            return Decision.deny(
                "binary COPY output cannot be checked for card numbers; copy in text or CSV format",
                rule="mask:binary-copy",
            )
        if self.guard is None:
            return None
        try:
            outcome = self.guard.check(session, command)
        except Exception as error:
            return self._unavailable(error)
        if hasattr(outcome, "addCallbacks"):
            return outcome.addCallbacks(self._verdict, self._unavailable, callbackArgs=(session, command))
        return self._verdict(outcome, session, command)

    def _function_call(self, command):
        """
        A fastpath call names its function by OID: one whose body reads a
        sensitive relation is refused as it would be in a statement.
        """
        problem = self.guard.function_problem(command.facts.get("function_oid"))
        if problem is None:
            return None
        command.facts["sensitive_columns"] = {"decision": "deny", "unresolved": [problem]}
        return Decision.deny(problem, rule="mask:unresolved")

    def _unavailable(self, error):
        reason = getattr(error, "value", error)
        return Decision.deny(str(reason), rule="mask:catalog")

    def _verdict(self, outcome, session, command):
        """
        The decision on a statement from the column policy's verdict; the
        evidence goes into the command's facts, for the record.
        """
        analysis, verdict = outcome
        command.metadata["mask.verdict"] = verdict
        if analysis.sensitive() or verdict.findings:
            command.facts["sensitive_columns"] = columnpolicy.evidence(analysis, verdict)
        action = verdict.action
        if action == columnpolicy.DENY:
            finding = verdict.first(columnpolicy.DENY)
            others = sum(1 for item in verdict.findings if item.action == columnpolicy.DENY) - 1
            reason = finding.reason + (" (and %d more reason%s)" % (others, "s" if others > 1 else "") if others else "")
            return Decision.deny(reason, rule=finding.rule)
        if action == columnpolicy.APPROVE:
            if self.broker is None:
                return Decision.deny(
                    "%s; it needs approval and the gateway has no approvals broker"
                    % (verdict.first(columnpolicy.APPROVE).reason,),
                    rule=verdict.first(columnpolicy.APPROVE).rule,
                )
            return self.broker.decide(session, command, self.approval_rule)
        return None

    def command_finished(self, session, command):
        if self.guard is not None:
            self.guard.finished(session, command)

    def result_received(self, session, command, chunk):
        exempt = self._exempt(session)
        kind = chunk.kind
        if kind == "rows":
            self._rows(session, command, chunk, exempt)
        elif kind == "stream" or kind == "body":
            self._stream(session, command, chunk, exempt)
        elif kind == "message":
            if exempt:
                self._count_unmasked(command, exempt, sum(cards.mask_text(str(value))[1] for value in chunk.fields.values()))
            else:
                chunk.masked += self.masker.fields(chunk.fields, chunk.quotes)

    def _count_unmasked(self, command, exempt, count):
        if command is not None and count:
            command.outcome["unmasked"] = command.outcome.get("unmasked", 0) + count
            command.outcome["mask_exempt"] = exempt

    def explain(self, session, command):
        exempt = self._exempt(session)
        if exempt:
            return "no masking: %s is in the exempt group %s; results are recorded as unmasked" % (
                session.identity.subject,
                exempt,
            )
        if self.guard is not None and command.kind == "sql":
            return self._explain_columns(session, command)
        decision = self.command_received(session, command)
        if decision is not None:
            return "deny: %s" % (decision.reason,)
        what = "masks card numbers in every result (%s)" % (self.masker.style,)
        if command.kind == "sql":
            facts = sqlfacts.facts_of(session, command)
            if not facts.error:
                names = self._sensitive_names(facts)
                replaced = [
                    name or "column %d" % (index + 1,)
                    for index, (name, sources, star) in enumerate(facts.outputs)
                    if not star and (sources & names or name in names)
                ]
                if replaced:
                    what += "; replaces whole the values of %s" % (", ".join(replaced),)
                if any(star for _, _, star in facts.outputs):
                    what += "; columns from * are checked by name when the rows arrive"
        return what

    def _explain_columns(self, session, command):
        """
        What the column policy decides, and the lineage of every output
        column (C{hoopgw explain} reads the catalog first).
        """
        facts = sqlfacts.facts_of(session, command)
        if "COPY BINARY" in facts.labels and "COPY TO" in facts.kinds:
            return "deny: binary COPY output cannot be checked for card numbers; copy in text or CSV format"
        if self.guard.catalog is None:
            return "deny: the target's catalog could not be read (%s), so no statement is let through" % (
                self.guard.error,
            )
        analysis, verdict = self.guard.check_now(session, command)
        lines = []
        action = verdict.action
        if action == columnpolicy.DENY:
            lines.append("deny: %s" % (verdict.first(columnpolicy.DENY).reason,))
        elif action == columnpolicy.APPROVE:
            lines.append("needs approval: %s" % (verdict.first(columnpolicy.APPROVE).reason,))
        else:
            lines.append("allow; masks card numbers in every result (%s)" % (self.masker.style,))
        for index, output in enumerate(analysis.outputs or ()):
            sources = sorted(output.flows, key=lambda flow: (flow.column, flow.via))
            described = ", ".join(
                "%s%s%s" % (
                    flow.column,
                    " [%s]" % (flow.kind,) if flow.kind else "",
                    " via %s" % (" -> ".join(flow.via),) if flow.via else "",
                )
                for flow in sources
            ) or "no column (a constant or an expression of none)"
            shown = verdict.positions.get(index)
            shown = {"pan": "; shown masked", "sad": "; removed"}.get(shown, "")
            lines.append("    column %d %s <- %s%s" % (index + 1, output.name or "?", described, shown))
        for use in analysis.uses:
            lines.append("    %s use of %s in %s%s" % (
                use.use, use.flow.column, use.clause, " via %s" % (" -> ".join(use.flow.via),) if use.flow.via else ""))
        for finding in verdict.findings:
            if finding.action != columnpolicy.ALLOW:
                lines.append("    %s (%s): %s" % (finding.action, finding.rule, finding.reason))
        for column in self.guard.missing:
            lines.append("    note: the sensitive column %s is not in the target's catalog" % (column,))
        return "\n".join(lines)

    # Rows.

    def _rows(self, session, command, chunk, exempt):
        if exempt:
            if cards.might_hold_pan(chunk.data):
                self._count_unmasked(command, exempt, sum(self.masker.text(value)[1] for row in chunk.rows for value in row if value is not None))
            return
        replace, in_place, opaque, forced = self._plan(session, command, chunk)
        if in_place and not replace and chunk.locate is not None and not chunk.rows_changed:
            data, count = self.masker.rows_in_place(chunk.data, chunk.locate)
            if count:
                chunk.replace_data(data)
                chunk.masked += count
            return
        if not replace and not forced and not opaque and not cards.might_hold_pan(chunk.data):
            return
        changed, masked, withheld = self.masker.rows(
            chunk.rows, chunk.kinds, chunk.decoders, chunk.replaceable, replace, forced
        )
        if changed:
            chunk.rows_changed = True
            chunk.masked += masked
            chunk.withheld += withheld

    def _plan(self, session, command, chunk):
        """
        For this result's columns: which are replaced whole, whether the
        batch can be masked in place (every value text), and whether some
        values must be decoded to be checked at all.
        """
        # What the column analysis of this very command found: statements
        # that share their facts (below) may resolve to other columns
        # (another search path, another cursor), so it is part of the key.
        positions = {}
        verdict = command.metadata.get("mask.verdict") if command is not None else None
        if verdict is not None and verdict.positions:
            try:
                positions = verdict.result_positions(len(chunk.columns))
            except ValueError as error:
                raise masking.MaskingError(str(error))
        key = (
            "mask.plan",
            id(self),
            tuple(chunk.columns),
            tuple(chunk.kinds),
            tuple(sorted(positions.items())),
        )
        # Statements that differ only in constants share their facts, and
        # so their plan.
        if command is not None and command.kind == "sql":
            cache = sqlfacts.facts_of(session, command).memo
        else:
            cache = session.metadata
        found = cache.get(key)
        if found is not None:
            return found
        replace = frozenset(self._sensitive_positions(session, command, chunk.columns))
        replace = replace | {index for index, kind in positions.items() if kind == "sad"}
        forced = frozenset(index for index, kind in positions.items() if kind == "pan")
        # Text values can be masked in place; numbers and opaque values
        # (arrays, records, bytes) must be decoded to be checked.
        kinds = chunk.kinds
        text = [index >= len(kinds) or kinds[index] == TEXT for index in range(len(chunk.columns))]
        in_place = bool(chunk.columns) and all(text) and not forced
        opaque = not all(text) or not chunk.columns
        plan = cache[key] = (replace, in_place, opaque, forced)
        return plan

    def _sensitive_positions(self, session, command, columns):
        masker = self.masker
        if not masker.columns:
            return ()
        positions = {index for index, name in enumerate(columns) if masker.sensitive(name)}
        if command is None or command.kind != "sql":
            return positions
        facts = sqlfacts.facts_of(session, command)
        if facts.error:
            return positions
        key = ("mask.positions", id(self.masker), tuple(columns))
        found = facts.memo.get(key)
        if found is not None:
            return found
        facts.memo[key] = positions = self._output_positions(facts, columns, positions)
        return positions

    def _output_positions(self, facts, columns, positions):
        names = self._sensitive_names(facts)
        if not names:
            return positions
        positions.update(index for index, name in enumerate(columns) if name in names)
        outputs = facts.outputs
        stars = [index for index, entry in enumerate(outputs) if entry[2]]
        for index, (name, sources, star) in enumerate(outputs):
            if star:
                continue
            if stars and index > stars[0]:
                if index < stars[-1]:
                    continue
                position = len(columns) - (len(outputs) - index)
            else:
                position = index
            if 0 <= position < len(columns) and (sources & names or name in names):
                positions.add(position)
        return positions

    def _sensitive_names(self, facts):
        """
        The names that carry a sensitive column's values: the columns
        themselves and every alias they flow into.
        """
        memo = facts.memo.get(("mask", id(self.masker)))
        if memo is not None:
            return memo
        masker = self.masker
        names = {name for name in facts.columns if masker.sensitive(name)}
        names.update(name for name, _ in facts.aliases if masker.sensitive(name))
        changed = bool(names)
        while changed:
            changed = False
            for name, sources in facts.aliases:
                if name not in names and sources & names:
                    names.add(name)
                    changed = True
        names = frozenset(names)
        facts.memo[("mask", id(self.masker))] = names
        return names

    # Streams.

    def _stream_masker(self, command, chunk):
        """
        A COPY TO whose columns the analysis knows is masked column by
        column; any other stream as text.
        """
        verdict = command.metadata.get("mask.verdict") if command is not None else None
        if chunk.stream == "copy" and verdict is not None and verdict.copy is not None and verdict.positions:
            options = verdict.copy
            csv = str(options.get("format") or "text").lower() == "csv"
            header = options.get("header")
            return masking.CopyColumnMasker(
                self.masker,
                # Placed in each row: outputs of unknown width before a
                # sensitive column shift it.
                verdict.result_positions,
                csv=csv,
                delimiter=options.get("delimiter"),
                quote=options.get("quote"),
                header=header is True or str(header).lower() in ("true", "on", "1", "match"),
            )
        return masking.StreamMasker(self.masker)

    def _stream(self, session, command, chunk, exempt):
        if chunk.kind_of(0) != TEXT:
            raise masking.MaskingError("a binary %s stream cannot be checked for card numbers" % (chunk.stream,))
        if exempt:
            self._count_unmasked(command, exempt, self.masker.text(chunk.data)[1])
            return
        if chunk.kind == "body":
            if "json" in (chunk.fields or {}).get("content_type", ""):
                chunk.data, count = self.masker.json_document(chunk.data)
            else:
                chunk.data, count = self.masker.text(chunk.data)
            chunk.masked += count
            return
        state = command.metadata if command is not None else session.metadata
        key = "mask.stream.%s" % (chunk.stream,)
        stream = state.get(key)
        if stream is None:
            stream = state[key] = self._stream_masker(command, chunk)
        chunk.data, count = stream.feed(chunk.data, chunk.final)
        chunk.masked += count
        if chunk.final:
            del state[key]


factory = AddonFactory(Mask)
