"""
Who a key proves: a public key registered for an identity on the
connection, or an OpenSSH certificate from a configured CA whose
principal is an identity here.  The front end proves the client holds
the key (the SSH signature); this module says which identity that is.
"""

import attr

from hoopgw.model import Identity
from hoopgw.ssh import certificates
from hoopgw.ssh.publickeys import WireError, fingerprint, key_type


class KeyRefused(Exception):
    """
    The key or certificate proves nobody here.  C{str()} is a sentence for
    the client; C{reason} is a short code.
    """

    def __init__(self, message, reason):
        Exception.__init__(self, message)
        self.reason = reason


@attr.s(frozen=True)
class KeyProof:
    """
    What the front end hands the identity addon (in
    C{Credentials.ssh_key}) once the client proved it holds the key.

    @ivar identity: the identity the key or certificate maps to.
    @ivar key: the blob of the key that signs (a certificate's inner key).
    @ivar certificate: the L{certificates.Certificate}, or None.
    """

    identity = attr.ib()
    key = attr.ib(repr=False)
    certificate = attr.ib(default=None)

    @property
    def fingerprint(self):
        return fingerprint(self.key)

    def describe(self):
        """
        What the session's attributes record about the key.
        """
        if self.certificate is not None:
            return {"key_fingerprint": self.fingerprint, "certificate": self.certificate.describe()}
        return {"key_fingerprint": self.fingerprint}


def identify(settings, connection_name, blob, client_host, now):
    """
    The identity C{blob} (a public key or certificate) proves on this
    connection, before its signature is checked.

    @raise KeyRefused: when it proves none.
    """
    try:
        name = key_type(blob)
    except WireError:
        raise KeyRefused("the key sent is not an SSH public key", "bad-key")
    if certificates.is_certificate(name):
        return _certificate(settings, blob, client_host, now)
    registered = settings.keys.get(fingerprint(blob))
    if registered is None:
        raise KeyRefused(
            "the key %s is not registered for any identity on this connection" % (fingerprint(blob),), "unknown-key"
        )
    identity = Identity(
        subject=registered.subject,
        issuer="hoopgw:%s" % (connection_name,),
        groups=registered.groups,
        kind=registered.kind,
        method="ssh-key",
        provenance={"key_fingerprint": fingerprint(blob), "key_type": name},
    )
    return KeyProof(identity=identity, key=blob)


def _certificate(settings, blob, client_host, now):
    try:
        certificate = certificates.parse(blob)
        authority = settings.authorities.get(certificate.ca_fingerprint)
        if authority is None:
            raise KeyRefused(
                "the certificate was signed by a CA this connection does not trust (%s)"
                % (certificate.ca_fingerprint,),
                "unknown-ca",
            )
        certificates.verify_signature(certificate, authority.key)
        certificates.check(certificate, now, client_host, authority.max_validity)
    except certificates.CertificateError as problem:
        raise KeyRefused(str(problem), problem.reason)
    known = [principal for principal in certificate.principals if principal in authority.principals]
    if not known:
        raise KeyRefused(
            "none of the certificate's principals (%s) is an identity on this connection"
            % (", ".join(certificate.principals),),
            "unknown-principal",
        )
    if len(known) > 1:
        raise KeyRefused(
            "the certificate names several identities (%s); issue one certificate per identity" % (", ".join(known),),
            "ambiguous-principal",
        )
    registered = authority.principals[known[0]]
    identity = Identity(
        subject=registered.subject,
        issuer="ssh-ca:%s" % (authority.name,),
        groups=registered.groups,
        kind=registered.kind,
        method="ssh-cert",
        token_id=certificate.serial,
        provenance={
            "certificate_id": certificate.key_id,
            "serial": certificate.serial,
            "ca": authority.name,
            "ca_fingerprint": authority.fingerprint,
            "key_fingerprint": certificate.key_fingerprint,
            "valid_before": certificate.describe()["valid_before"],
        },
    )
    return KeyProof(identity=identity, key=certificate.key, certificate=certificate)
