"""
The masking engine: card numbers out of everything a target sends back,
whatever the protocol.  Rows (text, numbers, opaque values read through
the front end's decoders), byte streams cut at arbitrary places, and the
fields of error and notice messages; values of sensitive columns (CVV,
track data, PIN) replaced whole.  Masking keeps lengths, so a batch of
rows can be masked in place without being decoded.

Nothing here knows a wire format: the front end says where values lie
(L{hoopgw.model.ResultChunk.locate}) and what each column's values are
(text, number or opaque, with the decoders that read the latter:
L{hoopgw.model.ResultChunk.kinds}), and what an error's fields quote
(L{hoopgw.model.ResultChunk.quotes}).
"""

import json
import re

import numpy

from hoopgw import cards
from hoopgw.model import NUMBER, TEXT


class MaskingError(Exception):
    """
    Something could not be checked for card data: it must not be sent.
    """


# Replacement for a sensitive column's value, where any text may stand.
REPLACEMENT = b"***"
# How deep values inside values (arrays of records...) are read.
MAX_DEPTH = 8


_RUN = cards._RUN_BYTES
_SEPARATORS = (32, 45)


DEFAULT_COLUMNS = (
    r"(^|_)cvv2?($|_)",
    r"(^|_)cvc2?($|_)",
    r"(^|_)cid($|_)",
    r"(^|_)csc($|_)",
    r"card_?verification",
    r"security_?code",
    r"(^|_)track_?[12]?($|_)",
    r"track_?data",
    r"(^|_)pin($|_)",
    r"pin_?block",
)


class Masker:
    """
    How one connection masks: the PAN style and the sensitive column
    patterns.
    """

    def __init__(self, style=cards.BIN_AND_LAST_FOUR, columns=DEFAULT_COLUMNS):
        self.style = style
        self.keep_front = 6 if style == cards.BIN_AND_LAST_FOUR else 0
        self.columns = [re.compile(pattern, re.I) if isinstance(pattern, str) else pattern for pattern in columns]
        self._names = {}
        # Further column names whose values an error's key detail must not
        # quote (the mask addon's sensitive_columns).
        self.detail_names = frozenset()

    def sensitive(self, name):
        """
        Whether a column of this name is fully replaced.
        """
        found = self._names.get(name)
        if found is None:
            found = bool(name) and any(pattern.search(name) for pattern in self.columns)
            if len(self._names) < 10000:
                self._names[name] = found
        return found

    # Text.

    def text(self, data):
        """
        Bytes of text with every PAN masked: C{(bytes, count)}.
        """
        if len(data) < 512:
            return cards.mask_bytes(data, self.style)
        hidden, count = self._positions(data, len(data), True)
        if not hidden:
            return data, 0
        out = bytearray(data)
        for position in hidden:
            out[position] = 42
        # What the stars left standing alone (see rows_in_place).
        return cards.mask_bytes(bytes(out), self.style)[0], count

    def _positions(self, data, cut, final):
        """
        The positions of C{data} to hide, and the PANs counted before
        C{cut}.  Unless C{final}, a run that reaches the end of C{data}
        may go on: candidates that include its last group are not decided.
        """
        found = scan(data)
        if found is None:
            return set(), 0
        array, starts, ends, chains = found
        size = len(data)
        keep = self.keep_front
        hidden = set()
        count = 0
        items = chains
        if len(starts):
            valid = _luhn(array, starts, ends - starts)
            items = chains + [(int(first), int(last)) for first, last in zip(starts[valid], ends[valid])]
        for start, end in items:
            open_end = not final and (end == size or (end == size - 1 and data[end] in _SEPARATORS))
            if open_end and start >= cut:
                continue
            positions, found_here = cards.run_positions(data[start:end], keep, open_end=open_end, count_before=cut - start)
            if positions is not None:
                hidden.update(start + position for position in positions)
            count += found_here
        return hidden, count

    def string(self, text):
        return cards.mask_text(text, self.style)

    def json_document(self, data):
        """
        The bytes of a JSON document with every card number masked, still
        JSON: in strings masked in place; a number that is a card number
        becomes a string holding it masked (a masked number would not
        parse).  Bytes that are not JSON are masked as text.

        @return: C{(bytes, count)}.
        """
        masked, count = self.text(data)
        if not count:
            return data, 0
        try:
            json.loads(masked)
            return masked, count
        except ValueError:
            pass
        try:
            document = json.loads(data)
        except ValueError:
            return masked, count
        document, count = self._json_value(document, 0)
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8"), count

    def _json_value(self, value, depth):
        if depth > 256:
            raise MaskingError("a JSON document nests too deeply to be checked")
        if isinstance(value, str):
            return cards.mask_text(value, self.style)
        if isinstance(value, bool) or value is None:
            return value, 0
        if isinstance(value, (int, float)):
            if isinstance(value, float) and not (value == value and abs(value) < 1e20 and value == int(value)):
                return value, 0
            digits = str(abs(int(value)))
            if cards.MIN_DIGITS <= len(digits) <= cards.MAX_DIGITS and cards.luhn_valid(digits):
                return cards.mask_text(digits, self.style)[0], 1
            return value, 0
        count = 0
        if isinstance(value, list):
            for index, item in enumerate(value):
                value[index], found = self._json_value(item, depth + 1)
                count += found
        elif isinstance(value, dict):
            for key, item in value.items():
                value[key], found = self._json_value(item, depth + 1)
                count += found
        return value, count

    # Rows, in place.

    def rows_in_place(self, data, locate):
        """
        Mask a batch of encoded rows whose values are all text, without
        decoding it.  Small batches are scanned with plain byte searches,
        large ones with vectorised operations (their fixed cost, about
        0.1 ms, pays off from a few kilobytes on).

        @param locate: C{locate(start, end)} -> None when the bytes
            C{[start, end)} certainly lie inside one value, else the list
            of C{(start, end)} pieces that do; and, if it has one,
            C{locate.inside(array, starts, ends)}, the same for many runs at
            once (see L{hoopgw.model.ResultChunk.locate}).
        @return: C{(new data or None, count)}.
        """
        masked, count = self._rows_in_place_once(data, locate)
        again = count
        while again:
            # Stars can leave digits that touched a hidden card number
            # standing alone as one ("5555-5555-55**-****4111 1111 1111
            # 1111"): mask again until nothing changes.  Each pass hides
            # digits, so this ends; it costs only batches that held one.
            more, again = self._rows_in_place_once(masked, locate)
            if more is not None:
                masked = more
        return masked, count

    def _rows_in_place_once(self, data, locate):
        if len(data) >= VECTOR_THRESHOLD:
            return self._rows_in_place_large(data, locate)
        plain = data.translate(_REGIONS)
        if plain.find(_WINDOW) < 0:
            return None, 0
        return self._rows_in_place_small(data, plain, locate)

    def _rows_in_place_large(self, data, locate):
        found = scan(data)
        if found is None:
            return None, 0
        array, starts, ends, chains = found
        keep = self.keep_front
        out = None
        count = 0
        if len(starts):
            lengths = ends - starts
            # The runs the front end can tell at once lie inside one value
            # (or are one whole value); the others are located exactly.
            inside = getattr(locate, "inside", None)
            certain = inside(array, starts, ends) if inside is not None else numpy.zeros(len(starts), dtype=bool)
            valid = certain & (lengths <= cards.MAX_DIGITS) & _luhn(array, starts, lengths)
            if valid.any():
                out = array.copy()
                count += int(valid.sum())
                for length in numpy.unique(lengths[valid]):
                    chosen = starts[valid & (lengths == length)]
                    out[chosen[:, None] + numpy.arange(keep, length - 4)] = 42
            # Runs that may hold more than one value's bytes: located exactly.
            chains = chains + [(int(first), int(last)) for first, last in zip(starts[~certain], ends[~certain])]
        for start, end in chains:
            hidden, found = _located_positions(data, start, end, locate, keep)
            if hidden:
                if out is None:
                    out = array.copy()
                out[hidden] = 42
                count += found
        if out is None:
            return None, 0
        return out.tobytes(), count

    def _rows_in_place_small(self, data, plain, locate):
        out = None
        count = 0
        keep = self.keep_front
        size = len(data)
        position = plain.find(_WINDOW)
        while position >= 0:
            stop = plain.find(b"x", position + cards.MIN_DIGITS)
            if stop < 0:
                stop = size
            region = data[position:stop]
            if region.isdigit():
                runs = ((position, stop),)
            elif len(region) - region.count(b" ") - region.count(b"-") < cards.MIN_DIGITS:
                # Dates and times ("2024-01-01 12"): too few digits.
                runs = ()
            else:
                runs = [match.span() for match in _RUN.finditer(data, position, stop)]
            for start, end in runs:
                hidden, found = _located_positions(data, start, end, locate, keep)
                if hidden:
                    if out is None:
                        out = bytearray(data)
                    for index in hidden:
                        out[index] = 42
                    count += found
            position = plain.find(_WINDOW, stop)
        return (bytes(out) if out is not None else None), count

    # Rows, value by value.

    def value(self, value, kind=TEXT, decoder=None, depth=0):
        """
        One value of a row, of a kind and with a decoder as
        L{hoopgw.model.ResultChunk.kinds} describes.  Text is masked in
        place; a number that is a card number, and a value that cannot be
        read but might hold one, are withheld; values inside values (array
        elements, record fields) are read in turn.

        @return: C{(value or None, masked, withheld)}; a withheld value is
            None (SQL NULL).
        """
        if kind == TEXT:
            masked, count = cards.mask_bytes(value, self.style)
            return masked, count, 0
        if kind == NUMBER:
            text = decoder(value)
            if text and _RUN.search(text.encode("ascii")) and cards.mask_text(text)[1]:
                return None, 0, 1
            return value, 0, 0
        contents = decoder(value) if decoder is not None else None
        if isinstance(contents, tuple):
            # The value encodes text (hex): masked decoded, encoded again.
            text, encode = contents
            masked, count = cards.mask_bytes(text, self.style)
            if not count:
                return value, 0, 0
            return encode(masked), count, 0
        if contents is not None and not contents:
            return value, 0, 0
        if depth > MAX_DEPTH:
            raise MaskingError("a value nests too deeply to be checked")
        if contents is None:
            # Unknown binary that might hold a card number: not sent.
            if cards.might_hold_pan(value):
                return None, 0, 1
            return value, 0, 0
        return self._nested(value, contents, depth)

    def _nested(self, value, parts, depth):
        out = None
        masked = 0
        for start, end, kind, decoder in parts:
            inner, count, withheld = self.value(value[start:end], kind, decoder, depth + 1)
            if withheld:
                return None, 0, 1
            if count:
                if len(inner) != end - start:
                    raise MaskingError("a value inside a value changed its length")
                if out is None:
                    out = bytearray(value)
                out[start:end] = inner
                masked += count
        return (bytes(out) if out is not None else value), masked, 0

    def rows(self, rows, kinds, decoders=(), replaceable=(), replace=(), forced=()):
        """
        Mask decoded rows in place (a list of lists of bytes or None).

        @param kinds, decoders, replaceable: per column, as
            L{hoopgw.model.ResultChunk} has them.
        @param replace: column positions whose values are replaced whole.
        @param forced: column positions known to hold card numbers: their
            digits are masked whether or not they pass the Luhn check.
        @return: C{(changed, masked, withheld)}.
        """
        changed = False
        masked = withheld = 0
        columns = len(kinds)
        for row in rows:
            for index, value in enumerate(row):
                if value is None:
                    continue
                if index < columns:
                    kind = kinds[index]
                    decoder = decoders[index] if index < len(decoders) else None
                else:
                    kind, decoder = TEXT, None
                if index in replace:
                    free = replaceable[index] if index < len(replaceable) else True
                    row[index] = REPLACEMENT if free else None
                    masked += 1
                    changed = True
                    continue
                if index in forced:
                    if kind != TEXT:
                        row[index] = None
                        withheld += 1
                    else:
                        row[index] = self.force(value)
                        masked += 1
                    changed = True
                    continue
                try:
                    new, count, held = self.value(value, kind, decoder)
                except Exception:
                    # Whatever could not be checked is not sent.
                    new, count, held = None, 0, 1
                if count or held:
                    row[index] = new
                    masked += count
                    withheld += held
                    changed = True
        return changed, masked, withheld

    def force(self, value):
        """
        A value of a column known to hold card numbers, its digits masked
        as a card number's are (at most BIN and last four) whatever the
        Luhn check says; a value too short to be a card number keeps only
        its last four digits.
        """
        digits = [index for index, byte in enumerate(value) if 48 <= byte <= 57]
        count = len(digits)
        if count >= cards.MIN_DIGITS:
            hidden = digits[self.keep_front : count - 4]
        else:
            hidden = digits[: max(count - 4, 0)] if count > 4 else digits
        if not hidden:
            return value
        out = bytearray(value)
        for index in hidden:
            out[index] = 42
        return bytes(out)

    # Messages.

    def fields(self, fields, quotes=None):
        """
        Mask the fields of an error, notice or notification in place.

        @param quotes: what the front end found quoted in them
            (L{hoopgw.model.ResultChunk.quotes}): a field that quotes a
            whole row, or values of a sensitive column, is withheld.
        @return: the number of values masked.
        """
        count = 0
        quotes = quotes or {}
        for name, value in list(fields.items()):
            # Every field, the "server's own words" too (severity, code,
            # routine...): a hostile target puts anything in any of them,
            # or runs a field into the next by a missing NUL.
            if not isinstance(value, str):
                continue
            quote = quotes.get(name)
            if quote is not None and (self.columns or self.detail_names):
                value, replaced = self._quoted(value, quote)
                count += replaced
            masked, found = cards.mask_text(value, self.style)
            fields[name] = masked
            count += found
        return count

    def _quoted(self, value, quote):
        """
        A field that quotes a whole row (a failed constraint's), or the
        values of a sensitive column (a key's): withheld.
        """
        columns, withheld = quote
        if columns is None or any(self.sensitive(name) or name in self.detail_names for name in columns):
            return withheld, 1
        return value, 0


_DOUBLE = numpy.array([0, 2, 4, 6, 8, 1, 3, 5, 7, 9], dtype=numpy.int64)
# Digits and separators become "0", everything else "x": no run of 13 "0"
# means no card number, found with a plain substring search (the regular
# expression engine is far slower on every byte).
_REGIONS = bytes(48 if (48 <= byte <= 57 or byte in (32, 45)) else 120 for byte in range(256))
_WINDOW = b"0" * cards.MIN_DIGITS


def _located_positions(data, start, end, locate, keep):
    """
    The card numbers in the digit run C{data[start:end]} of encoded rows,
    read within each value it spans (C{locate}: see
    L{Masker.rows_in_place}), separators at a value's edges left out.

    @return: C{(positions in data to hide, card numbers found)}.
    """
    spans = locate(start, end)
    if spans is None:
        spans = ((start, end),)
    positions = []
    count = 0
    for first, last in spans:
        while first < last and data[first] in _SEPARATORS:
            first += 1
        while last > first and data[last - 1] in _SEPARATORS:
            last -= 1
        if last - first < cards.MIN_DIGITS:
            continue
        hidden, found = cards.run_positions(data[first:last], keep)
        if hidden is None:
            continue
        positions.extend(first + offset for offset in hidden)
        count += found
    return positions, count
# From this size on, a batch is scanned with vectorised operations.
VECTOR_THRESHOLD = 2048


def scan(data):
    """
    Where card numbers may be in C{data}, found with vectorised operations:
    the runs of 13 to 22 digits that stand alone (no single separator joins
    them to other digits), and the spans of digit groups joined by single
    separators holding 13 digits or more, to be read group by group.

    @return: None when there is nothing, else C{(bytes as an array, run
        starts, run ends, [(start, end)] of joined spans)}.
    """
    array = numpy.frombuffer(data, dtype=numpy.uint8)
    size = len(array)
    padded = numpy.zeros(size + 2, dtype=numpy.int8)
    numpy.less(array - 48, 10, out=padded[1:-1].view(numpy.bool_))
    edges = numpy.flatnonzero(padded[1:] != padded[:-1])
    starts = edges[0::2]
    ends = edges[1::2]
    lengths = ends - starts
    # A separator joins two runs when it is the only byte between them.
    gaps = starts[1:] - ends[:-1] == 1
    if gaps.any():
        between = array[ends[:-1][gaps]]
        gaps[gaps] = (between == 32) | (between == 45)
    if not gaps.any():
        candidates = (lengths >= cards.MIN_DIGITS) & (lengths <= cards.MAX_DIGITS + 3)
        if not candidates.any():
            return None
        return array, starts[candidates], ends[candidates], []
    count = len(starts)
    opens = numpy.ones(count, dtype=bool)
    opens[1:] = ~gaps
    chain = numpy.cumsum(opens) - 1
    runs = numpy.bincount(chain)
    alone = runs[chain] == 1
    candidates = alone & (lengths >= cards.MIN_DIGITS) & (lengths <= cards.MAX_DIGITS + 3)
    chains = []
    joined = runs >= 2
    if joined.any():
        digits = numpy.bincount(chain, weights=lengths)
        long_chains = joined & (digits >= cards.MIN_DIGITS)
        if long_chains.any():
            firsts = numpy.flatnonzero(opens)
            lasts = numpy.append(firsts[1:] - 1, count - 1)
            chains = list(zip(starts[firsts[long_chains]].tolist(), ends[lasts[long_chains]].tolist()))
    if not candidates.any() and not chains:
        return None
    return array, starts[candidates], ends[candidates], chains


def _luhn(array, starts, lengths):
    """
    Whether each run of digits passes the Luhn check (runs longer than 19
    digits do not).
    """
    valid = numpy.zeros(len(starts), dtype=bool)
    present = numpy.flatnonzero(numpy.bincount(lengths, minlength=cards.MAX_DIGITS + 1)[: cards.MAX_DIGITS + 1])
    for length in present.tolist():
        chosen = numpy.flatnonzero(lengths == length) if len(present) > 1 else numpy.arange(len(starts))
        values = array[starts[chosen][:, None] + _OFFSETS[length]].astype(numpy.int8) - 48
        total = values[:, _PLAIN[length]].sum(axis=1) + _DOUBLE[values[:, _DOUBLED_AT[length]]].sum(axis=1)
        valid[chosen] = total % 10 == 0
    return valid


# Per PAN length: the offsets of its digits, which are doubled (every
# second from the right) and which are not.
_OFFSETS = [numpy.arange(length) for length in range(cards.MAX_DIGITS + 1)]
_DOUBLED_AT = [(length - 1 - numpy.arange(length)) % 2 == 1 for length in range(cards.MAX_DIGITS + 1)]
_PLAIN = [~doubled for doubled in _DOUBLED_AT]


class StreamMasker:
    """
    Masks a byte stream that arrives in chunks cut anywhere (SSH output,
    logs, exec frames, a terminal recording): a card number split across
    two chunks is still caught.  Only the trailing digit groups that might
    still grow into a card number with what follows are held back (at most
    about L{cards.MAX_SPAN} bytes), until the next chunk or the end of the
    stream.  The one stream masker: the mask addon and the recordings use
    it alike.

    @ivar held: the bytes held back.
    @ivar masked: how many card numbers were masked so far.
    """

    def __init__(self, masker=None):
        self.masker = masker if masker is not None else _default_masker()
        self.held = b""
        # Positions in held that an earlier decision already hides.
        self.forced = ()
        self.masked = 0

    def feed(self, data, final=False):
        """
        The next chunk of the stream.

        @param final: this is the end of the stream: release what is held.
        @return: C{(bytes to send now, PANs masked in them)}.
        """
        data = self.held + data if self.held else data
        if not data:
            return b"", 0
        cut = len(data) if final else _tail_start(data)
        hide, count = self.masker._positions(data, cut, final)
        hide.update(self.forced)
        more = hide
        while more:
            # What the stars leave standing alone as a card number is one
            # too (see Masker.rows_in_place): read the starred bytes again.
            starred = bytearray(data)
            for position in hide:
                starred[position] = 42
            more = self.masker._positions(bytes(starred), cut, final)[0] - hide
            hide |= more
        # What is held back is kept as it came, to be read again with what
        # follows; positions already decided stay hidden.
        self.held = data[cut:]
        self.forced = tuple(position - cut for position in hide if position >= cut)
        out = data[:cut]
        if hide:
            out = bytearray(out)
            for position in hide:
                if position < cut:
                    out[position] = 42
            out = bytes(out)
        self.masked += count
        return out, count


_shared = []


def _default_masker():
    if not _shared:
        _shared.append(Masker())
    return _shared[0]


def _tail_start(data):
    """
    Where the bytes that may still grow into a card number begin: the
    groups of the last run of digits that, with what may follow, could
    still make a PAN.
    """
    end = len(data)
    index = end
    if index and data[index - 1] in _SEPARATORS:
        index -= 1
    if index == 0 or not 48 <= data[index - 1] <= 57:
        return end
    digits = 0
    first_group = True
    start = end
    while True:
        group_end = index
        while index > 0 and 48 <= data[index - 1] <= 57:
            index -= 1
        digits += group_end - index
        if digits > cards.MAX_DIGITS:
            # This group cannot be part of a PAN with the groups after it.
            return end if first_group else start
        start = index
        first_group = False
        if index >= 2 and data[index - 1] in _SEPARATORS and 48 <= data[index - 2] <= 57:
            index -= 1
            continue
        return start


class CopyColumnMasker:
    """
    Masks the columns of a COPY TO stream (text or CSV format) by
    position: card number columns forced to BIN and last four, sensitive
    authentication data replaced whole; the other columns are masked as
    any text is.  Rows are cut anywhere by the stream: a partial row is
    held until the rest arrives (at most L{MAX_ROW} bytes).
    """

    MAX_ROW = 1 << 24

    def __init__(self, masker, positions, csv=False, delimiter=None, quote=None, header=False, width=None):
        """
        @param positions: C{{column: "pan" or "sad"}}, or a function of a
            row's number of columns returning it (raising C{ValueError}
            when a row of that many columns cannot be masked).
        @param width: how many columns a row has, when known: a row cut
            into any other number was not read as it was written (an
            encoding whose bytes look like a delimiter or a backslash),
            and is not sent.
        """
        self.masker = masker
        self.place = positions if callable(positions) else (lambda count: positions)
        self.width = width
        self.csv = csv
        self.delimiter = ord(delimiter) if delimiter else (44 if csv else 9)
        self.quote = ord(quote) if quote else 34
        self.header = header
        # The bytes after the last whole row, as they came: each is read
        # once for row ends, and joined only when a row ends (a row cut
        # into many pieces costs its size, not its size times the pieces).
        self._held = []
        self._held_size = 0
        # Whether the held bytes end inside a quoted CSV field.
        self._quoted = False
        self._ends = re.compile(b"[\n%s]" % (re.escape(bytes((self.quote,))),)) if csv else None
        self.masked = 0

    @property
    def held(self):
        """
        The bytes of a row not yet whole.
        """
        return b"".join(self._held)

    def feed(self, data, final=False):
        """
        @return: C{(bytes to send now, values masked)}.
        """
        ends = self._row_ends(data)
        if not ends and not final:
            if data:
                self._held.append(data)
                self._held_size += len(data)
            if self._held_size > self.MAX_ROW:
                raise MaskingError("a COPY row is longer than %d bytes" % (self.MAX_ROW,))
            return b"", 0
        if self._held:
            ends = [self._held_size + end for end in ends]
            self._held.append(data)
            data = b"".join(self._held)
        self._held = []
        self._held_size = 0
        out = []
        count = 0
        start = 0
        for end in ends:
            row = data[start:end]
            start = end
            if self.header:
                self.header = False
                out.append(row)
                continue
            row, found = self._row(row)
            out.append(row)
            count += found
        rest = data[start:]
        if final and rest:
            row, found = self._row(rest)
            out.append(row)
            count += found
            rest = b""
        if final:
            self._quoted = False
        if rest:
            self._held = [rest]
            self._held_size = len(rest)
            if self._held_size > self.MAX_ROW:
                raise MaskingError("a COPY row is longer than %d bytes" % (self.MAX_ROW,))
        self.masked += count
        return b"".join(out), count

    def _row_ends(self, data):
        """
        The offsets in C{data} just after each newline that ends a row,
        the quoting state carried over from the bytes before.
        """
        if not self.csv:
            ends = []
            position = data.find(b"\n")
            while position >= 0:
                ends.append(position + 1)
                position = data.find(b"\n", position + 1)
            return ends
        ends = []
        quoted = self._quoted
        quote = self.quote
        for match in self._ends.finditer(data):
            if data[match.start()] == quote:
                quoted = not quoted
            elif not quoted:
                ends.append(match.start() + 1)
        self._quoted = quoted
        return ends

    def _fields(self, row):
        """
        The C{(start, end)} of each field of one row (newline excluded).
        """
        end = len(row)
        if row.endswith(b"\n"):
            end -= 1
            if end and row[end - 1] == 13:
                end -= 1
        fields = []
        start = 0
        quoted = False
        delimiter = self.delimiter
        quote = self.quote
        csv = self.csv
        index = 0
        while index < end:
            byte = row[index]
            if csv and byte == quote:
                quoted = not quoted
            elif not csv and byte == 92:
                # Text format: a backslash escapes the next byte, the
                # delimiter included.
                index += 1
            elif byte == delimiter and not quoted:
                fields.append((start, index))
                start = index + 1
            index += 1
        fields.append((start, end))
        return fields

    def _row(self, row):
        out = bytearray(row)
        count = 0
        replacements = []
        fields = self._fields(row)
        if self.width is not None and len(fields) != self.width:
            raise MaskingError(
                "a COPY row has %d columns where the statement has %d; it cannot be masked by column"
                % (len(fields), self.width)
            )
        try:
            positions = self.place(len(fields))
        except ValueError as error:
            raise MaskingError("a COPY row cannot be masked by column: %s" % (error,))
        for index, (start, end) in enumerate(fields):
            kind = positions.get(index)
            value = row[start:end]
            if kind == "sad":
                if value not in (b"\\N", b""):
                    replacements.append((start, end, REPLACEMENT))
                    count += 1
            elif kind == "pan":
                masked = self.masker.force(value)
                if masked != value:
                    out[start:end] = masked
                    count += 1
            else:
                masked, found = cards.mask_bytes(value, self.masker.style)
                if found:
                    out[start:end] = masked
                    count += found
        for start, end, replacement in reversed(replacements):
            out[start:end] = replacement
        return bytes(out), count
