"""
The README's "Trying the Kubernetes front end by hand", run as it is
written (on free ports, in a folder of its own): kubectl through the
gateway to the stand-in, a log followed across a card number cut in two,
the container's stop ending logs -f, a watch, a protobuf create.
"""

import os
import re
import subprocess

from twisted.trial import unittest

from testbed.throwaway import free_port


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAN = "5105105105105100"


def readme_commands():
    """
    The shell commands of the README's Kubernetes trial, as written.
    """
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as readme:
        text = readme.read()
    start = text.index("**Trying the Kubernetes front end by hand.**")
    block = text[text.index("::\n\n", start) + 4 : text.index("\nWhat the stand-in run this way serves:", start)]
    lines = [line[4:] if line.startswith("    ") else line for line in block.splitlines()]
    return "\n".join(lines)


class ReadmeTrialTests(unittest.TestCase):
    def test_as_written(self):
        """
        Every step does what its comment says: the pod is listed, the
        followed log comes back masked and ends with exit 0 when the file
        is removed, the watch shows the ConfigMap kubectl created (in
        protobuf) masked, and the record holds the requests and no card
        number in clear.
        """
        gateway_port, api_port = str(free_port()), str(free_port())
        where = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(where, "etc"))
        for name in (".venv", "testbed"):
            os.symlink(os.path.join(ROOT, name), os.path.join(where, name))
            # Gone once the test ends: a link to .venv left under _trial_temp
            # would keep "git clean -x -e .venv" from clearing it.
            self.addCleanup(os.unlink, os.path.join(where, name))
        with open(os.path.join(ROOT, "etc", "kubernetes-trial.yaml")) as source:
            settings = source.read()
        self.assertIn("16443", settings)
        self.assertIn("26443", settings)
        with open(os.path.join(where, "etc", "kubernetes-trial.yaml"), "w") as target:
            target.write(settings.replace("16443", gateway_port).replace("26443", api_port))
        commands = readme_commands().replace("16443", gateway_port).replace("26443", api_port)
        self.assertIn("k logs -f web-1 &", commands)
        commands = commands.replace("k logs -f web-1 &", "k logs -f web-1 & follower=$!")
        # The watch prints apart: kubectl writes a row and its newline in two
        # writes, and create's line, printed meanwhile, could land between.
        watch = "k get configmaps --watch -o custom-columns=NAME:.metadata.name,PAN:.data.pan &"
        self.assertIn(watch, commands)
        commands = commands.replace(watch, watch[:-1] + "> watch.txt &")
        # What the steps print goes to out.txt.  After them: wait for the
        # watch to print the ConfigMap, see how the log's follower ended,
        # and stop the rest.
        script = "exec > out.txt 2> err.txt\n" + commands + (
            "\nfor _ in $(seq 120); do grep -Eq '^card +510510[*]+5100 *$' watch.txt && break; sleep 0.5; done\n"
            "wait $follower; echo \"logs -f exit status $?\"\n"
            "kill $(jobs -p) 2>/dev/null; wait\n"
            "grep -rl " + PAN + " var/k8s-trial/audit && echo 'card number in the record'\n"
            "echo done\n"
        )
        subprocess.run(
            ["bash", "-c", script], cwd=where, timeout=180,
            env=dict(os.environ, HOME=where, KUBECONFIG=os.path.join(where, "no-kubeconfig")),
        )
        with open(os.path.join(where, "out.txt")) as printed, open(os.path.join(where, "err.txt")) as errors:
            out, err = printed.read(), errors.read()
        with open(os.path.join(where, "watch.txt")) as printed:
            watched = printed.read()
        self.assertTrue(out.rstrip().endswith("done"), (out, err))
        self.assertRegex(out, r"(?m)^web-1\s")
        self.assertIn("card 510510******5100 ok", out)
        self.assertIn("logs -f exit status 0", out)
        self.assertRegex(watched, r"(?m)^card\s+510510\*{6}5100\s*$")
        self.assertNotIn(PAN, out + watched)
        self.assertNotIn("card number in the record", out)
        self.assertIn("pods/web-1/log", out + subprocess.run(
            [os.path.join(ROOT, ".venv", "bin", "hoopgw"), "events", os.path.join(where, "var", "k8s-trial", "audit")],
            capture_output=True, text=True, timeout=60,
        ).stdout)
        self.assertNotIn("Traceback", out + err + watched)
        self.assertEqual(re.findall(r"configmap/card created", out), ["configmap/card created"])
