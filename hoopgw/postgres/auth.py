"""
Client-side password authentication to a PostgreSQL target: SCRAM-SHA-256
(RFC 5802, RFC 7677) and MD5.
"""

import base64
import hashlib
import hmac
import os
import stringprep
import unicodedata


class AuthenticationFailed(Exception):
    """
    The target's authentication exchange failed or could not be trusted.
    """


def md5_response(user, password, salt):
    """
    The answer to AuthenticationMD5Password.
    """
    inner = hashlib.md5(password.encode("utf-8") + user.encode("utf-8")).hexdigest()
    return b"md5" + hashlib.md5(inner.encode("ascii") + salt).hexdigest().encode("ascii")


def saslprep(text):
    """
    SASLprep (RFC 4013) as PostgreSQL applies it: when the password is not
    valid for SASLprep, it is used as it is.
    """
    mapped = "".join(
        " " if stringprep.in_table_c12(character) else character
        for character in text
        if not stringprep.in_table_b1(character)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    for character in normalized:
        if (
            stringprep.in_table_c12(character)
            or stringprep.in_table_c21_c22(character)
            or stringprep.in_table_c3(character)
            or stringprep.in_table_c4(character)
            or stringprep.in_table_c5(character)
            or stringprep.in_table_c6(character)
            or stringprep.in_table_c7(character)
            or stringprep.in_table_c8(character)
            or stringprep.in_table_c9(character)
            or stringprep.in_table_a1(character)
        ):
            return text
    return normalized


def _hmac(key, data):
    return hmac.new(key, data, hashlib.sha256).digest()


class ScramClient:
    """
    One SCRAM-SHA-256 exchange, without channel binding.
    """

    mechanism = "SCRAM-SHA-256"

    def __init__(self, password, nonce=None):
        self._password = password
        self._nonce = nonce or base64.b64encode(os.urandom(18)).decode("ascii")
        self._first_bare = "n=,r=" + self._nonce
        self._server_signature = None
        self._challenge = None

    def first_message(self):
        return ("n,," + self._first_bare).encode("ascii")

    def challenge(self, server_first, max_iterations=None):
        """
        Read and check the server's first message, cheaply: the costly
        proof (L{final_message}) may then be computed elsewhere.

        @return: the iteration count the server asks for.
        @raise AuthenticationFailed: when the message is malformed, its
            nonce is not the gateway's extended, or it asks for more than
            C{max_iterations} iterations.
        """
        try:
            server_first = server_first.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthenticationFailed("the target's SCRAM challenge is malformed")
        attributes = dict(part.split("=", 1) for part in server_first.split(",") if "=" in part)
        nonce = attributes.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthenticationFailed("the target's SCRAM nonce does not extend the gateway's")
        try:
            salt = base64.b64decode(attributes["s"], validate=True)
            iterations = int(attributes["i"])
        except (KeyError, ValueError):
            raise AuthenticationFailed("the target's SCRAM challenge is malformed")
        if iterations < 1:
            raise AuthenticationFailed("the target's SCRAM challenge is malformed")
        if max_iterations is not None and iterations > max_iterations:
            raise AuthenticationFailed(
                "the target asks for %d SCRAM iterations, more than the gateway computes (max_scram_iterations: %d)"
                % (iterations, max_iterations)
            )
        self._challenge = (server_first, nonce, salt, iterations)
        return iterations

    def final_message(self, server_first=None):
        """
        Answer the server's first message with the client proof (the
        message checked by L{challenge} when none is given).
        """
        if server_first is not None:
            self.challenge(server_first)
        server_first, nonce, salt, iterations = self._challenge
        salted = hashlib.pbkdf2_hmac("sha256", saslprep(self._password).encode("utf-8"), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = "c=biws,r=" + nonce
        auth_message = ",".join((self._first_bare, server_first, without_proof)).encode("utf-8")
        signature = _hmac(stored_key, auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return (without_proof + ",p=" + base64.b64encode(proof).decode("ascii")).encode("ascii")

    def verify_final(self, server_final):
        """
        Check the server's signature: a target that does not know the
        password must not be trusted with the session.
        """
        text = server_final.decode("utf-8", "replace")
        if not text.startswith("v=") or self._server_signature is None:
            raise AuthenticationFailed("the target did not prove it knows the password")
        try:
            signature = base64.b64decode(text[2:].split(",")[0], validate=True)
        except ValueError:
            raise AuthenticationFailed("the target did not prove it knows the password")
        if not hmac.compare_digest(signature, self._server_signature):
            raise AuthenticationFailed("the target's SCRAM signature is wrong: it does not know the password")
