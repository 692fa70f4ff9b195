"""
C{hoopgw whoami}: the identity and groups the gateway would derive from a
token or a client certificate, connection by connection (each may take
groups from a directory), which connections that identity may use, and
why.  A dry run: single-use tokens are not marked used.
"""

import json

from cryptography import x509
from OpenSSL import crypto
from twisted.internet import defer

from hoopgw.identity.certificates import as_certificate
from hoopgw.identity.errors import IdentityError
from hoopgw import offline
from hoopgw.model import Credentials


@defer.inlineCallbacks
def evaluate(config, reactor, token=None, certificate=None, only=None):
    """
    What each connection would decide about these credentials.

    @param certificate: PEM bytes of a client certificate, or None.
    @return: a L{Deferred} firing with a list of mappings, one per
        connection: C{connection}, C{allowed}, C{reason}, and C{identity}
        (its JSON form) when one was established.
    """
    gateway = offline.OfflineGateway(
        reactor, {name: provider.build(reactor) for name, provider in config.identity_providers.items()}
    )
    results = []
    for name, connection in sorted(config.connections.items()):
        if only is not None and name != only:
            continue
        entry = {"connection": name, "protocol": connection.protocol, "allowed_groups": sorted(connection.allowed_groups)}
        results.append(entry)
        spec = next((spec for spec in connection.addons if spec.name == "identity"), None)
        if spec is None:
            entry.update(allowed=False, reason="its chain has no identity addon, so nobody gets in")
            continue
        addon = spec.factory.build(spec.options, offline.context(connection, gateway))
        presented, chain = _presented(certificate)
        if presented is not None:
            unheard = _certificate_unheard(connection, presented, chain)
            if unheard is not None:
                # The gateway would never see it: decide as it would.
                entry["certificate_ignored"] = unheard
                presented = None
        credentials = Credentials(password=token, client_certificate=presented)
        try:
            identity = yield addon.derive(credentials, consume=False)
        except IdentityError as error:
            entry.update(allowed=False, reason=str(error), refused=error.reason)
            continue
        entry["identity"] = identity.to_json()
        granted = sorted(identity.groups & connection.allowed_groups)
        if granted:
            entry.update(allowed=True, reason="%s is in %s" % (identity.subject, ", ".join(granted)))
            # A Kubernetes client gives no login name, only its credential.
            if spec.options.get("match_user") and connection.protocol != "kubernetes":
                entry["login_as"] = identity.subject
        else:
            entry.update(
                allowed=False,
                reason="%s is not in any group allowed to use this connection (%s)"
                % (identity.subject, ", ".join(sorted(connection.allowed_groups))),
            )
    return results


def _presented(certificate):
    """
    The client certificate and the intermediates after it, from what
    C{--certificate} read (a PEM file may hold the chain a client sends,
    as libpq's sslcert and kubectl's client-certificate do).
    """
    if certificate is None:
        return None, ()
    if isinstance(certificate, bytes) and certificate.count(b"-----BEGIN CERTIFICATE-----") > 1:
        leaf, *chain = x509.load_pem_x509_certificates(certificate)
        return leaf, tuple(chain)
    return as_certificate(certificate), ()


def _certificate_unheard(connection, certificate, chain=()):
    """
    Why a client certificate would not reach this connection's identity
    addon (its TLS does not ask for one, or would refuse this one), or
    C{None}.  The certificate is verified as the TLS layer verifies it
    (OpenSSL, against C{tls.client_ca}, with the intermediates C{chain}
    the client would send, validity dates included).
    """
    tls = getattr(connection.settings, "tls", None)
    if tls is None or not hasattr(tls, "client_ca"):
        return "this connection does not take TLS client certificates"
    if tls.client_ca is None:
        return "this connection does not ask clients for certificates (its tls.client_ca is not set)"
    with open(tls.client_ca, "rb") as handle:
        authorities = x509.load_pem_x509_certificates(handle.read())
    store = crypto.X509Store()
    for authority in authorities:
        store.add_cert(crypto.X509.from_cryptography(authority))
    context = crypto.X509StoreContext(
        store, crypto.X509.from_cryptography(certificate), chain=[crypto.X509.from_cryptography(c) for c in chain]
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as error:
        return "this connection's TLS would not verify it: %s" % (error,)
    return None


def describe(results):
    """
    The results as text for a person.
    """
    lines = []
    for entry in results:
        verdict = "may connect" if entry["allowed"] else "may NOT connect"
        lines.append("%s (%s): %s: %s" % (entry["connection"], entry["protocol"], verdict, entry["reason"]))
        if entry.get("certificate_ignored"):
            lines.append("  certificate not considered: %s" % (entry["certificate_ignored"],))
        identity = entry.get("identity")
        if identity is not None:
            provenance = identity["provenance"]
            lines.append(
                "  identity: %s (%s), proven by %s, issuer %s"
                % (identity["subject"], identity["kind"], identity["method"], identity["issuer"])
            )
            lines.append("  groups: %s" % (", ".join(identity["groups"]) or "(none)",))
            for source, groups in sorted((provenance.get("groups") or {}).items()):
                if source != "decided":
                    lines.append("    from %s: %s" % (source, ", ".join(groups) or "(none)"))
            details = []
            for key in ("provider", "kid", "algorithm", "keys", "idp", "certificate_fingerprint"):
                if provenance.get(key):
                    details.append("%s %s" % (key, provenance[key]))
            if provenance.get("certificate"):
                details.append("certificate %s" % (provenance["certificate"].get("certificate_fingerprint"),))
            directory = provenance.get("directory")
            if directory:
                details.append(
                    "directory %s at %s" % (directory.get("provider"), directory.get("server") or directory.get("error"))
                )
            if details:
                lines.append("  how: " + "; ".join(details))
            if entry.get("login_as"):
                lines.append("  log in as: %s" % (entry["login_as"],))
    return "\n".join(lines)


def as_json(results):
    return json.dumps(results, indent=2, sort_keys=True)
