"""
Card numbers: find Luhn-valid primary account numbers (PANs) in text or
bytes and show them as at most BIN and last four (PCI DSS 3.4.1).  Used by
the record's redaction and by the mask addon.
"""

import re


# A run of 13 to 19 digits, each pair optionally separated by one space or
# dash, not touching other digits.
_PAN_TEXT = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
_PAN_BYTES = re.compile(rb"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")
# Cheap test: no run of four digits means no PAN.
_DIGITS_TEXT = re.compile(r"[0-9]{4}")
_DIGITS_BYTES = re.compile(rb"[0-9]{4}")

BIN_AND_LAST_FOUR = "bin+last4"
LAST_FOUR = "last4"


def luhn_valid(digits):
    """
    Whether a string of digits passes the Luhn check.
    """
    total = 0
    for position, character in enumerate(reversed(digits)):
        value = ord(character) - 48
        if position % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def mask_pan(text, style=BIN_AND_LAST_FOUR):
    """
    C{text}, a candidate PAN, masked; None if it is not a Luhn-valid PAN.
    """
    digits = [index for index, character in enumerate(text) if character in "0123456789"]
    clean = "".join(text[index] for index in digits)
    if not 13 <= len(clean) <= 19 or not luhn_valid(clean):
        return None
    keep_front = 6 if style == BIN_AND_LAST_FOUR else 0
    shown = set(digits[:keep_front]) | set(digits[-4:])
    return "".join(
        character if (index in shown or character not in "0123456789") else "*"
        for index, character in enumerate(text)
    )


def mask_text(text, style=BIN_AND_LAST_FOUR):
    """
    C{text} with every PAN masked.

    @return: C{(masked text, number of PANs masked)}.
    """
    if not _DIGITS_TEXT.search(text):
        return text, 0
    count = 0

    def replace(match):
        nonlocal count
        masked = mask_pan(match.group(0), style)
        if masked is None:
            return match.group(0)
        count += 1
        return masked

    return _PAN_TEXT.sub(replace, text), count


def mask_bytes(data, style=BIN_AND_LAST_FOUR):
    """
    C{data} (ASCII-compatible bytes) with every PAN masked; the length
    does not change.

    @return: C{(masked bytes, number of PANs masked)}.
    """
    if not _DIGITS_BYTES.search(data):
        return data, 0
    count = 0

    def replace(match):
        nonlocal count
        masked = mask_pan(match.group(0).decode("ascii"), style)
        if masked is None:
            return match.group(0)
        count += 1
        return masked.encode("ascii")

    return _PAN_BYTES.sub(replace, data), count


def might_hold_pan(data):
    """
    A fast test: False means C{data} (bytes) certainly holds no PAN.
    """
    return _PAN_BYTES.search(data) is not None


_MAY_CONTINUE = frozenset(b"0123456789 -")
_SEPARATORS = frozenset(b" -")
# The longest text a PAN can span: 19 digits with a separator between each.
MAX_PAN_SPAN = 19 + 18


class StreamMasker:
    """
    Masks PANs in a byte stream that arrives in pieces: a PAN split across
    two pieces is still caught.  Only the trailing digits, spaces and
    dashes a PAN could still continue from (at most L{MAX_PAN_SPAN} bytes)
    are held back, until the next piece or the end of the stream.

    @ivar masked: how many PANs were masked so far.
    """

    def __init__(self, style=BIN_AND_LAST_FOUR):
        self._style = style
        self._held = b""
        self.masked = 0

    @property
    def held(self):
        return len(self._held)

    def feed(self, data, final=False):
        """
        The next piece of the stream.

        @param final: this is the end of the stream: release what is held.
        @return: the bytes that can be passed on, masked.
        """
        if self._held:
            data = self._held + data
            self._held = b""
        if not final:
            cut = len(data)
            floor = max(0, cut - MAX_PAN_SPAN)
            while cut > floor and data[cut - 1] in _MAY_CONTINUE:
                cut -= 1
            # A PAN starts with a digit: separators before the first held
            # digit can go.
            while cut < len(data) and data[cut] in _SEPARATORS:
                cut += 1
            if cut < len(data):
                self._held = data[cut:]
                data = data[:cut]
        if not data:
            return b""
        masked, count = mask_bytes(data, self._style)
        self.masked += count
        return masked
