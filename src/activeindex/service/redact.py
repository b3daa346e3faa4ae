"""What the service tells its clients about its own file system: nothing.

The service's answers are read by anyone who can reach it (``/api/info`` and thumbnails need no
token), so absolute paths in them (the collection folder, a model file, an indexed image) are cut
to their last component before they leave: enough to recognise the file, nothing about the
server's layout. The full text stays in the server's log.
"""

from __future__ import annotations

import re
from typing import Any

# An absolute POSIX path: a slash not preceded by a word character (so "3/255" is left alone),
# then components up to a space, quote, bracket, colon or comma.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s'\"()\[\]:,/]+/)*([^\s'\"()\[\]:,/]*)")


def redact_paths(text: str) -> str:
    """``text`` with every absolute path replaced by its last component (``/srv/c/index.faiss`` →
    ``index.faiss``)."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "…", text)


def redact(value: Any) -> Any:
    """:func:`redact_paths` applied to every string in a JSON-like value (dicts, lists, strings)."""
    if isinstance(value, str):
        return redact_paths(value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
