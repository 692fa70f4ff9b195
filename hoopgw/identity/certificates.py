"""
Client certificates (mutual TLS) as identities: a certificate checked
against the configured CA (signature, validity, key usage), then mapped by
the first matching rule, on its subject or subject alternative names
(SPIFFE IDs included), to a subject, groups and kind.

L{CertificateProvider.identify} takes a C{cryptography} certificate, so any
front end that terminates TLS (PostgreSQL, the Kubernetes API) can use it.
"""

import datetime
import re
import string
from urllib.parse import urlsplit

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hoopgw import options as o
from hoopgw.identity.errors import IdentityError
from hoopgw.model import HUMAN, SERVICE, Identity
from hoopgw.options import ConfigError, join


# What a rule may match on, and how each is read from a certificate.
MATCHERS = ("spiffe", "uri", "dns", "email", "common_name", "organizational_unit")

_SPIFFE_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]+$")
_SPIFFE_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")


def _fields(template, path):
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise ConfigError(path, "not a valid template (%s); use {name} for a named group of the rule's patterns" % (error,))


@attr.s(frozen=True)
class Rule:
    """
    One mapping rule: patterns (all must match), and what the certificate
    then proves.
    """

    name = attr.ib()
    patterns = attr.ib()
    subject = attr.ib()
    groups = attr.ib()
    kind = attr.ib()


def _rule(value, path):
    value = dict(o.mapping(value, path))
    name = o.optional_string(value.pop("name", None), join(path, "name"))
    subject = o.optional_string(value.pop("subject", None), join(path, "subject"))
    groups = o.string_list(value.pop("groups", []), join(path, "groups"))
    kind = o.choice(SERVICE, HUMAN)(value.pop("kind", SERVICE), join(path, "kind"))
    patterns = {}
    for key in list(value):
        if key not in MATCHERS:
            raise ConfigError(
                join(path, key),
                "unknown key; a rule takes name, subject, groups, kind and patterns on %s" % (", ".join(MATCHERS),),
            )
        pattern = o.regex(value[key], join(path, key))
        patterns[key] = pattern
    if not patterns:
        raise ConfigError(path, "a rule needs at least one pattern (%s)" % (", ".join(MATCHERS),))
    named = set()
    for pattern in patterns.values():
        named.update(pattern.groupindex)
    if subject is None:
        if len(patterns) != 1:
            raise ConfigError(join(path, "subject"), "is required when a rule has several patterns")
        subject = "{%s}" % (next(iter(patterns)),)
        named.add(next(iter(patterns)))
    for where, template in [(join(path, "subject"), subject)] + [
        (join(join(path, "groups"), index), group) for index, group in enumerate(groups)
    ]:
        unknown = _fields(template, where) - named
        if unknown:
            raise ConfigError(
                where,
                "{%s} is not a named group of the rule's patterns (write (?P<%s>...) in one)" % (sorted(unknown)[0], sorted(unknown)[0]),
            )
    return Rule(name=name or path, patterns=patterns, subject=subject, groups=tuple(groups), kind=kind)


def _load_certificates(path, where):
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(where, "%s holds no PEM certificate" % (path,))
    return tuple(certificates)


OPTIONS = (
    o.Option("ca", o.file_path, o.REQUIRED, "The PEM file of the CA (or CAs) whose client certificates are accepted."),
    o.Option("rules", o.list_of(_rule), o.REQUIRED, "How certificates map to identities; the first rule that matches wins."),
    o.Option(
        "require_client_auth",
        o.boolean,
        True,
        "Refuse a certificate whose extended key usage does not allow TLS client authentication.",
    ),
    o.Option("leeway", o.duration, 60.0, "Clock skew allowed on the certificate's validity."),
)


@attr.s(frozen=True)
class CertificateProviderConfig:
    name = attr.ib()
    ca = attr.ib()
    rules = attr.ib()
    require_client_auth = attr.ib()
    leeway = attr.ib()
    authorities = attr.ib(repr=False)

    type = "certificate"
    credential = "certificate"

    def build(self, reactor=None):
        return CertificateProvider(self)


def parse_provider(name, raw, path):
    values = o.parse_options(OPTIONS, raw, path)
    if not values["rules"]:
        raise ConfigError(join(path, "rules"), "list at least one rule")
    authorities = _load_certificates(values["ca"], join(path, "ca"))
    return CertificateProviderConfig(name=name, authorities=authorities, **values)


def as_certificate(value):
    """
    A C{cryptography} certificate from what a TLS layer hands over: a
    C{cryptography} certificate, a pyOpenSSL C{X509}, or PEM or DER bytes.
    """
    if isinstance(value, x509.Certificate):
        return value
    to_cryptography = getattr(value, "to_cryptography", None)
    if to_cryptography is not None:
        return to_cryptography()
    original = getattr(value, "original", None)
    if original is not None:
        return as_certificate(original)
    if isinstance(value, str):
        value = value.encode("ascii")
    if isinstance(value, bytes):
        if b"-----BEGIN" in value:
            return x509.load_pem_x509_certificate(value)
        return x509.load_der_x509_certificate(value)
    raise TypeError("not a certificate: %r" % (type(value).__name__,))


def fingerprint(certificate):
    return certificate.fingerprint(hashes.SHA256()).hex(":")


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


class CertificateProvider:
    """
    Checks and maps one CA's client certificates.
    """

    method = "mtls"
    credential = "certificate"

    def __init__(self, config):
        self.config = config
        self.name = config.name

    def issued_by_us(self, certificate):
        """
        Whether one of this provider's CAs signed C{certificate}.
        """
        return self._issuer(as_certificate(certificate)) is not None

    def _issuer(self, certificate):
        for authority in self.config.authorities:
            if authority.subject != certificate.issuer:
                continue
            try:
                certificate.verify_directly_issued_by(authority)
            except (InvalidSignature, ValueError, TypeError):
                continue
            return authority
        return None

    def identify(self, certificate, now=None):
        """
        The identity a client certificate proves.

        @param certificate: a C{cryptography} certificate (or what
            L{as_certificate} accepts).
        @param now: an aware L{datetime.datetime}, for tests.
        @rtype: L{Identity}
        @raise IdentityError: when it is not signed by the configured CA,
            not valid now, not meant for client authentication, or no rule
            maps it.
        """
        config = self.config
        certificate = as_certificate(certificate)
        now = now or _now()
        evidence = {
            "provider": config.name,
            "certificate_fingerprint": fingerprint(certificate),
            "certificate_subject": certificate.subject.rfc4514_string(),
        }
        authority = self._issuer(certificate)
        if authority is None:
            raise IdentityError(
                "the client certificate was not issued by a CA this gateway trusts for %s (its issuer is %s; the"
                " provider's ca must list the CA that signs client certificates, an intermediate included)"
                % (config.name, certificate.issuer.rfc4514_string()),
                "certificate-untrusted",
                evidence,
            )
        leeway = datetime.timedelta(seconds=config.leeway)
        if certificate.not_valid_before_utc > now + leeway:
            raise IdentityError("the client certificate is not valid yet", "certificate-not-yet-valid", evidence)
        if certificate.not_valid_after_utc <= now - leeway:
            raise IdentityError("the client certificate has expired; ask for a new one", "certificate-expired", evidence)
        self._check_usage(certificate, evidence)
        facts = certificate_facts(certificate)
        for rule in config.rules:
            values = _match(rule, facts)
            if values is None:
                continue
            try:
                subject = rule.subject.format_map(values)
                groups = [group.format_map(values) for group in rule.groups]
            except (KeyError, IndexError, ValueError):
                continue
            if not subject:
                continue
            return Identity(
                subject=subject,
                issuer=authority.subject.rfc4514_string(),
                groups=frozenset(groups),
                kind=rule.kind,
                method="mtls",
                token_id="%x" % (certificate.serial_number,),
                provenance={
                    "provider": config.name,
                    "certificate_fingerprint": evidence["certificate_fingerprint"],
                    "certificate_subject": evidence["certificate_subject"],
                    "certificate_serial": "%x" % (certificate.serial_number,),
                    "certificate_not_after": certificate.not_valid_after_utc.isoformat(),
                    # As tokens have it: a front end that keeps a session
                    # across requests checks the certificate anew after it.
                    "expires_at": int(certificate.not_valid_after_utc.timestamp()),
                    "ca_fingerprint": fingerprint(authority),
                    "rule": rule.name,
                    "spiffe_id": (facts["spiffe"] or [None])[0],
                    "groups": {"certificate": sorted(groups)},
                },
            )
        raise IdentityError(
            "no rule of %s maps the client certificate %s to an identity" % (config.name, evidence["certificate_subject"]),
            "certificate-unmapped",
            evidence,
        )

    def _check_usage(self, certificate, evidence):
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
            if constraints.ca:
                raise IdentityError("a CA certificate cannot be used as a client certificate", "certificate-usage", evidence)
        except x509.ExtensionNotFound:
            pass
        try:
            usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
            if not (usage.digital_signature or usage.key_agreement):
                raise IdentityError(
                    "the client certificate's key usage does not allow signing (digitalSignature)", "certificate-usage", evidence
                )
        except x509.ExtensionNotFound:
            pass
        if self.config.require_client_auth:
            try:
                extended = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except x509.ExtensionNotFound:
                return
            if ExtendedKeyUsageOID.CLIENT_AUTH not in extended and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in extended:
                raise IdentityError(
                    "the certificate is not meant for TLS client authentication (no clientAuth extended key usage)",
                    "certificate-usage",
                    evidence,
                )


def certificate_facts(certificate):
    """
    What rules match on: a mapping of matcher name to the certificate's
    values for it.
    """
    facts = {name: [] for name in MATCHERS}
    facts["common_name"] = [attribute.value for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    facts["organizational_unit"] = [
        attribute.value for attribute in certificate.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    ]
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = None
    if names is not None:
        facts["uri"] = names.get_values_for_type(x509.UniformResourceIdentifier)
        facts["dns"] = names.get_values_for_type(x509.DNSName)
        facts["email"] = names.get_values_for_type(x509.RFC822Name)
        # An X509-SVID carries exactly one URI SAN, its SPIFFE ID.
        if len(facts["uri"]) == 1 and is_spiffe_id(facts["uri"][0]):
            facts["spiffe"] = list(facts["uri"])
    return facts


def is_spiffe_id(uri):
    """
    Whether C{uri} is a well-formed SPIFFE ID (spiffe://trust-domain/path).
    """
    if not uri.startswith("spiffe://"):
        return False
    parts = urlsplit(uri)
    if parts.query or parts.fragment or parts.username or parts.password or parts.port:
        return False
    if not parts.hostname or not _SPIFFE_TRUST_DOMAIN.match(parts.netloc):
        return False
    segments = parts.path.split("/")[1:] if parts.path else []
    return all(segment and segment not in (".", "..") and _SPIFFE_SEGMENT.match(segment) for segment in segments)


def _match(rule, facts):
    """
    The named groups of a rule whose patterns all match, or C{None}.
    """
    values = {}
    for key, pattern in rule.patterns.items():
        for candidate in facts.get(key, ()):
            found = pattern.fullmatch(candidate)
            if found:
                values[key] = candidate
                values.update({name: value for name, value in found.groupdict().items() if value is not None})
                break
        else:
            return None
    return values
