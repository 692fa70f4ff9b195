"""
Replay protection for short-lived credentials: remember each token id (a
JWT's C{jti}, a SAML assertion's C{ID}) until the credential expires, and
refuse it when it comes again.  Memory stays bounded: an entry is dropped
at its credential's expiry, and a provider that asks for replay protection
must also cap its tokens' lifetime.
"""

import heapq


class ReplayCache:
    """
    The token ids one issuer's credentials used, until they expire.

    @param clock: something with C{seconds()} (the reactor).
    @param limit: the most ids kept at once; past it, new credentials are
        refused rather than old ids forgotten (which would let them be
        replayed).
    """

    def __init__(self, clock, limit=1000000):
        self._clock = clock
        self._limit = limit
        self._expiries = {}
        self._heap = []

    def __len__(self):
        self._purge()
        return len(self._expiries)

    def _purge(self):
        now = self._clock.seconds()
        heap, expiries = self._heap, self._expiries
        while heap and heap[0][0] <= now:
            expiry, token_id = heapq.heappop(heap)
            if expiries.get(token_id) == expiry:
                del expiries[token_id]

    def seen(self, token_id):
        """
        Whether C{token_id} was used and has not expired yet.
        """
        self._purge()
        return token_id in self._expiries

    def use(self, token_id, expires):
        """
        Mark C{token_id} used until C{expires} (a POSIX time).

        @return: C{True} if it was fresh, C{False} if it is a replay.
        @raise OverflowError: when the cache is full.
        """
        self._purge()
        if token_id in self._expiries:
            return False
        if len(self._expiries) >= self._limit:
            raise OverflowError("too many credentials in use at once")
        self._expiries[token_id] = expires
        heapq.heappush(self._heap, (expires, token_id))
        return True
