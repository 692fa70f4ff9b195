"""
PostgreSQL's values as result hooks see them: what kind each column's
values are (L{hoopgw.model.TEXT}, L{hoopgw.model.NUMBER} or
L{hoopgw.model.OPAQUE}), read from its type and format once per result
description, and the decoders that read binary values for them; and what an error's
detail quotes.  Addons and the masking engine never see a type OID, a
format code or PostgreSQL's wording.
"""

import re
import struct

from hoopgw.model import NUMBER, OPAQUE, TEXT

# Types whose binary form is their text: text, varchar, bpchar, name,
# "char", unknown, json, xml, jsonb (a version byte, then text), cstring.
TEXT_TYPES = frozenset({25, 1043, 1042, 19, 18, 705, 114, 142, 3802, 2275})
BYTEA = 17
INT8 = 20
FLOAT8 = 701
NUMERIC = 1700
# Binary types that cannot hold 13 digits in a row: nothing to read.
SMALL_TYPES = frozenset({16, 21, 23, 26, 700, 1082, 1083, 1114, 1184, 1186, 1266, 2950, 869, 650, 829, 774, 1560, 1562, 790})
# Types a removed value may be replaced by any text in: the character
# strings, and values of no known type.
STRING_TYPES = frozenset({25, 1043, 1042, 19, 705, 0})

_INT32 = struct.Struct("!i")
_UINT32 = struct.Struct("!I")
_INT64 = struct.Struct("!q")
_FLOAT8 = struct.Struct("!d")


def int8_text(value):
    """
    The digits of a binary int8 (its absolute value).
    """
    if len(value) != 8:
        raise ValueError("an int8 value is not 8 bytes")
    return str(abs(_INT64.unpack(value)[0]))


def float8_text(value):
    """
    The digits of a binary float8 that is a whole number below 1e20 (its
    absolute value); "" for any other (a fraction, a huge number, NaN).
    """
    (number,) = _FLOAT8.unpack(value)
    if number == number and abs(number) < 1e20 and number == int(number):
        return str(abs(int(number)))
    return ""


def numeric_text(value):
    """
    The digits of a binary NUMERIC, as text ("12345.678").
    """
    if len(value) < 8:
        raise ValueError("a numeric value is too short")
    count, weight, sign, scale = struct.unpack_from("!hhHh", value)
    if sign == 0xC000:
        return "NaN"
    digits = struct.unpack_from("!%dH" % (count,), value, 8)
    whole = []
    fraction = []
    for index, digit in enumerate(digits):
        position = weight - index
        (whole if position >= 0 else fraction).append("%04d" % (digit,))
    if weight >= len(digits):
        whole.extend(["0000"] * (weight - len(digits) + 1))
    text = "".join(whole).lstrip("0") or "0"
    if fraction:
        text += "." + "".join(fraction)
    return text


def hex_bytea(value):
    """
    A bytea in text format: hex (C{\\x...}) is read as the bytes it
    encodes, which are given back masked encoded again; the escape format
    is text as it stands.
    """
    if value[:2] != b"\\x":
        return [(0, len(value), TEXT, None)]
    try:
        raw = bytes.fromhex(value[2:].decode("ascii"))
    except ValueError:
        raise ValueError("a bytea value is not valid hex")
    return raw, _encode_hex


def _encode_hex(raw):
    return b"\\x" + raw.hex().encode("ascii")


def whole_text(value):
    """
    A binary bytea: its bytes, read as text where they may hold some.
    """
    return [(0, len(value), TEXT, None)]


def nothing(value):
    """
    A binary value of a type that cannot hold 13 digits in a row.
    """
    return []


def nested(value):
    """
    A binary value of a type not known here: the elements of an array or
    the fields of a record, each with its kind and decoder; None when it
    is neither.
    """
    for reader in (read_array, read_record):
        parts = reader(value)
        if parts is not None:
            return [(start, end) + column(type_oid, 1)[:2] for type_oid, start, end in parts]
    return None


def read_array(value):
    """
    The elements of a binary array: C{[(element type, start, end)]}, or
    None if C{value} is not one.
    """
    try:
        dimensions, _, element_type = struct.unpack_from("!iiI", value)
        if not 0 <= dimensions <= 6:
            return None
        offset = 12
        total = 1 if dimensions else 0
        for _ in range(dimensions):
            size = _INT32.unpack_from(value, offset)[0]
            if size < 0:
                return None
            total *= size
            offset += 8
        parts = []
        for _ in range(total):
            length = _INT32.unpack_from(value, offset)[0]
            offset += 4
            if length >= 0:
                parts.append((element_type, offset, offset + length))
                offset += length
        return parts if offset == len(value) else None
    except struct.error:
        return None


def read_record(value):
    """
    The fields of a binary record: C{[(type, start, end)]}, or None.
    """
    try:
        count = _INT32.unpack_from(value, 0)[0]
        if not 0 <= count <= 1600:
            return None
        offset = 4
        parts = []
        for _ in range(count):
            type_oid = _UINT32.unpack_from(value, offset)[0]
            length = _INT32.unpack_from(value, offset + 4)[0]
            offset += 8
            if length >= 0:
                parts.append((type_oid, offset, offset + length))
                offset += length
        return parts if offset == len(value) else None
    except struct.error:
        return None


_BINARY_NUMBERS = {INT8: int8_text, FLOAT8: float8_text, NUMERIC: numeric_text}
_columns = {}


def column(type_oid, format_code):
    """
    What the values of a column of this type and format are to a hook.

    @return: C{(kind, decoder, replaceable)}: see
        L{hoopgw.model.ResultChunk}.
    """
    key = (type_oid, format_code)
    found = _columns.get(key)
    if found is not None:
        return found
    replaceable = type_oid in STRING_TYPES
    if format_code != 1:
        found = (OPAQUE, hex_bytea, False) if type_oid == BYTEA else (TEXT, None, replaceable)
    elif type_oid in TEXT_TYPES:
        found = (TEXT, None, replaceable)
    elif type_oid == BYTEA:
        found = (OPAQUE, whole_text, False)
    elif type_oid in SMALL_TYPES:
        found = (OPAQUE, nothing, False)
    elif type_oid in _BINARY_NUMBERS:
        found = (NUMBER, _BINARY_NUMBERS[type_oid], False)
    else:
        found = (OPAQUE, nested, replaceable)
    if len(_columns) < 4096:
        # Bounded: a hostile target's RowDescriptions name any OIDs.
        _columns[key] = found
    return found


def describe(type_oids, formats):
    """
    The kinds, decoders and replaceable flags of a result's columns (see
    L{hoopgw.model.ResultChunk}), from their types and formats.
    """
    described = [column(type_oid, format_code) for type_oid, format_code in zip(type_oids, formats)]
    return (
        tuple(entry[0] for entry in described),
        tuple(entry[1] for entry in described),
        tuple(entry[2] for entry in described),
    )


_FAILING_ROW = re.compile(r"^Failing row contains \(.*\)\.?$", re.S)
_KEY_DETAIL = re.compile(r"^Key \((?P<columns>.*?)\)=\((?P<values>.*)\)(?P<rest>[^)]*)$", re.S)


def quotes(fields):
    """
    What an error's or notice's fields quote of the target's data (see
    L{hoopgw.model.ResultChunk.quotes}): a constraint violation's detail
    quotes a whole row ("Failing row contains (...)"), or the values of a
    key's columns ("Key (pan)=(...) already exists.").
    """
    detail = fields.get("detail")
    if not isinstance(detail, str):
        return None
    if _FAILING_ROW.match(detail):
        return {"detail": (None, "Failing row contains (values withheld by hoopgw).")}
    match = _KEY_DETAIL.match(detail)
    if match:
        columns = match.group("columns")
        names = tuple(name.strip().strip('"') for name in columns.split(","))
        return {"detail": (names, "Key (%s)=(withheld by hoopgw)%s" % (columns, match.group("rest")))}
    return None
