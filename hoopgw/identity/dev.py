"""
Development only: a local signing key and the tokens it mints, so the demo
and the tests have an issuer.  NOT FOR PRODUCTION: real tokens come from a
real identity provider.
"""

import json
import os
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jose import jwk, jwt


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
        "jti": os.urandom(8).hex(),
        "groups": list(groups),
    }
    if kind is not None:
        claims["kind"] = kind
    claims.update(extra or {})
    if isinstance(key_pem, bytes):
        key_pem = key_pem.decode("ascii")
    return jwt.encode(claims, key_pem, algorithm=algorithm, headers={"kid": kid})
