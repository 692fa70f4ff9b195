"""
Refused attempts under a flood: per client address and reason, the first
few refusals of an interval are recorded in full and the rest are counted
into one C{session.refused.summary} event per address and interval, so a
client retrying in a loop can neither fill the record nor go unrecorded.
Protocol-neutral: the record addon asks about every refused session,
whichever front end refused it.
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import logs
from hoopgw import options as o
from hoopgw import redact
from hoopgw.store.events import timestamp


SUMMARY = "session.refused.summary"

# Where refusals from addresses beyond max_sources are counted.
OTHER_SOURCES = "(other addresses)"

# What a summary keeps of a name a client claimed.
_CLAIM_CHARACTERS = 128

OPTIONS = (
    o.Option(
        "in_full",
        o.integer(minimum=0),
        10,
        "How many refusals per client address and reason each interval are recorded in full "
        "(session.refused); the rest are counted in that address's session.refused.summary.",
    ),
    o.Option("interval", o.duration, 60.0, "The length of that interval."),
    o.Option(
        "max_sources",
        o.integer(minimum=1),
        10000,
        "How many client addresses are tracked at once; refusals from further addresses are "
        "counted together under '(other addresses)'.",
    ),
    o.Option(
        "max_identities",
        o.integer(minimum=0),
        20,
        "How many distinct claimed identities a summary names; it counts the others.",
    ),
)


def parse(raw, path):
    return o.parse_options(OPTIONS, raw, path)


def source_host(client_address):
    """
    The host part of a C{host:port} client address, as every front end
    writes it.
    """
    host, separator, _ = client_address.rpartition(":")
    return host if separator else client_address


def claimed_identity(session):
    """
    Who a refused session said it was: its proven subject, or the user or
    login it claimed; cut short, secrets redacted, never a token.
    """
    if session.identity is not None:
        name = session.identity.subject
    else:
        name = (session.credentials.user if session.credentials is not None else None) or session.attributes.get(
            "login"
        )
    if not name:
        return None
    return redact.redact_secrets(str(name)[:_CLAIM_CHARACTERS])


class _Window:
    __slots__ = ("start", "full", "summarised", "first", "last", "identities", "more_identities", "protocols", "connections", "timer")

    def __init__(self, start):
        self.start = start
        self.full = collections.Counter()
        self.summarised = collections.Counter()
        self.first = None
        self.last = None
        self.identities = set()
        self.more_identities = 0
        self.protocols = collections.Counter()
        self.connections = collections.Counter()
        self.timer = None


class RefusalFloods:
    """
    The gateway's account of refused attempts, by client address.

    @param record: writes an event to the store, returning a L{Deferred}.
    """

    log = Logger()

    def __init__(self, reactor, record, in_full=10, interval=60.0, max_sources=10000, max_identities=20, gateway=None):
        self.reactor = reactor
        self.record = record
        self.in_full = in_full
        self.interval = interval
        self.max_sources = max_sources
        self.max_identities = max_identities
        self.gateway = gateway
        self._windows = {}
        self._writing = set()

    def admit(self, session):
        """
        Count one refused session.

        @return: True when it is to be recorded in full, False when it is
            counted in its address's summary instead.
        """
        host = source_host(session.client_address or "")
        reason = (session.refusal.rule if session.refusal is not None else None) or "refused"
        now = self.reactor.seconds()
        window = self._windows.get(host)
        if window is None:
            if len(self._windows) >= self.max_sources:
                host = OTHER_SOURCES
                window = self._windows.get(host)
            if window is None:
                window = self._windows[host] = _Window(now)
                # Whatever happens, the window closes (and says what it
                # counted) when its interval is over.
                window.timer = self.reactor.callLater(self.interval, self._expire, host, window)
        if window.full[reason] < self.in_full:
            window.full[reason] += 1
            return True
        window.summarised[reason] += 1
        # Its log line is left out too: the summary's line counts it.
        session.metadata[logs.SUMMARISED] = True
        if window.first is None:
            window.first = now
        window.last = now
        window.protocols[session.protocol] += 1
        window.connections[session.connection] += 1
        claimed = claimed_identity(session)
        if claimed is not None and claimed not in window.identities:
            if len(window.identities) < self.max_identities:
                window.identities.add(claimed)
            else:
                window.more_identities += 1
        return False

    def _expire(self, host, window):
        window.timer = None
        if self._windows.get(host) is window:
            del self._windows[host]
        self._write(host, window)

    def _write(self, host, window):
        if not window.summarised:
            return None
        event = {
            "type": SUMMARY,
            "client": host,
            "interval": {"start": timestamp(window.start), "seconds": self.interval},
            "first": timestamp(window.first),
            "last": timestamp(window.last),
            "refused": sum(window.summarised.values()),
            "by_reason": dict(window.summarised),
            "recorded_in_full": dict(window.full),
            "protocols": dict(window.protocols),
            "connections": dict(window.connections),
            "identities": sorted(window.identities),
        }
        if window.more_identities:
            event["more_identities"] = window.more_identities
        if self.gateway is not None:
            event["gateway"] = self.gateway
        logs.refusals_summarised(event)
        writing = defer.maybeDeferred(self.record, event)
        self._writing.add(writing)

        def written(result):
            self._writing.discard(writing)
            return result

        writing.addBoth(written).addErrback(
            lambda failure: self.log.error(
                "A summary of refused attempts could not be recorded: {error}", error=failure.getErrorMessage()
            )
        )
        return writing

    def flush(self):
        """
        Write every open window's summary now (the gateway is stopping).

        @return: a L{Deferred} firing once they are written.
        """
        windows, self._windows = self._windows, {}
        for host, window in windows.items():
            if window.timer is not None and window.timer.active():
                window.timer.cancel()
            window.timer = None
            self._write(host, window)
        return defer.gatherResults(list(self._writing), consumeErrors=True).addBoth(lambda _: None)
