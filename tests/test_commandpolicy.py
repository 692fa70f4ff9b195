"""
Rules for SSH and Kubernetes commands: command lines read as a shell
reads them (hoopgw.commandline), the rule keys that match their facts
(hoopgw.commandpolicy), and the block addon's baseline for each protocol,
table-driven through the real block and approve addons.
"""

from twisted.trial import unittest

from hoopgw import commandline, commandpolicy
from hoopgw.addons.approve import factory as approve
from hoopgw.addons.block import factory as block
from hoopgw.model import Command
from hoopgw.options import ConfigError
from hoopgw.sqlpolicy import Matcher
from hoopgw.ssh.commands import sftp_command
from hoopgw.testing import ChainHarness, build, exec_command, kubernetes_command, sql_command


class CommandLineTests(unittest.TestCase):
    """
    What a command line runs.
    """

    def test_programs(self):
        """
        Programs are found in every simple command of a list or pipeline,
        after newlines, behind wrappers and reserved words, inside sh -c,
        eval, su -c and substitutions, however the program's name is
        quoted or escaped.
        """
        cases = {
            "ls -l": ["ls"],
            "ls\nsudo id": ["ls", "sudo", "id"],
            "true && s\\udo id || 'sudo' -n id": ["true", "sudo", "id", "sudo", "id"],
            "FOO=1 /usr/bin/sudo -u root -- rm -rf /tmp/x": ["sudo", "rm"],
            "timeout 5 env -i A=1 nice -n 3 xargs -n1 sh -c 'doas id'": ["timeout", "env", "nice", "xargs", "sh", "doas", "id"],
            "if true; then sudo id; fi": ["true", "sudo", "id"],
            "{ sudo id; }": ["sudo", "id"],
            "echo \"$(sudo id)\"": ["sudo", "id", "echo"],
            "x=`sudo id`": ["sudo", "id"],
            "eval 'sudo id'": ["eval", "sudo", "id"],
            "su - root -c 'id'": ["su", "id"],
            "sudo -i rm -rf /": ["sudo", "rm"],
            "echo '$(sudo id)'": ["echo"],
            "cat f > /dev/null 2>&1; echo ok >&2": ["cat", "echo"],
        }
        for line, programs in cases.items():
            read = commandline.parse(line)
            self.assertIsNone(read.error, line)
            self.assertEqual(read.programs, programs, line)

    def test_commands(self):
        """
        Each simple command is the argv that runs: assignments and
        redirections are not arguments, and a wrapped command is also a
        command of its own.
        """
        read = commandline.parse("LANG=C sudo -n rm -rf / 2>/dev/null")
        self.assertEqual(read.commands, [["sudo", "-n", "rm", "-rf", "/", "2"], ["rm", "-rf", "/", "2"]])

    def test_pipelines(self):
        """
        Pipelines list what each stage runs; a substitution's output feeds
        the command around it as a pipe would, a >(...) reads it.
        """
        cases = {
            "curl -s https://x.test/i.sh | sudo bash": [[["curl"], ["sudo", "bash"]]],
            "(curl x)|sh": [[["curl"], ["sh"]]],
            "bash <(curl -s x)": [[["curl"], ["bash"]]],
            "sh < <(wget -qO- x)": [[["wget"], ["sh"]]],
            "curl x > >(sh)": [[["curl"], ["sh"]]],
            "curl x | sh -c 'cat > f; bash f'": [[["curl"], ["sh", "cat", "bash"]]],
            "curl x; sh": [],
        }
        for line, pipelines in cases.items():
            self.assertEqual(commandline.parse(line).pipelines, pipelines, line)

    def test_unreadable(self):
        """
        Unbalanced quotes, nesting past the limit and too many commands
        are reported, not guessed at.
        """
        self.assertIn("No closing quotation", commandline.parse("echo 'x").error)
        deep = "x"
        for _ in range(commandline.MAX_DEPTH + 2):
            deep = "sh -c %s" % (_quote(deep),)
        self.assertIn("levels deep", commandline.parse(deep).error)
        self.assertIn("too many", commandline.parse("; ".join(["true"] * (commandline.MAX_COMMANDS + 1))).error)

    def test_argv(self):
        """
        An argv run without a shell (kubectl exec) is one command, looked
        into as a line is.
        """
        read = commandline.parse_argv(["sh", "-c", "curl -s x | sh"])
        self.assertEqual(read.programs, ["sh", "curl", "sh"])
        self.assertEqual(read.pipelines, [[["curl"], ["sh"]]])


def _quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


class PatternTests(unittest.TestCase):
    """
    The patterns of command rules.
    """

    def test_braces(self):
        """
        Braces expand to alternatives, as in a shell; brackets stay
        fnmatch classes.
        """
        self.assertEqual(
            commandpolicy.expand_braces("{curl,wget} | {sh,bash}"),
            ["curl | sh", "curl | bash", "wget | sh", "wget | bash"],
        )
        self.assertEqual(commandpolicy.expand_braces("rm -*r* {/,/[*]}"), ["rm -*r* /", "rm -*r* /[*]"])

    def test_command_pattern(self):
        """
        A command pattern's arguments must all appear, in any order; the
        program is matched by name, or as written when the pattern has a
        slash.
        """
        pattern = commandpolicy.CommandPattern.parse("rm -*r* /", "p")
        self.assertTrue(pattern.match(["rm", "-rf", "/"]))
        self.assertTrue(pattern.match(["/bin/rm", "/", "-r", "-f"]))
        self.assertFalse(pattern.match(["rm", "-rf", "/tmp"]))
        self.assertFalse(pattern.match(["rm", "/"]))
        self.assertFalse(commandpolicy.CommandPattern.parse("/usr/bin/rm", "p").match(["/bin/rm"]))

    def test_bad_patterns(self):
        """
        Bad rules are refused with the key path and what is expected.
        """
        cases = [
            ({"name": "x", "pipelines": ["curl"]}, "two or more program patterns"),
            ({"name": "x", "programs": []}, "non-empty list"),
            ({"name": "x", "kinds": ["DROP"], "programs": ["sudo"]}, "make them two rules"),
            ({"name": "x"}, "a rule needs at least one of"),
        ]
        for rule, message in cases:
            error = self.assertRaises(ConfigError, build, block, {"rules": [rule]})
            self.assertIn(message, str(error))
        error = self.assertRaises(ConfigError, build, block, {"baseline_except": ["baseline:nothing"]})
        self.assertIn("is not a baseline rule", str(error))


class BlockTests(unittest.TestCase):
    """
    The block addon on SSH and Kubernetes commands, with its baseline and
    a connection's own rules.
    """

    def setUp(self):
        rules = [
            {"name": "no-exec-in-prod", "verbs": ["create"], "resources": ["pods/exec", "pods/attach"], "namespaces": ["prod"],
             "reason": "production is changed through deployments"},
            {"name": "no-secrets", "verbs": ["get", "list", "watch"], "resources": ["secrets"], "namespaces": ["prod-*"]},
            {"name": "no-etc-uploads", "operations": ["open"], "transfers": ["upload"], "paths": ["/etc/*"]},
            {"name": "no-root", "logins": ["root"]},
            {"name": "no-iptables", "commands": ["iptables -F"]},
        ]
        self.harness = ChainHarness([(block, {"rules": rules})])

    def assertDecision(self, command, rule):
        decision = self.harness.submit(command)
        if rule is None:
            self.assertFalse(decision.denied, (command.text, decision))
        else:
            self.assertEqual((decision.verdict, decision.rule), ("deny", rule), command.text)
        return decision

    def test_ssh_baseline(self):
        """
        The baseline refuses another user's privileges, rm -r of /, and a
        download run by a shell or interpreter, however it is written;
        ordinary commands pass.
        """
        cases = {
            "sudo systemctl restart app": "block:baseline:other-user",
            "ls; /usr/bin/sudo -n id": "block:baseline:other-user",
            "bash -c 'su -c id'": "block:baseline:other-user",
            "rm -rf /": "block:baseline:remove-root",
            "rm -r -f /*": "block:baseline:remove-root",
            "rm --recursive --force --no-preserve-root /": "block:baseline:remove-root",
            "cd /tmp && rm -fr //": "block:baseline:remove-root",
            "curl -fsSL https://get.example.test | sh": "block:baseline:download-and-run",
            "wget -qO- https://x.test/i | tee log | bash -s": "block:baseline:download-and-run",
            "bash <(curl -s https://x.test/i)": "block:baseline:download-and-run",
            "python3 -c \"$(curl -s x)\"": "block:baseline:download-and-run",
            "curl -s https://x.test/i | python3": "block:baseline:download-and-run",
            "systemctl restart app": None,
            "rm -rf /tmp/build": None,
            "curl -s https://x.test/health | jq .status": None,
            "echo 'sudo is not run here'": None,
        }
        for line, rule in cases.items():
            self.assertDecision(exec_command(line), rule)

    def test_ssh_rules(self):
        """
        A connection's rules on logins, commands and sftp operations.
        """
        self.assertDecision(exec_command("id", login="root"), "block:no-root")
        self.assertDecision(exec_command("iptables -L"), None)
        self.assertDecision(exec_command("iptables -F INPUT"), "block:no-iptables")
        upload = sftp_command("open", "/etc/passwd", access="write", transfer="upload", flags=["write"])
        upload.facts["login"] = "deploy"
        decision = self.assertDecision(upload, "block:no-etc-uploads")
        self.assertIn("sftp operation open; transfer upload; path /etc/passwd", decision.reason)
        download = sftp_command("open", "/etc/passwd", access="read", transfer="download", flags=["read"])
        self.assertDecision(download, None)
        self.assertDecision(sftp_command("open", "/srv/app/x", access="write", transfer="upload", flags=["write"]), None)

    def test_unreadable_line(self):
        """
        A command line that cannot be read is refused, as unparseable SQL
        is, unless the connection lets it through.
        """
        self.assertDecision(exec_command("echo 'unbalanced"), "block:unparseable")
        lenient = ChainHarness([(block, {"allow_unparseable": True})])
        self.assertFalse(lenient.submit(exec_command("echo 'unbalanced")).denied)

    def test_kubernetes(self):
        """
        Kubernetes requests meet the baseline (deleting namespaces, cluster
        RBAC, nodes/proxy, token minting) and RBAC-shaped rules; a resource
        alone does not match its subresources, as in RBAC; exec's argv is
        read like an SSH command line.
        """
        cases = [
            (("DELETE", "/api/v1/namespaces/payments"), "block:baseline:delete-namespaces"),
            (("DELETE", "/api/v1/namespaces"), "block:baseline:delete-namespaces"),
            (("DELETE", "/api/v1/namespaces/payments/configmaps/x"), None),
            (("POST", "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings"), "block:baseline:cluster-privileges"),
            (("POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/ci/rolebindings"), None),
            (("GET", "/api/v1/nodes/n1/proxy/pods"), "block:baseline:node-proxy"),
            (("POST", "/api/v1/namespaces/ci/serviceaccounts/builder/token"), "block:baseline:credentials"),
            (("GET", "/api/v1/namespaces/prod/pods/db-0/exec?command=sh&stdin=true&tty=true"), None),
            (("POST", "/api/v1/namespaces/prod/pods/db-0/exec?command=sh"), "block:no-exec-in-prod"),
            (("GET", "/api/v1/namespaces/staging/pods/db-0/exec?command=sh"), None),
            (("GET", "/api/v1/namespaces/prod-eu/secrets"), "block:no-secrets"),
            (("GET", "/api/v1/namespaces/prod-eu/secrets?watch=true"), "block:no-secrets"),
            (("GET", "/api/v1/namespaces/prod-eu/pods"), None),
            (("GET", "/api/v1/namespaces/staging/pods/web/exec?command=sudo&command=id"), "block:baseline:other-user"),
        ]
        for (method, path), rule in cases:
            self.assertDecision(kubernetes_command(method, path), rule)
        websocket = kubernetes_command("GET", "/api/v1/namespaces/prod/pods/db-0/exec?command=sh", websocket=True)
        decision = self.assertDecision(websocket, "block:no-exec-in-prod")
        self.assertIn("verb create; resource pods/exec; namespace prod", decision.reason)
        self.assertIn("production is changed through deployments", decision.reason)

    def test_baseline_except(self):
        """
        One baseline rule can be left out (a bot that must use sudo) while
        the rest stays.
        """
        harness = ChainHarness([(block, {"baseline_except": ["baseline:other-user"]})])
        self.assertFalse(harness.submit(exec_command("sudo systemctl restart app")).denied)
        self.assertTrue(harness.submit(exec_command("curl x | sh")).denied)

    def test_sql_untouched(self):
        """
        SSH and Kubernetes rules never match SQL, and SQL rules never match
        other commands, even when their text reads alike.
        """
        self.assertFalse(self.harness.submit(sql_command("SELECT 'sudo rm -rf /'")).denied)
        sql_rules = ChainHarness([(block, {"rules": [{"name": "no-drop", "kinds": ["DROP"]}]})])
        self.assertFalse(sql_rules.submit(exec_command("psql -c 'DROP TABLE x'")).denied)
        unknown = Command(kind="custom", text="x", redacted="x", facts={})
        self.assertFalse(self.harness.submit(unknown).denied)

    def test_explain(self):
        """
        The block addon explains a decision on a command line.
        """
        addon = self.harness.chain.addons[0][1]
        self.assertIn("program sudo", addon.explain(self.harness.session, exec_command("sudo id")))


class ApproveMatchTests(unittest.TestCase):
    """
    Approval rules use the same keys.
    """

    def test_match(self):
        """
        "Approve any delete" and "approve restarts" match what they say
        and nothing else.
        """
        addon = build(
            approve,
            {
                "rules": [
                    {"name": "deletes", "verbs": ["delete", "deletecollection"], "approvers": ["sre"]},
                    {"name": "restarts", "commands": ["systemctl restart *"], "approvers": ["sre"]},
                ]
            },
        )
        harness = ChainHarness([])
        found = addon.match(harness.session, kubernetes_command("DELETE", "/api/v1/namespaces/default/configmaps/old"))
        self.assertEqual(found[0].name, "deletes")
        self.assertIsNone(addon.match(harness.session, kubernetes_command("GET", "/api/v1/namespaces/default/configmaps/old")))
        self.assertEqual(addon.match(harness.session, exec_command("systemctl restart app"))[0].name, "restarts")
        self.assertIsNone(addon.match(harness.session, exec_command("systemctl status app")))

    def test_matcher_sql_facts(self):
        """
        On SQL, the generic facts key still narrows a SQL rule.
        """
        matcher = Matcher.parse({"kinds": ["DELETE"], "facts": {"protocol": "extended"}}, "rule")[0]
        self.assertTrue(matcher.on_facts)
        self.assertIsNone(matcher.match_command(exec_command("rm x")))
