"""
The sensitive columns of one PostgreSQL connection, enforced before a
statement runs: the target's catalog (read with the gateway's own
credentials, cached for the connection, refreshed on a timer, after DDL
and when a statement names a relation it does not know), each session's
search path, cursors and prepared statements, and the verdict of the
column policy on every statement.  The mask addon owns one.
"""

import collections

import attr
from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import columnpolicy
from hoopgw import sqlfacts
from hoopgw.model import OK
from hoopgw.postgres import catalog as catalog_module
from hoopgw.postgres import lineage


# Statements analysed, kept per connection (oldest dropped).
CACHE_SIZE = 4096
# Longer statements (bulk INSERTs) are analysed every time.
CACHE_KEY_LIMIT = 8192
# A statement naming a relation the catalog lacks refreshes it, at most
# this often (seconds).
UNKNOWN_REFRESH = 5.0
# Cursors and prepared statements remembered per session.
NAMED_KEPT = 1000
# Search paths a session may use (each is checked for every unqualified
# name it writes afterwards).
SEARCH_PATHS_KEPT = 32


class CatalogUnavailable(Exception):
    pass


class _SessionState:
    __slots__ = ("search_path", "alternatives", "named")

    def __init__(self):
        # None: the catalog's (the target role's default).
        self.search_path = None
        self.alternatives = set()
        self.named = collections.OrderedDict()


class ColumnGuard:
    """
    @param sensitive: C{{(database or None, schema, table, column): kind}}.
    @param patterns: the mask addon's column name patterns (fallback: a
        table column whose name matches is sensitive authentication data).
    @param fetch: C{fetch()} -> Deferred firing with a catalog document.
    @param clock: C{clock()} -> seconds.
    """

    log = Logger()

    def __init__(self, sensitive, patterns, policy, fetch, clock, refresh=300.0):
        self.sensitive = sensitive
        self.patterns = patterns
        self.policy = policy
        self.fetch = fetch
        self.clock = clock
        self.refresh = refresh
        self.catalog = None
        self.loaded = None
        self.dirty = False
        self.error = None
        self._fetching = None
        self._version = 0
        # Configured columns the catalog does not have (a typo, a rename).
        self.missing = []
        self._cache = collections.OrderedDict()

    # The catalog.

    def _stale(self):
        return self.catalog is None or self.dirty or self.clock() - self.loaded >= self.refresh

    def load(self):
        """
        Read the catalog now (one read at a time for the connection).

        @return: a L{Deferred} firing when the catalog is current, or with
            L{CatalogUnavailable} when there is none.
        """
        if self._fetching is None:
            self.dirty = False
            fetching = self._fetching = defer.Deferred()
            defer.maybeDeferred(self.fetch).addBoth(self._loaded).addBoth(fetching.callback)
        else:
            fetching = self._fetching
        waiting = defer.Deferred()
        fetching.addBoth(lambda result: (waiting.callback(None), result)[1])
        return waiting.addCallback(self._usable)

    def _loaded(self, result):
        self._fetching = None
        snapshot = None
        if hasattr(result, "getErrorMessage"):
            message = result.getErrorMessage()
        else:
            try:
                snapshot = lineage.Catalog.from_json(result, self.sensitive, self.patterns, self._version + 1)
            except Exception as error:
                # The target's answer is not a catalog the gateway can read.
                message = "the catalog is malformed (%s: %s)" % (type(error).__name__, error)
        if snapshot is None:
            self.error = message
            self.log.warn("Cannot read the target's catalog: {error}", error=message)
            if self.catalog is not None:
                # Keep the last snapshot; try again after another interval.
                self.loaded = self.clock()
            return None
        self._version += 1
        self.catalog = snapshot
        self.loaded = self.clock()
        self.error = None
        self._cache.clear()
        catalog = self.catalog
        self.missing = sorted(
            "%s.%s.%s" % (schema, table, column)
            for (database, schema, table, column) in self.sensitive
            if database in (None, catalog.database) and "%s.%s.%s" % (schema, table, column) not in catalog.kinds
        )
        for column in self.missing:
            self.log.warn(
                "The sensitive column {column} is not in the target's catalog; check sensitive_columns",
                column=column,
            )
        return None

    def use_document(self, document):
        """
        Take C{document} as the catalog now (C{hoopgw explain}, which read
        it itself).
        """
        self._loaded(document)

    def _usable(self, _):
        if self.catalog is None:
            raise CatalogUnavailable(
                "the gateway could not read the target's catalog to find the sensitive columns (%s); "
                "statements are refused until it can" % (self.error,)
            )
        return self.catalog

    def session_started(self, session):
        session.metadata["mask.columns"] = _SessionState()
        if self._stale():
            # A failure is reported on the session's first statement.
            return self.load().addBoth(lambda _: self._describe(session))
        self._describe(session)
        return None

    # Sensitive columns listed on a session's start, at most.
    LISTED = 100

    def _describe(self, session):
        """
        The session's start says which sensitive columns the catalog has,
        how each was found, and which configured ones it lacks.
        """
        catalog = self.catalog
        if catalog is None:
            session.attributes["sensitive_columns"] = {"catalog": "unavailable: %s" % (self.error,)}
            return None
        columns = sorted(catalog.kinds.items())
        summary = {
            "columns": {
                column: "%s (%s)" % (kind, catalog.sources.get(column, "configured"))
                for column, kind in columns[: self.LISTED]
            },
            "catalog_version": catalog.version,
        }
        if len(columns) > self.LISTED:
            summary["more"] = len(columns) - self.LISTED
        if self.missing:
            summary["missing"] = list(self.missing[: self.LISTED])
        session.attributes["sensitive_columns"] = summary
        return None

    # Statements.

    def check(self, session, command):
        """
        The column policy's verdict on C{command}, with its analysis.

        @return: C{(Analysis, Verdict)}, or a L{Deferred} firing with it.
        """
        if self._stale():
            return self.load().addCallback(lambda _: self._check(session, command, True))
        return self._check(session, command, False)

    def check_now(self, session, command):
        """
        L{check} with the catalog as it is, never read again (C{hoopgw
        explain}).
        """
        return self._check(session, command, True)

    def _check(self, session, command, refreshed):
        state = session.metadata.get("mask.columns")
        if state is None:
            state = session.metadata["mask.columns"] = _SessionState()
        analysis = self._analyse(state, command.text)
        if analysis.unknown and not refreshed and self.clock() - self.loaded >= UNKNOWN_REFRESH:
            # A relation created since the snapshot (by another client).
            return self.load().addCallback(lambda _: self._check(session, command, True))
        analysis = self._remember(state, analysis)
        command.metadata["mask.analysis"] = analysis
        return analysis, columnpolicy.evaluate(analysis, self.policy)

    def _analyse(self, state, text):
        catalog = self.catalog
        path = state.search_path if state.search_path is not None else catalog.search_path
        alternatives = tuple(sorted(state.alternatives - {path}))
        key = (text, path, alternatives)
        found = self._cache.get(key)
        if found is not None:
            self._cache.move_to_end(key)
            return found
        try:
            analyses = lineage.analyse(text, catalog, path, alternatives, state.named)
        except Exception as error:
            analysis = lineage.Analysis()
            analysis.unresolved.append("the statement cannot be parsed (%s), so its columns cannot be followed" % (
                str(error).splitlines()[0] if str(error) else type(error).__name__,))
            return analysis
        if len(analyses) != 1:
            analysis = lineage.Analysis()
            analysis.unresolved.append("one command holds %d statements; send them one at a time" % (len(analyses),))
            return analysis
        (analysis,) = analyses
        if analysis.kind not in ("FetchStmt", "ExecuteStmt") and len(text) <= CACHE_KEY_LIMIT:
            self._cache[key] = analysis
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return analysis

    def _remember(self, state, analysis):
        catalog = self.catalog
        if analysis.search_path is not None and len(state.alternatives) >= SEARCH_PATHS_KEPT:
            analysis = _copy(analysis)
            analysis.unresolved.append(
                "this session has already used %d search paths; qualify names with their schema instead"
                % (SEARCH_PATHS_KEPT,)
            )
            return analysis
        if analysis.search_path is not None:
            current = state.search_path if state.search_path is not None else catalog.search_path
            state.alternatives.add(current)
            state.search_path = analysis.search_path or None
            state.alternatives.add(state.search_path or catalog.search_path)
        return analysis

    def _named(self, state, analysis):
        named = state.named
        kind = analysis.kind
        if kind == "DeclareCursorStmt" and analysis.cursor:
            self._name(state, ("cursor", analysis.cursor), analysis)
        elif kind == "PrepareStmt" and analysis.prepared:
            self._name(state, ("prepared", analysis.prepared), analysis)
        elif kind in ("ClosePortalStmt", "DeallocateStmt", "DiscardStmt"):
            which = "cursor" if kind == "ClosePortalStmt" else "prepared"
            name = analysis.cursor if kind == "ClosePortalStmt" else analysis.prepared
            for key in list(named):
                if (key[0] == which and (name in (None, "*") or key[1] == name)) or kind == "DiscardStmt":
                    del named[key]

    def _name(self, state, key, analysis):
        named = state.named
        named.pop(key, None)
        named[key] = analysis
        if len(named) > NAMED_KEPT:
            named.popitem(last=False)

    def function_problem(self, oid):
        """
        Why a fastpath call of the function C{oid} cannot be followed, or
        None (built-in functions only see what the client sends them).
        """
        if self.catalog is None:
            return "the gateway could not read the target's catalog (%s); function calls are refused" % (self.error,)
        function = self.catalog.function_oids.get(oid)
        if function is None:
            return None
        problem = self.catalog.function_problem(function)
        if problem is None:
            return None
        return "the function %s.%s %s; a fastpath call of it cannot be followed" % (
            function.schema, function.name, problem)

    def finished(self, session, command):
        """
        A cursor or prepared statement is known by what it was declared
        with once the target has accepted it (a name the target refuses
        keeps its old statement there).  DDL may have changed what the
        catalog says: read it again before the next statement.
        """
        if command.kind != "sql" or self.catalog is None:
            return
        analysis = command.metadata.get("mask.analysis")
        state = session.metadata.get("mask.columns")
        if analysis is not None and state is not None and command.outcome.get("status") == OK:
            self._named(state, analysis)
        facts = sqlfacts.facts_of(session, command)
        if "DDL" in facts.labels or facts.kinds & {"CREATE TABLE AS", "SELECT INTO", "REFRESH MATERIALIZED VIEW"}:
            self.dirty = True


def _copy(analysis):
    """
    A copy of a (cached, shared) analysis that may be added to.
    """
    return attr.evolve(analysis, unresolved=list(analysis.unresolved))


def target_fetcher(reactor, target):
    """
    A C{fetch} for L{ColumnGuard} reading C{target}'s catalog (bounded by
    L{catalog_module.FETCH_TIMEOUT}).
    """
    return lambda: catalog_module.fetch(reactor, target)
