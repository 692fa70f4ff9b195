"""
SAML 2.0 identity providers: a base64 SAML assertion (a bare
C{<saml:Assertion>}, as the SAML bearer profile sends it, or a
C{<samlp:Response>} holding exactly one) signed by a configured IdP,
checked for audience, recipient and validity, and mapped to an identity.

The signature is checked with signxml against the IdP's pinned
certificate, and with XML signature wrapping in mind: exactly one
assertion in the document, its signature a direct child of it with one
reference to the assertion itself, no DTD, and every fact read only from
the XML signxml returns as signed, never from the document received.
"""

import base64
import binascii
import datetime

import attr
from cryptography import x509

from hoopgw import options as o
from hoopgw.identity.errors import IdentityError
from hoopgw.identity.replay import ReplayCache
from hoopgw.model import HUMAN, SERVICE, Identity
from hoopgw.options import ConfigError, join


SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
DS = "http://www.w3.org/2000/09/xmldsig#"
BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"

ASSERTION = "{%s}Assertion" % (SAML,)
ENCRYPTED_ASSERTION = "{%s}EncryptedAssertion" % (SAML,)
RESPONSE = "{%s}Response" % (SAMLP,)
SIGNATURE = "{%s}Signature" % (DS,)


def _q(name):
    return "{%s}%s" % (SAML, name)


# The elements whose text becomes a fact of the identity.
_READ_VALUES = tuple(_q(name) for name in ("Issuer", "NameID", "AttributeValue", "Audience"))


def _audience(value, path):
    if isinstance(value, list):
        return tuple(o.string_list(value, path))
    return (o.string(value, path),)


OPTIONS = (
    o.Option("entity_id", o.string, o.REQUIRED, "The IdP's entity ID, which assertions carry as their Issuer."),
    o.Option("certificate", o.file_path, o.REQUIRED, "The IdP's signing certificate(s), PEM (several during a rollover)."),
    o.Option("audience", _audience, o.REQUIRED, "This gateway's entity ID: assertions must be restricted to it."),
    o.Option(
        "recipient",
        o.string,
        o.REQUIRED,
        "The Recipient a bearer assertion's SubjectConfirmationData must name (this gateway's URL).",
    ),
    o.Option("subject_attribute", o.string, None, "An attribute naming the identity, instead of the NameID."),
    o.Option("groups_attribute", o.string, "groups", "The attribute listing the identity's groups."),
    o.Option("kind", o.choice(SERVICE, HUMAN), SERVICE, "Whether this IdP's identities are services or humans."),
    o.Option("kind_attribute", o.string, None, "An attribute saying whether the identity is a service or a human."),
    o.Option("service_values", o.string_list, ["service"], "Values of kind_attribute that mark a service."),
    o.Option("human_values", o.string_list, ["human"], "Values of kind_attribute that mark a human."),
    o.Option("leeway", o.duration, 30.0, "Clock skew allowed on NotBefore, NotOnOrAfter and IssueInstant."),
    o.Option(
        "max_lifetime",
        o.duration,
        None,
        "Refuse assertions valid for longer than this after their IssueInstant (PCI DSS 8.6.3).",
    ),
    o.Option(
        "replay_protection",
        o.boolean,
        False,
        "Refuse an assertion whose ID was already used, until it expires (always on for OneTimeUse "
        "assertions). Needs max_lifetime.",
    ),
    o.Option("max_bytes", o.integer(minimum=1024), 262144, "The largest assertion accepted, decoded."),
)


@attr.s(frozen=True)
class SAMLProviderConfig:
    name = attr.ib()
    entity_id = attr.ib()
    certificate = attr.ib()
    audience = attr.ib()
    recipient = attr.ib()
    subject_attribute = attr.ib()
    groups_attribute = attr.ib()
    kind = attr.ib()
    kind_attribute = attr.ib()
    service_values = attr.ib()
    human_values = attr.ib()
    leeway = attr.ib()
    max_lifetime = attr.ib()
    replay_protection = attr.ib()
    max_bytes = attr.ib()
    certificates = attr.ib(repr=False)

    type = "saml"
    credential = "saml"

    def build(self, reactor):
        return SAMLProvider(self, reactor)


def parse_provider(name, raw, path):
    values = o.parse_options(OPTIONS, raw, path)
    with open(values["certificate"], "rb") as handle:
        data = handle.read()
    try:
        certificates = tuple(x509.load_pem_x509_certificates(data))
    except ValueError:
        raise ConfigError(join(path, "certificate"), "%s holds no PEM certificate" % (values["certificate"],))
    if values["replay_protection"] and values["max_lifetime"] is None:
        raise ConfigError(join(path, "replay_protection"), "needs max_lifetime, so that the memory of used assertions stays bounded")
    return SAMLProviderConfig(name=name, certificates=certificates, **values)


def _parser():
    from lxml import etree

    # No entities, no network, no DTD: the classic XML attacks stop here.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_pis=True)


def decode(credential, max_bytes=262144):
    """
    The XML of a base64 SAML assertion, not yet trusted.

    @return: the root element, or C{None} when C{credential} does not look
        like base64 XML at all (so it is some other kind of credential).
    @raise IdentityError: when it looks like SAML but cannot be used.
    """
    from lxml import etree

    text = "".join(credential.split())
    if len(text) > (max_bytes * 4) // 3 + 4:
        raise IdentityError("the SAML assertion is larger than this gateway accepts", "saml-malformed")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:
            data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            return None
    if not data.lstrip()[:1] == b"<":
        return None
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as error:
        raise IdentityError("the SAML assertion is not well-formed XML (%s)" % (error,), "saml-malformed")
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise IdentityError("a SAML assertion with a DTD is refused", "saml-malformed")
    return root


def unverified_issuer(root):
    """
    The IdP a SAML message claims to come from, not yet trusted: only to
    pick the provider that will verify it (and refuse it, naming itself,
    when the message is an attack).

    A message that holds several assertions is a signature-wrapping
    attempt (one signed assertion hidden under Extensions, Advice or a
    signature beside the one to be read): it names the IdP that the
    assertions (or the response) claim, when they agree on one.

    @return: the IdP's entity ID, or C{None} when the message names none
        or several.
    """
    claimed = [_text(issuer) for issuer in _claimed_issuers(root)]
    claimed = set(issuer for issuer in claimed if issuer)
    return claimed.pop() if len(claimed) == 1 else None


def _claimed_issuers(root):
    if root.tag == RESPONSE:
        issuer = root.find(_q("Issuer"))
        if issuer is not None:
            yield issuer
    for assertion in root.iter(ASSERTION):
        issuer = assertion.find(_q("Issuer"))
        if issuer is not None:
            yield issuer


def wrapping_evidence(root):
    """
    What an auditor needs to tell a wrapping attack from a misconfigured
    IdP when a message holds several assertions: the IdPs and assertion
    IDs it claims.

    @return: C{None} when the message holds at most one assertion.
    """
    assertions = list(root.iter(ASSERTION))
    if len(assertions) < 2:
        return None
    issuers = sorted(set(_text(issuer) for issuer in _claimed_issuers(root)) - {""})
    return {
        "idps_claimed": issuers,
        "assertion_ids": [assertion.get("ID") for assertion in assertions],
    }


def _comment_inside(element):
    """
    Whether a comment or processing instruction sits inside an element
    whose text is read: exclusive c14n leaves comments out of the digest,
    so a signed C{ci-bot} can be made to read C{ci-bot<!---->.evil}.
    """
    return any(not isinstance(node.tag, str) for node in element.iter() if node is not element)


def _text(element):
    # itertext: a comment inside a NameID must not cut its value short.
    return "".join(element.itertext()).strip()


def _instant(value, what, evidence):
    if not value:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise IdentityError("the SAML assertion's %s is not a valid time" % (what,), "saml-malformed", evidence)
    if moment.tzinfo is None:
        raise IdentityError("the SAML assertion's %s has no time zone" % (what,), "saml-malformed", evidence)
    return moment.timestamp()


class SAMLProvider:
    """
    Verifies one IdP's assertions.
    """

    method = "saml"
    credential = "saml"

    def __init__(self, config, reactor):
        self.config = config
        self.name = config.name
        self._reactor = reactor
        self.replay = ReplayCache(reactor)

    def accepts(self, issuer):
        return issuer == self.config.entity_id

    def verify(self, root, consume=True, now=None):
        """
        @param root: the parsed XML, from L{decode}.
        @param consume: mark the assertion used (replay protection);
            C{hoopgw whoami} only looks.
        @return: the L{Identity} the assertion proves.
        @raise IdentityError: when it is refused.
        """
        config = self.config
        now = self._reactor.seconds() if now is None else now
        evidence = {"provider": config.name, "idp": config.entity_id}
        assertion = self._the_assertion(root, evidence)
        assertion_id = assertion.get("ID")
        if not assertion_id:
            raise IdentityError("the SAML assertion has no ID", "saml-malformed", evidence)
        evidence["assertion_id"] = assertion_id
        signed, certificate = self._verify_signature(assertion, assertion_id, evidence)
        if any(_comment_inside(element) for element in assertion.iter(*_READ_VALUES)):
            # No IdP writes comments into the values it signs, and the
            # digest does not cover them: one there is an attempt to change
            # a name the IdP signed, which readers that stop at the comment
            # would take for another.
            raise IdentityError(
                "the SAML assertion has an XML comment inside a signed value (a known way to alter a signed name)",
                "saml-comment",
                evidence,
            )
        return self._identity(signed, certificate, now, consume, evidence)

    def _the_assertion(self, root, evidence):
        if root.tag == RESPONSE:
            status = root.find("{%s}Status/{%s}StatusCode" % (SAMLP, SAMLP))
            if status is None or status.get("Value") != SUCCESS:
                raise IdentityError("the SAML response does not report success", "saml-refused", evidence)
        elif root.tag != ASSERTION:
            raise IdentityError("expected a SAML 2.0 Assertion or Response", "saml-malformed", evidence)
        if any(True for _ in root.iter(ENCRYPTED_ASSERTION)):
            raise IdentityError("encrypted SAML assertions are not accepted; send the signed assertion", "saml-malformed", evidence)
        assertions = list(root.iter(ASSERTION))
        if len(assertions) != 1:
            # Signature wrapping hides a second assertion beside, around or
            # inside the signed one: there must be exactly one.
            evidence.update(wrapping_evidence(root) or {})
            raise IdentityError(
                "the SAML message holds %d assertions; exactly one is accepted" % (len(assertions),),
                "saml-wrapping",
                evidence,
            )
        assertion = assertions[0]
        if root.tag == RESPONSE and assertion.getparent() is not root:
            raise IdentityError("the assertion is not where a SAML response keeps it", "saml-wrapping", evidence)
        return assertion

    def _verify_signature(self, assertion, assertion_id, evidence):
        from signxml import SignatureConfiguration, XMLVerifier
        from signxml.exceptions import InvalidInput, InvalidSignature

        signatures = [child for child in assertion if child.tag == SIGNATURE]
        if len(signatures) != 1:
            raise IdentityError("the SAML assertion must carry exactly one signature of its own", "saml-signature", evidence)
        references = signatures[0].findall("{%s}SignedInfo/{%s}Reference" % (DS, DS))
        if len(references) != 1 or references[0].get("URI") != "#" + assertion_id:
            raise IdentityError("the SAML assertion's signature does not cover the assertion", "saml-wrapping", evidence)
        expect = SignatureConfiguration(location="./", expect_references=1)
        errors = []
        for certificate in self.config.certificates:
            try:
                result = XMLVerifier().verify(
                    assertion, x509_cert=certificate, expect_config=expect, id_attribute="ID", parser=_parser()
                )
            except (InvalidSignature, InvalidInput, ValueError) as error:
                errors.append(error)
                continue
            signed = result.signed_xml
            if signed is None or signed.tag != ASSERTION or signed.get("ID") != assertion_id:
                raise IdentityError("the SAML signature does not cover the assertion", "saml-wrapping", evidence)
            return signed, certificate
        detail = str(errors[-1]).splitlines()[0] if errors else "no certificate"
        raise IdentityError(
            "the SAML assertion's signature is not valid for the IdP %s (%s)" % (self.config.entity_id, detail[:160]),
            "saml-signature",
            evidence,
        )

    def _identity(self, signed, certificate, now, consume, evidence):
        config = self.config
        leeway = config.leeway
        if signed.get("Version") != "2.0":
            raise IdentityError("only SAML 2.0 assertions are accepted", "saml-malformed", evidence)
        issuer = signed.find(_q("Issuer"))
        if issuer is None or _text(issuer) != config.entity_id:
            raise IdentityError("the SAML assertion was not issued by %s" % (config.entity_id,), "saml-issuer", evidence)
        issued = _instant(signed.get("IssueInstant"), "IssueInstant", evidence)
        if issued is None:
            raise IdentityError("the SAML assertion has no IssueInstant", "saml-malformed", evidence)
        if issued > now + leeway:
            raise IdentityError("the SAML assertion was issued in the future", "saml-not-yet-valid", evidence)
        conditions = signed.find(_q("Conditions"))
        if conditions is None:
            raise IdentityError("the SAML assertion has no Conditions restricting its audience", "saml-audience", evidence)
        not_before = _instant(conditions.get("NotBefore"), "NotBefore", evidence)
        not_after = _instant(conditions.get("NotOnOrAfter"), "NotOnOrAfter", evidence)
        if not_before is not None and now + leeway < not_before:
            raise IdentityError("the SAML assertion is not valid yet", "saml-not-yet-valid", evidence)
        if not_after is not None and now - leeway >= not_after:
            raise IdentityError("the SAML assertion has expired", "saml-expired", evidence)
        restrictions = conditions.findall(_q("AudienceRestriction"))
        if not restrictions:
            raise IdentityError("the SAML assertion is not restricted to an audience", "saml-audience", evidence)
        for restriction in restrictions:
            audiences = {_text(audience) for audience in restriction.findall(_q("Audience"))}
            if not audiences & set(config.audience):
                raise IdentityError(
                    "the SAML assertion is meant for another audience (%s), not this gateway"
                    % (", ".join(sorted(audiences)) or "none",),
                    "saml-audience",
                    evidence,
                )
        one_time = conditions.find(_q("OneTimeUse")) is not None
        subject_element = signed.find(_q("Subject"))
        if subject_element is None:
            raise IdentityError("the SAML assertion has no Subject", "saml-malformed", evidence)
        confirmed_until = self._confirm(subject_element, now, evidence)
        expires = min(value for value in (not_after, confirmed_until) if value is not None)
        if config.max_lifetime is not None and expires - issued > config.max_lifetime + leeway:
            raise IdentityError(
                "the SAML assertion is valid for %d seconds, longer than the %d this gateway accepts"
                % (expires - issued, config.max_lifetime),
                "saml-lifetime",
                evidence,
            )
        attributes = {}
        for attribute in signed.iterfind("%s/%s" % (_q("AttributeStatement"), _q("Attribute"))):
            values = [_text(value) for value in attribute.findall(_q("AttributeValue"))]
            attributes.setdefault(attribute.get("Name"), []).extend(values)
        if config.subject_attribute is not None:
            subject = (attributes.get(config.subject_attribute) or [""])[0]
        else:
            name_id = subject_element.find(_q("NameID"))
            subject = _text(name_id) if name_id is not None else ""
        if not subject:
            raise IdentityError("the SAML assertion does not name its subject", "saml-malformed", evidence)
        evidence["subject"] = subject
        groups = sorted(set(value for value in attributes.get(config.groups_attribute, []) if value))
        kind = config.kind
        if config.kind_attribute is not None:
            value = (attributes.get(config.kind_attribute) or [None])[0]
            if value in config.service_values:
                kind = SERVICE
            elif value in config.human_values:
                kind = HUMAN
            else:
                raise IdentityError(
                    "the SAML assertion's %r attribute does not say whether it is a service or a human"
                    % (config.kind_attribute,),
                    "saml-malformed",
                    evidence,
                )
        assertion_id = signed.get("ID")
        if config.replay_protection or one_time:
            if consume:
                try:
                    fresh = self.replay.use(assertion_id, expires + leeway)
                except OverflowError:
                    raise IdentityError("the gateway holds too many unexpired assertions to check this one", "replay", evidence)
            else:
                fresh = not self.replay.seen(assertion_id)
            if not fresh:
                raise IdentityError(
                    "the SAML assertion %s was already used; ask the IdP for a new one" % (assertion_id,),
                    "replayed",
                    evidence,
                )
        from hoopgw.identity.certificates import fingerprint

        return Identity(
            subject=subject,
            issuer=config.entity_id,
            groups=frozenset(groups),
            kind=kind,
            method="saml",
            token_id=assertion_id,
            provenance={
                "provider": config.name,
                "idp": config.entity_id,
                "idp_certificate_fingerprint": fingerprint(certificate),
                "issued_at": int(issued),
                "expires_at": int(expires),
                "replay_checked": bool(config.replay_protection or one_time),
                "groups": {"assertion": groups},
            },
        )

    def _confirm(self, subject_element, now, evidence):
        """
        A bearer SubjectConfirmation for this gateway, still valid.

        @return: its NotOnOrAfter.
        """
        config = self.config
        reasons = []
        for confirmation in subject_element.findall(_q("SubjectConfirmation")):
            if confirmation.get("Method") != BEARER:
                reasons.append("not a bearer confirmation")
                continue
            data = confirmation.find(_q("SubjectConfirmationData"))
            if data is None:
                reasons.append("no SubjectConfirmationData")
                continue
            if data.get("Recipient") != config.recipient:
                reasons.append("it names another recipient (%s)" % (data.get("Recipient"),))
                continue
            until = _instant(data.get("NotOnOrAfter"), "SubjectConfirmationData NotOnOrAfter", evidence)
            if until is None:
                reasons.append("it has no NotOnOrAfter")
                continue
            if now - config.leeway >= until:
                reasons.append("it has expired")
                continue
            start = _instant(data.get("NotBefore"), "SubjectConfirmationData NotBefore", evidence)
            if start is not None and now + config.leeway < start:
                reasons.append("it is not valid yet")
                continue
            return until
        raise IdentityError(
            "the SAML assertion's subject is not confirmed for this gateway (%s)" % ("; ".join(reasons) or "no bearer confirmation",),
            "saml-recipient",
            evidence,
        )
