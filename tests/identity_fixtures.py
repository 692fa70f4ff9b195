"""
What the identity tests share: an OpenID provider stand-in on loopback
(discovery and JWKS, with key rotation, cache headers and request
counting), one real slapd with a test tree for the whole run, client
certificate authorities and a SAML IdP.
"""

import atexit
import collections
import json
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.web import resource, server

from testbed import pki
from hoopgw.identity import dev
from testbed.throwaway import LdapServer
from tests import support

_shared = {}


def _new_pem():
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


class _Site(resource.Resource):
    isLeaf = True

    def __init__(self, issuer):
        resource.Resource.__init__(self)
        self.issuer = issuer

    def render_GET(self, request):
        issuer = self.issuer
        path = request.path.decode()
        issuer.requests[path] += 1
        if issuer.failing:
            request.setResponseCode(503)
            return b"down for maintenance"
        if path == "/.well-known/openid-configuration":
            body = {"issuer": issuer.discovered_issuer or issuer.issuer, "jwks_uri": issuer.issuer + "/keys"}
        elif path == "/keys":
            body = {"keys": [dev.public_jwk(issuer.keys[kid], kid) for kid in issuer.published]}
        else:
            request.setResponseCode(404)
            return b"not found"
        request.setHeader(b"content-type", b"application/json")
        for name, value in issuer.headers.items():
            request.setHeader(name.encode(), value.encode())
        return json.dumps(body).encode()


class IssuerStandIn:
    """
    An OpenID provider on 127.0.0.1: C{/.well-known/openid-configuration}
    names C{/keys}, which publishes the public halves of the keys in
    L{published}.  L{requests} counts the requests per path.

    @ivar headers: extra response headers (cache headers, say).
    @ivar failing: answer 503 to everything.
    """

    def __init__(self, test, kids=("key-1",), tls=False):
        self.keys = {}
        self.published = []
        self.requests = collections.Counter()
        self.headers = {"Cache-Control": "max-age=300"}
        self.failing = False
        self.discovered_issuer = None
        for kid in kids:
            self.add_key(kid)
        self.publish(*kids)
        site = server.Site(_Site(self))
        if tls:
            from twisted.internet import ssl

            authority = pki.make_ca("hoopgw test IdP TLS CA")
            issued = authority.issue("localhost", ip_addresses=["127.0.0.1"], dns_names=["localhost"])
            directory_path = os.path.join(support.workspace(), "idp-tls")
            os.makedirs(directory_path, exist_ok=True)
            self.ca_path, _ = authority.write(directory_path, "ca-%s" % (os.urandom(4).hex(),))
            options = ssl.CertificateOptions(privateKey=issued.key, certificate=issued.certificate)
            self.port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        else:
            self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.issuer = "%s://127.0.0.1:%d" % ("https" if tls else "http", self.port.getHost().port)
        test.addCleanup(self.stop)

    def add_key(self, kid):
        self.keys[kid] = _new_pem()

    def publish(self, *kids):
        self.published = list(kids)

    def token(self, subject="ci-bot", kid="key-1", audience=support.AUDIENCE, groups=("payments-bots",), **overrides):
        pem = self.keys[kid] if kid in self.keys else _new_pem()
        return dev.mint(pem, subject, self.issuer, audience, groups, kid=kid, **overrides)

    def provider(self, **overrides):
        """
        The provider configuration a gateway would have for this issuer.
        """
        raw = {"type": "oidc", "issuer": self.issuer, "audience": support.AUDIENCE, "algorithms": ["ES256"]}
        raw.update(overrides)
        return raw

    def stop(self):
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


BIND_DN = "cn=gateway,ou=services,dc=example,dc=org"
PEOPLE = "ou=people,dc=example,dc=org"
GROUPS = "ou=groups,dc=example,dc=org"

_TREE = """\
dn: ou=people,dc=example,dc=org
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=example,dc=org
objectClass: organizationalUnit
ou: groups

dn: ou=services,dc=example,dc=org
objectClass: organizationalUnit
ou: services

dn: cn=gateway,ou=services,dc=example,dc=org
objectClass: person
cn: gateway
sn: gateway
userPassword: {password}

{people}
dn: cn=payments-bots,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: payments-bots
member: uid=ci-bot,ou=people,dc=example,dc=org
member: uid=deploy-bot,ou=people,dc=example,dc=org

dn: cn=db-readers,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: db-readers
member: cn=payments-bots,ou=groups,dc=example,dc=org

dn: cn=db-admins,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: db-admins
member: cn=db-readers,ou=groups,dc=example,dc=org

dn: cn=marketing,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: marketing
member: uid=alice,ou=people,dc=example,dc=org
"""

USERS = ("ci-bot", "deploy-bot", "alice")


def directory():
    """
    The run's slapd, with people (ci-bot, deploy-bot, alice), groups
    (payments-bots holds the two bots; db-readers holds payments-bots;
    db-admins holds db-readers; marketing holds alice), and a bind account
    for the gateway, the only one allowed to read.

    @return: C{(LdapServer, bind password file)}.
    """
    if "directory" not in _shared:
        password = os.urandom(12).hex()
        instance = LdapServer(
            access=[
                'to attrs=userPassword by anonymous auth by * none',
                'to * by dn.exact="%s" read by * none' % (BIND_DN,),
            ]
        )
        instance.start()
        atexit.register(instance.stop)
        people = "".join(
            "dn: uid=%s,%s\nobjectClass: inetOrgPerson\nuid: %s\ncn: %s\nsn: %s\n\n" % (user, PEOPLE, user, user, user)
            for user in USERS
        )
        instance.add_ldif(_TREE.format(password=password, people=people))
        path = os.path.join(support.workspace(), "ldap-bind.password")
        with open(path, "w") as handle:
            handle.write(password + "\n")
        _shared["directory"] = (instance, path)
    return _shared["directory"]


def ldap_provider(**overrides):
    """
    The configuration of the run's directory as an C{ldap} provider, over
    StartTLS with its certificate checked.
    """
    instance, password_file = directory()
    raw = {
        "type": "ldap",
        "url": instance.url,
        "ca": instance.ca_path,
        "bind_dn": BIND_DN,
        "bind_password": {"file": password_file},
        "user_base": PEOPLE,
        "group_base": GROUPS,
    }
    raw.update(overrides)
    return {key: value for key, value in raw.items() if value is not None}


def client_ca():
    """
    The CA of the run's client certificates: C{(CertificateAuthority,
    CA path)}.
    """
    if "client_ca" not in _shared:
        authority = pki.make_ca("hoopgw test client CA")
        directory_path = os.path.join(support.workspace(), "clients")
        os.makedirs(directory_path, exist_ok=True)
        path, _ = authority.write(directory_path, "client-ca")
        _shared["client_ca"] = (authority, path)
    return _shared["client_ca"]


def client_certificate(stem, common_name, authority=None, **options):
    """
    A client certificate from the run's client CA (or C{authority}),
    written to disk: C{(Issued, certificate path, key path)}.
    """
    authority = authority or client_ca()[0]
    options.setdefault("client", True)
    options.setdefault("server", False)
    issued = authority.issue(common_name, **options)
    directory_path = os.path.join(support.workspace(), "clients")
    os.makedirs(directory_path, exist_ok=True)
    certificate_path, key_path = issued.write(directory_path, stem)
    return issued, certificate_path, key_path


def issuing_cas():
    """
    The run's intermediate CA under the client CA, and a file with both
    (what a certificate provider's C{ca} lists: every CA that signs client
    certificates directly): C{(intermediate, bundle path)}.
    """
    if "issuing_cas" not in _shared:
        root, root_path = client_ca()
        intermediate = root.intermediate("hoopgw test issuing CA")
        path = os.path.join(os.path.dirname(root_path), "issuing-cas.crt")
        with open(path, "wb") as handle:
            handle.write(root.certificate_pem() + intermediate.certificate_pem())
        _shared["issuing_cas"] = (intermediate, path)
    return _shared["issuing_cas"]


def chained_client_certificate(stem, common_name, **options):
    """
    A client certificate from the run's intermediate CA, written as a
    client sends it (libpq's sslcert, kubectl's client-certificate): the
    certificate, then the intermediate's.  C{(Issued, bundle path, key
    path)}.
    """
    intermediate = issuing_cas()[0]
    issued, certificate_path, key_path = client_certificate(stem, common_name, authority=intermediate, **options)
    with open(certificate_path, "ab") as handle:
        handle.write(intermediate.certificate_pem())
    return issued, certificate_path, key_path


IDP_ENTITY = "https://idp.example.org/saml"
RECIPIENT = "https://gateway.example.org/"


def idp():
    """
    The run's SAML IdP: C{(Issued, certificate path)}.
    """
    if "idp" not in _shared:
        authority = pki.make_ca("hoopgw test IdP CA")
        issued = authority.issue("idp.example.org", server=False)
        directory_path = os.path.join(support.workspace(), "idp")
        os.makedirs(directory_path, exist_ok=True)
        path, _ = issued.write(directory_path, "idp")
        _shared["idp"] = (issued, path)
    return _shared["idp"]


def saml_provider(**overrides):
    _, path = idp()
    raw = {
        "type": "saml",
        "entity_id": IDP_ENTITY,
        "certificate": path,
        "audience": support.AUDIENCE,
        "recipient": RECIPIENT,
    }
    raw.update(overrides)
    return raw


def assertion(subject="ci-bot", groups=("payments-bots",), encode=True, signer=None, **overrides):
    issued = signer or idp()[0]
    arguments = dict(issuer=IDP_ENTITY, audience=support.AUDIENCE, recipient=RECIPIENT, groups=groups, encode=encode)
    arguments.update(overrides)
    return dev.mint_saml(issued.key, issued.certificate, subject, **arguments)


def test_provider():
    """
    The configuration of tests.support's file-based issuer.
    """
    _, jwks_path = support.issuer()
    return {"issuer": support.ISSUER, "audience": support.AUDIENCE, "jwks_file": jwks_path, "algorithms": ["ES256"]}


class IdentityGateway(support.GatewayHarness):
    """
    L{support.GatewayHarness} with the identity providers a test gives
    (tests.support's file-based issuer is always there as C{test}).

    @param identity: the identity addon's options.
    """

    def __init__(self, test, providers=None, identity=None, connection=None, **connection_settings):
        from testbed.throwaway import free_port

        self.directory = os.path.abspath(test.mktemp())
        os.makedirs(self.directory)
        self.port = free_port()
        addons = [{"identity": identity or {}}, "record"]
        settings = support.postgres_connection(self.port, addons=addons, **connection_settings)
        settings.update(connection or {})
        all_providers = {"test": test_provider()}
        all_providers.update(providers or {})
        self.start(test, support.configuration_document(self.directory, {"payments": settings}, providers=all_providers))

    def provider(self, name):
        return self.gateway.identity_providers[name]
