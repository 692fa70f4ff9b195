"""
The file store's sync process, from the gateway's side.

An fdatasync takes about 100 us on a fast disk and milliseconds on a slow
one.  Made in the event loop, it stops every session for that long, once
per group commit; made in a thread, the hand-over of the interpreter lock
costs more than it saves (measured: slower than in the loop).  A process of
its own (L{hoopgw.store._syncer}) waits on the disk instead, on the other
core, and the loop goes on with other sessions; asking and hearing back
cost a write and a read on a pipe.
"""

import collections
import os
import subprocess
import sys

from twisted.internet import defer
from twisted.python.failure import Failure

from hoopgw.store import _syncer


PROGRAM = _syncer.__file__


class SyncProcessLost(Exception):
    """
    The sync process went away: what it was asked has no answer.
    """


class SyncFailed(Exception):
    """
    The sync process could not make a segment durable (its reason is the
    message).
    """


class SyncProcess:
    """
    Ask the sync process to make segments durable; every request's
    L{Deferred} fires, in order, once it is done, or fails with
    L{SyncFailed} or L{SyncProcessLost}.

    It is an L{IReadDescriptor} of the reactor: the answers are read as
    they come.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._pending = collections.deque()
        self._buffer = b""
        self._process = subprocess.Popen(
            [sys.executable, "-I", PROGRAM],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
            # A Ctrl-C at the gateway's terminal is for the gateway: the
            # process ends when its pipe closes, after the last sync.
            start_new_session=True,
        )
        self._requests = self._process.stdin.fileno()
        self._answers = self._process.stdout.fileno()
        os.set_blocking(self._answers, False)
        reactor.addReader(self)

    @property
    def pid(self):
        return self._process.pid

    def open(self, path):
        """
        Make the segment followed so far durable, then follow C{path}.
        """
        return self._ask(b"open " + os.fsencode(path) + b"\n")

    def sync(self):
        """
        Make everything written to the followed segment so far durable.
        """
        return self._ask(b"sync\n")

    def _ask(self, request):
        if self._process is None:
            return defer.fail(SyncProcessLost("the sync process has stopped"))
        d = defer.Deferred()
        self._pending.append(d)
        try:
            # A request is a few bytes and the process answers each before
            # reading the next: the pipe never fills.
            os.write(self._requests, request)
        except OSError as error:
            self._pending.pop()
            self._lost("writing to it failed: %s" % (error.strerror,))
            return defer.fail(SyncProcessLost("the sync process has stopped"))
        return d

    def fileno(self):
        return self._answers if self._process is not None else -1

    def logPrefix(self):
        return "hoopgw-store-sync"

    def doRead(self):
        try:
            data = os.read(self._answers, 4096)
        except BlockingIOError:
            return None
        except OSError as error:
            self._lost("reading from it failed: %s" % (error.strerror,))
            return None
        if not data:
            self._lost("it exited")
            return None
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            d = self._pending.popleft()
            if line == b"ok":
                d.callback(None)
            else:
                d.errback(SyncFailed(line.partition(b" ")[2].decode("utf-8", "replace")))
        return None

    def connectionLost(self, reason):
        self._lost("its pipe was closed")

    def _lost(self, why):
        if self._process is None:
            return
        self._shut()
        pending, self._pending = self._pending, collections.deque()
        for d in pending:
            d.errback(Failure(SyncProcessLost("the sync process stopped: %s" % (why,))))

    def _shut(self):
        process, self._process = self._process, None
        self._reactor.removeReader(self)
        process.stdin.close()
        process.stdout.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self):
        """
        End the process once it has answered what it was asked (the caller
        waits for its answers first).
        """
        if self._process is not None:
            self._shut()
