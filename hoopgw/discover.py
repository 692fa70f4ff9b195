"""
C{hoopgw discover}: find a PostgreSQL connection's card data.  Reads the
target's catalog with the gateway's credentials, samples the text-like
columns of its tables (a bounded number of rows, in read-only
transactions with a statement timeout), and proposes a
C{sensitive_columns} block: Luhn-valid card numbers (pan), and CVV-like,
track-data-like or so-named columns (sad), each with its evidence (rows
sampled, matches), never a value.
"""

import datetime
import re
import sys

from hoopgw import cards
from hoopgw import config as configuration
from hoopgw import masking
from hoopgw.options import ConfigError


DEFAULT_ROWS = 1000
MAX_ROWS = 100000
# Column types whose values may hold a card number or a CVV.
_SAMPLED_TYPES = re.compile(r"^(text|character varying|character|varchar|bpchar|char|numeric|bigint|json|jsonb)\b")
_CVV_VALUE = re.compile(r"^[0-9]{3,4}$")
_TRACK_VALUE = re.compile(r"(%B[0-9]{13,19}\^|;[0-9]{13,19}=)")
_SEPARATORS = re.compile(r"[ -]")
# Text types (a CVV is kept as text: "012" is not 12).
_TEXT_TYPES = re.compile(r"^(text|character varying|character|varchar|bpchar|char)\b")
# Words in a column's name that make three or four digits beside a card
# number a verification code rather than, say, a status code.
_CVV_HINTS = re.compile(r"cvv|cvc|csc|cid|verif|secur|sec_?code|card_?code", re.I)
# Share of sampled values that must be card numbers for a column to be
# proposed as a pan column.
PAN_SHARE = 0.5


def _quote(name):
    return '"%s"' % (name.replace('"', '""'),)


def classify(name, values, patterns, text_type=True):
    """
    What a sample of one column's values (text, None for NULL) suggests.

    @return: C{(kind or None, evidence dict)}; the kind C{"cvv?"} means
        three or four digits in every value, a CVV if a card number column
        stands beside it.
    """
    present = [value for value in values if value is not None]
    pans = sum(1 for value in present if _is_pan(value))
    embedded = sum(1 for value in present if cards.mask_text(value)[1]) - pans
    cvv_like = sum(1 for value in present if _CVV_VALUE.match(value.strip()))
    tracks = sum(1 for value in present if _TRACK_VALUE.search(value))
    evidence = {"rows_sampled": len(values), "non_null": len(present)}
    if pans:
        evidence["card_numbers"] = pans
    if embedded > 0:
        evidence["values_holding_a_card_number"] = embedded
    if tracks:
        evidence["track_data"] = tracks
    named = any(pattern.search(name) for pattern in patterns)
    if named:
        evidence["name_matches"] = True
    if tracks:
        return "sad", evidence
    if present and pans >= PAN_SHARE * len(present):
        return "pan", evidence
    if named:
        return "sad", evidence
    if present and text_type and cvv_like == len(present):
        evidence["cvv_like"] = cvv_like
        return ("cvv?" if _CVV_HINTS.search(name) else "digits?"), evidence
    return None, evidence


def _is_pan(value):
    digits = _SEPARATORS.sub("", value.strip())
    return digits.isdigit() and cards.MIN_DIGITS <= len(digits) <= cards.MAX_DIGITS and cards.luhn_valid(digits)


def discover(connection, rows=DEFAULT_ROWS, patterns=None, connect=None):
    """
    @return: C{(database, [(schema.table.column, kind, evidence)],
        [notes])}.
    """
    from hoopgw.postgres import catalog as catalog_module

    patterns = patterns or [re.compile(pattern, re.I) for pattern in masking.DEFAULT_COLUMNS]
    target = connection.settings.target
    handle = (connect or catalog_module.connect_blocking)(target, "discover")
    handle.set_session(readonly=True, autocommit=True)
    found = []
    notes = []
    try:
        with handle.cursor() as cursor:
            cursor.execute(catalog_module.CATALOG_SQL)
            document = __import__("json").loads(cursor.fetchone()[0])
            database = document["database"]
            for relation in document.get("relations") or ():
                if relation["kind"] not in ("r", "p", "m", "f"):
                    continue
                table = "%s.%s" % (relation["schema"], relation["name"])
                candidates = [column for column in relation.get("columns") or () if _SAMPLED_TYPES.match(column[1])]
                if not candidates:
                    continue
                select = ", ".join("%s::text" % (_quote(column[0]),) for column in candidates)
                try:
                    cursor.execute(
                        "SELECT %s FROM %s.%s LIMIT %d"
                        % (select, _quote(relation["schema"]), _quote(relation["name"]), int(rows))
                    )
                    sample = cursor.fetchall()
                except Exception as error:
                    notes.append("%s not sampled: %s" % (table, str(error).strip().splitlines()[0]))
                    continue
                kinds = []
                for index, column in enumerate(candidates):
                    kind, evidence = classify(
                        column[0], [row[index] for row in sample], patterns, bool(_TEXT_TYPES.match(column[1]))
                    )
                    kinds.append((column[0], kind, evidence))
                has_pan = any(kind == "pan" for _, kind, _ in kinds)
                for name, kind, evidence in kinds:
                    if kind in ("cvv?", "digits?"):
                        # Three or four digits are a CVV only beside a card
                        # number, and only proposed when the name says so.
                        if not has_pan:
                            continue
                        if kind == "digits?":
                            notes.append(
                                "%s.%s: all %d sampled values are three or four digits, beside a card number "
                                "column; a verification code? (not proposed: its name does not say so)"
                                % (table, name, evidence["cvv_like"])
                            )
                            continue
                        kind = "sad"
                    if kind is not None:
                        found.append(("%s.%s" % (table, name), kind, evidence))
                    elif evidence.get("values_holding_a_card_number"):
                        notes.append(
                            "%s.%s: %d of %d sampled values hold a card number in other text (not proposed; "
                            "masked in every result anyway)"
                            % (table, name, evidence["values_holding_a_card_number"], evidence["rows_sampled"])
                        )
    finally:
        handle.close()
    return database, found, notes


def _evidence_text(kind, evidence):
    parts = ["%d rows sampled" % (evidence["rows_sampled"],)]
    if evidence.get("card_numbers"):
        parts.append("%d Luhn-valid card numbers" % (evidence["card_numbers"],))
    if evidence.get("track_data"):
        parts.append("%d track data values" % (evidence["track_data"],))
    if evidence.get("cvv_like"):
        parts.append("%d CVV-like values beside a card number column" % (evidence["cvv_like"],))
    if evidence.get("name_matches"):
        parts.append("name matches a sensitive authentication data pattern")
    return ", ".join(parts)


def render(connection_name, database, found, notes):
    """
    The proposed block, as YAML with its evidence in comments.
    """
    lines = [
        "# Proposed by hoopgw discover for the connection %s (database %s), %s."
        % (connection_name, database, datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")),
        "# Evidence: rows sampled and matches per column; no value is shown.",
        "# Review it, then name this file in the mask addon's sensitive_columns_file.",
    ]
    for note in notes:
        lines.append("# note: %s" % (note,))
    if not found:
        lines.append("sensitive_columns: {}")
    else:
        lines.append("sensitive_columns:")
        for column, kind, evidence in found:
            lines.append("  %s.%s: %s    # %s" % (database, column, kind, _evidence_text(kind, evidence)))
    return "\n".join(lines) + "\n"


def run(arguments, out):
    try:
        config = configuration.load(arguments.config)
        connection = config.connections.get(arguments.connection)
        if connection is None:
            raise ConfigError(
                "CONNECTION",
                "there is no connection %r; this configuration has %s"
                % (arguments.connection, ", ".join(sorted(config.connections))),
            )
        if not 1 <= arguments.rows <= MAX_ROWS:
            raise ConfigError("--rows", "sample between 1 and %d rows per table" % (MAX_ROWS,))
        if connection.protocol != "postgres":
            raise ConfigError("CONNECTION", "%s is a %s connection; discover reads PostgreSQL targets" % (
                connection.name, connection.protocol))
        database, found, notes = discover(connection, rows=arguments.rows)
    except Exception as error:
        print("hoopgw discover: %s" % (error,), file=sys.stderr)
        return 1
    text = render(connection.name, database, found, notes)
    if arguments.write:
        with open(arguments.write, "w", encoding="utf-8") as handle:
            handle.write(text)
        print("hoopgw discover: wrote %d sensitive columns to %s" % (len(found), arguments.write), file=out)
    else:
        out.write(text)
    return 0
