"""
The block addon: refuse commands by what they do.  SQL statements as the
PostgreSQL parser reads them (never by patterns over the SQL text): deny
rules match statement kinds, object types, tables, functions and columns,
and an allow-list mode lets a read-only bot run only SELECT on named
tables.  SSH and Kubernetes commands by their facts: the programs,
commands and pipelines a command line runs, sftp operations, Kubernetes
verbs, resources and namespaces (L{hoopgw.commandpolicy}).  What cannot be
read is refused (fail closed) unless the connection says otherwise.
"""

from twisted.logger import Logger

from hoopgw import options as o
from hoopgw import rules as rules_module
from hoopgw import sqlfacts
from hoopgw.addon import AddonFactory
from hoopgw.model import Decision
from hoopgw.options import ConfigError


# Functions that read or write the server's files, run SQL given as a
# string (which the classifier cannot see into), reach other servers,
# stop other sessions or change the server: refused by the baseline.
DANGEROUS_FUNCTIONS = (
    "pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir",
    "pg_ls_archive_statusdir", "pg_ls_logicalsnapdir", "pg_ls_logicalmapdir", "pg_ls_replslotdir", "pg_stat_file",
    "lo_import", "lo_export", "pg_file_write", "pg_file_rename", "pg_file_unlink", "pg_file_sync", "pg_logdir_ls",
    "dblink", "dblink_exec", "dblink_connect", "dblink_connect_u", "dblink_send_query", "dblink_open",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_promote",
    "pg_switch_wal", "pg_create_restore_point", "pg_drop_replication_slot", "pg_replication_origin_drop",
    "set_config", "query_to_xml", "query_to_xmlschema", "query_to_xml_and_xmlschema", "table_to_xml",
    "table_to_xmlschema", "table_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema",
    "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema", "database_to_xml",
    "database_to_xmlschema", "database_to_xml_and_xmlschema", "ts_stat",
)

# The baseline: escapes from the database to the server, and privilege
# changes, which no bot needs.
BASELINE = (
    ("baseline:server-files", {"kinds": ["COPY PROGRAM", "COPY FILE", "LOAD"]},
     "reads or writes the server's files or runs a program on it"),
    ("baseline:dangerous-functions", {"functions": list(DANGEROUS_FUNCTIONS)},
     "calls a function that reaches outside the database, runs SQL hidden in a string or stops other sessions"),
    ("baseline:server-settings", {"kinds": ["ALTER SYSTEM"]}, "changes the server's configuration"),
    ("baseline:roles", {"kinds": ["CREATE ROLE", "ALTER ROLE", "DROP ROLE", "GRANT", "REVOKE", "REASSIGN OWNED"]},
     "changes roles or privileges"),
    ("baseline:identity-switch", {"kinds": ["SET ROLE", "SET SESSION AUTHORIZATION"]},
     "switches the database identity the gateway logged in as"),
    ("baseline:anonymous-code", {"kinds": ["DO"]}, "runs an anonymous code block the gateway cannot inspect"),
    # SSH exec (and kubectl exec) command lines.
    ("baseline:other-user", {"programs": ["sudo", "su", "doas", "pkexec", "runuser"]},
     "runs commands as another user; the login the gateway uses is all this identity may act as"),
    ("baseline:remove-root", {"commands": ["rm -*[rR]* {/,/[*],//,/.,/..}"]}, "deletes the whole file system"),
    ("baseline:download-and-run",
     {"pipelines": ["{curl,wget,fetch,nc,ncat,socat} | {sh,bash,dash,zsh,ksh,ash,mksh,fish,python*,perl,ruby,node,php}"]},
     "runs code fetched from the network, which nobody reviewed"),
    # Kubernetes requests.
    ("baseline:delete-namespaces", {"verbs": ["delete", "deletecollection"], "resources": ["namespaces"]},
     "deletes a namespace and everything in it"),
    ("baseline:cluster-privileges",
     {"verbs": ["create", "update", "patch", "delete", "deletecollection"], "api_groups": ["rbac.authorization.k8s.io"],
      "resources": ["clusterroles", "clusterrolebindings"]},
     "changes cluster-wide privileges"),
    ("baseline:node-proxy", {"resources": ["nodes/proxy"]}, "reaches the kubelet API, which runs commands in any pod of its node"),
    ("baseline:credentials",
     {"verbs": ["create", "update", "patch"], "resources": ["serviceaccounts/token", "certificatesigningrequests/approval"]},
     "mints credentials for another identity"),
)
BASELINE_NAMES = tuple(name for name, _, _ in BASELINE)

# Presets: named sets of rules an operator turns on with one word
# (presets: [destructive]), so the common policies read the same in every
# configuration.  Rules are named PRESET:RULE in denials.
PRESETS = {
    "destructive": (
        ("destructive:drop", {"kinds": ["DROP"]}, "drops objects and their data; schema changes go through migrations"),
        ("destructive:truncate", {"kinds": ["TRUNCATE"]}, "empties whole tables"),
        ("destructive:unfiltered-write", {"kinds": ["DELETE", "UPDATE"], "without_where": True},
         "changes every row of the table (no WHERE clause)"),
    ),
}


def _presets(value, path):
    names = o.string_list(value, path)
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise ConfigError(
            path, "%s is not a preset; they are %s%s" % (
                ", ".join(unknown), ", ".join(sorted(PRESETS)), o.suggest(unknown[0], PRESETS))
        )
    return tuple(names)


def preset_rules(names):
    return [
        Rule(name, rules_module.Matcher.parse(raw, name)[0], reason)
        for preset in names
        for name, raw, reason in PRESETS[preset]
    ]


class Rule:
    """
    One deny rule: a name, what it matches, and why it exists.
    """

    OPTIONS = (
        o.Option("name", o.string, o.REQUIRED, "The rule's name, shown to the client and recorded."),
        o.Option("reason", o.string, None, "A sentence saying why the rule exists, shown to the client."),
    )

    def __init__(self, name, matcher, reason=None):
        self.name = name
        self.matcher = matcher
        self.reason = reason

    @classmethod
    def parse(cls, raw, path):
        matcher, extra = rules_module.Matcher.parse(raw, path, cls.OPTIONS)
        return cls(extra["name"], matcher, extra["reason"])


def _rules(value, path):
    return rules_module.unique_names(o.list_of(Rule.parse)(value, path), path)


def _allow_only(value, path):
    return None if value is None else rules_module.AllowList.parse(value, path)


def baseline_rules(leave_out=()):
    return [
        Rule(name, rules_module.Matcher.parse(raw, name)[0], reason)
        for name, raw, reason in BASELINE
        if name not in leave_out
    ]


def _baseline_names(value, path):
    names = o.string_set(value, path)
    unknown = sorted(names - set(BASELINE_NAMES))
    if unknown:
        raise ConfigError(path, "%s is not a baseline rule; they are %s" % (", ".join(unknown), ", ".join(BASELINE_NAMES)))
    return names


class Block:
    """
    Refuse SQL statements by kind, object type, table, function or column (parsed with pglast), or allow only a list; refuse SSH and Kubernetes commands by their facts.
    """

    name = "block"
    # The statement classification (hoopgw.sqlfacts) the front end makes.
    reads = ("sql",)
    log = Logger()
    options = (
        o.Option(
            "rules",
            _rules,
            [],
            "Deny rules, each a name and what it matches (all given must match); the first that matches "
            "denies.  SQL: kinds, object_types, tables, writes, functions, columns, without_where.  SSH and "
            "kubectl exec: programs, commands, pipelines; sftp: operations, transfers, paths; SSH: logins.  "
            "Kubernetes: verbs, resources, api_groups, namespaces, resource_names.  Any command: facts.",
        ),
        o.Option(
            "baseline",
            o.boolean,
            True,
            "Also deny what no bot needs.  SQL: COPY to or from programs and server files, LOAD, dangerous "
            "functions (pg_read_file, lo_export, dblink, pg_terminate_backend, set_config, query_to_xml ...), "
            "ALTER SYSTEM, role and privilege changes, SET ROLE / SESSION AUTHORIZATION and DO blocks.  SSH "
            "and kubectl exec: sudo, su, doas, pkexec, runuser; rm -r of /; a download piped into a shell or "
            "interpreter.  Kubernetes: deleting namespaces, changing cluster roles and their bindings, "
            "nodes/proxy, minting service account tokens and approving certificate requests.",
        ),
        o.Option(
            "presets",
            _presets,
            (),
            "Named rule sets to deny as well.  destructive: DROP (tables, schemas, anything), TRUNCATE, and "
            "DELETE or UPDATE without a WHERE clause (rules destructive:drop, destructive:truncate, "
            "destructive:unfiltered-write).",
        ),
        o.Option(
            "baseline_except",
            _baseline_names,
            frozenset(),
            "Baseline rules to leave out, by name (baseline:other-user for a bot that must use sudo, say).",
        ),
        o.Option(
            "allow_only",
            _allow_only,
            None,
            "Allow-list mode: {kinds: [SELECT], tables: [schema.table, ...]}.  Anything else is denied, "
            "except transaction control and ordinary session settings.",
        ),
        o.Option(
            "allow_unparseable",
            o.boolean,
            False,
            "Let SQL the parser cannot read, and command lines the gateway cannot split (unbalanced quotes), "
            "through (they are refused by default: what cannot be read cannot be checked).",
        ),
        o.Option(
            "search_path",
            o.string_list,
            ["public"],
            "The schemas the target role's unqualified names resolve in, to match bare names against "
            "SCHEMA.* rules and the allow-list.",
        ),
    )

    def __init__(self, options, context):
        self.rules = (
            (baseline_rules(options["baseline_except"]) if options["baseline"] else [])
            + preset_rules(options["presets"])
            + list(options["rules"])
        )
        self.ruleset = rules_module.RuleSet(((rule, rule.matcher) for rule in self.rules), options["search_path"])
        self.allow_only = options["allow_only"]
        self.allow_unparseable = options["allow_unparseable"]
        self.search_path = tuple(options["search_path"])

    def command_received(self, session, command):
        return self.decide(session, command)[0]

    def decide(self, session, command):
        """
        @return: C{(Decision or None, explanation)}.
        """
        unreadable = self._unreadable(session, command)
        if unreadable is not None:
            return unreadable
        found = self.ruleset.first(session, command)
        if found is not None:
            rule, why = found
            reason = "rule %s matched (%s)" % (rule.name, "; ".join(why))
            if rule.reason:
                reason += ": " + rule.reason
            return _deny(reason, "block:%s" % (rule.name,)), reason
        if command.kind != "sql":
            return None, "no rule for %s commands matched" % (command.kind,)
        if self.allow_only is not None:
            refusal = self._outside_allow_list(sqlfacts.facts_of(session, command))
            if refusal is not None:
                return _deny(refusal, "block:allow-only"), refusal
            return None, "allowed by the allow-list"
        return None, "no rule matched (%d rules)" % (len(self.rules),)

    def _unreadable(self, session, command):
        """
        What cannot be read cannot be checked: refused, unless this
        connection lets it through.
        """
        if command.kind != "sql":
            error = command.facts.get("parse_error")
            if error and not self.allow_unparseable:
                reason = "the gateway cannot read this command line (%s), so it cannot check it" % (error,)
                return _deny(reason, "block:unparseable"), reason
            return None
        error = sqlfacts.facts_of(session, command).error
        if error is None:
            return None
        if self.allow_unparseable:
            return None, "the SQL does not parse (%s); this connection lets it through" % (error,)
        return _deny(
            "the gateway cannot parse this SQL (%s), so it cannot check it" % (error,), "block:unparseable"
        ), "unparseable SQL is refused"

    def _outside_allow_list(self, facts):
        # Like the rules' answer, the same for every statement that differs
        # only in its constants.
        key = ("block.allow-only", id(self))
        if key not in facts.memo:
            facts.memo[key] = self.allow_only.refuse(facts, self.search_path)
        return facts.memo[key]

    def explain(self, session, command):
        decision, why = self.decide(session, command)
        verdict = "deny" if decision is not None else "allow"
        if command.kind != "sql":
            return "%s: %s" % (verdict, why)
        return "%s: %s; facts %s" % (verdict, why, sqlfacts.facts_of(session, command).to_json())


def _deny(reason, rule):
    return Decision.deny(reason, rule=rule)


factory = AddonFactory(Block)
