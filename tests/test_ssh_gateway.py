"""
The SSH gateway end to end: a throwaway OpenSSH sshd behind it, the real
ssh, scp and sftp clients in front, and the record it leaves.
"""

import fcntl
import hashlib
import io
import os
import pty
import shutil
import signal
import struct
import tempfile
import termios
import time

from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.conch.ssh import common
from twisted.conch.ssh import transport as ssh_transport
from twisted.trial import unittest

from hoopgw import cast as casts
from hoopgw import cli
from hoopgw.gateway import Gateway
from hoopgw.model import Decision
from hoopgw.store.verify import verify_store
from tests import ssh_support, support
from tests.replay_support import ReplayServer, play_session
from tests.ssh_support import SCP, SFTP, SSH, SSHGateway, certificate, key, run, spawn, sshd
from tests.support import in_thread

PAN = "4111111111111111"
MASKED_PAN = "411111******1111"


@defer.inlineCallbacks
def eventually(check, timeout=10.0):
    """
    Wait until C{check()} returns something true, and return it.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("gave up waiting after %s seconds" % (timeout,))
        yield task.deferLater(reactor, 0.05, lambda: None)


class KeyLoginTests(unittest.TestCase):
    """
    Public keys registered per identity in the configuration.
    """

    def setUp(self):
        self.gateway = SSHGateway(self)

    @defer.inlineCallbacks
    def test_registered_key(self):
        """
        A key registered for deploy-bot logs in as the target login, and the
        session is recorded with the identity, the key's fingerprint, the
        client address, the target and the login; the gateway's own key
        never reaches the client.
        """
        out, err, code = yield self.gateway.ssh("id -un")
        self.assertEqual((out.decode().strip(), code), (sshd().login, 0), err)
        yield self.gateway.wait_for("session.end")
        (start,) = self.gateway.events("session.start")
        _, public = key("deploy-bot")
        self.assertEqual(start["identity"]["subject"], "deploy-bot")
        self.assertEqual(start["identity"]["method"], "ssh-key")
        self.assertEqual(start["identity"]["groups"], ["deployers"])
        fingerprint = subprocess_fingerprint(key("deploy-bot")[0] + ".pub")
        self.assertEqual(start["attributes"]["key_fingerprint"], fingerprint)
        self.assertEqual(start["identity"]["provenance"]["key_fingerprint"], fingerprint)
        self.assertEqual(start["attributes"]["login"], sshd().login)
        self.assertEqual(start["target"], "ssh://%s@127.0.0.1:%d" % (sshd().login, sshd().port))
        self.assertTrue(start["client"].startswith("127.0.0.1:"))
        (end,) = self.gateway.events("session.end")
        self.assertEqual(end["reason"], "client disconnected")
        with open(key("gateway")[0], "rb") as handle:
            self.assertNotIn(handle.read(), self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_key_exchanges(self):
        """
        Group exchange with SHA-256 works (OpenSSH's moduli are loaded); a
        SHA-1 key exchange is not offered.
        """
        out, err, code = yield self.gateway.ssh("true", extra=["-o", "KexAlgorithms=diffie-hellman-group-exchange-sha256"])
        self.assertEqual(code, 0, err)
        out, err, code = yield self.gateway.ssh("true", extra=["-o", "KexAlgorithms=diffie-hellman-group14-sha1"])
        self.assertEqual(code, 255)
        self.assertIn("no matching key exchange method found", err)

    @defer.inlineCallbacks
    def test_unregistered_key(self):
        """
        A key nobody registered is refused, the client is told why, and the
        attempt is recorded as a refused session.
        """
        key("stranger")
        out, err, code = yield self.gateway.ssh("true", key_name="stranger")
        self.assertEqual(code, 255)
        self.assertIn("is not registered for any identity on this connection", err)
        (refused,) = yield self.gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "key:unknown-key")
        self.assertEqual(self.gateway.events("session.start"), [])

    @defer.inlineCallbacks
    def test_group_not_allowed(self):
        """
        A registered key whose identity is in no allowed group is refused by
        the chain's groups check.
        """
        out, err, code = yield self.gateway.ssh("true", key_name="outsider")
        self.assertEqual(code, 255)
        self.assertIn("outsider is not in any group allowed to use this connection", err)
        (refused,) = yield self.gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "allowed_groups")

    @defer.inlineCallbacks
    def test_login_not_allowed(self):
        """
        The SSH user name is the target login: one the connection does not
        allow is refused, and the record names who tried.
        """
        out, err, code = yield self.gateway.ssh("true", login="nobody")
        self.assertEqual(code, 255)
        self.assertIn("the login 'nobody' is not allowed on this connection", err)
        (refused,) = yield self.gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "allowed_logins")
        self.assertEqual(refused["identity"]["subject"], "deploy-bot")
        self.assertEqual(refused["attributes"]["login"], "nobody")


def subprocess_fingerprint(path):
    import subprocess

    output = subprocess.run(["ssh-keygen", "-l", "-f", path], capture_output=True, text=True, check=True).stdout
    return output.split()[1]


class CertificateLoginTests(unittest.TestCase):
    """
    OpenSSH user certificates from a configured CA, made by the real
    ssh-keygen -s: the principal names the identity.
    """

    def setUp(self):
        self.gateway = SSHGateway(self)

    @defer.inlineCallbacks
    def test_valid_certificate(self):
        """
        A certificate for an unregistered key, signed by the CA for the
        principal alice, logs in as alice (a human); the record keeps the
        certificate's id, serial and CA.
        """
        path = certificate("cert-user", ["alice"], identity="alice@laptop", serial=4242)
        out, err, code = yield self.gateway.ssh("echo in", key_name="cert-user", certificate_path=path)
        self.assertEqual((out, code), (b"in\n", 0), err)
        (start,) = yield self.gateway.wait_for("session.start")
        identity = start["identity"]
        self.assertEqual((identity["subject"], identity["method"], identity["kind"]), ("alice", "ssh-cert", "human"))
        self.assertEqual(identity["token_id"], 4242)
        self.assertEqual(identity["provenance"]["certificate_id"], "alice@laptop")
        self.assertEqual(identity["provenance"]["ca"], "test-ca")
        self.assertEqual(start["attributes"]["certificate"]["key_id"], "alice@laptop")

    @defer.inlineCallbacks
    def assertCertificateRefused(self, path, expected, rule):
        out, err, code = yield self.gateway.ssh("true", key_name="cert-user", certificate_path=path)
        self.assertEqual(code, 255)
        self.assertIn(expected, err)
        refused = yield self.gateway.wait_for("session.refused")
        self.assertIn(rule, [event["refusal"]["rule"] for event in refused])
        self.assertEqual(self.gateway.events("session.start"), [])

    def test_expired(self):
        """
        A certificate whose validity window has passed is refused.
        """
        path = certificate("cert-user", ["alice"], identity="old", validity="20200101:20200102")
        return self.assertCertificateRefused(path, "the certificate expired at 2020-01-02", "key:expired")

    def test_not_yet_valid(self):
        """
        A certificate valid only from tomorrow is refused.
        """
        path = certificate("cert-user", ["alice"], identity="future", validity="+1d:+2d")
        return self.assertCertificateRefused(path, "the certificate is not valid before", "key:not-yet-valid")

    def test_untrusted_ca(self):
        """
        A certificate signed by a CA the connection does not list is refused.
        """
        key("rogue-ca")
        path = certificate("cert-user", ["alice"], identity="rogue", ca="rogue-ca")
        return self.assertCertificateRefused(path, "signed by a CA this connection does not trust", "key:unknown-ca")

    def test_unknown_principal(self):
        """
        A certificate whose principals are no identity here is refused.
        """
        path = certificate("cert-user", ["mallory"], identity="mallory")
        return self.assertCertificateRefused(
            path, "none of the certificate's principals (mallory)", "key:unknown-principal"
        )

    def test_forced_command_refused(self):
        """
        A certificate with a critical option the gateway does not enforce
        (force-command) is refused rather than ignored.
        """
        path = certificate("cert-user", ["alice"], identity="forced", options=["force-command=/bin/true"])
        return self.assertCertificateRefused(
            path, "critical options the gateway does not enforce", "key:critical-option"
        )


class TokenLoginTests(unittest.TestCase):
    """
    An OIDC token as the password or keyboard-interactive answer, verified
    by the identity addon, for CI systems.
    """

    def setUp(self):
        self.gateway = SSHGateway(self)

    @defer.inlineCallbacks
    def test_password(self):
        """
        A valid token given as the password (through SSH_ASKPASS) logs in as
        its subject, whatever the target login; the token is not recorded.
        """
        token = support.token(subject="ci-bot", groups=["payments-bots"])
        out, err, code = yield self.gateway.token_ssh("echo ok", token)
        self.assertEqual((out, code), (b"ok\n", 0), err)
        (start,) = yield self.gateway.wait_for("session.start")
        self.assertEqual(start["identity"]["subject"], "ci-bot")
        self.assertEqual(start["identity"]["method"], "oidc")
        self.assertEqual(start["attributes"]["method"], "password")
        self.assertNotIn(token.encode(), self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_keyboard_interactive(self):
        """
        The same token answering the keyboard-interactive prompt logs in.
        """
        token = support.token(subject="ci-bot", groups=["payments-bots"])
        out, err, code = yield self.gateway.token_ssh("echo ok", token, method="keyboard-interactive")
        self.assertEqual((out, code), (b"ok\n", 0), err)
        (start,) = yield self.gateway.wait_for("session.start")
        self.assertEqual(start["attributes"]["method"], "keyboard-interactive")

    @defer.inlineCallbacks
    def test_long_token_in_parts(self):
        """
        A token longer than the 1023 bytes OpenSSH passes in one answer
        goes in parts through keyboard-interactive (etc/hoopgw-askpass).
        """
        token = support.token(subject="ci-bot", groups=["payments-bots"], extra={"claims": "x" * 2000})
        self.assertGreater(len(token), 2500)
        out, err, code = yield self.gateway.token_ssh("echo ok", token, method="keyboard-interactive")
        self.assertEqual((out, code), (b"ok\n", 0), err)

    @defer.inlineCallbacks
    def test_long_token_as_password(self):
        """
        The same token as a password arrives cut by OpenSSH: the client is
        told so and how to send it instead.
        """
        token = support.token(subject="ci-bot", groups=["payments-bots"], extra={"claims": "x" * 2000})
        out, err, code = yield self.gateway.token_ssh("echo ok", token)
        self.assertEqual(code, 255)
        self.assertIn("the token arrived cut (OpenSSH passes at most 1023 bytes in one answer)", err)
        (refused,) = yield self.gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "token-truncated")
        self.assertNotIn(token[:1023].encode(), self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_expired_token(self):
        """
        An expired token is refused with the reason shown to the client, and
        the refusal is recorded without the token.
        """
        token = support.token(now=time.time() - 3600, lifetime=600)
        out, err, code = yield self.gateway.token_ssh("true", token)
        self.assertEqual(code, 255)
        self.assertIn("hoopgw refused the login: the token has expired", err)
        (refused,) = yield self.gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "identity:expired")
        self.assertNotIn(token.encode(), self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_not_a_token(self):
        """
        A password that is not a token is refused with a sentence saying
        what to send.
        """
        out, err, code = yield self.gateway.token_ssh("true", "hunter2", method="keyboard-interactive")
        self.assertEqual(code, 255)
        self.assertIn("the password is not a JSON Web Token", err)
        yield self.gateway.wait_for("session.refused")
        self.assertNotIn(b"hunter2", self.gateway.raw_store())


class ExecTests(unittest.TestCase):
    """
    Exec requests are commands through the chain; output streams back
    through the result hooks and the exit status through to the client.
    """

    def setUp(self):
        self.gateway = SSHGateway(
            self, policy={"deny_programs": ["sudo", "touch"], "approve_programs": ["date", "hostname"]}
        )

    @defer.inlineCallbacks
    def test_allowed_with_streams_and_exit_code(self):
        """
        stdout, stderr and the exit status pass through, and the command is
        recorded with its argv, its decision and its exit status.
        """
        out, err, code = yield self.gateway.ssh("echo to-out; echo to-err >&2; exit 7")
        self.assertEqual((out, code), (b"to-out\n", 7))
        self.assertIn("to-err", err)
        yield self.gateway.wait_for("session.end")
        (command,) = self.gateway.commands("exec")
        self.assertEqual(command["decision"]["verdict"], "allow")
        self.assertEqual(command["facts"]["programs"], ["echo", "echo", "exit"])
        self.assertEqual(command["outcome"]["status"], "exited")
        self.assertEqual(command["outcome"]["exit_status"], 7)
        self.assertEqual(command["outcome"]["stdout_bytes"], 7)

    @defer.inlineCallbacks
    def shared_connection(self, *commands):
        """
        Run C{commands} one after another through one ssh ControlMaster
        connection; ssh closes a shared channel once it has sent and
        received EOF, before the exit status may have come.

        @return: a Deferred firing with each command's C{(stdout, stderr,
            exit code)} and the exec commands recorded.
        """
        control = os.path.join(tempfile.mkdtemp(prefix="hoopgw-mux-"), "c")
        self.addCleanup(shutil.rmtree, os.path.dirname(control), True)
        where = [SSH] + self.gateway.options() + ["-o", "ControlPath=" + control]
        login = "%s@127.0.0.1" % (self.gateway.login,)
        master = run(where + ["-o", "ControlMaster=yes", "-N", login])
        yield eventually(lambda: os.path.exists(control))
        results = []
        for command in commands:
            results.append((yield run(where + ["-o", "ControlMaster=no", login, command])))
        yield run(where + ["-O", "exit", login])
        yield master
        yield self.gateway.wait_for("session.end")
        return results, self.gateway.commands("exec")

    @defer.inlineCallbacks
    def test_exit_status_after_eof(self):
        """
        A command that closes its output, then exits a moment later: sshd
        sends EOF, and the exit status only once the process is gone.  An
        ssh sharing a connection (ControlMaster), its stdin at an end,
        closes the channel on that EOF and still reads the exit status, as
        with sshd alone: the gateway passes it on before answering the
        CLOSE, and records it.
        """
        results, commands = yield self.shared_connection("exit 0", "echo before; exec >&- 2>&-; sleep 1; exit 3")
        self.assertEqual([code for _, _, code in results], [0, 3], results)
        self.assertEqual(results[1][0], b"before\n")
        self.assertEqual((commands[1]["outcome"]["status"], commands[1]["outcome"]["exit_status"]), ("exited", 3))
        self.assertNotIn("reason", commands[1]["outcome"])

    @defer.inlineCallbacks
    def test_close_wait_bounded(self):
        """
        The wait for the target's exit status after the client's CLOSE is
        bounded (CLOSE_WAIT): past it the client's CLOSE is answered (ssh
        exits 255, no status came) and the command is recorded
        interrupted.
        """
        from hoopgw.ssh import channels

        self.patch(channels, "CLOSE_WAIT", 1.0)
        results, commands = yield self.shared_connection("exec >&- 2>&-; sleep 20; exit 3")
        self.assertEqual([code for _, _, code in results], [255], results)
        self.assertEqual(
            (commands[0]["outcome"]["status"], commands[0]["outcome"]["reason"]),
            ("interrupted", "the client closed the channel"),
        )

    @defer.inlineCallbacks
    def test_exit_signal(self):
        """
        A command killed by a signal is recorded with the signal.
        """
        out, err, code = yield self.gateway.ssh("kill -TERM $$")
        self.assertNotEqual(code, 0)
        yield self.gateway.wait_for("session.end")
        (command,) = self.gateway.commands("exec")
        self.assertEqual((command["outcome"]["status"], command["outcome"]["signal"]), ("signalled", "TERM"))

    @defer.inlineCallbacks
    def test_blocked(self):
        """
        A denied command never reaches the target: the client gets the
        reason on stderr and exit status 126; the record has the denial.
        """
        marker = os.path.abspath(self.mktemp())
        out, err, code = yield self.gateway.ssh("touch %s" % (marker,))
        self.assertEqual(code, 126)
        self.assertIn("hoopgw denied this command: touch is not allowed (rule test:deny-program)", err)
        self.assertFalse(os.path.exists(marker))
        yield self.gateway.wait_for("session.end")
        (command,) = self.gateway.commands("exec")
        self.assertEqual(command["decision"]["verdict"], "deny")
        self.assertEqual(command["decision"]["rule"], "test:deny-program")
        self.assertEqual(command["outcome"]["status"], "denied")

    @defer.inlineCallbacks
    def test_blocked_in_pipeline(self):
        """
        A denied program anywhere in a pipeline denies the command line.
        """
        out, err, code = yield self.gateway.ssh("echo x | sudo -n true")
        self.assertEqual(code, 126)
        self.assertIn("sudo is not allowed", err)

    @defer.inlineCallbacks
    def test_approved(self):
        """
        A command held for approval waits (the client is told on stderr), then
        runs once approved; the record keeps the approval.
        """
        running = self.gateway.ssh("hostname")
        policy = self.gateway.addon("test-policy")
        yield eventually(lambda: policy.waiting)
        self.assertNoResult(running)
        command, pending = policy.waiting[0]
        pending.callback(Decision.approved({"id": "a-1", "approvers": ["carol"]}, reason="change 42"))
        out, err, code = yield running
        self.assertEqual((out.decode().strip(), code), (os.uname().nodename, 0), err)
        self.assertIn("hoopgw: waiting for a human to approve 'hostname'", err)
        yield self.gateway.wait_for("session.end")
        (recorded,) = self.gateway.commands("exec")
        self.assertEqual(recorded["decision"]["verdict"], "approved")
        self.assertEqual(recorded["decision"]["approval"]["approvers"], ["carol"])

    @defer.inlineCallbacks
    def test_denied_after_waiting(self):
        """
        A command held for approval and then denied never runs.
        """
        running = self.gateway.ssh("date")
        policy = self.gateway.addon("test-policy")
        yield eventually(lambda: policy.waiting)
        policy.waiting[0][1].callback(Decision.deny("nobody approved it", rule="approval:rejected"))
        out, err, code = yield running
        self.assertEqual((out, code), (b"", 126))
        self.assertIn("hoopgw denied this command: nobody approved it", err)

    @defer.inlineCallbacks
    def test_client_gives_up_waiting(self):
        """
        A client that disconnects while its command waits for approval
        cancels the wait; the command is recorded as not run.
        """
        process, collector = spawn([SSH] + self.gateway.options() + ["%s@127.0.0.1" % (self.gateway.login,), "date"])
        policy = self.gateway.addon("test-policy")
        yield eventually(lambda: policy.waiting)
        process.signalProcess("KILL")
        yield collector.done
        yield self.gateway.wait_for("session.end")
        (recorded,) = self.gateway.commands("exec")
        self.assertEqual(recorded["outcome"]["status"], "interrupted")
        self.assertTrue(policy.waiting[0][1].called)

    @defer.inlineCallbacks
    def test_redacted_command_line(self):
        """
        A token and a card number on the command line are redacted in the
        record (the target still gets the command as sent).
        """
        token = support.token()
        out, err, code = yield self.gateway.ssh("echo %s %s | wc -c" % (token, PAN))
        self.assertEqual(code, 0, err)
        self.assertEqual(int(out), len(token) + 1 + len(PAN) + 1)
        yield self.gateway.wait_for("session.end")
        raw = self.gateway.raw_store()
        self.assertNotIn(token.encode(), raw)
        self.assertNotIn(PAN.encode(), raw)

    @defer.inlineCallbacks
    def test_client_disconnects_mid_command(self):
        """
        Killing the client while its command runs ends the target's channel
        and records the command as interrupted and the session as ended.
        """
        process, collector = spawn(
            [SSH] + self.gateway.options() + ["%s@127.0.0.1" % (self.gateway.login,), "echo started; sleep 30"]
        )
        yield eventually(lambda: b"started" in b"".join(collector.out))
        process.signalProcess("KILL")
        yield collector.done
        (end,) = yield self.gateway.wait_for("session.end")
        self.assertEqual(end["reason"], "client disconnected")
        (recorded,) = self.gateway.commands("exec")
        self.assertEqual(recorded["outcome"]["status"], "interrupted")
        yield eventually(lambda: not self.gateway.gateway.factories["deploy"].avatars)

    @defer.inlineCallbacks
    def test_stdin_streams_to_target(self):
        """
        What the client sends on stdin reaches the command, with EOF.
        (The data is chosen so that its SHA-256 holds no run of digits a
        card number could be: the connection's stream masker would rightly
        mask a Luhn-valid one in sha256sum's output.)
        """
        import random
        import re

        for seed in range(1000):
            data = random.Random(seed).randbytes(300000)
            if not re.search(r"[0-9]{12}", hashlib.sha256(data).hexdigest()):
                break
        out, err, code = yield self.gateway.ssh("sha256sum", stdin=data)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.split()[0].decode(), hashlib.sha256(data).hexdigest())


class MaskingTests(unittest.TestCase):
    """
    Output goes through the chain's result hooks as a stream: a masking
    addon may hold bytes back across chunks and release them on the final
    chunk.
    """

    def setUp(self):
        self.gateway = SSHGateway(self)

    @defer.inlineCallbacks
    def test_pan_split_across_writes(self):
        """
        A card number written in two pieces (two SSH packets, 300 ms apart)
        is still masked, on stdout and on stderr, and the record holds it
        masked only.
        """
        script = (
            "printf '4111 1111 '; sleep 0.3; printf '1111 1111\\n'; "
            "printf '4111111' >&2; sleep 0.3; printf '111111111\\n' >&2"
        )
        out, err, code = yield self.gateway.ssh(script)
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"4111 11** **** 1111\n")
        self.assertIn(MASKED_PAN + "\n", err)
        self.assertNotIn(PAN, err)
        self.assertGreater(self.gateway.addon("test-stream-mask").held_back, 0)
        yield self.gateway.wait_for("session.end")
        (command,) = self.gateway.commands("exec")
        self.assertEqual(command["outcome"]["masked"], 2)
        self.assertNotIn(b"1111 1111 1111", self.gateway.raw_store())

    @defer.inlineCallbacks
    def test_held_back_released_at_end(self):
        """
        Digits held back at the very end of the output are released (masked
        or not) when the stream ends.
        """
        out, err, code = yield self.gateway.ssh("printf 'card %s'; printf ' order 12345'" % (PAN,))
        self.assertEqual((out, code), (("card %s order 12345" % (MASKED_PAN,)).encode(), 0), err)

    @defer.inlineCallbacks
    def test_large_output(self):
        """
        Several megabytes of output pass through the result hooks intact
        (only card numbers would change).
        """
        out, err, code = yield self.gateway.ssh("head -c 5000000 /dev/zero | tr '\\0' 'x'")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, b"x" * 5000000)


class FailClosedTests(unittest.TestCase):
    """
    An addon failing on the output withholds the rest of it.
    """

    @defer.inlineCallbacks
    def test_result_hook_fails(self):
        """
        When a result hook raises, nothing more of the command's output
        reaches the client, the client is told why, and the command is
        recorded as withheld.
        """
        gateway = SSHGateway(
            self, addons=["identity", {"path": ssh_support.ADDONS_FILE, "name": "test-exploding-results"}, "record"]
        )
        out, err, code = yield gateway.ssh("echo safe; sleep 0.3; echo explode now; sleep 0.3; echo after")
        self.assertEqual(out, b"safe\n")
        self.assertIn("hoopgw withheld this command's output because the test-exploding-results addon failed", err)
        self.assertNotEqual(code, 0)
        yield gateway.wait_for("session.end")
        (command,) = gateway.commands("exec")
        self.assertEqual(command["outcome"]["status"], "withheld")


class ShellTests(unittest.TestCase):
    """
    Interactive shells: refused for service identities by default, and
    recorded as asciicast v2 when allowed.
    """

    def setUp(self):
        self.gateway = SSHGateway(self)

    @defer.inlineCallbacks
    def test_refused_for_service_identity(self):
        """
        A service identity asking for a shell is refused (PCI DSS 8.6.1),
        and the refusal is recorded.
        """
        out, err, code = yield self.gateway.ssh(None, extra=["-tt"], stdin=b"id\nexit\n")
        self.assertEqual(code, 126)
        self.assertIn("interactive shells are not allowed for service identities", err)
        yield self.gateway.wait_for("session.end")
        (command,) = self.gateway.commands("shell")
        self.assertEqual((command["decision"]["verdict"], command["decision"]["rule"]), ("deny", "shell"))

    def interactive(self, *extra):
        """
        The real ssh -tt with a real terminal (a pty, 100x30) as alice.

        @return: C{(process, collector, output)}: C{output()} is what the
            terminal received so far.
        """
        master, slave = pty.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        arguments = [SSH] + self.gateway.options(key_name="alice") + list(extra) + [
            "-tt", "%s@127.0.0.1" % (self.gateway.login,)]
        environment = {"PATH": os.environ["PATH"], "HOME": ssh_support.directory(), "TERM": "xterm", "LANG": "C.UTF-8"}
        collector = ssh_support._Collect(b"", defer.Deferred())
        collector.connectionMade = lambda: None
        process = reactor.spawnProcess(
            collector, SSH, arguments, env=environment, usePTY=(master, slave, os.ttyname(slave))
        )
        return process, collector, lambda: b"".join(collector.out)

    def replay(self, session, *extra):
        """
        C{hoopgw replay} of a session of the gateway's store, played fast.

        @return: C{(exit status, what it printed)}.
        """
        out = io.StringIO()
        arguments = ["replay", "--store", self.gateway.store_path, session, "--speed", "1000"] + list(extra)
        status = cli.main(arguments, out=out)
        return status, out.getvalue()

    @defer.inlineCallbacks
    def test_recorded_shell(self):
        """
        A human's shell in a real terminal is recorded: output and input,
        and a window change; the recording plays back exactly what the
        client's terminal received, card numbers masked, and its digest is
        committed into the chain by the shell command's end event, before
        the session ends.  C{hoopgw replay} plays it back.
        """
        process, collector, output = self.interactive()
        yield eventually(lambda: b"#" in output() or b"$" in output())
        process.write(("echo card %s\r" % (PAN,)).encode())
        yield eventually(lambda: output().count(MASKED_PAN.encode()) >= 2)
        fcntl.ioctl(process.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        os.kill(process.pid, 28)  # SIGWINCH
        process.write(b"stty size\r")
        yield eventually(lambda: b"40 120" in output())
        process.write(b"exit\r")
        yield collector.done
        (end,) = yield self.gateway.wait_for("session.end")
        received = output()
        self.assertNotIn(PAN.encode(), received)
        self.assertNotIn("cast", end)
        self.assertNotIn("attachments", end)
        (command,) = self.gateway.commands("shell")
        attachment = command["outcome"]["cast"]
        self.assertLess(command["seq"], end["seq"])
        with open(os.path.join(self.gateway.store_path, "casts", attachment["name"]), "rb") as handle:
            recording = handle.read()
        self.assertEqual(hashlib.sha256(recording).hexdigest(), attachment["sha256"])
        self.assertEqual(attachment["bytes"], len(recording))
        parsed = casts.parse(recording)
        self.assertEqual((parsed.header["version"], parsed.width, parsed.height), (2, 100, 30))
        played = parsed.text()
        # The client's terminal is in raw mode: what ssh printed is what the
        # gateway sent, then ssh's own "Connection ... closed" line.
        text = received.decode("utf-8", "replace")
        self.assertTrue(text.startswith(played), (text, played))
        self.assertIn("Connection to 127.0.0.1 closed", text[len(played):])
        self.assertIn(MASKED_PAN, played)
        self.assertNotIn(PAN, recording.decode())
        self.assertIn("echo card %s" % (MASKED_PAN,), parsed.text("i"))
        self.assertIn("120x40", [text for _, code, text in parsed.frames if code == "r"])
        report = verify_store(self.gateway.store_path)
        self.assertTrue(report.ok, report.problem)
        self.assertEqual(report.casts, 1)
        status, replayed = self.replay(end["session"])
        self.assertEqual(status, 0, replayed)
        self.assertIn("#1 ", replayed)
        self.assertIn("   terminal recording: %s (sha256 %s" % (attachment["name"], attachment["sha256"]), replayed)
        self.assertIn("--- playing #1 %s" % (attachment["name"],), replayed)
        self.assertIn(played, replayed)

    @defer.inlineCallbacks
    def test_two_recordings_in_one_session(self):
        """
        Two terminals in one SSH session (ssh's connection sharing: a shell,
        then a command with a pty over the same connection) leave two
        recordings, each committed by its own command's end event; the
        record verifies with both checked, C{hoopgw replay} and the replay
        web application (in Chromium) play each under its command, and a
        recording edited or deleted afterwards is named by verify.
        """
        control = os.path.join(tempfile.mkdtemp(prefix="hoopgw-mux-"), "c")
        self.addCleanup(shutil.rmtree, os.path.dirname(control), True)
        process, collector, output = self.interactive("-o", "ControlMaster=yes", "-o", "ControlPath=" + control)
        yield eventually(lambda: b"#" in output() or b"$" in output())
        yield eventually(lambda: os.path.exists(control))
        arguments = [SSH] + self.gateway.options(key_name="alice") + [
            "-o", "ControlMaster=no", "-o", "ControlPath=" + control, "-tt", "%s@127.0.0.1" % (self.gateway.login,),
            "echo second terminal %s" % (PAN,)]
        out, err, code = yield run(arguments)
        self.assertEqual(code, 0, err)
        self.assertIn(("second terminal %s" % (MASKED_PAN,)).encode(), out)
        process.write(("echo first terminal %s\r" % (PAN,)).encode())
        yield eventually(lambda: output().count(MASKED_PAN.encode()) >= 2)
        process.write(b"exit\r")
        yield collector.done
        (end,) = yield self.gateway.wait_for("session.end")
        # In the order they started: the shell (#1 in the timeline), then the command.
        (shell,) = self.gateway.commands("shell")
        (second,) = self.gateway.commands("exec")
        self.assertEqual({shell["session"], second["session"]}, {end["session"]})
        names = [shell["outcome"]["cast"]["name"], second["outcome"]["cast"]["name"]]
        self.assertEqual(len(set(names)), 2)
        report = verify_store(self.gateway.store_path)
        self.assertTrue(report.ok, report.problem)
        self.assertEqual(report.casts, 2)
        status, replayed = self.replay(end["session"])
        self.assertEqual(status, 0, replayed)
        shell_at = replayed.index("--- playing #1 %s" % (names[0],))
        exec_at = replayed.index("--- playing #2 %s" % (names[1],))
        self.assertIn("first terminal %s" % (MASKED_PAN,), replayed[shell_at:exec_at])
        self.assertIn("second terminal %s" % (MASKED_PAN,), replayed[exec_at:])
        self.assertNotIn(PAN, replayed)
        status, only = self.replay(end["session"], "--command", second["command"])
        self.assertEqual(status, 0, only)
        self.assertNotIn("--- playing #1", only)
        self.assertIn("--- playing #2", only)
        server = ReplayServer(self, self.gateway.store_path, self.gateway.config_path)
        screenshot = os.path.abspath(self.mktemp()) + "-ssh-session.png"
        seen = yield in_thread(play_session, server.base, end["session"], screenshot)
        yield server.stop()
        self.assertEqual([player["command"] for player in seen["players"]], [shell["command"], second["command"]])
        self.assertIn("first terminal %s" % (MASKED_PAN,), seen["players"][0]["screen"])
        self.assertIn("second terminal %s" % (MASKED_PAN,), seen["players"][1]["screen"])
        self.assertNotIn(PAN, seen["timeline"] + seen["players"][0]["screen"] + seen["players"][1]["screen"])

        casts_folder = os.path.join(self.gateway.store_path, "casts")
        with open(os.path.join(casts_folder, names[0]), "ab") as handle:
            handle.write(b'[99.0, "o", "forged"]\n')
        report = verify_store(self.gateway.store_path)
        self.assertEqual(report.kind, "cast-edited", report.problem)
        self.assertIn(names[0], report.problem)
        # The command's recording was committed first (it ended first): named first.
        os.unlink(os.path.join(casts_folder, names[1]))
        report = verify_store(self.gateway.store_path)
        self.assertEqual(report.kind, "cast-missing", report.problem)
        self.assertIn(names[1], report.problem)
        status, replayed = self.replay(end["session"])
        self.assertEqual(status, 1)
        self.assertIn("#1: the recording %s does not match the digest" % (names[0],), replayed)
        self.assertIn("#2: the recording %s is missing from the record" % (names[1],), replayed)
        self.assertNotIn("forged", replayed)


class FileTransferTests(unittest.TestCase):
    """
    scp both ways (the legacy protocol runs as exec; OpenSSH 9's default
    runs over sftp) and sftp operations, each recorded.
    """

    def setUp(self):
        self.remote = os.path.abspath(self.mktemp())
        os.makedirs(self.remote)
        self.gateway = SSHGateway(self, sftp=True, policy={"deny_upload_prefix": os.path.join(self.remote, "denied")})
        self.local = os.path.abspath(self.mktemp())
        os.makedirs(self.local)
        self.data = os.urandom(3 * 1024 * 1024 + 17)
        with open(os.path.join(self.local, "upload.bin"), "wb") as handle:
            handle.write(self.data)

    def scp_options(self):
        options = self.gateway.options()
        options[options.index("-p")] = "-P"
        return options

    @defer.inlineCallbacks
    def scp_both_ways(self, mode):
        remote = "%s@127.0.0.1:%s" % (self.gateway.login, os.path.join(self.remote, "copy.bin"))
        out, err, code = yield run([SCP] + mode + self.scp_options() + [os.path.join(self.local, "upload.bin"), remote])
        self.assertEqual(code, 0, err)
        with open(os.path.join(self.remote, "copy.bin"), "rb") as handle:
            self.assertEqual(handle.read(), self.data)
        back = os.path.join(self.local, "back.bin")
        out, err, code = yield run([SCP] + mode + self.scp_options() + [remote, back])
        self.assertEqual(code, 0, err)
        with open(back, "rb") as handle:
            self.assertEqual(handle.read(), self.data)
        yield self.gateway.wait_for("session.end", 2)

    @defer.inlineCallbacks
    def test_scp_legacy_protocol(self):
        """
        scp -O runs scp -t / scp -f on the target as exec commands through
        the chain; the file arrives intact both ways.
        """
        yield self.scp_both_ways(["-O"])
        programs = [command["facts"]["argv"][:2] for command in self.gateway.commands("exec")]
        self.assertEqual(programs, [["scp", "-t"], ["scp", "-f"]])

    @defer.inlineCallbacks
    def test_scp_over_sftp(self):
        """
        scp over sftp (OpenSSH 9's default): the upload and the download are
        sftp opens, recorded with their byte counts.
        """
        yield self.scp_both_ways([])
        opens = [command for command in self.gateway.commands("sftp") if command["facts"]["operation"] == "open"]
        self.assertEqual([command["facts"]["transfer"] for command in opens], ["upload", "download"])
        self.assertEqual(opens[0]["outcome"]["bytes_written"], len(self.data))
        self.assertEqual(opens[1]["outcome"]["bytes_read"], len(self.data))

    @defer.inlineCallbacks
    def test_sftp_operations_recorded(self):
        """
        Each sftp operation (open for upload and download, list, mkdir,
        rename, remove, rmdir) is a command with its paths, decision and
        outcome; a denied upload fails at the client and leaves nothing on
        the target.
        """
        batch = os.path.join(self.local, "batch")
        remote = self.remote
        with open(batch, "w") as handle:
            handle.write(
                "\n".join(
                    [
                        "mkdir %s/dir" % (remote,),
                        "put %s/upload.bin %s/dir/a.bin" % (self.local, remote),
                        "rename %s/dir/a.bin %s/dir/b.bin" % (remote, remote),
                        "ls %s/dir" % (remote,),
                        "get %s/dir/b.bin %s/got.bin" % (remote, self.local),
                        "rm %s/dir/b.bin" % (remote,),
                        "rmdir %s/dir" % (remote,),
                        "mkdir %s/denied" % (remote,),
                        "put %s/upload.bin %s/denied/x.bin" % (self.local, remote),
                    ]
                )
                + "\n"
            )
        options = self.scp_options()
        out, err, code = yield run([SFTP] + options + ["-b", batch, "%s@127.0.0.1" % (self.gateway.login,)])
        self.assertNotEqual(code, 0)
        self.assertIn("Permission denied", err)
        with open(os.path.join(self.local, "got.bin"), "rb") as handle:
            self.assertEqual(handle.read(), self.data)
        self.assertFalse(os.path.exists(os.path.join(remote, "denied", "x.bin")))
        yield self.gateway.wait_for("session.end")
        operations = [
            (
                command["facts"]["operation"],
                (command["facts"].get("path") or "").rstrip("/"),
                command["decision"]["verdict"],
            )
            for command in self.gateway.commands("sftp")
        ]
        self.assertIn(("mkdir", remote + "/dir", "allow"), operations)
        self.assertIn(("open", remote + "/dir/a.bin", "allow"), operations)
        self.assertIn(("rename", remote + "/dir/a.bin", "allow"), operations)
        self.assertIn(("list", remote + "/dir", "allow"), operations)
        self.assertIn(("open", remote + "/dir/b.bin", "allow"), operations)
        self.assertIn(("remove", remote + "/dir/b.bin", "allow"), operations)
        self.assertIn(("rmdir", remote + "/dir", "allow"), operations)
        self.assertIn(("open", remote + "/denied/x.bin", "deny"), operations)
        byname = {(c["facts"]["operation"], c["facts"].get("path")): c for c in self.gateway.commands("sftp")}
        self.assertEqual(byname[("open", remote + "/dir/a.bin")]["outcome"]["bytes_written"], len(self.data))
        self.assertEqual(byname[("rename", remote + "/dir/a.bin")]["facts"]["target"], remote + "/dir/b.bin")
        self.assertEqual(byname[("open", remote + "/denied/x.bin")]["decision"]["rule"], "test:deny-upload")

    @defer.inlineCallbacks
    def test_sftp_off_by_default(self):
        """
        A connection without sftp: true refuses the subsystem, and says so.
        """
        gateway = SSHGateway(self)
        destination = "%s@127.0.0.1" % (gateway.login,)
        out, err, code = yield run([SFTP] + _scp_options(gateway) + ["-b", "/dev/null", destination])
        self.assertNotEqual(code, 0)
        self.assertIn("sftp is not allowed on this connection", err)


def _scp_options(gateway):
    options = gateway.options()
    options[options.index("-p")] = "-P"
    return options


class TargetTests(unittest.TestCase):
    """
    The target side: the pinned host key, and a target that is down.
    """

    @defer.inlineCallbacks
    def test_host_key_mismatch(self):
        """
        A target presenting another host key than the pinned one is refused
        with a clear error, and the session ends with that reason.
        """
        gateway = SSHGateway(self, target={"host_key": key("impostor-host")[1]})
        out, err, code = yield gateway.ssh("true")
        self.assertEqual(code, 255)
        self.assertIn("is not the one pinned in the configuration", err)
        self.assertIn("update connections.deploy.target", err)
        (end,) = yield gateway.wait_for("session.end")
        self.assertIn("target unavailable", end["reason"])
        self.assertEqual(gateway.commands(), [])

    @defer.inlineCallbacks
    def test_target_lost_mid_command(self):
        """
        When the target's side of a session dies mid-command, the client is
        disconnected with the reason and the command is recorded as
        interrupted.
        """
        gateway = SSHGateway(self)
        process, collector = spawn(
            [SSH] + gateway.options() + ["%s@127.0.0.1" % (gateway.login,), "echo $PPID; sleep 30"]
        )
        output = lambda: b"".join(collector.out)
        yield eventually(lambda: output().endswith(b"\n"))
        # The sshd process serving this session on the target, started by
        # the test's own sshd.
        os.kill(int(output()), signal.SIGKILL)
        out, err, code = yield collector.done
        self.assertEqual(code, 255)
        self.assertIn("the target closed the connection", err)
        (end,) = yield gateway.wait_for("session.end")
        self.assertIn("the target closed the connection", end["reason"])
        (command,) = gateway.commands("exec")
        self.assertEqual(command["outcome"]["status"], "interrupted")

    @defer.inlineCallbacks
    def test_target_down(self):
        """
        A target nobody listens on: the client is told the gateway could not
        reach it.
        """
        gateway = SSHGateway(self, target={"port": support.free_port()})
        out, err, code = yield gateway.ssh("true")
        self.assertEqual(code, 255)
        self.assertIn("hoopgw could not reach the target", err)
        self.assertIn("the connection was refused", err)
        (end,) = yield gateway.wait_for("session.end")
        self.assertIn("could not reach the target", end["reason"])


class ForwardingTests(unittest.TestCase):
    """
    Port, agent and X11 forwarding.
    """

    @defer.inlineCallbacks
    def test_local_forwarding_refused_and_recorded(self):
        """
        ssh -W (a direct-tcpip channel) is refused by default and recorded.
        """
        gateway = SSHGateway(self)
        out, err, code = yield gateway.ssh(None, extra=["-W", "127.0.0.1:%d" % (sshd().port,)])
        self.assertNotEqual(code, 0)
        self.assertIn("hoopgw does not allow port forwarding here", err)
        yield gateway.wait_for("session.end")
        (command,) = gateway.commands("forward")
        self.assertEqual((command["decision"]["verdict"], command["decision"]["rule"]), ("deny", "port_forwarding"))
        self.assertEqual((command["facts"]["host"], command["facts"]["port"]), ("127.0.0.1", sshd().port))

    @defer.inlineCallbacks
    def test_local_forwarding_allowed(self):
        """
        With port_forwarding on, ssh -W reaches the forwarded port through
        the target, and the forward is a command with its byte counts.
        """
        gateway = SSHGateway(self, port_forwarding=True)
        out, err, code = yield gateway.ssh(None, extra=["-W", "127.0.0.1:%d" % (sshd().port,)], stdin=b"bye\n")
        self.assertTrue(out.startswith(b"SSH-2.0-OpenSSH"), (out, err))
        yield gateway.wait_for("session.end")
        (command,) = gateway.commands("forward")
        self.assertEqual(command["decision"]["verdict"], "allow")
        self.assertGreater(command["outcome"]["bytes_from_target"], 0)

    @defer.inlineCallbacks
    def test_remote_forwarding_refused(self):
        """
        ssh -R is refused (and recorded): the gateway never listens for the
        client.
        """
        gateway = SSHGateway(self)
        out, err, code = yield gateway.ssh("true", extra=["-R", "0:127.0.0.1:9", "-o", "ExitOnForwardFailure=yes"])
        self.assertEqual(code, 255)
        self.assertIn("remote port forwarding failed", err)
        yield gateway.wait_for("session.end")
        (command,) = gateway.commands("ssh-request")
        self.assertEqual(command["facts"]["request"], "remote-forwarding")

    @defer.inlineCallbacks
    def test_agent_and_x11_forwarding_refused(self):
        """
        Agent and X11 forwarding are refused and recorded; the command still
        runs, without an agent or a display.
        """
        gateway = SSHGateway(self)
        # A short path: Unix socket names are limited to about 100 bytes.
        folder = tempfile.mkdtemp(prefix="hoopgw-agent-")
        self.addCleanup(shutil.rmtree, folder, True)
        agent = os.path.join(folder, "agent")
        process, collector = spawn(["/usr/bin/ssh-agent", "-D", "-a", agent])
        self.addCleanup(lambda: collector.done)
        self.addCleanup(process.signalProcess, "TERM")
        yield eventually(lambda: os.path.exists(agent))
        out, err, code = yield gateway.ssh(
            "echo ${SSH_AUTH_SOCK:-none} ${DISPLAY:-none}",
            extra=["-o", "ForwardAgent=yes", "-o", "ForwardX11=yes"],
            env={"SSH_AUTH_SOCK": agent, "DISPLAY": "127.0.0.1:0"},
            agent=agent,
        )
        self.assertEqual((out, code), (b"none none\n", 0), err)
        yield gateway.wait_for("session.end")
        requests = sorted(command["facts"]["request"] for command in gateway.commands("ssh-request"))
        self.assertEqual(requests, ["agent-forwarding", "x11-forwarding"])


class HostKeyTests(unittest.TestCase):
    """
    The gateway's own host key, generated once into the state folder.
    """

    @defer.inlineCallbacks
    def test_generated_once_and_reused(self):
        """
        Without host_keys in the configuration, the gateway generates a key
        into its state folder and presents the same key after a restart.
        """
        gateway = SSHGateway(self, host_keys=[])
        first = gateway.gateway.factories["deploy"].host_key_lines()
        out, err, code = yield gateway.ssh("true")
        self.assertEqual(code, 0, err)
        yield gateway.stop()
        restarted = Gateway(gateway.config, reactor, gateway.store)
        self.assertEqual(restarted.factories["deploy"].host_key_lines(), first)
        state = gateway.config.gateway.state_dir
        self.assertTrue(os.path.exists(os.path.join(state, "ssh", "deploy", "ssh_host_ed25519_key")))


class ThrowawaySshServerTests(unittest.TestCase):
    """
    testbed.throwaway.SshServer, the tests' target.
    """

    @defer.inlineCallbacks
    def test_authorized_keys_only(self):
        """
        Only an authorized key logs in, and stop removes the server's folder.
        """
        from testbed.throwaway import SshServer

        server = SshServer()
        server.start()
        self.addCleanup(server.stop)
        server.authorize(key("alice")[1])
        known_hosts = os.path.join(server.directory, "known_hosts")
        with open(known_hosts, "w") as handle:
            handle.write("[127.0.0.1]:%d %s\n" % (server.port, server.host_key))
        base = [SSH, "-F", "/dev/null", "-p", str(server.port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "IdentityAgent=none", "-o", "UserKnownHostsFile=" + known_hosts]
        out, err, code = yield run(base + ["-i", key("alice")[0], "%s@127.0.0.1" % (server.login,), "echo in"])
        self.assertEqual((out, code), (b"in\n", 0), err)
        out, err, code = yield run(base + ["-i", key("stranger")[0], "%s@127.0.0.1" % (server.login,), "true"])
        self.assertEqual(code, 255)
        directory = server.directory
        server.stop()
        self.assertFalse(server.running)
        self.assertFalse(os.path.exists(directory))


class ShutdownTests(unittest.TestCase):
    """
    Stopping the gateway ends the sessions it carries.
    """

    @defer.inlineCallbacks
    def test_stop_ends_sessions(self):
        """
        A session open when the gateway stops is disconnected with a reason
        and its end is recorded before gateway.stop.
        """
        gateway = SSHGateway(self)
        process, collector = spawn(
            [SSH] + gateway.options() + ["%s@127.0.0.1" % (gateway.login,), "echo started; sleep 30"]
        )
        yield eventually(lambda: b"started" in b"".join(collector.out))
        yield gateway.stop()
        yield collector.done
        self.assertIn("hoopgw is shutting down", b"".join(collector.err).decode())
        types = [event["type"] for event in gateway.events()]
        self.assertLess(types.index("session.end"), types.index("gateway.stop"))


class _RawClient(protocol.Protocol):
    """
    A client that sends what the test says (or nothing) and notes what the
    gateway sends back, and when it closes the connection.
    """

    def __init__(self, greeting=b""):
        self.greeting = greeting
        self.received = b""
        self.closed = defer.Deferred()

    def connectionMade(self):
        if self.greeting:
            self.transport.write(self.greeting)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(self.received)


def raw_connect(port, greeting=b"", source="127.0.0.1"):
    """
    Open a raw TCP connection to the gateway from C{source}.

    @return: a Deferred firing with the L{_RawClient} once connected.
    """
    client = _RawClient(greeting)
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
    return endpoints.connectProtocol(endpoint, client)


class BeforeLoginTests(unittest.TestCase):
    """
    The limits before login (login_timeout, max_auth_tries, unauthenticated
    connections in total and per source address), and the record every
    attempt leaves, however early it ended.
    """

    def refusals(self, gateway, rule):
        return [event for event in gateway.events("session.refused") if event["refusal"]["rule"] == rule]

    @defer.inlineCallbacks
    def test_login_timeout(self):
        """
        A client that never finishes logging in (one silent, one that stops
        in the key exchange) is disconnected once login_timeout has passed,
        and each is recorded with the stage it reached and its address.
        """
        gateway = SSHGateway(self, login_timeout="1s")
        silent = yield raw_connect(gateway.ssh_port)
        stalled = yield raw_connect(gateway.ssh_port, b"SSH-2.0-stalled_4111111111111111\r\n")
        silent_got, stalled_got = yield defer.gatherResults([silent.closed, stalled.closed])
        self.assertIn(b"did not log in within 1 seconds (login_timeout)", silent_got)
        self.assertIn(b"did not log in within 1 seconds (login_timeout)", stalled_got)
        refused = yield gateway.wait_for("session.refused", count=2)
        by_stage = {event["attributes"]["stage"]: event for event in refused}
        self.assertEqual(sorted(by_stage), ["key-exchange", "version"])
        for event in refused:
            self.assertEqual(event["refusal"]["rule"], "limit:login-timeout")
            self.assertTrue(event["client"].startswith("127.0.0.1:"))
            self.assertEqual(event["protocol"], "ssh")
        # The client's own words are recorded masked.
        self.assertEqual(by_stage["key-exchange"]["attributes"]["client_version"], "SSH-2.0-stalled_411111******1111")
        self.assertNotIn(PAN.encode(), gateway.raw_store())

    @defer.inlineCallbacks
    def test_max_auth_tries(self):
        """
        A client offering more keys nobody registered than max_auth_tries
        allows is disconnected with a message saying so; each try and the
        limit are recorded.
        """
        gateway = SSHGateway(self, max_auth_tries=2)
        extra = []
        for name in ("stranger-2", "stranger-3"):
            extra += ["-i", key(name)[0]]
        out, err, code = yield gateway.ssh("true", key_name="stranger-1", extra=extra)
        self.assertEqual(code, 255)
        self.assertIn("hoopgw refused the connection: 2 failed authentication attempts on one connection "
                      "(max_auth_tries)", err)
        yield gateway.wait_for("session.refused", count=3)
        self.assertEqual(len(self.refusals(gateway, "key:unknown-key")), 2)
        (limit,) = self.refusals(gateway, "limit:max-auth-tries")
        self.assertEqual(limit["attributes"]["stage"], "authentication")

    @defer.inlineCallbacks
    def test_unauthenticated_limits(self):
        """
        Connections that have not logged in are limited in total and per
        source address: a client over either limit is disconnected with a
        message naming it, and recorded; a connection that logs in or
        leaves frees its place.
        """
        gateway = SSHGateway(self, max_unauthenticated=3, max_unauthenticated_per_source=2)
        idle = []
        for _ in range(2):
            idle.append((yield raw_connect(gateway.ssh_port)))
        other = yield raw_connect(gateway.ssh_port, source="127.0.0.2")
        out, err, code = yield gateway.ssh("true")
        self.assertEqual(code, 255)
        self.assertIn("already has 3 client connections that have not logged in (max_unauthenticated)", err)
        other.transport.loseConnection()
        yield other.closed
        out, err, code = yield gateway.ssh("true")
        self.assertEqual(code, 255)
        self.assertIn("your address 127.0.0.1 already has 2 client connections that have not logged in "
                      "(max_unauthenticated_per_source)", err)
        idle[0].transport.loseConnection()
        yield idle[0].closed
        out, err, code = yield gateway.ssh("true")
        self.assertEqual(code, 0, err)
        (total,) = self.refusals(gateway, "limit:unauthenticated-connections")
        (per_source,) = self.refusals(gateway, "limit:unauthenticated-per-source")
        self.assertEqual(per_source["attributes"]["stage"], "version")
        self.assertTrue(total["client"].startswith("127.0.0.1:"))
        idle[1].transport.loseConnection()
        yield idle[1].closed

    @defer.inlineCallbacks
    def test_every_attempt_recorded(self):
        """
        Connections that end before any login is tried leave an event each,
        with how far it got: one that sends nothing, one that is not SSH (a
        protocol error), one whose key exchange fails (no common algorithm).
        """
        gateway = SSHGateway(self)
        silent = yield raw_connect(gateway.ssh_port)
        silent.transport.loseConnection()
        yield silent.closed
        http = yield raw_connect(gateway.ssh_port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        http.transport.loseConnection()
        yield http.closed
        out, err, code = yield gateway.ssh("true", extra=["-o", "KexAlgorithms=diffie-hellman-group14-sha1"])
        self.assertEqual(code, 255)
        refused = yield gateway.wait_for("session.refused", count=3)
        self.assertEqual([event["refusal"]["rule"] for event in refused],
                         ["ssh:closed-before-login", "ssh:protocol-error", "ssh:key-exchange-failed"])
        self.assertIn("couldn't match all kex parts", refused[2]["refusal"]["reason"])
        self.assertEqual([event["attributes"]["stage"] for event in refused], ["version", "version", "key-exchange"])
        self.assertIn("OpenSSH", refused[2]["attributes"]["client_version"])

    @defer.inlineCallbacks
    def test_protocol_error_recorded(self):
        """
        A client whose SSH version the gateway does not speak is told so
        and recorded with the reason code of a protocol error.
        """
        gateway = SSHGateway(self)
        old = yield raw_connect(gateway.ssh_port, b"SSH-1.5-ancient\r\n")
        received = yield old.closed
        self.assertIn(b"bad version 1.5", received)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "ssh:protocol-error")
        self.assertIn("bad version 1.5", refused["refusal"]["reason"])


class _HostileExit:
    """
    What L{hoopgw.ssh.output.TargetOutput.exit} needs of its relay: the
    command's outcome, whether it is over, and the queue towards the
    client.
    """

    def __init__(self):
        from hoopgw.model import Command

        self.command = Command(kind="exec", text="x", redacted="x", facts={})
        self.queued = []
        self.done = False

    def _queue(self, action):
        self.queued.append(action)


class TargetWordsTests(unittest.TestCase):
    """
    What the target says about how a command ended is as untrusted as
    what a client says: masked before the client or the record sees it,
    and not passed on when malformed.
    """

    def exit(self, name, data):
        from hoopgw.ssh import output

        channel = _HostileExit()
        output.TargetOutput.exit(channel, name, data)
        return channel

    def test_exit_signal_message_masked(self):
        """
        An exit-signal whose message holds a card number reaches the client
        and the record masked.
        """
        from hoopgw.ssh.publickeys import Reader, string

        data = string(b"TERM") + b"\x00" + string(b"killed while charging " + PAN.encode()) + string(b"en")
        channel = self.exit(b"exit-signal", data)
        ((kind, (name, sent)),) = channel.queued
        reader = Reader(sent)
        self.assertEqual((kind, name, reader.string(), reader.boolean()), ("request", b"exit-signal", b"TERM", False))
        self.assertEqual(reader.string(), b"killed while charging " + MASKED_PAN.encode())
        self.assertEqual(reader.string(), b"en")
        self.assertEqual(channel.command.outcome["error"], "killed while charging " + MASKED_PAN)

    def test_malformed_exit_not_passed_on(self):
        """
        A truncated exit-signal or exit-status is recorded as malformed and
        not passed on to the client.
        """
        for name, data in [(b"exit-signal", b"\x00\x00\x00\x09TE"), (b"exit-status", b"\x00\x01")]:
            channel = self.exit(name, data)
            self.assertEqual(channel.queued, [])
            self.assertIn("malformed", channel.command.outcome["error"])

    def test_disconnect_message_masked(self):
        """
        The target's disconnect message, which the client and the record
        are told, is masked.
        """
        from hoopgw.ssh import upstream

        class Attempt:
            disconnect_message = None

        transport = upstream._TargetTransport.__new__(upstream._TargetTransport)
        transport.attempt = Attempt()
        transport.receiveError(11, ("card " + PAN + " refused").encode())
        self.assertEqual(transport.attempt.disconnect_message, "card " + MASKED_PAN + " refused")


class NotUtf8Tests(unittest.TestCase):
    """
    An exec command line that is not valid UTF-8.
    """

    @defer.inlineCallbacks
    def test_recorded_with_escapes(self):
        """
        The command runs and is recorded, its bytes that are not UTF-8
        shown as escapes and its card number masked; no event is lost.
        """
        gateway = SSHGateway(self)
        out, err, code = yield gateway.ssh(b"echo \xff\xfe " + PAN.encode())
        self.assertEqual(code, 0, err)
        yield gateway.wait_for("session.end")
        (command,) = gateway.commands("exec")
        self.assertEqual(command["facts"]["argv"], ["echo", "\\xff\\xfe", MASKED_PAN])
        self.assertNotIn(PAN.encode(), gateway.raw_store())


class _Malformed(ssh_transport.SSHClientTransport):
    """
    A client that completes the key exchange, then asks for a service in a
    message too short to hold its name.
    """

    def verifyHostKey(self, blob, fingerprint):
        return defer.succeed(True)

    def connectionSecure(self):
        self.sendPacket(ssh_transport.MSG_SERVICE_REQUEST, b"\x00\x00")

    def receiveError(self, reasonCode, description):
        self.factory.told.append((reasonCode, description))

    def connectionLost(self, reason):
        ssh_transport.SSHClientTransport.connectionLost(self, reason)
        self.factory.closed.callback(None)


class MalformedMessageTests(unittest.TestCase):
    """
    SSH messages the gateway cannot read.
    """

    @defer.inlineCallbacks
    def test_protocol_error(self):
        """
        A malformed message ends the connection with a protocol error the
        client is told of and an event; nothing is logged as a failure
        (trial would fail the test on a logged traceback).
        """
        gateway = SSHGateway(self)
        factory = protocol.ClientFactory.forProtocol(_Malformed)
        factory.told = []
        factory.closed = defer.Deferred()
        yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.ssh_port), factory.buildProtocol(None)
        )
        yield factory.closed
        self.assertEqual(factory.told, [(ssh_transport.DISCONNECT_PROTOCOL_ERROR,
                                         b"hoopgw: the client sent a malformed SSH message (number 5)")])
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["refusal"]["rule"], "ssh:protocol-error")
        self.assertEqual(refused["attributes"]["stage"], "authentication")


class TargetBannerTests(unittest.TestCase):
    """
    A target whose login banner holds a card number.
    """

    @defer.inlineCallbacks
    def test_banner_neither_relayed_nor_logged(self):
        """
        The target's banner is for people logging in to the target: the
        client (which logs in to the gateway) never sees it, and the
        gateway's log does not hold it.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        from testbed.throwaway import SshServer

        directory = self.mktemp()
        os.makedirs(directory)
        banner = os.path.join(os.path.abspath(directory), "banner")
        with open(banner, "w") as handle:
            handle.write("Authorised use only. Test card %s\n" % (PAN,))
        server = SshServer(settings={"Banner": banner})
        server.start()
        self.addCleanup(server.stop)
        server.authorize(key("gateway")[1])
        logged = []
        observer = lambda event: logged.append(formatEvent(event) or "")
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        gateway = SSHGateway(self, target={"port": server.port, "host_key": server.host_key})
        out, err, code = yield gateway.ssh("echo ok")
        self.assertEqual((out, code), (b"ok\n", 0), err)
        self.assertNotIn("Authorised use only", err)
        self.assertFalse([line for line in logged if PAN in line or "Authorised use only" in line])


class _Fuzzer(ssh_transport.SSHClientTransport):
    """
    A client that completes the key exchange, asks for ssh-userauth, then
    sends the messages the test gives it, and notes how the gateway
    answers: a message (a failure, a banner, "unimplemented" for a message
    that has no place before login), a disconnect, or the connection
    closed.
    """

    def verifyHostKey(self, blob, fingerprint):
        return defer.succeed(True)

    def connectionSecure(self):
        self.sendPacket(ssh_transport.MSG_SERVICE_REQUEST, common.NS(b"ssh-userauth"))

    def ssh_SERVICE_ACCEPT(self, packet):
        for number, payload in self.factory.messages:
            self.sendPacket(number, payload)

    def dispatchMessage(self, messageNum, payload):
        if messageNum >= 50 or messageNum == ssh_transport.MSG_UNIMPLEMENTED:
            self.factory.answers.append(messageNum)
            # One answer is enough: the gateway read the message and replied.
            self.transport.loseConnection()
            return
        ssh_transport.SSHClientTransport.dispatchMessage(self, messageNum, payload)

    def receiveError(self, reasonCode, description):
        self.factory.answers.append(("disconnect", reasonCode))

    def connectionLost(self, reason):
        ssh_transport.SSHClientTransport.connectionLost(self, reason)
        self.factory.closed.callback(None)


class HostileAuthenticationTests(unittest.TestCase):
    """
    Authentication messages cut or inflated every way a hostile client
    could: each is answered (a failure, a disconnect) or the connection
    closed, and nothing fails in the gateway (trial fails a test on any
    logged traceback).
    """

    @defer.inlineCallbacks
    def fuzz(self, gateway, messages):
        factory = protocol.ClientFactory.forProtocol(_Fuzzer)
        factory.messages = messages
        factory.answers = []
        factory.closed = defer.Deferred()
        yield endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.ssh_port), factory.buildProtocol(None)
        )
        yield factory.closed
        return factory.answers

    @defer.inlineCallbacks
    def test_cut_and_inflated_messages(self):
        """
        A public key, a password and a keyboard-interactive request cut at
        every length, counts and lengths far past the packet, and answers
        nobody asked for.
        """
        from twisted.conch.ssh import keys as ssh_keys

        gateway = SSHGateway(self, login_timeout="20s", max_unauthenticated_per_source=100)
        blob = ssh_keys.Key.fromFile(key("deploy-bot")[0]).public().blob()
        head = common.NS(gateway.login.encode()) + common.NS(b"ssh-connection")
        requests = [
            head + common.NS(b"publickey") + b"\x01" + common.NS(b"ssh-ed25519") + common.NS(blob) + common.NS(b"x" * 64),
            head + common.NS(b"publickey") + b"\x00" + common.NS(b"ssh-ed25519") + common.NS(blob),
            head + common.NS(b"password") + b"\x00" + common.NS(b"not-a-token"),
            head + common.NS(b"keyboard-interactive") + common.NS(b"") + common.NS(b""),
        ]
        cases = []
        for request in requests:
            for length in range(0, len(request), max(1, len(request) // 12)):
                cases.append([(50, request[:length])])
        cases += [
            [(50, head + common.NS(b"publickey") + b"\x01" + b"\xff\xff\xff\xff")],
            [(50, b"\xff\xff\xff\xff" + b"x" * 32)],
            [(50, head + common.NS(b"keyboard-interactive") + common.NS(b"") + common.NS(b"")),
             (61, b"\xff\xff\xff\xff" + common.NS(b"a"))],
            [(61, struct.pack(">L", 1) + common.NS(b"answer nobody asked for"))],
            [(50, head + common.NS(b"no-such-method"))],
            [(80, b"\x00\x00")],
            [(90, b"\x00")],
        ]
        for messages in cases:
            answers = yield self.fuzz(gateway, messages)
            # Answered, or closed by the gateway; never left hanging (fuzz returns).
            for answer in answers:
                self.assertTrue(isinstance(answer, tuple) or answer in (3, 51, 52, 53, 60), (messages, answers))
        self.assertEqual(self.gateway_refused(gateway), [])
        # Conch answers a refused password a second later (passwordDelay):
        # let the last such answer's timer run out before the gateway stops.
        yield task.deferLater(reactor, 1.5, lambda: None)

    def gateway_refused(self, gateway):
        """
        Refusals whose reason says the gateway failed rather than the input.
        """
        return [event for event in gateway.events("session.refused")
                if "internal" in event["refusal"].get("reason", "") or event["refusal"].get("rule") == "gateway:error"]
