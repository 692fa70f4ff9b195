"""
The evidence store: append-only, hash-chained events.
"""

from hoopgw.store.file import FileStore, StoreError


def open_store(config, reactor):
    """
    Open the store a L{hoopgw.config.StoreConfig} describes.

    @raise StoreError: when it cannot be used.
    """
    if config.backend == "postgres":
        from hoopgw.store.postgres import PostgresStore

        store = PostgresStore(config.postgres, reactor)
    else:
        store = FileStore(config.path, reactor, fsync=config.fsync, segment_bytes=config.segment_bytes)
    store.open()
    return store


__all__ = ["FileStore", "StoreError", "open_store"]
