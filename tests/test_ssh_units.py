"""
The SSH front end's parts without a network: OpenSSH certificates made by
the real ssh-keygen, the key registry, the connection settings, the facts
of an exec command line, the sftp codec and relay, the stream masker and
the ordered output of a relayed channel.
"""

import base64
import os
import struct
import subprocess
import time

from twisted.conch.ssh import keys as conch_keys
from twisted.conch.ssh.common import NS
from twisted.internet import defer
from twisted.trial import unittest

from hoopgw import config as configuration
from hoopgw.addons import identity as identity_addon
from hoopgw.chain import AddonChain
from hoopgw.model import Credentials, Decision, Identity, Session
from hoopgw.options import ConfigError
from hoopgw.ssh import certificates, commands, relay, sftp
from hoopgw.ssh.identities import KeyRefused, KeyProof, identify
from hoopgw.ssh.publickeys import fingerprint, generated_host_key, parse_public_key
from hoopgw.ssh.settings import parse_connection
from hoopgw.testing import ChainHarness
from tests import ssh_support
from tests.ssh_support import certificate, key


def blob_of(path):
    with open(path) as handle:
        return base64.b64decode(handle.read().split()[1])


def settings(**overrides):
    """
    Parsed settings of a connection with the test keys and CA.
    """
    raw = {
        "target": {
            "host": "127.0.0.1",
            "key": {"env": "HOOPGW_TEST_UNUSED"},
            "host_key": key("unit-target-host")[1],
        },
        "allowed_logins": ["deploy"],
        "identities": [{"subject": "deploy-bot", "groups": ["deployers"], "keys": [key("deploy-bot")[1]]}],
        "certificate_authorities": [
            {
                "name": "test-ca",
                "public_key": key("ca")[1],
                "principals": {"deploy-bot": {"groups": ["deployers"]}, "alice": {"kind": "human"}},
                "max_validity": "1d",
            }
        ],
    }
    raw.update(overrides)
    return parse_connection(raw, "connections.unit", "tcp:2222")


class CertificateTests(unittest.TestCase):
    """
    Certificates signed by ssh-keygen -s are read and their CA signature
    checked with cryptography.
    """

    def check_ca(self, ca_type):
        ca = "ca-%s" % (ca_type,)
        key(ca, ca_type)
        path = certificate("cert-user", ["alice"], identity="id-" + ca_type, ca=ca, serial=99)
        parsed = certificates.parse(blob_of(path))
        self.assertEqual((parsed.key_id, parsed.serial, parsed.principals), ("id-" + ca_type, 99, ("alice",)))
        certificates.verify_signature(parsed, blob_of(key(ca)[0] + ".pub"))
        certificates.check(parsed, time.time(), "127.0.0.1")
        self.assertEqual(parsed.key_fingerprint, fingerprint(blob_of(key("cert-user")[0] + ".pub")))
        conch = conch_keys.Key.fromString(parsed.key).fingerprint(conch_keys.FingerprintFormats.SHA256_BASE64)
        self.assertEqual(parsed.key_fingerprint, "SHA256:" + conch.rstrip("="))
        return parsed, ca

    def test_ed25519_ca(self):
        """
        An Ed25519 CA's signature verifies.
        """
        self.check_ca("ed25519")

    def test_rsa_ca(self):
        """
        An RSA CA's signature (rsa-sha2-512, ssh-keygen's default) verifies.
        """
        self.check_ca("rsa")

    def test_ecdsa_ca(self):
        """
        An ECDSA P-256 CA's signature verifies.
        """
        self.check_ca("ecdsa")

    def test_tampered(self):
        """
        Changing one byte of the signed part breaks the signature.
        """
        parsed, ca = self.check_ca("ed25519")
        tampered = certificates.Certificate(**dict(parsed.__dict__, signed=parsed.signed[:-3] + b"xyz"))
        error = self.assertRaises(
            certificates.CertificateError, certificates.verify_signature, tampered, blob_of(key(ca)[0] + ".pub")
        )
        self.assertEqual(error.reason, "signature")

    def test_other_ca(self):
        """
        A certificate checked against another CA's key is refused.
        """
        parsed, _ = self.check_ca("ed25519")
        error = self.assertRaises(
            certificates.CertificateError, certificates.verify_signature, parsed, blob_of(key("rogue-ca")[0] + ".pub")
        )
        self.assertEqual(error.reason, "unknown-ca")

    def test_sha1_rsa_signature_refused(self):
        """
        An RSA CA signing with SHA-1 (ssh-keygen -t ssh-rsa) is refused with
        a sentence saying how to sign instead.
        """
        key("ca-rsa", "rsa")
        source = os.path.join(ssh_support.directory(), "sha1-user.pub")
        with open(key("cert-user")[0] + ".pub") as handle, open(source, "w") as copy:
            copy.write(handle.read())
        subprocess.run(
            ["ssh-keygen", "-q", "-s", key("ca-rsa")[0], "-t", "ssh-rsa", "-I", "sha1", "-n", "alice", source],
            check=True,
            capture_output=True,
        )
        parsed = certificates.parse(blob_of(source.replace(".pub", "-cert.pub")))
        error = self.assertRaises(
            certificates.CertificateError, certificates.verify_signature, parsed, blob_of(key("ca-rsa")[0] + ".pub")
        )
        self.assertIn("rsa-sha2-512", str(error))

    def test_host_certificate_refused(self):
        """
        A host certificate (ssh-keygen -h) does not log a user in.
        """
        source = os.path.join(ssh_support.directory(), "host-cert-user.pub")
        with open(key("cert-user")[0] + ".pub") as handle, open(source, "w") as copy:
            copy.write(handle.read())
        subprocess.run(
            ["ssh-keygen", "-q", "-s", key("ca")[0], "-h", "-I", "host", "-n", "alice", source],
            check=True,
            capture_output=True,
        )
        parsed = certificates.parse(blob_of(source.replace(".pub", "-cert.pub")))
        error = self.assertRaises(certificates.CertificateError, certificates.check, parsed, time.time())
        self.assertEqual(error.reason, "certificate-type")

    def test_no_principal(self):
        """
        A certificate without principals (valid for any user in OpenSSH) is
        refused.
        """
        parsed = certificates.parse(blob_of(certificate("cert-user", [], identity="anyone")))
        error = self.assertRaises(certificates.CertificateError, certificates.check, parsed, time.time())
        self.assertEqual(error.reason, "no-principal")

    def test_source_address(self):
        """
        The source-address critical option is enforced.
        """
        parsed = certificates.parse(
            blob_of(certificate("cert-user", ["alice"], identity="sourced", options=["source-address=10.0.0.0/8"]))
        )
        certificates.check(parsed, time.time(), "10.1.2.3")
        error = self.assertRaises(certificates.CertificateError, certificates.check, parsed, time.time(), "127.0.0.1")
        self.assertIn("may only be used from 10.0.0.0/8", str(error))

    def test_max_validity(self):
        """
        A certificate valid for longer than allowed is refused.
        """
        parsed = certificates.parse(blob_of(certificate("cert-user", ["alice"], identity="long", validity="+52w")))
        error = self.assertRaises(certificates.CertificateError, certificates.check, parsed, time.time(), None, 86400)
        self.assertEqual(error.reason, "lifetime")

    def test_malformed(self):
        """
        Garbage after the type name is a clear error, not an exception.
        """
        blob = struct.pack(">L", 32) + b"ssh-ed25519-cert-v01@openssh.com" + b"\x00\x00"
        error = self.assertRaises(certificates.CertificateError, certificates.parse, blob)
        self.assertEqual(error.reason, "malformed-certificate")


class IdentifyTests(unittest.TestCase):
    """
    Which identity a key or certificate proves on a connection.
    """

    def test_registered_key(self):
        """
        A registered key proves its identity, with its fingerprint.
        """
        blob = blob_of(key("deploy-bot")[0] + ".pub")
        proof = identify(settings(), "unit", blob, "127.0.0.1", time.time())
        self.assertEqual((proof.identity.subject, proof.identity.method), ("deploy-bot", "ssh-key"))
        self.assertEqual(proof.identity.groups, frozenset(["deployers"]))
        self.assertEqual(proof.describe(), {"key_fingerprint": fingerprint(blob)})

    def test_fingerprint_registration(self):
        """
        A key can be registered by its SHA256 fingerprint alone.
        """
        blob = blob_of(key("alice")[0] + ".pub")
        configured = settings(identities=[{"subject": "alice", "kind": "human", "keys": [fingerprint(blob)]}])
        self.assertEqual(identify(configured, "unit", blob, None, time.time()).identity.kind, "human")

    def test_unknown_key(self):
        """
        An unregistered key proves nobody.
        """
        blob = blob_of(key("stranger")[0] + ".pub")
        error = self.assertRaises(KeyRefused, identify, settings(), "unit", blob, None, time.time())
        self.assertEqual(error.reason, "unknown-key")

    def test_certificate(self):
        """
        A certificate proves the identity its principal names here.
        """
        blob = blob_of(certificate("cert-user", ["alice"], identity="a1"))
        proof = identify(settings(), "unit", blob, None, time.time())
        identity = proof.identity
        self.assertEqual((identity.subject, identity.kind, identity.method), ("alice", "human", "ssh-cert"))
        self.assertEqual(proof.identity.provenance["certificate_id"], "a1")

    def test_ambiguous_principals(self):
        """
        A certificate naming two identities is refused.
        """
        blob = blob_of(certificate("cert-user", ["alice", "deploy-bot"], identity="both"))
        error = self.assertRaises(KeyRefused, identify, settings(), "unit", blob, None, time.time())
        self.assertEqual(error.reason, "ambiguous-principal")


class SettingsTests(unittest.TestCase):
    """
    A bad SSH connection configuration is refused with the key path.
    """

    def assertRefused(self, path_part, message, **overrides):
        error = self.assertRaises(ConfigError, settings, **overrides)
        self.assertIn(path_part, error.path)
        self.assertIn(message, error.message)

    def test_valid(self):
        """
        Defaults: shells for humans only, sftp and forwarding off, LANG and
        LC_* passed on.
        """
        parsed = settings()
        self.assertEqual(parsed.target_name, "ssh://127.0.0.1:22")
        self.assertEqual((parsed.shell, parsed.sftp, parsed.port_forwarding), ("humans", False, False))
        self.assertTrue(parsed.forwards_env("LC_ALL"))
        self.assertFalse(parsed.forwards_env("LD_PRELOAD"))
        self.assertTrue(parsed.shell_allowed(Identity("alice", kind="human")))
        self.assertFalse(parsed.shell_allowed(Identity("bot")))

    def test_allowed_logins_required(self):
        """
        The logins are required.
        """
        self.assertRefused("allowed_logins", "list at least one login", allowed_logins=[])

    def test_bad_host_key(self):
        """
        The target's host key must be a public key line.
        """
        target = {"host": "h", "key": {"env": "X"}, "host_key": "garbage"}
        self.assertRefused("target.host_key", "expected an OpenSSH public key line", target=target)

    def test_inline_key_refused(self):
        """
        The gateway's own key is a secret: never inline.
        """
        target = {"host": "h", "key": "-----BEGIN OPENSSH PRIVATE KEY-----", "host_key": key("unit-target-host")[1]}
        self.assertRefused("target.key", "secrets are not accepted inline", target=target)

    def test_bad_fingerprint(self):
        """
        A key given as a fingerprint must look like one.
        """
        self.assertRefused(
            "identities[0].keys[0]", "not a SHA256 fingerprint", identities=[{"subject": "x", "keys": ["SHA256:short"]}]
        )

    def test_key_for_two_identities(self):
        """
        One key cannot prove two identities.
        """
        line = key("deploy-bot")[1]
        self.assertRefused(
            "identities[1].keys[0]",
            "already registered for 'a'",
            identities=[{"subject": "a", "keys": [line]}, {"subject": "b", "keys": [line]}],
        )

    def test_shell_mode(self):
        """
        The shell setting is one of none, humans, all.
        """
        self.assertRefused("shell", "expected one of none, humans, all", shell="sometimes")

    def test_authority_needs_principals(self):
        """
        A CA without principals maps to nobody.
        """
        self.assertRefused(
            "certificate_authorities[0].principals",
            "list at least one principal",
            certificate_authorities=[{"name": "x", "public_key": key("ca")[1], "principals": {}}],
        )

    def test_whole_file(self):
        """
        The protocol is registered: a configuration with an SSH connection
        loads, and an identity addon without token issuers is accepted when
        the connection registers keys.
        """
        document = {
            "connections": {
                "deploy": {
                    "protocol": "ssh",
                    "listen": "tcp:2222",
                    "target": {"host": "app", "key": {"env": "K"}, "host_key": key("unit-target-host")[1]},
                    "allowed_logins": ["deploy"],
                    "identities": [{"subject": "deploy-bot", "keys": [key("deploy-bot")[1]]}],
                    "allowed_groups": ["deployers"],
                    "addons": ["identity", "record"],
                }
            }
        }
        loaded = configuration.parse(document)
        self.assertEqual(loaded.connections["deploy"].target_name, "ssh://app:22")


class ExecFactsTests(unittest.TestCase):
    """
    An exec command line becomes the facts rules match on, redacted.
    """

    def test_pipeline(self):
        """
        Every simple command of a pipeline is listed with its program (and
        what sudo runs), and the pipeline with what each stage runs.
        """
        command = commands.exec_command("curl -s https://x.test/i.sh | sudo sh && echo done", "deploy", False)
        self.assertEqual(command.facts["programs"], ["curl", "sudo", "sh", "echo"])
        self.assertEqual(command.facts["commands"][1], ["sudo", "sh"])
        self.assertEqual(command.facts["pipelines"], [[["curl"], ["sudo", "sh"]]])
        self.assertEqual(command.facts["program"], "curl")

    def test_assignments_and_paths(self):
        """
        Leading variable assignments are skipped and folders dropped when
        naming the program.
        """
        command = commands.exec_command("LANG=C /usr/bin/sudo -n rm -rf /", "deploy", False)
        self.assertEqual(command.facts["program_name"], "sudo")
        self.assertEqual(command.facts["argv"], ["LANG=C", "/usr/bin/sudo", "-n", "rm", "-rf", "/"])

    def test_redacted(self):
        """
        Card numbers and tokens in the command line are redacted in the
        text and in every fact; the raw line stays in the command's text.
        """
        line = "echo 4111111111111111 password=hunter2 eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"
        command = commands.exec_command(line, "deploy", False)
        self.assertEqual(command.text, line)
        everything = repr((command.redacted, command.facts))
        for secret in ("4111111111111111", "hunter2", "eyJhbGciOiJFUzI1NiJ9"):
            self.assertNotIn(secret, everything)

    def test_unbalanced_quotes(self):
        """
        A line shlex cannot split keeps its text, says why, and has no argv.
        """
        command = commands.exec_command("echo 'unterminated", "deploy", False)
        self.assertIsNone(command.facts["argv"])
        self.assertIn("No closing quotation", command.facts["parse_error"])


class _Target:
    def __init__(self):
        self.sent = []

    def send_data(self, data):
        self.sent.append(data)


class _Avatar:
    def __init__(self):
        self.pending = set()


class _Front:
    """
    The client-facing side an L{sftp.SftpRelay} talks to.
    """

    def __init__(self, chain, session):
        self.chain = chain
        self.session = session
        self.avatar = _Avatar()
        self.target = _Target()
        self.to_client = []
        self.holds = set()
        self.broken = None

    def send_data(self, data):
        self.to_client.append(data)

    def hold(self, reason):
        self.holds.add(reason)

    def release(self, reason):
        self.holds.discard(reason)

    def sftp_broken(self, reason):
        self.broken = reason

    def internal_error(self, failure):
        raise AssertionError(failure)


def encode(*values):
    """
    SSH wire encoding of strings (bytes) and uint32s (ints).
    """
    return b"".join(struct.pack(">L", value) if isinstance(value, int) else NS(value) for value in values)


def packet(kind, *values):
    payload = bytes((kind,)) + encode(*values)
    return struct.pack(">L", len(payload)) + payload


class _DenyUploads:
    name = "deny-uploads"

    def __init__(self):
        self.pending = None

    def command_received(self, session, command):
        if command.facts.get("transfer") == "upload":
            return Decision.deny("no uploads", rule="test")
        if command.facts.get("operation") == "remove":
            self.pending = defer.Deferred()
            return self.pending
        return None


class SftpRelayTests(unittest.TestCase):
    """
    The sftp relay: operations become commands, denials are answered with
    SSH_FX_PERMISSION_DENIED, reads and writes are counted per handle.
    """

    def setUp(self):
        self.policy = _DenyUploads()
        self.finished = []
        recorder = self

        class Finished:
            name = "finished"

            def command_finished(self, session, command):
                recorder.finished.append(command)

        self.session = Session(connection="unit", protocol="ssh", client_address="127.0.0.1:1")
        self.chain = AddonChain([("deny-uploads", self.policy), ("finished", Finished())])
        self.front = _Front(self.chain, self.session)
        self.relay = sftp.SftpRelay(self.front)

    def test_denied_upload(self):
        """
        An open for writing that the chain denies never reaches the target;
        the client gets PERMISSION_DENIED with the reason.
        """
        self.relay.client_data(packet(sftp.OPEN, 7, b"/srv/up.bin", sftp.OPEN_WRITE | sftp.OPEN_CREAT, 0))
        self.assertEqual(self.front.target.sent, [])
        (reply,) = self.front.to_client
        self.assertEqual(struct.unpack(">LBLL", reply[:13])[1:], (sftp.STATUS, 7, sftp.FX_PERMISSION_DENIED))
        self.assertIn(b"hoopgw denied this: no uploads", reply)
        (command,) = self.finished
        self.assertEqual((command.facts["operation"], command.facts["access"]), ("open", "write"))

    def test_download_counted(self):
        """
        A read-only open is forwarded; the bytes the target returns for it
        are counted and recorded when the handle is closed.
        """
        open_packet = packet(sftp.OPEN, 1, b"/srv/data", sftp.OPEN_READ, 0)
        # Split across two deliveries, as SSH packets may split it.
        self.relay.client_data(open_packet[:5])
        self.relay.client_data(open_packet[5:])
        self.assertEqual(self.front.target.sent, [open_packet])
        self.relay.target_data(packet(sftp.HANDLE, 1, b"h1"))
        read = bytes((sftp.READ,)) + encode(2, b"h1") + struct.pack(">QL", 0, 4096)
        self.relay.client_data(struct.pack(">L", len(read)) + read)
        self.relay.target_data(packet(sftp.DATA, 2, b"x" * 3000))
        self.relay.client_data(packet(sftp.CLOSE, 3, b"h1"))
        self.relay.target_data(packet(sftp.STATUS, 3, 0, b"", b""))
        (command,) = self.finished
        self.assertEqual(command.outcome, {"status": "ok", "code": "ok", "bytes_read": 3000, "bytes_written": 0})

    def test_pending_decision_holds_later_requests(self):
        """
        While a decision is pending, later requests wait behind it, in
        order, and the client is held.
        """
        self.relay.client_data(packet(sftp.REMOVE, 1, b"/srv/a") + packet(sftp.STAT, 2, b"/srv/b"))
        self.assertEqual(self.front.target.sent, [])
        self.assertIn("sftp-decision", self.front.holds)
        self.policy.pending.callback(None)
        self.assertEqual(len(self.front.target.sent), 2)
        self.assertEqual(self.front.holds, set())

    def test_oversized_packet(self):
        """
        A packet larger than sftp allows closes the stream.
        """
        self.relay.client_data(struct.pack(">L", 10 * 1024 * 1024) + b"\x03")
        self.assertIn("larger than allowed", self.front.broken)

    def test_close_interrupts(self):
        """
        Handles still open when the channel closes are recorded as
        interrupted, with their byte counts.
        """
        self.relay.client_data(packet(sftp.OPEN, 1, b"/srv/data", sftp.OPEN_READ, 0))
        self.relay.target_data(packet(sftp.HANDLE, 1, b"h1"))
        self.relay.close("the channel closed")
        (command,) = self.finished
        self.assertEqual(command.outcome["status"], "interrupted")




class _Connection:
    """
    Records what a relayed channel sends.
    """

    def __init__(self):
        self.sent = []
        self.channelsToRemoteChannel = {}

    def open(self, channel):
        channel.conn = self
        self.channelsToRemoteChannel[channel] = 0

    def sendData(self, channel, data):
        self.sent.append(("data", data))

    def sendExtendedData(self, channel, code, data):
        self.sent.append(("stderr", data))

    def sendEOF(self, channel):
        self.sent.append(("eof", None))

    def sendRequest(self, channel, name, payload, wantReply=0):
        self.sent.append(("request", name))

    def sendClose(self, channel):
        channel.localClosed = True
        self.sent.append(("close", None))

    def replenish(self, channel):
        self.sent.append(("window", None))


class RelayChannelTests(unittest.TestCase):
    """
    A relayed channel's output keeps its order behind the peer's window.
    """

    def test_order_behind_window(self):
        """
        Data beyond the window waits; EOF, the exit status and the close wait
        behind it; a full window holds the feeding side until it drains.
        """
        events = []

        class Channel(relay.RelayChannel):
            def blocked(self):
                events.append("blocked")

            def drained(self):
                events.append("drained")

        channel = Channel(remoteWindow=10, remoteMaxPacket=4)
        _Connection().open(channel)
        channel.send_data(b"0123456789abcdef")
        channel.send_stderr(b"err")
        channel.send_eof()
        channel.send_request(b"exit-status", b"\x00\x00\x00\x00")
        channel.send_close()
        self.assertEqual([item for item in channel.conn.sent], [("data", b"0123"), ("data", b"4567"), ("data", b"89")])
        self.assertEqual(events, ["blocked"])
        channel.addWindowBytes(100)
        self.assertEqual(
            channel.conn.sent[3:],
            [
                ("data", b"abcd"),
                ("data", b"ef"),
                ("stderr", b"err"),
                ("eof", None),
                ("request", b"exit-status"),
                ("close", None),
            ],
        )
        self.assertEqual(events, ["blocked", "drained"])

    def test_hold(self):
        """
        A held channel gives no window back until every reason is released.
        """
        channel = relay.RelayChannel()
        _Connection().open(channel)
        channel.hold("a")
        channel.hold("b")
        channel.release("a")
        self.assertEqual(channel.conn.sent, [])
        channel.release("b")
        self.assertEqual(channel.conn.sent, [("window", None)])


class IdentityAddonTests(unittest.TestCase):
    """
    The identity addon accepts a key the SSH front end proved.
    """

    def proof(self):
        identity = Identity("deploy-bot", groups=["payments-bots"], method="ssh-key")
        return KeyProof(identity=identity, key=b"k")

    def session(self, proof):
        return Session(
            connection="test", protocol="ssh", client_address="127.0.0.1:1", credentials=Credentials(ssh_key=proof)
        )

    def test_accepted(self):
        """
        A proven key's identity becomes the session's, and the proof is not
        kept on the credentials.
        """
        harness = ChainHarness([(identity_addon.factory, {})])
        session = self.session(self.proof())
        decision = harness.start(session)
        self.assertFalse(decision.denied)
        self.assertEqual(session.identity.subject, "deploy-bot")
        self.assertIsNone(session.credentials.ssh_key)

    def test_tokens_only(self):
        """
        With ssh_keys off, a key is refused.
        """
        harness = ChainHarness([(identity_addon.factory, {"ssh_keys": False})])
        decision = harness.start(self.session(self.proof()))
        self.assertTrue(decision.denied)
        self.assertIn("identity tokens only", decision.reason)

    def test_unverified_claim(self):
        """
        Something in ssh_key that carries no SSH identity is refused.
        """
        harness = ChainHarness([(identity_addon.factory, {})])
        decision = harness.start(self.session(KeyProof(identity=Identity("x", method="oidc"), key=b"k")))
        self.assertTrue(decision.denied)


class HostKeyTests(unittest.TestCase):
    """
    The generated host key.
    """

    def test_generated_once(self):
        """
        The first call generates an Ed25519 key (mode 0600) with its public
        half; the next returns the same key.
        """
        folder = os.path.abspath(self.mktemp())
        first = generated_host_key(folder)
        second = generated_host_key(folder)
        self.assertEqual(first.public().blob(), second.public().blob())
        self.assertEqual(first.sshType(), b"ssh-ed25519")
        self.assertEqual(os.stat(os.path.join(folder, "ssh_host_ed25519_key")).st_mode & 0o777, 0o600)
        with open(os.path.join(folder, "ssh_host_ed25519_key.pub")) as handle:
            _, blob, _ = parse_public_key(handle.read())
        self.assertEqual(blob, first.public().blob())



class MalformedRequestTests(unittest.TestCase):
    """
    Channel requests a hostile client can send with a short payload.
    """

    def test_short_window_change(self):
        """
        A window-change shorter than its two sizes is refused (0), not
        raised out of the channel, and nothing of it reaches the pty or
        the target.
        """
        from hoopgw.ssh.requests import SessionRequests

        class Channel:
            avatar = None
            settings = None
            cast = None

            def running(self):
                raise AssertionError("a malformed request must not reach the target")

        requests = SessionRequests(Channel())
        requests.pty = {"cols": 80, "rows": 24}
        for payload in (b"", b"\x00\x00\x00", b"\x00\x00\x00\x50\x00\x00"):
            self.assertEqual(requests.received(b"window-change", payload), 0)
        self.assertEqual(requests.pty, {"cols": 80, "rows": 24})
