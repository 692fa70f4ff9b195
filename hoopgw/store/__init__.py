"""
The evidence store: append-only, hash-chained events.
"""

from twisted.logger import Logger

from hoopgw.store.file import FileStore
from hoopgw.store.errors import StoreError


def open_store(config, reactor):
    """
    Open the store a L{hoopgw.config.StoreConfig} describes.

    @raise StoreError: when it cannot be used.
    """
    if config.backend == "postgres":
        from hoopgw.store.postgres import PostgresStore

        if config.retention is not None:
            raise StoreError(
                "gateway.store.retention applies to the file backend; a PostgreSQL store keeps every row: "
                "export bundles on a schedule (hoopgw export) and archive them instead"
            )
        store = PostgresStore(
            config.postgres, reactor, durability=config.durability, low_water=config.low_water, low_water_percent=config.low_water_percent,
            space_check_interval=config.space_check_interval,
        )
    else:
        store = FileStore(
            config.path, reactor, durability=config.durability, sync_interval=config.sync_interval,
            segment_bytes=config.segment_bytes, sync_process=config.sync_process,
            low_water=config.low_water, low_water_percent=config.low_water_percent, reserve=config.reserve,
            space_check_interval=config.space_check_interval,
        )
        if config.retention is not None:
            store.use_retention(config.retention)
    if not config.fsync:
        Logger().warn("gateway.store.fsync: false is deprecated; it is read as durability: write-ahead "
                      "(see docs/performance.rst)")
    store.open()
    return store


__all__ = ["FileStore", "StoreError", "open_store"]
