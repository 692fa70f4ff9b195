"""
The SQL classifier: what a SQL statement does, as PostgreSQL's own parser
(pglast) reads it: its kinds (DROP TABLE, TRUNCATE, GRANT, COPY PROGRAM,
SET ROLE ...), the tables it reads and writes (schema-qualified as
written, inside CTEs and subqueries), the functions it calls and the
columns it names.  The rules that match on these facts are in
L{hoopgw.rules}.

Classifications are cached by the statement's normalised text (constants
replaced by placeholders, C{pglast.parser.normalize}), so statements that
differ only in their constants are parsed once.  The parser's fingerprint
is not used as the key: it ignores schema names and constant-only WHERE
clauses, so C{SELECT * FROM public.orders} would answer for
C{SELECT * FROM secret.orders}.  No fact here depends on a constant.
"""

import collections
import re

import attr
import orjson
from pglast import parser

from hoopgw import redact



CACHE_SIZE = 4096
# Prepared statements and cursors remembered per session (oldest dropped).
NAMED_KEPT = 1000
# Longer statements (bulk INSERTs) are classified every time rather than
# filling the cache.
CACHE_KEY_LIMIT = 8192


@attr.s(frozen=True, slots=True)
class Classification:
    """
    The facts of one SQL text (one statement, or several).

    @ivar kinds: the primary kind of every statement found, nested ones
        included (a DELETE inside a CTE): C{"SELECT"}, C{"DROP TABLE"},
        C{"SET ROLE"}, ...
    @ivar labels: every name a rule may use for these statements: the
        kinds, their first word (C{"DROP"}), their category (C{"DDL"},
        C{"DML"}) and details (C{"COPY PROGRAM"}, C{"VACUUM FULL"}).
    @ivar object_types: the object types created, altered, dropped or
        granted on (C{"TABLE"}, C{"ROLE"}, ...).
    @ivar tables: the relations read or written, C{"schema.name"} or
        C{"name"} as written; CTE names are not tables.
    @ivar writes: the relations written (inserted into, updated, deleted
        from, truncated, altered, dropped, created, copied into).
    @ivar functions: the functions called, as written (C{"pg_read_file"},
        C{"pg_catalog.pg_read_file"}).
    @ivar columns: the column names referenced.
    @ivar without_where: an UPDATE or DELETE has no WHERE clause that
        names a column: it touches every row.
    @ivar outputs: for the statement whose rows the client gets, one
        entry per output column: C{(name, source column names, star)}.
    @ivar aliases: C{(name, source column names)} for every named output
        of a subquery or CTE, to follow a column through its aliases.
    @ivar named: C{(namespace, name, Classification)} for PREPARE and
        DECLARE, whose statement runs later.
    @ivar uses: C{(namespace, name)} for EXECUTE and FETCH.
    @ivar error: why the text does not parse, or None.
    """

    kinds = attr.ib(default=frozenset())
    labels = attr.ib(default=frozenset())
    object_types = attr.ib(default=frozenset())
    tables = attr.ib(default=frozenset())
    writes = attr.ib(default=frozenset())
    functions = attr.ib(default=frozenset())
    columns = attr.ib(default=frozenset())
    without_where = attr.ib(default=False)
    outputs = attr.ib(default=())
    aliases = attr.ib(default=())
    named = attr.ib(default=())
    uses = attr.ib(default=())
    error = attr.ib(default=None)
    memo = attr.ib(factory=dict, eq=False, hash=False, repr=False)

    def to_json(self):
        """
        The facts, for the record and for C{hoopgw explain}.
        """
        if self.error:
            return {"error": self.error}
        result = {"kinds": sorted(self.kinds)}
        for name in ("object_types", "tables", "writes", "functions"):
            value = getattr(self, name)
            if value:
                # Names come from the client's text: a quoted identifier
                # may be a card number ("cards5105...").  Rules match the
                # names themselves, not this.
                result[name] = sorted(redact.redact_text(item)[0] for item in value)
        if self.without_where:
            result["without_where"] = True
        return result

    def merged(self, other):
        """
        These facts and C{other}'s (an EXECUTE and the statement it runs).
        """
        return Classification(
            kinds=self.kinds | other.kinds,
            labels=self.labels | other.labels,
            object_types=self.object_types | other.object_types,
            tables=self.tables | other.tables,
            writes=self.writes | other.writes,
            functions=self.functions | other.functions,
            columns=self.columns | other.columns,
            without_where=self.without_where or other.without_where,
            outputs=other.outputs,
            aliases=self.aliases + other.aliases,
            named=self.named,
            uses=self.uses,
            error=self.error or other.error,
        )


# Statement kinds whose node names do not say them plainly.
_KIND_OF_NODE = {
    "SelectStmt": "SELECT",
    "InsertStmt": "INSERT",
    "UpdateStmt": "UPDATE",
    "DeleteStmt": "DELETE",
    "MergeStmt": "MERGE",
    "CreateStmt": "CREATE TABLE",
    "IndexStmt": "CREATE INDEX",
    "ViewStmt": "CREATE VIEW",
    "RuleStmt": "CREATE RULE",
    "CreateSeqStmt": "CREATE SEQUENCE",
    "CreateTrigStmt": "CREATE TRIGGER",
    "CreateEventTrigStmt": "CREATE EVENT TRIGGER",
    "CreatePLangStmt": "CREATE LANGUAGE",
    "CreatedbStmt": "CREATE DATABASE",
    "DropdbStmt": "DROP DATABASE",
    "AlterDatabaseSetStmt": "ALTER DATABASE",
    "AlterDatabaseRefreshCollStmt": "ALTER DATABASE",
    "CreateRoleStmt": "CREATE ROLE",
    "AlterRoleStmt": "ALTER ROLE",
    "AlterRoleSetStmt": "ALTER ROLE",
    "DropRoleStmt": "DROP ROLE",
    "CreateFdwStmt": "CREATE FOREIGN DATA WRAPPER",
    "AlterFdwStmt": "ALTER FOREIGN DATA WRAPPER",
    "CreateForeignServerStmt": "CREATE SERVER",
    "AlterForeignServerStmt": "ALTER SERVER",
    "CreateEnumStmt": "CREATE TYPE",
    "CreateRangeStmt": "CREATE TYPE",
    "CompositeTypeStmt": "CREATE TYPE",
    "AlterEnumStmt": "ALTER TYPE",
    "CreateConversionStmt": "CREATE CONVERSION",
    "CreateOpClassStmt": "CREATE OPERATOR CLASS",
    "CreateOpFamilyStmt": "CREATE OPERATOR FAMILY",
    "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY",
    "CreateStatsStmt": "CREATE STATISTICS",
    "AlterTSConfigurationStmt": "ALTER TEXT SEARCH CONFIGURATION",
    "AlterTSDictionaryStmt": "ALTER TEXT SEARCH DICTIONARY",
    "AlterTableSpaceOptionsStmt": "ALTER TABLESPACE",
    "AlterTableMoveAllStmt": "ALTER TABLE",
    "AlterSystemStmt": "ALTER SYSTEM",
    "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
    "AlterObjectDependsStmt": "ALTER EXTENSION",
    "AlterExtensionContentsStmt": "ALTER EXTENSION",
    "CommentStmt": "COMMENT",
    "SecLabelStmt": "SECURITY LABEL",
    "VariableShowStmt": "SHOW",
    "TransactionStmt": "TRANSACTION",
    "ExplainStmt": "EXPLAIN",
    "PrepareStmt": "PREPARE",
    "ExecuteStmt": "EXECUTE",
    "DeallocateStmt": "DEALLOCATE",
    "DeclareCursorStmt": "DECLARE",
    "FetchStmt": "FETCH",
    "ClosePortalStmt": "CLOSE",
    "CallStmt": "CALL",
    "DoStmt": "DO",
    "LoadStmt": "LOAD",
    "CheckPointStmt": "CHECKPOINT",
    "DiscardStmt": "DISCARD",
    "ListenStmt": "LISTEN",
    "UnlistenStmt": "UNLISTEN",
    "NotifyStmt": "NOTIFY",
    "LockStmt": "LOCK",
    "TruncateStmt": "TRUNCATE",
    "ClusterStmt": "CLUSTER",
    "ReindexStmt": "REINDEX",
    "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
    "ConstraintsSetStmt": "SET CONSTRAINTS",
    "ReassignOwnedStmt": "REASSIGN OWNED",
    "DropOwnedStmt": "DROP OWNED",
    "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA",
    "CreateUserMappingStmt": "CREATE USER MAPPING",
    "AlterUserMappingStmt": "ALTER USER MAPPING",
    "DropUserMappingStmt": "DROP USER MAPPING",
    "CreateTableSpaceStmt": "CREATE TABLESPACE",
    "DropTableSpaceStmt": "DROP TABLESPACE",
    "CreateAmStmt": "CREATE ACCESS METHOD",
    "CreatePublicationStmt": "CREATE PUBLICATION",
    "AlterPublicationStmt": "ALTER PUBLICATION",
    "CreateSubscriptionStmt": "CREATE SUBSCRIPTION",
    "AlterSubscriptionStmt": "ALTER SUBSCRIPTION",
    "DropSubscriptionStmt": "DROP SUBSCRIPTION",
}

_OBJECT_NAMES = {
    "MATVIEW": "MATERIALIZED VIEW",
    "FDW": "FOREIGN DATA WRAPPER",
    "FOREIGN_SERVER": "SERVER",
    "TSCONFIGURATION": "TEXT SEARCH CONFIGURATION",
    "TSDICTIONARY": "TEXT SEARCH DICTIONARY",
    "TSPARSER": "TEXT SEARCH PARSER",
    "TSTEMPLATE": "TEXT SEARCH TEMPLATE",
    "OPCLASS": "OPERATOR CLASS",
    "OPFAMILY": "OPERATOR FAMILY",
    "TABCONSTRAINT": "CONSTRAINT",
    "DOMCONSTRAINT": "CONSTRAINT",
    "STATISTIC_EXT": "STATISTICS",
    "EVENT_TRIGGER": "EVENT TRIGGER",
    "LARGEOBJECT": "LARGE OBJECT",
    "ACCESS_METHOD": "ACCESS METHOD",
    "USER_MAPPING": "USER MAPPING",
    "DEFACL": "DEFAULT PRIVILEGES",
    "DEFAULT": "DEFAULT",
}

# Relations an object type names (its objects are tables for rules).
_RELATION_OBJECTS = {"TABLE", "VIEW", "MATERIALIZED VIEW", "FOREIGN TABLE", "SEQUENCE", "INDEX"}

_DDL_WORDS = {"CREATE", "ALTER", "DROP", "TRUNCATE", "COMMENT", "SECURITY", "IMPORT", "REASSIGN", "GRANT", "REVOKE"}
_DML_KINDS = {"INSERT", "UPDATE", "DELETE", "MERGE", "COPY FROM"}
_CATEGORY_WORDS = {"DDL", "DML"}

_TRANSACTION_KINDS = {
    "TRANS_STMT_BEGIN": "BEGIN",
    "TRANS_STMT_START": "BEGIN",
    "TRANS_STMT_COMMIT": "COMMIT",
    "TRANS_STMT_ROLLBACK": "ROLLBACK",
    "TRANS_STMT_SAVEPOINT": "SAVEPOINT",
    "TRANS_STMT_RELEASE": "RELEASE",
    "TRANS_STMT_ROLLBACK_TO": "ROLLBACK",
    "TRANS_STMT_PREPARE": "PREPARE TRANSACTION",
    "TRANS_STMT_COMMIT_PREPARED": "COMMIT PREPARED",
    "TRANS_STMT_ROLLBACK_PREPARED": "ROLLBACK PREPARED",
}

_SPECIAL_SETTINGS = {
    "role": "SET ROLE",
    "session_authorization": "SET SESSION AUTHORIZATION",
    "search_path": "SET SEARCH_PATH",
}

_CAMEL = re.compile(r"[A-Z][a-z]*")


def _object_type(value):
    """
    C{"OBJECT_MATVIEW"} -> C{"MATERIALIZED VIEW"}.
    """
    if not isinstance(value, str) or not value.startswith("OBJECT_"):
        return None
    name = value[len("OBJECT_") :]
    return _OBJECT_NAMES.get(name, name.replace("_", " "))


def _node_kind(node_name):
    kind = _KIND_OF_NODE.get(node_name)
    if kind is None:
        words = _CAMEL.findall(node_name[: -len("Stmt")] if node_name.endswith("Stmt") else node_name)
        kind = " ".join(word.upper() for word in words)
    return kind


def _qualified(names):
    """
    A dotted name from a list of String nodes.
    """
    parts = []
    for item in names:
        if isinstance(item, dict) and "String" in item:
            parts.append(item["String"].get("sval", ""))
    return ".".join(parts)


def _range_var_name(range_var):
    relname = range_var.get("relname", "")
    schema = range_var.get("schemaname")
    return "%s.%s" % (schema, relname) if schema else relname


class _Facts:
    """
    What the walk over one parse tree has found so far.
    """

    def __init__(self):
        self.kinds = set()
        self.labels = set()
        self.object_types = set()
        self.tables = set()
        self.writes = set()
        self.functions = set()
        self.columns = set()
        self.without_where = False
        self.aliases = []
        self.named = []
        self.uses = []

    def kind(self, kind, *extra):
        self.kinds.add(kind)
        self.labels.add(kind)
        first, _, rest = kind.partition(" ")
        self.labels.add(first)
        if first in _DDL_WORDS:
            self.labels.add("DDL")
            if rest and first in ("CREATE", "ALTER", "DROP", "COMMENT") and is_object_type(rest):
                self.object_types.add(rest)
        if kind in _DML_KINDS:
            self.labels.add("DML")
        for label in extra:
            self.labels.add(label)

    def object(self, base, object_type):
        if object_type:
            self.object_types.add(object_type)
            self.kind("%s %s" % (base, object_type))
        else:
            self.kind(base)

    def table(self, name, written=False):
        self.tables.add(name)
        if written:
            self.writes.add(name)

    def freeze(self, outputs=()):
        return Classification(
            kinds=frozenset(self.kinds),
            labels=frozenset(self.labels),
            object_types=frozenset(self.object_types),
            tables=frozenset(self.tables),
            writes=frozenset(self.writes),
            functions=frozenset(self.functions),
            columns=frozenset(self.columns),
            without_where=self.without_where,
            outputs=tuple(outputs),
            aliases=tuple(self.aliases),
            named=tuple(self.named),
            uses=tuple(self.uses),
        )


def _visit(value, facts, scope):
    kind = type(value)
    if kind is list:
        for item in value:
            _visit(item, facts, scope)
        return
    if kind is not dict:
        return
    if len(value) == 1:
        ((name, inner),) = value.items()
        if type(inner) is dict and name[:1].isupper():
            handler = _HANDLERS.get(name)
            if handler is not None:
                handler(inner, facts, scope)
                return
            if name.endswith("Stmt"):
                _statement(name, inner, facts, scope)
                return
            _fields(inner, facts, scope)
            return
    if "relname" in value:
        _range_var(value, facts, scope)
        return
    _fields(value, facts, scope)


def _fields(fields, facts, scope, skip=()):
    for key, value in fields.items():
        if key in skip:
            continue
        kind = type(value)
        if kind is dict or kind is list:
            _visit(value, facts, scope)


def _range_var(node, facts, scope, written=False):
    name = _range_var_name(node)
    if not node.get("schemaname") and name in scope:
        return
    facts.table(name, written)


def _target(node, facts, scope, written=False):
    """
    The relation a statement writes, inline in its fields.
    """
    if isinstance(node, dict) and "relname" in node:
        _range_var(node, facts, scope, written)
    elif node is not None:
        _visit(node, facts, scope)


def _with_scope(inner, facts, scope):
    """
    Walk a statement's WITH clause; return the scope its body sees.  A
    CTE sees the CTEs before it (all of them when RECURSIVE), so a
    reference inside a CTE to a table of the same name is the table.
    """
    clause = inner.get("withClause")
    if not clause:
        return scope
    ctes = [item.get("CommonTableExpr", {}) for item in clause.get("ctes", [])]
    names = [cte.get("ctename", "") for cte in ctes]
    full = scope | frozenset(names)
    for index, cte in enumerate(ctes):
        seen = full if clause.get("recursive") else scope | frozenset(names[:index])
        query = cte.get("ctequery")
        _visit(query, facts, seen)
        colnames = [_qualified([item]) for item in cte.get("aliascolnames", [])]
        if colnames:
            _positional_aliases(colnames, query, facts)
    return full


def _positional_aliases(colnames, query, facts):
    for name, (_, sources, star) in zip(colnames, _outputs(query)):
        if not star:
            facts.aliases.append((name, sources))


def _column_refs(node, found):
    kind = type(node)
    if kind is list:
        for item in node:
            _column_refs(item, found)
    elif kind is dict:
        ref = node.get("ColumnRef")
        if ref is not None and len(node) == 1:
            fields = ref.get("fields", [])
            for field in reversed(fields):
                if isinstance(field, dict) and "String" in field:
                    found.add(field["String"].get("sval", ""))
                    break
            return found
        for value in node.values():
            if type(value) in (dict, list):
                _column_refs(value, found)
    return found


def _outputs(node):
    """
    The output columns of a statement node: C{(name, sources, star)}.
    """
    if not isinstance(node, dict) or len(node) != 1:
        return []
    ((name, inner),) = node.items()
    if name == "SelectStmt":
        if inner.get("op", "SETOP_NONE") != "SETOP_NONE":
            left = _outputs({"SelectStmt": inner.get("larg", {})})
            right = _outputs({"SelectStmt": inner.get("rarg", {})})
            combined = []
            for index, (column, sources, star) in enumerate(left):
                if index < len(right):
                    sources = sources | right[index][1]
                    star = star or right[index][2]
                combined.append((column, sources, star))
            return combined
        return _target_list(inner.get("targetList", []))
    if name in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
        returning = inner.get("returningClause") or {}
        return _target_list(returning.get("exprs") or inner.get("returningList") or [])
    return []


def _target_list(targets):
    entries = []
    for item in targets:
        target = item.get("ResTarget", {}) if isinstance(item, dict) else {}
        value = target.get("val")
        ref = value.get("ColumnRef") if isinstance(value, dict) else None
        if ref is not None and ref.get("fields") and "A_Star" in ref["fields"][-1]:
            entries.append((None, frozenset(), True))
            continue
        sources = frozenset(_column_refs(value, set()))
        column = target.get("name")
        if column is None and ref is not None and len(sources) == 1:
            (column,) = sources
        entries.append((column, sources, False))
    return entries


# Handlers for the nodes that carry facts.


def _select(inner, facts, scope):
    facts.kind("SELECT")
    scope = _with_scope(inner, facts, scope)
    into = inner.get("intoClause")
    if into:
        facts.object("CREATE", "TABLE")
        facts.kind("CREATE TABLE AS", "SELECT INTO")
        _target(into.get("rel"), facts, scope, written=True)
    if inner.get("lockingClause"):
        facts.labels.add("SELECT FOR UPDATE")
    _fields(inner, facts, scope, skip=("withClause", "intoClause"))


def _modify(kind):
    def handler(inner, facts, scope):
        facts.kind(kind)
        scope = _with_scope(inner, facts, scope)
        _target(inner.get("relation"), facts, scope, written=True)
        if kind in ("UPDATE", "DELETE"):
            where = inner.get("whereClause")
            if where is None or not _column_refs(where, set()):
                facts.without_where = True
                facts.labels.add("%s WITHOUT WHERE" % (kind,))
        _fields(inner, facts, scope, skip=("withClause", "relation"))

    return handler


def _res_target(inner, facts, scope):
    name = inner.get("name")
    value = inner.get("val")
    if name and value is not None:
        facts.aliases.append((name, frozenset(_column_refs(value, set()))))
    _fields(inner, facts, scope)


def _range_subselect(inner, facts, scope):
    alias = inner.get("alias") or {}
    colnames = [_qualified([item]) for item in alias.get("colnames", [])]
    if colnames:
        _positional_aliases(colnames, inner.get("subquery"), facts)
    _fields(inner, facts, scope)


def _func_call(inner, facts, scope):
    facts.functions.add(_qualified(inner.get("funcname", [])))
    _fields(inner, facts, scope)


def _call(inner, facts, scope):
    facts.kind("CALL")
    call = inner.get("funccall") or {}
    facts.functions.add(_qualified(call.get("funcname", [])))
    _fields(call, facts, scope)


def _column_ref(inner, facts, scope):
    for field in reversed(inner.get("fields", [])):
        if isinstance(field, dict) and "String" in field:
            facts.columns.add(field["String"].get("sval", ""))
            break


def _drop(inner, facts, scope):
    object_type = _object_type(inner.get("removeType"))
    facts.object("DROP", object_type)
    if object_type in _RELATION_OBJECTS:
        for item in inner.get("objects", []):
            if isinstance(item, dict) and "List" in item:
                facts.table(_qualified(item["List"].get("items", [])), written=True)
    _fields(inner, facts, scope, skip=("objects",))


def _truncate(inner, facts, scope):
    facts.kind("TRUNCATE")
    for item in inner.get("relations", []):
        _range_var(item.get("RangeVar", {}), facts, scope, written=True)
    _fields(inner, facts, scope, skip=("relations",))


def _copy(inner, facts, scope):
    direction = "COPY FROM" if inner.get("is_from") else "COPY TO"
    extra = [direction]
    if inner.get("is_program"):
        extra.append("COPY PROGRAM")
    elif inner.get("filename"):
        extra.append("COPY FILE")
    for option in inner.get("options", []):
        element = option.get("DefElem", {}) if isinstance(option, dict) else {}
        if element.get("defname") == "format":
            argument = element.get("arg", {})
            if isinstance(argument, dict) and argument.get("String", {}).get("sval", "").lower() == "binary":
                extra.append("COPY BINARY")
    facts.kind("COPY", *extra)
    facts.kinds.add(direction)
    if inner.get("is_from"):
        facts.labels.add("DML")
    _target(inner.get("relation"), facts, scope, written=bool(inner.get("is_from")))
    _fields(inner, facts, scope, skip=("relation",))


def _variable_set(inner, facts, scope):
    name = (inner.get("name") or "").lower()
    if inner.get("kind") == "VAR_RESET_ALL":
        facts.kind("RESET", "RESET ROLE")
    elif inner.get("kind") == "VAR_RESET":
        facts.kind("RESET")
        if name in _SPECIAL_SETTINGS:
            facts.labels.add("RESET " + _SPECIAL_SETTINGS[name][len("SET ") :])
    elif name in _SPECIAL_SETTINGS:
        facts.kind(_SPECIAL_SETTINGS[name], "SET")
    elif name.lower() in ("transaction", "session characteristics"):
        facts.kind("SET TRANSACTION", "SET")
    else:
        facts.kind("SET")
    _fields(inner, facts, scope)


def _alter_system(inner, facts, scope):
    facts.kind("ALTER SYSTEM")


def _vacuum(inner, facts, scope):
    if inner.get("is_vacuumcmd"):
        extra = []
        for option in inner.get("options", []):
            element = option.get("DefElem", {}) if isinstance(option, dict) else {}
            # FULL counts whatever its value: no fact depends on a constant.
            if element.get("defname") == "full":
                extra.append("VACUUM FULL")
        facts.kind("VACUUM", *extra)
        if extra:
            facts.kinds.add("VACUUM FULL")
    else:
        facts.kind("ANALYZE")
    for item in inner.get("rels", []):
        relation = item.get("VacuumRelation", {}).get("relation") if isinstance(item, dict) else None
        if relation:
            _range_var(relation, facts, scope, written=bool(inner.get("is_vacuumcmd")))


def _grant(inner, facts, scope):
    facts.object("GRANT" if inner.get("is_grant") else "REVOKE", _object_type(inner.get("objtype")))
    _fields(inner, facts, scope)


def _grant_role(inner, facts, scope):
    facts.object("GRANT" if inner.get("is_grant") else "REVOKE", "ROLE")
    _fields(inner, facts, scope)


def _alter_table(inner, facts, scope):
    facts.object("ALTER", _object_type(inner.get("objtype")) or "TABLE")
    _target(inner.get("relation"), facts, scope, written=True)
    _fields(inner, facts, scope, skip=("relation",))


def _typed_ddl(base, field):
    def handler(inner, facts, scope):
        object_type = _object_type(inner.get(field))
        facts.object(base, object_type)
        relation = inner.get("relation")
        if relation is not None:
            _target(relation, facts, scope, written=True)
        _fields(inner, facts, scope, skip=("relation",))

    return handler


def _create_relation(kind, field="relation"):
    def handler(inner, facts, scope):
        base, object_type = kind.split(" ", 1)
        facts.object(base, object_type)
        _target(inner.get(field), facts, scope, written=True)
        _fields(inner, facts, scope, skip=(field,))

    return handler


def _create_table_as(inner, facts, scope):
    object_type = _object_type(inner.get("objtype")) or "TABLE"
    facts.object("CREATE", object_type)
    if object_type == "TABLE":
        facts.kind("CREATE TABLE AS")
    into = inner.get("into") or {}
    _target(into.get("rel"), facts, scope, written=True)
    _visit(inner.get("query"), facts, scope)


def _create_function(inner, facts, scope):
    facts.object("CREATE", "PROCEDURE" if inner.get("is_procedure") else "FUNCTION")


def _define(inner, facts, scope):
    facts.object("CREATE", _object_type(inner.get("kind")))


def _transaction(inner, facts, scope):
    facts.kind("TRANSACTION", _TRANSACTION_KINDS.get(inner.get("kind"), "TRANSACTION"))


def _prepare(inner, facts, scope):
    facts.kind("PREPARE")
    query = inner.get("query")
    facts.named.append(("prepare", inner.get("name", ""), _classify_tree([query])))
    _visit(query, facts, scope)


def _declare(inner, facts, scope):
    facts.kind("DECLARE")
    query = inner.get("query")
    facts.named.append(("cursor", inner.get("portalname", ""), _classify_tree([query])))
    _visit(query, facts, scope)


def _execute(inner, facts, scope):
    facts.kind("EXECUTE")
    facts.uses.append(("prepare", inner.get("name", "")))
    _fields(inner, facts, scope)


def _fetch(inner, facts, scope):
    facts.kind("MOVE" if inner.get("ismove") else "FETCH")
    facts.uses.append(("cursor", inner.get("portalname", "")))


def _statement(name, inner, facts, scope):
    facts.kind(_node_kind(name))
    _fields(inner, facts, scope)


_HANDLERS = {
    "SelectStmt": _select,
    "InsertStmt": _modify("INSERT"),
    "UpdateStmt": _modify("UPDATE"),
    "DeleteStmt": _modify("DELETE"),
    "MergeStmt": _modify("MERGE"),
    "RangeVar": _range_var,
    "ResTarget": _res_target,
    "RangeSubselect": _range_subselect,
    "FuncCall": _func_call,
    "CallStmt": _call,
    "ColumnRef": _column_ref,
    "DropStmt": _drop,
    "TruncateStmt": _truncate,
    "CopyStmt": _copy,
    "VariableSetStmt": _variable_set,
    "AlterSystemStmt": _alter_system,
    "VacuumStmt": _vacuum,
    "GrantStmt": _grant,
    "GrantRoleStmt": _grant_role,
    "AlterTableStmt": _alter_table,
    "RenameStmt": _typed_ddl("ALTER", "renameType"),
    "AlterObjectSchemaStmt": _typed_ddl("ALTER", "objectType"),
    "AlterOwnerStmt": _typed_ddl("ALTER", "objectType"),
    "CommentStmt": _typed_ddl("COMMENT", "objtype"),
    "CreateStmt": _create_relation("CREATE TABLE"),
    "CreateForeignTableStmt": _create_relation("CREATE FOREIGN TABLE", "base"),
    "IndexStmt": _create_relation("CREATE INDEX"),
    "ViewStmt": _create_relation("CREATE VIEW", "view"),
    "CreateSeqStmt": _create_relation("CREATE SEQUENCE", "sequence"),
    "CreateTableAsStmt": _create_table_as,
    "CreateFunctionStmt": _create_function,
    "DefineStmt": _define,
    "TransactionStmt": _transaction,
    "PrepareStmt": _prepare,
    "DeclareCursorStmt": _declare,
    "ExecuteStmt": _execute,
    "FetchStmt": _fetch,
}


def _classify_tree(statements):
    facts = _Facts()
    outputs = ()
    for statement in statements:
        _visit(statement, facts, frozenset())
        outputs = _outputs(statement)
    return facts.freeze(outputs)


def _parse(sql):
    tree = orjson.loads(parser.parse_sql_json(sql))
    return [item.get("stmt") for item in tree.get("stmts", [])]


class _Cache:
    """
    A bounded least-recently-used cache of classifications.
    """

    def __init__(self, size):
        self.size = size
        self.entries = collections.OrderedDict()

    def get(self, key):
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
        return entry

    def put(self, key, value):
        self.entries[key] = value
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)


_cache = _Cache(CACHE_SIZE)
# Statements sent again with the very same text (prepared statements) skip
# even the normalisation.
_exact = _Cache(CACHE_SIZE)
EXACT_KEY_LIMIT = 1024


def classify(sql):
    """
    The L{Classification} of C{sql}.  SQL that does not parse gets a
    classification with only C{error} set.
    """
    short = len(sql) <= EXACT_KEY_LIMIT
    if short:
        found = _exact.get(sql)
        if found is not None:
            return found
    classification = _classify(sql)
    if short:
        _exact.put(sql, classification)
    return classification


def _classify(sql):
    try:
        key = parser.normalize(sql)
    except Exception as error:
        return Classification(error=_parse_error(error))
    if len(key) <= CACHE_KEY_LIMIT:
        found = _cache.get(key)
        if found is not None:
            return found
    try:
        statements = _parse(sql)
    except Exception as error:
        return Classification(error=_parse_error(error))
    classification = _classify_tree(statements)
    if len(key) <= CACHE_KEY_LIMIT:
        _cache.put(key, classification)
    return classification


def _parse_error(error):
    # The parser quotes the statement near the error ("syntax error at or
    # near '4111...'"), and this text goes into denials, the record and the
    # client's error: it is free text from the client like the statement.
    text, _ = redact.redact_text(str(error) or type(error).__name__)
    return text


def facts_of(session, command):
    """
    The classification of the SQL C{command}, made once and kept on the
    command (in C{metadata["sql"]}), its facts added to C{command.facts}
    so the record shows what the rules matched.  The PostgreSQL front end
    classifies every statement as it makes it (L{hoopgw.postgres.commands})
    when an addon of the chain reads the classification (its C{reads}
    names C{"sql"}); otherwise, or for a command built without its session
    (a test's), it is classified when an addon first asks.  Statements it
    names for later (PREPARE, DECLARE) are remembered for the session, and
    what an EXECUTE or FETCH runs is folded in.
    """
    found = command.metadata.get("sql")
    if found is not None:
        return found
    classification = classify(command.text)
    named = session.metadata.setdefault("sql.named", {}) if session is not None else {}
    for namespace, name, inner in classification.named:
        named.pop((namespace, name), None)
        named[(namespace, name)] = inner
        if len(named) > NAMED_KEPT:
            del named[next(iter(named))]
    for namespace, name in classification.uses:
        inner = named.get((namespace, name))
        if inner is not None:
            classification = classification.merged(inner)
        else:
            classification = attr.evolve(classification, labels=classification.labels | {"UNRESOLVED"})
    command.metadata["sql"] = classification
    command.facts.update(recorded_facts(classification))
    return classification


# The name addons and tests used before the front end classified.
for_command = facts_of


def recorded_facts(classification):
    """
    The facts of C{classification} as L{Command.facts} holds them (and so
    the record), worked out once per classification: statements differing
    only in constants share one.
    """
    found = classification.memo.get("facts")
    if found is None:
        found = classification.to_json()
        if "error" in found:
            found = {"sql_error": found["error"]}
        classification.memo["facts"] = found
    return found


# Every label a rule may name: the statement kinds above, their first
# words, categories, and details the handlers add.
DETAIL_LABELS = {
    "COPY TO", "COPY FROM", "COPY PROGRAM", "COPY FILE", "COPY BINARY", "VACUUM FULL", "ANALYZE",
    "SELECT INTO", "CREATE TABLE AS", "SELECT FOR UPDATE", "UPDATE WITHOUT WHERE", "DELETE WITHOUT WHERE",
    "SET ROLE", "SET SESSION AUTHORIZATION", "SET SEARCH_PATH", "RESET ROLE", "RESET SESSION AUTHORIZATION",
    "RESET SEARCH_PATH", "SET TRANSACTION", "MOVE", "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE",
    "PREPARE TRANSACTION", "COMMIT PREPARED", "ROLLBACK PREPARED", "GRANT", "REVOKE", "UNRESOLVED",
}


def known_label(label):
    """
    Whether a rule may name C{label}: a statement kind, its first word, a
    category or a detail the classifier adds.
    """
    if label in DETAIL_LABELS or label in _CATEGORY_WORDS or label in _KIND_OF_NODE.values():
        return True
    words = label.split(" ", 1)
    if words[0] in ("CREATE", "ALTER", "DROP", "GRANT", "REVOKE", "COMMENT"):
        return len(words) == 1 or is_object_type(words[1])
    return any(kind.split(" ", 1)[0] == label for kind in _KIND_OF_NODE.values())


def is_object_type(name):
    """
    Whether C{name} is an object type (TABLE, ROLE, FOREIGN TABLE ...).
    """
    known = set(_OBJECT_NAMES.values()) | {
        "TABLE", "VIEW", "INDEX", "SEQUENCE", "SCHEMA", "DATABASE", "ROLE", "FUNCTION", "PROCEDURE", "ROUTINE",
        "AGGREGATE", "TYPE", "DOMAIN", "EXTENSION", "TRIGGER", "RULE", "POLICY", "SERVER", "FOREIGN TABLE",
        "LANGUAGE", "COLLATION", "CONVERSION", "OPERATOR", "CAST", "TRANSFORM", "PUBLICATION", "SUBSCRIPTION",
        "TABLESPACE", "COLUMN", "ATTRIBUTE", "TABLE AS", "USER MAPPING", "OWNED",
    }
    return name in known
