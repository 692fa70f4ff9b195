"""
The evidence subcommands of C{hoopgw}: verify, sessions list, replay and
export, over a store folder, an evidence bundle or a PostgreSQL store.
"""

import os
import sys

from hoopgw.options import ConfigError
from hoopgw.store.index import DECISIONS, parse_time
from hoopgw.store.sources import open_source
from hoopgw.store.errors import SourceError


def add_filters(parser):
    parser.add_argument("--identity", help="sessions whose identity (subject) contains this")
    parser.add_argument("--connection", help="sessions on this connection")
    parser.add_argument("--protocol", help="sessions of this protocol (postgres, ssh, kubernetes)")
    parser.add_argument("--since", help="from this UTC date/time (2026-01-31, 2026-01-31T12:00:00Z) or age (24h)")
    parser.add_argument("--until", help="to this UTC date/time or age")
    parser.add_argument("--decision", choices=DECISIONS, help="sessions with a command blocked, approved or masked, or refused")


def add_store(parser):
    parser.add_argument(
        "--store",
        default=os.environ.get("HOOPGW_STORE"),
        help="the record: a store folder, an evidence bundle or a PostgreSQL store's connection string "
        "(default: $HOOPGW_STORE)",
    )


def _source(arguments):
    if not arguments.store:
        raise SourceError("say which record to read with --store (a store folder, a bundle or a PostgreSQL DSN) or $HOOPGW_STORE")
    return open_source(arguments.store)


def _filters(arguments):
    return dict(
        subject=arguments.identity,
        connection=arguments.connection,
        protocol=arguments.protocol,
        since=parse_time(arguments.since, "--since") if arguments.since else None,
        until=parse_time(arguments.until, "--until") if arguments.until else None,
        decision=arguments.decision,
    )


def verify(arguments, out):
    from hoopgw.approvals.evidence import ApprovalsCheck
    from hoopgw.store.verify import verify as check

    report = check(
        arguments.store, arguments.key, expect_head=arguments.expect_head, witness=arguments.witness,
        checks=(ApprovalsCheck,),
    )
    print(report.summary(), file=out)
    return 0 if report.ok else 1


def sessions_list(arguments, out):
    from hoopgw.replay.terminal import list_sessions

    try:
        list_sessions(_source(arguments), out, **_filters(arguments))
    except (SourceError, ConfigError) as error:
        print(error, file=sys.stderr)
        return 2
    return 0


def replay(arguments, out):
    from hoopgw.replay.terminal import replay as play

    if arguments.speed <= 0:
        print("--speed must be above 0 (2 plays twice as fast)", file=sys.stderr)
        return 2
    try:
        source = _source(arguments)
    except SourceError as error:
        print(error, file=sys.stderr)
        return 2
    return play(source, arguments.session, out, speed=arguments.speed, command=arguments.command)


def export(arguments, out):
    from hoopgw.store.export import ExportError, export as make

    try:
        source = _source(arguments)
        since = parse_time(arguments.since, "--since") if arguments.since else None
        until = parse_time(arguments.until, "--until") if arguments.until else None
        manifest = make(source, arguments.output, since, until)
    except (SourceError, ConfigError, ExportError) as error:
        print(error, file=sys.stderr)
        return 2
    print(
        "%s: events %d to %d (%d), %d recordings, keys %s; check it with: hoopgw verify %s --key YOUR-COPY.pub"
        % (arguments.output, manifest["first_seq"], manifest["last_seq"], manifest["events"], len(manifest["casts"]),
           ", ".join(manifest["keys"]) or "none", arguments.output),
        file=out,
    )
    return 0
