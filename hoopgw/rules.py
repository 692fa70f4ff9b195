"""
The rule language and the one rules engine block and approve share.

A rule is a name and what it matches (L{Matcher}): SQL facts from the
classifier (L{hoopgw.sqlfacts}: kinds, object types, tables, writes,
functions, columns, a missing WHERE) or the facts of an SSH or Kubernetes
command (L{hoopgw.commandpolicy}).  A L{RuleSet} holds rules in order and
answers with the first that matches a command; for SQL the answer is
worked out once per classification (statements that differ only in their
constants share it).
"""

import fnmatch

import attr

from hoopgw import commandpolicy
from hoopgw import options as o
from hoopgw.options import ConfigError, join
from hoopgw import sqlfacts
from hoopgw.sqlfacts import is_object_type, known_label


def _kinds(value, path):
    labels = []
    for index, item in enumerate(o.string_list(value, path)):
        label = " ".join(item.upper().split())
        if not known_label(label):
            raise ConfigError(
                join(path, index),
                "%r is not a statement kind the gateway knows; use names such as SELECT, INSERT, DROP, "
                "DROP TABLE, TRUNCATE, GRANT, ALTER SYSTEM, COPY PROGRAM, SET ROLE, DO, LOCK, VACUUM FULL, "
                "DDL or DML" % (item,),
            )
        labels.append(label)
    return frozenset(labels)


def _object_types(value, path):
    names = []
    for index, item in enumerate(o.string_list(value, path)):
        name = " ".join(item.upper().split())
        if not is_object_type(name):
            raise ConfigError(join(path, index), "%r is not an object type (TABLE, VIEW, SCHEMA, ROLE, FUNCTION, ...)" % (item,))
        names.append(name)
    return frozenset(names)


@attr.s(frozen=True)
class Name:
    """
    A table or function name in a rule: an optional schema and a name,
    either with shell-style wildcards.
    """

    schema = attr.ib()
    name = attr.ib()

    @classmethod
    def parse(cls, text, path):
        parts = o.string(text, path).split(".")
        if len(parts) > 2 or not all(parts):
            raise ConfigError(path, "expected NAME or SCHEMA.NAME, got %r" % (text,))
        if len(parts) == 1:
            return cls(None, parts[0])
        return cls(parts[0], parts[1])

    def __str__(self):
        return "%s.%s" % (self.schema, self.name) if self.schema else self.name

    def matches_table(self, written, search_path):
        """
        Whether the relation C{written} (as a statement names it) may be
        this one.  An unqualified name may be any schema's relation of
        that name, so C{secret.cards} matches a bare C{cards}; a bare name
        matches C{SCHEMA.*} only if SCHEMA is on the search path.
        """
        schema, _, name = written.rpartition(".")
        if not fnmatch.fnmatchcase(name, self.name):
            return False
        if self.schema is None:
            return True
        if schema:
            return fnmatch.fnmatchcase(schema, self.schema)
        if not _has_wildcard(self.name):
            return True
        return any(fnmatch.fnmatchcase(entry, self.schema) for entry in search_path)

    def allows_table(self, written, search_path):
        """
        Whether an allow-list entry covers C{written}: a bare name must
        resolve, through the search path, to a schema the entry names, and
        a bare C{pg_*} name may be a catalog (searched first) unless the
        entry names it exactly.
        """
        schema, _, name = written.rpartition(".")
        if not fnmatch.fnmatchcase(name, self.name):
            return False
        if self.schema is None:
            return not (not schema and name.startswith("pg_") and _has_wildcard(self.name))
        if schema:
            return fnmatch.fnmatchcase(schema, self.schema)
        if name.startswith("pg_") and (self.schema != "pg_catalog" or _has_wildcard(self.name)):
            return False
        return any(fnmatch.fnmatchcase(entry, self.schema) for entry in search_path)

    def matches_function(self, called):
        schema, _, name = called.rpartition(".")
        if not fnmatch.fnmatchcase(name, self.name):
            return False
        if self.schema is None or not schema:
            return True
        return fnmatch.fnmatchcase(schema, self.schema)


def _has_wildcard(text):
    return any(character in text for character in "*?[")


def _names(value, path):
    return tuple(Name.parse(item, join(path, index)) for index, item in enumerate(o.string_list(value, path)))


SQL_KEYS = ("kinds", "object_types", "tables", "writes", "functions", "columns", "without_where")
MATCHER_KEYS = SQL_KEYS + commandpolicy.KEYS

MATCHER_OPTIONS = (
    o.Option("kinds", _kinds, None, "Statement kinds, e.g. DROP, DROP TABLE, TRUNCATE, GRANT, DDL, DML."),
    o.Option("object_types", _object_types, None, "Object types created, altered, dropped or granted on."),
    o.Option("tables", _names, None, "Tables read or written (NAME or SCHEMA.NAME, wildcards allowed)."),
    o.Option("writes", _names, None, "Tables written (inserted into, updated, deleted from, altered, dropped ...)."),
    o.Option("functions", _names, None, "Functions called (NAME or SCHEMA.NAME, wildcards allowed)."),
    o.Option("columns", o.string_set, None, "Column names referenced."),
    o.Option("without_where", o.boolean, None, "An UPDATE or DELETE without a WHERE clause naming a column."),
) + commandpolicy.OPTIONS


@attr.s(frozen=True)
class Matcher:
    """
    Facts a rule requires: every field given must match (and within a
    field, any entry).  SQL statements meet the SQL fields; other commands
    (SSH, Kubernetes) meet L{command}, a
    L{hoopgw.commandpolicy.CommandMatcher}.
    """

    kinds = attr.ib(default=None)
    object_types = attr.ib(default=None)
    tables = attr.ib(default=None)
    writes = attr.ib(default=None)
    functions = attr.ib(default=None)
    columns = attr.ib(default=None)
    without_where = attr.ib(default=None)
    command = attr.ib(default=None)

    @property
    def sql(self):
        """
        Whether this matcher needs SQL facts (it matches SQL commands only).
        """
        return any(getattr(self, key) is not None for key in SQL_KEYS)

    @property
    def on_facts(self):
        """
        Whether the answer depends on a command's facts, not only on its
        SQL text.
        """
        return self.command is not None

    def match_command(self, command):
        """
        Match a command that is not SQL by its facts.

        @return: a list of sentences saying what matched, or None.
        """
        if self.sql or self.command is None:
            return None
        return self.command.match(command)

    @classmethod
    def parse(cls, raw, path, extra=()):
        """
        A matcher from a rule's mapping; C{extra} are the rule's other
        declared options, returned alongside.

        @return: C{(Matcher, dict of the extra options)}.
        """
        values = o.parse_options(MATCHER_OPTIONS + tuple(extra), raw, path)
        fields = {key: values.pop(key) for key in SQL_KEYS}
        command = commandpolicy.CommandMatcher.from_values({key: values.pop(key) for key in commandpolicy.KEYS})
        if command is None and all(value is None for value in fields.values()):
            raise ConfigError(path, "a rule needs at least one of %s" % (", ".join(MATCHER_KEYS),))
        if command is not None and command.commands_only and any(value is not None for value in fields.values()):
            sql = sorted(key for key in SQL_KEYS if fields[key] is not None)
            other = sorted(key for key in commandpolicy.COMMAND_KEYS if getattr(command, key) is not None)
            raise ConfigError(
                path,
                "this rule names SQL facts (%s) and facts of SSH or Kubernetes commands (%s), which no "
                "command has together; make them two rules" % (", ".join(sql), ", ".join(other)),
            )
        return cls(command=command, **fields), values

    def match(self, facts, search_path):
        """
        @return: a list of sentences saying what matched, or None.
        """
        why = []
        if self.kinds is not None:
            found = sorted(self.kinds & facts.labels)
            if not found:
                return None
            why.append("kind %s" % (", ".join(found),))
        if self.object_types is not None:
            found = sorted(self.object_types & facts.object_types)
            if not found:
                return None
            why.append("object type %s" % (", ".join(found),))
        for field, noun in (("tables", "table"), ("writes", "writes to")):
            names = getattr(self, field)
            if names is not None:
                found = sorted(
                    table for table in getattr(facts, field) if any(n.matches_table(table, search_path) for n in names)
                )
                if not found:
                    return None
                why.append("%s %s" % (noun, ", ".join(found)))
        if self.functions is not None:
            found = sorted(call for call in facts.functions if any(n.matches_function(call) for n in self.functions))
            if not found:
                return None
            why.append("function %s" % (", ".join(found),))
        if self.columns is not None:
            found = sorted(self.columns & facts.columns)
            if not found:
                return None
            why.append("column %s" % (", ".join(found),))
        if self.without_where is not None:
            if facts.without_where != self.without_where:
                return None
            why.append("no WHERE clause" if self.without_where else "a WHERE clause")
        return why

    def match_sql(self, facts, search_path, command):
        """
        Match a SQL command: its classification, and its facts if the
        matcher names any.
        """
        why = self.match(facts, search_path) if self.sql else []
        if why is None:
            return None
        if self.command is not None:
            more = self.command.match(command)
            if more is None:
                return None
            why = why + more
        return why


# Statements an allow-list connection may always run: transaction control
# and session housekeeping, which read and write nothing.
HARMLESS_KINDS = frozenset(
    {
        "TRANSACTION", "SHOW", "SET", "RESET", "SET TRANSACTION", "SET CONSTRAINTS", "DISCARD", "DEALLOCATE",
        "CLOSE", "FETCH", "MOVE", "EXECUTE", "DECLARE", "PREPARE", "EXPLAIN", "LISTEN", "UNLISTEN",
    }
)
# Kinds that stay out of an allow-list even though they look like SET.
_NEVER_HARMLESS = frozenset({"SET ROLE", "SET SESSION AUTHORIZATION", "SET SEARCH_PATH", "UNRESOLVED"})


@attr.s(frozen=True)
class AllowList:
    """
    Allow-list mode: only these kinds on these tables.
    """

    kinds = attr.ib()
    tables = attr.ib()

    OPTIONS = (
        o.Option("kinds", _kinds, frozenset({"SELECT"}), "The statement kinds allowed (SELECT by default)."),
        o.Option("tables", _names, (), "The tables those statements may touch (NAME or SCHEMA.NAME, wildcards allowed)."),
    )

    @classmethod
    def parse(cls, raw, path):
        values = o.parse_options(cls.OPTIONS, raw, path)
        return cls(kinds=values["kinds"], tables=values["tables"])

    def refuse(self, facts, search_path):
        """
        @return: a sentence saying what is not allowed, or None.
        """
        outside = sorted(
            kind for kind in facts.kinds if kind not in self.kinds and kind not in HARMLESS_KINDS
        ) + sorted(label for label in facts.labels & _NEVER_HARMLESS if label not in self.kinds)
        if outside:
            return "%s is not in this connection's allow-list (%s)" % (", ".join(outside), ", ".join(sorted(self.kinds)))
        tables = sorted(
            table for table in facts.tables if not any(n.allows_table(table, search_path) for n in self.tables)
        )
        if tables:
            return "the table%s %s %s not in this connection's allow-list" % (
                "s" if len(tables) > 1 else "",
                ", ".join(tables),
                "are" if len(tables) > 1 else "is",
            )
        return None


def unique_names(rules, path, name_of=lambda rule: rule.name):
    """
    Check that no two of C{rules} share a name (a denial or an approval
    names its rule, so the name must say which one).

    @return: C{rules}.
    """
    names = [name_of(rule) for rule in rules]
    for index, name in enumerate(names):
        if names.index(name) != index:
            raise ConfigError(join(join(path, index), "name"), "another rule is already named %r" % (name,))
    return rules


class RuleSet:
    """
    Rules in order, the first that matches a command answering for all:
    the engine block and approve share.

    SQL commands meet the rules through their classification (made once,
    by the front end: L{hoopgw.sqlfacts.facts_of}), other commands through
    their facts.  Unless a rule names a command's facts (which vary with
    more than the statement's text), the answer for SQL is worked out once
    per classification and kept on it.

    @ivar rules: C{(rule, Matcher)} pairs, in order.
    """

    def __init__(self, rules, search_path=("public",)):
        self.rules = list(rules)
        self.search_path = tuple(search_path)
        # The rules a SQL statement may meet: not those naming only facts
        # of SSH or Kubernetes commands (programs, verbs ...), which no
        # statement has.  The baseline has such rules, and they must not
        # stop the answer for SQL being kept per classification.
        self.sql_rules = [
            (rule, matcher) for rule, matcher in self.rules
            if matcher.command is None or matcher.sql or not matcher.command.commands_only
        ]
        self.on_facts = any(matcher.on_facts for _, matcher in self.sql_rules)
        self._key = ("rules", id(self))

    def __len__(self):
        return len(self.rules)

    def first(self, session, command):
        """
        The first rule C{command} matches, as C{(rule, reasons)} (a list of
        sentences saying what matched), or None.  SQL that does not parse
        matches no rule: the caller decides what that means.
        """
        if command.kind != "sql":
            for rule, matcher in self.rules:
                why = matcher.match_command(command)
                if why is not None:
                    return rule, why
            return None
        facts = sqlfacts.facts_of(session, command)
        if facts.error:
            return None
        if self.on_facts:
            return self._first_sql(facts, command)
        memo = facts.memo
        if self._key not in memo:
            memo[self._key] = self._first_sql(facts, None)
        return memo[self._key]

    def _first_sql(self, facts, command):
        for rule, matcher in self.sql_rules:
            if command is not None:
                why = matcher.match_sql(facts, self.search_path, command)
            else:
                why = matcher.match(facts, self.search_path)
            if why is not None:
                return rule, why
        return None
