"""
Column lineage: where every value a SQL statement returns (or writes, or
tests) comes from, as C{schema.table.column} of the target's catalog,
followed through aliases, joins, subqueries, CTEs, set operations, C{*},
whole-row references, views and the search path.  Pure: a pglast parse
tree and a L{Catalog} snapshot in, an L{Analysis} out; the mask addon
decides what to do with it.

A value is described by its L{Flow}s: the base column it comes from, that
column's sensitivity kind, and C{via}, the expressions applied on the
way (empty for a plain projection).  Whatever the analysis cannot follow
is named in L{Analysis.unresolved}, and the caller fails closed on it.
"""

import re

import attr
import orjson
from pglast import parser


PAN = "pan"
SAD = "sad"
KINDS = (PAN, SAD)

# How a sensitive column is used outside the output.
EQUALITY = "equality"
PATTERN = "pattern"
RANGE = "range"
EXPRESSION = "expression"
SORT = "sort"
USES = (EQUALITY, PATTERN, RANGE, EXPRESSION, SORT)

# Catalog relations that hold samples of any column's values.
STATISTICS_RELATIONS = frozenset(
    {"pg_stats", "pg_statistic", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic_ext_data"}
)
# Built-in functions that run SQL given as text, or read a whole table or
# cursor by name: what they read cannot be followed.
DYNAMIC_FUNCTIONS = frozenset(
    {
        "query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema", "table_to_xml",
        "table_to_xml_and_xmlschema", "table_to_xmlschema", "cursor_to_xml", "cursor_to_xmlschema",
        "schema_to_xml", "schema_to_xml_and_xmlschema", "schema_to_xmlschema", "database_to_xml",
        "database_to_xml_and_xmlschema", "database_to_xmlschema", "ts_stat", "dblink", "dblink_exec",
        "dblink_open", "dblink_fetch", "dblink_send_query", "dblink_get_result", "pg_mcv_list_items",
    }
)
# Built-in functions that read the server's files (a table's data files
# among them) or its write-ahead log, where every row's values are.
READS_FILES = frozenset(
    {
        "pg_read_file", "pg_read_binary_file", "lo_import", "pg_logical_slot_get_changes",
        "pg_logical_slot_peek_changes", "pg_logical_slot_get_binary_changes", "pg_logical_slot_peek_binary_changes",
    }
)
# Languages whose code the gateway reads: SQL, and PL/pgSQL without
# dynamic SQL.  Built-in (internal) and C functions only see their
# arguments (those that read tables by name are listed above).
_FOLLOWED_LANGUAGES = frozenset({"sql", "plpgsql"})
_TRUSTED_LANGUAGES = frozenset({"internal", "c"})
_CALL = re.compile(r"(?<![\w$])([a-z_][\w$]*)\s*\(")

# Aggregates whose result says nothing of their argument's value.
_COUNTING = frozenset({"count"})
# Casts that keep a text value as it is.
_PLAIN_CASTS = frozenset({"text", "varchar"})

_EQUALITY_OPERATORS = frozenset({"=", "<>", "!=", "IS DISTINCT FROM", "IS NOT DISTINCT FROM"})
_RANGE_OPERATORS = frozenset({"<", ">", "<=", ">="})
_PATTERN_OPERATORS = frozenset({"~", "~*", "!~", "!~*", "~~", "~~*", "!~~", "!~~*", "^@", "@@"})
_PATTERN_KINDS = frozenset({"AEXPR_LIKE", "AEXPR_ILIKE", "AEXPR_SIMILAR"})
_RANGE_KINDS = frozenset({"AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM"})
_EQUALITY_KINDS = frozenset({"AEXPR_IN", "AEXPR_DISTINCT", "AEXPR_NOT_DISTINCT", "AEXPR_NULLIF"})

MAX_DEPTH = 64


class Unresolvable(Exception):
    """
    The statement nests or refers deeper than the analysis follows.
    """


@attr.s(frozen=True, slots=True)
class Flow:
    """
    One base column's value, as it reaches a place in a statement.

    @ivar column: C{schema.table.column}.
    @ivar kind: L{PAN}, L{SAD} or None (not sensitive).
    @ivar via: the expressions applied to it on the way, innermost first;
        empty for a plain projection.
    """

    column = attr.ib()
    kind = attr.ib()
    via = attr.ib(default=())

    def applied(self, description):
        return Flow(self.column, self.kind, self.via + (description,))

    def describe(self):
        return self.via[-1] if self.via else self.column


@attr.s(frozen=True, slots=True)
class Output:
    """
    One column of what the client gets.

    @ivar name: its name, as the target will call it (None if unknown).
    @ivar flows: a frozenset of L{Flow}.
    @ivar width: 1, or None for a column list whose width the analysis
        does not know (C{*} over a relation missing from the catalog).
    """

    name = attr.ib()
    flows = attr.ib(default=frozenset())
    width = attr.ib(default=1)

    def sensitive(self):
        return sorted((flow for flow in self.flows if flow.kind), key=_flow_key)

    def to_json(self):
        entry = {"name": self.name, "from": [_flow_json(flow) for flow in sorted(self.flows, key=_flow_key)]}
        if self.width is None:
            entry["width"] = "unknown"
        return entry


@attr.s(frozen=True, slots=True)
class Use:
    """
    A sensitive column used outside the output: in a predicate, a join
    condition, an ordering, a LIMIT.
    """

    flow = attr.ib()
    use = attr.ib()
    clause = attr.ib()

    def to_json(self):
        return dict(_flow_json(self.flow), use=self.use, clause=self.clause)


@attr.s(frozen=True, slots=True)
class Write:
    """
    A value written into a table column (INSERT ... SELECT, UPDATE SET,
    CREATE TABLE AS): C{target} is C{schema.table.column}, or
    C{schema.table} for a new table.
    """

    target = attr.ib()
    target_kind = attr.ib()
    flow = attr.ib()

    def to_json(self):
        return dict(_flow_json(self.flow), into=self.target)


@attr.s(slots=True)
class Analysis:
    """
    What one statement does with columns.

    @ivar outputs: the columns the client gets, a list of L{Output}, or
        None when the statement returns no rows of table data.
    @ivar uses: a list of L{Use}.
    @ivar writes: a list of L{Write} carrying values from other columns.
    @ivar unresolved: sentences saying what could not be followed.
    @ivar copy: for COPY TO: its options (C{format}, C{delimiter}, C{null}).
    @ivar cursor: for DECLARE, the cursor's name (its query's outputs are
        the ones a FETCH returns); for FETCH, the cursor fetched.
    @ivar prepared: for PREPARE, the name; for EXECUTE, the name run.
    @ivar search_path: for SET search_path, the new path (a tuple), or
        C{()} for RESET.
    @ivar ddl: for DDL, the relations with sensitive columns it names.
    @ivar explain_only: the statement is a plain EXPLAIN (nothing runs).
    @ivar kind: the statement's parse tree node (C{"SelectStmt"}, ...).
    @ivar unknown: relations named that the catalog does not have.
    """

    outputs = attr.ib(default=None)
    uses = attr.ib(factory=list)
    writes = attr.ib(factory=list)
    unresolved = attr.ib(factory=list)
    copy = attr.ib(default=None)
    cursor = attr.ib(default=None)
    prepared = attr.ib(default=None)
    search_path = attr.ib(default=None)
    ddl = attr.ib(factory=list)
    explain_only = attr.ib(default=False)
    kind = attr.ib(default=None)
    unknown = attr.ib(factory=set)

    def sensitive(self):
        """
        Whether any sensitive column is involved at all.
        """
        return bool(
            self.unresolved
            or self.uses
            or self.writes
            or self.ddl
            or any(output.sensitive() for output in self.outputs or ())
        )

    def to_json(self):
        result = {}
        if self.outputs is not None:
            result["outputs"] = [output.to_json() for output in self.outputs]
        if self.uses:
            result["uses"] = [use.to_json() for use in self.uses]
        if self.writes:
            result["writes"] = [write.to_json() for write in self.writes]
        if self.unresolved:
            result["unresolved"] = list(self.unresolved)
        if self.ddl:
            result["ddl"] = sorted(self.ddl)
        return result


def _flow_key(flow):
    return (flow.column, flow.via)


def _flow_json(flow):
    entry = {"column": flow.column}
    if flow.kind:
        entry["kind"] = flow.kind
    if flow.via:
        entry["via"] = list(flow.via)
    return entry


# The catalog.


@attr.s(frozen=True, slots=True)
class Relation:
    """
    A table, view, materialized view or foreign table of the target.

    @ivar kind: C{pg_class.relkind}.
    @ivar columns: the column names, in order.
    @ivar definition: for a view or materialized view, its query.
    @ivar generated: C{{column: expression}} for generated columns.
    """

    schema = attr.ib()
    name = attr.ib()
    kind = attr.ib()
    columns = attr.ib()
    definition = attr.ib(default=None)
    generated = attr.ib(factory=dict)

    @property
    def qualified(self):
        return "%s.%s" % (self.schema, self.name)


@attr.s(frozen=True, slots=True)
class Function:
    schema = attr.ib()
    name = attr.ib()
    language = attr.ib()
    body = attr.ib()
    oid = attr.ib(default=None)


class Catalog:
    """
    A snapshot of the target's catalog, with the sensitive columns of the
    connection marked on it.

    @ivar database: the target database's name.
    @ivar search_path: the schemas unqualified names resolve in.
    @ivar relations: C{{(schema, name): Relation}}.
    @ivar functions: C{{name: [Function]}} for functions outside
        pg_catalog.
    @ivar kinds: C{{"schema.table.column": kind}}.
    @ivar version: a number that changes with every snapshot.
    """

    def __init__(self, database, search_path, relations, functions, kinds, version=0):
        self.database = database
        self.search_path = tuple(search_path)
        self.relations = {(relation.schema, relation.name): relation for relation in relations}
        self.functions = {}
        self.function_oids = {}
        for function in functions:
            self.functions.setdefault(function.name, []).append(function)
            if function.oid is not None:
                self.function_oids[function.oid] = function
        self.kinds = dict(kinds)
        # How each sensitive column was found: "configured" or "name pattern".
        self.sources = {}
        # The role the gateway logs in as ("$user" in a search path).
        self.user = None
        self.version = version
        self._views = {}
        self._sensitive_relations = None
        self._function_problems = {}

    @classmethod
    def from_json(cls, document, sensitive, patterns=(), version=0):
        """
        A snapshot from the document L{CATALOG_SQL} returns.

        @param sensitive: C{{(database or None, schema, table, column): kind}}.
        @param patterns: compiled regular expressions for column names
            whose values are sensitive authentication data (the name
            fallback).
        """
        database = document["database"]
        relations = []
        for entry in document.get("relations") or ():
            columns = tuple(column[0] for column in entry.get("columns") or ())
            generated = {column[0]: column[2] for column in entry.get("columns") or () if len(column) > 2 and column[2]}
            relations.append(
                Relation(entry["schema"], entry["name"], entry["kind"], columns, entry.get("definition"), generated)
            )
        functions = [
            Function(entry["schema"], entry["name"], entry.get("language"), entry.get("body") or "", entry.get("oid"))
            for entry in document.get("functions") or ()
        ]
        kinds = {}
        sources = {}
        parents = {
            (entry["schema"], entry["name"]): [tuple(parent) for parent in entry.get("parents") or ()]
            for entry in document.get("relations") or ()
        }
        for relation in relations:
            for column in relation.columns:
                kind = sensitive.get((database, relation.schema, relation.name, column)) or sensitive.get(
                    (None, relation.schema, relation.name, column)
                )
                source = "configured"
                if kind is None and relation.kind in ("r", "p", "f") and any(p.search(column) for p in patterns):
                    kind = SAD
                    source = "name pattern"
                if kind is not None:
                    kinds["%s.%s" % (relation.qualified, column)] = kind
                    sources["%s.%s" % (relation.qualified, column)] = source
        # A partition or inheritance child holds its parent's data: its
        # columns of the same names are as sensitive.
        changed = True
        while changed:
            changed = False
            for relation in relations:
                for schema, name in parents.get((relation.schema, relation.name), ()):
                    for column in relation.columns:
                        child = "%s.%s.%s" % (relation.schema, relation.name, column)
                        kind = kinds.get("%s.%s.%s" % (schema, name, column))
                        if kind is not None and kinds.get(child) != kind and kinds.get(child) != SAD:
                            kinds[child] = kind
                            sources[child] = "inherited from %s.%s" % (schema, name)
                            changed = True
        found = cls(database, document.get("search_path") or ("public",), relations, functions, kinds, version)
        found.sources = sources
        found.user = document.get("user")
        return found

    def relation(self, schema, name, search_path):
        """
        The relation C{schema.name}, or C{name} through C{search_path}.
        """
        if schema:
            return self.relations.get((schema, name))
        for entry in search_path:
            found = self.relations.get((entry, name))
            if found is not None:
                return found
        return None

    def sensitive_relations(self):
        """
        The names (bare and qualified) of the relations that hold, or show
        through their definition, a sensitive column.
        """
        if self._sensitive_relations is None:
            names = set()
            for relation in self.relations.values():
                if relation.definition is not None:
                    try:
                        columns = self.view_columns(relation)
                    except Unresolvable:
                        columns = None
                    if columns is None or any(flow.kind for flows in columns for flow in flows):
                        names.update((relation.name, relation.qualified))
                elif any(self.kinds.get("%s.%s" % (relation.qualified, column)) for column in relation.columns):
                    names.update((relation.name, relation.qualified))
            self._sensitive_relations = frozenset(names)
        return self._sensitive_relations

    def body_problem(self, body, language, seen=frozenset()):
        """
        Why code that runs inside the target (a function's or a DO
        block's body) cannot be followed, or None: it names a relation
        holding or showing sensitive columns, runs dynamic SQL, calls a
        function that runs SQL given as text or reads the server's files,
        calls a function of the target that does any of this, or is
        written in a language the gateway does not read.
        """
        language = (language or "sql").lower()
        if language in _TRUSTED_LANGUAGES:
            return None
        if language not in _FOLLOWED_LANGUAGES:
            return "is written in %s, which the gateway cannot follow" % (language,)
        lowered = body.lower()
        for name in sorted(self.sensitive_relations()):
            if re.search(r"(?<![\w$])%s(?![\w$])" % (re.escape(name.lower()),), lowered):
                return "reads %s, which holds sensitive columns" % (name,)
        if language == "plpgsql" and re.search(r"\bexecute\b", lowered):
            return "runs dynamic SQL (EXECUTE)"
        called = set(_CALL.findall(lowered))
        for name in sorted(called & (DYNAMIC_FUNCTIONS | READS_FILES)):
            return "calls %s, which reads what the gateway cannot follow" % (name,)
        if any(name.startswith("dblink") for name in called):
            return "calls dblink, which runs SQL given as text"
        for name in sorted(called - seen):
            for function in self.functions.get(name, ()):
                problem = self.function_problem(function, seen | {name})
                if problem:
                    return "calls %s.%s, which %s" % (function.schema, function.name, problem)
        return None

    def function_problem(self, function, seen=frozenset()):
        """
        L{body_problem} of one of the target's functions, remembered.
        """
        key = (function.schema, function.name, function.oid, function.body)
        if key not in self._function_problems:
            self._function_problems[key] = self.body_problem(function.body, function.language, seen | {function.name})
        return self._function_problems[key]

    def view_columns(self, relation, depth=0):
        """
        The flows of each column of a view, from its definition.

        @return: a list of frozensets of L{Flow}, or None when the
            definition cannot be read.
        """
        key = (relation.schema, relation.name)
        if key in self._views:
            found = self._views[key]
            if found is _IN_PROGRESS:
                raise Unresolvable("the view %s refers to itself" % (relation.qualified,))
            return found
        if depth > MAX_DEPTH:
            raise Unresolvable("views nest too deeply")
        self._views[key] = _IN_PROGRESS
        try:
            tree = parse(relation.definition)
            analysis = Analyzer(self, self.search_path, depth=depth + 1).statement(tree[0]) if len(tree) == 1 else None
        except Unresolvable:
            del self._views[key]
            raise
        except Exception:
            analysis = None
        columns = None
        if analysis is not None and analysis.outputs is not None and not analysis.unresolved:
            if all(output.width == 1 for output in analysis.outputs):
                columns = [output.flows for output in analysis.outputs]
        self._views[key] = columns
        return columns


_IN_PROGRESS = object()


def parse(sql):
    """
    The statements of C{sql} as pglast's JSON parse tree (dicts).
    """
    tree = orjson.loads(parser.parse_sql_json(sql))
    return [item.get("stmt") for item in tree.get("stmts", [])]


# The analysis.


class _Item:
    """
    One member of a FROM clause, as the statement sees it: a name, its
    columns with their flows in order, and whether its width is known.
    """

    __slots__ = ("name", "columns", "known", "relation", "hidden")

    def __init__(self, name, columns, known=True, relation=None):
        self.name = name
        self.columns = columns
        self.known = known
        self.relation = relation
        # Columns merged away by JOIN USING (not part of *).
        self.hidden = ()

    def column(self, name):
        for column, flows in self.columns:
            if column == name:
                return flows
        return None

    def whole_row(self):
        flows = set()
        for _, column_flows in self.columns:
            flows.update(column_flows)
        return flows


class _Scope:
    """
    The FROM items a part of a statement sees, and the scope around it
    (for correlated subqueries and LATERAL).
    """

    __slots__ = ("items", "parent", "ctes")

    def __init__(self, parent=None, ctes=None):
        self.items = []
        self.parent = parent
        self.ctes = ctes if ctes is not None else (parent.ctes if parent is not None else {})

    def find_item(self, name):
        scope = self
        while scope is not None:
            for item in scope.items:
                if item.name == name:
                    return item
            scope = scope.parent
        return None

    def find_column(self, name):
        """
        The flows of the column C{name}, searched from this scope outwards;
        None if no item has it.  An item whose columns are not known (a
        relation the catalog lacks, a function's row) may be the one that
        has it, so whatever such items carry is added to what is found
        further out.
        """
        scope = self
        unknown = frozenset()
        seen_unknown = False
        while scope is not None:
            for item in scope.items:
                flows = item.column(name)
                if flows is not None:
                    return flows | unknown
            for item in scope.items:
                if not item.known:
                    seen_unknown = True
                    unknown = unknown | frozenset(item.whole_row())
            scope = scope.parent
        return unknown if seen_unknown else None


def _name(node):
    if isinstance(node, dict) and "String" in node:
        return node["String"].get("sval", "")
    return None


def _names(nodes):
    return [_name(node) for node in nodes or ()]


def _one(node):
    """
    C{(type name, fields)} of a node C{{"Type": {...}}}.
    """
    if isinstance(node, dict) and len(node) == 1:
        ((name, inner),) = node.items()
        if isinstance(inner, dict):
            return name, inner
    return None, node


def _apply(flows, description):
    return frozenset(flow.applied(description) for flow in flows)


class Analyzer:
    """
    Follows columns through one statement.

    @param search_path: the schemas unqualified names resolve in.
    @param alternatives: other search paths the session has used; a name
        that would mean another sensitive relation under one of them is
        unresolved.
    @param named: C{{("cursor"|"prepared", name): Analysis}} of the session.
    """

    def __init__(self, catalog, search_path, alternatives=(), named=None, depth=0):
        self.catalog = catalog
        self.search_path = tuple(search_path)
        self.alternatives = alternatives
        self.named = named if named is not None else {}
        self.analysis = Analysis()
        self.depth = depth

    def _deeper(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise Unresolvable("the statement nests deeper than the gateway follows (%d levels)" % (MAX_DEPTH,))

    def unresolved(self, sentence):
        if sentence not in self.analysis.unresolved:
            self.analysis.unresolved.append(sentence)

    def use(self, flows, use, clause):
        for flow in flows:
            if flow.kind:
                self.analysis.uses.append(Use(flow, EXPRESSION if flow.via and use != EXPRESSION else use, clause))

    # Statements.

    def statement(self, node):
        """
        Analyse one statement (a top-level parse tree node).
        """
        kind, inner = _one(node)
        if self.analysis.kind is None:
            self.analysis.kind = kind
        handler = getattr(self, "_stmt_" + (kind or ""), None)
        if handler is not None:
            handler(inner)
        elif kind == "ExplainStmt":
            self._explain(inner)
        else:
            self._other(kind, inner)
        return self.analysis

    def _stmt_SelectStmt(self, inner):
        outputs = self.select(inner, _Scope())
        if inner.get("intoClause"):
            into = inner["intoClause"].get("rel") or {}
            self._new_table(into, outputs)
        else:
            self.analysis.outputs = outputs

    def _new_table(self, range_var, outputs):
        target = ".".join(part for part in (range_var.get("schemaname"), range_var.get("relname")) if part)
        for output in outputs:
            for flow in output.flows:
                if flow.kind:
                    self.analysis.writes.append(Write(target, None, flow))

    def _stmt_CreateTableAsStmt(self, inner):
        outputs = self.query(inner.get("query"), _Scope())
        if inner.get("objtype") == "OBJECT_MATVIEW":
            # Followed through its definition once the catalog has it, but
            # not before (a transaction's own views are not in it).
            self._other("CreateTableAsStmt", inner)
            return
        self._new_table((inner.get("into") or {}).get("rel") or {}, outputs or ())

    def _stmt_InsertStmt(self, inner, ctes=None):
        scope = _Scope(ctes=self._with(inner.get("withClause"), None, ctes))
        relation, item = self._target(inner.get("relation"), scope)
        columns = [_resname(target) for target in inner.get("cols") or ()]
        if not columns and relation is not None:
            columns = list(relation.columns)
        select = inner.get("selectStmt")
        if select is not None:
            outputs = self.query(select, scope) or ()
            for index, output in enumerate(outputs):
                if output.width is None:
                    self._write_all(relation, inner, output.flows)
                    continue
                column = columns[index] if index < len(columns) else None
                self._write(relation, inner, column, output.flows)
        conflict = inner.get("onConflictClause")
        if conflict:
            excluded = _Item("excluded", item.columns if item is not None else [], item is not None)
            conflict_scope = _Scope(scope)
            conflict_scope.items = [entry for entry in (item, excluded) if entry is not None]
            self._set_list(relation, inner, conflict.get("targetList"), conflict_scope)
            self.predicate(conflict.get("whereClause"), conflict_scope, "ON CONFLICT WHERE")
        self._returning(inner, scope, item)

    def _stmt_UpdateStmt(self, inner, ctes=None):
        scope = _Scope(ctes=self._with(inner.get("withClause"), None, ctes))
        relation, item = self._target(inner.get("relation"), scope)
        self.from_clause(inner.get("fromClause"), scope)
        self._set_list(relation, inner, inner.get("targetList"), scope)
        self.predicate(inner.get("whereClause"), scope, "WHERE")
        self._returning(inner, scope, item)

    def _stmt_DeleteStmt(self, inner, ctes=None):
        scope = _Scope(ctes=self._with(inner.get("withClause"), None, ctes))
        _, item = self._target(inner.get("relation"), scope)
        self.from_clause(inner.get("usingClause"), scope)
        self.predicate(inner.get("whereClause"), scope, "WHERE")
        self._returning(inner, scope, item)

    def _stmt_MergeStmt(self, inner, ctes=None):
        scope = _Scope(ctes=self._with(inner.get("withClause"), None, ctes))
        relation, item = self._target(inner.get("relation"), scope)
        self.from_clause([inner.get("sourceRelation")], scope)
        self.predicate(inner.get("joinCondition"), scope, "MERGE ON")
        for clause in inner.get("mergeWhenClauses") or ():
            _, when = _one(clause)
            self.predicate(when.get("condition"), scope, "MERGE WHEN")
            if when.get("commandType") == "CMD_INSERT":
                columns = [_resname(target) for target in when.get("targetList") or ()]
                for index, value in enumerate(when.get("values") or ()):
                    column = columns[index] if index < len(columns) and columns[index] else (
                        relation.columns[index] if relation is not None and index < len(relation.columns) else None
                    )
                    self._write(relation, inner, column, self.expression(value, scope))
            else:
                self._set_list(relation, inner, when.get("targetList"), scope)
        self._returning(inner, scope, item)

    def _target(self, range_var, scope):
        """
        The relation a statement writes, as an item its clauses see.
        """
        if not range_var:
            return None, None
        relation = self._relation(range_var)
        if relation is None:
            return None, None
        alias = (range_var.get("alias") or {}).get("aliasname") or relation.name
        item = _Item(alias, self._relation_columns(relation), True, relation)
        scope.items.append(item)
        return relation, item

    def _set_list(self, relation, inner, targets, scope):
        for target in targets or ():
            _, res = _one(target)
            flows = self.expression(res.get("val"), scope)
            self._write(relation, inner, res.get("name"), flows)

    def _write(self, relation, inner, column, flows):
        if relation is None:
            target = _range_name(inner.get("relation") or {})
            kind = None
        else:
            target = "%s.%s" % (relation.qualified, column)
            kind = self.catalog.kinds.get(target)
        for flow in flows:
            if flow.kind:
                self.analysis.writes.append(Write(target, kind, flow))

    def _write_all(self, relation, inner, flows):
        for flow in flows:
            if flow.kind:
                target = relation.qualified if relation is not None else _range_name(inner.get("relation") or {})
                self.analysis.writes.append(Write(target, None, flow))

    def _returning(self, inner, scope, item):
        returning = (inner.get("returningClause") or {}).get("exprs") or inner.get("returningList")
        if returning:
            if item is not None:
                # RETURNING old.* and new.* (PostgreSQL 18) name the target.
                returning_scope = _Scope(scope)
                returning_scope.items = [_Item(name, item.columns, True, item.relation) for name in ("old", "new")]
                scope = _Scope(returning_scope)
                scope.items = list(returning_scope.parent.items)
            self.analysis.outputs = self.target_list(returning, scope)

    def _stmt_CopyStmt(self, inner):
        if inner.get("is_from"):
            if inner.get("is_program") or inner.get("filename"):
                self.unresolved(
                    "COPY FROM a server file or program may read the tables' data files; copy FROM STDIN"
                )
            return
        options = {}
        for option in inner.get("options") or ():
            _, element = _one(option)
            value = element.get("arg")
            text = _name(value)
            if text is None and isinstance(value, dict):
                _, constant = _one(value)
                text = str(constant.get("ival", constant.get("boolval", ""))) if isinstance(constant, dict) else None
            options[element.get("defname")] = text if text is not None else True
        options["to"] = "program" if inner.get("is_program") else ("file" if inner.get("filename") else "stdout")
        if inner.get("query") is not None:
            outputs = self.query(inner["query"], _Scope())
        else:
            relation = self._relation(inner.get("relation") or {})
            if relation is None:
                outputs = [Output(None, frozenset(), None)]
            else:
                columns = dict(self._relation_columns(relation))
                names = _names(inner.get("attlist")) or list(relation.columns)
                outputs = []
                for name in names:
                    if name not in columns:
                        self.unresolved("the column %s of %s is not in the catalog" % (name, relation.qualified))
                        continue
                    outputs.append(Output(name, columns[name]))
        self.analysis.outputs = outputs
        self.analysis.copy = options

    def _stmt_DeclareCursorStmt(self, inner):
        self.analysis.outputs = self.query(inner.get("query"), _Scope())
        self.analysis.cursor = inner.get("portalname")

    def _stmt_FetchStmt(self, inner):
        name = inner.get("portalname")
        self.analysis.cursor = name
        if inner.get("ismove"):
            return
        found = self.named.get(("cursor", name))
        if found is None:
            self.unresolved(
                "the cursor %s was not declared through the gateway, so what it returns cannot be followed" % (name,)
            )
            return
        self.analysis.outputs = found.outputs

    def _stmt_ClosePortalStmt(self, inner):
        self.analysis.cursor = inner.get("portalname") or "*"

    def _stmt_DeallocateStmt(self, inner):
        self.analysis.prepared = inner.get("name") or "*"

    def _stmt_PrepareStmt(self, inner):
        self.analysis.prepared = inner.get("name")
        self.statement(inner.get("query"))

    def _stmt_ExecuteStmt(self, inner):
        name = inner.get("name")
        self.analysis.prepared = name
        found = self.named.get(("prepared", name))
        if found is None:
            self.unresolved(
                "the prepared statement %s was not prepared through the gateway, so it cannot be followed" % (name,)
            )
            return
        self.analysis.outputs = found.outputs
        self.analysis.uses.extend(found.uses)
        self.analysis.writes.extend(found.writes)
        self.analysis.unresolved.extend(found.unresolved)
        self.analysis.copy = found.copy

    def _explain(self, inner):
        analyze = any(
            _one(option)[1].get("defname") == "analyze" for option in inner.get("options") or ()
        )
        self.statement(inner.get("query"))
        if not analyze:
            self.analysis.explain_only = True

    def _stmt_VariableSetStmt(self, inner):
        kind = inner.get("kind")
        if kind == "VAR_RESET_ALL":
            self.analysis.search_path = ()
            return
        if (inner.get("name") or "").lower() != "search_path":
            return
        if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
            self.analysis.search_path = ()
            return
        path = []
        for argument in inner.get("args") or ():
            _, constant = _one(argument)
            value = constant.get("sval", {}).get("sval") if isinstance(constant, dict) else None
            if value is None:
                self.unresolved("SET search_path to a value the gateway cannot read")
                return
            path.extend(part.strip() for part in value.split(","))
        path = [_schema_name(part) for part in path if part]
        self.analysis.search_path = tuple(
            self.catalog.user if part == "$user" and self.catalog.user else part for part in path
        )

    def _stmt_DoStmt(self, inner):
        body = ""
        language = "plpgsql"
        for option in inner.get("args") or ():
            _, element = _one(option)
            if element.get("defname") == "as":
                body = _name(element.get("arg")) or ""
            elif element.get("defname") == "language":
                language = _name(element.get("arg")) or language
        problem = self.catalog.body_problem(body, language)
        if problem:
            self.unresolved("a DO block %s" % (problem,))

    def _stmt_CallStmt(self, inner):
        call = inner.get("funccall") or {}
        self.expression({"FuncCall": call}, _Scope())

    def _stmt_CreateFunctionStmt(self, inner):
        body = ""
        language = "sql"
        for option in inner.get("options") or ():
            _, element = _one(option)
            if element.get("defname") == "as":
                body = " ".join(_names(element.get("arg", {}).get("List", {}).get("items")))
            elif element.get("defname") == "language":
                language = _name(element.get("arg")) or language
        if inner.get("sql_body") is not None:
            body = orjson.dumps(inner["sql_body"]).decode()
        problem = self.catalog.body_problem(body, language)
        if problem:
            name = ".".join(_names(inner.get("funcname")))
            self.unresolved("the function %s %s; its callers could not be followed" % (name, problem))

    def _other(self, kind, inner):
        """
        DDL that names a relation with sensitive columns: renaming or
        reshaping it, hanging code on it (triggers, rules, policies), or
        defining a view over it (the catalog snapshot, read on another
        connection, does not see a view of an open transaction), would
        carry its values where the analysis does not follow.
        """
        if kind is None or kind in _HARMLESS_STATEMENTS:
            return
        sensitive = self.catalog.sensitive_relations()
        for range_var in _range_vars(inner):
            relation = self._relation(range_var, record=False)
            if relation is not None and relation.qualified in sensitive:
                if relation.qualified not in self.analysis.ddl:
                    self.analysis.ddl.append(relation.qualified)

    # Queries.

    def query(self, node, scope):
        """
        The outputs of a query node (SELECT, or a data-modifying statement
        with RETURNING inside a CTE).
        """
        kind, inner = _one(node)
        if kind == "SelectStmt":
            return self.select(inner, scope)
        if kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            # A data-modifying CTE sees the CTEs before it.
            saved = self.analysis.outputs
            getattr(self, "_stmt_" + kind)(inner, scope.ctes)
            outputs, self.analysis.outputs = self.analysis.outputs, saved
            return outputs or []
        self.unresolved("a %s inside a query cannot be followed" % (kind,))
        return []

    def select(self, inner, outer, ctes=None):
        self._deeper()
        try:
            return self._select(inner, outer, ctes)
        finally:
            self.depth -= 1

    def _select(self, inner, outer, ctes):
        ctes = self._with(inner.get("withClause"), outer, ctes)
        op = inner.get("op", "SETOP_NONE")
        if op != "SETOP_NONE":
            left = self.select(inner.get("larg") or {}, outer, ctes)
            right = self.select(inner.get("rarg") or {}, outer, ctes)
            return _combine(left, right)
        scope = _Scope(outer, ctes)
        if inner.get("valuesLists"):
            rows = [
                [self.expression(value, scope) for value in (_one(row)[1].get("items") or ())]
                for row in inner["valuesLists"]
            ]
            width = max((len(row) for row in rows), default=0)
            return [
                Output("column%d" % (index + 1,), frozenset().union(*[row[index] for row in rows if index < len(row)]))
                for index in range(width)
            ]
        self.from_clause(inner.get("fromClause"), scope)
        self.predicate(inner.get("whereClause"), scope, "WHERE")
        outputs = self.target_list(inner.get("targetList") or (), scope)
        for node in inner.get("groupClause") or ():
            self._ordering(node, scope, outputs, "GROUP BY")
        self.predicate(inner.get("havingClause"), scope, "HAVING")
        for node in inner.get("sortClause") or ():
            _, sort = _one(node)
            self._ordering(sort.get("node"), scope, outputs, "ORDER BY")
        for node in inner.get("distinctClause") or ():
            if node:
                self._ordering(node, scope, outputs, "DISTINCT ON")
        for node in inner.get("windowClause") or ():
            self._window(_one(node)[1], scope)
        for key in ("limitCount", "limitOffset"):
            if inner.get(key) is not None:
                self.use(self.expression(inner[key], scope), EXPRESSION, "LIMIT")
        return outputs

    def _ordering(self, node, scope, outputs, clause):
        kind, inner = _one(node)
        if kind == "A_Const" and "ival" in inner:
            position = inner["ival"].get("ival", 0) - 1
            flows = outputs[position].flows if 0 <= position < len(outputs) else frozenset()
        elif kind == "ColumnRef" and len(inner.get("fields") or ()) == 1:
            name = _name(inner["fields"][0])
            found = [output for output in outputs if output.name == name]
            flows = found[0].flows if found else self.expression(node, scope)
        else:
            flows = self.expression(node, scope)
        # Grouping tells equal values apart; ordering ranks them, which
        # values the client inserts itself turn into a range oracle.
        self.use(flows, SORT if clause == "ORDER BY" else EQUALITY, clause)

    def _window(self, window, scope):
        for node in window.get("partitionClause") or ():
            self.use(self.expression(node, scope), EQUALITY, "PARTITION BY")
        for node in window.get("orderClause") or ():
            self.use(self.expression(_one(node)[1].get("node"), scope), SORT, "window ORDER BY")

    def _with(self, clause, outer, ctes=None):
        """
        The CTEs a statement's body sees: C{{name: [Output]}}.
        """
        base = dict(ctes if ctes is not None else (outer.ctes if outer is not None else {}))
        if not clause:
            return base
        recursive = clause.get("recursive")
        for node in clause.get("ctes") or ():
            _, cte = _one(node)
            name = cte.get("ctename")
            aliases = _names(cte.get("aliascolnames"))
            query = cte.get("ctequery")
            if recursive:
                # A first pass over the non-recursive part names the
                # columns; the second follows values round the recursion.
                kind, inner = _one(query)
                seed = inner.get("larg") if kind == "SelectStmt" and inner.get("op", "SETOP_NONE") != "SETOP_NONE" else None
                outputs = self.select(seed, outer, base) if seed is not None else []
                for _ in range(2):
                    base[name] = _renamed(outputs, aliases)
                    outputs = self.query(query, _Scope(outer, base))
                    outputs = _combine(outputs, base[name])
            else:
                outputs = self.query(query, _Scope(outer, base))
            base[name] = _renamed(outputs, aliases)
        return base

    def from_clause(self, items, scope):
        for node in items or ():
            item = self.from_item(node, scope)
            if item is not None:
                scope.items.extend(item if isinstance(item, list) else [item])

    def from_item(self, node, scope):
        kind, inner = _one(node)
        if kind == "RangeVar":
            return self._range_var(inner, scope)
        if kind == "RangeSubselect":
            lateral = scope if inner.get("lateral") else scope.parent
            outputs = self.query(inner.get("subquery"), _Scope(lateral, scope.ctes))
            return self._aliased(inner.get("alias"), outputs, None)
        if kind == "JoinExpr":
            return self._join(inner, scope)
        if kind == "RangeFunction":
            return self._range_function(inner, scope)
        if kind == "RangeTableSample":
            item = self.from_item(inner.get("relation"), scope)
            for argument in inner.get("args") or ():
                self.use(self.expression(argument, scope), EXPRESSION, "TABLESAMPLE")
            return item
        if kind in ("RangeTableFunc", "JsonTable"):
            return self._opaque(inner.get("alias"), self._children(inner, scope, kind))
        self.unresolved("a %s in FROM cannot be followed" % (kind,))
        return None

    def _opaque(self, alias, flows):
        return _Item((alias or {}).get("aliasname"), [(None, frozenset(flows))], False)

    def _range_var(self, inner, scope):
        name = inner.get("relname")
        alias = (inner.get("alias") or {}).get("aliasname") or name
        if not inner.get("schemaname") and name in scope.ctes:
            outputs = scope.ctes[name]
            return self._aliased(inner.get("alias") or {"aliasname": name}, outputs, None)
        relation = self._relation(inner)
        if relation is None:
            return _Item(alias, [], False)
        columns = self._relation_columns(relation)
        colnames = _names((inner.get("alias") or {}).get("colnames"))
        if colnames:
            columns = [
                (colnames[index] if index < len(colnames) else column, flows)
                for index, (column, flows) in enumerate(columns)
            ]
        return _Item(alias, columns, True, relation)

    def _relation(self, range_var, record=True):
        """
        The catalog relation a RangeVar names, through the search path;
        None when the catalog does not have it.
        """
        schema = range_var.get("schemaname")
        name = range_var.get("relname")
        if name in STATISTICS_RELATIONS and schema in (None, "pg_catalog"):
            self.unresolved(
                "%s holds samples of every column's values, sensitive ones included; it is not readable "
                "through this connection" % (name,)
            )
            return None
        relation = self.catalog.relation(schema, name, self.search_path)
        if not schema and self.alternatives:
            sensitive = self.catalog.sensitive_relations()
            for path in self.alternatives:
                other = self.catalog.relation(None, name, path)
                if other is not None and other is not relation and other.qualified in sensitive:
                    self.unresolved(
                        "%s may mean %s: the search_path changed in this session; qualify the name with its schema"
                        % (name, other.qualified)
                    )
        if relation is None and record and schema not in ("pg_catalog", "information_schema") and not (
            not schema and name.startswith("pg_")
        ):
            self.analysis.unknown.add(_range_name(range_var))
        return relation

    def _relation_columns(self, relation):
        """
        C{[(column, flows)]} of a relation: base columns for tables,
        the definition's outputs for views.
        """
        if relation.definition is not None:
            try:
                flows = self.catalog.view_columns(relation, self.depth)
            except Unresolvable as error:
                self.unresolved(str(error))
                flows = None
            if flows is None:
                self.unresolved("the definition of the view %s cannot be followed" % (relation.qualified,))
                return [(column, frozenset()) for column in relation.columns]
            return [
                (column, flows[index] if index < len(flows) else frozenset())
                for index, column in enumerate(relation.columns)
            ]
        columns = []
        for column in relation.columns:
            qualified = "%s.%s" % (relation.qualified, column)
            flows = frozenset((Flow(qualified, self.catalog.kinds.get(qualified)),))
            if column in relation.generated:
                flows = flows | self._generated(relation, relation.generated[column])
            columns.append((column, flows))
        return columns

    def _generated(self, relation, expression):
        try:
            tree = parse("SELECT %s FROM %s" % (expression, _quoted(relation)))
        except Exception:
            self.unresolved("a generated column of %s cannot be followed" % (relation.qualified,))
            return frozenset()
        _, inner = _one(tree[0])
        scope = _Scope()
        # The table's own columns, without their generated expressions.
        base = []
        for column in relation.columns:
            qualified = "%s.%s" % (relation.qualified, column)
            base.append((column, frozenset((Flow(qualified, self.catalog.kinds.get(qualified)),))))
        scope.items.append(_Item(relation.name, base, True, relation))
        return _apply(self.target_list(inner.get("targetList") or (), scope)[0].flows, "generated column")

    def _aliased(self, alias, outputs, relation):
        alias = alias or {}
        colnames = _names(alias.get("colnames"))
        known = all(output.width == 1 for output in outputs)
        columns = []
        for index, output in enumerate(outputs):
            name = colnames[index] if index < len(colnames) else output.name
            columns.append((name, output.flows))
        item = _Item(alias.get("aliasname"), columns, known, relation)
        return item

    def _join(self, inner, scope):
        left = self.from_item(inner.get("larg"), scope)
        # A LATERAL item on the right sees the left side.
        right_scope = _Scope(scope.parent, scope.ctes)
        right_scope.items = scope.items + [item for item in _as_list(left) if item is not None]
        right = self.from_item(inner.get("rarg"), right_scope)
        items = [item for part in (left, right) for item in (part if isinstance(part, list) else [part]) if item is not None]
        join_scope = _Scope(scope.parent, scope.ctes)
        join_scope.items = scope.items + items
        self.predicate(inner.get("quals"), join_scope, "JOIN ON")
        using = _names(inner.get("usingClause"))
        if inner.get("isNatural") and left is not None and right is not None:
            lefts = {column for item in _as_list(left) for column, _ in item.columns}
            using = [column for item in _as_list(right) for column, _ in item.columns if column in lefts]
        if using:
            merged = []
            for column in using:
                flows = frozenset()
                for item in items:
                    found = item.column(column)
                    if found is not None:
                        flows = flows | found
                self.use(flows, EQUALITY, "JOIN USING")
                merged.append((column, flows))
            for item in items:
                item.hidden = tuple(using)
            joined = _Item(None, merged, True)
            joined.hidden = ()
            items = [joined] + items
            alias = (inner.get("join_using_alias") or {}).get("aliasname")
            if alias:
                items.append(_Item(alias, merged, True))
        alias = inner.get("alias")
        if alias:
            columns = []
            for item in items:
                columns.extend((name, flows) for name, flows in item.columns if name not in item.hidden)
            named = self._aliased(alias, [Output(name, flows) for name, flows in columns], None)
            named.known = all(item.known for item in items)
            return [named]
        return items

    def _range_function(self, inner, scope):
        # Functions in FROM see the items before them (they are lateral).
        flows = frozenset()
        for entry in inner.get("functions") or ():
            flows = flows | self._collect(entry, scope)
        alias = inner.get("alias") or {}
        colnames = _names(alias.get("colnames")) or [
            _one(definition)[1].get("colname") for definition in inner.get("coldeflist") or ()
        ]
        name = alias.get("aliasname")
        if colnames:
            columns = [(column, flows) for column in colnames]
            if inner.get("ordinality"):
                columns.append(("ordinality", frozenset()))
            return _Item(name, columns, True)
        if name is None:
            call = _first_call(inner)
            name = (_names(_one(call)[1].get("funcname")) or ["?"])[-1] if call else None
        # A function's result may be a row of any width: every column
        # carries what its arguments carry.
        return _Item(name, [(name, flows)], False)

    def target_list(self, targets, scope):
        outputs = []
        for node in targets:
            _, target = _one(node)
            value = target.get("val")
            kind, inner = _one(value)
            if kind == "ColumnRef" and inner.get("fields") and "A_Star" in inner["fields"][-1]:
                outputs.extend(self._star(inner["fields"][:-1], scope))
                continue
            if kind == "A_Indirection" and _row_star(inner, scope):
                # (c).* is c.*.
                outputs.extend(self._star(_one(inner["arg"])[1]["fields"], scope))
                continue
            flows = self.expression(value, scope)
            outputs.append(Output(target.get("name") or _default_name(value), flows))
        return outputs

    def _star(self, qualifier, scope):
        if qualifier:
            item = scope.find_item(_name(qualifier[-1]))
            items = [item] if item is not None else []
            if item is None:
                self.unresolved("%s.* names nothing the gateway knows" % (_name(qualifier[-1]),))
        else:
            items = scope.items
        outputs = []
        for item in items:
            if not item.known:
                outputs.append(Output(None, frozenset(item.whole_row()), None))
                continue
            for column, flows in item.columns:
                if qualifier or column not in item.hidden:
                    outputs.append(Output(column, flows))
        return outputs

    # Predicates.

    def predicate(self, node, scope, clause):
        if node is None:
            return
        kind, inner = _one(node)
        if kind == "BoolExpr":
            for argument in inner.get("args") or ():
                self.predicate(argument, scope, clause)
            return
        if kind == "A_Expr":
            operator = " ".join(_names(inner.get("name")))
            expression_kind = inner.get("kind")
            flows = self.expression(inner.get("lexpr"), scope) | self.expression(inner.get("rexpr"), scope)
            if expression_kind in _PATTERN_KINDS or operator in _PATTERN_OPERATORS:
                use = PATTERN
            elif expression_kind in _RANGE_KINDS or operator in _RANGE_OPERATORS:
                use = RANGE
            elif expression_kind in _EQUALITY_KINDS or operator in _EQUALITY_OPERATORS:
                use = EQUALITY
            else:
                use = EXPRESSION
            self.use(flows, use, clause)
            return
        if kind in ("NullTest", "BooleanTest"):
            self.use(self.expression(inner.get("arg"), scope), EQUALITY, clause)
            return
        if kind == "SubLink":
            link = inner.get("subLinkType")
            outputs = self.query(inner.get("subselect"), _Scope(scope, scope.ctes))
            if link == "EXISTS_SUBLINK":
                return
            flows = self.expression(inner.get("testexpr"), scope) if inner.get("testexpr") is not None else frozenset()
            for output in outputs:
                flows = flows | output.flows
            operator = " ".join(_names(inner.get("operName")))
            use = EQUALITY if link == "ANY_SUBLINK" and operator in ("", "=") else (
                RANGE if operator in _RANGE_OPERATORS else EXPRESSION
            )
            self.use(flows, use, clause)
            return
        self.use(self.expression(node, scope), EXPRESSION, clause)

    # Expressions.

    def expression(self, node, scope):
        """
        The flows of an expression's value.
        """
        if node is None:
            return frozenset()
        if isinstance(node, list):
            flows = frozenset()
            for item in node:
                flows = flows | self.expression(item, scope)
            return flows
        kind, inner = _one(node)
        if kind in ("A_Const", "ParamRef", "SQLValueFunction", "SetToDefault", "CurrentOfExpr"):
            return frozenset()
        if kind == "ColumnRef":
            return self._column_ref(inner, scope)
        if kind == "TypeCast":
            flows = self.expression(inner.get("arg"), scope)
            type_name = inner.get("typeName") or {}
            names = _names(type_name.get("names"))
            plain = names and names[-1] in _PLAIN_CASTS and not type_name.get("typmods") and not type_name.get("arrayBounds")
            if plain:
                return flows
            return _apply(flows, "CAST(%s AS %s)" % (_describe(flows), ".".join(names)))
        if kind == "CollateClause":
            return self.expression(inner.get("arg"), scope)
        if kind == "FuncCall":
            return self._function(inner, scope)
        if kind == "A_Expr":
            operator = " ".join(_names(inner.get("name"))) or inner.get("kind", "")
            flows = self.expression(inner.get("lexpr"), scope) | self.expression(inner.get("rexpr"), scope)
            return _apply(flows, "%s %s …" % (_describe(flows), operator))
        if kind == "SubLink":
            return self._sublink(inner, scope)
        if kind == "A_Indirection":
            return self._indirection(inner, scope)
        if kind == "ResTarget":
            return self.expression(inner.get("val"), scope)
        if kind == "List":
            return self.expression(inner.get("items"), scope)
        return self._children(inner, scope, kind)

    def _children(self, inner, scope, kind):
        """
        Any other expression: its value depends on every value inside it.
        """
        flows = self._collect(inner, scope)
        label = _LABELS.get(kind, kind)
        return _apply(flows, "%s(%s)" % (label, _describe(flows)))

    def _collect(self, value, scope):
        """
        The flows of every expression inside C{value}, a node's fields.
        """
        flows = frozenset()
        if isinstance(value, list):
            for item in value:
                flows = flows | self._collect(item, scope)
        elif isinstance(value, dict):
            if _is_node(value):
                return self.expression(value, scope)
            for key, item in value.items():
                if key != "typeName" and isinstance(item, (dict, list)):
                    flows = flows | self._collect(item, scope)
        return flows

    def _column_ref(self, inner, scope):
        fields = inner.get("fields") or ()
        names = [_name(field) for field in fields]
        if fields and "A_Star" in fields[-1]:
            # t.* inside an expression: the whole row.
            item = scope.find_item(names[-2]) if len(names) >= 2 else None
            if item is None:
                flows = set()
                scope_walk = scope
                while scope_walk is not None:
                    for entry in scope_walk.items:
                        flows.update(entry.whole_row())
                    scope_walk = scope_walk.parent
                return _apply(frozenset(flows), "whole row *")
            return _apply(frozenset(item.whole_row()), "whole row %s" % (item.name,))
        if len(names) == 1:
            # A bare name is a column if some item has one of that name,
            # else a whole row; with items of unknown columns in scope it
            # may be either, so it carries both.
            flows = scope.find_column(names[0])
            item = scope.find_item(names[0])
            if item is not None:
                whole = _apply(frozenset(item.whole_row()), "whole row %s" % (names[0],))
                return whole if flows is None else flows | whole
            if flows is not None:
                return flows
            self._unknown_column(names[0], scope)
            return frozenset()
        # table.column, schema.table.column, database.schema.table.column
        column = names[-1]
        table = names[-2]
        item = scope.find_item(table)
        if item is not None:
            found = item.column(column)
            if found is not None:
                return found
            if not item.known:
                return frozenset(item.whole_row())
            if item.relation is None or column not in item.relation.columns:
                self._unknown_column("%s.%s" % (table, column), scope)
            return frozenset()
        self._unknown_column(".".join(names), scope)
        return frozenset()

    def _unknown_column(self, name, scope):
        self.unresolved("the column %s cannot be resolved through the catalog" % (name,))

    def _indirection(self, inner, scope):
        argument = inner.get("arg")
        steps = inner.get("indirection") or ()
        kind, ref = _one(argument)
        if kind == "ColumnRef" and len(steps) == 1 and _name(steps[0]) is not None:
            # (c).column: a column of the row c; if c may also be a column
            # (of an item whose columns are not known), of that too.
            names = _names(ref.get("fields"))
            item = scope.find_item(names[0]) if len(names) == 1 else None
            found = item.column(_name(steps[0])) if item is not None else None
            if found is not None:
                other = scope.find_column(names[0])
                return found if other is None else found | _apply(other, "%s[…]" % (_describe(other),))
        flows = self.expression(argument, scope)
        for step in steps:
            if isinstance(step, dict) and "A_Indices" in step:
                _, indices = _one(step)
                bounds = self.expression(indices.get("lidx"), scope) | self.expression(indices.get("uidx"), scope)
                self.use(bounds, EXPRESSION, "subscript")
        return _apply(flows, "%s[…]" % (_describe(flows),))

    def _sublink(self, inner, scope):
        link = inner.get("subLinkType")
        outputs = self.query(inner.get("subselect"), _Scope(scope, scope.ctes))
        if link == "EXPR_SUBLINK" and len(outputs) == 1 and outputs[0].width == 1:
            return outputs[0].flows
        if link == "EXISTS_SUBLINK":
            return frozenset()
        flows = frozenset()
        for output in outputs:
            flows = flows | output.flows
        if inner.get("testexpr") is not None:
            flows = flows | self.expression(inner["testexpr"], scope)
        label = {"ARRAY_SUBLINK": "ARRAY(SELECT %s)"}.get(link, "subquery over %s")
        return _apply(flows, label % (_describe(flows),))

    def _function(self, inner, scope):
        names = _names(inner.get("funcname"))
        name = names[-1] if names else ""
        schema = names[-2] if len(names) > 1 else None
        self._check_function(schema, name, inner, scope)
        flows = self.expression(inner.get("args"), scope)
        if inner.get("agg_star"):
            flows = frozenset()
        for node in inner.get("agg_order") or ():
            self.use(self.expression(_one(node)[1].get("node"), scope), SORT, "aggregate ORDER BY")
        if inner.get("agg_filter") is not None:
            self.predicate(inner["agg_filter"], scope, "FILTER")
        over = inner.get("over")
        if over:
            self._window(over, scope)
        if name in _COUNTING and schema in (None, "pg_catalog"):
            self.use(flows, EQUALITY, "count()")
            return frozenset()
        return _apply(flows, "%s(%s)" % (".".join(names), _describe(flows)))

    def _check_function(self, schema, name, inner, scope):
        if name in DYNAMIC_FUNCTIONS or name.startswith("dblink"):
            self.unresolved("%s runs SQL given as text, which the gateway cannot follow" % (name,))
            return
        if name in READS_FILES:
            self.unresolved("%s reads the server's files or log, where the tables' values are" % (name,))
            return
        if name == "set_config" and schema in (None, "pg_catalog"):
            arguments = inner.get("args") or ()
            first = _one(arguments[0])[1] if arguments else {}
            setting = first.get("sval", {}).get("sval") if isinstance(first, dict) else None
            if setting is None or setting.lower() == "search_path":
                self.unresolved("set_config may change the search_path; use SET search_path")
            return
        if schema == "pg_catalog":
            return
        candidates = self.catalog.functions.get(name) or ()
        for function in candidates:
            if schema is not None and function.schema != schema:
                continue
            problem = self.catalog.function_problem(function)
            if problem:
                self.unresolved(
                    "the function %s.%s %s; what it returns cannot be followed" % (function.schema, name, problem)
                )


# Statements that name relations without reshaping them or hanging code
# on them.
_HARMLESS_STATEMENTS = frozenset(
    {
        "TransactionStmt", "VariableShowStmt", "DeallocateStmt", "ClosePortalStmt", "DiscardStmt", "ListenStmt",
        "UnlistenStmt", "NotifyStmt", "CommentStmt", "LockStmt", "VacuumStmt", "CheckPointStmt",
        "GrantStmt", "CreateSchemaStmt", "CreateStmt", "DropStmt", "TruncateStmt", "RefreshMatViewStmt",
        "ClusterStmt", "ReindexStmt", "SecLabelStmt", "ConstraintsSetStmt",
    }
)

_LABELS = {
    "CaseExpr": "CASE",
    "CoalesceExpr": "COALESCE",
    "MinMaxExpr": "GREATEST/LEAST",
    "RowExpr": "ROW",
    "A_ArrayExpr": "ARRAY",
    "BoolExpr": "boolean expression",
    "NullTest": "IS NULL",
    "BooleanTest": "IS TRUE",
    "XmlExpr": "XML",
    "XmlSerialize": "XMLSERIALIZE",
    "GroupingFunc": "GROUPING",
}


def _describe(flows):
    described = sorted({flow.describe() for flow in flows if flow.kind}) or sorted({flow.describe() for flow in flows})
    if not described:
        return "…"
    if len(described) > 2:
        return "%s, …" % (", ".join(described[:2]),)
    return ", ".join(described)


def _combine(left, right):
    """
    The outputs of a set operation: each column's flows are both sides'.
    """
    combined = []
    for index, output in enumerate(left):
        if index < len(right):
            other = right[index]
            width = output.width if output.width == other.width else None
            combined.append(Output(output.name, output.flows | other.flows, width))
        else:
            combined.append(output)
    return combined


def _renamed(outputs, aliases):
    if not aliases:
        return list(outputs)
    return [
        Output(aliases[index] if index < len(aliases) else output.name, output.flows, output.width)
        for index, output in enumerate(outputs)
    ]


def _resname(node):
    return _one(node)[1].get("name")


def _default_name(value):
    """
    The name PostgreSQL gives an output column without an alias.
    """
    kind, inner = _one(value)
    if kind == "ColumnRef":
        names = _names(inner.get("fields"))
        return names[-1] if names else None
    if kind == "FuncCall":
        names = _names(inner.get("funcname"))
        return names[-1] if names else None
    if kind == "TypeCast":
        return _default_name(inner.get("arg")) or (_names((inner.get("typeName") or {}).get("names")) or [None])[-1]
    if kind == "A_Indirection":
        steps = inner.get("indirection") or ()
        return _name(steps[-1]) if steps and _name(steps[-1]) else _default_name(inner.get("arg"))
    return "?column?"


def _range_name(range_var):
    return ".".join(part for part in (range_var.get("schemaname"), range_var.get("relname")) if part)


def _range_vars(node):
    """
    Every RangeVar under a node.
    """
    found = []
    stack = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            if "relname" in value:
                found.append(value)
            else:
                stack.extend(item for item in value.values() if isinstance(item, (dict, list)))
    return found


def _row_star(inner, scope):
    """
    Whether an indirection is C{(c).*} for a FROM item C{c}.
    """
    steps = inner.get("indirection") or ()
    kind, ref = _one(inner.get("arg"))
    if kind != "ColumnRef" or len(steps) != 1 or "A_Star" not in steps[0]:
        return False
    fields = ref.get("fields") or ()
    return len(fields) == 1 and scope.find_item(_name(fields[0])) is not None and scope.find_column(
        _name(fields[0])
    ) is None


def _is_node(value):
    if isinstance(value, dict) and len(value) == 1:
        (key,) = value
        return key[:1].isupper()
    return False


def _as_list(value):
    return value if isinstance(value, list) else [value]


def _first_call(inner):
    for entry in inner.get("functions") or ():
        kind, body = _one(entry)
        items = body.get("items") if kind == "List" else entry
        if isinstance(items, list) and items:
            return items[0]
    return {}


def _schema_name(text):
    text = text.strip()
    if text.startswith('"') and text.endswith('"'):
        return text[1:-1].replace('""', '"')
    return text.lower() if text != "$user" else text


def _quoted(relation):
    return '"%s"."%s"' % (relation.schema.replace('"', '""'), relation.name.replace('"', '""'))


def analyse(sql, catalog, search_path=None, alternatives=(), named=None):
    """
    Analyse every statement of C{sql}.

    @return: a list of L{Analysis}, one per statement.
    @raise Exception: when C{sql} does not parse.
    """
    results = []
    for statement in parse(sql):
        analyzer = Analyzer(catalog, search_path or catalog.search_path, alternatives, named)
        try:
            results.append(analyzer.statement(statement))
        except Unresolvable as error:
            analyzer.unresolved(str(error))
            results.append(analyzer.analysis)
        except (RecursionError, ValueError, TypeError, KeyError, IndexError, AttributeError) as error:
            # Whatever the analysis trips over is refused, not let through.
            analyzer.unresolved(
                "the gateway could not follow this statement's columns (%s: %s)" % (type(error).__name__, error)
            )
            results.append(analyzer.analysis)
    return results
