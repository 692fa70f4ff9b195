"""
Tests for L{testbed.pki}: the throwaway CA and the certificates it signs.
"""

import datetime
import hashlib
import ipaddress
import os
import ssl
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial import unittest

from testbed import pki


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _handshake(server_context, client_context, server_hostname):
    """
    Run a TLS handshake between two L{ssl.SSLContext}s entirely in memory
    and return the server side's view of the client certificate (or
    C{None}); raise whatever L{ssl.SSLError} either side raises.
    """
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(
        client_in, client_out, server_hostname=server_hostname)
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {client: False, server: False}
    for _ in range(20):
        for side in (client, server):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            return server.getpeercert()
    raise AssertionError("TLS handshake did not finish")


class CertificateAuthorityTests(unittest.TestCase):
    """
    Tests for L{pki.make_ca} and L{pki.CertificateAuthority}.
    """

    def setUp(self):
        self.ca = pki.make_ca("unit test CA")

    def test_subject(self):
        """
        The CA's certificate is self-issued under the given common name.
        """
        name = self.ca.certificate.subject
        self.assertEqual(
            name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            "unit test CA")
        self.assertEqual(self.ca.certificate.issuer, name)

    def test_default_name(self):
        """
        Without a name, the CA is called C{hoopgw test CA}.
        """
        ca = pki.make_ca()
        self.assertEqual(
            ca.certificate.subject.rfc4514_string(), "CN=hoopgw test CA")

    def test_self_signed(self):
        """
        The CA certificate's signature verifies with its own key.
        """
        self.ca.certificate.verify_directly_issued_by(self.ca.certificate)

    def test_key(self):
        """
        The CA key is EC P-256 and is the key the certificate certifies.
        """
        self.assertIsInstance(self.ca.key, ec.EllipticCurvePrivateKey)
        self.assertEqual(self.ca.key.curve.name, "secp256r1")
        self.assertEqual(
            self.ca.key.public_key().public_numbers(),
            self.ca.certificate.public_key().public_numbers())

    def test_basic_constraints(self):
        """
        The certificate says, critically, that it is a CA.
        """
        extension = self.ca.certificate.extensions.get_extension_for_class(
            x509.BasicConstraints)
        self.assertTrue(extension.critical)
        self.assertTrue(extension.value.ca)

    def test_key_usage(self):
        """
        The CA key may sign certificates and CRLs.
        """
        usage = self.ca.certificate.extensions.get_extension_for_class(
            x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign)
        self.assertTrue(usage.crl_sign)

    def test_subject_key_identifier(self):
        """
        The certificate carries the subject key identifier of its key.
        """
        extension = self.ca.certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier).value
        self.assertEqual(
            extension,
            x509.SubjectKeyIdentifier.from_public_key(
                self.ca.key.public_key()))

    def test_validity(self):
        """
        The CA is valid from about an hour ago for 30 days.
        """
        certificate = self.ca.certificate
        start = certificate.not_valid_before_utc
        end = certificate.not_valid_after_utc
        self.assertLess(
            abs(start - (_now() - datetime.timedelta(hours=1))),
            datetime.timedelta(minutes=5))
        self.assertEqual(end - start, datetime.timedelta(days=30))

    def test_certificate_pem(self):
        """
        L{pki.CertificateAuthority.certificate_pem} is the certificate as
        PEM.
        """
        pem = self.ca.certificate_pem()
        self.assertTrue(pem.startswith(b"-----BEGIN CERTIFICATE-----"))
        self.assertEqual(
            x509.load_pem_x509_certificate(pem), self.ca.certificate)

    def test_write(self):
        """
        L{pki.CertificateAuthority.write} writes the certificate and a
        private key only its owner may read.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        cert_path, key_path = self.ca.write(directory, "root")
        self.assertEqual(cert_path, os.path.join(directory, "root.crt"))
        self.assertEqual(key_path, os.path.join(directory, "root.key"))
        with open(cert_path, "rb") as f:
            self.assertEqual(
                x509.load_pem_x509_certificate(f.read()),
                self.ca.certificate)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)

    def test_distinct(self):
        """
        Every CA has its own key.
        """
        self.assertNotEqual(
            pki.fingerprint(self.ca.certificate),
            pki.fingerprint(pki.make_ca("unit test CA").certificate))


class IssueTests(unittest.TestCase):
    """
    Tests for L{pki.CertificateAuthority.issue} and L{pki.Issued}.
    """

    def setUp(self):
        self.ca = pki.make_ca()

    def extension(self, issued, kind):
        return issued.certificate.extensions.get_extension_for_class(
            kind).value

    def test_signed_by_ca(self):
        """
        The certificate is signed by the CA's key and names the CA as its
        issuer, with the CA's key identifier.
        """
        issued = self.ca.issue("server")
        issued.certificate.verify_directly_issued_by(self.ca.certificate)
        self.assertEqual(issued.certificate.issuer,
                         self.ca.certificate.subject)
        self.assertEqual(
            self.extension(issued, x509.AuthorityKeyIdentifier).key_identifier,
            self.ca.certificate.extensions.get_extension_for_class(
                x509.SubjectKeyIdentifier).value.digest)

    def test_not_signed_by_another_ca(self):
        """
        Another CA's key does not verify the certificate.
        """
        issued = self.ca.issue("server")
        other = pki.make_ca()
        self.assertRaises(
            Exception,
            issued.certificate.verify_directly_issued_by, other.certificate)

    def test_end_entity(self):
        """
        Issued certificates are not CAs, and have their own key.
        """
        issued = self.ca.issue("server")
        self.assertFalse(self.extension(issued, x509.BasicConstraints).ca)
        self.assertEqual(
            issued.key.public_key().public_numbers(),
            issued.certificate.public_key().public_numbers())
        self.assertNotEqual(
            issued.key.public_key().public_numbers(),
            self.ca.key.public_key().public_numbers())

    def test_common_name(self):
        """
        The subject is the given common name.
        """
        issued = self.ca.issue("db.example")
        self.assertEqual(
            issued.certificate.subject.rfc4514_string(), "CN=db.example")

    def test_subject_alternative_names(self):
        """
        DNS names, IP addresses (v4 and v6) and URIs all become subject
        alternative names.
        """
        issued = self.ca.issue(
            "workload",
            dns_names=["localhost", "db.example"],
            ip_addresses=["127.0.0.1", ipaddress.ip_address("::1")],
            uris=["spiffe://example.org/ns/prod/sa/billing"],
        )
        names = self.extension(issued, x509.SubjectAlternativeName)
        self.assertEqual(names.get_values_for_type(x509.DNSName),
                         ["localhost", "db.example"])
        self.assertEqual(
            names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")])
        self.assertEqual(
            names.get_values_for_type(x509.UniformResourceIdentifier),
            ["spiffe://example.org/ns/prod/sa/billing"])

    def test_no_names(self):
        """
        Without names there is no subject alternative name extension.
        """
        issued = self.ca.issue("bare")
        self.assertRaises(
            x509.ExtensionNotFound,
            issued.certificate.extensions.get_extension_for_class,
            x509.SubjectAlternativeName)

    def test_server_by_default(self):
        """
        By default the certificate is for a server only.
        """
        usages = self.extension(self.ca.issue("s"), x509.ExtendedKeyUsage)
        self.assertEqual(list(usages), [ExtendedKeyUsageOID.SERVER_AUTH])

    def test_client(self):
        """
        C{client=True, server=False} makes a client-only certificate.
        """
        usages = self.extension(
            self.ca.issue("c", client=True, server=False),
            x509.ExtendedKeyUsage)
        self.assertEqual(list(usages), [ExtendedKeyUsageOID.CLIENT_AUTH])

    def test_client_and_server(self):
        """
        C{client=True} with the default C{server=True} allows both.
        """
        usages = self.extension(
            self.ca.issue("cs", client=True), x509.ExtendedKeyUsage)
        self.assertEqual(
            set(usages),
            {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH})

    def test_days(self):
        """
        C{days} sets the validity period, which starts about an hour ago.
        """
        certificate = self.ca.issue("s", days=2).certificate
        self.assertEqual(
            certificate.not_valid_after_utc - certificate.not_valid_before_utc,
            datetime.timedelta(days=2))
        self.assertLess(certificate.not_valid_before_utc, _now())

    def test_explicit_validity(self):
        """
        C{not_before} and C{not_after} set the validity exactly, which lets
        a test make an expired certificate.
        """
        start = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        end = datetime.datetime(2020, 1, 2, tzinfo=datetime.timezone.utc)
        certificate = self.ca.issue(
            "old", not_before=start, not_after=end).certificate
        self.assertEqual(certificate.not_valid_before_utc, start)
        self.assertEqual(certificate.not_valid_after_utc, end)

    def test_pem(self):
        """
        L{pki.Issued.key_pem} and L{pki.Issued.certificate_pem} load back
        into the same key and certificate.
        """
        issued = self.ca.issue("s")
        key = serialization.load_pem_private_key(issued.key_pem(), None)
        self.assertEqual(key.private_numbers(), issued.key.private_numbers())
        self.assertEqual(
            x509.load_pem_x509_certificate(issued.certificate_pem()),
            issued.certificate)

    def test_write(self):
        """
        L{pki.Issued.write} writes C{stem.crt} and C{stem.key}, the key with
        mode 0600 whatever the umask.
        """
        directory = self.mktemp()
        os.mkdir(directory)
        issued = self.ca.issue("s")
        old = os.umask(0)
        try:
            cert_path, key_path = issued.write(directory, "server")
        finally:
            os.umask(old)
        self.assertEqual(
            (cert_path, key_path),
            (os.path.join(directory, "server.crt"),
             os.path.join(directory, "server.key")))
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        with open(cert_path, "rb") as f:
            self.assertEqual(f.read(), issued.certificate_pem())
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), issued.key_pem())

    def test_repr_hides_key(self):
        """
        The repr names the certificate but shows nothing of the key.
        """
        issued = self.ca.issue("s")
        text = repr(issued)
        self.assertIn("CN=s", text)
        self.assertNotIn("PRIVATE", text)


class HandshakeTests(unittest.TestCase):
    """
    The certificates work with a real TLS stack (OpenSSL, through
    L{ssl}), not just with L{cryptography}.
    """

    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.ca = pki.make_ca()
        self.ca_path, _ = self.ca.write(self.directory, "ca")

    def server_context(self, issued, require_client=False):
        cert_path, key_path = issued.write(self.directory, "server")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca_path)
        return context

    def client_context(self, issued=None, ca_path=None):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(ca_path or self.ca_path)
        if issued is not None:
            cert_path, key_path = issued.write(self.directory, "client")
            context.load_cert_chain(cert_path, key_path)
        return context

    def test_server_hostname(self):
        """
        A client trusting the CA accepts the server under its DNS name and
        its IP address.
        """
        server = self.server_context(self.ca.issue(
            "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]))
        for hostname in ("localhost", "127.0.0.1"):
            _handshake(server, self.client_context(), hostname)

    def test_wrong_hostname(self):
        """
        A name not in the certificate is refused.
        """
        server = self.server_context(
            self.ca.issue("localhost", dns_names=["localhost"]))
        self.assertRaises(
            ssl.SSLCertVerificationError,
            _handshake, server, self.client_context(), "elsewhere.example")

    def test_untrusted_ca(self):
        """
        A client trusting another CA refuses the server.
        """
        server = self.server_context(
            self.ca.issue("localhost", dns_names=["localhost"]))
        other_path, _ = pki.make_ca().write(self.directory, "other")
        self.assertRaises(
            ssl.SSLCertVerificationError,
            _handshake, server, self.client_context(ca_path=other_path),
            "localhost")

    def test_expired(self):
        """
        An expired server certificate is refused.
        """
        start = _now() - datetime.timedelta(days=10)
        server = self.server_context(self.ca.issue(
            "localhost", dns_names=["localhost"], not_before=start,
            not_after=start + datetime.timedelta(days=1)))
        self.assertRaises(
            ssl.SSLCertVerificationError,
            _handshake, server, self.client_context(), "localhost")

    def test_client_certificate(self):
        """
        A server requiring client certificates accepts a client certificate
        from the CA and sees its names.
        """
        server = self.server_context(
            self.ca.issue("localhost", dns_names=["localhost"]),
            require_client=True)
        client = self.client_context(self.ca.issue(
            "billing", uris=["spiffe://example.org/sa/billing"],
            client=True, server=False))
        peer = _handshake(server, client, "localhost")
        self.assertEqual(peer["subject"], ((("commonName", "billing"),),))
        self.assertEqual(
            peer["subjectAltName"],
            (("URI", "spiffe://example.org/sa/billing"),))

    def test_server_only_certificate_as_client(self):
        """
        A certificate issued for servers only is refused as a client
        certificate: the extended key usage is really there and enforced.
        """
        server = self.server_context(
            self.ca.issue("localhost", dns_names=["localhost"]),
            require_client=True)
        client = self.client_context(self.ca.issue("not-a-client"))
        self.assertRaises(ssl.SSLError, _handshake, server, client,
                          "localhost")


class FingerprintTests(unittest.TestCase):
    """
    Tests for L{pki.fingerprint}.
    """

    def test_format(self):
        """
        The fingerprint is the SHA-256 of the DER certificate as 32
        lower-case hex pairs joined with colons.
        """
        certificate = pki.make_ca().certificate
        der = certificate.public_bytes(serialization.Encoding.DER)
        expected = ":".join(
            "%02x" % (byte,) for byte in hashlib.sha256(der).digest())
        self.assertEqual(pki.fingerprint(certificate), expected)
        self.assertEqual(len(pki.fingerprint(certificate).split(":")), 32)
