"""
What PostgreSQL clients ask for, as protocol-neutral L{Command}s with the
facts policies match on, beside L{hoopgw.ssh.commands} and
L{hoopgw.kubernetes.requestinfo}: the one place a SQL command is made.

A statement is classified here, once, by PostgreSQL's own parser
(L{hoopgw.sqlfacts.facts_of}, memoised by the statement's text): its
kinds, tables, writes, functions, object types and whether an UPDATE or
DELETE lacks a WHERE clause go into L{Command.facts}, and the
classification itself into C{command.metadata["sql"]}, where block,
approve and mask read it.  So the facts the record shows are the facts the
policy matched, and no addon parses the statement again.
"""

from hoopgw import redact
from hoopgw import sqlfacts
from hoopgw.model import Command
from hoopgw.postgres import wire
from hoopgw.sql import statement_type


def sql_command(sql, protocol="simple", session=None, parse_error=None, parameters=(), formats=(), classify=True):
    """
    A SQL statement as a client sent it.

    @param sql: one statement's text.
    @param protocol: C{"simple"} or C{"extended"}: how the client sent it.
    @param session: the client's L{Session}, where statements named for
        later (PREPARE, DECLARE) are remembered so an EXECUTE or FETCH is
        classified by what it runs.
    @param parse_error: why the text could not be split into statements.
    @param parameters: the bind parameters (C{bytes} or None each).
    @param formats: the parameters' format codes (0 text, 1 binary), as
        the Bind message gives them.
    @param classify: classify now (the front end, when an addon of the
        chain reads the classification); otherwise it is made when an
        addon first asks, with that addon's session
        (L{hoopgw.sqlfacts.facts_of}).
    """
    redacted, _ = redact.redact_sql(sql)
    facts = {"statement_type": statement_type(sql), "protocol": protocol}
    if parse_error:
        facts["parse_error"] = parse_error
    command = Command(kind="sql", text=sql, redacted=redacted, facts=facts)
    if parameters:
        command.parameters = tuple(parameters)
        command.redacted_parameters = tuple(
            redact.redact_parameter(value, wire.parameter_format(formats, index) == 1)
            for index, value in enumerate(parameters)
        )
    if classify:
        sqlfacts.facts_of(session, command)
    return command


def function_call_command(oid, formats, values):
    """
    A fastpath FunctionCall message: a function called by its OID, with no
    SQL text to classify.
    """
    text = "function call (oid %d)" % (oid,)
    return Command(
        kind="function-call",
        text=text,
        redacted=text,
        facts={"function_oid": oid, "protocol": "function-call"},
        parameters=values,
        redacted_parameters=tuple(
            redact.redact_parameter(value, wire.parameter_format(formats, index) == 1)
            for index, value in enumerate(values)
        ),
    )
