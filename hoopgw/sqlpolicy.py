"""
The SQL classifier and the rule language under their old name: the
classifier is L{hoopgw.sqlfacts}, the rules and the engine block and
approve share L{hoopgw.rules}.  Kept for addons written against it.
"""

from hoopgw.rules import HARMLESS_KINDS, MATCHER_KEYS, MATCHER_OPTIONS, SQL_KEYS, AllowList, Matcher, Name
from hoopgw.sqlfacts import (
    CACHE_KEY_LIMIT,
    CACHE_SIZE,
    NAMED_KEPT,
    Classification,
    classify,
    facts_of,
    for_command,
    recorded_facts,
)

__all__ = [
    "HARMLESS_KINDS", "MATCHER_KEYS", "MATCHER_OPTIONS", "SQL_KEYS", "AllowList", "Matcher", "Name", "CACHE_KEY_LIMIT",
    "CACHE_SIZE", "NAMED_KEPT", "Classification", "classify", "facts_of", "for_command", "recorded_facts",
]
