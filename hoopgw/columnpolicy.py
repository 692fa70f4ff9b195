"""
What may happen to a sensitive column (card numbers, sensitive
authentication data), given a statement's column lineage
(L{hoopgw.postgres.lineage}): the C{sensitive_columns} configuration, the
per-kind policies, and the verdict on one analysis, with the evidence
that names every column and expression it rests on.
"""

import os

import attr
import yaml

from hoopgw import options as o
from hoopgw.options import ConfigError, join
from hoopgw.postgres import lineage


ALLOW = "allow"
DENY = "deny"
APPROVE = "approve"
ACTIONS = (ALLOW, DENY, APPROVE)

# The policy keys, their defaults, and what each governs.
POLICY_OPTIONS = (
    o.Option("transform", o.choice(*ACTIONS), DENY,
             "A card number (pan) that leaves transformed: any function, operator, cast, aggregate or "
             "whole-row value applied to it in the output, or copied into a column that is not a pan column."),
    o.Option("equality", o.choice(*ACTIONS), ALLOW,
             "A pan column in an equality test: WHERE pan = ..., IN, IS NULL, JOIN ON a.pan = b.pan, count(pan), "
             "GROUP BY pan, DISTINCT ON (pan), PARTITION BY pan."),
    o.Option("pattern", o.choice(*ACTIONS), DENY, "A pan column matched by LIKE, ILIKE, SIMILAR TO or ~."),
    o.Option("range", o.choice(*ACTIONS), DENY, "A pan column in a range test: <, >, BETWEEN."),
    o.Option("expression", o.choice(*ACTIONS), DENY,
             "A pan column transformed inside a predicate, an ordering or a LIMIT (substr(pan, 1, 1) = '4')."),
    o.Option("sort", o.choice(*ACTIONS), DENY,
             "A pan column in ORDER BY (of a query, a window or an aggregate): it ranks card numbers, and with "
             "values the client inserts itself it is a range oracle."),
    o.Option("sad_predicates", o.choice(*ACTIONS), DENY,
             "Any use of a sad column outside the output (WHERE cvv = ..., ORDER BY cvv): an oracle on it."),
    o.Option("ddl", o.choice(*ACTIONS), DENY,
             "DDL that names a relation holding sensitive columns (ALTER TABLE, CREATE TRIGGER, CREATE RULE, "
             "CREATE INDEX ...): it could rename a column out of the configuration or hang code on it."),
)


def _kind(value, path):
    value = o.string(value, path)
    if value not in lineage.KINDS:
        raise ConfigError(path, "expected pan or sad, got %r" % (value,))
    return value


def sensitive_columns(value, path):
    """
    C{{"database.schema.table.column": pan|sad}} (or C{schema.table.column}
    for the connection's database) as C{{(database or None, schema, table,
    column): kind}}.
    """
    value = o.mapping(value, path)
    columns = {}
    for name, kind in value.items():
        where = join(path, name)
        parts = str(name).split(".")
        if len(parts) == 3:
            parts = [None] + parts
        if len(parts) != 4 or not all(parts[1:]):
            raise ConfigError(
                where, "expected DATABASE.SCHEMA.TABLE.COLUMN (or SCHEMA.TABLE.COLUMN), e.g. payments.public.cards.pan"
            )
        columns[tuple(parts)] = _kind(kind, where)
    return columns


def sensitive_columns_file(value, path):
    """
    A YAML file holding a C{sensitive_columns:} mapping (what C{hoopgw
    discover --write} writes), read when the configuration is loaded.
    """
    resolved = o.resolve(o.string(value, path))
    try:
        with open(resolved, encoding="utf-8") as handle:
            document = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(path, "cannot read %s: %s" % (resolved, error.strerror))
    except yaml.YAMLError as error:
        raise ConfigError(path, "%s is not valid YAML: %s" % (resolved, error))
    if not isinstance(document, dict) or "sensitive_columns" not in document:
        raise ConfigError(path, "%s holds no sensitive_columns mapping" % (resolved,))
    columns = FileColumns(sensitive_columns(document["sensitive_columns"] or {}, "%s (%s)" % (path, os.path.basename(resolved))))
    # What hoopgw discover wrote says so in its first line; the record
    # then says the columns were discovered, not typed by someone.
    with open(resolved, encoding="utf-8") as handle:
        columns.origin = "discovered" if DISCOVERED_MARK in handle.readline() else "sensitive_columns_file"
    return columns


# The first line of a file hoopgw discover --write writes.
DISCOVERED_MARK = "Proposed by hoopgw discover"


class FileColumns(dict):
    """
    The sensitive columns read from a C{sensitive_columns_file}, with
    C{origin}: how they were found (C{discovered} when C{hoopgw discover}
    wrote the file).
    """

    origin = "sensitive_columns_file"


@attr.s(frozen=True)
class Policy:
    transform = attr.ib(default=DENY)
    equality = attr.ib(default=ALLOW)
    pattern = attr.ib(default=DENY)
    range = attr.ib(default=DENY)
    expression = attr.ib(default=DENY)
    sort = attr.ib(default=DENY)
    sad_predicates = attr.ib(default=DENY)
    ddl = attr.ib(default=DENY)

    @classmethod
    def parse(cls, value, path):
        return cls(**o.parse_options(POLICY_OPTIONS, value or {}, path))

    def uses_approval(self):
        return APPROVE in attr.astuple(self)


@attr.s(frozen=True, slots=True)
class Finding:
    """
    One thing a statement does with a sensitive column, and the policy's
    answer: C{action} is L{ALLOW}, L{DENY} or L{APPROVE}.
    """

    action = attr.ib()
    rule = attr.ib()
    reason = attr.ib()
    column = attr.ib()
    expression = attr.ib(default=None)

    def to_json(self):
        entry = {"action": self.action, "rule": self.rule, "column": self.column}
        if self.expression:
            entry["expression"] = self.expression
        return entry


@attr.s(slots=True)
class Verdict:
    """
    @ivar findings: every L{Finding}.
    @ivar positions: C{{output position: kind}} of the columns that leave
        as they are: pan masked, sad removed.
    @ivar copy: for COPY TO, its options.
    @ivar widths: the width of each output column: 1, or None when
        unknown (C{*} over a relation the catalog lacks).
    """

    findings = attr.ib(factory=list)
    positions = attr.ib(factory=dict)
    copy = attr.ib(default=None)
    widths = attr.ib(default=None)

    def result_positions(self, count):
        """
        L{positions} in a result of C{count} columns: counted from the
        start before the first output of unknown width, from the end after
        the last one.

        @raise ValueError: when a position cannot be placed.
        """
        widths = self.widths or ()
        unknown = [index for index, width in enumerate(widths) if width is None]
        if not unknown:
            if count != len(widths):
                raise ValueError("the result has %d columns where the statement's analysis found %d" % (
                    count, len(widths)))
            return self.positions
        placed = {}
        for index, kind in self.positions.items():
            if index < unknown[0]:
                placed[index] = kind
            elif index > unknown[-1]:
                placed[count - (len(widths) - index)] = kind
            else:
                raise ValueError("a sensitive column lies between columns the analysis cannot count")
        return placed

    @property
    def action(self):
        actions = {finding.action for finding in self.findings}
        if DENY in actions:
            return DENY
        if APPROVE in actions:
            return APPROVE
        return ALLOW

    def first(self, action):
        for finding in self.findings:
            if finding.action == action:
                return finding
        return None


def _where(output, index):
    return "output column %d (%s)" % (index + 1, output.name or "?")


def evaluate(analysis, policy):
    """
    The verdict of C{policy} on one L{lineage.Analysis}.
    """
    verdict = Verdict(copy=analysis.copy)
    findings = verdict.findings
    for sentence in analysis.unresolved:
        findings.append(Finding(DENY, "mask:unresolved", sentence, None))
    if analysis.explain_only:
        return verdict
    for index, output in enumerate(analysis.outputs or ()):
        sensitive = output.sensitive()
        if not sensitive:
            continue
        where = _where(output, index)
        if output.width is None:
            findings.append(
                Finding(DENY, "mask:unresolved", "the columns of %s cannot be counted, and they carry %s"
                        % (where, sensitive[0].column), sensitive[0].column)
            )
            continue
        plain = {flow.kind for flow in sensitive if not flow.via}
        for flow in sensitive:
            if not flow.via:
                continue
            expression = flow.via[-1]
            if flow.kind == lineage.SAD:
                findings.append(Finding(
                    DENY, "mask:sad",
                    "%s is sensitive authentication data, which never leaves in any form; %s is %s"
                    % (flow.column, where, expression), flow.column, expression))
            else:
                findings.append(Finding(
                    policy.transform, "mask:pan-transform",
                    "%s is a card number, which may leave only as a plain column (masked); %s is %s"
                    % (flow.column, where, expression), flow.column, expression))
        # A column of both kinds (a UNION) is removed whole.
        if lineage.SAD in plain:
            verdict.positions[index] = lineage.SAD
        elif lineage.PAN in plain:
            verdict.positions[index] = lineage.PAN
    if analysis.kind == "ExplainStmt":
        # EXPLAIN ANALYZE runs the statement (its transformations are
        # refused above) but returns its plan, not its rows.
        verdict.positions = {}
    elif analysis.outputs is not None:
        verdict.widths = [output.width for output in analysis.outputs]
    for use in analysis.uses:
        flow = use.flow
        expression = flow.via[-1] if flow.via else None
        if flow.kind == lineage.SAD:
            action = policy.sad_predicates
            reason = "%s is sensitive authentication data; using it in %s (%s) would reveal it" % (
                flow.column, use.clause, use.use)
        else:
            action = getattr(policy, use.use)
            reason = "%s is a card number; %s %s use of it in %s%s is %s by this connection's policy" % (
                flow.column,
                "an" if use.use[0] in "aeiou" else "a",
                use.use,
                use.clause,
                " (%s)" % (expression,) if expression else "",
                {ALLOW: "allowed", DENY: "refused", APPROVE: "subject to approval"}[action],
            )
        findings.append(Finding(action, "mask:%s" % (use.use if flow.kind == lineage.PAN else "sad-predicate",),
                                reason, flow.column, expression))
    for write in analysis.writes:
        flow = write.flow
        if not flow.via and write.target_kind == flow.kind:
            findings.append(Finding(ALLOW, "mask:write", "%s copied into %s, a %s column too" % (
                flow.column, write.target, flow.kind), flow.column))
            continue
        expression = flow.via[-1] if flow.via else None
        action = DENY if flow.kind == lineage.SAD else policy.transform
        findings.append(Finding(
            action, "mask:copy-out",
            "%s would be copied%s into %s, which is not a %s column, and could then be read unmasked"
            % (flow.column, " as %s" % (expression,) if expression else "", write.target, flow.kind),
            flow.column, expression))
    for relation in analysis.ddl:
        findings.append(Finding(
            policy.ddl, "mask:ddl",
            "%s holds sensitive columns; DDL on it could carry them past the gateway" % (relation,), relation))
    if verdict.copy is not None and verdict.positions:
        problem = copy_problem(verdict.copy)
        if problem:
            column = analysis.outputs[min(verdict.positions)].sensitive()[0].column
            findings.append(Finding(DENY, "mask:copy-format", problem, column))
    return verdict


# What a COPY delimiter or quote may be for the stream to be cut into
# columns reliably: not a digit or letter (card numbers and CVVs are
# digits), not a space or dash (they separate a card number's groups),
# not the backslash escape, not the replacement's "*".
_SEPARATOR_CHARACTERS = frozenset("\t!\"#$%&'()+,./:;<=>?@[]^_`{|}~")


def copy_problem(options):
    """
    Why a COPY TO with these options cannot be masked per column, or None.
    """
    format_name = str(options.get("format") or "text").lower()
    if format_name == "binary":
        return "binary COPY output cannot be masked per column; copy in text or CSV format"
    if format_name not in ("text", "csv"):
        return "COPY format %s cannot be masked per column" % (format_name,)
    for name in ("delimiter", "quote"):
        value = options.get(name)
        if value is not None and (not isinstance(value, str) or value not in _SEPARATOR_CHARACTERS):
            return "a COPY %s other than punctuation or a tab cannot be masked per column" % (name,)
    quote = options.get("quote")
    escape = options.get("escape")
    if escape is not None and escape != (quote or '"'):
        return "a COPY escape other than the quote character cannot be masked per column"
    if options.get("to") != "stdout":
        return "COPY of sensitive columns to a file or a program cannot be masked; copy TO STDOUT"
    return None


def evidence(analysis, verdict):
    """
    The facts the record keeps: the sensitive columns each output carries
    and how, their other uses, and every finding.
    """
    outputs = []
    for index, output in enumerate(analysis.outputs or ()):
        sensitive = output.sensitive()
        if sensitive:
            entry = {"position": index + 1, "name": output.name, "from": [lineage._flow_json(flow) for flow in sensitive]}
            shown = verdict.positions.get(index)
            if shown:
                entry["shown"] = "masked" if shown == lineage.PAN else "removed"
            outputs.append(entry)
    result = {"decision": verdict.action}
    if outputs:
        result["outputs"] = outputs
    if analysis.uses:
        result["uses"] = [use.to_json() for use in analysis.uses]
    if analysis.writes:
        result["writes"] = [write.to_json() for write in analysis.writes]
    if analysis.unresolved:
        result["unresolved"] = list(analysis.unresolved)
    if verdict.findings:
        result["findings"] = [finding.to_json() for finding in verdict.findings]
    return result
