"""Where a bucket's HeadObject goes and how it is signed, exactly as boto3 sends it (the lean path's target).

A resolver client (same settings as the boto3 client) builds one HeadObject per bucket for a sentinel
key; a ``before-send`` handler takes the prepared request and answers it locally, so resolution sends
nothing. Scheme, host, port, Host header, path prefix and signing scope are read from that request:
endpoint rules, FIPS, dual-stack, addressing style and custom endpoints all stay botocore's business.
"""

from __future__ import annotations

import hashlib
import re
import threading
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

from botocore.awsrequest import AWSResponse, HTTPHeaders

from poller.safetext import printable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SENTINEL_KEY = "poller-sentinel"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_DEFAULT_PORTS = {"http": 80, "https": 443}
# The headers the lean Signer signs besides the per-request ones (conditions, request payer, bucket owner).
_SIGNABLE = frozenset({"host", "x-amz-content-sha256", "x-amz-date", "x-amz-security-token"})
_AUTHORIZATION = re.compile(r"(?P<alg>\S+) Credential=(?P<cred>[^,\s]+), SignedHeaders=(?P<signed>[^,\s]+), Signature=")
# botocore's signing names of the S3 variants the lean Signer does not implement, as fallback reasons.
_OTHER_SERVICES = {"s3express": "s3_express", "s3-outposts": "outposts", "s3-object-lambda": "arn"}
CPU_NOTE = "boto3 sends this bucket's HEADs (about 9x the CPU)"


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how boto3 sends a bucket's HeadObject: connection, Host header, path prefix, signing scope."""

    scheme: str
    host: str
    port: int
    host_header: str
    prefix: str  # the request path up to the key: "/bucket/" (path style), "/" (virtual host), "/base/bucket/"...
    region: str

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{self.host_header}"


@dataclass(frozen=True, slots=True)
class Fallback:
    """Why boto3 itself must send a bucket's HEADs: a fixed metric label and the operator's words."""

    reason: str  # arn, outposts, s3_express, proxy, signing, unsupported, region_redirect
    detail: str
    hint: str = ""

    def message(self, bucket: str) -> str:
        """The one log line for this bucket, e.g. ``s3://b: lean HEAD path not used (...): boto3 sends ...``."""
        # The detail may quote a server's header (a redirect's region): escaped like the bucket name.
        hint = f"; {printable(self.hint)}" if self.hint else ""
        return f"s3://{printable(bucket)}: lean HEAD path not used ({printable(self.detail)}): {CPU_NOTE}{hint}"


def fallback_for_name(bucket: str) -> Fallback | None:
    """Buckets whose name alone sends them to boto3 (ARNs, S3 Express, Outposts aliases), resolved by no request."""
    if ":" in bucket:
        if ":s3-outposts:" in bucket:
            return Fallback("outposts", "an S3 on Outposts ARN")
        return Fallback("arn", "an ARN: access point, Object Lambda or Multi-Region Access Point")
    if bucket.endswith("--x-s3"):
        # boto3 would call CreateSession first: resolving it here would send a request.
        return Fallback("s3_express", "an S3 Express One Zone directory bucket (session credentials)")
    if bucket.endswith("--op-s3"):
        return Fallback("outposts", "an S3 on Outposts access point alias")
    return None


def target_from_request(url: str, headers: Mapping[str, str | bytes]) -> Target | Fallback:
    """Read the Target from the HeadObject boto3 prepared for SENTINEL_KEY (URL and signed headers)."""
    lowered = {k.lower(): v.decode("latin-1") if isinstance(v, bytes) else v for k, v in headers.items()}
    auth = _AUTHORIZATION.match(lowered.get("authorization", ""))
    if auth is None:
        return Fallback("signing", "boto3 signs it with something other than SigV4 (signature_version?)")
    if auth["alg"] != "AWS4-HMAC-SHA256":
        return Fallback("signing", f"boto3 signs it with {auth['alg']}")
    scope = auth["cred"].rsplit("/", 4)
    if len(scope) != 5 or scope[4] != "aws4_request":
        return Fallback("signing", "an unexpected SigV4 credential scope")
    region, service = scope[2], scope[3]
    if service != "s3":
        return Fallback(_OTHER_SERVICES.get(service, "signing"), f"boto3 signs it for the {service!r} service")
    extra = sorted(set(auth["signed"].split(";")) - _SIGNABLE)
    if extra:
        return Fallback("signing", f"boto3 signs headers the lean path does not send: {', '.join(extra)}")
    if lowered.get("x-amz-content-sha256") != EMPTY_SHA256:
        return Fallback("signing", f"boto3 signs the payload as {lowered.get('x-amz-content-sha256')!r}")
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    except ValueError:
        return Fallback("unsupported", "boto3's request URL cannot be parsed")
    hostname = parts.hostname
    if parts.scheme not in _DEFAULT_PORTS or not hostname or parts.query:
        return Fallback("unsupported", "an unexpected request URL")
    if not parts.path.endswith("/" + SENTINEL_KEY):
        return Fallback("unsupported", "an unexpected request path")
    host_header = _host_header(parts.scheme, hostname, port)
    # Anything else in the authority (userinfo, a bucket label before an IPv6 literal) is not a host we can use.
    if parts.netloc.lower() not in (host_header, f"{host_header}:{port}"):
        return Fallback("unsupported", "boto3's request URL names a host the lean path cannot connect to")
    return Target(parts.scheme, hostname, port, host_header, parts.path[: -len(SENTINEL_KEY)], region)


def _host_header(scheme: str, hostname: str, port: int) -> str:
    """The Host header botocore signs: lower case, IPv6 in brackets, the default port left out."""
    host = f"[{hostname}]" if ":" in hostname else hostname
    return host if port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"


class _Empty:
    def stream(self) -> Iterator[bytes]:
        return iter([b""])


_captured = threading.local()


def _capture(request: Any, **_: Any) -> AWSResponse:
    """before-send on the resolver: keep the prepared request, answer it here (nothing reaches the network)."""
    _captured.request = (request.url, dict(request.headers.items()))
    return AWSResponse(request.url, 200, HTTPHeaders(), _Empty())


def capture_head(resolver: S3Client, bucket: str) -> tuple[str, dict[str, str | bytes]]:
    """The URL and headers of the HeadObject ``resolver`` would send for the sentinel key, sending nothing."""
    # Every operation of the resolver is answered locally, so no handler of botocore's can reach the network.
    # (The stubs type handlers as returning None; a before-send handler's answer replaces the request.)
    resolver.meta.events.register("before-send.s3", _capture, unique_id="poller-target-capture")  # type: ignore[arg-type]
    _captured.request = None
    resolver.head_object(Bucket=bucket, Key=SENTINEL_KEY)
    found: tuple[str, dict[str, str | bytes]] | None = _captured.request
    _captured.request = None
    if found is None:
        raise ValueError(f"s3://{printable(bucket)}: the resolver client sent no HeadObject to capture")
    return found


def resolve(resolver: S3Client, bucket: str) -> Target | Fallback:
    """Where boto3 sends this bucket's HEADs, or why boto3 must send them itself; botocore errors propagate."""
    named = fallback_for_name(bucket)
    if named is not None:
        return named
    url, headers = capture_head(resolver, bucket)
    found = target_from_request(url, headers)
    if isinstance(found, Target) and proxied(found):
        return Fallback(
            "proxy",
            f"an {found.scheme.upper()}_PROXY applies to {found.host}",
            "the lean path does not speak to proxies; list the host in NO_PROXY to send directly",
        )
    return found


def target_from_presigned(url: str) -> Target | None:
    """Read the Target from a SigV4 presigned HeadObject URL for SENTINEL_KEY; None if not plain S3 SigV4.

    Not used for resolution any more: botocore presigns some requests against another endpoint than it sends.
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    scope = (query.get("X-Amz-Credential") or [""])[0].split("/")
    if parts.scheme not in _DEFAULT_PORTS or len(scope) != 5 or scope[3] != "s3" or scope[4] != "aws4_request":
        return None  # another signing service (S3 Express, Outposts, Object Lambda) or signer
    if not parts.path.endswith("/" + SENTINEL_KEY) or parts.hostname is None:
        return None
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    host_header = _host_header(parts.scheme, parts.hostname, port)
    return Target(parts.scheme, parts.hostname, port, host_header, parts.path[: -len(SENTINEL_KEY)], scope[2])


def request_path(target: Target, key: str) -> str:
    """The request path of a key, percent-encoded as botocore does (``/`` and ``~`` kept)."""
    return target.prefix + quote(key, safe="/~")


def proxied(target: Target) -> bool:
    """True when an HTTP(S)_PROXY applies to this host: boto3 honours it, the lean path does not speak it."""
    proxies = urllib.request.getproxies()
    return target.scheme in proxies and not urllib.request.proxy_bypass(target.host)


_fallback_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()


def count_fallback(reason: str) -> None:
    """Count one bucket handed to boto3 (read by the ``poller_lean_fallbacks`` metric)."""
    with _counts_lock:
        _fallback_counts[reason] += 1


def fallback_counts() -> dict[str, int]:
    """Buckets handed to boto3 in this process, by reason."""
    with _counts_lock:
        return dict(_fallback_counts)
