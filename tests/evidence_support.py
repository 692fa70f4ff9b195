"""
What the evidence tests share: a gateway (the real one, with the real
PostgreSQL behind it, from L{tests.support}) whose record is signed, a
terminal session recorded the way the SSH and Kubernetes front ends record
theirs, and ways to reach into a finished store to tamper with it.
"""

import json
import os
import shutil

import yaml
from twisted.internet import defer, reactor

from hoopgw import config as configuration
from hoopgw.gateway import Gateway
from hoopgw.model import Command, Credentials, Session
from hoopgw.replay import asciicast
from hoopgw.store import open_store, signing
from hoopgw.store.file import read_events, segment_paths
from hoopgw.throwaway import free_port
from tests import support

_keys = {}


def signing_key(name="gateway"):
    """
    C{(private key path, public key path)} of a throwaway Ed25519 key.
    """
    if name not in _keys:
        _keys[name] = signing.generate_key(os.path.join(support.workspace(), "signing-" + name), stem=name)
    return _keys[name]


class SignedGateway(support.GatewayHarness):
    """
    A real gateway in the test's reactor whose record is signed.

    @param directory: reuse this folder (and its store): a restart.
    @param store: settings for C{gateway.store} besides its path.
    """

    def __init__(self, test, directory=None, store=None, key="gateway", port=None, connections=None):
        self.directory = directory or os.path.abspath(test.mktemp())
        os.makedirs(self.directory, exist_ok=True)
        self.port = port or free_port()
        if connections is None:
            connections = {"payments": support.postgres_connection(self.port)}
        document = support.configuration_document(self.directory, connections)
        document["gateway"]["store"].update(store or {})
        if key is not None:
            document["gateway"]["signing_key"] = {"file": signing_key(key)[0]}
        self.start(test, document)

    @property
    def public_key(self):
        return signing_key()[1]


CAST_OUTPUT = [
    (0.0, "o", "$ "),
    (0.4, "o", "psql -c 'select count(*) from payments'\r\n"),
    (1.1, "o", " count \r\n-------\r\n     3\r\n"),
    (1.6, "o", "$ exit\r\n"),
]


@defer.inlineCallbacks
def terminal_session(harness, subject="ops-bot", groups=("payments-bots",), output=CAST_OUTPUT, name=None):
    """
    Run one terminal session through the gateway's real chain (its
    identity and record addons, its store) as the SSH front end will: a
    token as the credential, a shell command, the asciicast written with
    the store's C{write_attachment}, its digest committed at the end.

    @return: a Deferred firing with the L{Session}.
    """
    chain = harness.gateway.chains["payments"]
    session = Session(
        connection="payments",
        protocol="ssh",
        client_address="127.0.0.1:40022",
        target="ssh://ops@bastion.test:22",
        credentials=Credentials(user=subject, password=support.token(subject=subject, groups=groups)),
    )
    decision = yield chain.start_session(session)
    assert not decision.denied, decision
    command = Command(kind="shell", text="shell", redacted="shell", facts={"pty": True, "term": "xterm"})
    yield defer.maybeDeferred(chain.submit, session, command)
    data = asciicast.write(80, 24, output, timestamp=session.started, title="ops-bot on bastion")
    name = name or "%s.cast" % (session.id,)
    digest = yield harness.store.write_attachment(name, data)
    command.outcome = {"status": "ok", "exit_status": 0}
    yield defer.maybeDeferred(chain.finish, session, command)
    session.attributes["cast"] = {"name": name, "sha256": digest}
    session.attributes["end_reason"] = "the client closed the channel"
    yield chain.end_session(session)
    return session


def lines(store_path):
    """
    C{(segment path, lines)} of a store with one segment.
    """
    (segment,) = segment_paths(store_path)
    with open(segment, "rb") as handle:
        return segment, handle.read().splitlines(True)


def rewrite(segment, new_lines):
    with open(segment, "wb") as handle:
        handle.writelines(new_lines)


def events(store_path):
    return [event for _, _, _, event in read_events(store_path)]


def index_of(store_path, predicate):
    """
    The line numbers (0-based) of the events matching C{predicate}.
    """
    return [number for number, event in enumerate(events(store_path)) if predicate(event)]


def copy_store(source, test):
    target = os.path.abspath(test.mktemp())
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("store.lock"))
    return target


def as_line(event):
    return json.dumps(event).encode() + b"\n"
