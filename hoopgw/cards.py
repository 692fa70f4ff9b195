"""
Card numbers: find Luhn-valid primary account numbers (PANs) in text or
bytes and show them as at most BIN and last four (PCI DSS 3.4.1).  Used by
the record's redaction and by the masking engine (L{hoopgw.masking}).

A PAN is 13 to 19 digits, written together or in groups separated by one
space or dash, not touching other digits.  A run of digit groups
("12 4111 1111 1111 1111") is read the way a person reads it: any span of
whole groups holding 13 to 19 digits is a candidate, so a card number
next to another number is still found.  Masking never changes a length.
"""

import re


# A run of digits, each pair optionally separated by one space or dash,
# holding at least 13 digits: nothing shorter can hold a PAN.
_RUN_TEXT = re.compile(r"[0-9](?:[ -]?[0-9]){12,}")
_RUN_BYTES = re.compile(rb"[0-9](?:[ -]?[0-9]){12,}")

BIN_AND_LAST_FOUR = "bin+last4"
LAST_FOUR = "last4"
STYLES = (BIN_AND_LAST_FOUR, LAST_FOUR)

MIN_DIGITS = 13
MAX_DIGITS = 19
# The most bytes one PAN can span: 19 digits and 18 separators.
MAX_SPAN = 2 * MAX_DIGITS - 1

# Luhn doubles every second digit from the right; as a digit character,
# the doubled digit's digit sum.
_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")
_DIGITS = frozenset(b"0123456789")
_STAR = 42


def luhn_valid(digits):
    """
    Whether a string (or ASCII bytes) of digits passes the Luhn check.
    """
    if isinstance(digits, str):
        digits = digits.encode("ascii")
    total = sum(digits[-1::-2]) + sum(digits[-2::-2].translate(_DOUBLED)) - 48 * len(digits)
    return total % 10 == 0


def _keep_front(style):
    return 6 if style == BIN_AND_LAST_FOUR else 0


def run_positions(run, keep_front, open_end=False, count_before=None):
    """
    Which bytes of C{run} (a match of L{_RUN_BYTES}) belong to a PAN and
    must be hidden.

    @param open_end: the run may go on past its end (a stream cut it): a
        candidate that includes its last group is not decided.
    @param count_before: count only the PANs starting before this offset.
    @return: C{(positions to hide, number of PANs)}; positions is None when
        there is nothing to hide.
    """
    if run.isdigit():
        length = len(run)
        if open_end or length > MAX_DIGITS or not luhn_valid(run):
            return None, 0
        return range(keep_front, length - 4), (1 if count_before is None or count_before > 0 else 0)
    # Groups of digits between separators: (start, end) offsets.
    groups = []
    start = 0
    for index, byte in enumerate(run):
        if byte == 32 or byte == 45:
            groups.append((start, index))
            start = index + 1
    groups.append((start, len(run)))
    last = len(groups) - 1
    hidden = set()
    count = 0
    counted_until = -1
    for first in range(len(groups)):
        digits = 0
        for end in range(first, len(groups)):
            digits += groups[end][1] - groups[end][0]
            if digits > MAX_DIGITS:
                break
            if digits < MIN_DIGITS or (open_end and end == last):
                continue
            span = run[groups[first][0] : groups[end][1]]
            clean = span.replace(b" ", b"").replace(b"-", b"")
            if not luhn_valid(clean):
                continue
            offsets = [groups[first][0] + i for i, byte in enumerate(span) if byte in _DIGITS]
            hidden.update(offsets[keep_front:-4])
            if groups[first][0] > counted_until and (count_before is None or groups[first][0] < count_before):
                count += 1
                counted_until = groups[end][1]
    return (hidden or None), count


def mask_bytes(data, style=BIN_AND_LAST_FOUR):
    """
    C{data} (ASCII-compatible bytes) with every PAN masked; the length
    does not change.

    @return: C{(masked bytes, number of PANs masked)}.
    """
    masked, count = _mask_bytes_once(data, style)
    # As in mask_text: what the stars left standing alone is masked too.
    again = count
    while again:
        masked, again = _mask_bytes_once(masked, style)
    return masked, count


def _mask_bytes_once(data, style):
    keep_front = _keep_front(style)
    out = None
    count = 0
    for match in _RUN_BYTES.finditer(data):
        hidden, found = run_positions(match.group(), keep_front)
        if hidden is None:
            continue
        if out is None:
            out = bytearray(data)
        offset = match.start()
        for position in hidden:
            out[offset + position] = _STAR
        count += found
    if out is None:
        return data, 0
    return bytes(out), count


def mask_text(text, style=BIN_AND_LAST_FOUR):
    """
    C{text} with every PAN masked.

    @return: C{(masked text, number of PANs masked)}.
    """
    masked, count = _mask_text_once(text, style)
    # Hiding digits can leave digits that touched them standing alone as a
    # card number ("5555-5555-5555-44444111 1111 1111 1111" leaves "4111
    # 1111 1111 1111" after the stars), which a scan of the record would
    # find: mask again until nothing changes.  Each pass hides digits, so
    # this ends.
    again = count
    while again:
        masked, again = _mask_text_once(masked, style)
    return masked, count


def _mask_text_once(text, style):
    if not _RUN_TEXT.search(text):
        return text, 0
    keep_front = _keep_front(style)
    pieces = []
    position = 0
    count = 0
    for match in _RUN_TEXT.finditer(text):
        hidden, found = run_positions(match.group().encode("ascii"), keep_front)
        if hidden is None:
            continue
        run = list(match.group())
        for index in hidden:
            run[index] = "*"
        pieces.append(text[position : match.start()])
        pieces.append("".join(run))
        position = match.end()
        count += found
    if not count:
        return text, 0
    pieces.append(text[position:])
    return "".join(pieces), count


def mask_pan(text, style=BIN_AND_LAST_FOUR):
    """
    C{text}, a candidate PAN, masked; None if it is not a Luhn-valid PAN.
    """
    masked, count = mask_text(text, style)
    return masked if count and _RUN_TEXT.fullmatch(text) else None


def might_hold_pan(data):
    """
    A fast test: False means C{data} (bytes) certainly holds no PAN, whatever
    bytes surround it.
    """
    return _RUN_BYTES.search(data) is not None
