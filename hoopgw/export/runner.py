"""
One sink's loop: read a batch of durable events after the sink's cursor,
deliver it, move the cursor (persisted in C{gateway.state_dir}), repeat;
on failure wait (doubling, up to a bound) and try the same batch again.
It holds one batch at a time and never touches the path sessions take, so
a receiver that is down or slow costs sessions nothing: the sink falls
behind and catches up from the store.  Falling further behind than its
bounds is itself recorded (C{export.lagging}, then C{export.recovered}).
"""

import json
import os
import random

from twisted.internet import defer, threads
from twisted.logger import Logger

from hoopgw import metrics
from hoopgw.export import formats
from hoopgw.store import events as chaining

LAGGING = "export.lagging"
RECOVERED = "export.recovered"


def state_path(state_dir, name):
    return os.path.join(state_dir, "export", name + ".json")


def load_state(path):
    """
    A sink's persisted state, or None when it has none (or it is unreadable:
    the sink then starts as configured, which at worst sends duplicates).
    """
    try:
        with open(path, "rb") as handle:
            state = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and isinstance(state.get("cursor"), dict) else None


def save_state(path, state):
    """
    Replace the state file atomically (a crash leaves the old or the new
    one, never half of one).  Not synced: a cursor lost in a power cut only
    means events are sent again.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1, sort_keys=True)
        handle.write("\n")
    os.replace(temporary, path)


def describe_target(config):
    if config.type == "syslog":
        return "%s://%s:%d" % (config.transport, config.host, config.port)
    if config.type == "https":
        return config.url
    return config.path


class SinkRunner:
    """
    Drives one sink from its cursor.

    @ivar state: what is persisted: the cursor (seq and hash of the last
        event delivered), counters, the last error, lag, and since when
        the sink has been lagging.
    """

    log = Logger()

    def __init__(self, config, sink, reader, state_dir, reactor, record, head):
        self.config = config
        self.sink = sink
        self.reader = reader
        self.reactor = reactor
        self._record = record
        self._head = head
        self.path = state_path(state_dir, config.name)
        self.filter = formats.EventFilter(config.events, config.connections)
        self.fields = frozenset(config.fields) if config.fields is not None else None
        self._timer = None
        self._running = False
        self._busy = None
        self._waiting_retry = False
        self._stopped = False
        # Whether the cursor was checked against the store (once a run).
        self._checked = False
        self._first_pending = None
        # For a sink whose deliveries nothing acknowledges (syslog over
        # TCP or TLS): the cursor before the last batch delivered, which a
        # failure sends again.
        self._before_last = None
        self._delivered = metrics.export_delivered.labels(config.name)
        self._failures = metrics.export_failures.labels(config.name)
        self._last_success = metrics.export_last_success.labels(config.name)
        state = load_state(self.path)
        if state is None:
            start = head() if config.start == "end" else 0
            state = {"cursor": {"seq": start, "hash": None, "ts": None}, "delivered": 0, "failures": 0,
                     "last_error": None, "last_error_at": None, "last_delivery": None, "lagging_since": None}
        state.update(sink=config.name, type=config.type, format=config.format, target=describe_target(config),
                     max_lag_events=config.max_lag_events, max_lag_seconds=config.max_lag)
        self.state = state

    @property
    def cursor(self):
        return self.state["cursor"]["seq"]

    def start(self):
        self._running = True
        self.wake()

    def wake(self):
        """
        Look for new events now, unless a delivery is under way or the sink
        is waiting out a back-off.
        """
        if not self._running or self._busy is not None or self._waiting_retry:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._busy = self._cycle()
        self._busy.addBoth(self._cycled)

    def _cycled(self, more):
        self._busy = None
        if not self._running:
            return
        if more is True:
            self._timer = self.reactor.callLater(0, self.wake)
        elif isinstance(more, float):
            self._waiting_retry = True
            self._timer = self.reactor.callLater(more, self._retry)
        else:
            self._timer = self.reactor.callLater(self.config.poll_interval, self.wake)

    def _retry(self):
        self._waiting_retry = False
        self.wake()

    @defer.inlineCallbacks
    def _cycle(self):
        """
        One step.  @return: (a Deferred of) True when there may be more to
        send now, a float (seconds to wait) after a failure, None when idle.
        """
        now = self.reactor.seconds()
        self.state["last_attempt"] = chaining.timestamp(now)
        try:
            if not self._checked:
                yield self._check_cursor()
            batch = yield self.reader.read(self.cursor, self.config.batch_size)
            self._first_pending = chaining.epoch(batch[0][1]["ts"]) if batch and batch[0][1].get("ts") else None
            # Formatting a batch (OCSF mapping, JSON) is off the event loop
            # too, so that catching up a long backlog leaves it to sessions.
            documents = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._documents, batch)
            if self._stopped:
                # Stopped while reading: nothing more goes out.
                return None
            if documents:
                yield self.sink.deliver(documents)
        except Exception as failure:
            self._failures.inc()
            self.state["failures"] = self.state.get("failures", 0) + 1
            self.state["last_error"] = str(failure) or type(failure).__name__
            self.state["last_error_at"] = chaining.timestamp(self.reactor.seconds())
            self.log.warn("Export sink {sink} failed: {error}", sink=self.config.name, error=self.state["last_error"])
            self._resend_last()
            self._save()
            yield self._check_lag()
            return self._backoff()
        self._last_success.set(self.reactor.seconds())
        if not batch:
            # Caught up (a failed read before does not count any more).
            self._first_pending = None
            if self.state.get("failures"):
                self.state["failures"] = 0
                self._save()
            yield self._check_lag()
            return None
        last = batch[-1][1]
        if self.sink.unacknowledged and documents:
            self._before_last = dict(self.state["cursor"])
        self.state["cursor"] = {"seq": last["seq"], "hash": last.get("hash"), "ts": last.get("ts")}
        self.state["delivered"] = self.state.get("delivered", 0) + len(documents)
        self._delivered.inc(len(documents))
        self.state["failures"] = 0
        self.state["last_delivery"] = chaining.timestamp(self.reactor.seconds())
        self._first_pending = None
        self._save()
        yield self._check_lag()
        # A full batch: there is more to catch up now.  Otherwise what came
        # meanwhile waits for the next poll, so that a sink keeping up with
        # a busy gateway sends batches, not a read and a sync per event.
        return len(batch) >= self.config.batch_size

    def _resend_last(self):
        """
        After a failed delivery to a sink that acknowledges nothing, the
        batch delivered before it is sent again: the collector may have
        died having read it, not written it (duplicates are allowed; the
        SIEM file verifies with them).
        """
        if self._before_last is None:
            return
        again, self._before_last = self._before_last, None
        self.log.info(
            "Export sink {sink}: sending events {first} to {last} again, which a collector that failed may not "
            "have kept", sink=self.config.name, first=again["seq"] + 1, last=self.cursor,
        )
        self.state["cursor"] = again

    @defer.inlineCallbacks
    def _check_cursor(self):
        """
        The event at the cursor must be the one the sink delivered last (its
        hash): a store that was replaced (or a state folder copied to
        another gateway) would otherwise make the sink skip events for
        good.  If it is not, the sink starts again at the beginning
        (duplicates are allowed; missing events are not).
        """
        cursor = self.state["cursor"]
        if cursor["seq"] and cursor.get("hash"):
            found = yield self.reader.read(cursor["seq"] - 1, 1)
            event = found[0][1] if found else None
            if event is None or event.get("seq") != cursor["seq"] or event.get("hash") != cursor["hash"]:
                why = (
                    "the store's event at the cursor (seq %d) is not the one this sink delivered: the record was "
                    "replaced or purged; starting again at the beginning" % (cursor["seq"],)
                )
                self.log.warn("Export sink {sink}: {why}", sink=self.config.name, why=why)
                self.state["cursor"] = {"seq": 0, "hash": None, "ts": None}
                self.state["cursor_reset"] = {"from": cursor, "at": chaining.timestamp(self.reactor.seconds()), "why": why}
                self._save()
        self._checked = True

    def _backoff(self):
        failures = self.state["failures"]
        delay = min(self.config.retry_max, self.config.retry_initial * 2 ** min(failures - 1, 30))
        # Jitter, so that sinks (and gateways) do not retry in step.
        return float(delay * random.uniform(0.8, 1.0))

    def _documents(self, batch):
        return [(event, self.document(raw, event)) for raw, event in batch if self.filter(event)]

    def document(self, raw, event):
        if self.config.format == "ocsf":
            import orjson

            return orjson.dumps(formats.ocsf_or_base(event, self.fields))
        return formats.native(raw, event, self.fields)

    def lag(self):
        """
        C{(events, seconds)} the sink is behind the store.
        """
        events = max(0, self._head() - self.cursor)
        seconds = 0.0
        if events and self._first_pending is not None:
            seconds = max(0.0, self.reactor.seconds() - self._first_pending)
        return events, seconds

    @defer.inlineCallbacks
    def _check_lag(self):
        events, seconds = self.lag()
        self.state["head"] = self._head()
        self.state["lag_events"] = events
        self.state["lag_seconds"] = round(seconds, 3)
        over = events > self.config.max_lag_events or seconds > self.config.max_lag
        since = self.state.get("lagging_since")
        alert = None
        if over and since is None:
            became = chaining.timestamp(self.reactor.seconds())
            alert = {
                "type": LAGGING,
                "sink": self.config.name,
                "target": self.state["target"],
                "cursor": self.cursor,
                "head": self.state["head"],
                "lag_events": events,
                "lag_seconds": round(seconds, 3),
                "max_lag_events": self.config.max_lag_events,
                "max_lag_seconds": self.config.max_lag,
                "last_error": self.state.get("last_error"),
            }
        elif since is not None and not over:
            became = None
            alert = {
                "type": RECOVERED,
                "sink": self.config.name,
                "target": self.state["target"],
                "cursor": self.cursor,
                "head": self.state["head"],
                "lag_events": events,
                "lagging_since": since,
            }
        if alert is not None:
            self.log.warn("Export sink {sink}: {kind}", sink=self.config.name, kind=alert["type"])
            try:
                yield self._record(alert)
            except Exception as error:
                # Not in the record (the store is closing, or failed): the
                # state stays as it was, so the alert is made again later.
                self.log.warn("Recording {kind} failed: {error}", kind=alert["type"], error=error)
            else:
                self.state["lagging_since"] = became
        self._save()

    def _save(self):
        self.state["updated"] = chaining.timestamp(self.reactor.seconds())
        try:
            save_state(self.path, self.state)
        except OSError as failure:
            self.log.error("Export sink {sink}: cannot save its cursor {path}: {error}", sink=self.config.name,
                           path=self.path, error=failure.strerror)

    @defer.inlineCallbacks
    def drain(self, deadline):
        """
        Deliver what the store holds now, until C{deadline} (reactor
        seconds) or the first failure: a stopping gateway hands its last
        events (its stop, the closing checkpoint) over before it exits.
        """
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._busy is not None:
            yield self._until(self._busy, deadline)
        while self.reactor.seconds() < deadline:
            more = yield self._until(self._cycle(), deadline)
            if more is not True:
                break

    def _until(self, d, deadline):
        """
        C{d}'s result, or None at C{deadline}: a receiver that hangs does
        not hold a stopping gateway past its drain time (the delivery is
        still cut by the sink's own timeout).
        """
        result = defer.Deferred()

        def settle(value):
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(value)

        timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()), settle, None)
        d.addBoth(settle)
        return result

    def stop(self):
        self._running = False
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.reader.close()
        close = getattr(self.sink, "close", None)
        return defer.maybeDeferred(close) if close is not None else defer.succeed(None)
