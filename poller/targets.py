"""Where a bucket's HeadObject goes and how it is signed, as boto3 resolves it (the lean path's target)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

SENTINEL_KEY = "poller-sentinel"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how boto3 sends a bucket's HeadObject: connection, Host header, path prefix, signing scope."""

    scheme: str
    host: str
    port: int
    host_header: str
    prefix: str  # the request path up to the key: "/bucket/" (path style) or "/" (virtual host)
    region: str

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host_header}"


def target_from_presigned(url: str) -> Target | None:
    """Read the Target from boto3's SigV4 presigned HeadObject URL for SENTINEL_KEY; None if not plain S3 SigV4."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    scope = (query.get("X-Amz-Credential") or [""])[0].split("/")
    if parts.scheme not in _DEFAULT_PORTS or len(scope) != 5 or scope[3] != "s3" or scope[4] != "aws4_request":
        return None  # another signing service (S3 Express, Outposts, Object Lambda) or signer
    if not parts.path.endswith("/" + SENTINEL_KEY) or parts.hostname is None:
        return None
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    # botocore leaves the default port out of the Host header.
    host_header = parts.hostname if port == _DEFAULT_PORTS[parts.scheme] else f"{parts.hostname}:{port}"
    if ":" in parts.hostname:  # IPv6 literal
        host_header = f"[{parts.hostname}]" + ("" if port == _DEFAULT_PORTS[parts.scheme] else f":{port}")
    prefix = parts.path[: -len(SENTINEL_KEY)]
    return Target(parts.scheme, parts.hostname, port, host_header, prefix, scope[2])


def request_path(target: Target, key: str) -> str:
    """The request path of a key, percent-encoded as botocore does (``/`` and ``~`` kept)."""
    return target.prefix + quote(key, safe="/~")


def proxied(target: Target) -> bool:
    """True when an HTTP(S)_PROXY applies to this host: boto3 honours it, the lean path does not speak it."""
    proxies = urllib.request.getproxies()
    return target.scheme in proxies and not urllib.request.proxy_bypass(target.host)
