"""Keep credentials out of text that is logged, stored or shown."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(text: str) -> str:
    """Hide credentials embedded in URLs (``https://user:secret@host`` -> ``https://***@host``)."""
    return _USERINFO.sub("***@", text)
