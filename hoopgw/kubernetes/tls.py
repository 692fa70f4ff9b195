"""
The TLS of a Kubernetes connection, one context per connection: the
gateway's certificate towards clients (asking for and checking client
certificates against C{tls.client_ca} when configured), and towards the
API server a certificate check against the configured CA and name (and the
gateway's client certificate when that is its credential).
"""

import hashlib
import ipaddress

from cryptography import x509
from OpenSSL import SSL, crypto

from hoopgw.options import ConfigError

# As mitmproxy checks upstream names: no partial wildcards, never the subject CN.
_HOST_FLAGS = SSL._lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS | getattr(
    SSL._lib, "X509_CHECK_FLAG_NEVER_CHECK_SUBJECT", 0
)


def _http11(connection, offered):
    # kubectl's WebSocket upgrade (exec, attach) needs HTTP/1.1.
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def client_context(tls):
    """
    The context clients meet: the gateway's certificate, TLS 1.2 or later.

    @raise ConfigError: when the certificate or key cannot be used.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
    try:
        context.use_certificate_chain_file(tls.certificate)
        context.use_privatekey_file(tls.key)
        context.check_privatekey()
    except SSL.Error as error:
        raise ConfigError("tls", "the certificate %s or key %s cannot be used: %s" % (tls.certificate, tls.key, error))
    context.set_alpn_select_callback(_http11)
    if tls.client_ca is not None:
        _ask_for_certificates(context, tls.client_ca)
    return context


def _ask_for_certificates(context, client_ca):
    """
    Ask clients for a certificate, and have OpenSSL check the one they
    present against C{client_ca} (chain, validity, the clientAuth purpose).

    As the Kubernetes API server does, the handshake goes through whatever
    the client presents; the verdict is read afterwards
    (L{client_certificate}) and a certificate that failed is refused by
    the identity addon with a 401, recorded.  (mitmproxy's own
    C{request_client_cert} accepts any certificate and keeps no verdict,
    so the gateway does not use it.)
    """
    try:
        with open(client_ca, "rb") as handle:
            authorities = x509.load_pem_x509_certificates(handle.read())
    except (OSError, ValueError) as error:
        raise ConfigError("tls.client_ca", "%s holds no PEM CA certificate (%s)" % (client_ca, error))
    try:
        context.load_verify_locations(client_ca)
    except SSL.Error as error:
        raise ConfigError("tls.client_ca", "the CA certificates in %s cannot be used: %s" % (client_ca, error))
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _note_verification)
    # The CAs' names, as the API server lists them, for clients that pick
    # among several certificates (kubectl offers its one regardless).
    context.set_client_ca_list([crypto.X509.from_cryptography(authority).get_subject() for authority in authorities])
    # Every connection verifies its certificate afresh: no resumed session
    # carries an earlier verdict over (and OpenSSL wants a session context
    # whenever clients are verified).
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.set_options(SSL.OP_NO_TICKET)
    context.set_session_id(hashlib.sha256(b"hoopgw-kubernetes\0" + client_ca.encode("utf-8")).digest()[:32])


def _verify_error(code):
    return SSL._ffi.string(SSL._lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")


class _Verification:
    """
    What OpenSSL found wrong with a client's certificate chain during a
    full handshake, error by error.
    """

    __slots__ = ("errors",)

    def __init__(self):
        self.errors = []


def _note_verification(connection, certificate, error, depth, ok):
    # Go on with the handshake either way: the verdict is read afterwards.
    if not ok:
        verification = connection.get_app_data()
        if isinstance(verification, _Verification):
            message = _verify_error(error)
            if message not in verification.errors:
                verification.errors.append(message)
    return True


def client_certificate(connection):
    """
    The certificate a client presented, and why it may not be trusted.

    @param connection: the client's C{SSL.Connection} (from L{accept}),
        its handshake done.  (The peer certificate is read from it rather
        than from mitmproxy's C{Client.certificate_list}, which leaves out
        a certificate C{cryptography} cannot parse.)
    @return: C{(certificate, problem)}: a pyOpenSSL C{X509}, as the
        PostgreSQL front end hands it over (Twisted's
        C{getPeerCertificate}), or C{None}; and C{None}, or a sentence
        saying why OpenSSL did not verify it against C{tls.client_ca}.
    """
    if connection is None:
        return None, None
    certificate = connection.get_peer_certificate()
    if certificate is None:
        return None, None
    problems = []
    result = SSL._lib.SSL_get_verify_result(connection._ssl)
    if result != SSL._lib.X509_V_OK:
        problems.append(_verify_error(result))
    verification = connection.get_app_data()
    if isinstance(verification, _Verification):
        problems.extend(error for error in verification.errors if error not in problems)
    return certificate, "; ".join(problems) or None


def accept(context):
    connection = SSL.Connection(context)
    connection.set_app_data(_Verification())
    connection.set_accept_state()
    return connection


def upstream_context(target):
    """
    The context the gateway connects to the API server with.
    """
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION)
    if target.insecure_skip_verify:
        context.set_verify(SSL.VERIFY_NONE)
    else:
        context.set_verify(SSL.VERIFY_PEER)
        context.load_verify_locations(target.ca)
    if target.client_certificate is not None:
        try:
            context.use_certificate_chain_file(target.client_certificate)
            context.use_privatekey_file(target.client_key)
            context.check_privatekey()
        except SSL.Error as error:
            raise ConfigError(
                "target.client_certificate", "the client certificate or its key cannot be used: %s" % (error,)
            )
    return context


def connect(context, target):
    """
    A client-side TLS connection to the API server, checking its
    certificate's name (or IP address) as mitmproxy does.
    """
    connection = SSL.Connection(context)
    name = target.server_name or target.host
    if not target.insecure_skip_verify:
        parameters = SSL._lib.SSL_get0_param(connection._ssl)
        SSL._lib.X509_VERIFY_PARAM_set_hostflags(parameters, _HOST_FLAGS)
        try:
            address = ipaddress.ip_address(name).packed
        except ValueError:
            encoded = name.encode("idna")
            SSL._openssl_assert(SSL._lib.X509_VERIFY_PARAM_set1_host(parameters, encoded, len(encoded)) == 1)
        else:
            SSL._openssl_assert(SSL._lib.X509_VERIFY_PARAM_set1_ip(parameters, address, len(address)) == 1)
    try:
        ipaddress.ip_address(name)
    except ValueError:
        connection.set_tlsext_host_name(name.encode("idna"))
    connection.set_alpn_protos([b"http/1.1"])
    connection.set_connect_state()
    return connection
