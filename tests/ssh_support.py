"""
What the SSH tests share: one throwaway sshd for the whole run (the
target), keys made with the real ssh-keygen (the gateway's own key, the
clients', a certificate authority), a gateway with an SSH connection, and
helpers running the real ssh, scp and sftp against it.
"""

import atexit
import os
import subprocess

from twisted.internet import defer, protocol, reactor

from testbed.throwaway import SshServer, free_port, ssh_keygen
from tests import support
from tests.support import GatewayHarness

ADDONS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssh_addons.py")
ASKPASS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "hoopgw-askpass")
SSH = "/usr/bin/ssh"
SCP = "/usr/bin/scp"
SFTP = "/usr/bin/sftp"

_shared = {}


def directory():
    path = os.path.join(support.workspace(), "ssh")
    os.makedirs(path, exist_ok=True)
    return path


def key(name, key_type="ed25519"):
    """
    C{(private key path, public key line)} of a key made once per run.
    """
    cache = _shared.setdefault("keys", {})
    if name not in cache:
        path = os.path.join(directory(), name)
        cache[name] = (path, ssh_keygen(path, key_type, comment=name))
    return cache[name]


def certificate(key_name, principals, identity="cert-1", validity="+10m", ca="ca", options=(), serial=7):
    """
    A certificate for C{key_name}'s key, signed by the real ssh-keygen -s.

    @return: the certificate file's path.
    """
    ca_path, _ = key(ca)
    key_path, _ = key(key_name)
    output = os.path.join(directory(), "%s-%s-cert.pub" % (key_name, identity))
    source = os.path.join(directory(), "%s-%s.pub" % (key_name, identity))
    with open(key_path + ".pub") as handle, open(source, "w") as copy:
        copy.write(handle.read())
    arguments = ["ssh-keygen", "-q", "-s", ca_path, "-I", identity, "-z", str(serial), "-V", validity]
    if principals:
        arguments += ["-n", ",".join(principals)]
    for option in options:
        arguments += ["-O", option]
    subprocess.run(arguments + [source], check=True, capture_output=True)
    return output


def sshd():
    """
    The run's target sshd, which lets the gateway's key in.
    """
    if "sshd" not in _shared:
        server = SshServer()
        server.start()
        atexit.register(server.stop)
        server.authorize(key("gateway")[1])
        _shared["sshd"] = server
    return _shared["sshd"]


def ssh_connection(port, addons=None, policy=None, target=None, **settings):
    """
    The configuration of an SSH connection to the run's sshd.
    """
    server = sshd()
    host_key_path, _ = key("gateway-host")
    if addons is None:
        addons = [
            "identity",
            {"path": ADDONS_FILE, "name": "test-policy", "options": policy or {}},
            {"path": ADDONS_FILE, "name": "test-stream-mask"},
            "record",
        ]
    connection = {
        "protocol": "ssh",
        "listen": "tcp:%d:interface=127.0.0.1" % (port,),
        "host_keys": [{"file": host_key_path}],
        "target": {
            "host": "127.0.0.1",
            "port": server.port,
            "key": {"file": key("gateway")[0]},
            "host_key": server.host_key,
            "connect_timeout": "5s",
        },
        "allowed_logins": [server.login],
        "identities": [
            {"subject": "deploy-bot", "groups": ["deployers"], "keys": [key("deploy-bot")[1]]},
            {"subject": "alice", "kind": "human", "groups": ["ops"], "keys": [key("alice")[1]]},
            {"subject": "outsider", "groups": ["marketing"], "keys": [key("outsider")[1]]},
        ],
        "certificate_authorities": [
            {
                "name": "test-ca",
                "public_key": key("ca")[1],
                "principals": {
                    "deploy-bot": {"groups": ["deployers"]},
                    "alice": {"kind": "human", "groups": ["ops"]},
                },
            }
        ],
        "allowed_groups": ["deployers", "ops", "payments-bots"],
        "addons": addons,
    }
    if target:
        connection["target"].update(target)
    connection.update(settings)
    return connection


class SSHGateway(GatewayHarness):
    """
    A real gateway in the test's reactor with one SSH connection named
    C{deploy}.
    """

    def __init__(self, test, admin=None, **settings):
        self.ssh_port = free_port()
        connections = {"deploy": ssh_connection(self.ssh_port, **settings)}
        if admin is None:
            GatewayHarness.__init__(self, test, connections=connections)
        else:
            # The admin listener (approvals API) on, and the people issuer
            # for approvers.
            self.directory = os.path.abspath(test.mktemp())
            os.makedirs(self.directory)
            self.port = free_port()
            self.admin_url = "http://127.0.0.1:%d" % (free_port(),)
            listen = {"listen": "tcp:%s:interface=127.0.0.1" % (self.admin_url.rpartition(":")[2],)}
            document = support.configuration_document(
                self.directory, connections, providers=support.providers_with_people(), gateway={"admin": dict(listen, **admin)}
            )
            self.start(test, document)
        self.known_hosts = os.path.join(self.directory, "known_hosts")
        factory = self.gateway.factories["deploy"]
        with open(self.known_hosts, "w") as handle:
            for line in factory.host_key_lines():
                handle.write("[127.0.0.1]:%d %s\n" % (self.ssh_port, line))
        self.login = sshd().login

    def addon(self, name):
        return dict(self.gateway.chains["deploy"].addons)[name]

    def options(self, key_name="deploy-bot", certificate_path=None, batch=True, agent=None):
        options = [
            "-F", "/dev/null",
            "-p", str(self.ssh_port),
            "-o", "UserKnownHostsFile=" + self.known_hosts,
            "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentityAgent=" + (agent or "none"),
            "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=10",
        ]
        if batch:
            options += ["-o", "BatchMode=yes"]
        if key_name is not None:
            options += ["-i", key(key_name)[0]]
            if certificate_path is not None:
                options += ["-o", "CertificateFile=" + certificate_path]
        else:
            options += ["-o", "PubkeyAuthentication=no"]
        return options

    def ssh(self, command=None, key_name="deploy-bot", certificate_path=None, extra=(), stdin=b"", login=None, env=None,
            batch=True, agent=None):
        """
        Run the real ssh through the gateway.

        @return: a Deferred firing with C{(stdout bytes, stderr text, exit code)}.
        """
        arguments = [SSH] + self.options(key_name, certificate_path, batch, agent) + list(extra)
        arguments.append("%s@127.0.0.1" % (login or self.login,))
        if command is not None:
            arguments.append(command)
        return run(arguments, stdin=stdin, env=env)

    def token_ssh(self, command, token, method="password", login=None, extra=()):
        """
        ssh with an identity token as the password or the keyboard-interactive
        answer, given by etc/hoopgw-askpass through SSH_ASKPASS, as in CI.
        """
        token_file = os.path.join(self.directory, "token")
        with open(token_file, "w") as handle:
            handle.write(token)
        env = {"SSH_ASKPASS": ASKPASS, "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0", "HOOPGW_TOKEN_FILE": token_file}
        extra = [
            "-o", "PreferredAuthentications=" + method,
            "-o", "NumberOfPasswordPrompts=1",
        ] + list(extra)
        return self.ssh(command, key_name=None, extra=extra, login=login, env=env, batch=False)

    def commands(self, kind=None):
        """
        The recorded ends of commands (command.end events), optionally of one kind.
        """
        ends = self.events("command.end")
        starts = {event["command"]: event for event in self.events("command")}
        result = []
        for end in ends:
            merged = dict(starts.get(end["command"], {}))
            merged.update(end)
            if kind is None or merged.get("kind") == kind:
                result.append(merged)
        return result


def run(arguments, stdin=b"", env=None):
    """
    Run a program; a Deferred firing with C{(stdout, stderr text, exit code)}.
    """
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": directory(), "LANG": "C.UTF-8"}
    environment.update(env or {})
    done = defer.Deferred()
    process = _Collect(stdin, done)
    reactor.spawnProcess(process, arguments[0], arguments, env=environment)
    return done


class _Collect(protocol.ProcessProtocol):
    def __init__(self, stdin, done):
        self.stdin = stdin
        self.done = done
        self.out = []
        self.err = []

    def connectionMade(self):
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def processEnded(self, reason):
        code = reason.value.exitCode
        if code is None:
            code = -(reason.value.signal or 0)
        self.done.callback((b"".join(self.out), b"".join(self.err).decode("utf-8", "replace"), code))


def spawn(arguments, env=None, use_pty=False):
    """
    Start a program and keep hold of it: C{(process transport, collector)}
    whose C{done} fires when it ends.
    """
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": directory(), "LANG": "C.UTF-8"}
    environment.update(env or {})
    collector = _Collect(b"", defer.Deferred())
    if use_pty:
        collector.connectionMade = lambda: None
    transport = reactor.spawnProcess(collector, arguments[0], arguments, env=environment, usePTY=use_pty)
    return transport, collector
