"""
The gateway's export: one L{SinkRunner} per configured sink, started with
the gateway and drained once its store has written its last event.
"""

from twisted.internet import defer
from twisted.logger import Logger

from hoopgw.export.reader import head_of, reader_for
from hoopgw.export.runner import SinkRunner
from hoopgw.export.sinks import make_sink

# How long a stopping gateway waits for its sinks to take its last events.
DRAIN_SECONDS = 10.0


class ExportService:
    """
    The sinks of C{config.gateway.export}, each reading C{store} on its own.
    """

    log = Logger()

    def __init__(self, sinks, state_dir, reactor, store, record):
        self.reactor = reactor
        self.store = store
        self.runners = {}
        for config in sinks:
            reader = reader_for(store, reactor)
            self.runners[config.name] = SinkRunner(
                config, make_sink(config, reactor), reader, state_dir, reactor, record,
                lambda reader=reader: max(head_of(store), reader.head() if hasattr(reader, "wake_on_commit") else 0),
            )
        self._listening = False

    def start(self):
        for runner in self.runners.values():
            runner.start()
        readers = [runner.reader for runner in self.runners.values()]
        wake = getattr(readers[0], "wake_on_commit", None) if readers else None
        if wake is not None and not self._listening:
            # A PostgreSQL store announces each commit: sinks follow at once.
            self._listening = True
            wake(self.wake)

    def wake(self):
        for runner in self.runners.values():
            runner.wake()

    @defer.inlineCallbacks
    def stop(self, drain=DRAIN_SECONDS):
        """
        Hand the record's last events over (for at most C{drain} seconds),
        then stop every sink.
        """
        deadline = self.reactor.seconds() + drain
        yield defer.gatherResults(
            [runner.drain(deadline) for runner in self.runners.values()], consumeErrors=True
        ).addErrback(lambda failure: self.log.failure("Draining the export failed", failure))
        yield defer.gatherResults([runner.stop() for runner in self.runners.values()], consumeErrors=True).addErrback(
            lambda failure: None
        )
