"""
Identity providers: what turns a client's credentials into an
L{hoopgw.model.Identity}.
"""
