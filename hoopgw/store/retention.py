"""
Retention of a file store: segments older than the online period are
compressed into C{archive/} (moved, never edited: the same lines, gzip'd);
with C{purge}, archived segments older than the keep period are removed,
and with them the terminal recordings their events commit (a recording
lives as long as the events that vouch for it).  Each step is an event in
the chain (C{store.archived}, C{store.purged})
followed by a signed checkpoint, written before any file goes, so verify
passes across archives and can tell a purge from a deletion.

The PCI DSS 10.5.1 preset keeps 12 months of history, the last 3 months
immediately available (uncompressed, in place).
"""

import gzip
import hashlib
import json
import os
import shutil

import attr
from twisted.internet import defer, threads

from hoopgw import options as o
from hoopgw.options import ConfigError, join
from hoopgw.store import events
from hoopgw.store.segments import ARCHIVE, ARCHIVED, segment_paths, sync_folder

DAY = 86400.0

PRESETS = {
    # PCI DSS v4.0 10.5.1: at least twelve months, at least the most recent
    # three months immediately available for analysis.
    "pci-dss-10.5.1": {"online": 92 * DAY, "keep": 366 * DAY, "purge": False},
}


@attr.s(frozen=True)
class RetentionPolicy:
    online = attr.ib()
    keep = attr.ib()
    purge = attr.ib(default=False)
    check_interval = attr.ib(default=3600.0)
    preset = attr.ib(default=None)

    def describe(self):
        text = "%d days online, %d days kept" % (self.online / DAY, self.keep / DAY)
        if self.preset:
            text += " (%s)" % (self.preset,)
        return text


OPTIONS = (
    o.Option("preset", o.choice(*sorted(PRESETS)), None, "Start from a preset: pci-dss-10.5.1."),
    o.Option("online", o.duration, None, "How long segments stay uncompressed in place (e.g. 92d)."),
    o.Option("keep", o.duration, None, "How long archived segments are kept in all (e.g. 366d)."),
    o.Option("purge", o.boolean, None, "Remove archived segments older than keep (off: keep them for ever)."),
    o.Option("check_interval", o.duration, 3600.0, "How often the gateway looks for segments to archive."),
)


def parse_retention(value, path):
    """
    C{"pci-dss-10.5.1"}, or a mapping of L{OPTIONS}.
    """
    if isinstance(value, str):
        value = {"preset": value}
    values = o.parse_options(OPTIONS, value, path)
    settings = dict(PRESETS.get(values["preset"]) or {})
    for name in ("online", "keep", "purge"):
        if values[name] is not None:
            settings[name] = values[name]
    if "online" not in settings or "keep" not in settings:
        raise ConfigError(path, "give a preset (pci-dss-10.5.1) or both online and keep")
    if values["preset"] == "pci-dss-10.5.1" and (settings["online"] < 90 * DAY or settings["keep"] < 365 * DAY):
        raise ConfigError(path, "PCI DSS 10.5.1 asks for at least 3 months online and 12 months kept")
    if settings["keep"] < settings["online"]:
        raise ConfigError(join(path, "keep"), "must be at least as long as online")
    return RetentionPolicy(
        online=settings["online"],
        keep=settings["keep"],
        purge=bool(settings.get("purge")),
        check_interval=values["check_interval"],
        preset=values["preset"],
    )


def compress(path, directory):
    """
    Write C{path} gzip'd into C{directory} durably (a temporary name, fsync,
    rename), and check it reads back the same.

    @return: C{(archive path, its SHA-256, its size)}.
    """
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, os.path.basename(path) + ".gz")
    partial = target + ".partial"
    with open(path, "rb") as source, open(partial, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed:
            shutil.copyfileobj(source, packed)
        raw.flush()
        os.fsync(raw.fileno())
    with open(path, "rb") as source, gzip.open(partial, "rb") as packed:
        if hashlib.sha256(source.read()).digest() != hashlib.sha256(packed.read()).digest():
            raise IOError("the archive of %s does not read back the same" % (path,))
    os.replace(partial, target)
    sync_folder(directory)
    with open(target, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    return target, digest, os.path.getsize(target)


def committed_casts(path):
    """
    The names of the terminal recordings the events of a segment (plain
    or gzip'd) commit.
    """
    from hoopgw import cast

    opener = gzip.open if path.endswith(".gz") else open
    names = []
    with opener(path, "rb") as handle:
        for line in handle:
            if b'"cast"' in line:
                entry = cast.committed(json.loads(line))
                if entry is not None and isinstance(entry.get("name"), str):
                    names.append(entry["name"])
    return names


def bounds(path):
    """
    The first and last events of a segment (plain or gzip'd).
    """
    opener = gzip.open if path.endswith(".gz") else open
    first = last = None
    with opener(path, "rb") as handle:
        for line in handle:
            if line.strip():
                if first is None:
                    first = line
                last = line
    return (json.loads(first) if first else None), (json.loads(last) if last else None)


@defer.inlineCallbacks
def archive(store, policy, now, writing):
    """
    Apply C{policy} to the file store C{store} now: compress segments
    whose newest event is older than the online period into C{archive/},
    and with purge, remove archived segments older than the keep period.
    The chain records each step and a checkpoint signs it before any file
    goes.  The segment being written (C{writing}) stays.

    @return: a Deferred firing with C{(archived names, purged names)}.
    """
    archive_dir = os.path.join(store.directory, ARCHIVE)
    archived, removals = [], []
    for path in segment_paths(store.directory):
        if path == writing:
            break
        first, last = yield threads.deferToThread(bounds, path)
        if last is None or now - events.epoch(last["ts"]) < policy.online:
            break
        target, digest, size = yield threads.deferToThread(compress, path, archive_dir)
        yield store.append({
            "type": "store.archived",
            "segment": os.path.basename(path),
            "archive": os.path.join(ARCHIVE, os.path.basename(target)),
            "first_seq": first["seq"],
            "last_seq": last["seq"],
            "last_hash": last["hash"],
            "sha256": digest,
            "bytes": size,
            "reason": "older than %d days online (%s)" % (policy.online / 86400, policy.describe()),
        })
        archived.append(os.path.basename(path))
        removals.append(path)
    purged = []
    if policy.purge:
        names = sorted(name for name in os.listdir(archive_dir) if ARCHIVED.match(name)) if os.path.isdir(archive_dir) else []
        for name in names:
            path = os.path.join(archive_dir, name)
            first, last = yield threads.deferToThread(bounds, path)
            if last is None or now - events.epoch(last["ts"]) < policy.keep:
                break
            recordings = yield threads.deferToThread(committed_casts, path)
            yield store.append({
                "type": "store.purged",
                "archive": os.path.join(ARCHIVE, os.path.basename(path)),
                "first_seq": first["seq"],
                "up_to": {"seq": last["seq"], "hash": last["hash"]},
                "casts": len(recordings),
                "reason": "older than %d days kept (%s)" % (policy.keep / 86400, policy.describe()),
            })
            purged.append(os.path.basename(path))
            removals.append(path)
            removals.extend(
                os.path.join(store.casts, name)
                for name in recordings
                if os.sep not in name and not name.startswith(".") and os.path.exists(os.path.join(store.casts, name))
            )
    if removals:
        if store.signer is not None:
            yield store.checkpoint("retention")
        for path in removals:
            os.unlink(path)
    return archived, purged
