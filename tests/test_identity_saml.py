"""
SAML 2.0 assertions as credentials: signed by the configured IdP (checked
with signxml against its pinned certificate), for this gateway's audience
and recipient, within their validity; and refused when tampered with,
signed by someone else, expired, too long-lived, replayed, or wrapped
(XML signature wrapping).  The main cases end to end through the
PostgreSQL gateway with the assertion as psql's password.
"""

import base64
import copy
import time

from lxml import etree
from twisted.internet import defer, reactor
from twisted.trial import unittest

from testbed import pki
from hoopgw.identity import saml
from hoopgw.identity.errors import IdentityError
from tests import identity_fixtures as fixtures
from tests.identity_fixtures import IdentityGateway
from tests.support import psql

NS = {"saml": saml.SAML, "ds": saml.DS, "samlp": saml.SAMLP}


def make_provider(**overrides):
    raw = fixtures.saml_provider(**overrides)
    raw.pop("type")
    return saml.parse_provider("corp-idp", raw, "identity_providers.corp-idp").build(reactor)


def encode(element):
    return base64.b64encode(etree.tostring(element)).decode("ascii")


def response(*assertions):
    """
    A samlp:Response holding C{assertions}, with a success status.
    """
    root = etree.Element(etree.QName(saml.SAMLP, "Response"), nsmap=NS, ID="_r1", Version="2.0")
    status = etree.SubElement(root, etree.QName(saml.SAMLP, "Status"))
    etree.SubElement(status, etree.QName(saml.SAMLP, "StatusCode"), Value=saml.SUCCESS)
    for assertion in assertions:
        root.append(assertion)
    return root


class AssertionTests(unittest.TestCase):
    """
    L{saml.SAMLProvider.verify} on assertions from the test IdP.
    """

    def setUp(self):
        self.provider = make_provider()

    def verify(self, credential):
        return self.provider.verify(saml.decode(credential))

    def refused(self, credential, reason):
        error = self.assertRaises(IdentityError, self.verify, credential)
        self.assertEqual(error.reason, reason, str(error))
        return error

    def test_accepted(self):
        """
        A signed bearer assertion for this gateway proves its NameID, with
        the groups of its groups attribute; the provenance names the IdP
        and its certificate.
        """
        identity = self.verify(fixtures.assertion(groups=["payments-bots", "auditors"]))
        self.assertEqual((identity.subject, identity.method, identity.issuer), ("ci-bot", "saml", fixtures.IDP_ENTITY))
        self.assertEqual(identity.groups, {"payments-bots", "auditors"})
        issued, _ = fixtures.idp()
        self.assertEqual(identity.provenance["idp_certificate_fingerprint"], pki.fingerprint(issued.certificate))

    def test_in_a_response(self):
        """
        An assertion inside a samlp:Response is accepted too.
        """
        signed = fixtures.assertion(encode=False)
        self.assertEqual(self.verify(encode(response(signed))).subject, "ci-bot")

    def test_bad_signature(self):
        """
        An assertion changed after it was signed (its NameID) is refused.
        """
        signed = fixtures.assertion(encode=False)
        signed.find(".//saml:NameID", NS).text = "admin"
        self.refused(encode(signed), "saml-signature")

    def test_other_signer(self):
        """
        An assertion signed by another key, naming the IdP as issuer and
        carrying its own certificate, is refused: the IdP's certificate is
        pinned.
        """
        impostor = pki.make_ca("impostor").issue("idp.example.org", server=False)
        self.refused(fixtures.assertion(signer=impostor), "saml-signature")

    def test_wrong_audience(self):
        """
        An assertion restricted to another service provider is refused.
        """
        error = self.refused(fixtures.assertion(audience="https://other.example.org"), "saml-audience")
        self.assertIn("another audience", str(error))

    def test_wrong_recipient(self):
        """
        A bearer assertion meant for another recipient is refused.
        """
        self.refused(fixtures.assertion(recipient="https://other.example.org/acs"), "saml-recipient")

    def test_expired(self):
        """
        An assertion past its NotOnOrAfter is refused.
        """
        self.refused(fixtures.assertion(now=time.time() - 3600, lifetime=300), "saml-expired")

    def test_not_yet_valid(self):
        """
        An assertion issued in the future is refused.
        """
        self.refused(fixtures.assertion(now=time.time() + 3600), "saml-not-yet-valid")

    def test_too_long_lived(self):
        """
        With max_lifetime, a day-long assertion is refused.
        """
        self.provider = make_provider(max_lifetime="1h")
        self.refused(fixtures.assertion(lifetime=86400), "saml-lifetime")

    def test_one_time_use_replayed(self):
        """
        A OneTimeUse assertion is accepted once.
        """
        credential = fixtures.assertion(one_time=True)
        self.verify(credential)
        self.refused(credential, "replayed")

    def test_wrapping_sibling(self):
        """
        XML signature wrapping: an unsigned assertion for 'admin' placed
        before the genuine signed one in a response is refused, not read.
        """
        signed = fixtures.assertion(encode=False)
        evil = copy.deepcopy(signed)
        evil.set("ID", "_evil")
        evil.remove(evil.find("ds:Signature", NS))
        evil.find(".//saml:NameID", NS).text = "admin"
        error = self.refused(encode(response(evil, signed)), "saml-wrapping")
        self.assertIn("exactly one", str(error))

    def test_wrapping_inside_signature(self):
        """
        XML signature wrapping: an assertion for 'admin' carrying the
        genuine signature, with the genuine assertion (same ID) hidden in
        the signature's ds:Object, is refused.
        """
        signed = fixtures.assertion(encode=False)
        evil = copy.deepcopy(signed)
        evil.find(".//saml:NameID", NS).text = "admin"
        evil.find(".//saml:AttributeValue", NS).text = "db-admins"
        signature = evil.find("ds:Signature", NS)
        hidden = etree.SubElement(signature, etree.QName(saml.DS, "Object"))
        original = copy.deepcopy(signed)
        original.remove(original.find("ds:Signature", NS))
        hidden.append(original)
        self.refused(encode(evil), "saml-wrapping")

    def test_wrapping_reference_elsewhere(self):
        """
        A signature whose reference covers an element other than the
        assertion (here, the Subject, given an ID) does not vouch for the
        assertion.
        """
        assertion = fixtures.assertion(encode=False)
        reference = assertion.find("ds:Signature/ds:SignedInfo/ds:Reference", NS)
        assertion.find("saml:Subject", NS).set("ID", "_subject")
        reference.set("URI", "#_subject")
        self.refused(encode(assertion), "saml-wrapping")

    def test_comment_in_name_id(self):
        """
        A comment inside a NameID (not covered by exclusive c14n, so the
        signature still holds) is refused as the attack it is:
        'ci-bot<!---->.evil.example' reads as 'ci-bot' to a reader that
        stops at the comment.  The refusal names the IdP and the assertion.
        """
        signed = fixtures.assertion(subject="ci-bot.evil.example", encode=False)
        name_id = signed.find(".//saml:NameID", NS)
        name_id.text = "ci-bot"
        comment = etree.Comment("")
        comment.tail = ".evil.example"
        name_id.append(comment)
        error = self.refused(encode(signed), "saml-comment")
        self.assertEqual(error.evidence["idp"], fixtures.IDP_ENTITY)
        self.assertEqual(error.evidence["assertion_id"], signed.get("ID"))

    def test_comment_in_attribute_value(self):
        """
        The same trick in a group value ('payments-bots<!---->-admins') is
        refused too.
        """
        signed = fixtures.assertion(groups=["payments-bots-admins"], encode=False)
        value = signed.find(".//saml:AttributeValue", NS)
        value.text = "payments-bots"
        comment = etree.Comment("x")
        comment.tail = "-admins"
        value.append(comment)
        self.refused(encode(signed), "saml-comment")

    def test_wrapping_in_response_extensions(self):
        """
        The genuine signed assertion moved under the response's
        Extensions, an unsigned one for 'admin' where the response keeps
        its assertion: refused as wrapping, naming the IdP claimed and both
        assertion IDs.
        """
        signed = fixtures.assertion(encode=False)
        evil = copy.deepcopy(signed)
        evil.set("ID", "_evil")
        evil.remove(evil.find("ds:Signature", NS))
        evil.find(".//saml:NameID", NS).text = "admin"
        root = response(evil)
        extensions = etree.Element(etree.QName(saml.SAMLP, "Extensions"))
        extensions.append(signed)
        root.insert(0, extensions)
        error = self.refused(encode(root), "saml-wrapping")
        self.assertEqual(error.evidence["idp"], fixtures.IDP_ENTITY)
        self.assertEqual(sorted(error.evidence["assertion_ids"]), sorted(["_evil", signed.get("ID")]))

    def test_wrapping_in_advice(self):
        """
        The genuine signed assertion hidden in the Advice of an unsigned
        one for 'admin': refused as wrapping, naming the IdP claimed.
        """
        signed = fixtures.assertion(encode=False)
        evil = copy.deepcopy(signed)
        evil.set("ID", "_evil")
        evil.remove(evil.find("ds:Signature", NS))
        evil.find(".//saml:NameID", NS).text = "admin"
        advice = etree.SubElement(evil, etree.QName(saml.SAML, "Advice"))
        advice.append(signed)
        error = self.refused(encode(response(evil)), "saml-wrapping")
        self.assertEqual(error.evidence["idp"], fixtures.IDP_ENTITY)

    def test_doctype_refused(self):
        """
        A document with a DTD (entity expansion, external entities) is
        refused before anything is read from it.
        """
        signed = etree.tostring(fixtures.assertion(encode=False))
        document = b'<!DOCTYPE x [<!ENTITY e "ci-bot">]>' + signed
        credential = base64.b64encode(document).decode()
        error = self.assertRaises(IdentityError, saml.decode, credential)
        self.assertEqual(error.reason, "saml-malformed")

    def test_not_saml(self):
        """
        A password that is not base64 XML is not taken for an assertion.
        """
        self.assertIsNone(saml.decode("hunter2"))
        self.assertIsNone(saml.decode(base64.b64encode(b"just some bytes").decode()))


class GatewayTests(unittest.TestCase):
    """
    SAML assertions as psql's password, through the gateway.
    """

    @defer.inlineCallbacks
    def test_saml_accepted(self):
        """
        A bot signs in with a base64 SAML assertion; the record says the
        identity was proven by SAML and by which IdP.
        """
        gateway = IdentityGateway(self, providers={"corp-idp": fixtures.saml_provider()})
        credential = fixtures.assertion()
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT current_user", password=credential)
        self.assertEqual((out.strip(), code), ("app", 0), err)
        (start,) = yield gateway.wait_for("session.start")
        self.assertEqual(start["identity"]["method"], "saml")
        self.assertEqual(start["identity"]["provenance"]["idp"], fixtures.IDP_ENTITY)
        self.assertNotIn(credential.encode(), gateway.raw_store())

    @defer.inlineCallbacks
    def test_saml_bad_signature_refused(self):
        """
        A tampered assertion is refused with 28P01, and the refusal is
        recorded.
        """
        gateway = IdentityGateway(self, providers={"corp-idp": fixtures.saml_provider()})
        signed = fixtures.assertion(encode=False)
        signed.find(".//saml:AttributeValue", NS).text = "db-admins"
        out, err, code = yield psql(gateway.dsn(), "-c", "SELECT 1", password=encode(signed))
        self.assertNotEqual(code, 0)
        self.assertIn("signature is not valid", err)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["attributes"]["identity_refused"], "saml-signature")
        self.assertEqual(refused["refusal"]["sqlstate"], "28P01")

    @defer.inlineCallbacks
    def test_attacks_recorded_as_attacks(self):
        """
        Each SAML attack, sent as psql's password, is recorded with a
        refusal code naming the attack and the IdP it claimed: wrapping
        under a response's Extensions, wrapping inside an assertion's
        Advice, wrapping with the unsigned assertion claiming another IdP,
        and a comment inside the NameID.
        """
        gateway = IdentityGateway(self, providers={"corp-idp": fixtures.saml_provider()})

        def wrapped(where, evil_issuer=None):
            signed = fixtures.assertion(encode=False)
            evil = copy.deepcopy(signed)
            evil.set("ID", "_evil")
            evil.remove(evil.find("ds:Signature", NS))
            evil.find(".//saml:NameID", NS).text = "admin"
            if evil_issuer is not None:
                evil.find("saml:Issuer", NS).text = evil_issuer
            if where == "advice":
                etree.SubElement(evil, etree.QName(saml.SAML, "Advice")).append(signed)
                return encode(response(evil))
            root = response(evil)
            extensions = etree.Element(etree.QName(saml.SAMLP, "Extensions"))
            extensions.append(signed)
            root.insert(0, extensions)
            return encode(root)

        commented = fixtures.assertion(subject="ci-bot.evil.example", encode=False)
        name_id = commented.find(".//saml:NameID", NS)
        name_id.text = "ci-bot"
        comment = etree.Comment("")
        comment.tail = ".evil.example"
        name_id.append(comment)

        attempts = [
            (wrapped("extensions"), "saml-wrapping", fixtures.IDP_ENTITY),
            (wrapped("advice"), "saml-wrapping", fixtures.IDP_ENTITY),
            (wrapped("extensions", evil_issuer="https://evil.example"), "saml-wrapping", None),
            (encode(commented), "saml-comment", fixtures.IDP_ENTITY),
        ]
        for credential, _, _ in attempts:
            out, err, code = yield psql(gateway.dsn(user="ci-bot"), "-c", "SELECT 1", password=credential)
            self.assertNotEqual(code, 0, out)
        refusals = yield gateway.wait_for("session.refused", count=len(attempts))
        for refused, (_, reason, idp) in zip(refusals, attempts):
            self.assertEqual(refused["attributes"]["identity_refused"], reason)
            evidence = refused["attributes"]["identity_evidence"]
            if idp is not None:
                self.assertEqual(evidence["idp"], idp)
            else:
                self.assertEqual(evidence["idps_claimed"], sorted(["https://evil.example", fixtures.IDP_ENTITY]))
            self.assertIn("assertion_ids" if reason == "saml-wrapping" else "assertion_id", evidence)

    @defer.inlineCallbacks
    def test_login_name_mismatch_names_the_assertion(self):
        """
        A valid assertion for another name than the login is refused as
        user-mismatch, and the refusal records the IdP, the assertion id
        and the subject proven, as the other SAML refusals do.
        """
        gateway = IdentityGateway(self, providers={"corp-idp": fixtures.saml_provider()})
        signed = fixtures.assertion(subject="ci-bot.evil.example", encode=False)
        out, err, code = yield psql(gateway.dsn(user="ci-bot"), "-c", "SELECT 1", password=encode(signed))
        self.assertNotEqual(code, 0, out)
        (refused,) = yield gateway.wait_for("session.refused")
        self.assertEqual(refused["attributes"]["identity_refused"], "user-mismatch")
        evidence = refused["attributes"]["identity_evidence"]
        self.assertEqual(
            (evidence["idp"], evidence["assertion_id"], evidence["subject"]),
            (fixtures.IDP_ENTITY, signed.get("ID"), "ci-bot.evil.example"),
        )
