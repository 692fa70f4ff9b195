"""
The twistd plugins: C{twistd hoopgw} runs the gateway, C{twistd hoopgw-replay}
the auditors' replay server.
"""

from twisted.application.service import ServiceMaker

hoopgw = ServiceMaker(
    "hoopgw",
    "hoopgw.tap",
    "An access gateway for PostgreSQL, SSH and the Kubernetes API, with an audited addon chain.",
    "hoopgw",
)

hoopgw_replay = ServiceMaker(
    "hoopgw-replay",
    "hoopgw.replay.tap",
    "A read-only web replay of a hoopgw record for auditors, who sign in with their own token; every view is recorded.",
    "hoopgw-replay",
)
