"""
Asciicast v2 (asciinema's format): a JSON header line, then one JSON line
per event, C{[seconds since start, "o", text]} for output (C{"i"} input,
C{"r"} resize, C{"m"} marker).  The terminal front ends write these; the
replay tools read them.
"""

import json

import attr


class CastError(Exception):
    """
    The recording is not an asciicast v2 file.
    """


@attr.s(frozen=True)
class Cast:
    width = attr.ib()
    height = attr.ib()
    header = attr.ib()
    frames = attr.ib()

    @property
    def duration(self):
        return self.frames[-1][0] if self.frames else 0.0

    def output(self):
        """
        Everything the terminal printed, in one string.
        """
        return "".join(data for _, code, data in self.frames if code == "o")


def parse(data):
    """
    @param data: the file's bytes.
    @raise CastError: naming the line that is not valid.
    """
    lines = data.decode("utf-8", "replace").splitlines()
    if not lines:
        raise CastError("the recording is empty")
    try:
        header = json.loads(lines[0])
    except ValueError:
        raise CastError("the recording's first line is not an asciicast header")
    if not isinstance(header, dict) or header.get("version") != 2:
        raise CastError("only asciicast version 2 recordings can be played")
    frames = []
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            when, code, payload = json.loads(line)
            frames.append((float(when), str(code), str(payload)))
        except (ValueError, TypeError):
            raise CastError("line %d of the recording is not an asciicast event" % (number,))
    return Cast(width=header.get("width", 80), height=header.get("height", 24), header=header, frames=frames)


def write(width, height, frames, timestamp=None, title=None):
    """
    The bytes of an asciicast v2 file with C{frames} (C{(seconds, code,
    text)}).
    """
    header = {"version": 2, "width": width, "height": height}
    if timestamp is not None:
        header["timestamp"] = int(timestamp)
    if title:
        header["title"] = title
    lines = [json.dumps(header)] + [json.dumps([round(when, 6), code, text]) for when, code, text in frames]
    return ("\n".join(lines) + "\n").encode("utf-8")
