"""
What operators do to a running gateway through the admin API
(C{/api/admin/...} on the admin listener): list connections and live
sessions, end a session, pause and resume a connection, turn a
connection's addons on and off or change their options, reload the
configuration file.  Only members of C{gateway.admin.admin_groups} may;
every action and every refusal is an event in the record naming the
operator, written before the action takes effect.
"""

import os

import attr
from twisted.internet import defer

from hoopgw import options as o
from hoopgw.model import UNAVAILABLE, Decision
from hoopgw.options import ConfigError

# A paused connection never holds a new session longer than this.
MAX_PAUSE_WAIT = 300.0
DEFAULT_PAUSE_WAIT = 30.0
# After this, a session an operator ended is cut even if its client does
# not read the goodbye.
END_GRACE = 5.0


class AdminError(Exception):
    """
    An admin request cannot be done; C{str()} says why, C{code} is the HTTP
    status.
    """

    def __init__(self, message, code=400):
        Exception.__init__(self, message)
        self.code = code


def operator(identity):
    """
    Who acted, as the record names them.
    """
    return {
        # How the token was proven: oidc, saml.
        "kind": identity.method,
        "subject": identity.subject,
        "issuer": identity.issuer,
        "groups": sorted(identity.groups),
        "identity_kind": identity.kind,
        "token_id": identity.token_id,
    }


def local_operator(signal_name):
    """
    The local operator who sent the process a signal.  The signal's sender
    cannot be learnt from Python's handler; only the process's own user and
    root may signal it, so its user is named.
    """
    uid = os.getuid()
    try:
        import pwd

        user = pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        user = None
    return {"kind": "local", "signal": signal_name, "uid": uid, "user": user}


class Pause:
    """
    A paused connection: new sessions wait until it resumes, at most
    C{wait} seconds, then are refused.  Sessions already open go on.
    """

    def __init__(self, reactor, connection, wait, by, reason):
        self.reactor = reactor
        self.connection = connection
        self.wait = wait
        self.by = by
        self.reason = reason
        self.since = reactor.seconds()
        self.waiting = []

    def refusal(self):
        return Decision.deny(
            "the connection %s is paused by an operator (%s); try again later" % (self.connection, self.reason),
            rule="paused",
            addon="gateway",
            refusal=UNAVAILABLE,
        )

    def __call__(self, session):
        if self.wait <= 0:
            return defer.succeed(self.refusal())
        waiting = defer.Deferred()
        timer = self.reactor.callLater(self.wait, self._expire, waiting)
        self.waiting.append((waiting, timer))
        return waiting

    def _expire(self, waiting):
        self.waiting = [(d, timer) for d, timer in self.waiting if d is not waiting]
        waiting.callback(self.refusal())

    def release(self, refusal=None):
        """
        The connection resumed: every waiting session goes on (or, given a
        C{refusal}, is refused with it).
        """
        waiting, self.waiting = self.waiting, []
        for d, timer in waiting:
            if timer.active():
                timer.cancel()
            d.callback(refusal)
        return len(waiting)

    def to_json(self):
        return {"since": self.since, "wait": self.wait, "by": self.by, "reason": self.reason, "waiting": len(self.waiting)}


class AdminActions:
    """
    The admin API's actions on one gateway.
    """

    def __init__(self, gateway, admin_groups):
        self.gateway = gateway
        self.admin_groups = frozenset(admin_groups)
        self.paused = {}
        # Addons turned off at run time, by connection, with their spec, so
        # that turning one on again restores its options.
        self.disabled = {}
        # Chain changes one at a time: each starts from the chain the
        # previous one left.
        self._changes = defer.DeferredLock()

    def close(self):
        """
        The gateway is stopping: sessions waiting on a paused connection
        are refused now rather than when their wait ends.
        """
        for pause in self.paused.values():
            pause.release(
                Decision.deny("the gateway is stopping", rule="paused", addon="gateway", refusal=UNAVAILABLE)
            )

    def record(self, event):
        event.setdefault("gateway", self.gateway.instance)
        return self.gateway.record(event)

    # Who may.

    def authorise(self, identity, method, path):
        """
        @raise AdminError: (recorded) unless C{identity} is in an admin group.
        """
        if self.admin_groups and identity.groups & self.admin_groups:
            return defer.succeed(identity)
        if self.admin_groups:
            reason = "%s is not in any admin group of this gateway (%s)" % (
                identity.subject,
                ", ".join(sorted(self.admin_groups)),
            )
        else:
            reason = "the admin API is off: gateway.admin.admin_groups names no group"
        return self.refused(operator(identity), method, path, reason, 403)

    def refused(self, by, method, path, reason, code):
        """
        Record a refused admin request, then fail with L{AdminError}.
        """
        event = {"type": "admin.refused", "by": by, "request": "%s /%s" % (method, "/".join(path)), "reason": reason}
        recorded = self.record(event)

        def answer(_):
            raise AdminError(reason, code)

        return recorded.addBoth(answer)

    # Routing.

    def route(self, method, path, body, identity):
        """
        One admin request: C{path} after C{/api/admin}.

        @return: the JSON answer, or a L{Deferred} firing with it.
        """
        by = operator(identity)
        if method == "GET" and path == ["connections"]:
            return {"connections": [self.connection_json(name) for name in sorted(self.gateway.config.connections)]}
        if method == "GET" and path == ["sessions"]:
            return {"sessions": self.sessions()}
        if method == "POST" and len(path) == 3 and path[0] == "sessions" and path[2] == "end":
            return self.end_session(path[1], by, _reason(body))
        if method == "POST" and path == ["reload"]:
            return self._changes.run(self.reload, by, _reason(body))
        if len(path) >= 3 and path[0] == "connections" and method == "POST":
            name = path[1]
            if name not in self.gateway.config.connections:
                raise AdminError("there is no connection named %r" % (name,), 404)
            if path[2:] == ["pause"]:
                return self.pause(name, by, _reason(body), body.get("wait", DEFAULT_PAUSE_WAIT))
            if path[2:] == ["resume"]:
                return self.resume(name, by, _reason(body))
            if len(path) == 5 and path[2] == "addons" and path[4] in ("enable", "disable", "options"):
                return self._changes.run(self.change_addon, name, path[3], path[4], body, by, _reason(body))
        raise AdminError("not found: %s /api/admin/%s" % (method, "/".join(path)), 404)

    # Reading.

    def connection_json(self, name):
        connection = self.gateway.config.connections[name]
        monitor = self.gateway.monitors[name]
        pause = self.paused.get(name)
        return {
            "name": name,
            "protocol": connection.protocol,
            "listen": connection.listen,
            "target": connection.target_name,
            "allowed_groups": sorted(connection.allowed_groups),
            "chain": [spec.describe() for spec in connection.addons],
            "disabled": sorted(self.disabled.get(name, {})),
            "sessions": len(monitor.live),
            "paused": pause.to_json() if pause is not None else None,
        }

    def sessions(self):
        found = []
        for name in sorted(self.gateway.monitors):
            found.extend(live.to_json() for live in self.gateway.monitors[name].live.values())
        return sorted(found, key=lambda item: item["started"])

    # Acting.

    def _find(self, session_id):
        for monitor in self.gateway.monitors.values():
            live = monitor.live.get(session_id)
            if live is not None:
                return live
        raise AdminError("there is no live session %r" % (session_id,), 404)

    def end_session(self, session_id, by, reason):
        live = self._find(session_id)
        client = live.counter
        if client is None or client.transport is None:
            raise AdminError(
                "the session %s (%s) cannot be ended on its own; pause the connection or revoke the identity's token"
                % (session_id, live.session.protocol),
                409,
            )
        session = live.session
        before = live.to_json()
        event = {
            "type": "admin.action",
            "action": "session.end",
            "by": by,
            "reason": reason,
            "connection": session.connection,
            "session": session.id,
            "before": before,
            "after": {"ended": True},
        }

        def end(_):
            session.attributes["end_reason"] = "ended by %s: %s" % (by["subject"], reason)
            # A front end that can say why (a FATAL error, an SSH disconnect
            # message) does; else the connection just closes.
            disconnect = getattr(client.wrappedProtocol, "disconnect", None)
            if disconnect is not None:
                disconnect("hoopgw: %s ended this session: %s" % (by["subject"], reason))
            else:
                client.loseConnection()
            # A client that does not read is cut.
            abort = self.gateway.reactor.callLater(END_GRACE, _abort, client)
            client.lost.addBoth(lambda _: abort.active() and abort.cancel())
            return {"session": session.id, "ended": True}

        return self.record(event).addCallback(end)

    def pause(self, name, by, reason, wait):
        try:
            seconds = o.duration(wait, "wait") if not isinstance(wait, (int, float)) else float(wait)
        except ConfigError as error:
            raise AdminError(str(error))
        if not 0 <= seconds <= MAX_PAUSE_WAIT:
            raise AdminError("wait must be between 0s and %ds" % (MAX_PAUSE_WAIT,))
        if name in self.paused:
            raise AdminError("the connection %s is already paused" % (name,), 409)
        pause = Pause(self.gateway.reactor, name, seconds, by, reason)
        event = {
            "type": "admin.action",
            "action": "connection.pause",
            "by": by,
            "reason": reason,
            "connection": name,
            "before": {"paused": False},
            "after": {"paused": True, "wait": seconds},
        }

        def paused(_):
            self.paused[name] = pause
            self.gateway.monitors[name].gate = pause
            return self.connection_json(name)

        return self.record(event).addCallback(paused)

    def resume(self, name, by, reason):
        pause = self.paused.get(name)
        if pause is None:
            raise AdminError("the connection %s is not paused" % (name,), 409)
        event = {
            "type": "admin.action",
            "action": "connection.resume",
            "by": by,
            "reason": reason,
            "connection": name,
            "before": {"paused": True, "since": pause.since, "paused_by": pause.by["subject"] if pause.by else None},
            "after": {"paused": False, "released": len(pause.waiting)},
        }

        def resumed(_):
            del self.paused[name]
            self.gateway.monitors[name].gate = None
            pause.release()
            return self.connection_json(name)

        return self.record(event).addCallback(resumed)

    def change_addon(self, name, addon, change, body, by, reason):
        """
        Turn C{addon} on or off for connection C{name}, or replace its
        options; new sessions get the changed chain, open ones keep theirs.
        """
        connection = self.gateway.config.connections[name]
        specs = list(connection.addons)
        names = [spec.name for spec in specs]
        disabled = self.disabled.setdefault(name, {})
        if change == "disable":
            if addon not in names:
                raise AdminError("the addon %s is not in the chain of %s" % (addon, name), 409)
            index = names.index(addon)
            disabled[addon] = (specs.pop(index), index)
        elif change == "enable":
            if addon in names:
                raise AdminError("the addon %s is already on for %s" % (addon, name), 409)
            spec, index = disabled.get(addon, (None, None))
            if spec is None or "options" in body:
                spec = self._spec(name, addon, body.get("options"), spec)
            position = body.get("position", index)
            if position is None:
                # Before record, so that what it writes sees the addon's decisions.
                position = names.index("record") if "record" in names else len(specs)
            if not isinstance(position, int) or not 0 <= position <= len(specs):
                raise AdminError("position must be a whole number from 0 to %d" % (len(specs),))
            specs.insert(position, spec)
        else:
            if addon not in names:
                raise AdminError("the addon %s is not in the chain of %s" % (addon, name), 409)
            index = names.index(addon)
            specs[index] = self._spec(name, addon, body.get("options"), specs[index])
        changed = attr.evolve(connection, addons=tuple(specs))
        self._check(changed)
        done = self.gateway.change_chain(changed, by, action="addon.%s" % (change,), reason=reason, addon=addon)
        if change == "enable":
            done.addCallback(lambda result: (disabled.pop(addon, None), result)[1])
        elif change == "disable":
            done.addErrback(lambda failure: (disabled.pop(addon, None), failure)[1])
        return done.addCallback(lambda _: self.connection_json(name))

    def _spec(self, name, addon, raw_options, current):
        from hoopgw.config import AddonSpec, builtin_addons

        factory = current.factory if current is not None else builtin_addons().get(addon)
        if factory is None:
            raise AdminError("there is no addon named %r" % (addon,), 404)
        if raw_options is not None and not isinstance(raw_options, dict):
            raise AdminError("options must be a JSON object")
        where = "connections.%s.addons.%s" % (name, addon)
        base = os.path.dirname(os.path.abspath(self.gateway.config.path))
        token = o.relative_to(base)
        try:
            options = o.parse_options(factory.options, raw_options, where)
        except ConfigError as error:
            raise AdminError(str(error))
        finally:
            o._BASE_DIRECTORY.reset(token)
        return AddonSpec(
            name=addon,
            factory=factory,
            options=options,
            source=current.source if current is not None else "plugin",
            path=where,
        )

    def _check(self, connection):
        """
        The checks an addon makes of its place when the file is loaded.
        """
        config = self.gateway.config
        try:
            for spec in connection.addons:
                check = getattr(spec.factory, "check_connection", None)
                if check is not None:
                    check(spec.options, connection, config.identity_providers, spec.path)
                check = getattr(spec.factory, "check_gateway", None)
                if check is not None:
                    check(spec.options, config.gateway, spec.path)
        except ConfigError as error:
            raise AdminError(str(error))

    def reload(self, by, reason):
        event = {"type": "admin.action", "action": "config.reload", "by": by, "reason": reason,
                 "before": {"config_sha256": self.gateway.config.digest}}
        recorded = self.record(event)
        recorded.addCallback(lambda _: self.gateway.reload(by=by))
        return recorded.addCallback(lambda changed: {"changed": changed, "config_sha256": self.gateway.config.digest})


def _abort(client):
    if client.transport is not None:
        client.transport.abortConnection()


def _reason(body):
    reason = body.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise AdminError("give a reason: it is recorded with your action")
    if len(reason) > 1000:
        raise AdminError("the reason is too long (1000 characters at most)")
    return reason.strip()
