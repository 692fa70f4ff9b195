"""
Development only: a local signing key and the tokens it mints, so the demo
and the tests have an issuer.  NOT FOR PRODUCTION: real tokens come from a
real identity provider.
"""

import base64
import json
import os
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwk, jwt

from hoopgw.model import random_hex


def generate_key(directory, kid="demo-1", stem="demo-issuer"):
    """
    Write a new EC P-256 signing key and the JWKS publishing its public
    half.

    @return: C{(private key path, JWKS path)}.
    """
    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_path = os.path.join(directory, stem + ".key")
    with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(pem)
    jwks_path = os.path.join(directory, stem + ".jwks.json")
    write_jwks(jwks_path, [(pem, kid)])
    return key_path, jwks_path


def public_jwk(pem, kid, algorithm="ES256"):
    public = jwk.construct(pem, algorithm).public_key().to_dict()
    public.update(kid=kid, use="sig", alg=algorithm)
    return public


def write_jwks(path, keys, algorithm="ES256"):
    """
    Write a JWKS with the public halves of C{keys}, a list of
    C{(private PEM, kid)}.
    """
    document = {"keys": [public_jwk(pem, kid, algorithm) for pem, kid in keys]}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2)


def mint(
    key_pem,
    subject,
    issuer,
    audience,
    groups=(),
    lifetime=900,
    kid="demo-1",
    algorithm="ES256",
    kind=None,
    now=None,
    extra=None,
):
    """
    A signed token for C{subject}.
    """
    now = int(time.time() if now is None else now)
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + int(lifetime),
        # Recorded as the token's id: never a run of digits like a card number.
        "jti": random_hex(),
        "groups": list(groups),
    }
    if kind is not None:
        claims["kind"] = kind
    claims.update(extra or {})
    # A claim given as None in extra is left out (a token without a jti, say).
    claims = {name: value for name, value in claims.items() if value is not None}
    if isinstance(key_pem, bytes):
        key_pem = key_pem.decode("ascii")
    return jwt.encode(claims, key_pem, algorithm=algorithm, headers={"kid": kid})


def mint_saml(
    key,
    certificate,
    subject,
    issuer,
    audience,
    recipient,
    groups=(),
    lifetime=300,
    now=None,
    attributes=None,
    assertion_id=None,
    one_time=False,
    encode=True,
):
    """
    A signed SAML 2.0 bearer assertion for C{subject}, as an IdP would send
    it (base64 unless C{encode} is false, then the signed XML element).

    @param key: the IdP's private key (a C{cryptography} key).
    @param certificate: its certificate (a C{cryptography} certificate).
    """
    import datetime

    from cryptography.hazmat.primitives.asymmetric import ec
    from lxml import etree
    from signxml import XMLSigner

    from hoopgw.identity import saml

    now = time.time() if now is None else now

    def instant(seconds):
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    assertion_id = assertion_id or "_" + random_hex(16)
    ns = {"saml": saml.SAML, "ds": saml.DS}
    assertion = etree.Element(
        etree.QName(saml.SAML, "Assertion"), nsmap=ns, ID=assertion_id, Version="2.0", IssueInstant=instant(now)
    )
    etree.SubElement(assertion, etree.QName(saml.SAML, "Issuer")).text = issuer
    etree.SubElement(assertion, etree.QName(saml.DS, "Signature"), Id="placeholder")
    subject_element = etree.SubElement(assertion, etree.QName(saml.SAML, "Subject"))
    etree.SubElement(
        subject_element, etree.QName(saml.SAML, "NameID"), Format="urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
    ).text = subject
    confirmation = etree.SubElement(subject_element, etree.QName(saml.SAML, "SubjectConfirmation"), Method=saml.BEARER)
    etree.SubElement(
        confirmation,
        etree.QName(saml.SAML, "SubjectConfirmationData"),
        Recipient=recipient,
        NotOnOrAfter=instant(now + lifetime),
    )
    conditions = etree.SubElement(
        assertion, etree.QName(saml.SAML, "Conditions"), NotBefore=instant(now), NotOnOrAfter=instant(now + lifetime)
    )
    restriction = etree.SubElement(conditions, etree.QName(saml.SAML, "AudienceRestriction"))
    etree.SubElement(restriction, etree.QName(saml.SAML, "Audience")).text = audience
    if one_time:
        etree.SubElement(conditions, etree.QName(saml.SAML, "OneTimeUse"))
    values = {"groups": list(groups)}
    values.update(attributes or {})
    statement = etree.SubElement(assertion, etree.QName(saml.SAML, "AttributeStatement"))
    for name, items in values.items():
        attribute = etree.SubElement(statement, etree.QName(saml.SAML, "Attribute"), Name=name)
        for item in [items] if isinstance(items, str) else items:
            etree.SubElement(attribute, etree.QName(saml.SAML, "AttributeValue")).text = item
    algorithm = "ecdsa-sha256" if isinstance(key, ec.EllipticCurvePrivateKey) else "rsa-sha256"
    signed = XMLSigner(
        signature_algorithm=algorithm,
        digest_algorithm="sha256",
        c14n_algorithm="http://www.w3.org/2001/10/xml-exc-c14n#",
    ).sign(assertion, key=key, cert=[certificate], reference_uri="#" + assertion_id, id_attribute="ID")
    if not encode:
        return signed
    return base64.b64encode(etree.tostring(signed)).decode("ascii")
