"""
The file store's sync process: it makes the store's current segment
durable when the gateway asks, so that the gateway's event loop never waits
on the disk.  It runs as its own program (C{python -I _syncer.py}) and
imports nothing but the standard library.

Requests arrive on standard input, one a line, and are answered in order on
standard output, one line each, C{ok} or C{error REASON}:

  - C{open PATH}: make the segment open so far durable (if any), then
    follow the segment at PATH (created by the gateway a moment before):
    its folder entry is made durable too;
  - C{sync}: make everything written to the current segment so far durable.

It ends when its standard input closes, or quietly when the gateway is no
longer there to read an answer.

fdatasync acts on the file, not on the descriptor: the gateway's writes,
which returned before it asked, are covered.  The segment is opened before
anything is written to it, so a write-back error on it is reported here.
"""

import os
import sys


def main():
    current = None
    for line in sys.stdin.buffer:
        command, _, argument = line.rstrip(b"\n").partition(b" ")
        try:
            if command == b"open":
                if current is not None:
                    os.fdatasync(current)
                    os.close(current)
                    current = None
                current = os.open(argument, os.O_RDONLY)
                folder = os.open(os.path.dirname(argument) or b".", os.O_RDONLY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
            elif command == b"sync":
                if current is None:
                    raise OSError(0, "no segment is open")
                os.fdatasync(current)
            else:
                raise OSError(0, "unknown request %r" % (command,))
            reply = b"ok\n"
        except OSError as error:
            reply = b"error " + (error.strerror or str(error)).encode("utf-8", "replace").replace(b"\n", b" ") + b"\n"
        try:
            os.write(1, reply)
        except BrokenPipeError:
            # The gateway has gone (it stopped, or could not start): nobody
            # is left to hear the answer.
            return


if __name__ == "__main__":
    main()
