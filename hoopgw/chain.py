"""
The addon chain: an ordered list of addons whose hooks are called by name,
in order, for every session and command of a connection, whatever its
protocol.  Unlike mitmproxy, an addon that raises does not get logged and
skipped: it denies (fail closed).

The chain is on every statement's path, so it stays synchronous while the
addons are: a hook that answers at once costs a function call, and only a
hook that returns an unfired L{Deferred} makes the result a L{Deferred}.
"""

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from hoopgw import logs
from hoopgw.model import APPROVED, CANCELLED, DENY, FAILED, UNAUTHENTICATED, Decision


HOOKS = (
    "session_started",
    "command_received",
    "result_received",
    "command_finished",
    "cancel_requested",
    "session_ended",
)


class ChainBroken(Exception):
    """
    An addon failed while handling a result: what it was given must not
    reach the client.
    """

    def __init__(self, addon, failure):
        Exception.__init__(self, addon, failure)
        self.addon = addon
        self.failure = failure

    def __str__(self):
        return "the %s addon failed: %s" % (self.addon, self.failure.getErrorMessage())


def _failure_decision(name, failure):
    if failure.check(defer.CancelledError):
        return Decision.deny("the client gave up waiting", rule="%s:cancelled" % (name,), addon=name, refusal=CANCELLED)
    return Decision.deny(
        "the %s addon failed (%s: %s), so the gateway refuses"
        % (name, failure.type.__name__, failure.getErrorMessage()),
        rule="%s:error" % (name,),
        addon=name,
        refusal=FAILED,
    )


def _combine(current, decision, name):
    """
    Fold one addon's answer into the decision so far: a denial wins, an
    approval is kept, "allow" and "no opinion" leave things as they are.
    """
    if decision is None:
        return current
    if not isinstance(decision, Decision):
        raise TypeError("%s returned %r; hooks return a Decision or None" % (name, decision))
    if decision.addon is None:
        decision = Decision(
            decision.verdict,
            rule=decision.rule,
            reason=decision.reason,
            addon=name,
            approval=decision.approval,
            sqlstate=decision.sqlstate,
            refusal=decision.refusal,
        )
    if decision.verdict == DENY or decision.verdict == APPROVED or current is None:
        return decision
    return current


def settled(value):
    """
    C{value} itself, or the result of an already fired L{Deferred}: lets a
    caller take the synchronous path when nothing is pending.

    @return: C{(True, result)} when settled, C{(False, deferred)} if not.
    """
    if isinstance(value, defer.Deferred):
        # (Read from the attribute: since Twisted 25.5 the public
        # Deferred.callbacks warns on every read, a cost on every command.
        # Without it, the caller waits on the Deferred: slower, as right.)
        if value.called and not value.paused and not getattr(value, "_callbacks", True):
            result = value.result
            if isinstance(result, Failure):
                return False, value
            return True, result
        return False, value
    return True, value


class _Decider:
    """
    Calls one decision hook on each addon in turn until one denies,
    synchronously as long as the addons answer at once.
    """

    __slots__ = ("hooks", "arguments", "after_each", "result", "inflight", "track")

    def __init__(self, hooks, arguments, after_each, track=None):
        self.hooks = hooks
        self.arguments = arguments
        self.after_each = after_each
        self.result = None
        self.inflight = None
        # Told each decision so far, so later addons see it (an approval
        # reaches the record addon's event).
        self.track = track

    def fold(self, decision, name, answer):
        decision = _combine(decision, answer, name)
        if self.after_each is not None and (decision is None or decision.verdict != DENY):
            decision = _combine(decision, self.after_each(), "gateway")
        if self.track is not None and decision is not None:
            self.track(decision)
        return decision

    def run(self, index, decision):
        hooks = self.hooks
        while index < len(hooks):
            name, method = hooks[index]
            index += 1
            try:
                done, answer = settled(method(*self.arguments))
                if not done:
                    return self._wait(answer, index, decision, name)
                decision = self.fold(decision, name, answer)
            except BaseException:
                decision = _failure_decision(name, Failure())
            if decision is not None and decision.verdict == DENY:
                break
        if self.result is not None:
            self.result.callback(decision)
            return self.result
        return decision

    def _wait(self, answer, index, decision, name):
        if self.result is None:
            # The client may give up (a cancel request, a disconnect): stop
            # whatever addon is still deciding, an approval for instance.
            self.result = defer.Deferred(lambda _: self.inflight and self.inflight.cancel())
        self.inflight = answer
        answer.addCallbacks(
            self._resume, self._failed, callbackArgs=(index, decision, name), errbackArgs=(name,)
        )
        return self.result

    def _resume(self, answer, index, decision, name):
        self.inflight = None
        if self.result.called:
            return
        try:
            decision = self.fold(decision, name, answer)
        except BaseException:
            decision = _failure_decision(name, Failure())
        if decision is not None and decision.verdict == DENY:
            self.result.callback(decision)
        else:
            self.run(index, decision)

    def _failed(self, failure, name):
        self.inflight = None
        if not self.result.called:
            self.result.callback(_failure_decision(name, failure))


def _count_masked(command, chunk):
    """
    Once every result hook has had C{chunk}, add what they masked or
    withheld to the command's C{outcome["masked"]}, for every front end.
    """
    if command is not None and (chunk.masked or chunk.withheld):
        outcome = command.outcome
        outcome["masked"] = outcome.get("masked", 0) + chunk.masked + chunk.withheld


class AddonChain:
    """
    The addons of one connection, in order.

    @ivar addons: a list of C{(name, addon)}.
    """

    log = Logger()

    def __init__(self, addons, allowed_groups=frozenset(), monitor=None):
        self.addons = list(addons)
        self.allowed_groups = frozenset(allowed_groups)
        # Counts sessions and commands and times the hooks (hoopgw.metrics):
        # told, never asked, except whether a paused connection admits.
        self.monitor = monitor
        self._hooks = {
            hook: [
                (name, getattr(addon, hook))
                for name, addon in self.addons
                if getattr(addon, hook, None) is not None
            ]
            for hook in HOOKS
        }
        if monitor is not None:
            self._hooks = monitor.instrument(self._hooks)

    @property
    def names(self):
        return [name for name, _ in self.addons]

    def has(self, hook):
        """
        Whether any addon implements C{hook}: a front end may skip work
        (decoding rows, for instance) nobody will look at.
        """
        return bool(self._hooks[hook])

    def reads(self, facts):
        """
        Whether any addon reads C{facts} (an addon says so in its C{reads}
        attribute, e.g. C{("sql",)}): a front end may skip working them out
        (parsing a statement) when none does; an addon that did not say so
        and asks anyway gets them worked out then.
        """
        return any(facts in getattr(addon, "reads", ()) for _, addon in self.addons)

    def _check_groups(self, session, state):
        """
        Once an addon has said who the client is, the connection's allowed
        groups decide whether the session may go on.
        """
        if session.identity is None or state:
            return None
        state.append(True)
        if self.allowed_groups and not (session.identity.groups & self.allowed_groups):
            return Decision.deny(
                "%s is not in any group allowed to use this connection (%s)"
                % (session.identity.subject, ", ".join(sorted(self.allowed_groups))),
                rule="allowed_groups",
                addon="gateway",
            )
        return None

    def start_session(self, session):
        """
        Run C{session_started} on every addon.  The session goes on only if
        no addon denied, an identity was established and it is in one of
        the connection's allowed groups.  A refused session is ended at
        once (C{session_ended} runs with C{session.refusal} set).

        @return: a L{Deferred} firing with the L{Decision}.
        """
        checked = []
        decider = _Decider(
            self._hooks["session_started"], (session,), lambda: self._check_groups(session, checked)
        )

        def decided(decision):
            if decision is None or decision.verdict != DENY:
                if session.identity is None:
                    decision = Decision.deny(
                        "no addon established who you are; this connection's chain needs the identity addon",
                        rule="no-identity",
                        addon="gateway",
                        refusal=UNAUTHENTICATED,
                    )
                else:
                    decision = self._check_groups(session, checked) or decision or Decision.allow()
            if decision.verdict == DENY:
                return self.refuse_session(session, decision)
            if self.monitor is not None:
                self.monitor.session_started(session)
            # Every front end's sessions pass here: one log line for all.
            logs.session_started(session)
            return decision

        waiting = self.monitor.admission(session) if self.monitor is not None else None
        if waiting is not None:
            # The connection is paused: the chain runs once it resumes.
            def resumed(refusal):
                if refusal is not None:
                    return self.refuse_session(session, refusal)
                return defer.maybeDeferred(decider.run, 0, None).addCallback(decided)

            return waiting.addCallback(resumed)
        return defer.maybeDeferred(decider.run, 0, None).addCallback(decided)

    def refuse_session(self, session, decision):
        """
        End C{session} as refused by C{decision}: C{session_ended} runs on
        every addon with C{session.refusal} set (the record addon writes
        C{session.refused}).  L{start_session} ends its refusals this way;
        so does a front end that refuses before any addon could (a request
        carrying two credentials).

        @return: a L{Deferred} firing with C{decision} once every addon has
            finished.
        """
        if session.wire is not None:
            decision = session.wire(decision, "session")
        session.refusal = decision
        if self.monitor is not None:
            self.monitor.session_refused(session, decision)

        def logged(result):
            # After the addons: the record addon's flood bound has decided
            # whether this refusal is one to write in full or to count.
            logs.session_refused(session, decision)
            return result

        return defer.maybeDeferred(self.end_session, session).addBoth(logged).addCallback(lambda _: decision)

    def submit(self, session, command):
        """
        Run C{command_received} on every addon until one denies.  The
        decision is set on C{command.decision} as it grows, so later
        addons see it.

        @return: the final L{Decision}, or a L{Deferred} firing with it when
            an addon is still deciding.
        """
        command.decision = Decision.allow()
        hooks = self._hooks["command_received"]
        if not hooks:
            return command.decision
        outcome = _Decider(hooks, (session, command), None, lambda decision: setattr(command, "decision", decision)).run(0, None)

        def decided(decision):
            if decision is not None and decision.verdict == DENY and session.wire is not None:
                decision = session.wire(decision, "command")
            command.decision = decision or command.decision
            return command.decision

        if isinstance(outcome, defer.Deferred):
            return outcome.addCallback(decided)
        return decided(outcome)

    def result(self, session, command, chunk):
        """
        Pass a result chunk through every C{result_received} hook, and count
        what they masked in C{command.outcome["masked"]}.

        @return: None when every hook finished at once, else a L{Deferred}
            firing when they all have.
        @raise ChainBroken: when a hook failed; the chunk must be withheld.
        """
        hooks = self._hooks["result_received"]
        for position, (name, method) in enumerate(hooks):
            try:
                done, answer = settled(method(session, command, chunk))
            except BaseException:
                raise ChainBroken(name, Failure())
            if not done:
                return self._result_later(answer, name, hooks[position + 1 :], session, command, chunk)
        _count_masked(command, chunk)
        return None

    @defer.inlineCallbacks
    def _result_later(self, pending, name, remaining, session, command, chunk):
        try:
            yield pending
        except BaseException:
            raise ChainBroken(name, Failure())
        for name, method in remaining:
            try:
                yield method(session, command, chunk)
            except BaseException:
                raise ChainBroken(name, Failure())
        _count_masked(command, chunk)

    def _notify(self, hook, arguments):
        """
        Call C{hook} on every addon, even after one failed; failures are
        logged.

        @return: None if every addon finished at once, else a L{Deferred}
            firing once they all have.
        """
        waiting = None
        for name, method in self._hooks[hook]:
            try:
                answer = method(*arguments)
            except BaseException:
                logs.failed(self.log, Failure(), "The {addon} addon failed in {hook}", addon=name, hook=hook)
                continue
            if isinstance(answer, defer.Deferred):
                answer.addErrback(self._log_failure, name, hook)
                if not answer.called:
                    if waiting is None:
                        waiting = []
                    waiting.append(answer)
        if waiting is None:
            return None
        return defer.gatherResults(waiting, consumeErrors=True)

    def _log_failure(self, failure, name, hook):
        logs.failed(self.log, failure, "The {addon} addon failed in {hook}", addon=name, hook=hook)

    def finish(self, session, command):
        """
        Tell every addon that C{command} is over.

        @return: None, or a L{Deferred} if an addon is still busy.
        """
        if self.monitor is not None:
            self.monitor.command_finished(session, command)
        return self._notify("command_finished", (session, command))

    def cancel(self, session, command=None, via=None):
        """
        Tell every addon that the client asked to cancel what C{session} is
        doing (a PostgreSQL CancelRequest naming its key): the record addon
        writes C{command.cancel}.  The front end has already stopped a
        pending decision or asked the target to cancel; a request naming no
        session is refused with L{refuse_session} instead.

        @param command: the L{hoopgw.model.Command} the target was running,
            or None.
        @param via: the run id of the gateway process the request reached,
            when another one sharing the store routed it here.
        @return: None, or a L{Deferred} if an addon is still busy.
        """
        return self._notify("cancel_requested", (session, command, via))

    def end_session(self, session):
        """
        Tell every addon that C{session} is over.

        @return: a L{Deferred} firing once every addon has finished.
        """
        if self.monitor is not None:
            self.monitor.session_ended(session)
        if session.refusal is None:
            logs.session_ended(session)
        return defer.maybeDeferred(self._notify, "session_ended", (session,))
