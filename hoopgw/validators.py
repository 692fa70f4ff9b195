"""
The validators an addon's options use, public for addon authors: each
takes C{(value, key_path)} and returns the value as the addon will see it,
or raises L{hoopgw.ConfigError} naming the key path.  C{integer}, C{choice}
and C{list_of} make validators from their arguments.
"""

from hoopgw.options import (
    REQUIRED,
    boolean,
    choice,
    duration,
    file_path,
    integer,
    list_of,
    mapping,
    optional_string,
    regex,
    secret,
    string,
    string_list,
    string_set,
)

__all__ = [
    "REQUIRED",
    "boolean",
    "choice",
    "duration",
    "file_path",
    "integer",
    "list_of",
    "mapping",
    "optional_string",
    "regex",
    "secret",
    "string",
    "string_list",
    "string_set",
]
