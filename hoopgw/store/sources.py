"""
Where verify, the CLI and the replay server read a record from: a file
store's folder, an exported evidence bundle (a tar.gz), or a PostgreSQL
store.  Each gives the chain's lines in order, the attachments (asciicasts)
and the public keys published with it, and says whether a gateway is
writing to it now.
"""

import errno
import fcntl
import json
import os
import tarfile

from hoopgw.store import file as filestore
from hoopgw.store.errors import SourceError

VIEWS = "views"


class FileSource:
    """
    A file store's folder (read only: it never takes the writer's lock).
    """

    kind = "store"
    anchor = None

    def __init__(self, directory):
        if not os.path.isdir(directory):
            raise SourceError("%s is not a store folder (nor an evidence bundle)" % (directory,))
        self.directory = directory
        self.name = directory

    def entries(self):
        """
        C{(where, raw line, event or None)} for every event, in order.
        """
        for path, number, raw, event in filestore.read_events(self.directory):
            yield "%s line %d" % (os.path.basename(path), number), raw, event

    def attachment(self, name):
        if os.sep in name or name.startswith("."):
            return None
        try:
            with open(os.path.join(self.directory, "casts", name), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def published_keys(self):
        return _read_keys(os.path.join(self.directory, "keys"))

    def live(self):
        """
        Whether a gateway holds the store now (its lock is taken).
        """
        path = os.path.join(self.directory, "store.lock")
        if not os.path.exists(path):
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                return True
            raise
        finally:
            os.close(fd)
        return False

    def running_gateways(self):
        return None

    def views(self):
        """
        The chain of the replay server's views of this record, if any.
        """
        path = os.path.join(self.directory, VIEWS)
        return FileSource(path) if os.path.isdir(path) else None

    def fingerprint(self):
        """
        Changes whenever an event is added: lets readers cache.
        """
        return tuple(
            (path, os.stat(path).st_size) for path in filestore.all_segments(self.directory)
        )


def _read_keys(directory):
    keys = {}
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return keys
    for name in names:
        if name.endswith(".pem"):
            with open(os.path.join(directory, name), encoding="ascii") as handle:
                keys[name[: -len(".pem")]] = handle.read()
    return keys


BUNDLE_FORMAT = "hoopgw-evidence-1"


class BundleSource:
    """
    An evidence bundle made by C{hoopgw export}: a slice of the chain that
    starts after a known hash (its anchor) and ends with a checkpoint.
    """

    kind = "bundle"

    def __init__(self, path, prefix="evidence/", events_name="events.jsonl"):
        self.path = self.name = path
        self._prefix = prefix
        self._events_name = events_name
        try:
            self._tar = tarfile.open(path, "r:gz")
        except (OSError, tarfile.TarError) as error:
            raise SourceError("%s is not an evidence bundle (a tar.gz from 'hoopgw export'): %s" % (path, error))
        self._members = {member.name: member for member in self._tar.getmembers() if member.isfile()}
        manifest = self._read("manifest.json")
        if manifest is None:
            raise SourceError("%s has no evidence/manifest.json: it was not made by 'hoopgw export'" % (path,))
        self.manifest = json.loads(manifest)
        if self.manifest.get("format") != BUNDLE_FORMAT:
            raise SourceError("%s is a bundle of an unknown format %r" % (path, self.manifest.get("format")))
        part = self.manifest.get("views") if events_name != "events.jsonl" else self.manifest
        self.anchor = (part or {}).get("anchor")

    def _read(self, name):
        member = self._members.get(self._prefix + name)
        if member is None:
            return None
        return self._tar.extractfile(member).read()

    def entries(self):
        member = self._members.get(self._prefix + self._events_name)
        if member is None:
            return
        handle = self._tar.extractfile(member)
        for number, raw in enumerate(handle, 1):
            try:
                event = json.loads(raw)
            except ValueError:
                event = None
            yield "%s line %d" % (self._events_name, number), raw, event

    def attachment(self, name):
        if "/" in name or name.startswith("."):
            return None
        return self._read("casts/" + name)

    def published_keys(self):
        keys = {}
        for name in self._members:
            if name.startswith(self._prefix + "keys/") and name.endswith(".pem"):
                keys[os.path.basename(name)[: -len(".pem")]] = self._tar.extractfile(self._members[name]).read().decode("ascii")
        return keys

    def live(self):
        return False

    def running_gateways(self):
        return None

    def views(self):
        if self._prefix + "views.jsonl" not in self._members:
            return None
        return BundleSource(self.path, self._prefix, "views.jsonl")

    def fingerprint(self):
        return os.stat(self.path).st_mtime_ns


def is_postgres(spec):
    return spec.startswith(("postgresql://", "postgres://")) or "dbname=" in spec or "host=" in spec


def open_source(spec):
    """
    The record named by C{spec}: a store folder, a bundle file, or a
    PostgreSQL store's connection string.

    @raise SourceError: if it cannot be read.
    """
    if is_postgres(spec):
        from hoopgw.store.postgres import PostgresSource

        return PostgresSource(spec)
    if os.path.isfile(spec):
        return BundleSource(spec)
    return FileSource(spec)
