"""
C{hoopgw approvals}: the approvers' command line, a client of the admin
listener's HTTP API, signed in with the approver's own token.

    hoopgw approvals list
    hoopgw approvals show apr-...
    hoopgw approvals approve apr-... --reason "ticket CHG-42"
    hoopgw approvals deny apr-... --reason "not during the freeze"
    hoopgw approvals grant --connection payments --rule nightly-batch --subject batch-bot --for 8h --reason "..."
    hoopgw approvals grants
    hoopgw approvals revoke grant-... --reason "..."

The admin URL comes from --url or HOOPGW_ADMIN_URL, the token from
--token-file or HOOPGW_TOKEN.
"""

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request


class ClientError(Exception):
    """
    The call failed; C{str()} says why, for the approver.
    """


def add_arguments(parser):
    parser.add_argument("--url", default=os.environ.get("HOOPGW_ADMIN_URL"), help="the admin listener (HOOPGW_ADMIN_URL)")
    parser.add_argument("--token-file", help="a file holding your identity token (else HOOPGW_TOKEN)")
    parser.add_argument("--cacert", help="a CA certificate to check the admin listener's certificate with")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="requests waiting for approval")
    listing.add_argument("--status", default="pending", help="pending (default), approved, denied, expired, cancelled or all")
    show = actions.add_parser("show", help="one request in full")
    show.add_argument("id", help="the request's id (apr-...; see 'hoopgw approvals list')")
    approve = actions.add_parser("approve", help="approve a request")
    approve.add_argument("id", help="the request's id (apr-...)")
    approve.add_argument("--reason", required=True, help="why (recorded with your approval)")
    approve.add_argument("--digest", help="the statement digest you checked (refused if it is not the request's)")
    deny = actions.add_parser("deny", help="deny a request")
    deny.add_argument("id", help="the request's id (apr-...)")
    deny.add_argument("--reason", required=True, help="why (recorded and shown to the requester)")
    grant = actions.add_parser("grant", help="pre-approve an identity for a rule for a time window")
    grant.add_argument("--connection", required=True, help="the connection the grant is for")
    grant.add_argument("--rule", required=True, help="the approve rule the grant pre-approves (its max_grant caps --for)")
    grant.add_argument("--subject", required=True, help="the identity pre-approved")
    grant.add_argument("--for", dest="duration", required=True, help="how long, e.g. 8h")
    grant.add_argument("--reason", required=True, help="why (recorded with the grant)")
    grants = actions.add_parser("grants", help="active grants")
    grants.add_argument("--all", action="store_true", help="include expired and revoked ones")
    revoke = actions.add_parser("revoke", help="end a grant now")
    revoke.add_argument("id", help="the grant's id (grant-...; see 'hoopgw approvals grants')")
    revoke.add_argument("--reason", required=True, help="why (recorded with the revocation)")


def call(url, token, method, path, body=None, cacert=None, timeout=30):
    """
    One API call.  @return: the decoded JSON answer.
    @raise ClientError: with the API's error sentence.
    """
    data = json.dumps(body).encode("utf-8") if body is not None else None
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    context = ssl.create_default_context(cafile=cacert) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read()).get("error")
        except ValueError:
            message = None
        raise ClientError("%s (HTTP %d)" % (message or error.reason, error.code))
    except urllib.error.URLError as error:
        raise ClientError("cannot reach the admin listener at %s: %s" % (url, error.reason))


def _token(arguments):
    if arguments.token_file:
        try:
            with open(arguments.token_file, encoding="utf-8") as handle:
                return handle.read().strip()
        except OSError as error:
            raise ClientError("cannot read the token file %s: %s" % (arguments.token_file, error.strerror))
    token = os.environ.get("HOOPGW_TOKEN")
    if not token:
        raise ClientError("no token: give --token-file or set HOOPGW_TOKEN to your identity token")
    return token


def run(arguments, out):
    return run_command("hoopgw approvals", arguments, out, _action, _print)


def run_command(name, arguments, out, action, show):
    """
    Run a command of the admin listener's API: C{action(arguments, token)}
    asks, C{show(action name, answer, out)} prints the answer (or
    C{--json} prints it as it came).

    @return: the exit status.
    """
    if not arguments.url:
        print("%s: give the admin listener's URL with --url or HOOPGW_ADMIN_URL" % (name,), file=sys.stderr)
        return 2
    try:
        answer = action(arguments, _token(arguments))
    except ClientError as error:
        print("%s: %s" % (name, error), file=sys.stderr)
        return 1
    if arguments.json:
        print(json.dumps(answer, indent=2, sort_keys=True), file=out)
    else:
        show(arguments.action, answer, out)
    return 0


def _action(arguments, token):
    def api(method, path, body=None):
        return call(arguments.url, token, method, path, body, arguments.cacert)

    action = arguments.action
    if action == "list":
        return api("GET", "/api/approvals?status=%s" % (arguments.status,))
    if action == "show":
        return api("GET", "/api/approvals/%s" % (arguments.id,))
    if action == "approve":
        body = {"reason": arguments.reason}
        if arguments.digest:
            body["digest"] = arguments.digest
        return api("POST", "/api/approvals/%s/approve" % (arguments.id,), body)
    if action == "deny":
        return api("POST", "/api/approvals/%s/deny" % (arguments.id,), {"reason": arguments.reason})
    if action == "grant":
        return api(
            "POST",
            "/api/grants",
            {
                "connection": arguments.connection,
                "rule": arguments.rule,
                "subject": arguments.subject,
                "duration": arguments.duration,
                "reason": arguments.reason,
            },
        )
    if action == "grants":
        return api("GET", "/api/grants%s" % ("?all=1" if arguments.all else "",))
    if action == "revoke":
        return api("POST", "/api/grants/%s/revoke" % (arguments.id,), {"reason": arguments.reason})
    raise ClientError("unknown action %s" % (action,))


def _when(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _print(action, answer, out):
    if action == "list":
        items = answer.get("approvals", [])
        if not items:
            print("no requests", file=out)
        for item in items:
            print(
                "%s  %-9s %-12s %-14s by %-16s %d/%d  %s"
                % (
                    item["id"],
                    item["status"],
                    item["connection"],
                    item["rule"],
                    item["requester"]["subject"],
                    len([v for v in item["approvals"] if v["verdict"] == "approve"]),
                    item["approvals_required"],
                    item["statement"],
                ),
                file=out,
            )
        return
    if action in ("show", "approve", "deny"):
        item = answer
        print("request    %s (%s)" % (item["id"], item["status"]), file=out)
        print("connection %s, rule %s" % (item["connection"], item["rule"]), file=out)
        print("requester  %s (%s, %s)" % (item["requester"]["subject"], item["requester"]["kind"], item["requester"]["issuer"]), file=out)
        print("statement  %s" % (item["statement"],), file=out)
        if item.get("parameters"):
            print("parameters %s" % (", ".join(map(str, item["parameters"])),), file=out)
        print("digest     %s" % (item["digest"],), file=out)
        print("needs      %d approval(s) from %s" % (item["approvals_required"], ", ".join(item["approver_groups"])), file=out)
        print("expires    %s" % (_when(item["expires"]),), file=out)
        for vote in item["approvals"]:
            print("  %s %s at %s: %s" % (vote["subject"], vote["verdict"], _when(vote["at"]), vote["reason"]), file=out)
        return
    if action == "grants":
        items = answer.get("grants", [])
        if not items:
            print("no grants", file=out)
        for grant in items:
            print(
                "%s  %s may run rule %s on %s until %s (granted by %s, used %d times)%s"
                % (
                    grant["id"],
                    grant["subject"],
                    grant["rule"],
                    grant["connection"],
                    _when(grant["expires"]),
                    grant["granted_by"]["subject"],
                    grant["uses"],
                    " [revoked]" if grant.get("revoked") else "",
                ),
                file=out,
            )
        return
    if action in ("grant", "revoke"):
        print(
            "%s %s: %s may run rule %s on %s until %s"
            % (
                "revoked" if action == "revoke" else "granted",
                answer["id"],
                answer["subject"],
                answer["rule"],
                answer["connection"],
                _when(answer["expires"]),
            ),
            file=out,
        )
