"""
Test doubles for addon authors: build an addon with its options checked,
run it in a chain exactly as a front end would, without a network, and
look at what the record addon would have stored.

    from hoopgw.testing import ChainHarness, sql_command

    harness = ChainHarness([(my_factory, {"limit": 3})])
    decision = harness.submit(sql_command("DROP TABLE cards"))
    assert decision.denied

C{exec_command("sudo id")} and C{kubernetes_command("DELETE",
"/api/v1/namespaces/prod")} make SSH and Kubernetes commands with the facts
their front ends give.  C{load("addons/my_addon.py")} loads an addon file
as the configuration does.  The harness fails loudly when a hook leaves a
Deferred that has not fired (pass C{pending=True} where waiting is the
point, as for an approval), and keeps what the addons logged in
C{harness.logs}.
"""

import attr
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from hoopgw import options as o
from hoopgw.addon import AddonContext
from hoopgw.chain import AddonChain
from hoopgw.interfaces import IStore
from hoopgw.model import OK, SERVICE, TEXT, Identity, ResultChunk, Session
from hoopgw.store import events as chaining


@implementer(IStore)
class MemoryStore:
    """
    An evidence store in memory, chained like the real ones.

    @ivar events: the events appended, in order.
    @ivar attachments: the blobs written, by name.
    """

    def __init__(self):
        self.events = []
        self.attachments = {}
        self.head = chaining.GENESIS
        self.fail_with = None

    def append(self, event, urgent=True):
        if self.fail_with is not None:
            return defer.fail(self.fail_with)
        chaining.seal(event, len(self.events) + 1, self.head)
        self.head = event["hash"]
        self.events.append(event)
        return defer.succeed(event)

    def write_attachment(self, name, data):
        import hashlib

        self.attachments[name] = data
        return defer.succeed(hashlib.sha256(data).hexdigest())

    def close(self):
        return defer.succeed(None)

    def of_type(self, kind):
        return [event for event in self.events if event["type"] == kind]


@attr.s
class FakeConnection:
    """
    Stands in for a L{hoopgw.config.ConnectionConfig}.
    """

    name = attr.ib(default="test")
    protocol = attr.ib(default="postgres")
    allowed_groups = attr.ib(default=frozenset(["payments-bots"]))
    target_name = attr.ib(default="postgresql://app@db.test:5432/payments")
    settings = attr.ib(default=None)


@attr.s
class FakeGateway:
    """
    What an addon reaches through its context: a store, identity
    providers, an approvals broker (None unless a test sets one), a clock.
    """

    store = attr.ib(factory=MemoryStore)
    reactor = attr.ib(factory=Clock)
    identity_providers = attr.ib(factory=dict)
    approvals = attr.ib(default=None)

    def record(self, event):
        return self.store.append(event)


def FakeContext(connection=None, gateway=None):
    """
    The context an addon is built with (L{hoopgw.addon.AddonContext}),
    around a L{FakeConnection} and a L{FakeGateway}.
    """
    return AddonContext(connection=connection or FakeConnection(), gateway=gateway or FakeGateway())


def build(factory, options=None, context=None):
    """
    Build an addon from its factory with C{options} checked as the
    configuration loader checks them (a bad option raises
    L{hoopgw.options.ConfigError}).
    """
    checked = o.parse_options(factory.options, options, factory.name)
    return factory.build(checked, context or FakeContext())


def load(path, name=None):
    """
    The addon factory a Python file defines, loaded as the configuration
    loads C{- path: FILE} (a bad file raises L{hoopgw.options.ConfigError}).

    @param name: which factory, when the file defines several.
    """
    from hoopgw.config import load_addon_file

    found = load_addon_file(path, path)
    if name is not None:
        if name not in found:
            raise o.ConfigError(path, "defines no addon named %r (it has: %s)" % (name, ", ".join(sorted(found))))
        return found[name]
    if len(found) > 1:
        raise o.ConfigError(path, "defines several addons (%s): say which with name=" % (", ".join(sorted(found)),))
    return next(iter(found.values()))


def identity(subject="ci-bot", groups=("payments-bots",), kind=SERVICE, issuer="https://issuer.test", **extra):
    return Identity(subject=subject, issuer=issuer, groups=frozenset(groups), kind=kind, **extra)


def session(subject="ci-bot", groups=("payments-bots",), kind=SERVICE, connection="test", protocol="postgres"):
    """
    A session whose identity is already established; a PostgreSQL one's
    refusals carry their SQLSTATE, as the front end's do.
    """
    wire = None
    if protocol == "postgres":
        from hoopgw.postgres.refusals import wire
    return Session(
        connection=connection,
        protocol=protocol,
        client_address="127.0.0.1:50000",
        target="postgresql://app@db.test:5432/payments",
        identity=identity(subject, groups, kind),
        wire=wire,
    )


def sql_command(sql, parameters=()):
    """
    A SQL statement as the PostgreSQL front end makes it (classified when
    an addon first asks, with that addon's session).
    """
    from hoopgw.postgres.commands import sql_command as make

    return make(sql, "simple" if not parameters else "extended", parameters=parameters, classify=False)


def exec_command(line, login="deploy", pty=False):
    """
    An SSH exec request as the SSH front end makes it.
    """
    from hoopgw.ssh.commands import exec_command as make

    return make(line, login, pty)


def kubernetes_command(method, path, websocket=False, body=b""):
    """
    A Kubernetes API request as the Kubernetes front end makes it
    (C{path} may carry a query).
    """
    from hoopgw.kubernetes.requestinfo import request_command, request_info

    bare, _, query = path.partition("?")
    info = request_info(method, bare, query, websocket)
    return request_command(info, method, path, query, websocket, "kubectl/v1.32 (test)", body)


def rows(columns, values):
    """
    A result chunk of rows, each value text (encoded as UTF-8) or None.
    """
    encoded = [[None if value is None else str(value).encode("utf-8") for value in row] for row in values]
    return ResultChunk("rows", columns=list(columns), kinds=(TEXT,) * len(columns), rows=encoded)


class ChainHarness:
    """
    A chain of addons with a fake context, driven like a front end drives
    it.  Every method returns what the chain returns, with Deferreds that
    have already fired resolved for you.

    @param addons: a list of C{(factory, options)} or of built addons.
    """

    def __init__(self, addons, context=None, allowed_groups=("payments-bots",)):
        self.context = context or FakeContext()
        self.logs = []
        built = []
        for entry in addons:
            if isinstance(entry, tuple):
                factory, options = entry
                built.append((factory.name, build(factory, options, self.context)))
            else:
                built.append((entry.name, entry))
        self.chain = AddonChain(built, allowed_groups=allowed_groups)
        self.session = session()

    @property
    def store(self):
        return self.context.store

    def start(self, session=None, pending=False):
        return self._call("start_session", pending, session or self.session)

    def submit(self, command, session=None, pending=False):
        """
        The chain's decision on C{command}.  With C{pending=True} a
        decision still to come (an approval) is returned as its Deferred.
        """
        return self._call("submit", pending, session or self.session, command)

    def result(self, command, chunk, session=None):
        self._call("result", False, session or self.session, command, chunk)
        return chunk

    def finish(self, command, session=None, **outcome):
        command.outcome.update(outcome or {"status": OK})
        return self._call("finish", False, session or self.session, command)

    def cancel(self, command=None, session=None, via=None):
        """
        The client asked to cancel what the session runs (C{command}, when
        one runs): every addon's C{cancel_requested} is told.
        """
        return self._call("cancel", False, session or self.session, command, via)

    def end(self, session=None):
        return self._call("end_session", False, session or self.session)

    def _call(self, hook, pending, *arguments):
        with capturedLogs() as logged:
            value = getattr(self.chain, hook)(*arguments)
        self.logs.extend(logged)
        return _resolved(value, pending, hook)

    def logged(self, text):
        """
        Whether an addon logged a message containing C{text}.
        """
        return any(text in formatEvent(event) for event in self.logs)


def _resolved(value, pending=False, hook="the hook"):
    if not isinstance(value, defer.Deferred):
        return value
    if not value.called:
        if pending:
            return value
        raise AssertionError(
            "%s returned a Deferred that has not fired: an addon is waiting on something the test did not "
            "provide (advance harness.context.reactor, or pass pending=True where waiting is the point)" % (hook,)
        )
    results = []
    value.addBoth(results.append)
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]
