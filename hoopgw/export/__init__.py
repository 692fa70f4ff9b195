"""
Streaming the record to the organisation's SIEM: sinks (syslog over TLS,
HTTPS JSON, a rotating JSON-lines file) that read the store after its
events are durable, each from its own persisted cursor, at least once.
(Not to be confused with L{hoopgw.store.export}, which writes evidence
bundles.)
"""
