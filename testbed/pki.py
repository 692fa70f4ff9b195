"""
Certificates for tests, demos and development: a throwaway CA and the
certificates it signs.

Nothing here is meant to protect anything real.  L{make_ca} mints a fresh
EC P-256 certificate authority in memory; L{CertificateAuthority.issue}
signs server and client certificates with the subject alternative names a
test needs (DNS names, IP addresses, URIs such as SPIFFE ids).  Both can be
written out as PEM files for programs that want paths (PostgreSQL, curl,
kubectl).
"""

import datetime
import ipaddress
import os

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


DEFAULT_DAYS = 30
_BACKDATE = datetime.timedelta(hours=1)


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key):
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _certificate_pem(certificate):
    return certificate.public_bytes(serialization.Encoding.PEM)


def _write(path, data, mode):
    """
    Write C{data} to C{path}, creating the file with C{mode} so that a
    private key is never readable by others, not even for a moment.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def fingerprint(certificate):
    """
    The SHA-256 fingerprint of a certificate, as lower-case hex pairs
    joined with colons (C{"ab:01:..."}).

    @param certificate: a L{cryptography.x509.Certificate}.
    @rtype: L{str}
    """
    return certificate.fingerprint(hashes.SHA256()).hex(":")


@attr.s(frozen=True, slots=True, repr=False)
class Issued:
    """
    A private key and the certificate a L{CertificateAuthority} signed for
    it.

    @ivar key: the L{cryptography} private key.
    @ivar certificate: the L{cryptography.x509.Certificate}.
    """

    key = attr.ib()
    certificate = attr.ib()

    def __repr__(self):
        return "<Issued %s %s>" % (
            self.certificate.subject.rfc4514_string(),
            fingerprint(self.certificate),
        )

    def key_pem(self):
        """
        The private key, unencrypted PKCS#8 PEM.

        @rtype: L{bytes}
        """
        return _key_pem(self.key)

    def certificate_pem(self):
        """
        The certificate, PEM.

        @rtype: L{bytes}
        """
        return _certificate_pem(self.certificate)

    def write(self, directory, stem):
        """
        Write C{<stem>.crt} and C{<stem>.key} into C{directory}; the key file
        is created with mode 0600.

        @return: C{(cert_path, key_path)}
        """
        cert_path = os.path.join(directory, stem + ".crt")
        key_path = os.path.join(directory, stem + ".key")
        _write(cert_path, self.certificate_pem(), 0o644)
        _write(key_path, self.key_pem(), 0o600)
        return cert_path, key_path


@attr.s(frozen=True, slots=True, repr=False)
class CertificateAuthority:
    """
    A self-signed certificate authority that signs whatever it is asked
    to.  Make one with L{make_ca}.

    @ivar key: the CA's private key.
    @ivar certificate: the CA's self-signed certificate.
    """

    key = attr.ib()
    certificate = attr.ib()

    def __repr__(self):
        return "<CertificateAuthority %s %s>" % (
            self.certificate.subject.rfc4514_string(),
            fingerprint(self.certificate),
        )

    def certificate_pem(self):
        """
        The CA certificate, PEM: what a client or server trusts.

        @rtype: L{bytes}
        """
        return _certificate_pem(self.certificate)

    def key_pem(self):
        """
        The CA's private key, unencrypted PKCS#8 PEM.

        @rtype: L{bytes}
        """
        return _key_pem(self.key)

    def intermediate(self, common_name):
        """
        A new certificate authority signed by this one.

        @rtype: L{CertificateAuthority}
        """
        return make_ca(common_name, issuer=self)

    def write(self, directory, stem="ca"):
        """
        Write C{<stem>.crt} (the CA certificate) and C{<stem>.key} (its key,
        mode 0600) into C{directory}.

        @return: C{(cert_path, key_path)}
        """
        return Issued(self.key, self.certificate).write(directory, stem)

    def issue(
        self,
        common_name,
        dns_names=(),
        ip_addresses=(),
        uris=(),
        client=False,
        server=True,
        days=DEFAULT_DAYS,
        not_before=None,
        not_after=None,
    ):
        """
        Sign a new end-entity certificate for a new EC P-256 key.

        @param common_name: the subject's CN.
        @param dns_names: DNS subject alternative names.
        @param ip_addresses: IP address SANs, as strings or
            L{ipaddress} objects.
        @param uris: URI SANs, e.g. C{"spiffe://example.org/ns/a/sa/b"}.
        @param client: include the C{clientAuth} extended key usage.
        @param server: include the C{serverAuth} extended key usage.
        @param days: validity from C{not_before}, when C{not_after} is not
            given.
        @param not_before: start of validity (aware L{datetime.datetime});
            defaults to an hour ago so clock skew does not matter.
        @param not_after: end of validity; lets a test mint an expired
            certificate.

        @rtype: L{Issued}
        """
        key = _new_key()
        if not_before is None:
            not_before = _now() - _BACKDATE
        if not_after is None:
            not_after = not_before + datetime.timedelta(days=days)

        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.BasicConstraints(ca=False, path_length=None),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()
                ),
                critical=False,
            )
        )

        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if usages:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(usages), critical=False
            )

        names = [x509.DNSName(name) for name in dns_names]
        names += [
            x509.IPAddress(ipaddress.ip_address(address))
            for address in ip_addresses
        ]
        names += [x509.UniformResourceIdentifier(uri) for uri in uris]
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(names), critical=False
            )

        certificate = builder.sign(self.key, hashes.SHA256())
        return Issued(key, certificate)


def make_ca(common_name="hoopgw test CA", issuer=None):
    """
    Mint a new certificate authority: an EC P-256 key and a certificate
    valid from an hour ago for L{DEFAULT_DAYS} days, self-signed, or
    signed by C{issuer} (an intermediate CA).

    @param common_name: the CA's subject CN.
    @param issuer: the L{CertificateAuthority} that signs this one, or
        C{None} for a root.
    @rtype: L{CertificateAuthority}
    """
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer = issuer.key if issuer is not None else key
    not_before = _now() - _BACKDATE
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.certificate.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=DEFAULT_DAYS))
        .add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    return CertificateAuthority(key, builder.sign(signer, hashes.SHA256()))


def main(argv=None):
    """
    Write a throwaway CA and a server certificate it signed, for trying the
    gateway by hand: C{python -m testbed.pki DIRECTORY [--name NAME ...]
    [--client SUBJECT ...]}.

    It writes C{ca.crt} (and its key), C{server.crt} and C{server.key} (for C{localhost}
    and C{127.0.0.1} and every C{--name}: a DNS name or an IP address), and
    C{SUBJECT.crt}/C{SUBJECT.key} client certificates, then prints the
    paths.  Nothing it makes is meant to protect anything real.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m testbed.pki",
        description="DEVELOPMENT ONLY: write a throwaway CA, a server certificate and client certificates.",
    )
    parser.add_argument("directory", help="where to write them (created if missing)")
    parser.add_argument(
        "--name", action="append", default=[], help="another DNS name or IP address for the server certificate"
    )
    parser.add_argument(
        "--client", action="append", default=[], help="a client certificate for this subject (its CN)"
    )
    arguments = parser.parse_args(argv)
    os.makedirs(arguments.directory, exist_ok=True)
    dns_names, addresses = ["localhost"], ["127.0.0.1"]
    for name in arguments.name:
        try:
            addresses.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns_names.append(name)
    ca = make_ca()
    written = list(ca.write(arguments.directory, "ca"))
    server = ca.issue("localhost", dns_names=dns_names, ip_addresses=addresses)
    written += server.write(arguments.directory, "server")
    for subject in arguments.client:
        written += ca.issue(subject, client=True, server=False).write(arguments.directory, subject)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
