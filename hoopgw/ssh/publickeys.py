"""
SSH public keys as the configuration and the wire carry them: OpenSSH
public key lines, SHA-256 fingerprints as OpenSSH prints them, the SSH
wire encoding they are read from, and the gateway's host keys (from the
configuration, or generated once into the state folder and reused).
"""

import base64
import binascii
import hashlib
import os
import re
import struct

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys


class WireError(ValueError):
    """
    Bytes that should hold SSH wire-encoded values do not.
    """


class Reader:
    """
    Reads SSH wire types (RFC 4251 section 5) from a buffer, raising
    L{WireError} rather than reading past its end.
    """

    __slots__ = ("data", "position")

    def __init__(self, data, position=0):
        self.data = data
        self.position = position

    @property
    def remaining(self):
        return len(self.data) - self.position

    def take(self, count):
        end = self.position + count
        if count < 0 or end > len(self.data):
            raise WireError("truncated: %d bytes needed, %d left" % (count, self.remaining))
        value = self.data[self.position : end]
        self.position = end
        return bytes(value)

    def byte(self):
        return self.take(1)[0]

    def boolean(self):
        return self.byte() != 0

    def uint32(self):
        return struct.unpack(">L", self.take(4))[0]

    def uint64(self):
        return struct.unpack(">Q", self.take(8))[0]

    def string(self):
        return self.take(self.uint32())

    def text(self):
        try:
            return self.string().decode("utf-8")
        except UnicodeDecodeError:
            raise WireError("a string is not valid UTF-8")

    def mpint(self):
        """
        The raw bytes of an mpint (kept as they are: they are re-encoded
        byte for byte into key blobs).
        """
        return self.string()

    def end(self):
        if self.remaining:
            raise WireError("%d unexpected bytes at the end" % (self.remaining,))


def string(value):
    """
    C{value} encoded as an SSH string.
    """
    return struct.pack(">L", len(value)) + value


def fingerprint(blob):
    """
    The SHA-256 fingerprint of a public key blob, as OpenSSH prints it
    (C{SHA256:} and unpadded base64).
    """
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


_FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")


def is_fingerprint(text):
    return bool(_FINGERPRINT.match(text))


def key_type(blob):
    """
    The type name a key blob starts with (C{ssh-ed25519}, or a
    certificate type such as C{ssh-ed25519-cert-v01@openssh.com}).
    """
    try:
        return Reader(blob).string().decode("ascii")
    except (WireError, UnicodeDecodeError):
        raise WireError("not an SSH public key")


class KeyLineError(ValueError):
    """
    A public key line could not be read; C{str()} says why.
    """


def parse_public_key(text):
    """
    An OpenSSH public key line (C{type base64 [comment]}) as C{(type,
    blob, comment)}; the blob is checked to be a key of that type that the
    gateway can use.

    @raise KeyLineError: when it is not.
    """
    parts = text.strip().split(None, 2)
    if len(parts) < 2:
        raise KeyLineError("expected an OpenSSH public key line such as 'ssh-ed25519 AAAA... comment'")
    name, encoded = parts[0], parts[1]
    try:
        blob = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeyLineError("the key's base64 part is not valid base64")
    try:
        inner = key_type(blob)
    except WireError as error:
        raise KeyLineError(str(error))
    if inner != name:
        raise KeyLineError("the line says %s but the key inside is %s" % (name, inner))
    if "-cert-v01@openssh.com" in name:
        raise KeyLineError("this is a certificate; give the plain public key (of the CA, or the key itself)")
    try:
        keys.Key.fromString(blob)
    except (keys.BadKeyError, ValueError, IndexError, struct.error) as error:
        raise KeyLineError("the gateway cannot use this %s key: %s" % (name, error))
    return name, blob, parts[2] if len(parts) > 2 else ""


def load_private_key(data, where):
    """
    A private key (OpenSSH or PEM format, not encrypted) as a Conch key.

    @raise ValueError: saying what is wrong with C{where}.
    """
    try:
        key = keys.Key.fromString(data)
    except (keys.BadKeyError, keys.EncryptedKeyError, ValueError, IndexError, struct.error) as error:
        raise ValueError("%s is not a usable unencrypted SSH private key (%s)" % (where, error))
    if key.isPublic():
        raise ValueError("%s holds a public key; the private key is needed" % (where,))
    return key


def generated_host_key(directory):
    """
    The Ed25519 host key kept in C{directory}, generated on first use: the
    gateway keeps presenting the same key across restarts, so clients'
    known_hosts entries stay valid.

    @return: a Conch private key.
    """
    path = os.path.join(directory, "ssh_host_ed25519_key")
    try:
        with open(path, "rb") as handle:
            return load_private_key(handle.read(), path)
    except FileNotFoundError:
        pass
    os.makedirs(directory, mode=0o700, exist_ok=True)
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    partial = path + ".new"
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    # Another gateway process sharing the folder may have won the race:
    # keep whichever key got there first.
    try:
        os.link(partial, path)
    except FileExistsError:
        pass
    os.unlink(partial)
    with open(path, "rb") as handle:
        key = load_private_key(handle.read(), path)
    with open(path + ".pub", "w") as handle:
        handle.write(key.public().toString("openssh").decode("ascii") + " hoopgw\n")
    return key
