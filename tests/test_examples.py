"""
The example configurations in etc/ work as shipped: each passes
C{hoopgw check-config --skip-files} on a fresh checkout (only the gateway
host's files and secrets are missing), and each loads whole once those
files exist where it says.
"""

import glob
import io
import os
import re

import yaml
from twisted.trial import unittest

from hoopgw import cli
from hoopgw import config as configuration


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "etc", "*.yaml")))


class ExampleTests(unittest.TestCase):
    def test_examples_exist(self):
        """
        The examples this module checks are the five shipped ones.
        """
        self.assertEqual(
            [os.path.basename(path) for path in EXAMPLES],
            ["demo.yaml", "enforcement.yaml", "hoopgw.yaml", "identity.yaml", "kubernetes-trial.yaml"],
        )

    def test_check_config_skip_files(self):
        """
        Every example passes C{check-config --skip-files}; what is skipped is
        only files, secret files and environment variables, and every
        connection is parsed and summarised.
        """
        for path in EXAMPLES:
            out = io.StringIO()
            self.assertEqual(cli.main(["check-config", "--skip-files", path], out=out), 0, path)
            lines = out.getvalue().splitlines()
            # etc/demo.yaml after scripts/demo made var/demo: nothing skipped.
            self.assertTrue(lines[0].endswith(": OK") or "OK apart from" in lines[0], lines[0])
            skipped = [line for line in lines[1:] if line.startswith("  skipped ")]
            for line in skipped:
                self.assertRegex(
                    line, r"^  skipped \S+: (the file .* does not exist|cannot read the secret file .*|"
                    r"the environment variable \S+ holding this secret is not set)$"
                )
            with open(path) as handle:
                connections = yaml.safe_load(handle)["connections"]
            summary = sorted(line.split(":")[0].strip() for line in lines[1:] if line.startswith("  ") and line not in skipped
                             and not line.startswith("    "))
            self.assertEqual(summary, sorted(connections), path)

    def test_explain_skip_files(self):
        """
        The README's explain examples on etc/enforcement.yaml run on a
        fresh checkout with --skip-files, and deny what they promise.
        """
        path = os.path.join(ROOT, "etc", "enforcement.yaml")
        for connection, command, rule in (
            ("payments", "DROP TABLE payments", "destructive:drop"),
            ("payments", "DELETE FROM orders", "destructive:unfiltered-write"),
            ("app-hosts", "curl -s https://x | sudo sh", "baseline:other-user"),
            ("cluster", "DELETE /api/v1/namespaces/prod", "baseline:delete-namespaces"),
        ):
            out = io.StringIO()
            cli.main(["explain", "--skip-files", "--config", path, "--connection", connection, command], out=out)
            self.assertIn("deny: rule %s matched" % (rule,), out.getvalue())
            self.assertIn("=> deny (block)", out.getvalue())

    def test_whole_files(self):
        """
        With made-up files where the examples expect the gateway host's
        (/etc/hoopgw, var/demo; var/k8s-trial made as the README says) and
        their environment variables set, every example loads whole: nothing
        but the host's files was skipped.
        """
        import contextlib
        from testbed import pki
        from hoopgw.identity import dev
        from hoopgw.store import signing

        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "etc"))
        os.makedirs(os.path.join(directory, "var", "demo"))
        trial = os.path.join(directory, "var", "k8s-trial")
        with contextlib.redirect_stdout(io.StringIO()):
            pki.main([os.path.join(trial, "pki")])
        dev.generate_key(os.path.join(trial, "keys"), kid="demo-1")
        with open(os.path.join(trial, "cluster.token"), "w") as handle:
            handle.write("made-up\n")
        certificate = pki.make_ca("example").certificate_pem()
        for path in EXAMPLES:
            with open(path) as handle:
                text = handle.read()
            text = text.replace("/etc/hoopgw/", directory + "/etc/").replace("/var/lib/hoopgw", directory + "/var")
            for name in re.findall(re.escape(directory) + r"/etc/([\w.-]+)", text) + re.findall(
                r"\.\./var/demo/([\w.-]+)", text
            ):
                target = os.path.join(directory, "var", "demo", name) if "../var/demo/" + name in text else os.path.join(
                    directory, "etc", name
                )
                if not os.path.exists(target):
                    with open(target, "wb") as handle:
                        handle.write(certificate if name.endswith(".crt") else b"made up for the test\n")
            for variable in set(re.findall(r"\{env: (\w+)\}", text)):
                self.patch(os, "environ", dict(os.environ, **{variable: "made-up"}))
            dev.generate_key(os.path.join(directory, "var", "demo"), kid="demo-1")
            signing.generate_key(os.path.join(directory, "var", "demo"), stem="evidence-signing")
            copy = os.path.join(directory, "etc", os.path.basename(path))
            with open(copy, "w") as handle:
                handle.write(text)
            config = configuration.load(copy)
            self.assertTrue(config.connections, path)

    def test_destructive_preset_in_examples(self):
        """
        The examples that block on PostgreSQL use the destructive preset,
        the README's promise that block denies DROP TABLE.
        """
        for name in ("demo.yaml", "hoopgw.yaml", "enforcement.yaml"):
            with open(os.path.join(ROOT, "etc", name)) as handle:
                document = yaml.safe_load(handle)
            addons = document["connections"]["payments"]["addons"]
            block = [entry["block"] for entry in addons if isinstance(entry, dict) and "block" in entry]
            self.assertEqual(block[0]["presets"], ["destructive"], name)
