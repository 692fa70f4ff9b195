"""
The built-in addons: identity and record (block, approve and mask to come).
"""
