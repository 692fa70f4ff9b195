"""
The approve addon: statements that match a rule (an UPDATE or DELETE
without WHERE, any DDL, writes to given tables ...), SSH commands and
Kubernetes requests that match one (a restart, any delete) wait inside
the live session for a person's approval through the approvals broker,
bound to the exact command, the requesting identity and the connection.  An
identity pre-approved by a time-boxed grant goes through, and the use of
the grant is recorded.
"""

from twisted.logger import Logger

from hoopgw import metrics
from hoopgw import options as o
from hoopgw import rules as rules_module
from hoopgw.addon import AddonFactory
from hoopgw.approvals import ApprovalRule
from hoopgw.approvals import webhook as webhooks
from hoopgw.model import Decision
from hoopgw.options import ConfigError


RULE_OPTIONS = (
    o.Option("name", o.string, o.REQUIRED, "The rule's name, shown to the client and the approvers, and recorded."),
    o.Option("approvers", o.string_set, o.REQUIRED, "The groups whose members (people, not services) may approve."),
    o.Option("approvals", o.integer(minimum=1, maximum=10), 1, "How many different approvers must approve."),
    o.Option("timeout", o.duration, 300.0, "How long a statement waits before it is refused."),
    o.Option("max_grant", o.duration, 86400.0, "The longest window a grant for this rule may cover (0: no grants)."),
    o.Option("reason", o.string, None, "A sentence saying why the rule exists."),
)


def _rule(raw, path):
    matcher, values = rules_module.Matcher.parse(raw, path, RULE_OPTIONS)
    if not values["approvers"]:
        raise ConfigError(o.join(path, "approvers"), "list at least one approver group")
    rule = ApprovalRule(
        name=values["name"],
        approvers=values["approvers"],
        approvals=values["approvals"],
        timeout=values["timeout"],
        max_grant=values["max_grant"],
        reason=values["reason"],
    )
    return rule, matcher


def _rules(value, path):
    return rules_module.unique_names(o.list_of(_rule)(value, path), path, lambda pair: pair[0].name)


class Approve:
    """
    Hold matching statements until enough people approve them (or a grant covers them).
    """

    name = "approve"
    # The statement classification (hoopgw.sqlfacts) the front end makes.
    reads = ("sql",)
    log = Logger()
    options = (
        o.Option(
            "rules",
            _rules,
            o.REQUIRED,
            "Rules, each a name, approvers (groups), approvals (how many), timeout, max_grant and what it "
            "matches, as block's rules: SQL kinds, object_types, tables, writes, functions, columns, "
            "without_where; SSH programs, commands, pipelines, logins, sftp operations, transfers, paths; "
            "Kubernetes verbs, resources, api_groups, namespaces, resource_names; any command's facts.",
        ),
        o.Option(
            "notify",
            o.list_of(webhooks.parse),
            [],
            "Webhooks told of every request and its outcome: {url, format: json|slack, attempts, backoff, "
            "timeout, secret}.",
        ),
        o.Option(
            "search_path",
            o.string_list,
            ["public"],
            "The schemas the target role's unqualified names resolve in (see block).",
        ),
    )

    @staticmethod
    def check_gateway(options, gateway, path):
        if gateway.admin is None:
            raise ConfigError(
                path,
                "the approve addon needs gateway.admin: approvers act through the admin listener's API",
            )

    def __init__(self, options, context):
        self.rules = options["rules"]
        self.ruleset = rules_module.RuleSet(self.rules, options["search_path"])
        self.connection = context.connection.name
        self.broker = context.approvals
        if self.broker is not None:
            for rule, _ in self.rules:
                self.broker.register(self.connection, rule, options["notify"])

    def match(self, session, command):
        """
        The first rule C{command} matches: C{(rule, why)} or None.
        """
        return self.ruleset.first(session, command)

    def command_received(self, session, command):
        found = self.match(session, command)
        if found is None:
            return None
        rule, _ = found
        broker = self.broker
        if broker is None:
            return Decision.deny(
                "this statement needs approval (rule %s) and the gateway has no approvals broker" % (rule.name,),
                rule="approve:%s" % (rule.name,),
            )
        return metrics.approval_wait(self.connection, broker.decide(session, command, rule))

    def explain(self, session, command):
        found = self.match(session, command)
        if found is None:
            return "no opinion: no approval rule matched"
        rule, why = found
        return "needs approval: rule %s matched (%s); %d approval%s from %s within %gs, unless a grant covers %s" % (
            rule.name,
            "; ".join(why),
            rule.approvals,
            "" if rule.approvals == 1 else "s",
            ", ".join(sorted(rule.approvers)),
            rule.timeout,
            session.identity.subject if session.identity is not None else "the identity",
        )


factory = AddonFactory(Approve)
