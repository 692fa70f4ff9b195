"""
The identity addon: prove who the client is from the credentials it
presented (an OIDC token as the password), before anything else happens.
"""

from twisted.internet import defer
from twisted.logger import Logger

from hoopgw import options as o
from hoopgw.addon import AddonFactory
from hoopgw.identity.oidc import IdentityError, unverified_claims
from hoopgw.model import Decision
from hoopgw.options import ConfigError


class IdentityAddon:
    """
    Verify the client's token with the configured identity providers and set the session's identity.
    """

    name = "identity"
    log = Logger()
    options = (
        o.Option(
            "providers",
            o.string_list,
            None,
            "The identity providers whose tokens this connection accepts (all configured ones when absent).",
        ),
        o.Option(
            "match_user",
            o.boolean,
            True,
            "Require the login name the client gives to equal the identity's subject, so a token issued "
            "to one bot cannot be presented under another name.",
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
        for name in options["providers"] or ():
            if name not in providers:
                raise ConfigError(
                    o.join(o.join(path, "identity"), "providers"),
                    "there is no identity provider named %r; define it under identity_providers" % (name,),
                )
        # A front end that proves identities itself (SSH keys registered on
        # the connection) can do without a token issuer.
        if not providers and not getattr(connection.settings, "proves_identities", False):
            raise ConfigError(path, "the identity addon needs at least one entry under identity_providers")

    def __init__(self, options, context):
        self._context = context
        self._names = options["providers"]
        self._match_user = options["match_user"]
        self._ssh_keys = options["ssh_keys"]

    def _providers(self):
        providers = self._context.identity_providers
        names = self._names if self._names is not None else sorted(providers)
        return [providers[name] for name in names]

    @defer.inlineCallbacks
    def session_started(self, session):
        credentials = session.credentials
        if credentials.ssh_key is not None:
            return self._ssh_key(session, credentials)
        token = credentials.password
        # The token is used once, here; it is not kept on the session.
        credentials.password = None
        if not token:
            return _refuse("no token was presented; give your identity token as the password", "no-token")
        try:
            claims = unverified_claims(token)
            providers = [provider for provider in self._providers() if provider.accepts(claims)]
            if not providers:
                raise IdentityError(
                    "tokens from the issuer %r are not accepted on this connection" % (claims.get("iss"),),
                    "issuer",
                )
            identity = yield providers[0].verify(token)
        except IdentityError as error:
            session.attributes["identity_refused"] = error.reason
            return _refuse(str(error), error.reason)
        if self._match_user and credentials.user and credentials.user != identity.subject:
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


def _refuse(reason, code):
    return Decision.deny(reason, rule="identity:%s" % (code,), addon="identity", sqlstate="28P01")


factory = AddonFactory(IdentityAddon)
