"""
hoopgw: a Layer 7 access gateway for non-human identities, with one
audited addon chain for PostgreSQL, SSH and the Kubernetes API.
"""

from hoopgw._version import __version__
from hoopgw.addon import AddonFactory
from hoopgw.model import HUMAN, SERVICE, Command, Decision, Identity, ResultChunk, Session
from hoopgw.options import ConfigError, Option

__all__ = [
    "__version__",
    "AddonFactory",
    "Command",
    "ConfigError",
    "Decision",
    "Identity",
    "Option",
    "HUMAN",
    "ResultChunk",
    "SERVICE",
    "Session",
]
