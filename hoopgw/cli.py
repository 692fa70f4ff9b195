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
    from hoopgw.options import ConfigErrors, MissingFile, flatten, report

    skipped = []
    try:
        if arguments.skip_files:
            config, skipped = configuration.load_skipping_files(arguments.file)
        else:
            config = configuration.load(arguments.file)
    except ConfigError as error:
        problems = flatten([error])
        others = [problem for problem in problems if not (arguments.skip_files and isinstance(problem, MissingFile))]
        if others:
            error = others[0] if len(others) == 1 else ConfigErrors(others)
            print(report(arguments.file, error), file=sys.stderr)
            return 1
        # Only sections that read a missing file while parsing: nothing
        # else is wrong, but there is no summary to give.
        config = None
        skipped = skipped or problems
    if skipped:
        # A file written for another host (/etc/hoopgw/...): everything but
        # the files and secrets this machine lacks was checked.
        print("%s: OK apart from %d file(s) and secret(s) this machine does not have:" % (arguments.file, len(skipped)),
              file=out)
        for problem in skipped:
            print("  skipped %s" % (problem,), file=out)
    else:
        print("%s: OK" % (arguments.file,), file=out)
    if config is None:
        return 0
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
    from hoopgw.store.sources import open_source
    from hoopgw.store.errors import SourceError

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
        decision = event.get("decision") or {}
        outcome = event.get("outcome") or {}
        detail = outcome.get("tag") or outcome.get("error") or outcome.get("reason") or ""
        if decision.get("verdict") == "deny":
            # A denied statement has no command event of its own: say what and why here.
            detail = "%s (%s)" % (event.get("text", ""), decision.get("rule", ""))
        return "%s %s %s [%s] %s %s" % (
            head, event.get("session", ""), who, decision.get("verdict", ""), outcome.get("status", ""), _clip(detail)
        )
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
    if kind.startswith("approval."):
        approver = (event.get("approver") or {}).get("subject")
        outcome = event.get("outcome") or {}
        detail = " ".join(
            part
            for part in (
                event.get("approval", ""),
                "rule %s" % (event["rule"],) if event.get("rule") else "",
                "by %s" % (approver,) if approver else "",
                event.get("verdict", ""),
                event.get("reason") or outcome.get("reason") or event.get("text") or "",
            )
            if part
        )
        return "%s %s %s %s" % (head, event.get("session", ""), who, _clip(detail))
    # Anything else: its fields, compact and cut short (--json has them whole).
    fields = {k: v for k, v in event.items() if k not in ("seq", "ts", "prev", "hash", "type")}
    return "%s %s" % (head, _clip(json.dumps(fields, separators=(",", ":"))))


def _clip(text, width=120):
    return text if len(text) <= width else text[: width - 1] + "\u2026"


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


def _discover(arguments, out):
    from hoopgw import discover

    return discover.run(arguments, out)


def _approvals(arguments, out):
    from hoopgw.approvals import client

    return client.run(arguments, out)


def _store_init(arguments, out):
    import psycopg2

    from hoopgw.approvals.shared import schema_sql as approvals_sql
    from hoopgw.store.postgres import least_privilege_sql

    try:
        sql = least_privilege_sql(
            arguments.schema, arguments.gateway_role, arguments.auditor_role or (), (approvals_sql(arguments.schema),)
        )
    except ValueError as error:
        print("hoopgw store-init: %s" % (error,), file=sys.stderr)
        return 2
    if arguments.print_sql:
        print(sql, file=out)
        return 0
    try:
        connection = psycopg2.connect(arguments.dsn)
    except psycopg2.Error as error:
        print("hoopgw store-init: cannot connect (%s): %s" % (arguments.dsn, str(error).strip()), file=sys.stderr)
        return 1
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute(sql)
    except psycopg2.Error as error:
        print("hoopgw store-init: %s" % (str(error).strip(),), file=sys.stderr)
        return 1
    finally:
        connection.close()
    auditors = ", ".join(arguments.auditor_role or ()) or "none"
    print(
        "the store's schema %s is ready: the gateway role %s may write the record, auditor roles (%s) may read it"
        % (arguments.schema, arguments.gateway_role, auditors),
        file=out,
    )
    return 0


def parser():
    from hoopgw import __version__

    top = argparse.ArgumentParser(prog="hoopgw", description="The hoopgw access gateway's tools.")
    top.add_argument("--version", action="version", version="hoopgw %s" % (__version__,), help="print the version and exit")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    check = commands.add_parser("check-config", help="check a configuration file and summarise it")
    check.add_argument("file", help="the gateway's YAML configuration file")
    check.add_argument(
        "--skip-files",
        action="store_true",
        help="check a file written for another host: report the files, secret files and environment variables "
        "this machine lacks as skipped, and check everything else",
    )
    check.set_defaults(run=_check_config)

    verify = commands.add_parser(
        "verify", help="verify a record: its hash chain, signatures, sessions and recordings"
    )
    verify.add_argument("store", nargs="?", help="a store folder, an evidence bundle (.tar.gz) or a PostgreSQL store's DSN")
    verify.add_argument("--key", help="your copy of the record's public signing key (PEM)")
    verify.add_argument(
        "--expect-head",
        metavar="SEQ:HASH",
        help="a head an earlier verify printed (after 'head'): fail if the record no longer holds it",
    )
    verify.add_argument(
        "--witness",
        metavar="FILE",
        help="the witness file the gateway published its signed checkpoints to (gateway.witness): "
        "fail if the record no longer holds any of them",
    )
    verify.add_argument(
        "--siem-file", action="append", metavar="FILE",
        help="instead of a store: events a SIEM export delivered, one a line (native, OCSF, Splunk HEC or syslog; "
        "repeat for rotated files)",
    )
    verify.set_defaults(run=_verify)

    init = commands.add_parser(
        "store-init",
        help="create a PostgreSQL store's schema as the role that will own it, and grant a gateway role and "
        "auditor roles what they need",
    )
    init.add_argument(
        "dsn", help="a connection string for the owning role (its password from PGPASSWORD or ~/.pgpass)"
    )
    init.add_argument("--schema", default="hoopgw", help="the store's schema (gateway.store.postgres.schema)")
    init.add_argument("--gateway-role", required=True, help="the role the gateways connect as: SELECT and INSERT")
    init.add_argument(
        "--auditor-role", action="append", help="a role that may only read the record (verify, events); repeatable"
    )
    init.add_argument("--print", dest="print_sql", action="store_true", help="print the SQL instead of running it")
    init.set_defaults(run=_store_init)

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
    explain.add_argument(
        "--skip-files",
        action="store_true",
        help="explain with a file written for another host, whose files and secrets this machine lacks",
    )
    explain.add_argument("--subject", default="explain", help="the identity to explain for")
    explain.add_argument("--groups", help="its groups, comma-separated (default: the connection's allowed groups)")
    explain.add_argument(
        "--kind", choices=("service", "human"), default="service", help="whether the identity is a service or a human"
    )
    explain.add_argument(
        "request",
        metavar="COMMAND",
        help="what the client would send: SQL (one statement or several), an SSH command line, or a Kubernetes "
        "request (METHOD /path)",
    )
    explain.set_defaults(run=_explain)

    discover = commands.add_parser(
        "discover", help="find a PostgreSQL target's card data and propose the mask addon's sensitive_columns"
    )
    discover.add_argument("--config", required=True, help="the configuration file")
    discover.add_argument("--rows", type=int, default=1000, help="rows sampled per table, 1 to 100000 (default 1000)")
    discover.add_argument("--write", metavar="FILE", help="write the proposal to FILE (for sensitive_columns_file)")
    discover.add_argument("connection", help="the connection's name")
    discover.set_defaults(run=_discover)

    from hoopgw.approvals import client as approvals_client

    approvals = commands.add_parser("approvals", help="list, show, approve and deny approval requests; manage grants")
    approvals_client.add_arguments(approvals)
    approvals.set_defaults(run=_approvals)

    from hoopgw import adminclient

    admin = commands.add_parser(
        "admin", help="operate a running gateway: connections, live sessions, pause/resume, addons, reload"
    )
    adminclient.add_arguments(admin)
    admin.set_defaults(run=lambda arguments, out: adminclient.run(arguments, out))

    keys = commands.add_parser("dev-keys", help="DEVELOPMENT ONLY: make a demo issuer key and its JWKS")
    keys.add_argument("directory", help="the folder to write the keys and the JWKS into")
    keys.add_argument("--kid", default="demo-1", help="the key id in the JWKS and in tokens' headers (default demo-1)")
    keys.set_defaults(run=_dev_keys)

    token = commands.add_parser("token", help="DEVELOPMENT ONLY: mint a token with a demo issuer key")
    token.add_argument("--key", required=True, help="the demo issuer's private key (PEM)")
    token.add_argument("--kid", default="demo-1", help="the key id to put in the token's header (default demo-1)")
    token.add_argument("--issuer", required=True, help="the iss claim: the identity provider's issuer")
    token.add_argument("--audience", required=True, help="the aud claim: the provider's audience")
    token.add_argument("--subject", required=True, help="the sub claim: who the token is for")
    token.add_argument("--groups", help="comma-separated groups")
    token.add_argument("--kind", choices=("service", "human"), help="a kind claim (for a provider with kind_claim: kind)")
    token.add_argument("--lifetime", default="15m", help="how long the token is valid (default 15m)")
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
