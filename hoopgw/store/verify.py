"""
Walk a store's chain and say whether it is intact, or name the first event
that was edited, reordered or removed.
"""

import os

import attr

from hoopgw.store import events as chaining
from hoopgw.store.file import read_events


@attr.s
class Report:
    """
    What verify found.

    @ivar problem: None if the chain is intact, else a sentence naming the
        first broken event and why.
    """

    events = attr.ib(default=0)
    head = attr.ib(default=chaining.GENESIS)
    problem = attr.ib(default=None)

    @property
    def ok(self):
        return self.problem is None

    def summary(self):
        if self.ok:
            return "OK: %d events, chain intact, head %s" % (self.events, self.head)
        return "BROKEN: %s" % (self.problem,)


def _where(path, number):
    return "%s line %d" % (os.path.basename(path), number)


def verify_events(entries):
    """
    Check a sequence of C{(path, line number, raw, event)}.

    @return: a L{Report}.
    """
    report = Report()
    expected_seq = 1
    entries = iter(entries)
    for path, number, raw, event in entries:
        where = _where(path, number)
        if not isinstance(event, dict):
            report.problem = "%s is not a JSON event: the store was edited" % (where,)
            return report
        seq = event.get("seq")
        if chaining.digest(event) != event.get("hash"):
            report.problem = "event %s (%s) was edited: its content no longer matches its hash" % (seq, where)
            return report
        if event.get("prev") != report.head or seq != expected_seq:
            report.problem = _explain_break(seq, where, expected_seq, entries)
            return report
        report.head = event["hash"]
        report.events += 1
        expected_seq += 1
    return report


def _explain_break(seq, where, expected_seq, rest):
    """
    The chain breaks at C{where}: say whether the expected event turns up
    later (reordered) or never (removed).
    """
    later = None
    for path, number, raw, event in rest:
        if isinstance(event, dict) and event.get("seq") == expected_seq:
            later = _where(path, number)
            break
    if later is not None:
        return "events were reordered: event %d is at %s, after event %s (%s)" % (expected_seq, later, seq, where)
    if isinstance(seq, int) and seq > expected_seq:
        if seq - expected_seq == 1:
            return "event %d was removed: the chain jumps from %d to %d at %s" % (
                expected_seq, expected_seq - 1, seq, where)
        return "events %d to %d were removed: the chain jumps from %d to %d at %s" % (
            expected_seq, seq - 1, expected_seq - 1, seq, where)
    return (
        "event %s (%s) does not follow the event before it: "
        "that event was replaced or the chain was rewritten" % (seq, where)
    )


def verify_store(directory):
    """
    Verify the file store in C{directory}.
    """
    if not os.path.isdir(directory):
        return Report(problem="%s is not a store folder" % (directory,))
    return verify_events(read_events(directory))
