"""
Approval notifications: a JSON POST (or a Slack-compatible message) to a
webhook, retried with growing pauses until it is accepted or the attempts
run out.  The outcome of every delivery goes into the record.
"""

import hashlib
import hmac
import json

from twisted.internet import defer, task
from twisted.logger import Logger

from hoopgw import options as o


JSON = "json"
SLACK = "slack"

OPTIONS = (
    o.Option("url", o.string, o.REQUIRED, "Where to POST: an http or https URL."),
    o.Option("format", o.choice(JSON, SLACK), JSON, "json (the request as a JSON object) or slack ({text: ...})."),
    o.Option("attempts", o.integer(minimum=1, maximum=20), 5, "How many times to try before giving up."),
    o.Option("backoff", o.duration, 1.0, "The pause before the second attempt; doubled after each failure."),
    o.Option("timeout", o.duration, 10.0, "How long one attempt may take."),
    o.Option(
        "secret",
        o.secret,
        None,
        "A shared secret ({file: PATH} or {env: NAME}); each POST then carries X-Hoopgw-Signature: "
        "sha256=<HMAC of the body>, for the receiver to check.",
    ),
)


def parse(value, path):
    values = o.parse_options(OPTIONS, value, path)
    if not values["url"].startswith(("http://", "https://")):
        raise o.ConfigError(o.join(path, "url"), "expected an http:// or https:// URL")
    return Webhook(**values)


class Webhook:
    """
    One webhook receiver.
    """

    log = Logger()

    def __init__(self, url, format=JSON, attempts=5, backoff=1.0, timeout=10.0, secret=None, reactor=None):
        self.url = url
        self.format = format
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.secret = secret
        self.reactor = reactor
        self.closed = False

    def _pool(self, reactor):
        # Notifications are rare: no connection is kept open between them.
        from twisted.web.client import HTTPConnectionPool

        return HTTPConnectionPool(reactor, persistent=False)

    @property
    def name(self):
        return self.url.split("?", 1)[0]

    def body(self, payload):
        if self.format == SLACK:
            payload = {"text": slack_text(payload)}
        return json.dumps(payload, sort_keys=True).encode("utf-8")

    @defer.inlineCallbacks
    def send(self, payload):
        """
        POST C{payload}.

        @return: a L{Deferred} that never fails, firing with what happened:
            C{{"delivered": bool, "attempts": n, "status": code or None,
            "error": text}}.
        """
        import treq

        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        body = self.body(payload)
        headers = {b"Content-Type": [b"application/json"], b"User-Agent": [b"hoopgw"]}
        if self.secret is not None:
            signature = hmac.new(self.secret.read_bytes(), body, hashlib.sha256).hexdigest()
            headers[b"X-Hoopgw-Signature"] = [("sha256=" + signature).encode("ascii")]
        pause = self.backoff
        outcome = {"delivered": False, "attempts": 0, "status": None}
        for attempt in range(1, self.attempts + 1):
            outcome["attempts"] = attempt
            try:
                response = yield treq.post(
                    self.url, data=body, headers=headers, timeout=self.timeout, reactor=reactor, pool=self._pool(reactor)
                )
                outcome["status"] = response.code
                yield response.content()
                if 200 <= response.code < 300:
                    outcome["delivered"] = True
                    outcome.pop("error", None)
                    return outcome
                outcome["error"] = "HTTP %d" % (response.code,)
                if 400 <= response.code < 500 and response.code not in (408, 429):
                    # The receiver refuses this request: trying again will not help.
                    break
            except Exception as error:
                if self.closed:
                    # The gateway is stopping (a cancelled request fails in
                    # several ways): no more attempts.
                    raise defer.CancelledError()
                outcome["error"] = "%s: %s" % (type(error).__name__, error)
            if attempt < self.attempts:
                if self.closed:
                    raise defer.CancelledError()
                yield task.deferLater(reactor, pause, lambda: None)
                pause *= 2
        self.log.warn(
            "The approval webhook {url} was not delivered after {attempts} attempts: {error}",
            url=self.name,
            attempts=outcome["attempts"],
            error=outcome.get("error"),
        )
        return outcome


def slack_text(payload):
    """
    A Slack message for an approval event.
    """
    kind = payload.get("type", "")
    requester = (payload.get("requester") or {}).get("subject", "?")
    if kind == "approval.request":
        lines = [
            ":lock: *%s* asks to run a statement on *%s* (rule `%s`, %d approval%s from %s):"
            % (
                requester,
                payload.get("connection"),
                payload.get("rule"),
                payload.get("approvals_required", 1),
                "" if payload.get("approvals_required", 1) == 1 else "s",
                ", ".join(payload.get("approver_groups", [])),
            ),
            "```%s```" % (payload.get("statement", ""),),
            "Request `%s`, digest `%s`. Approve with `%s`" % (payload.get("id"), payload.get("digest", "")[:16], payload.get("cli")),
        ]
        return "\n".join(lines)
    return "Request `%s` by *%s* on *%s*: %s" % (
        payload.get("id"),
        requester,
        payload.get("connection"),
        kind.split(".", 1)[-1],
    )
