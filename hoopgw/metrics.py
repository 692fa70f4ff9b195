"""
The gateway's Prometheus metrics, and what watches its sessions for them:
every metric object lives here, so the rest of hoopgw only calls
C{metrics.X.labels(...).inc()}.  They are registered in a registry of
hoopgw's own (L{REGISTRY}), never prometheus_client's global one, so that
several gateways in one process (tests) do not collide; each gateway's
C{/metrics} adds the series only it knows (its store's free space and
state) at scrape time.

The metrics are counted on every statement's path, so they are hoopgw's
own small classes rather than prometheus_client's (whose lock and checks
cost microseconds per call, several times a statement): plain numbers the
reactor's thread updates and reads, turned into prometheus_client's metric
families only when scraped.
"""

import bisect
import os
import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    StateSetMetricFamily,
)
from twisted.internet import defer
from twisted.protocols import policies
from twisted.python.failure import Failure

REGISTRY = CollectorRegistry(auto_describe=True)


class _Value:
    __slots__ = ("value",)

    def __init__(self):
        self.value = 0

    def inc(self, amount=1):
        self.value += amount

    def dec(self, amount=1):
        self.value -= amount

    def set(self, value):
        self.value = value


class _Buckets:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        # One more than the bounds: what exceeds the last (+Inf).
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value):
        # The first bound at or above the value: Prometheus's "le".
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Metric:
    """
    One metric with labels; L{labels} gives the child to update.
    """

    def __init__(self, name, documentation, labelnames, registry=None, buckets=None):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.buckets = tuple(buckets) if buckets is not None else None
        self.children = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values):
        values = tuple(str(value) for value in values)
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self._child()
        return child

    def _child(self):
        return _Value()

    def describe(self):
        return [self._family()]

    def collect(self):
        family = self._family()
        for values, child in sorted(self.children.items()):
            self._add(family, list(values), child)
        return [family]


class Counter(_Metric):
    def _family(self):
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, values, child):
        family.add_metric(values, child.value)


class Gauge(_Metric):
    def _family(self):
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, values, child):
        family.add_metric(values, child.value)


class Histogram(_Metric):
    def _child(self):
        return _Buckets(self.buckets)

    def _family(self):
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def _add(self, family, values, child):
        total = 0
        buckets = []
        for bound, count in zip(self.buckets + (float("inf"),), child.counts):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        family.add_metric(values, buckets, child.sum)

# From a cached decision (tens of microseconds) to a human approval (minutes).
_LATENCY = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_APPROVAL = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_DISK = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

SESSION = ("connection", "protocol")
# The hooks whose time is the chain's latency: those that decide or hold a
# result back (the others only take note).
TIMED = ("session_started", "command_received", "result_received")

sessions_active = Gauge(
    "hoopgw_sessions_active", "Sessions admitted by the chain and not yet ended.", SESSION, registry=REGISTRY
)
sessions_started = Counter(
    "hoopgw_sessions_started", "Sessions the chain admitted.", SESSION, registry=REGISTRY
)
sessions_refused = Counter(
    "hoopgw_sessions_refused",
    "Sessions refused, by the rule that refused them (identity:..., allowed_groups, no-identity, paused, ...).",
    SESSION + ("reason",),
    registry=REGISTRY,
)
commands = Counter(
    "hoopgw_commands",
    "Commands (SQL statements, SSH requests, Kubernetes API requests) finished, by the chain's verdict "
    "(allow, deny, approved) and the addon that decided (none when no addon had an opinion).",
    SESSION + ("decision", "addon"),
    registry=REGISTRY,
)
addon_seconds = Histogram(
    "hoopgw_addon_seconds",
    "How long each addon's hook took, waiting included (an approval, a key fetch).",
    ("connection", "addon", "hook"),
    buckets=_LATENCY,
    registry=REGISTRY,
)
masked_values = Counter(
    "hoopgw_masked_values",
    "Values an addon masked (card numbers shown as BIN and last four) or withheld (CVV, track data) in results.",
    ("connection", "addon", "action"),
    registry=REGISTRY,
)
bytes_relayed = Counter(
    "hoopgw_bytes_relayed",
    "Bytes through a connection's listener: from_client (received from clients) and to_client (sent to them).",
    SESSION + ("direction",),
    registry=REGISTRY,
)
approvals_pending = Gauge(
    "hoopgw_approvals_pending", "Commands waiting for a human approval now.", ("connection",), registry=REGISTRY
)
approval_wait_seconds = Histogram(
    "hoopgw_approval_wait_seconds",
    "How long a command waited for approval, by outcome (approved, denied, timeout, cancelled, failed).",
    ("connection", "outcome"),
    buckets=_APPROVAL,
    registry=REGISTRY,
)
store_append_seconds = Histogram(
    "hoopgw_store_append_seconds",
    "From an event's append to the store until it is durable (what a command waits for, write-ahead).",
    ("backend",),
    buckets=_DISK,
    registry=REGISTRY,
)
store_fsync_seconds = Histogram(
    "hoopgw_store_fsync_seconds",
    "One group commit's fdatasync of the file store (in the loop or in the sync process).",
    ("backend",),
    buckets=_DISK,
    registry=REGISTRY,
)
identity_key_fetches = Counter(
    "hoopgw_identity_key_fetches",
    "Fetches of an identity provider's signing keys (discovery and JWKS), by outcome (ok, failed).",
    ("issuer", "outcome"),
    registry=REGISTRY,
)

export_delivered = Counter(
    "hoopgw_export_delivered_events",
    "Events an export sink handed to its receiver (after its filter), since the gateway started.",
    ("sink",),
    registry=REGISTRY,
)
export_failures = Counter(
    "hoopgw_export_failures",
    "Failed export attempts (read, format or delivery) of a sink, each retried after a back-off.",
    ("sink",),
    registry=REGISTRY,
)
export_last_success = Gauge(
    "hoopgw_export_last_success_timestamp_seconds",
    "When an export sink last delivered a batch or found itself caught up (Unix time).",
    ("sink",),
    registry=REGISTRY,
)


def approval_wait(connection, outcome):
    """
    Count a command's wait for approval while C{outcome} (the broker's
    answer: a L{Decision}, or a L{Deferred} firing with one) is pending.
    """
    if not isinstance(outcome, defer.Deferred) or outcome.called:
        return outcome
    pending = approvals_pending.labels(connection)
    pending.inc()
    started = time.monotonic()

    def settled(result):
        pending.dec()
        approval_wait_seconds.labels(connection, _approval_outcome(result)).observe(time.monotonic() - started)
        return result

    return outcome.addBoth(settled)


def _approval_outcome(result):
    if isinstance(result, Failure):
        return "cancelled" if result.check(defer.CancelledError) else "failed"
    verdict = getattr(result, "verdict", None)
    if verdict == "approved":
        return "approved"
    if verdict != "deny":
        return "failed"
    rule = result.rule or ""
    for ending in ("timeout", "cancelled", "error"):
        if rule.endswith(":" + ending):
            return "failed" if ending == "error" else ending
    return "denied"


STORE_STATES = ("ok", "connecting", "low-space", "failed", "unreachable", "closed")


def store_state(store):
    """
    What a store can do now: C{"ok"}, C{"connecting"} (a PostgreSQL store
    has not reached its database yet since the gateway started: events
    wait), C{"low-space"} (new sessions are
    refused until space is freed), C{"failed"} (it refuses every append,
    fail closed), C{"unreachable"} (a PostgreSQL store's database is away:
    events are refused until it is back) or C{"closed"}.
    """
    if getattr(store, "outage", None) is not None:
        return "unreachable"
    if getattr(store, "_fd", True) is None or getattr(store, "_closed", False) is True:
        return "closed"
    state = getattr(store, "state", None)
    if callable(state):
        # The store's own guard knows its space and its failures.
        return state()
    return "failed" if getattr(store, "_broken", None) is not None else "ok"


def free_bytes(store):
    """
    The free space of a file store's folder for an unprivileged writer, or
    None for a store without a folder.
    """
    directory = getattr(store, "directory", None)
    if not isinstance(directory, str):
        return None
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def instrument_store(store):
    """
    Time every append to C{store} until it is durable: the store object
    every addon writes through is wrapped once, where the gateway opens it.
    """
    if getattr(store, "_hoopgw_timed", False):
        return store
    backend = "postgres" if type(store).__name__.startswith("Postgres") else "file"
    observe = store_append_seconds.labels(backend).observe
    append = store.append

    def timed_append(event, *args, **kwargs):
        started = time.monotonic()
        outcome = append(event, *args, **kwargs)
        if outcome.called and not isinstance(getattr(outcome, "result", None), Failure):
            # Written at once (write-ahead, or a non-urgent event): timed
            # now, without a callback on every event.
            observe(time.monotonic() - started)
            return outcome

        def done(result):
            observe(time.monotonic() - started)
            return result

        return outcome.addBoth(done)

    store.append = timed_append
    store._hoopgw_timed = True
    return store


class GatewayCollector:
    """
    The series only one gateway knows, read when scraped.
    """

    def __init__(self, gateway):
        self.gateway = gateway

    def collect(self):
        store = self.gateway.store
        free = free_bytes(store)
        if free is not None:
            family = GaugeMetricFamily("hoopgw_store_free_bytes", "Free space in the store's folder.")
            family.add_metric([], free)
            yield family
        state = store_state(store)
        family = StateSetMetricFamily("hoopgw_store_state", "The evidence store's state (ok, connecting, low-space, failed, unreachable, closed).")
        family.add_metric([], {name: name == state for name in sorted(set(STORE_STATES) | {state})})
        yield family
        export = getattr(self.gateway, "export", None)
        if export is not None and export.runners:
            # Read now, not at the sink's last cycle: a sink waiting out a
            # back-off falls behind between its attempts.
            family = GaugeMetricFamily(
                "hoopgw_export_lag_events", "Events in the store an export sink has not delivered yet.", labels=("sink",)
            )
            for name, runner in sorted(export.runners.items()):
                family.add_metric([name], runner.lag()[0])
            yield family


class GatewayRegistry:
    """
    What one gateway's C{/metrics} serves: hoopgw's metrics and its own.
    """

    def __init__(self, gateway):
        self._own = GatewayCollector(gateway)

    def collect(self):
        yield from REGISTRY.collect()
        yield from self._own.collect()


class LiveSession:
    """
    What the gateway knows of one admitted session while it lasts, for the
    admin API.
    """

    __slots__ = ("session", "commands", "counter")

    def __init__(self, session, counter):
        self.session = session
        self.commands = 0
        self.counter = counter

    def to_json(self):
        session = self.session
        identity = session.identity
        return {
            "id": session.id,
            "connection": session.connection,
            "protocol": session.protocol,
            "client": session.client_address,
            "subject": identity.subject if identity is not None else None,
            "issuer": identity.issuer if identity is not None else None,
            "started": session.started,
            "commands": self.commands,
            "bytes_from_client": self.counter.received if self.counter is not None else None,
            "bytes_to_client": self.counter.sent if self.counter is not None else None,
        }


class ConnectionMonitor:
    """
    Watches one connection's sessions for the metrics and the admin API:
    the chain tells it of each session and command (see
    L{hoopgw.chain.AddonChain}), and its listener of each client's bytes.
    It outlives reloads: every chain of the connection shares it.
    """

    def __init__(self, connection, protocol):
        self.connection = connection
        self.protocol = protocol
        self.live = {}
        # Client connections by address, for a session's bytes and for
        # ending it; filled by the counting listener.
        self.clients = {}
        self._active = sessions_active.labels(connection, protocol)
        self._started = sessions_started.labels(connection, protocol)
        self._from_client = bytes_relayed.labels(connection, protocol, "from_client")
        self._to_client = bytes_relayed.labels(connection, protocol, "to_client")
        self._commands = {}
        # Set by the admin API's pause: a callable returning None (go on) or
        # a Deferred firing with None or a refusing Decision.
        self.gate = None

    # Hooks the chain calls.

    def instrument(self, hooks):
        """
        The chain's C{{hook: [(name, method)]}} with every method timed.
        """
        return {
            hook: [(name, self._timed(hook, name, method)) for name, method in methods] if hook in TIMED else methods
            for hook, methods in hooks.items()
        }

    def _timed(self, hook, name, method):
        observe = addon_seconds.labels(self.connection, name, hook).observe
        masked = masked_values.labels(self.connection, name, "masked")
        withheld = masked_values.labels(self.connection, name, "withheld")
        clock = time.perf_counter
        if hook == "result_received":

            def counted(session, command, chunk):
                before = (chunk.masked, chunk.withheld)
                started = clock()

                def done(result):
                    observe(clock() - started)
                    if chunk.masked != before[0]:
                        masked.inc(chunk.masked - before[0])
                    if chunk.withheld != before[1]:
                        withheld.inc(chunk.withheld - before[1])
                    return result

                answer = method(session, command, chunk)
                if isinstance(answer, defer.Deferred) and not answer.called:
                    return answer.addBoth(done)
                return done(answer)

            return counted

        def timed(*arguments):
            started = clock()
            answer = method(*arguments)
            if isinstance(answer, defer.Deferred) and not answer.called:

                def done(result):
                    observe(clock() - started)
                    return result

                return answer.addBoth(done)
            observe(clock() - started)
            return answer

        return timed

    def admission(self, session):
        """
        Before the chain runs for a new session: None to go on at once, or
        a L{Deferred} (the connection is paused) firing with None or with
        the L{Decision} that refuses it.
        """
        if self.gate is None:
            return None
        return self.gate(session)

    def session_started(self, session):
        self._started.inc()
        self._active.inc()
        self.live[session.id] = LiveSession(session, self.clients.get(session.client_address))

    def session_refused(self, session, decision):
        sessions_refused.labels(self.connection, self.protocol, decision.rule or "unknown").inc()

    def session_ended(self, session):
        if self.live.pop(session.id, None) is not None:
            self._active.dec()

    def command_finished(self, session, command):
        decision = command.decision
        key = (decision.verdict, decision.addon) if decision is not None else (None, None)
        counter = self._commands.get(key)
        if counter is None:
            counter = self._commands[key] = commands.labels(
                self.connection, self.protocol, key[0] or "none", key[1] or "none"
            )
        counter.inc()
        live = self.live.get(session.id)
        if live is not None:
            live.commands += 1

    # Hooks the listener calls.

    def listening(self, factory):
        """
        Wrap a listener's factory so that every client's bytes are counted.
        """
        return CountingFactory(factory, self)


class CountingProtocol(policies.ProtocolWrapper):
    """
    Counts one client connection's bytes each way, protocol-neutrally, in
    front of the front end's own protocol.
    """

    def __init__(self, factory, wrapped):
        policies.ProtocolWrapper.__init__(self, factory, wrapped)
        self.received = 0
        self.sent = 0
        self.address = None
        # Fires when the client's connection is gone.
        self.lost = defer.Deferred()

    def makeConnection(self, transport):
        peer = transport.getPeer()
        self.address = "%s:%s" % (getattr(peer, "host", peer), getattr(peer, "port", ""))
        self.factory.monitor.clients[self.address] = self
        policies.ProtocolWrapper.makeConnection(self, transport)

    def dataReceived(self, data):
        self.received += len(data)
        self.factory.monitor._from_client.inc(len(data))
        self.wrappedProtocol.dataReceived(data)

    def write(self, data):
        self.sent += len(data)
        self.factory.monitor._to_client.inc(len(data))
        self.transport.write(data)

    def writeSequence(self, data):
        size = sum(len(piece) for piece in data)
        self.sent += size
        self.factory.monitor._to_client.inc(size)
        self.transport.writeSequence(data)

    def connectionLost(self, reason):
        if self.factory.monitor.clients.get(self.address) is self:
            del self.factory.monitor.clients[self.address]
        policies.ProtocolWrapper.connectionLost(self, reason)
        self.lost.callback(None)


class CountingFactory(policies.WrappingFactory):
    protocol = CountingProtocol

    def __init__(self, wrapped, monitor):
        policies.WrappingFactory.__init__(self, wrapped)
        self.monitor = monitor

    def buildProtocol(self, address):
        wrapped = self.wrappedFactory.buildProtocol(address)
        if wrapped is None:
            # The front end refused the connection.
            return None
        return self.protocol(self, wrapped)
