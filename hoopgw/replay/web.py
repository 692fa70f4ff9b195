"""
The replay server's web application: read-only pages over a record for
auditors, who sign in with their own OIDC token (a member of the auditor
group).  Every page, recording and sign-in attempt is itself recorded, in
the views chain, before it is served (PCI DSS 10.2.1.3): a view that cannot
be recorded is not shown.

Pages: the sessions list with filters; a session with its identity's
provenance, its timeline of commands with decisions, approvals and
outcomes, the masked results as recorded, and each terminal recording
played in the browser under the command that made it; and the
verification status of what is shown.
"""

import hashlib
import html
import json
import os
import threading
import time
from urllib.parse import quote, urlencode

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.web import resource, server

from hoopgw.approvals.evidence import ApprovalsCheck
from hoopgw.identity.oidc import IdentityError, unverified_claims
from hoopgw.options import ConfigError
from hoopgw.replay import terminal
from hoopgw.store.index import DECISIONS, Index, parse_time
from hoopgw.store.verify import verify_source

STATIC = os.path.join(os.path.dirname(__file__), "static")
COOKIE = b"hoopgw_replay"
MAX_SIGNIN = 8 * 3600


class Snapshot:
    """
    The record as last read: its sessions and its verification report.
    """

    def __init__(self, fingerprint, index, report):
        self.fingerprint = fingerprint
        self.index = index
        self.report = report


class RecordReader:
    """
    Reads the record (in a thread: the sources block) again whenever it
    has changed.
    """

    def __init__(self, source, key=None):
        self.source = source
        self.key = key
        self._lock = threading.Lock()
        self._snapshot = None

    def _read(self):
        with self._lock:
            fingerprint = self.source.fingerprint()
            if self._snapshot is None or self._snapshot.fingerprint != fingerprint:
                index = Index(self.source.entries())
                report = verify_source(self.source, self.key, checks=(ApprovalsCheck,))
                self._snapshot = Snapshot(fingerprint, index, report)
            return self._snapshot

    def snapshot(self):
        return threads.deferToThread(self._read)

    def attachment(self, name):
        def read():
            with self._lock:
                return self.source.attachment(name)

        return threads.deferToThread(read)


class Auditors:
    """
    Who may read the record: holders of a valid token from one of the
    identity providers, in one of the auditor groups.
    """

    def __init__(self, providers, groups):
        self.providers = providers
        self.groups = frozenset(groups)
        self.signed_in = {}

    @defer.inlineCallbacks
    def verify(self, token):
        claims = unverified_claims(token)
        candidates = [provider for provider in self.providers.values() if provider.accepts(claims)]
        if not candidates:
            raise IdentityError("tokens from the issuer %r are not accepted here" % (claims.get("iss"),), "issuer")
        identity = yield candidates[0].verify(token)
        if not identity.groups & self.groups:
            raise IdentityError(
                "%s is not in an auditor group (%s)" % (identity.subject, ", ".join(sorted(self.groups))), "not-auditor"
            )
        return identity

    def open(self, identity, now):
        cookie = os.urandom(24).hex()
        expires = min(now + MAX_SIGNIN, identity.provenance.get("expires_at") or now + MAX_SIGNIN)
        self.signed_in[cookie] = (identity, expires)
        return cookie

    def who(self, cookie, now):
        entry = self.signed_in.get(cookie)
        if entry is None:
            return None
        identity, expires = entry
        if now >= expires:
            del self.signed_in[cookie]
            return None
        return identity


def _e(value):
    return html.escape("" if value is None else str(value))


def _page(title, body, who=None):
    user = ""
    if who is not None:
        user = '<span>%s (%s) &middot; <a href="/signout">sign out</a></span>' % (_e(who.subject), _e(who.issuer))
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>%s - hoopgw replay</title>"
        '<link rel=stylesheet href="/static/style.css"><script src="/static/player.js"></script></head>'
        '<body><header><strong><a href="/sessions">hoopgw replay</a></strong>%s</header><main>%s</main></body></html>'
        % (_e(title), user, body)
    ).encode("utf-8")


def _status_block(report):
    if report.problem is not None or not report.ok:
        return '<div class="broken" id="verification"><strong>Verification FAILED.</strong> %s</div>' % (
            _e(report.summary()[len("BROKEN: "):]),)
    lines = _e(report.summary()).replace("\n", "<br>")
    return '<div class="verified" id="verification"><strong>Record verified.</strong><br>%s</div>' % (lines,)


def _decision_cell(decision):
    verdict = decision.get("verdict", "")
    text = '<span class="%s">%s</span>' % (_e(verdict), _e(verdict.upper()))
    if decision.get("rule"):
        text += " <code>%s</code>" % (_e(decision["rule"]),)
    if decision.get("reason"):
        text += "<br>%s" % (_e(decision["reason"]),)
    return text


class ReplayApp(resource.Resource):
    """
    The whole application (one resource: a handful of routes).
    """

    isLeaf = True
    log = Logger()

    def __init__(self, reader, auditors, views, clock=time.time, secure=False):
        resource.Resource.__init__(self)
        self.reader = reader
        self.auditors = auditors
        self.views = views
        self.clock = clock
        self.secure = secure

    # Plumbing

    def _headers(self, request):
        request.setHeader(b"content-security-policy", b"default-src 'self'; object-src 'none'; frame-ancestors 'none'")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"referrer-policy", b"no-referrer")

    def _client(self, request):
        peer = request.getClientAddress()
        return "%s:%s" % (getattr(peer, "host", "?"), getattr(peer, "port", "?"))

    def _auditor(self, request):
        cookie = request.getCookie(COOKIE)
        if cookie:
            return self.auditors.who(cookie.decode("ascii", "replace"), self.clock())
        return None

    def _finish(self, request, d):
        def answerable():
            # The auditor's client may have left while the page was made.
            return not (request.finished or request._disconnected)

        def done(body):
            if body is not None and answerable():
                request.write(body)
                request.finish()

        def failed(failure):
            self.log.failure("A replay page failed", failure)
            if answerable():
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/html; charset=utf-8")
                request.write(_page("Error", "<p>The page could not be made: %s</p>" % (_e(failure.getErrorMessage()),)))
                request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET

    def _record_view(self, request, who, what, **details):
        event = {
            "type": "audit.view",
            "what": what,
            "path": request.uri.decode("utf-8", "replace"),
            "auditor": who.subject,
            "identity": who.to_json(),
            "client": self._client(request),
        }
        event.update(details)
        return self.views.record(event)

    # Routes

    def render_GET(self, request):
        self._headers(request)
        path = request.path.decode("utf-8", "replace")
        if path.startswith("/static/"):
            return self._static(request, path[len("/static/"):])
        if path == "/signin":
            return self._signin_form(request)
        if path == "/signout":
            cookie = request.getCookie(COOKIE)
            if cookie:
                self.auditors.signed_in.pop(cookie.decode("ascii", "replace"), None)
            return self._redirect(request, b"/signin")
        who = self._auditor(request)
        if who is None:
            return self._redirect(request, b"/signin?next=" + quote(request.uri.decode("utf-8", "replace")).encode())
        if path in ("/", "/sessions"):
            return self._finish(request, self._sessions(request, who))
        parts = path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "sessions":
            return self._finish(request, self._session(request, who, parts[1]))
        if len(parts) == 5 and parts[0] == "sessions" and parts[2] == "commands" and parts[4] == "cast":
            return self._finish(request, self._cast(request, who, parts[1], parts[3]))
        request.setResponseCode(404)
        return _page("Not found", "<p>There is no such page.</p>", who)

    def render_POST(self, request):
        self._headers(request)
        if request.path != b"/signin":
            request.setResponseCode(405)
            return b""
        return self._finish(request, self._signin(request))

    def _redirect(self, request, location):
        request.setResponseCode(303)
        request.setHeader(b"location", location)
        return b""

    def _static(self, request, name):
        if name not in ("player.js", "style.css"):
            request.setResponseCode(404)
            return b""
        kind = b"text/javascript; charset=utf-8" if name.endswith(".js") else b"text/css; charset=utf-8"
        request.setHeader(b"content-type", kind)
        with open(os.path.join(STATIC, name), "rb") as handle:
            return handle.read()

    def _signin_form(self, request, error=None, status=200):
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        next_page = (request.args.get(b"next") or [b"/sessions"])[0].decode("utf-8", "replace")
        message = '<p class="broken" id="error">%s</p>' % (_e(error),) if error else ""
        return _page(
            "Sign in",
            "<h1>Sign in to read the record</h1>%s"
            "<p>Paste your own identity token (OIDC). Auditors only; every sign-in and every page you open is "
            "recorded.</p>"
            '<form method=post action="/signin"><input type=hidden name=next value="%s">'
            '<textarea name=token rows=6 cols=80 required></textarea><br><button type=submit>Sign in</button></form>'
            % (message, _e(next_page)),
        )

    @defer.inlineCallbacks
    def _signin(self, request):
        token = (request.args.get(b"token") or [b""])[0].decode("utf-8", "replace").strip()
        next_page = (request.args.get(b"next") or [b"/sessions"])[0].decode("utf-8", "replace")
        if not next_page.startswith("/") or next_page.startswith("//"):
            next_page = "/sessions"
        try:
            who = yield self.auditors.verify(token)
        except IdentityError as error:
            yield self.views.record(
                {"type": "audit.signin.refused", "reason": str(error), "code": error.reason, "client": self._client(request)}
            )
            return self._signin_form(request, "Sign-in refused: %s" % (error,), status=403)
        yield self.views.record(
            {"type": "audit.signin", "auditor": who.subject, "identity": who.to_json(), "client": self._client(request)}
        )
        cookie = self.auditors.open(who, self.clock())
        request.addCookie(COOKIE, cookie.encode(), path=b"/", httpOnly=True, sameSite="strict", secure=self.secure)
        self._redirect(request, next_page.encode("utf-8"))
        return b""

    def _filters(self, request):
        raw = {key.decode(): values[0].decode("utf-8", "replace").strip() for key, values in request.args.items()}
        raw = {key: value for key, value in raw.items() if value}
        filters = {}
        if raw.get("identity"):
            filters["subject"] = raw["identity"]
        for name in ("connection", "protocol"):
            if raw.get(name):
                filters[name] = raw[name]
        for name in ("since", "until"):
            if raw.get(name):
                filters[name] = parse_time(raw[name], name)
        if raw.get("decision") in DECISIONS:
            filters["decision"] = raw["decision"]
        return raw, filters

    @defer.inlineCallbacks
    def _sessions(self, request, who):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        try:
            raw, filters = self._filters(request)
        except ConfigError as error:
            raw, filters, problem = {}, {}, str(error)
        else:
            problem = None
        snapshot = yield self.reader.snapshot()
        chosen = snapshot.index.select(**filters)
        yield self._record_view(request, who, "sessions", filters=raw, shown=len(chosen))
        options = lambda values, current: "".join(
            '<option value="%s"%s>%s</option>' % (_e(value), " selected" if value == current else "", _e(value or "any"))
            for value in values
        )
        connections = sorted({record.connection for record in snapshot.index.order})
        protocols = sorted({record.protocol for record in snapshot.index.order})
        form = (
            '<form class="filters" method=get action="/sessions">'
            '<label>identity<input name=identity value="%s"></label>'
            "<label>connection<select name=connection>%s</select></label>"
            "<label>protocol<select name=protocol>%s</select></label>"
            '<label>since<input name=since value="%s" placeholder="2026-01-31 or 24h"></label>'
            '<label>until<input name=until value="%s" placeholder="2026-01-31T12:00:00Z"></label>'
            "<label>decision<select name=decision>%s</select></label>"
            "<button type=submit>Filter</button></form>"
            % (
                _e(raw.get("identity", "")),
                options([""] + connections, raw.get("connection", "")),
                options([""] + protocols, raw.get("protocol", "")),
                _e(raw.get("since", "")),
                _e(raw.get("until", "")),
                options(("",) + DECISIONS, raw.get("decision", "")),
            )
        )
        rows = []
        for record in chosen:
            rows.append(
                '<tr class="session" data-session="%s"><td>%s</td><td><a href="/sessions/%s">%s</a></td><td>%s</td>'
                "<td>%s</td><td>%s</td><td>%s</td><td>%d</td><td>%s</td></tr>"
                % (
                    _e(record.id),
                    _e(record.started),
                    quote(record.id),
                    _e(record.id),
                    _e(record.subject or "-"),
                    _e(record.identity.get("kind", "")),
                    _e(record.protocol),
                    _e(record.connection),
                    len(record.commands),
                    _e(" ".join([record.status] + record.flags())),
                )
            )
        body = (
            "<h1>Sessions</h1>%s%s%s<p id=count>%d of %d sessions</p><table id=sessions><thead><tr><th>Started (UTC)</th>"
            "<th>Session</th><th>Identity</th><th>Kind</th><th>Protocol</th><th>Connection</th><th>Commands</th>"
            "<th>Status</th></tr></thead><tbody>%s</tbody></table>"
            % (
                _status_block(snapshot.report),
                '<p class="broken">%s</p>' % (_e(problem),) if problem else "",
                form,
                len(chosen),
                len(snapshot.index.order),
                "".join(rows),
            )
        )
        return _page("Sessions", body, who)

    @defer.inlineCallbacks
    def _session(self, request, who, session_id):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        snapshot = yield self.reader.snapshot()
        record = snapshot.index.sessions.get(session_id)
        if record is None:
            request.setResponseCode(404)
            return _page("Not found", "<p>There is no session %s in the record.</p>" % (_e(session_id),), who)
        yield self._record_view(request, who, "session", viewed_session=session_id)
        identity = record.identity
        provenance = "".join(
            "<dt>%s</dt><dd>%s</dd>" % (_e(key.replace("_", " ")), _e(_when(key, value)))
            for key, value in sorted((identity.get("provenance") or {}).items())
        )
        identity_html = (
            '<dl class="identity" id="identity"><dt>subject</dt><dd>%s</dd><dt>issuer</dt><dd>%s</dd>'
            "<dt>groups</dt><dd>%s</dd><dt>kind</dt><dd>%s</dd><dt>proven by</dt><dd>%s</dd><dt>token id</dt><dd>%s</dd>%s</dl>"
            % (
                _e(identity.get("subject")),
                _e(identity.get("issuer")),
                _e(", ".join(identity.get("groups") or [])),
                _e(identity.get("kind")),
                _e(identity.get("method")),
                _e(identity.get("token_id") or "-"),
                provenance,
            )
            if identity
            else "<p id=identity>No identity was established.</p>"
        )
        rows = []
        for number, command in enumerate(record.commands, 1):
            approval = command.decision.get("approval")
            results = command.results or {}
            shown = ""
            if results.get("columns") or results.get("rows"):
                shown += "<table class=results><tr>%s</tr>%s</table>" % (
                    "".join("<th>%s</th>" % (_e(column),) for column in results.get("columns") or []),
                    "".join(
                        "<tr>%s</tr>" % ("".join("<td>%s</td>" % (_e("NULL" if value is None else value),) for value in row),)
                        for row in results.get("rows") or []
                    ),
                )
            if results.get("text"):
                shown += "<pre>%s</pre>" % (_e(results["text"]),)
            rows.append(
                '<tr class="command" data-verdict="%s"><td>%d</td><td>%s</td><td><code>%s</code>%s</td><td>%s</td>'
                "<td>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>"
                % (
                    _e(command.verdict),
                    number,
                    _e(command.ts),
                    _e(command.text),
                    "<br><small>parameters %s</small>" % (_e(json.dumps(command.event.get("parameters"))),)
                    if command.event.get("parameters")
                    else "",
                    _decision_cell(command.decision),
                    _e(terminal.describe_approval(approval)) if approval else "-",
                    _e(terminal.describe_outcome(command.outcome)),
                    _e(command.masked or 0),
                    shown or "-",
                )
            )
            if command.cast:
                rows.append(_player(record, number, command))
        refusal = ""
        if record.refused:
            refusal = '<p class="deny" id="refusal">Refused: %s</p>' % (_e((record.end.get("refusal") or {}).get("reason")),)
        body = (
            "<h1>Session <span class=mono>%s</span></h1>%s%s"
            "<table id=summary><tr><th>Status</th><td>%s</td><th>Connection</th><td>%s (%s)</td></tr>"
            "<tr><th>Started</th><td>%s</td><th>Ended</th><td>%s</td></tr>"
            "<tr><th>Client</th><td>%s</td><th>Target</th><td>%s</td></tr></table>"
            "<h2>Identity and how it was proven</h2>%s"
            "<h2>Timeline</h2><table id=timeline><thead><tr><th>#</th><th>Time (UTC)</th><th>Command</th><th>Decision</th>"
            "<th>Approval</th><th>Outcome</th><th>Masked</th><th>Results as recorded</th></tr></thead>"
            "<tbody>%s</tbody></table>"
            % (
                _e(record.id),
                _status_block(snapshot.report),
                _coverage(record, snapshot),
                _e(" ".join([record.status] + record.flags())),
                _e(record.connection),
                _e(record.protocol),
                _e(record.started),
                _e(record.ended or "(not ended)"),
                _e(record.client),
                _e(record.target),
                identity_html + refusal,
                "".join(rows) or "<tr><td colspan=8>No commands.</td></tr>",
            )
        )
        return _page("Session %s" % (record.id,), body, who)

    @defer.inlineCallbacks
    def _cast(self, request, who, session_id, command_id):
        snapshot = yield self.reader.snapshot()
        record = snapshot.index.sessions.get(session_id)
        commands = record.commands if record is not None else ()
        command = next((each for each in commands if each.id == command_id), None)
        cast = command.cast if command is not None else None
        if not cast:
            request.setResponseCode(404)
            return b"this command has no terminal recording"
        name = cast.get("name")
        data = (yield self.reader.attachment(name)) if isinstance(name, str) and name else None
        if data is None:
            request.setResponseCode(409)
            return b"the recording is missing from the record"
        if hashlib.sha256(data).hexdigest() != cast.get("sha256"):
            request.setResponseCode(409)
            return b"the recording does not match the digest in the record; it is not served"
        yield self._record_view(
            request, who, "recording", viewed_session=session_id, viewed_command=command_id, recording=name
        )
        request.setHeader(b"content-type", b"application/x-asciicast; charset=utf-8")
        return data


_SPEEDS = ("0.5", "1", "2", "4", "8", "16")


def _player(record, number, command):
    """
    The timeline row under a command that holds its terminal recording's
    player (C{static/player.js} fetches and plays it).
    """
    cast = command.cast
    return (
        '<tr class="recording" data-command="%s"><td></td><td colspan=7>'
        '<div class="player" id="player-%d" data-cast="/sessions/%s/commands/%s/cast">'
        '<div class="controls"><strong>Terminal recording of #%d</strong>'
        ' <button class="play" type=button>Play</button>'
        '<label>speed <select class="speed">%s</select></label><span class="status"></span></div>'
        '<pre class="screen"></pre></div><div><small>%s</small></div></td></tr>'
        % (
            _e(command.id),
            number,
            quote(record.id),
            quote(command.id),
            number,
            "".join(
                '<option value="%s"%s>%sx</option>' % (speed, " selected" if speed == "1" else "", speed)
                for speed in _SPEEDS
            ),
            _e(terminal.describe_recording(cast)),
        )
    )


def _when(key, value):
    if key in ("issued_at", "expires_at") and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(value))
    return value


def _coverage(record, snapshot):
    """
    Whether this session's events are covered by a signed checkpoint.
    """
    seqs = record.seqs
    if not seqs:
        return ""
    last = max(seqs)
    covering = next((event for event in snapshot.index.checkpoints if event["seq"] > last), None)
    if covering is None:
        return '<div class="pending" id="coverage">Events %d to %d of this session are not covered by a signed checkpoint yet.</div>' % (
            min(seqs), last)
    return (
        '<div class="verified" id="coverage">Events %d to %d of this session are covered by the checkpoint at seq %d, '
        "signed by key <code>%s</code> at %s.</div>" % (min(seqs), last, covering["seq"], _e(covering.get("key_id")), _e(covering.get("ts")))
    )


def query(**filters):
    return "/sessions?" + urlencode({key: value for key, value in filters.items() if value})


class ViewLog:
    """
    Where the replay server records its sign-ins and views: a store (the
    views chain of a file store, or the shared PostgreSQL chain), with its
    own run's start and stop.
    """

    def __init__(self, store):
        self.store = store

    def record(self, event):
        return self.store.append(event)
