"""
Replay for auditors: the record read back as sessions (identity, timeline
of commands with decisions, approvals and outcomes, terminal recordings),
in a terminal (C{hoopgw sessions}, C{hoopgw replay}) and on the web
(C{twistd hoopgw-replay}).
"""
