"""
What the tests, the benchmarks and the demo stand up around the gateway,
kept out of the installed C{hoopgw} package: throwaway servers (a
PostgreSQL cluster, an sshd, a slapd), a test PKI, and a stand-in
Kubernetes API server.  Importable from a checkout (the scripts and the
tests put its root on C{sys.path}).
"""
