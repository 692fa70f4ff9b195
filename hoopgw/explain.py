"""
C{hoopgw explain}: what each addon of a connection's chain would decide
about a statement (PostgreSQL), a command line (SSH) or an API request
(Kubernetes, written C{METHOD /path}), and why, without a network, a
target or a store: the answer to "why was this allowed?".
"""

from hoopgw import config as configuration
from hoopgw import offline
from hoopgw.model import HUMAN, SERVICE, Identity, Session
from hoopgw.options import ConfigError
from hoopgw.postgres.commands import sql_command
from hoopgw.sql import split_statements


# What built-in addons without an explain method do with a statement.
_DESCRIPTIONS = {
    "identity": "proves who the client is when the session starts; no opinion on statements",
    "record": "records the statement (redacted) before it runs, and its outcome",
}


def explain(config, connection_name, sql, subject="explain", groups=None, kind=SERVICE, read_catalog=None):
    """
    @param read_catalog: C{read_catalog(target)} -> the target's catalog
        document, for an addon that follows columns through it (the mask
        addon with sensitive_columns); None to explain without it.
    @return: the lines of the explanation.
    @raise ConfigError: for an unknown connection.
    """
    connection = config.connections.get(connection_name)
    if connection is None:
        raise ConfigError(
            "--connection",
            "there is no connection %r; this configuration has %s"
            % (connection_name, ", ".join(sorted(config.connections))),
        )
    # Built with nothing that runs: no store, no broker.
    context = offline.context(connection)
    addons = [(spec.name, spec.factory.build(spec.options, context)) for spec in connection.addons]
    for _, addon in addons:
        guard = getattr(addon, "guard", None)
        if guard is not None:
            _load_catalog(guard, connection, read_catalog)
    groups = frozenset(groups if groups is not None else connection.allowed_groups)
    identity = Identity(subject=subject, issuer="(explain)", groups=groups, kind=kind)
    session = Session(connection=connection.name, protocol=connection.protocol, client_address="(explain)", identity=identity)
    lines = [
        "connection %s (%s), chain: %s; as %s (%s) in %s"
        % (
            connection.name,
            connection.protocol,
            " -> ".join(name for name, _ in addons) or "(empty)",
            subject,
            kind,
            ", ".join(sorted(groups)) or "no groups",
        )
    ]
    if connection.allowed_groups and not groups & connection.allowed_groups:
        lines.append(
            "  the session itself would be refused: %s is in none of %s"
            % (subject, ", ".join(sorted(connection.allowed_groups)))
        )
    commands, noun = _commands(connection, sql)
    denied = False
    for command in commands:
        lines.append("%s: %s" % (noun, command.redacted))
        verdict = "allow"
        for name, addon in addons:
            if verdict.startswith("deny") and name != "record":
                lines.append("  %-9s (not consulted: the %s is already denied)" % (name + ":", noun))
                continue
            explainer = getattr(addon, "explain", None)
            if explainer is not None:
                answer = explainer(session, command)
                if answer.startswith("deny") and verdict != "deny":
                    verdict = "deny (%s)" % (name,)
                elif answer.startswith("needs approval") and verdict == "allow":
                    verdict = "needs approval (%s)" % (name,)
            elif name in _DESCRIPTIONS:
                answer = _DESCRIPTIONS[name]
            elif getattr(addon, "command_received", None) is not None:
                answer = "decides on statements, but cannot explain itself without running"
            else:
                answer = "no opinion on statements"
            lines.append("  %-9s %s" % (name + ":", answer))
        lines.append("  => %s" % (verdict,))
        denied = denied or verdict.startswith("deny")
    if denied and len(commands) > 1:
        lines.append("one statement is denied, so none of this query runs")
    return lines


def _load_catalog(guard, connection, read_catalog):
    if read_catalog is None:
        guard.error = "hoopgw explain was not asked to read it"
        return
    try:
        guard.use_document(read_catalog(connection.settings.target))
    except Exception as error:
        guard.error = str(error)


def _commands(connection, text):
    """
    The commands C{text} is on this connection, as its front end would
    make them, and what to call them.
    """
    if connection.protocol == "ssh":
        from hoopgw.ssh.commands import exec_command

        logins = sorted(getattr(connection.settings, "allowed_logins", None) or ["explain"])
        return [exec_command(text, logins[0], False)], "command"
    if connection.protocol == "kubernetes":
        from hoopgw.kubernetes.requestinfo import request_command, request_info

        method, _, path = text.strip().partition(" ")
        path = path.strip()
        if not method.isalpha() or not path.startswith("/"):
            raise ConfigError(
                "request",
                "for a Kubernetes connection, give the API request as METHOD /path, e.g. "
                "\"DELETE /api/v1/namespaces/prod\" or \"GET /api/v1/namespaces/prod/pods/db-0/exec?command=sh\"",
            )
        method = method.upper()
        bare, _, query = path.partition("?")
        # A GET of exec, attach or portforward is kubectl's WebSocket upgrade.
        websocket = method == "GET" and bare.rstrip("/").rpartition("/")[2] in ("exec", "attach", "portforward")
        info = request_info(method, bare, query, websocket)
        return [request_command(info, method, path, query, websocket)], "request"
    statements, error = split_statements(text)
    commands = []
    for statement in statements:
        commands.append(sql_command(statement, "simple", parse_error=error, classify=False))
    return commands, "statement"


def run(arguments, out):
    try:
        if getattr(arguments, "skip_files", False):
            config, _ = configuration.load_skipping_files(arguments.config)
        else:
            config = configuration.load(arguments.config)
        groups = None
        if arguments.groups is not None:
            groups = [group for group in arguments.groups.split(",") if group]
        lines = explain(
            config,
            arguments.connection,
            arguments.request,
            subject=arguments.subject,
            groups=groups,
            kind=HUMAN if arguments.kind == HUMAN else SERVICE,
            read_catalog=_read_catalog,
        )
    except ConfigError as error:
        import sys

        print("hoopgw explain: %s" % (error,), file=sys.stderr)
        return 1
    for line in lines:
        print(line, file=out)
    return 0


def _read_catalog(target):
    from hoopgw.postgres import catalog

    return catalog.fetch_blocking(target)
