"""
How hoopgw is installed and run: the command line's version and help, the
twistd plugins (listed, each with its own pid file, a SIGTERM stop exiting
0, found from an editable install), the Dockerfile (linted with hadolint)
and the systemd units (checked with systemd-analyze verify).
"""

import argparse
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import yaml
from twisted.trial import unittest

from hoopgw import __version__, cli


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, ".venv", "bin")


def environment():
    """
    The environment for a twistd child: this checkout's hoopgw and its
    twisted/plugins first.
    """
    return dict(os.environ, PYTHONPATH=ROOT)


def wait_for_port(port, process, deadline=60):
    """
    Wait until C{port} accepts connections (or C{process} ends).
    """
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise AssertionError("the process ended with %s before listening" % (process.returncode,))
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("nothing listens on %d" % (port,))


def _catches(pid, signum):
    """
    Whether process C{pid} has a handler for C{signum} (Linux's
    /proc/PID/status, SigCgt).
    """
    try:
        with open("/proc/%d/status" % (pid,)) as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    except OSError:
        pass
    return False


def stop(process):
    """
    SIGTERM, then the exit status.  The signal is sent once twistd handles
    it: its port listens before its reactor runs and installs the handler,
    and a SIGTERM in between kills it outright (exit -15).
    """
    end = time.monotonic() + 60
    while process.poll() is None and not _catches(process.pid, signal.SIGTERM) and time.monotonic() < end:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def gateway_files(directory):
    """
    A gateway configuration in C{directory} with everything it names (a
    certificate, a JWKS, a target password), for a PostgreSQL connection
    whose target is never reached.

    @return: C{(configuration path, gateway port, a free port for the
        replay server)}.
    """
    from testbed import pki
    from hoopgw.identity import dev
    from testbed.throwaway import free_port

    os.makedirs(directory)
    authority = pki.make_ca("packaging test CA")
    authority.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]).write(directory, "gateway")
    authority.write(directory, "db-ca")
    dev.generate_key(directory, kid="k1")
    with open(os.path.join(directory, "app.password"), "w") as handle:
        handle.write("made-up\n")
    port = free_port()
    document = {
        "gateway": {"state_dir": "state", "store": {"path": "audit", "fsync": False}},
        "identity_providers": {
            "demo": {"issuer": "https://i.example", "audience": "a", "jwks_file": "demo-issuer.jwks.json",
                     "algorithms": ["ES256"]}
        },
        "connections": {
            "payments": {
                "protocol": "postgres",
                "listen": "tcp:%d:interface=127.0.0.1" % (port,),
                "tls": {"certificate": "gateway.crt", "key": "gateway.key"},
                "target": {"host": "127.0.0.1", "database": "p", "user": "app",
                           "password": {"file": "app.password"}, "ca": "db-ca.crt"},
                "allowed_groups": ["bots"],
                "addons": ["identity", "record"],
            }
        },
    }
    config = os.path.join(directory, "hoopgw.yaml")
    with open(config, "w") as handle:
        yaml.safe_dump(document, handle)
    return config, port, free_port()


class CommandLineTests(unittest.TestCase):
    def test_version(self):
        """
        C{hoopgw --version} prints the package's version and exits 0.
        """
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        error = self.assertRaises(SystemExit, cli.main, ["--version"])
        self.assertEqual(error.code, 0)
        self.assertEqual(out.getvalue().strip(), "hoopgw %s" % (__version__,))

    def test_every_argument_has_help(self):
        """
        Every option and positional argument of every subcommand has a help
        text.
        """
        missing = []

        def walk(parser, where):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, child in action.choices.items():
                        walk(child, "%s %s" % (where, name))
                elif not action.help:
                    missing.append("%s %s" % (where, "/".join(action.option_strings) or action.dest))

        walk(cli.parser(), "hoopgw")
        self.assertEqual(missing, [])

    def test_explain_argument(self):
        """
        explain's argument is named for what it takes (SQL, an SSH command
        line or a Kubernetes request), not C{sql}.
        """
        text = io.StringIO()
        explain = [
            parser for action in cli.parser()._actions if isinstance(action, argparse._SubParsersAction)
            for name, parser in action.choices.items() if name == "explain"
        ][0]
        explain.print_help(text)
        self.assertIn("COMMAND", text.getvalue())
        self.assertNotIn(" sql ", text.getvalue())
        arguments = cli.parser().parse_args(["explain", "--config", "c", "--connection", "x", "ls -l"])
        self.assertEqual(arguments.request, "ls -l")

    def test_twistd_options_have_help(self):
        """
        Both twistd plugins' options have help texts.
        """
        from hoopgw import tap
        from hoopgw.replay import tap as replay_tap

        for options in (tap.Options, replay_tap.Options):
            for name, short, default, description in options.optParameters:
                self.assertTrue(description, name)


class TwistdTests(unittest.TestCase):
    """
    The two plugins run side by side from one folder and stop cleanly.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.config, self.port, self.replay_port = gateway_files(self.directory)

    def twistd(self, *arguments):
        process = subprocess.Popen(
            [os.path.join(BIN, "twistd"), "--reactor=asyncio", "-n", *arguments],
            cwd=self.directory, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def test_plugins_listed(self):
        """
        C{twistd --help} lists both plugins.
        """
        result = subprocess.run([os.path.join(BIN, "twistd"), "--help"], env=environment(), cwd=self.directory,
                                capture_output=True, text=True, timeout=120)
        self.assertRegex(result.stdout, r"(?m)^\s+hoopgw\s")
        self.assertRegex(result.stdout, r"(?m)^\s+hoopgw-replay\s")

    def test_side_by_side_and_sigterm(self):
        """
        The gateway and the replay server started from one folder with
        twistd's defaults each write their own pid file, both run, and each
        exits 0 on SIGTERM, removing its pid file.
        """
        gateway = self.twistd("hoopgw", "--config", self.config)
        wait_for_port(self.port, gateway)
        replay = self.twistd("hoopgw-replay", "--config", self.config,
                             "--listen", "tcp:%d:interface=127.0.0.1" % (self.replay_port,))
        wait_for_port(self.replay_port, replay)
        pids = {name: os.path.join(self.directory, name) for name in ("hoopgw.pid", "hoopgw-replay.pid")}
        with open(pids["hoopgw.pid"]) as handle:
            self.assertEqual(int(handle.read()), gateway.pid)
        with open(pids["hoopgw-replay.pid"]) as handle:
            self.assertEqual(int(handle.read()), replay.pid)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "twistd.pid")))
        replay_status = stop(replay)
        gateway_status = stop(gateway)
        output = gateway.stdout.read() + replay.stdout.read()
        self.assertEqual((gateway_status, replay_status), (0, 0), output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(any(os.path.exists(path) for path in pids.values()))

    def test_port_taken(self):
        """
        A listener whose port is taken stops the start with a sentence
        naming the connection and the port, exit status 1, no traceback.
        """
        output = self.start_refused(self.port)
        self.assertIn(
            "hoopgw cannot start: connection payments cannot listen on 127.0.0.1 port %d: Address already in use"
            % (self.port,),
            output,
        )

    def start_refused(self, port):
        """
        Start the gateway while something else listens on C{port}: it exits
        1 without a traceback.

        @return: what it printed.
        """
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", port))
            taken.listen()
            gateway = self.twistd("--pidfile=", "hoopgw", "--config", self.config)
            status = gateway.wait(timeout=120)
        output = gateway.stdout.read()
        self.assertEqual(status, 1, output)
        self.assertNotIn("Traceback", output)
        return output

    def test_metrics_and_admin_ports_taken(self):
        """
        So do the metrics and admin listeners: a taken port stops the start
        (it did not: the listener's failure was logged with a traceback and
        the gateway ran without it).
        """
        from testbed.throwaway import free_port

        for listener in ("metrics", "admin"):
            port = free_port()
            with open(self.config) as handle:
                document = yaml.safe_load(handle)
            document["gateway"].pop("metrics", None)
            document["gateway"].pop("admin", None)
            document["gateway"][listener] = {"listen": "tcp:%d:interface=127.0.0.1" % (port,)}
            with open(self.config, "w") as handle:
                yaml.safe_dump(document, handle)
            output = self.start_refused(port)
            self.assertIn("hoopgw cannot start: %s cannot listen on 127.0.0.1 port %d: Address already in use"
                          % (listener, port), output)

    def test_explicit_pidfile_kept(self):
        """
        A pid file the operator names with --pidfile is used as given.
        """
        gateway = self.twistd("--pidfile", "mine.pid", "hoopgw", "--config", self.config)
        wait_for_port(self.port, gateway)
        self.assertTrue(os.path.exists(os.path.join(self.directory, "mine.pid")))
        self.assertFalse(os.path.exists(os.path.join(self.directory, "hoopgw.pid")))
        self.assertEqual(stop(gateway), 0)


class EditableInstallTests(unittest.TestCase):
    def test_plugins_found(self):
        """
        C{pip install -e . --config-settings editable_mode=compat} (the
        README's contributor install) puts this checkout's twisted/plugins
        on twisted.plugins' path, where twistd looks for plugins; the
        default editable mode does not, which is why the README asks for
        compat.
        """
        venv = os.path.abspath(self.mktemp())
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
        python = os.path.join(venv, "bin", "python")
        # The shared environment's packages (Twisted ...) without installing
        # them again: only hoopgw itself goes into this environment.
        site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        shared = subprocess.run([os.path.join(BIN, "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                                capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(site, "shared.pth"), "w") as handle:
            handle.write(shared + "\n")
        # A copy of what a checkout holds for installing: pip writes its
        # metadata next to the sources.
        build = os.path.abspath(self.mktemp())
        os.makedirs(build)
        for name in ("setup.cfg", "pyproject.toml", "README.rst"):
            shutil.copy(os.path.join(ROOT, name), build)
        for name in ("hoopgw", "twisted"):
            shutil.copytree(os.path.join(ROOT, name), os.path.join(build, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        probe = ("import twisted.plugins, sys; "
                 "sys.stdout.write(repr([p for p in twisted.plugins.__path__ if p.startswith(%r)]))" % (build,))

        def install(*settings):
            subprocess.run([python, "-m", "pip", "install", "-q", "-e", build, "--no-deps", "--no-build-isolation",
                            *settings], check=True, capture_output=True, timeout=300, cwd=venv)
            found = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True, cwd=venv).stdout
            subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "hoopgw"], check=True, capture_output=True,
                           timeout=300, cwd=venv)
            return found

        self.assertEqual(install("--config-settings", "editable_mode=compat"),
                         repr([os.path.join(build, "twisted", "plugins")]))
        self.assertEqual(install(), "[]")


class ContainerAndServiceTests(unittest.TestCase):
    def test_dockerfile_lint(self):
        """
        hadolint finds nothing to say about the Dockerfile.
        """
        result = subprocess.run([os.path.join(BIN, "hadolint"), os.path.join(ROOT, "Dockerfile")],
                                capture_output=True, text=True, timeout=120)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_dockerfile_shape(self):
        """
        The image is slim, runs as a numeric non-root user, keeps the state
        and the record on volumes and starts twistd's hoopgw plugin.
        """
        with open(os.path.join(ROOT, "Dockerfile")) as handle:
            text = handle.read()
        self.assertRegex(text, r"(?m)^FROM python:3\.11-slim")
        user = re.findall(r"(?m)^USER (\d+):(\d+)$", text)
        self.assertEqual(len(user), 1)
        self.assertNotEqual(user[0][0], "0")
        self.assertIn('VOLUME ["/var/lib/hoopgw", "/var/lib/hoopgw/audit"]', text)
        self.assertIn('ENTRYPOINT ["twistd", "--reactor=asyncio", "--nodaemon", "--pidfile=", "hoopgw"]', text)

    def units(self):
        """
        The units with their programs pointed at this checkout's
        environment, for systemd-analyze (which checks they exist).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name in ("hoopgw.service", "hoopgw@.service"):
            with open(os.path.join(ROOT, "packaging", "systemd", name)) as handle:
                text = handle.read().replace("/usr/local/bin/", BIN + "/")
            with open(os.path.join(directory, name.replace("@.", "@payments.")), "w") as handle:
                handle.write(text)
        return directory

    def test_units_verify(self):
        """
        systemd-analyze verify accepts the unit and an instance of the
        template without a word (unknown keys would be warnings).
        """
        directory = self.units()
        for name in ("hoopgw.service", "hoopgw@payments.service"):
            result = subprocess.run(["systemd-analyze", "verify", "--man=no", "./" + name], cwd=directory,
                                    capture_output=True, text=True, timeout=120)
            self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""), name)

    def test_units_hardening(self):
        """
        The units run as the dedicated user with the usual hardening, may
        write only their state folder, and reload with SIGHUP.
        """
        for name, state in (("hoopgw.service", "/var/lib/hoopgw"), ("hoopgw@.service", "/var/lib/hoopgw/%i")):
            with open(os.path.join(ROOT, "packaging", "systemd", name)) as handle:
                lines = set(handle.read().splitlines())
            for line in ("User=hoopgw", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=" + state,
                         "ExecReload=/bin/kill -HUP $MAINPID", "CapabilityBoundingSet=", "PrivateTmp=yes"):
                self.assertIn(line, lines, name)
