"""
OpenSSH user certificates (PROTOCOL.certkeys in the OpenSSH sources):
read one from its wire blob, check the certificate authority's signature
with C{cryptography}, and check what it allows (type, validity window,
principals, critical options).  Conch does not know this format.
"""

import datetime
import ipaddress

import attr
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from hoopgw.ssh.publickeys import Reader, WireError, fingerprint, string


USER_CERTIFICATE = 1
HOST_CERTIFICATE = 2
FOREVER = 0xFFFFFFFFFFFFFFFF

_CURVES = {
    b"nistp256": (ec.SECP256R1, hashes.SHA256),
    b"nistp384": (ec.SECP384R1, hashes.SHA384),
    b"nistp521": (ec.SECP521R1, hashes.SHA512),
}

# The certificate types the gateway reads, and the plain key type each
# certifies.  DSA and security-key (sk-*) certificates are refused.
CERTIFICATE_TYPES = {
    "ssh-ed25519-cert-v01@openssh.com": "ssh-ed25519",
    "ssh-rsa-cert-v01@openssh.com": "ssh-rsa",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com": "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com": "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com": "ecdsa-sha2-nistp521",
}

# Critical options the gateway understands; any other one refuses the
# certificate, as OpenSSH does.
KNOWN_CRITICAL_OPTIONS = ("source-address",)


class CertificateError(Exception):
    """
    A certificate was refused.  C{str()} is a sentence for the client;
    C{reason} a short code for the record.
    """

    def __init__(self, message, reason="invalid-certificate"):
        Exception.__init__(self, message)
        self.reason = reason


def is_certificate(key_type_name):
    return key_type_name.endswith("-cert-v01@openssh.com")


@attr.s(frozen=True)
class Certificate:
    """
    An OpenSSH certificate, read but not yet trusted.

    @ivar key: the blob of the plain public key it certifies.
    @ivar signed: the bytes the CA signed.
    """

    type_name = attr.ib()
    key = attr.ib(repr=False)
    serial = attr.ib()
    cert_type = attr.ib()
    key_id = attr.ib()
    principals = attr.ib()
    valid_after = attr.ib()
    valid_before = attr.ib()
    critical_options = attr.ib()
    extensions = attr.ib()
    signature_key = attr.ib(repr=False)
    signature = attr.ib(repr=False)
    signed = attr.ib(repr=False)

    @property
    def key_fingerprint(self):
        return fingerprint(self.key)

    @property
    def ca_fingerprint(self):
        return fingerprint(self.signature_key)

    def describe(self):
        """
        What the record keeps about the certificate (no secret in it).
        """
        return {
            "key_id": self.key_id,
            "serial": self.serial,
            "principals": list(self.principals),
            "valid_after": _timestamp(self.valid_after),
            "valid_before": _timestamp(self.valid_before),
            "ca_fingerprint": self.ca_fingerprint,
            "key_fingerprint": self.key_fingerprint,
            "critical_options": sorted(self.critical_options),
            "extensions": sorted(self.extensions),
        }


def _timestamp(value):
    if value == FOREVER:
        return "forever"
    return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _options(blob, what):
    """
    Critical options or extensions: a sequence of (name, data) where the
    data of a critical option is itself a string.
    """
    reader = Reader(blob)
    result = {}
    previous = None
    while reader.remaining:
        name = reader.text()
        data = reader.string()
        if previous is not None and name <= previous:
            raise WireError("the certificate's %s are not in order or repeat %r" % (what, name))
        previous = name
        result[name] = data
    return result


def parse(blob):
    """
    Read a certificate blob.

    @raise CertificateError: when it is malformed or of a type the gateway
        does not accept.
    """
    reader = Reader(blob)
    try:
        type_name = reader.text()
        plain = CERTIFICATE_TYPES.get(type_name)
        if plain is None:
            raise CertificateError(
                "%s certificates are not accepted (use Ed25519, ECDSA or RSA keys)" % (type_name,), "certificate-type"
            )
        reader.string()  # nonce
        if plain == "ssh-ed25519":
            key = string(plain.encode()) + string(reader.string())
        elif plain == "ssh-rsa":
            exponent = reader.mpint()
            modulus = reader.mpint()
            key = string(plain.encode()) + string(exponent) + string(modulus)
        else:
            curve = reader.string()
            point = reader.string()
            key = string(plain.encode()) + string(curve) + string(point)
        serial = reader.uint64()
        cert_type = reader.uint32()
        key_id = reader.text()
        principals_reader = Reader(reader.string())
        principals = []
        while principals_reader.remaining:
            principals.append(principals_reader.text())
        valid_after = reader.uint64()
        valid_before = reader.uint64()
        critical_options = _options(reader.string(), "critical options")
        extensions = _options(reader.string(), "extensions")
        reader.string()  # reserved
        signature_key = reader.string()
        signed = bytes(blob[: reader.position])
        signature = reader.string()
        reader.end()
    except WireError as error:
        raise CertificateError("the certificate is malformed (%s)" % (error,), "malformed-certificate")
    return Certificate(
        type_name=type_name,
        key=key,
        serial=serial,
        cert_type=cert_type,
        key_id=key_id,
        principals=tuple(principals),
        valid_after=valid_after,
        valid_before=valid_before,
        critical_options=critical_options,
        extensions=extensions,
        signature_key=signature_key,
        signature=signature,
        signed=signed,
    )


def _public_key(blob):
    """
    A C{cryptography} public key from an SSH key blob (a CA's key).
    """
    reader = Reader(blob)
    name = reader.string()
    if name == b"ssh-ed25519":
        key = ed25519.Ed25519PublicKey.from_public_bytes(reader.string())
    elif name == b"ssh-rsa":
        exponent = int.from_bytes(reader.mpint(), "big", signed=True)
        modulus = int.from_bytes(reader.mpint(), "big", signed=True)
        key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    elif name.startswith(b"ecdsa-sha2-"):
        curve_name = reader.string()
        if curve_name not in _CURVES or name != b"ecdsa-sha2-" + curve_name:
            raise CertificateError("the CA key's curve %r is not supported" % (curve_name,), "ca-key")
        key = ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[curve_name][0](), reader.string())
    else:
        raise CertificateError("CA keys of type %r are not supported" % (name.decode("ascii", "replace"),), "ca-key")
    reader.end()
    return name, key


def verify_signature(certificate, ca_blob):
    """
    Check that the CA whose public key blob is C{ca_blob} signed
    C{certificate}.  SHA-1 RSA signatures (C{ssh-rsa}) are refused, as
    OpenSSH has refused them since 8.8.

    @raise CertificateError: when it did not.
    """
    if certificate.signature_key != ca_blob:
        raise CertificateError("the certificate was not signed by this CA", "unknown-ca")
    try:
        name, key = _public_key(ca_blob)
        reader = Reader(certificate.signature)
        algorithm = reader.text()
        signature = reader.string()
        reader.end()
        data = certificate.signed
        if name == b"ssh-ed25519" and algorithm == "ssh-ed25519":
            key.verify(signature, data)
        elif name == b"ssh-rsa" and algorithm in ("rsa-sha2-256", "rsa-sha2-512"):
            digest = hashes.SHA256() if algorithm == "rsa-sha2-256" else hashes.SHA512()
            key.verify(signature, data, padding.PKCS1v15(), digest)
        elif name.startswith(b"ecdsa-sha2-") and algorithm == name.decode("ascii"):
            pair = Reader(signature)
            r = int.from_bytes(pair.mpint(), "big", signed=True)
            s = int.from_bytes(pair.mpint(), "big", signed=True)
            pair.end()
            digest = _CURVES[name[len(b"ecdsa-sha2-") :]][1]()
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(digest))
        elif algorithm == "ssh-rsa":
            raise CertificateError(
                "the certificate is signed with SHA-1 (ssh-rsa), which is not accepted; "
                "sign it again with ssh-keygen -t rsa-sha2-512",
                "weak-signature",
            )
        else:
            raise CertificateError(
                "the certificate's signature algorithm %r does not match its CA key" % (algorithm,), "signature"
            )
    except InvalidSignature:
        raise CertificateError("the certificate's CA signature is not valid", "signature")
    except (WireError, ValueError, KeyError) as error:
        raise CertificateError("the certificate's signature is malformed (%s)" % (error,), "signature")


def check(certificate, now, client_host=None, max_validity=None):
    """
    Check what a certificate allows, once its signature is trusted: a user
    certificate, inside its validity window, with at least one principal,
    no critical option the gateway does not enforce, and a client address
    its C{source-address} allows.

    @param now: the current time, in seconds since the epoch.
    @param max_validity: refuse certificates valid for longer than this
        many seconds (None: no limit).
    @raise CertificateError: saying what is wrong.
    """
    if certificate.cert_type != USER_CERTIFICATE:
        raise CertificateError("this is a host certificate, not a user certificate", "certificate-type")
    if now < certificate.valid_after:
        raise CertificateError(
            "the certificate is not valid before %s" % (_timestamp(certificate.valid_after),), "not-yet-valid"
        )
    if now >= certificate.valid_before:
        raise CertificateError("the certificate expired at %s" % (_timestamp(certificate.valid_before),), "expired")
    if max_validity is not None and certificate.valid_before - certificate.valid_after > max_validity:
        raise CertificateError(
            "the certificate is valid for longer than the %d seconds this gateway accepts; "
            "issue a shorter-lived one (ssh-keygen -V)" % (max_validity,),
            "lifetime",
        )
    if not certificate.principals:
        raise CertificateError(
            "the certificate names no principal; the gateway needs one naming the identity (ssh-keygen -n)",
            "no-principal",
        )
    unknown = sorted(set(certificate.critical_options) - set(KNOWN_CRITICAL_OPTIONS))
    if unknown:
        raise CertificateError(
            "the certificate has critical options the gateway does not enforce (%s), so it is refused"
            % (", ".join(unknown),),
            "critical-option",
        )
    if "source-address" in certificate.critical_options:
        _check_source(certificate.critical_options["source-address"], client_host)


def _check_source(data, client_host):
    try:
        allowed = Reader(data).text()
        networks = [ipaddress.ip_network(item.strip(), strict=False) for item in allowed.split(",") if item.strip()]
    except (WireError, ValueError):
        raise CertificateError("the certificate's source-address option is malformed", "critical-option")
    try:
        address = ipaddress.ip_address(client_host or "")
    except ValueError:
        address = None
    if address is None or not any(address in network for network in networks):
        raise CertificateError(
            "the certificate may only be used from %s, not from %s" % (allowed, client_host), "source-address"
        )


def permits(certificate, extension):
    """
    Whether the certificate carries the extension C{extension} (such as
    C{permit-pty} or C{permit-port-forwarding}).
    """
    return extension in certificate.extensions


__all__ = ["Certificate", "CertificateError", "check", "is_certificate", "parse", "permits", "verify_signature"]
