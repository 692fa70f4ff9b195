"""
One Kubernetes request in flight: what the front end knows of it, the
C{Status} it is refused or withheld with, and its end in the record (the
command's outcome and its Kubernetes audit event).
"""

import json
import time

from mitmproxy import http

from hoopgw import redact
from hoopgw.chain import settled
from hoopgw.kubernetes import bodies
from hoopgw.model import DENIED, ERROR, OK, WITHHELD

# Where a flow keeps its L{Exchange}.
KEY = "hoopgw"
JSON = "application/json"


async def wait(value, loop):
    """
    The result of C{value}, waiting on the asyncio loop if it is a
    L{Deferred} that has not fired.
    """
    done, result = settled(value)
    if done:
        return result
    return await result.asFuture(loop)


def address(peername):
    """
    A client's address as the record writes it (C{host:port}).
    """
    if not peername:
        return "unknown"
    return "%s:%s" % (peername[0], peername[1])


def status_response(code, message, details=None, close=False):
    """
    An HTTP response carrying a Kubernetes C{Status} (what kubectl prints
    as C{Error from server}), closing the connection after it if C{close}.
    """
    headers = {"content-type": JSON}
    if close:
        headers["connection"] = "close"
    return http.Response.make(code, bodies.status(code, message, details=details), headers)


def warning_header(text):
    """
    A C{Warning} header kubectl prints (C{Warning: text}): what the chain
    told the client while its request waited (an approval, say).
    """
    return '299 - "%s"' % (text.replace("\\", "\\\\").replace('"', "'").replace("\n", " "),)


class Exchange:
    """
    What the front end knows about one request while it is in flight.
    """

    __slots__ = (
        "received", "session", "command", "info", "refused", "streamed", "finished",
        "warnings", "subprotocol", "cast", "exit", "broken", "impersonated", "client", "released",
    )

    def __init__(self, received):
        self.received = received
        self.session = None
        self.command = None
        self.info = None
        self.refused = False
        self.streamed = False
        self.finished = False
        self.warnings = []
        self.subprotocol = None
        self.cast = None
        self.exit = None
        self.broken = None
        self.impersonated = None
        self.client = None
        self.released = False

    def add_warnings(self, headers):
        """
        Tell the client, in C{headers}, what the chain told it while its
        request waited.
        """
        for warning in self.warnings:
            headers.add("warning", warning_header(warning))

    def refuse(self, flow, code, message, info=None):
        """
        Answer the request with a C{Status} instead of passing it on (a
        Forbidden one naming the object, as the API server's do).
        """
        self.refused = True
        details = bodies.denial_details(info) if info is not None and code == 403 else None
        flow.response = status_response(code, message, details=details)
        self.add_warnings(flow.response.headers)

    def withhold(self, flow, code, reason, what="response"):
        """
        Replace what the API server answered by a C{Status} saying why the
        gateway withheld it.
        """
        self.broken = reason
        flow.response = status_response(code, "hoopgw withheld the %s because %s" % (what, reason))

    def finish(self, chain, flow, error=None):
        """
        The request is over (answered, refused, or failed with C{error}):
        its outcome and audit event go to the chain, once.
        """
        if self.finished or self.command is None:
            return
        self.finished = True
        command = self.command
        response = flow.response
        code = response.status_code if response is not None else 502
        failure = None
        if code >= 400 and response is not None and len(response.raw_content or b"") < 65536:
            failure = _status_of(response)
        outcome = command.outcome
        if command.decision is not None and command.decision.denied:
            outcome["status"] = DENIED
        elif self.broken:
            outcome.update(status=WITHHELD, reason=self.broken)
        elif error is not None and self.streamed and response is not None:
            # A watch or a followed log ends when the client closes it.
            outcome.update(status=OK, ended=redact.redact_text(error)[0])
        elif error is not None:
            outcome.update(status=ERROR, error=redact.redact_text(error)[0])
        else:
            outcome["status"] = OK if code < 400 else "error"
        outcome["code"] = code
        if self.exit is not None:
            outcome["exit"] = self.exit
        request = flow.request
        outcome["audit"] = bodies.audit_event(
            self.session,
            command,
            self.info,
            command.redacted.partition(" ")[2],
            code,
            "ResponseComplete" if response is not None else "Panic",
            self.received,
            time.time(),
            address(flow.client_conn.peername).rpartition(":")[0],
            request.headers.get("user-agent", ""),
            impersonated=self.impersonated,
            failure=failure,
        )
        chain.finish(self.session, command)
        if self.client is not None:
            # Last: the client's sessions may be waiting for this to end.
            self.client.finished(self)


def _status_of(response):
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return None
    if not isinstance(body, dict) or body.get("kind") != "Status":
        return None
    # The API server's words are as untrusted as any: text, bounded, and
    # redacted before the record holds them.
    return {field: redact.redact_text(_text(body.get(field, ""))[:4096])[0] for field in ("reason", "message")}


def _text(value):
    return value if isinstance(value, str) else json.dumps(value, default=str)
