"""
The TLS of a Kubernetes connection, one context per connection: the
gateway's certificate towards clients, and towards the API server a
certificate check against the configured CA and name (and the gateway's
client certificate when that is its credential).
"""

import ipaddress

from OpenSSL import SSL

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
    return context


def accept(context):
    connection = SSL.Connection(context)
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
