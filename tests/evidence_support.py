"""
What the evidence tests share: a gateway (the real one, with the real
PostgreSQL behind it, from L{tests.support}) whose record is signed, a
terminal session with two recordings made and committed the way the SSH
and Kubernetes front ends make and commit theirs, and ways to reach into a
finished store to tamper with it.
"""

import json
import os
import shutil

from twisted.internet import defer

from hoopgw import cast as casts
from hoopgw.model import Command, Credentials, Session
from hoopgw.store import signing
from hoopgw.store.file import read_events, segment_paths
from testbed.throwaway import free_port
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
# A second shell in the same session (as ssh's connection sharing opens
# one): what was typed is recorded too, and a card number it printed is
# kept masked.
SECOND_OUTPUT = [
    (0.0, "o", "$ "),
    (0.3, "i", "tail -1 app.log\r"),
    (0.5, "o", "tail -1 app.log\r\npaid with 4111 1111 1111 1111\r\n"),
    (0.9, "o", "$ "),
]
SECOND_MASKED = "paid with 4111 11** **** 1111"


def recorder(frames, started, title="ops-bot on bastion"):
    """
    The recording a terminal front end makes of C{frames} (C{(seconds,
    "o" or "i", text)}), with its clock following their times.
    """
    now = [started]
    recording = casts.Recorder(80, 24, term="xterm", title=title, started=started, clock=lambda: now[0])
    for when, code, text in frames:
        now[0] = started + when
        (recording.output if code == "o" else recording.input)(text.encode("utf-8"))
    now[0] = started + frames[-1][0]
    return recording


@defer.inlineCallbacks
def terminal_session(harness, subject="ops-bot", groups=("payments-bots",), recordings=(CAST_OUTPUT, SECOND_OUTPUT)):
    """
    Run one terminal session through the gateway's real chain (its
    identity and record addons, its store) as the SSH front end does: a
    token as the credential, one shell command per recording, each
    recording stored and committed with L{hoopgw.cast.commit} before its
    command ends.

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
    for frames in recordings:
        command = Command(kind="shell", text="shell", redacted="shell", facts={"pty": True, "term": "xterm"})
        yield defer.maybeDeferred(chain.submit, session, command)
        command.outcome = {"status": "exited", "exit_status": 0}
        yield casts.commit(harness.store, session, command, recorder(frames, session.started))
        yield defer.maybeDeferred(chain.finish, session, command)
    session.attributes["end_reason"] = "the client closed the connection"
    yield chain.end_session(session)
    return session


def recordings(store_path):
    """
    The C{(command.end event, committed recording)} of a store, in order.
    """
    return [(event, casts.committed(event)) for event in events(store_path) if casts.committed(event)]


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


def forget_refusals(gateway):
    """
    Drop the gateway's open refusal windows unwritten, as a crash does.
    """
    for window in gateway.refusals._windows.values():
        if window.timer is not None and window.timer.active():
            window.timer.cancel()
    gateway.refusals._windows.clear()
