"""
C{hoopgw admin}: the operators' command line, a client of the admin
listener's C{/api/admin} API, signed in with the operator's own token
(the record names whoever acts).

    hoopgw admin connections
    hoopgw admin sessions [--connection payments]
    hoopgw admin end s-... --reason "runaway report"
    hoopgw admin pause payments --wait 60s --reason "failover"
    hoopgw admin resume payments --reason "failover done"
    hoopgw admin addon payments mask off --reason "CHG-12"
    hoopgw admin addon payments mask on [--options '{"columns": ...}'] [--position 1] --reason "CHG-12"
    hoopgw admin options payments block --options-file block.yaml --reason "CHG-13"
    hoopgw admin reload --reason "CHG-14"

The admin URL comes from --url or HOOPGW_ADMIN_URL, the token from
--token-file or HOOPGW_TOKEN, as for C{hoopgw approvals}.
"""

import json
import os
import time
from urllib.parse import quote

import yaml

from hoopgw.approvals.client import ClientError, call, run_command


def add_arguments(parser):
    parser.add_argument("--url", default=os.environ.get("HOOPGW_ADMIN_URL"), help="the admin listener (HOOPGW_ADMIN_URL)")
    parser.add_argument("--token-file", help="a file holding your identity token (else HOOPGW_TOKEN)")
    parser.add_argument("--cacert", help="a CA certificate to check the admin listener's certificate with")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    actions.add_parser("connections", help="the connections: protocol, target, chain, live sessions, pause")
    sessions = actions.add_parser("sessions", help="live sessions: who, since when, commands, bytes")
    sessions.add_argument("--connection", help="only this connection's sessions")
    end = actions.add_parser("end", help="end a live session (its client is disconnected)")
    end.add_argument("session", help="the session id (s-...), from hoopgw admin sessions")
    pause = actions.add_parser("pause", help="hold a connection's new sessions (open ones go on)")
    pause.add_argument("connection", help="the connection's name")
    pause.add_argument("--wait", default="30s", help="how long a new session waits before it is refused (0s to 300s; default 30s)")
    resume = actions.add_parser("resume", help="let a paused connection's waiting and new sessions in")
    resume.add_argument("connection", help="the connection's name")
    addon = actions.add_parser("addon", help="turn an addon on or off for one connection")
    addon.add_argument("connection", help="the connection's name")
    addon.add_argument("addon", help="the addon's name (identity, block, approve, mask, record, or a plugin's)")
    addon.add_argument("state", choices=("on", "off"), help="on or off")
    addon.add_argument("--options", help="for on: the addon's options as JSON (default: those it had)")
    addon.add_argument("--options-file", help="for on: the addon's options in a YAML or JSON file")
    addon.add_argument("--position", type=int, help="for on: its place in the chain, 0 first (default: where it was, else before record)")
    options = actions.add_parser("options", help="replace an addon's options for one connection")
    options.add_argument("connection", help="the connection's name")
    options.add_argument("addon", help="the addon's name")
    options.add_argument("--options", help="the options as JSON")
    options.add_argument("--options-file", help="the options in a YAML or JSON file")
    actions.add_parser("reload", help="read the configuration file again (as SIGHUP does), as you")
    for action in (end, pause, resume, addon, options, actions.choices["reload"]):
        action.add_argument("--reason", required=True, help="why (recorded with your action)")


def _options(arguments):
    if getattr(arguments, "options_file", None):
        try:
            with open(arguments.options_file, encoding="utf-8") as handle:
                return yaml.safe_load(handle)
        except (OSError, yaml.YAMLError) as error:
            raise ClientError("cannot read the options file %s: %s" % (arguments.options_file, error))
    if getattr(arguments, "options", None):
        try:
            return json.loads(arguments.options)
        except ValueError as error:
            raise ClientError("--options is not JSON: %s" % (error,))
    return None


def _action(arguments, token):
    def api(method, path, body=None):
        return call(arguments.url, token, method, "/api/admin" + path, body, arguments.cacert)

    action = arguments.action
    if action == "connections":
        return api("GET", "/connections")
    if action == "sessions":
        answer = api("GET", "/sessions")
        if arguments.connection:
            answer["sessions"] = [item for item in answer["sessions"] if item["connection"] == arguments.connection]
        return answer
    if action == "end":
        return api("POST", "/sessions/%s/end" % (quote(arguments.session),), {"reason": arguments.reason})
    if action == "pause":
        return api("POST", "/connections/%s/pause" % (quote(arguments.connection),), {"reason": arguments.reason, "wait": arguments.wait})
    if action == "resume":
        return api("POST", "/connections/%s/resume" % (quote(arguments.connection),), {"reason": arguments.reason})
    if action in ("addon", "options"):
        body = {"reason": arguments.reason}
        options = _options(arguments)
        if options is not None:
            body["options"] = options
        if action == "options":
            if options is None:
                raise ClientError("give the options with --options or --options-file")
            change = "options"
        else:
            change = "enable" if arguments.state == "on" else "disable"
            if arguments.position is not None:
                body["position"] = arguments.position
        return api("POST", "/connections/%s/addons/%s/%s" % (quote(arguments.connection), quote(arguments.addon), change), body)
    if action == "reload":
        return api("POST", "/reload", {"reason": arguments.reason})
    raise ClientError("unknown action %s" % (action,))


def run(arguments, out):
    return run_command("hoopgw admin", arguments, out, _action, _print)


def _when(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _connection_line(item):
    chain = " > ".join(step["name"] for step in item["chain"])
    line = "%-14s %-10s -> %-28s sessions %-3d chain %s" % (item["name"], item["protocol"], item["target"], item["sessions"], chain)
    if item["disabled"]:
        line += " (off: %s)" % (", ".join(item["disabled"]),)
    if item["paused"]:
        line += " [paused by %s since %s]" % (item["paused"]["by"]["subject"], _when(item["paused"]["since"]))
    return line


def _print(action, answer, out):
    if action == "connections":
        for item in answer["connections"]:
            print(_connection_line(item), file=out)
    elif action == "sessions":
        if not answer["sessions"]:
            print("no live sessions", file=out)
        for item in answer["sessions"]:
            print(
                "%s  %-12s %-16s since %s  %d commands  %s bytes in, %s out  from %s"
                % (
                    item["id"],
                    item["connection"],
                    item["subject"],
                    _when(item["started"]),
                    item["commands"],
                    "-" if item["bytes_from_client"] is None else item["bytes_from_client"],
                    "-" if item["bytes_to_client"] is None else item["bytes_to_client"],
                    item["client"],
                ),
                file=out,
            )
    elif action == "end":
        print("ended %s" % (answer["session"],), file=out)
    elif action == "reload":
        changed = answer["changed"]
        print("reloaded; chains changed: %s" % (", ".join(changed) if changed else "none",), file=out)
    else:
        print(_connection_line(answer), file=out)
