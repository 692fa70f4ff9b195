"""
What the gateway knows of SQL text itself (not of the wire): how a simple
query splits into statements, and what kind of statement each is.
"""

import re

from pglast import parser

from hoopgw import redact

_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*([A-Za-z_]+)", re.S)


def statement_type(sql):
    """
    The statement's first keyword, upper case (C{SELECT}, C{WITH}, ...).
    """
    match = _FIRST_WORD.match(sql)
    return match.group(1).upper() if match else ""


def split_statements(sql):
    """
    The statements of a simple query, as PostgreSQL's own parser splits
    them.  SQL the parser cannot read is one statement, flagged, so that
    policies see all of it.  (The scanner alone is not used: it silently
    drops statements that start with a word it does not know, such as
    C{SELEC 1}, which would then reach the target unchecked and
    unrecorded.)

    @return: C{(statements, error or None)}.
    """
    body = sql.rstrip().rstrip(";").rstrip()
    if ";" not in body:
        # One statement (the common case): nothing to split, and the
        # addons that need its parse tree parse it themselves.
        return ([body.lstrip()] if body.strip() else []), None
    try:
        return list(parser.split(sql)), None
    except Exception as error:
        # The error quotes the statement near where it failed: free text
        # from the client, redacted as the statement is before any record.
        text, _ = redact.redact_text(str(error))
        return [sql], text
