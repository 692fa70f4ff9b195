"""
Just-in-time approvals, for every protocol: the broker commands wait in,
the admin HTTP API and CLI approvers act through, and webhooks that tell
them a request is waiting.
"""

from hoopgw.approvals.broker import ApprovalError, ApprovalRule, Broker, Grant, Request, approval_digest


def make_broker(config, reactor, record, store=None, instance=None):
    """
    The gateway's broker, when the admin listener is configured (approvers
    act through it); None otherwise.  On a PostgreSQL store it is shared
    with every gateway of the store; on the file store it is this
    process's own.

    @param store: the gateway's open store.
    @param instance: the gateway's run (L{hoopgw.gateway.Gateway.instance}).
    """
    admin = config.gateway.admin
    if admin is None:
        return None
    url = admin.get("url")
    if url is None:
        scheme = "https" if admin["tls_certificate"] else "http"
        url = "%s://%s" % (scheme, _host_port(admin["listen"]))
    options = dict(approver_groups=admin["approver_groups"], url=url, instance=instance)
    if config.gateway.store.backend == "postgres" and store is not None:
        from hoopgw.approvals.shared import SharedBroker

        return SharedBroker(reactor, store, record, reconcile_interval=admin["reconcile_interval"], **options)
    return Broker(reactor, record, **options)


def _host_port(listen):
    """
    C{tcp:8443:interface=127.0.0.1} -> C{127.0.0.1:8443}.
    """
    parts = listen.split(":")
    port = next((part for part in parts[1:] if part.isdigit()), "")
    host = "127.0.0.1"
    for part in parts:
        if part.startswith("interface="):
            host = part[len("interface=") :] or host
    return "%s:%s" % (host, port)


__all__ = ["ApprovalError", "ApprovalRule", "Broker", "Grant", "Request", "approval_digest", "make_broker"]
