"""
Back-pressure: pause reading from a transport for as long as any of
several reasons holds (the peer cannot take more, a decision is pending,
an addon is busy with a result).
"""

from zope.interface import implementer
from twisted.internet.interfaces import IPushProducer


@implementer(IPushProducer)
class Valve:
    """
    Pauses C{transport}'s reading while any reason holds.  Registered as
    the producer of the peer's transport, it pauses when the peer's write
    buffer is full and resumes when it has drained.
    """

    def __init__(self, transport):
        self._transport = transport
        self._reasons = set()

    def pause(self, reason):
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason):
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons:
                self._transport.resumeProducing()

    @property
    def paused(self):
        return bool(self._reasons)

    def pauseProducing(self):
        self.pause("peer is full")

    def resumeProducing(self):
        self.resume("peer is full")

    def stopProducing(self):
        # The peer went away; each side handles its own connection loss.
        pass
