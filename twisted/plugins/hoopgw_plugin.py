"""
The twistd plugins: C{twistd hoopgw} runs the gateway.
"""

from twisted.application.service import ServiceMaker

hoopgw = ServiceMaker(
    "hoopgw",
    "hoopgw.tap",
    "An access gateway for PostgreSQL, SSH and the Kubernetes API, with an audited addon chain.",
    "hoopgw",
)
