"""
A witness outside the store: every signed checkpoint's line is appended to
a file on another path (another volume, ideally another machine's mount),
the signed-tree-head idea of RFC 6962/9162.  Who can delete the store's
last events cannot reach the witness as well, so C{hoopgw verify --witness
FILE} catches a record cut back to an earlier checkpoint, which the record
alone cannot show.
"""

import os

import orjson
from twisted.logger import Logger

from hoopgw import options as o
from hoopgw.options import ConfigError

OPTIONS = (
    o.Option(
        "file",
        lambda value, path: o.resolve(o.string(value, path)),
        o.REQUIRED,
        "A file the gateway appends each signed checkpoint to (one JSON line each), on another volume than "
        "the store; 'hoopgw verify --witness FILE' checks the record still holds every one.",
    ),
)


def parse_options(raw, path):
    """
    C{gateway.witness}: C{{file: PATH}}.
    """
    witness = FileWitness(**o.parse_options(OPTIONS, raw, path))
    folder = os.path.dirname(witness.path) or "."
    if not os.path.isdir(folder):
        raise ConfigError(o.join(path, "file"), "the folder %s does not exist: create it (on another volume than the store)" % (folder,))
    return witness


class FileWitness:
    """
    Appends signed checkpoints to a file, durably (one fsync each:
    checkpoints are rare, every C{checkpoint_events} or C{checkpoint_interval}).

    @ivar failed: why the last publication failed, or None.
    """

    log = Logger()

    def __init__(self, file):
        self.path = file
        self.failed = None

    def __eq__(self, other):
        return isinstance(other, FileWitness) and other.path == self.path

    def __hash__(self):
        return hash(self.path)

    def __repr__(self):
        return "FileWitness(%r)" % (self.path,)

    def publish(self, checkpoint):
        """
        Append C{checkpoint} (a sealed, signed checkpoint event) to the file.
        A failure is logged and kept in L{failed}, never raised: the record
        itself is intact, only its outside copy of the head lags.
        """
        line = orjson.dumps(checkpoint, option=orjson.OPT_SORT_KEYS) + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as error:
            self.failed = "writing the witness %s failed: %s" % (self.path, error.strerror)
            self.log.error(
                "The head at seq {seq} was not published: {why}; verify --witness will not know it",
                seq=checkpoint.get("seq"), why=self.failed,
            )
            return False
        self.failed = None
        return True
