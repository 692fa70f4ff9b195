"""
Column lineage and the column policy without a server: a catalog
snapshot written by hand, statements analysed to C{schema.table.column},
the verdicts of the default policy, the COPY column masker, and the
catalog cache of L{hoopgw.postgres.guard.ColumnGuard}.
"""

import re

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial import unittest

from hoopgw import columnpolicy, masking, testing
from hoopgw.addons import mask
from hoopgw.options import ConfigError
from hoopgw.postgres import guard as guard_module
from hoopgw.postgres import lineage
from hoopgw.postgres import values as postgres_values


DOCUMENT = {
    "database": "payments",
    "search_path": ["public"],
    "relations": [
        {"schema": "vault", "name": "cards", "kind": "r",
         "columns": [["id", "integer"], ["holder", "text"], ["pan", "text"], ["cvv", "text"], ["amount", "numeric"]]},
        {"schema": "public", "name": "shops", "kind": "r", "columns": [["id", "integer"], ["label", "text"]]},
        {"schema": "public", "name": "cards", "kind": "r", "columns": [["id", "integer"], ["pan", "text"]]},
        {"schema": "public", "name": "legacy", "kind": "r", "columns": [["id", "integer"], ["cvc2", "text"]]},
        {"schema": "public", "name": "card_view", "kind": "v", "columns": [["card", "text"], ["who", "text"]],
         "definition": " SELECT c.pan AS card, c.holder AS who FROM vault.cards c;"},
        {"schema": "public", "name": "view_of_view", "kind": "v", "columns": [["x", "text"]],
         "definition": " SELECT card_view.card AS x FROM card_view;"},
        {"schema": "vault", "name": "gen", "kind": "r",
         "columns": [["pan", "text"], ["tail", "text", "reverse(pan)"]]},
    ],
    "functions": [
        {"schema": "public", "name": "leak", "language": "sql", "body": "select pan from vault.cards"},
        {"schema": "public", "name": "add_one", "language": "sql", "body": "select $1 + 1"},
        {"schema": "public", "name": "run", "language": "plpgsql", "body": "begin return query execute $1; end"},
        {"schema": "public", "name": "wrapper", "language": "sql", "body": "select * from public.leak()"},
        {"schema": "public", "name": "snake", "language": "plpython3u", "body": "return 1"},
    ],
}

SENSITIVE = {
    ("payments", "vault", "cards", "pan"): "pan",
    ("payments", "vault", "cards", "cvv"): "sad",
    (None, "vault", "gen", "pan"): "pan",
}
PATTERNS = [re.compile(pattern, re.I) for pattern in masking.DEFAULT_COLUMNS]


def catalog():
    return lineage.Catalog.from_json(DOCUMENT, SENSITIVE, PATTERNS)


def analyse(sql, **keywords):
    (analysis,) = lineage.analyse(sql, catalog(), **keywords)
    return analysis


def outputs(sql):
    """
    Each output column as C{{column: via}} of its sensitive flows.
    """
    return [
        {flow.column: flow.via for flow in output.flows if flow.kind}
        for output in analyse(sql).outputs
    ]


class LineageTests(unittest.TestCase):
    """
    Columns followed to C{schema.table.column}.
    """

    def test_plain_columns(self):
        """
        Aliases, subqueries with column lists, CTEs, joins, C{*}, C{t.*}
        and C{(row).column} keep a plain column plain.
        """
        plain = {"vault.cards.pan": ()}
        for sql in (
            "SELECT pan FROM vault.cards",
            "SELECT c.pan AS x FROM vault.cards c",
            "SELECT y FROM (SELECT pan FROM vault.cards) s(y)",
            "WITH w AS (SELECT pan AS p FROM vault.cards) SELECT p FROM w",
            "SELECT (c).pan FROM vault.cards c",
            "SELECT pan::text FROM vault.cards",
            "SELECT (SELECT pan FROM vault.cards LIMIT 1)",
            "SELECT c.pan FROM public.shops s JOIN vault.cards c ON c.id = s.id",
        ):
            self.assertEqual(outputs(sql), [plain], sql)
        star = outputs("SELECT * FROM vault.cards")
        self.assertEqual(star, [{}, {}, plain, {"vault.cards.cvv": ()}, {}])
        self.assertEqual(outputs("SELECT s.*, c.* FROM public.shops s, vault.cards c")[4], plain)
        self.assertEqual(outputs("SELECT (c).* FROM vault.cards c")[2], plain)

    def test_transformations(self):
        """
        Functions, operators, casts, aggregates and whole-row references
        are named in C{via}.
        """
        self.assertEqual(outputs("SELECT reverse(pan) FROM vault.cards"), [{"vault.cards.pan": ("reverse(vault.cards.pan)",)}])
        self.assertEqual(outputs("SELECT pan || 'x' FROM vault.cards"), [{"vault.cards.pan": ("vault.cards.pan || …",)}])
        self.assertEqual(
            outputs("SELECT pan::bytea FROM vault.cards"), [{"vault.cards.pan": ("CAST(vault.cards.pan AS bytea)",)}]
        )
        (whole,) = outputs("SELECT row_to_json(c) FROM vault.cards c")
        self.assertEqual(whole["vault.cards.cvv"], ("whole row c", "row_to_json(whole row c)"))
        (whole,) = outputs("SELECT json_agg(cards) FROM vault.cards")
        self.assertEqual(whole["vault.cards.pan"], ("whole row cards", "json_agg(whole row cards)"))
        self.assertEqual(outputs("SELECT count(pan) FROM vault.cards"), [{}])
        # A name a function's row of unknown columns might also hold.
        (inner,) = outputs("SELECT (SELECT reverse(pan) FROM generate_series(1, 1) g) FROM vault.cards")
        self.assertEqual(inner, {"vault.cards.pan": ("reverse(vault.cards.pan)",)})
        (whole,) = outputs("SELECT c FROM vault.cards c, generate_series(1, 2) g")
        self.assertEqual(whole["vault.cards.cvv"], ("whole row c",))

    def test_views_search_path_and_sets(self):
        """
        Views are followed through their definitions, recursively; an
        unqualified name resolves through the search path; a UNION's
        column carries both sides; a recursive CTE follows its recursion.
        """
        self.assertEqual(outputs("SELECT x FROM view_of_view"), [{"vault.cards.pan": ()}])
        self.assertEqual(outputs("SELECT upper(card) FROM card_view"), [{"vault.cards.pan": ("upper(vault.cards.pan)",)}])
        self.assertEqual(outputs("SELECT pan FROM cards"), [{}])
        (analysis,) = lineage.analyse("SELECT pan FROM cards", catalog(), ("vault", "public"))
        self.assertEqual(analysis.outputs[0].flows, {lineage.Flow("vault.cards.pan", "pan")})
        self.assertEqual(
            outputs("SELECT label FROM public.shops UNION SELECT pan FROM vault.cards"), [{"vault.cards.pan": ()}]
        )
        (recursive,) = analyse(
            "WITH RECURSIVE r(n, p) AS (SELECT 1, pan FROM vault.cards UNION ALL "
            "SELECT n + 1, substr(p, 2) FROM r WHERE n < 3) SELECT p FROM r"
        ).outputs
        vias = {flow.via for flow in recursive.flows if flow.column == "vault.cards.pan"}
        self.assertIn((), vias)
        self.assertIn(("substr(vault.cards.pan)",), vias)

    def test_predicates(self):
        """
        Uses outside the output are classified: equality, pattern, range,
        expression, sort.
        """
        cases = {
            "SELECT id FROM vault.cards WHERE pan = $1": lineage.EQUALITY,
            "SELECT id FROM vault.cards WHERE pan IN ('a', 'b')": lineage.EQUALITY,
            "SELECT id FROM vault.cards WHERE pan LIKE '4%'": lineage.PATTERN,
            "SELECT id FROM vault.cards WHERE pan ~ '^4'": lineage.PATTERN,
            "SELECT id FROM vault.cards WHERE pan BETWEEN '4' AND '5'": lineage.RANGE,
            "SELECT id FROM vault.cards WHERE pan > '4'": lineage.RANGE,
            "SELECT id FROM vault.cards WHERE substr(pan, 1, 1) = '4'": lineage.EXPRESSION,
            "SELECT id FROM vault.cards ORDER BY pan": lineage.SORT,
            "SELECT pan, count(*) FROM vault.cards GROUP BY pan": lineage.EQUALITY,
            "SELECT a.id FROM vault.cards a JOIN vault.cards b ON a.pan = b.pan": lineage.EQUALITY,
        }
        for sql, use in cases.items():
            uses = {entry.use for entry in analyse(sql).uses}
            self.assertEqual(uses, {use}, sql)

    def test_unresolvable(self):
        """
        What cannot be followed is said: a function whose body reads a
        sensitive table, dynamic SQL, statistics, an unknown cursor, a
        name whose meaning changed with the search path.
        """
        cases = {
            "SELECT * FROM leak()": "reads",
            "SELECT * FROM run('select 1')": "dynamic SQL",
            "SELECT query_to_xml('select pan from vault.cards', true, true, '')": "SQL given as text",
            "SELECT * FROM pg_stats": "samples",
            "FETCH ALL FROM somewhere": "not declared through the gateway",
            "DO $$ BEGIN PERFORM pan FROM vault.cards; END $$": "reads",
            "SELECT * FROM wrapper()": "calls public.leak, which reads",
            "SELECT snake()": "plpython3u",
            "DO LANGUAGE plperl $$ spi_exec_query('select 1') $$": "plperl",
            "SELECT pg_read_binary_file('base/1/2')": "server's files",
            "COPY public.shops FROM '/tmp/x'": "COPY FROM a server file",
        }
        for sql, words in cases.items():
            unresolved = " ".join(analyse(sql).unresolved)
            self.assertIn(words, unresolved, sql)
        self.assertEqual(analyse("SELECT add_one(id) FROM vault.cards").unresolved, [])
        (analysis,) = lineage.analyse("SELECT pan FROM cards", catalog(), ("public",), alternatives=(("vault",),))
        self.assertIn("may mean vault.cards", analysis.unresolved[0])

    def test_writes_copy_and_generated(self):
        """
        INSERT ... SELECT and UPDATE SET carry columns into other columns;
        COPY TO lists the table's columns; a generated column carries the
        column it is computed from; the name pattern marks cvc2 as sad.
        """
        (write,) = analyse("INSERT INTO public.shops (label) SELECT pan FROM vault.cards").writes
        self.assertEqual((write.target, write.flow.column), ("public.shops.label", "vault.cards.pan"))
        (write,) = analyse("UPDATE vault.cards SET holder = cvv").writes
        self.assertEqual(write.target, "vault.cards.holder")
        self.assertEqual(analyse("INSERT INTO vault.cards VALUES (1, 'a', '4111', '123', 1)").writes, [])
        copy = analyse("COPY vault.cards (cvv, pan) TO STDOUT WITH (FORMAT csv)")
        self.assertEqual([output.name for output in copy.outputs], ["cvv", "pan"])
        self.assertEqual(copy.copy["format"], "csv")
        (tail,) = outputs("SELECT tail FROM vault.gen")
        self.assertEqual(tail["vault.gen.pan"], ("reverse(vault.gen.pan)", "generated column"))
        self.assertEqual(outputs("SELECT cvc2 FROM public.legacy"), [{"public.legacy.cvc2": ()}])


class PolicyTests(unittest.TestCase):
    """
    The default column policy's verdicts.
    """

    def verdict(self, sql, policy=None):
        return columnpolicy.evaluate(analyse(sql), policy or columnpolicy.Policy())

    def test_defaults(self):
        """
        A plain pan column is masked, a plain sad column removed; a
        transformed one of either is refused; equality lookups pass and
        pattern matches do not; unresolvable statements are refused.
        """
        verdict = self.verdict("SELECT * FROM vault.cards")
        self.assertEqual(verdict.action, columnpolicy.ALLOW)
        self.assertEqual(verdict.positions, {2: "pan", 3: "sad"})
        for sql, rule in (
            ("SELECT reverse(pan) FROM vault.cards", "mask:pan-transform"),
            ("SELECT cvv || '' FROM vault.cards", "mask:sad"),
            ("SELECT id FROM vault.cards WHERE pan LIKE '4%'", "mask:pattern"),
            ("SELECT id FROM vault.cards WHERE cvv = '123'", "mask:sad-predicate"),
            ("SELECT * FROM leak()", "mask:unresolved"),
            ("INSERT INTO public.shops (label) SELECT pan FROM vault.cards", "mask:copy-out"),
            ("ALTER TABLE vault.cards RENAME COLUMN pan TO p", "mask:ddl"),
            ("COPY vault.cards TO '/tmp/cards'", "mask:copy-format"),
        ):
            verdict = self.verdict(sql)
            self.assertEqual((verdict.action, verdict.first(columnpolicy.DENY).rule), (columnpolicy.DENY, rule), sql)
        self.assertEqual(self.verdict("SELECT id FROM vault.cards WHERE pan = $1").action, columnpolicy.ALLOW)
        self.assertEqual(self.verdict("EXPLAIN SELECT reverse(pan) FROM vault.cards").action, columnpolicy.ALLOW)
        self.assertEqual(self.verdict("EXPLAIN ANALYZE SELECT reverse(pan) FROM vault.cards").action, columnpolicy.DENY)
        analyzed = self.verdict("EXPLAIN ANALYZE SELECT pan FROM vault.cards")
        self.assertEqual((analyzed.action, analyzed.positions), (columnpolicy.ALLOW, {}))

    def test_configured(self):
        """
        Each kind of use follows its configured action; sad output never
        does.
        """
        policy = columnpolicy.Policy.parse({"transform": "approve", "pattern": "allow"}, "policy")
        self.assertEqual(self.verdict("SELECT reverse(pan) FROM vault.cards", policy).action, columnpolicy.APPROVE)
        self.assertEqual(self.verdict("SELECT id FROM vault.cards WHERE pan LIKE '4%'", policy).action, columnpolicy.ALLOW)
        self.assertEqual(self.verdict("SELECT upper(cvv) FROM vault.cards", policy).action, columnpolicy.DENY)
        with self.assertRaises(ConfigError) as raised:
            columnpolicy.Policy.parse({"pattern": "maybe"}, "policy")
        self.assertIn("pattern", str(raised.exception))

    def test_sensitive_columns_option(self):
        """
        Entries are DATABASE.SCHEMA.TABLE.COLUMN or SCHEMA.TABLE.COLUMN
        with a kind; anything else names the entry.
        """
        parsed = columnpolicy.sensitive_columns({"payments.public.cards.pan": "pan", "public.cards.cvv": "sad"}, "s")
        self.assertEqual(
            parsed, {("payments", "public", "cards", "pan"): "pan", (None, "public", "cards", "cvv"): "sad"}
        )
        for bad in ({"cards.pan": "pan"}, {"a.b.c.d": "secret"}):
            self.assertRaises(ConfigError, columnpolicy.sensitive_columns, bad, "s")


class CopyMaskerTests(unittest.TestCase):
    """
    COPY streams masked column by column, cut anywhere.
    """

    def test_text_and_csv(self):
        """
        Text rows split at any byte are masked by position (the card
        number whatever its Luhn check, the CVV removed), an escaped
        delimiter stays inside its value; CSV quotes and a header are
        respected.
        """
        data = b"1\ta\\tb\t4111111111111112\t123\n2\tz\t5500000000000004\t\\N\n"
        for cut in range(len(data)):
            copier = masking.CopyColumnMasker(masking.Masker(), {2: "pan", 3: "sad"})
            first, _ = copier.feed(data[:cut])
            second, _ = copier.feed(data[cut:], final=True)
            self.assertEqual(
                first + second, b"1\ta\\tb\t411111******1112\t***\n2\tz\t550000******0004\t\\N\n", cut
            )
        copier = masking.CopyColumnMasker(masking.Masker(), {1: "pan", 2: "sad"}, csv=True, header=True, width=3)
        out, _ = copier.feed(b'id,pan,cvv\n1,"4111111111111111","12\n3"\n', final=True)
        self.assertEqual(out, b'id,pan,cvv\n1,"411111******1111",***\n')

    def test_row_of_another_width(self):
        """
        A row that does not cut into the statement's number of columns
        (bytes of a multi-byte encoding read as a delimiter) is not sent.
        """
        copier = masking.CopyColumnMasker(masking.Masker(), {1: "sad"}, width=2)
        with self.assertRaises(masking.MaskingError):
            copier.feed(b"1\t917\textra\n")


class GuardTests(unittest.TestCase):
    """
    The catalog cache: read at session start, again after DDL, on a
    timer, when a statement names an unknown relation; refusal without
    one.
    """

    def setUp(self):
        self.clock = Clock()
        self.reads = []
        self.answers = []

        def fetch():
            self.reads.append(self.clock.seconds())
            if self.answers:
                answer = self.answers.pop(0)
                if isinstance(answer, Exception):
                    return defer.fail(answer)
                return defer.succeed(answer)
            return defer.succeed(DOCUMENT)

        self.guard = guard_module.ColumnGuard(SENSITIVE, PATTERNS, columnpolicy.Policy(), fetch, self.clock.seconds, 60)
        self.addon = testing.build(mask.factory, {})
        self.addon.guard = self.guard
        self.harness = testing.ChainHarness([self.addon])

    def submit(self, sql):
        command = testing.sql_command(sql)
        decision = self.harness.submit(command)
        return decision, command

    def test_refresh(self):
        """
        One read for the first statements; another after DDL and after
        the refresh interval; none for a catalog relation.
        """
        self.harness.start()
        self.assertEqual(len(self.reads), 1)
        decision, command = self.submit("SELECT pan FROM vault.cards")
        self.assertFalse(decision.denied)
        self.assertEqual(command.facts["sensitive_columns"]["outputs"][0]["shown"], "masked")
        self.submit("SELECT relname FROM pg_class")
        self.assertEqual(len(self.reads), 1)
        _, command = self.submit("CREATE VIEW v AS SELECT 1")
        self.harness.finish(command)
        self.submit("SELECT 1")
        self.assertEqual(len(self.reads), 2)
        self.clock.advance(61)
        self.submit("SELECT 1")
        self.assertEqual(len(self.reads), 3)
        self.clock.advance(6)
        self.submit("SELECT * FROM public.created_elsewhere")
        self.assertEqual(len(self.reads), 4)

    def test_search_paths_bounded(self):
        """
        A session may switch between a bounded number of search paths;
        past it, SET search_path is refused (each path seen is checked for
        every unqualified name afterwards).
        """
        self.harness.start()
        for index in range(guard_module.SEARCH_PATHS_KEPT - 1):
            decision, _ = self.submit("SET search_path TO s%d" % (index,))
            self.assertFalse(decision.denied, index)
        decision, _ = self.submit("SET search_path TO public")
        self.assertTrue(decision.denied)
        self.assertIn("already used 32 search paths", decision.reason)

    def test_malformed_catalog(self):
        """
        An answer that is not a catalog (a hostile target) counts as none:
        statements are refused, saying so.
        """
        self.answers = [{"relations": "nonsense"}] * 3
        self.harness.start()
        decision, _ = self.submit("SELECT 1")
        self.assertTrue(decision.denied)
        self.assertIn("the catalog is malformed", decision.reason)

    def test_no_catalog(self):
        """
        Without a catalog every statement is refused, saying why; the
        session itself starts.
        """
        self.answers = [RuntimeError("connection refused")] * 3
        self.harness.start()
        decision, _ = self.submit("SELECT 1")
        self.assertTrue(decision.denied)
        self.assertIn("could not read the target's catalog", decision.reason)
        self.assertIn("connection refused", decision.reason)


class _Broker:
    """
    Stands in for the approvals broker: records what it was asked.
    """

    def __init__(self):
        self.registered = []
        self.asked = []

    def register(self, connection, rule, webhooks=()):
        self.registered.append((connection, rule.name))

    def decide(self, session, command, rule):
        from hoopgw.model import Decision

        self.asked.append((command.text, rule.name))
        return Decision.approved({"id": "a-1"}, reason="looked fine")


class MaskAddonTests(unittest.TestCase):
    """
    The mask addon's options and hooks around the column guard.
    """

    def build(self, options, gateway=None):
        context = testing.FakeContext(gateway=gateway) if gateway is not None else None
        addon = testing.build(mask.factory, dict({"sensitive_columns": {"payments.vault.cards.pan": "pan"}}, **options), context)
        # The fake connection has no target: the guard reads this catalog.
        policy = columnpolicy.Policy.parse(options.get("column_policy"), "p")
        addon.guard = guard_module.ColumnGuard(SENSITIVE, PATTERNS, policy, lambda: DOCUMENT, Clock().seconds)
        return addon

    def test_approve(self):
        """
        A policy set to approve hands the statement to the approvals
        broker under the rule sensitive-columns; the approvers are required.
        """
        broker = _Broker()
        gateway = testing.FakeGateway(approvals=broker)
        addon = self.build({"column_policy": {"transform": "approve"}, "approvers": ["security"]}, gateway)
        self.assertEqual(broker.registered, [("test", "sensitive-columns")])
        harness = testing.ChainHarness([addon], context=testing.FakeContext(gateway=gateway))
        harness.start()
        decision = harness.submit(testing.sql_command("SELECT reverse(pan) FROM vault.cards"))
        self.assertEqual(decision.verdict, "approved")
        self.assertEqual(broker.asked, [("SELECT reverse(pan) FROM vault.cards", "sensitive-columns")])
        with self.assertRaises(ConfigError) as raised:
            mask.Mask.check_connection(
                {"sensitive_columns": {("p", "s", "t", "c"): "pan"}, "sensitive_columns_file": None,
                 "column_policy": columnpolicy.Policy(transform="approve"), "approvers": frozenset()},
                testing.FakeConnection(), {}, "connections.test.addons.mask",
            )
        self.assertIn("approvers", str(raised.exception))
        with self.assertRaises(ConfigError):
            mask.Mask.check_connection(
                {"sensitive_columns": {("p", "s", "t", "c"): "pan"}, "sensitive_columns_file": None,
                 "column_policy": columnpolicy.Policy(), "approvers": frozenset()},
                testing.FakeConnection(protocol="ssh"), {}, "connections.test.addons.mask",
            )

    def test_fastpath_and_details(self):
        """
        A fastpath call of a function whose body reads a sensitive table
        is refused; of a built-in, allowed.  An error detail quoting the
        key of a configured column is withheld, whatever its name.
        """
        from hoopgw.model import Command

        document = dict(DOCUMENT, functions=[dict(DOCUMENT["functions"][0], oid=9001)])
        addon = self.build({})
        addon.guard.fetch = lambda: document
        harness = testing.ChainHarness([addon])
        harness.start()
        call = Command(kind="function-call", text="function call (oid 9001)", facts={"function_oid": 9001})
        decision = harness.submit(call)
        self.assertTrue(decision.denied)
        self.assertIn("public.leak reads", decision.reason)
        builtin = Command(kind="function-call", text="function call (oid 764)", facts={"function_oid": 764})
        self.assertFalse(harness.submit(builtin).denied)
        fields = {"detail": "Key (pan)=(4111111111111112) already exists."}
        addon.masker.fields(fields, postgres_values.quotes(fields))
        self.assertEqual(fields["detail"], "Key (pan)=(withheld by hoopgw) already exists.")


class InheritanceTests(unittest.TestCase):
    """
    Partitions and inheritance children hold their parent's data.
    """

    def test_partition_columns_inherit_kinds(self):
        """
        A partition's columns named like its parent's sensitive columns are
        sensitive too (through two levels), and say where that came from.
        """
        document = dict(DOCUMENT, relations=DOCUMENT["relations"] + [
            {"schema": "vault", "name": "cards_2026", "kind": "r", "parents": [["vault", "cards"]],
             "columns": [["id", "integer"], ["holder", "text"], ["pan", "text"], ["cvv", "text"], ["amount", "numeric"]]},
            {"schema": "vault", "name": "cards_2026_12", "kind": "r", "parents": [["vault", "cards_2026"]],
             "columns": [["id", "integer"], ["pan", "text"]]},
        ])
        snapshot = lineage.Catalog.from_json(document, SENSITIVE, PATTERNS)
        self.assertEqual(snapshot.kinds["vault.cards_2026.cvv"], "sad")
        self.assertEqual(snapshot.kinds["vault.cards_2026_12.pan"], "pan")
        self.assertEqual(snapshot.sources["vault.cards_2026_12.pan"], "inherited from vault.cards_2026")
        (analysis,) = lineage.analyse("SELECT reverse(pan) FROM vault.cards_2026_12", snapshot)
        verdict = columnpolicy.evaluate(analysis, columnpolicy.Policy())
        self.assertEqual(verdict.action, columnpolicy.DENY)

    def test_reset_all_and_user_schema(self):
        """
        RESET ALL returns to the default search path; "$user" is the
        gateway's role.
        """
        self.assertEqual(analyse("RESET ALL").search_path, ())
        snapshot = catalog()
        snapshot.user = "app"
        (analysis,) = lineage.analyse('SET search_path TO "$user", vault', snapshot)
        self.assertEqual(analysis.search_path, ("app", "vault"))


class PlanTests(unittest.TestCase):
    """
    The mask addon's result plans, shared by statements with the same
    normalised text, follow each command's own column analysis.
    """

    def test_same_text_other_columns(self):
        """
        The same text resolving to a non-sensitive column in one session
        (search path public) and to a card number column in another
        (search path vault): the second is masked even after the first
        planned its result.
        """
        addon = testing.build(mask.factory, {})
        addon.guard = guard_module.ColumnGuard(
            SENSITIVE, PATTERNS, columnpolicy.Policy(), lambda: DOCUMENT, Clock().seconds
        )
        harness = testing.ChainHarness([addon])
        results = []
        for path in ("public", "vault"):
            session = testing.session()
            harness.start(session)
            harness.submit(testing.sql_command("SET search_path TO %s" % (path,)), session)
            command = testing.sql_command("SELECT pan FROM cards")
            self.assertFalse(harness.submit(command, session).denied)
            chunk = testing.rows(["pan"], [["4111111111111112"]])
            harness.result(command, chunk, session)
            results.append(chunk.rows[0][0])
        self.assertEqual(results, [b"4111111111111112", b"411111******1112"])


class DiscoverClassifyTests(unittest.TestCase):
    """
    What C{hoopgw discover} makes of a column's sampled values.
    """

    def test_classify(self):
        """
        Mostly Luhn-valid numbers are pan; track data and so-named columns
        sad; three or four digits are a CVV only in a text column whose
        name hints at one; amounts are nothing.
        """
        from hoopgw import discover

        cases = [
            ("number", ["4111111111111111", "5500 0000 0000 0004", None], True, "pan"),
            ("number", ["4111111111111112", "hello"], True, None),
            ("blob", ["%B4111111111111111^DOE/JOHN^2512"], True, "sad"),
            ("cvv2", [], True, "sad"),
            ("verification", ["917", "6051"], True, "cvv?"),
            ("status", ["200", "404"], True, "digits?"),
            ("amount", ["100", "250"], False, None),
        ]
        for name, values, text_type, kind in cases:
            found, evidence = discover.classify(name, values, PATTERNS, text_type)
            self.assertEqual(found, kind, name)
            self.assertEqual(evidence["rows_sampled"], len(values))
            self.assertNotIn("917", repr(evidence))


class CopyPlacementTests(unittest.TestCase):
    """
    COPY of a query whose columns the analysis cannot all count.
    """

    def test_positions_from_the_end(self):
        """
        A function's row of unknown width before the card table's columns:
        each COPY row's sensitive columns are found from its end, so a
        wider row still has its CVV removed.
        """
        (analysis,) = lineage.analyse(
            "COPY (SELECT * FROM unnest(array[1], array[2]), vault.cards) TO STDOUT", catalog()
        )
        verdict = columnpolicy.evaluate(analysis, columnpolicy.Policy())
        self.assertEqual(verdict.action, columnpolicy.ALLOW)
        copier = masking.CopyColumnMasker(masking.Masker(), verdict.result_positions)
        out, _ = copier.feed(b"1\t2\t7\tAda\t4111111111111112\t917\t5\n", final=True)
        self.assertEqual(out, b"1\t2\t7\tAda\t411111******1112\t***\t5\n")
