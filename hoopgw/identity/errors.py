"""
The one error every identity provider raises when it refuses a credential.
"""


class IdentityError(Exception):
    """
    A credential was refused.  C{str()} is a sentence for the client;
    C{reason} is a short code for the record; C{evidence} holds what was
    learnt before the refusal (issuer, key id, subject claimed, directory
    consulted), never a secret, so the record of a refused logon says who
    tried.
    """

    def __init__(self, message, reason="invalid-token", evidence=None):
        Exception.__init__(self, message)
        self.reason = reason
        self.evidence = dict(evidence or {})
