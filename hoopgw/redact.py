"""
Redaction before anything is recorded: passwords in SQL text and
connection strings, card numbers, bearer tokens.  What leaves this module
is safe to write to a log or to the evidence store.
"""

import re

from pglast import parser

from hoopgw import cards


REDACTED = "[redacted]"

# JSON Web Tokens and other bearer tokens are recognisable by shape.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
# key=value secrets inside connection strings and options.
_CONNINFO_SECRET = re.compile(r"(?i)\b(password|passwd|pwd|secret|token|sslpassword)(\s*=\s*)('[^']*'|\S+)")
_SECRET_WORDS = {"password", "passwd", "pwd", "secret", "token", "sslpassword", "api_key", "apikey"}
_SECRET_HINTS = ("pass", "pwd", "secret", "token", "key")
_MAX_PARAMETER = 256


def looks_secret(text):
    """
    Whether C{text} mentions a password, secret, token or key at all: the
    cheap test before the careful work.
    """
    lowered = text.lower()
    return "pass" in lowered or "pwd" in lowered or "secret" in lowered or "token" in lowered or "key" in lowered


def redact_text(text):
    """
    Free text (an error message, a command line) with card numbers,
    tokens and key=value secrets removed.

    @return: C{(redacted text, number of card numbers masked)}.
    """
    text, count = cards.mask_text(text)
    return redact_secrets(text), count


def redact_secrets(text):
    """
    Free text with tokens and key=value secrets removed, for text whose
    card numbers were masked already (a stream through the masker).
    """
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "=" in text and looks_secret(text):
        text = _CONNINFO_SECRET.sub(lambda match: match.group(1) + match.group(2) + REDACTED, text)
    return text


def redact_sql(sql):
    """
    A SQL statement safe to record: string literals that follow a
    password-like word (C{PASSWORD 'x'}, C{OPTIONS (password 'x')}) are
    replaced, secrets inside connection-string literals are removed, and
    card numbers and tokens anywhere are masked.

    @return: C{(redacted sql, number of card numbers masked)}.
    """
    if looks_secret(sql):
        sql = _redact_secret_literals(sql)
    return redact_text(sql)


def _redact_secret_literals(sql):
    try:
        tokens = parser.scan(sql)
    except Exception:
        # Unscannable SQL with a password-like word in it: keep only what
        # comes before that word.
        lowered = sql.lower()
        return sql[: min(lowered.find(hint) for hint in _SECRET_HINTS if hint in lowered)] + REDACTED
    pieces = []
    position = 0
    previous = None
    for token in tokens:
        if token.name == "SCONST":
            start, end = token.start, token.end + 1
            literal = sql[start:end]
            if previous is not None and sql[previous.start : previous.end + 1].lower() in _SECRET_WORDS:
                pieces.append(sql[position:start])
                pieces.append("'%s'" % (REDACTED,))
                position = end
            elif _CONNINFO_SECRET.search(literal):
                pieces.append(sql[position:start])
                pieces.append(_CONNINFO_SECRET.sub(lambda match: match.group(1) + match.group(2) + REDACTED, literal))
                position = end
        if token.name not in ("ENCRYPTED", "UNENCRYPTED"):
            previous = token
    pieces.append(sql[position:])
    return "".join(pieces)


def redact_parameter(value, binary=False):
    """
    One bind parameter as it may be recorded: text with card numbers and
    tokens masked, cut at 256 characters; binary values by size only.
    """
    if value is None:
        return None
    if binary:
        return "<binary, %d bytes>" % (len(value),)
    text = bytes(value).decode("utf-8", "replace")
    text, _ = redact_text(text)
    if len(text) > _MAX_PARAMETER:
        text = text[:_MAX_PARAMETER] + "... (%d characters)" % (len(text),)
    return text
