"""
The identity addon: prove who the client is from the credentials it
presented, before anything else happens: an OIDC token or a SAML assertion
(as the password, or whatever the front end put there), a client
certificate, or both (they must then agree), with groups from the
credential and, when asked, from an LDAP directory.  The session's record
shows how the identity was proven and how its groups were decided.
"""

import re

import attr
from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import options as o
from hoopgw.addon import AddonFactory
from hoopgw.identity import saml
from hoopgw.identity.errors import IdentityError
from hoopgw.identity.ldap import with_directory_groups
from hoopgw.identity.oidc import NOT_A_TOKEN, unverified_claims
from hoopgw.model import UNAUTHENTICATED, Decision
from hoopgw.options import ConfigError

# A compact JWS: three base64url parts separated by dots.
_JWT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")

TOKEN_CREDENTIALS = ("jwt", "saml")


def _credential(provider):
    return getattr(provider, "credential", "jwt")


class IdentityAddon:
    """
    Prove who the client is (OIDC token, SAML assertion, client certificate) and decide its groups.
    """

    name = "identity"
    log = Logger()
    options = (
        o.Option(
            "providers",
            o.string_list,
            None,
            "The OIDC and SAML providers whose tokens this connection accepts (all configured ones when absent).",
        ),
        o.Option(
            "match_user",
            o.boolean,
            True,
            "Require the login name the client gives to equal the identity's subject, so a token issued "
            "to one bot cannot be presented under another name.",
        ),
        o.Option(
            "certificates",
            o.string_list,
            [],
            "Certificate providers (type: certificate) whose client certificates prove an identity here. "
            "When a client presents both a certificate and a token, both must name the same subject.",
        ),
        o.Option(
            "require_certificate",
            o.boolean,
            False,
            "Refuse clients without a client certificate one of the certificate providers maps.",
        ),
        o.Option(
            "require_token",
            o.boolean,
            True,
            "Require a token even from a client whose certificate proved who it is. When false, a "
            "certificate alone suffices and a password that is not a token is ignored (libpq sends one anyway).",
        ),
        o.Option(
            "groups_from",
            o.string,
            None,
            "An LDAP provider (type: ldap) to look the subject's groups up in.",
        ),
        o.Option(
            "groups_combine",
            o.choice("union", "directory"),
            "union",
            "With groups_from: 'union' adds the directory's groups to the credential's; 'directory' uses "
            "the directory's alone.",
        ),
        o.Option(
            "token_groups_suffice",
            o.boolean,
            False,
            "With groups_from: when the directory cannot be reached, go on with the credential's groups "
            "(recorded) instead of refusing the session.",
        ),
        o.Option(
            "ssh_keys",
            o.boolean,
            True,
            "Accept SSH public keys and OpenSSH certificates that the SSH front end verified against this "
            "connection's registered keys and certificate authorities. Turn off to require tokens.",
        ),
    )

    @staticmethod
    def check_connection(options, connection, providers, path):
        where = o.join(path, "identity")
        # A front end that proves identities itself (SSH keys registered on
        # the connection) can do without a token issuer.
        if not providers and not getattr(connection.settings, "proves_identities", False):
            raise ConfigError(path, "the identity addon needs at least one entry under identity_providers")

        def check(names, key, credentials, what):
            for index, name in enumerate(names):
                provider = providers.get(name)
                if provider is None:
                    raise ConfigError(
                        o.join(o.join(where, key), index),
                        "there is no identity provider named %r; define it under identity_providers" % (name,),
                    )
                if _credential(provider) not in credentials:
                    raise ConfigError(
                        o.join(o.join(where, key), index),
                        "%r is a provider of type %s; %s takes %s" % (name, provider.type, key, what),
                    )

        check(options["providers"] or (), "providers", TOKEN_CREDENTIALS, "oidc or saml providers")
        check(options["certificates"], "certificates", ("certificate",), "certificate providers")
        if options["groups_from"] is not None:
            check([options["groups_from"]], "groups_from", ("directory",), "an ldap provider")
        tokens = options["providers"]
        if tokens is None:
            tokens = [name for name, provider in providers.items() if _credential(provider) in TOKEN_CREDENTIALS]
        proves_itself = options["ssh_keys"] and getattr(connection.settings, "proves_identities", False)
        if not tokens and not options["certificates"] and not proves_itself:
            raise ConfigError(where, "no oidc, saml or certificate provider can prove an identity on this connection")
        if not tokens and options["require_token"] and not proves_itself:
            raise ConfigError(o.join(where, "require_token"), "must be false when no oidc or saml provider is configured")
        if options["require_certificate"] and not options["certificates"]:
            raise ConfigError(o.join(where, "require_certificate"), "needs certificates: the providers that map them")

    def __init__(self, options, context):
        self._context = context
        self._options = options
        self._names = options["providers"]
        self._match_user = options["match_user"]
        self._ssh_keys = options["ssh_keys"]

    def _providers(self, credential):
        providers = self._context.identity_providers
        if credential in TOKEN_CREDENTIALS:
            names = self._names if self._names is not None else sorted(providers)
        else:
            names = self._options["certificates"]
        return [providers[name] for name in names if _credential(providers[name]) == credential]

    @defer.inlineCallbacks
    def derive(self, credentials, consume=True):
        """
        The identity C{credentials} prove on this connection, its groups
        decided.  Used by the session hook and by C{hoopgw whoami}.

        @param consume: mark single-use tokens used (C{whoami} only looks).
        @return: a L{Deferred} firing with the L{Identity}, or failing with
            L{IdentityError}.
        """
        options = self._options
        refused = credentials.extra.get("client_certificate_refused")
        if refused is not None:
            # The front end's TLS could not verify the certificate the
            # client presented: whatever else it brings, it is refused.
            raise IdentityError(
                "the client certificate was refused (%s); present one issued by a CA this connection trusts"
                % (refused["reason"],),
                "certificate-untrusted",
                dict(refused),
            )
        certified = None
        if credentials.client_certificate is not None and options["certificates"]:
            certified = self._from_certificate(credentials.client_certificate)
        if options["require_certificate"] and certified is None:
            raise IdentityError(
                "this connection requires a client certificate; connect with sslcert and sslkey (libpq) or "
                "client-certificate and client-key (kubeconfig)",
                "no-certificate",
            )
        token = credentials.password
        identity = None
        if token:
            identity = yield self._from_token(token, consume, quiet=certified is not None and not options["require_token"])
        elif certified is None or options["require_token"]:
            raise IdentityError(
                "no token was presented; give your identity token as the password (or over HTTP as the bearer token)",
                "no-token",
            )
        if identity is None:
            identity = certified
        elif certified is not None:
            identity = _agree(identity, certified)
        if options["groups_from"] is not None:
            directory = self._context.identity_providers[options["groups_from"]]
            identity = yield with_directory_groups(
                identity, directory, options["groups_combine"], options["token_groups_suffice"]
            )
        provenance = dict(identity.provenance)
        record = dict(provenance.get("groups") or {})
        record["decided"] = sorted(identity.groups)
        provenance["groups"] = record
        return attr.evolve(identity, provenance=provenance)

    def _from_certificate(self, certificate):
        from hoopgw.identity.certificates import as_certificate

        certificate = as_certificate(certificate)
        providers = self._providers("certificate")
        for provider in providers:
            if provider.issued_by_us(certificate):
                return provider.identify(certificate)
        # No provider's CA issued it: let the first one say why.
        return providers[0].identify(certificate)

    @defer.inlineCallbacks
    def _from_token(self, token, consume, quiet=False):
        """
        The identity a token proves: a JWT goes to the OIDC providers, a
        base64 SAML assertion to the SAML providers.

        @param quiet: a password that is no token at all is ignored
            (C{None}) rather than refused.
        """
        if _JWT.match(token):
            claims = unverified_claims(token)
            issuer = claims.get("iss")
            providers = [provider for provider in self._providers("jwt") if provider.accepts(claims)]
            if not providers:
                raise IdentityError(
                    "tokens from the issuer %r are not accepted on this connection" % (issuer,),
                    "issuer",
                    {"issuer": issuer if isinstance(issuer, str) else None},
                )
            identity = yield providers[0].verify(token, consume=consume)
            return identity
        root = saml.decode(token)
        if root is None:
            if quiet:
                return None
            raise IdentityError(NOT_A_TOKEN, "not-a-token")
        issuer = saml.unverified_issuer(root)
        providers = [provider for provider in self._providers("saml") if provider.accepts(issuer)]
        if not providers:
            wrapping = saml.wrapping_evidence(root)
            if wrapping is not None:
                # Several assertions claiming different IdPs: an attack,
                # not a misconfigured IdP, whichever IdP it names.
                raise IdentityError(
                    "the SAML message holds %d assertions; exactly one is accepted" % (len(wrapping["assertion_ids"]),),
                    "saml-wrapping",
                    dict(wrapping, idp=issuer),
                )
            raise IdentityError(
                "SAML assertions from the IdP %r are not accepted on this connection" % (issuer,),
                "issuer",
                {"idp": issuer},
            )
        return providers[0].verify(root, consume=consume)

    @defer.inlineCallbacks
    def session_started(self, session):
        credentials = session.credentials
        if credentials.ssh_key is not None:
            return self._ssh_key(session, credentials)
        try:
            identity = yield self.derive(credentials)
        except IdentityError as error:
            session.attributes["identity_refused"] = error.reason
            if error.evidence:
                session.attributes["identity_evidence"] = error.evidence
            return _refuse(str(error), error.reason)
        finally:
            # The token is used once, here; it is not kept on the session.
            credentials.password = None
        if self._match_user and credentials.user and credentials.user != identity.subject:
            session.attributes["identity_refused"] = "user-mismatch"
            session.attributes["identity_evidence"] = _evidence_of(identity)
            return _refuse(
                "the login name %r is not the token's subject %r; log in as %r"
                % (credentials.user, identity.subject, identity.subject),
                "user-mismatch",
            )
        session.identity = identity
        return None

    def _ssh_key(self, session, credentials):
        """
        A key or certificate the SSH front end proved the client holds, and
        mapped to an identity from the connection's own registry: the proof
        of possession is an SSH protocol matter, so it happens there, as a
        client certificate's is in TLS.
        """
        claim, credentials.ssh_key = credentials.ssh_key, None
        if not self._ssh_keys:
            return _refuse("this connection accepts identity tokens only, not SSH keys", "ssh-key-not-accepted")
        identity = getattr(claim, "identity", None)
        if identity is None or identity.method not in ("ssh-key", "ssh-cert"):
            return _refuse("the SSH key was not verified by the gateway", "ssh-key")
        session.identity = identity
        return None


def _agree(token_identity, certified):
    """
    One identity from a token and a client certificate that name the same
    subject; refused when they do not.
    """
    if token_identity.subject != certified.subject:
        raise IdentityError(
            "the client certificate proves %r but the token is for %r; present a certificate and a token "
            "for the same identity" % (certified.subject, token_identity.subject),
            "certificate-mismatch",
            {
                "token_subject": token_identity.subject,
                "certificate_subject": certified.subject,
                "certificate_fingerprint": certified.provenance.get("certificate_fingerprint"),
            },
        )
    provenance = dict(token_identity.provenance)
    provenance["certificate"] = {key: value for key, value in certified.provenance.items() if key != "groups"}
    # The identity holds while both credentials do.
    ends = [value for value in (token_identity.provenance.get("expires_at"), certified.provenance.get("expires_at")) if value]
    if ends:
        provenance["expires_at"] = min(ends)
    groups_record = dict(provenance.get("groups") or {})
    groups_record.update(certified.provenance.get("groups") or {})
    provenance["groups"] = groups_record
    return attr.evolve(
        token_identity,
        groups=token_identity.groups | certified.groups,
        method="%s+mtls" % (token_identity.method,),
        provenance=provenance,
    )


def _evidence_of(identity):
    """
    What a refusal after the credential was verified records of it: the
    provider, the IdP or issuer, the token or assertion id and the subject
    proven, as the refusals during verification do.
    """
    provenance = identity.provenance
    evidence = {"subject": identity.subject, "issuer": identity.issuer, "method": identity.method}
    for key in ("provider", "idp", "kid"):
        if provenance.get(key) is not None:
            evidence[key] = provenance[key]
    if identity.token_id is not None:
        evidence["assertion_id" if identity.method == "saml" else "token_id"] = identity.token_id
    return evidence


def _refuse(reason, code):
    return Decision.deny(reason, rule="identity:%s" % (code,), addon="identity", refusal=UNAUTHENTICATED)


factory = AddonFactory(IdentityAddon)
