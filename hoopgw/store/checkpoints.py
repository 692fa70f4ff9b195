"""
What every store backend keeps about its chain besides the head (events
counted by type, the gateways running, how much is not yet signed), and
when it writes a signed checkpoint: every so many events, every so many
seconds, and when it closes.
"""

from twisted.internet import task
from twisted.logger import Logger

from hoopgw import logs
from hoopgw.store import events as chaining


# Events that open and close a gateway's run in the record.
GATEWAY_START = "gateway.start"
GATEWAY_STOP = "gateway.stop"
GATEWAY_RECOVERED = "gateway.recovered"
# A gateway's store connection came back after an outage: the gateway runs
# on (see the PostgreSQL store).
STORE_RECONNECTED = "store.reconnected"


class ChainState:
    """
    The running summary of a chain, updated with each sealed event.

    @ivar seq: the last event's sequence number.
    @ivar head: the last event's hash.
    @ivar counts: events by type, from the start of the chain.
    @ivar running: the ids of the gateways that started and have not
        stopped (nor been found crashed).
    @ivar last_checkpoint: the seq of the last checkpoint, or None.
    @ivar since_checkpoint: events after it (or from the start).
    """

    def __init__(self):
        self.seq = 0
        self.head = chaining.GENESIS
        self.counts = {}
        self.running = set()
        self.last_checkpoint = None
        self.since_checkpoint = 0

    def account(self, event):
        kind = event.get("type")
        self.seq = event["seq"]
        self.head = event["hash"]
        if kind == chaining.CHECKPOINT:
            # A checkpoint's counts are of the events before it: start from them.
            self.counts = dict(event.get("counts") or self.counts)
            self.running = set(event.get("gateways") or ())
            self.last_checkpoint = event["seq"]
            self.since_checkpoint = 0
        else:
            self.since_checkpoint += 1
        self.counts[kind] = self.counts.get(kind, 0) + 1
        gateway = event.get("gateway")
        if kind == GATEWAY_START and gateway:
            self.running.add(gateway)
        elif kind == GATEWAY_STOP:
            self.running.discard(gateway)
        elif kind == GATEWAY_RECOVERED:
            self.running.difference_update(event.get("crashed") or ())
            # The run recovering is named running from here, so the
            # checkpoint that signs the recovery names it too.
            if event.get("by"):
                self.running.add(event["by"])
        elif kind == STORE_RECONNECTED and gateway:
            self.running.add(gateway)

    def checkpoint_fields(self):
        """
        What a checkpoint written now states about the chain before it.
        """
        return {"counts": dict(self.counts), "gateways": sorted(self.running)}

    def recovered(self, crashed, signing, reason, by=None):
        """
        The C{gateway.recovered} event saying that the runs C{crashed}
        ended without stopping, and which events after the last checkpoint
        their writer never signed: those of a chain that has a checkpoint,
        or of one that C{signing} says was to be signed.

        @param by: the id of the run recovering them, or None.
        """
        unsigned = (self.last_checkpoint is not None or signing) and self.since_checkpoint > 0
        event = {
            "type": GATEWAY_RECOVERED,
            "crashed": crashed,
            "unsigned": {"from": (self.last_checkpoint or 0) + 1, "to": self.seq} if unsigned else None,
            "reason": reason,
        }
        if by is not None:
            event["by"] = by
        return event

    @classmethod
    def rebuild(cls, tail):
        """
        The state after C{tail}: the chain's events from its last
        checkpoint (or from its start) to its end, in order.
        """
        state = cls()
        for event in tail:
            state.account(event)
        return state


class CheckpointSchedule:
    """
    Asks a store for a checkpoint after C{every_events} events or
    C{every_seconds} seconds with events not yet signed.
    """

    log = Logger()

    def __init__(self, store, reactor, every_events=1000, every_seconds=60.0):
        self._store = store
        self._reactor = reactor
        self.every_events = every_events
        self.every_seconds = every_seconds
        self._timer = None
        self._pending = None

    def start(self):
        if self.every_seconds and self._timer is None:
            self._timer = task.LoopingCall(self._tick)
            self._timer.clock = self._reactor
            self._timer.start(self.every_seconds, now=False)

    def stop(self):
        if self._timer is not None and self._timer.running:
            self._timer.stop()
        self._timer = None

    def appended(self, unsigned):
        """
        An event was sealed; C{unsigned} events now follow the last checkpoint.
        """
        if self.every_events and unsigned >= self.every_events and self._pending is None:
            self._checkpoint("events")

    def _tick(self):
        if self._store.unsigned_events() and self._pending is None:
            self._checkpoint("interval")

    def _checkpoint(self, reason):
        self._pending = self._store.checkpoint(reason)
        self._pending.addErrback(self._failed)
        self._pending.addBoth(self._done)

    def _done(self, result):
        self._pending = None
        return result

    def _failed(self, failure):
        logs.failed(self.log, failure, "Writing a checkpoint failed")
