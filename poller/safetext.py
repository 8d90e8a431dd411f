"""Text that is safe to put in a log line, a table cell or an error message.

Names, keys, bucket names and ETags come from the config file or from S3 answers; a line break in
one of them must not start a new (forged) log line or table row, and a webhook URL's path and
query, which often carry a token, are never shown.
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit


def printable(text: str) -> str:
    """Escape control characters (``\\n`` -> ``\\\\n``) so a name or key cannot forge or split a line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def host_and_port(url: str, missing: str) -> str:
    """``host``, ``host:port`` or ``[v6]:port`` of a URL (``missing`` for no host); ValueError if unparseable."""
    parts = urlsplit(url)
    host = parts.hostname or missing
    port = parts.port
    if ":" in host:
        host = f"[{host}]"
    return host + (f":{port}" if port is not None else "")


def redact_url(url: str) -> str:
    """``https://user:pw@hooks.example.com:8443/T0K3N?sig=x`` -> ``https://hooks.example.com:8443/…``.

    Only scheme, host and port survive: webhook URLs carry their tokens in the userinfo, the path
    or the query, so none of those is ever shown.
    """
    try:
        parts = urlsplit(url)
        shown = f"{parts.scheme}://{host_and_port(url, '')}"
    except ValueError:
        return "<unparseable URL>"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        shown += "/…"
    return printable(shown)


def scrub(text: str, url: str) -> str:
    """Remove every secret-bearing piece of ``url`` (the whole URL, userinfo, path, query) from ``text``.

    Exception messages from the standard library quote the URL they choked on, sometimes via repr().
    """
    try:
        parts = urlsplit(url)
        pieces = [url, parts.path, parts.query, parts.fragment, parts.username, parts.password]
    except ValueError:
        pieces = [url]
    candidates: set[str] = set()
    for piece in pieces:
        if piece and len(piece) > 1:
            candidates.update((piece, repr(piece)[1:-1]))
    for piece in sorted(candidates, key=len, reverse=True):
        text = text.replace(piece, "…")
    return printable(text)


def iso(value: datetime | None) -> str:
    """UTC ISO-8601 with a Z, seconds precision (for logs and CLI output)."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
