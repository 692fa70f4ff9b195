"""
What the gateway knows of SQL text itself (not of the wire): how a simple
query splits into statements, and what kind of statement each is.
"""

import re

from pglast import parser

_FIRST_WORD = re.compile(r"(?:\s+|--[^\n]*(?:\n|$)|/\*.*?\*/|\()*([A-Za-z_]+)", re.S)


def statement_type(sql):
    """
    The statement's first keyword, upper case (C{SELECT}, C{WITH}, ...).
    """
    match = _FIRST_WORD.match(sql)
    return match.group(1).upper() if match else ""


def split_statements(sql):
    """
    The statements of a simple query, as PostgreSQL's own scanner splits
    them.  SQL the scanner cannot read is one statement, flagged.

    @return: C{(statements, error or None)}.
    """
    try:
        return list(parser.split(sql, with_parser=False)), None
    except Exception as error:
        return [sql], str(error)
