"""File names as text: safe to store (SQLite, JSON) and to print one per line.

Light on purpose (no numpy, no PIL): the command line escapes names before the library is loaded.
"""

from __future__ import annotations


def storable_text(text: str) -> str:
    """A file name or path as valid Unicode text: bytes of a name that is not UTF-8 (which Python
    carries as lone surrogates and SQLite, JSON and terminals refuse) become ``\\xNN`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def printable_name(text: str) -> str:
    """:func:`storable_text`, with control characters (newlines, tabs, escape sequences) written as
    ``\\n``, ``\\t``, ``\\xNN``: safe for one-name-per-line text output, which a name could
    otherwise break into forged lines."""
    text = storable_text(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else ch.encode("unicode_escape").decode("ascii") for ch in text)
