"""
Ed25519 keys for the record: the gateway signs checkpoints with its
private key, and anyone holding the public key checks them.  A key is
named by its fingerprint, the SHA-256 of its raw public bytes.
"""

import base64
import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


class SigningKeyError(Exception):
    """
    A key file cannot be used; the message says what to do.
    """


def fingerprint(public_key):
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public_key):
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


class Signer:
    """
    Signs checkpoints with an Ed25519 private key.

    @ivar key_id: the fingerprint of the public key.
    @ivar public_pem: the public key, PEM, to publish with the evidence.
    """

    def __init__(self, private_key):
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = fingerprint(self.public_key)
        self.public_pem = public_pem(self.public_key)

    @classmethod
    def from_pem(cls, data, where="the signing key"):
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as error:
            raise SigningKeyError(
                "%s is not an unencrypted PEM private key (%s); make one with 'hoopgw dev-keys' "
                "or 'openssl genpkey -algorithm ed25519'" % (where, error)
            )
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise SigningKeyError("%s is not an Ed25519 key; the record is signed with Ed25519 only" % (where,))
        return cls(key)

    def sign(self, message):
        return base64.b64encode(self._key.sign(message)).decode("ascii")

    def verifier(self):
        return Verifier(self.public_key)


class Verifier:
    """
    Checks signatures made with one Ed25519 key.
    """

    def __init__(self, public_key):
        self.public_key = public_key
        self.key_id = fingerprint(public_key)
        self.public_pem = public_pem(public_key)

    @classmethod
    def from_pem(cls, data, where="the public key"):
        if isinstance(data, str):
            data = data.encode("ascii")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError):
            try:
                key = serialization.load_pem_private_key(data, password=None).public_key()
            except (ValueError, TypeError) as error:
                raise SigningKeyError("%s is not a PEM public key (%s)" % (where, error))
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SigningKeyError("%s is not an Ed25519 key; the record is signed with Ed25519 only" % (where,))
        return cls(key)

    @classmethod
    def from_file(cls, path):
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as error:
            raise SigningKeyError("cannot read the public key %s: %s" % (path, error.strerror))
        return cls.from_pem(data, path)

    def check(self, message, signature):
        """
        @return: whether C{signature} (base64) is this key's over C{message}.
        """
        try:
            self.public_key.verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def generate_key(directory, stem="evidence-signing"):
    """
    DEVELOPMENT ONLY: write a new Ed25519 key (C{STEM.key}, mode 0600) and
    its public half (C{STEM.pub}).

    @return: C{(private key path, public key path)}.
    """
    os.makedirs(directory, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    key_path = os.path.join(directory, stem + ".key")
    with open(os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(pem)
    public_path = os.path.join(directory, stem + ".pub")
    with open(public_path, "w", encoding="ascii") as handle:
        handle.write(public_pem(key.public_key()))
    return key_path, public_path
