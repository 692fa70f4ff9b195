"""
The C{hoopgw} command: check a configuration, verify and read the record,
and (for development) mint demo tokens.
"""

import argparse
import json
import sys

from hoopgw import config as configuration
from hoopgw.options import ConfigError, duration


def _check_config(arguments, out):
    try:
        config = configuration.load(arguments.file)
    except ConfigError as error:
        print("%s: %s" % (arguments.file, error), file=sys.stderr)
        return 1
    print("%s: OK" % (arguments.file,), file=out)
    for name, connection in sorted(config.connections.items()):
        chain = " -> ".join(spec.name for spec in connection.addons) or "(no addons)"
        print(
            "  %s: %s on %s -> %s; groups %s; chain %s"
            % (
                name,
                connection.protocol,
                connection.listen,
                connection.target_name,
                ", ".join(sorted(connection.allowed_groups)),
                chain,
            ),
            file=out,
        )
        if "record" not in [spec.name for spec in connection.addons]:
            print("    warning: %s records nothing (no record addon in its chain)" % (name,), file=out)
    for sink in config.gateway.export:
        from hoopgw.export.config import warnings
        from hoopgw.export.runner import describe_target

        print("  export %s: %s, %s -> %s" % (sink.name, sink.type, sink.format, describe_target(sink)), file=out)
        for warning in warnings(sink):
            print("    warning: %s" % (warning,), file=out)
    return 0


def _verify(arguments, out):
    if arguments.siem_file:
        from hoopgw.export.check import verify_siem

        return verify_siem(arguments.siem_file, arguments.key, out)
    if not arguments.store:
        print("hoopgw verify: give a store (or --siem-file FILE)", file=sys.stderr)
        return 2
    from hoopgw.replay import commands

    return commands.verify(arguments, out)


def _export_status(arguments, out):
    from hoopgw.export.check import export_status

    try:
        config = configuration.load(arguments.config)
    except ConfigError as error:
        print("%s: %s" % (arguments.config, error), file=sys.stderr)
        return 1
    return export_status(config, out, as_json=arguments.json)


def _evidence(name):
    """
    Run the evidence subcommand C{name} of L{hoopgw.replay.commands}.
    """

    def run(arguments, out):
        from hoopgw.replay import commands

        return getattr(commands, name)(arguments, out)

    return run


def _events(arguments, out):
    from hoopgw.store.sources import SourceError, open_source

    try:
        source = open_source(arguments.store)
    except SourceError as error:
        print(error, file=sys.stderr)
        return 2
    for where, raw, event in source.entries():
        if event is None:
            print("%s: not JSON" % (where,), file=out)
            continue
        if arguments.session and event.get("session") != arguments.session:
            continue
        if arguments.json:
            out.write(raw.decode("utf-8"))
            continue
        print(_describe(event), file=out)
    return 0


def _describe(event):
    kind = event.get("type", "?")
    head = "%6d %s %-16s" % (event.get("seq", 0), event.get("ts", ""), kind)
    who = event.get("subject") or ""
    if kind == "command":
        decision = event.get("decision", {}).get("verdict", "")
        return "%s %s %s [%s] %s" % (head, event.get("session", ""), who, decision, event.get("text", ""))
    if kind == "command.end":
        decision = (event.get("decision") or {}).get("verdict", "")
        outcome = event.get("outcome") or {}
        detail = outcome.get("tag") or outcome.get("error") or outcome.get("reason") or ""
        return "%s %s %s [%s] %s %s" % (head, event.get("session", ""), who, decision, outcome.get("status", ""), detail)
    if kind in ("session.start", "session.end", "session.refused"):
        extra = (event.get("refusal") or {}).get("reason") or event.get("reason") or ""
        return "%s %s %s from %s on %s %s" % (
            head,
            event.get("session", ""),
            who,
            event.get("client", ""),
            event.get("connection", ""),
            extra,
        )
    return "%s %s" % (head, json.dumps({k: v for k, v in event.items() if k not in ("seq", "ts", "prev", "hash", "type")}))


def _dev_keys(arguments, out):
    from hoopgw.identity import dev

    from hoopgw.store import signing

    key_path, jwks_path = dev.generate_key(arguments.directory, kid=arguments.kid)
    print("signing key (development only): %s\nJWKS: %s" % (key_path, jwks_path), file=out)
    record_key, record_public = signing.generate_key(arguments.directory)
    print(
        "record signing key (development only; gateway.signing_key): %s\npublic key for verify --key: %s"
        % (record_key, record_public),
        file=out,
    )
    return 0


def _token(arguments, out):
    from hoopgw.identity import dev

    with open(arguments.key, "rb") as handle:
        pem = handle.read()
    groups = [group for group in (arguments.groups or "").split(",") if group]
    try:
        lifetime = duration(arguments.lifetime, "--lifetime")
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    token = dev.mint(
        pem,
        subject=arguments.subject,
        issuer=arguments.issuer,
        audience=arguments.audience,
        groups=groups,
        lifetime=lifetime,
        kid=arguments.kid,
        kind=arguments.kind,
    )
    print(token, file=out)
    return 0


def _whoami(arguments, out):
    from twisted.internet import task

    from hoopgw.identity import whoami

    try:
        config = configuration.load(arguments.config)
    except ConfigError as error:
        print("%s: %s" % (arguments.config, error), file=sys.stderr)
        return 2
    token = arguments.token
    if arguments.token_file:
        with open(arguments.token_file, encoding="utf-8") as handle:
            token = handle.read().strip()
    certificate = None
    if arguments.certificate:
        with open(arguments.certificate, "rb") as handle:
            certificate = handle.read()
    if not token and certificate is None:
        print("give --token, --token-file or --certificate", file=sys.stderr)
        return 2
    status = []

    def run(reactor):
        d = whoami.evaluate(config, reactor, token=token, certificate=certificate, only=arguments.connection)

        def show(results):
            print(whoami.as_json(results) if arguments.json else whoami.describe(results), file=out)
            status.append(0 if any(entry["allowed"] for entry in results) else 1)

        return d.addCallback(show)

    try:
        task.react(run)
    except SystemExit as exit:
        if exit.code:
            return exit.code
    return status[0] if status else 1


def _explain(arguments, out):
    from hoopgw import explain

    return explain.run(arguments, out)


def _approvals(arguments, out):
    from hoopgw.approvals import client

    return client.run(arguments, out)


def parser():
    top = argparse.ArgumentParser(prog="hoopgw", description="The hoopgw access gateway's tools.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    check = commands.add_parser("check-config", help="check a configuration file and summarise it")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    verify = commands.add_parser(
        "verify", help="verify a record: its hash chain, signatures, sessions and recordings"
    )
    verify.add_argument("store", nargs="?", help="a store folder, an evidence bundle (.tar.gz) or a PostgreSQL store's DSN")
    verify.add_argument("--key", help="your copy of the record's public signing key (PEM)")
    verify.add_argument(
        "--siem-file", action="append", metavar="FILE",
        help="instead of a store: events a SIEM export delivered, one a line (native, OCSF, Splunk HEC or syslog; "
        "repeat for rotated files)",
    )
    verify.set_defaults(run=_verify)

    status = commands.add_parser("export-status", help="each SIEM export sink's cursor, lag and last error")
    status.add_argument("--config", required=True, help="the gateway's configuration file")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_export_status)

    from hoopgw.replay import commands as evidence

    sessions = commands.add_parser("sessions", help="list the sessions of a record")
    sessions_commands = sessions.add_subparsers(dest="sessions_command", metavar="list")
    sessions_commands.required = True
    listing = sessions_commands.add_parser("list", help="one line a session, with filters")
    evidence.add_store(listing)
    evidence.add_filters(listing)
    listing.set_defaults(run=_evidence("sessions_list"))

    replay = commands.add_parser("replay", help="a session's timeline, and its terminal recordings played back")
    evidence.add_store(replay)
    replay.add_argument("session", help="the session id (see 'hoopgw sessions list')")
    replay.add_argument("--speed", type=float, default=1.0, help="play the recordings this many times faster")
    replay.add_argument("--command", help="play only this command's recording (its # in the timeline, or its id)")
    replay.set_defaults(run=_evidence("replay"))

    export = commands.add_parser("export", help="write a self-contained, verifiable evidence bundle")
    evidence.add_store(export)
    export.add_argument("--since", help="from this UTC date/time (2026-01-31, 2026-01-31T12:00:00Z) or age (90d)")
    export.add_argument("--until", help="to this UTC date/time or age (default: now)")
    export.add_argument("-o", "--output", required=True, help="the bundle to write (evidence.tar.gz)")
    export.set_defaults(run=_evidence("export"))

    events = commands.add_parser("events", help="print a record's events")
    events.add_argument("store", help="a store folder, an evidence bundle or a PostgreSQL store's DSN")
    events.add_argument("--session", help="only this session's events")
    events.add_argument("--json", action="store_true", help="print the raw JSON lines")
    events.set_defaults(run=_events)

    explain = commands.add_parser(
        "explain", help="say what each addon of a connection would decide about SQL, a command line or an API request, and why"
    )
    explain.add_argument("--config", required=True, help="the configuration file")
    explain.add_argument("--connection", required=True, help="the connection's name")
    explain.add_argument("--subject", default="explain", help="the identity to explain for")
    explain.add_argument("--groups", help="its groups, comma-separated (default: the connection's allowed groups)")
    explain.add_argument("--kind", choices=("service", "human"), default="service")
    explain.add_argument(
        "sql", help="the SQL (one statement or several), the SSH command line, or the Kubernetes request (METHOD /path)"
    )
    explain.set_defaults(run=_explain)

    from hoopgw.approvals import client as approvals_client

    approvals = commands.add_parser("approvals", help="list, show, approve and deny approval requests; manage grants")
    approvals_client.add_arguments(approvals)
    approvals.set_defaults(run=_approvals)

    keys = commands.add_parser("dev-keys", help="DEVELOPMENT ONLY: make a demo issuer key and its JWKS")
    keys.add_argument("directory")
    keys.add_argument("--kid", default="demo-1")
    keys.set_defaults(run=_dev_keys)

    token = commands.add_parser("token", help="DEVELOPMENT ONLY: mint a token with a demo issuer key")
    token.add_argument("--key", required=True, help="the demo issuer's private key (PEM)")
    token.add_argument("--kid", default="demo-1")
    token.add_argument("--issuer", required=True)
    token.add_argument("--audience", required=True)
    token.add_argument("--subject", required=True)
    token.add_argument("--groups", help="comma-separated groups")
    token.add_argument("--kind", choices=("service", "human"))
    token.add_argument("--lifetime", default="15m")
    token.set_defaults(run=_token)

    who = commands.add_parser(
        "whoami", help="show the identity and groups the gateway would derive from a token or certificate"
    )
    who.add_argument("--config", required=True, help="the gateway's configuration file")
    who.add_argument("--token", help="an OIDC token or base64 SAML assertion")
    who.add_argument("--token-file", help="a file holding the token (keeps it out of the process list)")
    who.add_argument("--certificate", help="a client certificate, PEM")
    who.add_argument("--connection", help="only this connection")
    who.add_argument("--json", action="store_true", help="print JSON")
    who.set_defaults(run=_whoami)
    return top


def main(argv=None, out=None):
    arguments = parser().parse_args(argv)
    return arguments.run(arguments, out or sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
