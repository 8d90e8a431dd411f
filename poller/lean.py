"""The lean HeadObject: SigV4-signed here, sent on one keep-alive socket per worker thread.

boto3 spends about 750 µs of CPU on one HeadObject (request pipeline, event hooks, signer,
urllib3, response parser); under the GIL that is the daemon's ceiling. This path spends about
85 µs (`python -m bench`, "CPU per conditional HEAD"). It sends the request boto3 would send, byte for byte in
everything signed (tests/test_lean.py proves it per key class and addressing style): the endpoint,
addressing style, signing region and credentials are still resolved by boto3/botocore, once per
bucket. A bucket it cannot serve the same way (an ARN, S3 Express, a proxy, a redirect to another
region) goes through boto3 instead, and ``[s3] http_client = "boto3"`` turns it off entirely.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import random
import socket
import ssl
import threading
import time
from datetime import UTC
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)

from poller import __version__
from poller.model import Answer, answer_from_headers
from poller.s3client import head
from poller.targets import Fallback, Target, count_fallback, request_path, resolve

if TYPE_CHECKING:
    import boto3
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # a HEAD has no body; botocore signs its hash, even on https
# botocore's standard retry mode: these statuses are transient; the backoff base is 50 ms (1 s when throttled).
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF = 20.0


def header_conditions(conditions: dict[str, Any]) -> dict[str, str]:
    """HeadObject condition kwargs (``IfNoneMatch``, ``IfModifiedSince``) as botocore puts them on the wire."""
    out: dict[str, str] = {}
    etag = conditions.get("IfNoneMatch")
    if etag is not None:
        out["if-none-match"] = etag
    since = conditions.get("IfModifiedSince")
    if since is not None:
        out["if-modified-since"] = format_datetime(since.astimezone(UTC).replace(microsecond=0), usegmt=True)
    # A watch's request options: botocore sends (and signs) these HeadObject parameters as headers.
    payer = conditions.get("RequestPayer")
    if payer is not None:
        out["x-amz-request-payer"] = payer
    owner = conditions.get("ExpectedBucketOwner")
    if owner is not None:
        out["x-amz-expected-bucket-owner"] = owner
    return out


class Signer:
    """SigV4 for one HEAD with no body, as botocore's S3SigV4Auth computes it; signing keys cached per day."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str, str], bytes] = {}

    def _signing_key(self, secret: str, day: str, region: str) -> bytes:
        cache_key = (secret, day, region)
        key = self._keys.get(cache_key)
        if key is None:
            key = ("AWS4" + secret).encode()
            for part in (day, region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            if len(self._keys) > 16:  # a day and credentials rotate: keep the cache small
                self._keys.clear()
            self._keys[cache_key] = key
        return key

    def headers(
        self,
        target: Target,
        path: str,
        conditions: dict[str, str],
        access_key: str,
        secret_key: str,
        token: str | None,
        amz_date: str,
    ) -> dict[str, str]:
        """The headers of the signed request (lower-case names), Authorization included."""
        signed = {"host": target.host_header, **conditions}
        signed["x-amz-content-sha256"] = EMPTY_SHA256
        signed["x-amz-date"] = amz_date
        if token:
            signed["x-amz-security-token"] = token
        names = sorted(signed)
        canonical = "".join(f"{n}:{' '.join(signed[n].split())}\n" for n in names)
        signed_names = ";".join(names)
        request = f"HEAD\n{path}\n\n{canonical}\n{signed_names}\n{EMPTY_SHA256}"
        day = amz_date[:8]
        scope = f"{day}/{target.region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(request.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(secret_key, day, target.region), to_sign.encode(), hashlib.sha256)
        signed["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed_names}, "
            f"Signature={signature.hexdigest()}"
        )
        return signed


def _backoff(attempt: int, throttled: bool = False) -> None:
    """botocore's standard-mode delay: jittered, doubling from 50 ms (1 s when throttled), capped."""
    base = 1.0 if throttled else 0.05
    time.sleep(random.random() * min(base * 2 ** (attempt - 1), MAX_BACKOFF))


def _amz_date() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _request_bytes(path: str, headers: dict[str, str]) -> bytes:
    """The HTTP/1.1 request; a header value with a line break (never from a sane server) is refused."""
    if any("\r" in value or "\n" in value for value in headers.values()):
        raise ValueError("refusing a header value with a line break")
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"HEAD {path} HTTP/1.1\r\n{lines}\r\n".encode("latin-1")


MAX_HEAD = 64 * 1024


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read up to the end of the response head (a HEAD answer has no body); return it and any excess."""
    buf = b""
    while True:
        chunk = sock.recv(MAX_HEAD)
        if not chunk:
            raise ConnectionError("the server closed the connection before answering")
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head, rest = buf[:end], buf[end + 4 :]
            if head.startswith((b"HTTP/1.1 1", b"HTTP/1.0 1")):  # an interim 1xx answer: the real one follows
                buf = rest
                continue
            return head, rest
        if len(buf) > MAX_HEAD:
            raise ValueError("response head too large")


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str], bool]:
    """Status, reason, lower-cased headers, and whether the connection may be kept alive."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    return int(code), reason, headers, keep


class _Fallback(Exception):
    """This bucket needs boto3: it lives in another region (``region``, from ``x-amz-bucket-region``)."""

    def __init__(self, region: str = "") -> None:
        super().__init__(region)
        self.region = region


class LeanHead:
    """Conditional HeadObject on the lean path; answers and raises exactly like ``probe.head``."""

    def __init__(
        self,
        session: boto3.session.Session,
        client: S3Client,
        resolver: S3Client,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
    ) -> None:
        self._session = session
        self._client = client  # the boto3 fallback, and the resolver of everything but the HEAD itself
        # Same settings as ``client``; it builds one HeadObject per bucket that is captured, never sent.
        if resolver is client:  # every request of the resolver is answered locally: it must not be the client
            raise ValueError("LeanHead needs a resolver client of its own, not the boto3 client")
        self._resolver = resolver
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_attempts = max_attempts
        self._signer = Signer()
        self._targets: dict[str, Target | Fallback] = {}  # per bucket; a Fallback is logged and counted once
        self._lock = threading.Lock()
        self._local = threading.local()
        self._user_agent = f"poller/{__version__} (lean HeadObject; botocore signing scope)"
        self._ssl: ssl.SSLContext | None = None

    # --- resolution ------------------------------------------------------------------

    def target(self, bucket: str) -> Target | None:
        """Where boto3 sends this bucket's HEAD, or None to use boto3 itself; botocore errors propagate."""
        found = self._targets.get(bucket)
        if found is None:
            found = resolve(self._resolver, bucket)  # not cached on error: no credentials yet, a bad name
            if isinstance(found, Fallback):
                self._fall_back(bucket, found)
            else:
                with self._lock:
                    found = self._targets.setdefault(bucket, found)
        return found if isinstance(found, Target) else None

    def _fall_back(self, bucket: str, why: Fallback) -> None:
        """Hand the bucket to boto3 for the life of this client: one WARNING and one count per bucket."""
        with self._lock:
            if isinstance(self._targets.get(bucket), Fallback):
                return
            self._targets[bucket] = why
        count_fallback(why.reason)
        log.warning("%s", why.message(bucket))

    # --- the request -----------------------------------------------------------------

    def head(self, bucket: str, key: str, conditions: dict[str, Any]) -> Answer:
        """One HeadObject; a 304 or 404 is an Answer, anything else raises as boto3 would."""
        target = self.target(bucket)
        if target is None:
            return head(self._client, bucket, key, **conditions)
        try:
            return self._head(target, request_path(target, key), header_conditions(conditions))
        except _Fallback as redirect:
            where = f"region redirect to {redirect.region}" if redirect.region else "region redirect"
            hint = f'set [s3] region = "{redirect.region}" if your buckets live there' if redirect.region else ""
            self._fall_back(bucket, Fallback("region_redirect", where, hint))
            return head(self._client, bucket, key, **conditions)

    def _head(self, target: Target, path: str, conditions: dict[str, str]) -> Answer:
        attempt = 0
        while True:
            attempt += 1
            credentials = self._session.get_credentials()
            if credentials is None:
                raise NoCredentialsError()
            frozen = credentials.get_frozen_credentials()
            if not frozen.access_key or not frozen.secret_key:
                raise NoCredentialsError()
            headers = self._signer.headers(
                target, path, conditions, frozen.access_key, frozen.secret_key, frozen.token, _amz_date()
            )
            headers["accept-encoding"] = "identity"
            headers["user-agent"] = self._user_agent
            try:
                status, reason, answer_headers = self._send(target, path, headers)
            except (ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError, ConnectionClosedError):
                if attempt >= self._max_attempts:
                    raise
                _backoff(attempt)
                continue
            if status in (200, 304, 404):
                return answer_from_headers(status, answer_headers)
            if status in (301, 307, 400) and "x-amz-bucket-region" in answer_headers:
                raise _Fallback(answer_headers["x-amz-bucket-region"])  # boto3 follows that redirect
            if status in RETRY_STATUSES and attempt < self._max_attempts:
                _backoff(attempt, throttled=status == 429)
                continue
            raise ClientError(
                {
                    "Error": {"Code": str(status), "Message": reason},
                    "ResponseMetadata": {
                        "HTTPStatusCode": status,
                        "HTTPHeaders": answer_headers,
                        "RetryAttempts": attempt - 1,
                        "RequestId": answer_headers.get("x-amz-request-id", ""),
                        "HostId": answer_headers.get("x-amz-id-2", ""),
                    },
                },
                "HeadObject",
            )

    def _send(self, target: Target, path: str, headers: dict[str, str]) -> tuple[int, str, dict[str, str]]:
        """Send on this thread's kept-alive connection; a stale one is replaced once, silently."""
        request = _request_bytes(path, headers)
        connections: dict[Target, socket.socket] = self._local.__dict__.setdefault("connections", {})
        sock = connections.pop(target, None)
        reused = sock is not None
        while True:
            if sock is None:
                sock = self._connect(target)
            received = False
            try:
                sock.sendall(request)
                head, rest = _read_head(sock)
                received = True
                status, reason, answer_headers, keep = _parse_head(head)
            except TimeoutError as exc:
                sock.close()
                raise ReadTimeoutError(endpoint_url=target.endpoint + path) from exc
            except (OSError, ValueError) as exc:
                sock.close()
                sock = None
                if reused and not received:  # the server closed an idle keep-alive connection: not an attempt
                    reused = False
                    continue
                raise ConnectionClosedError(endpoint_url=target.endpoint + path) from exc
            if keep and not rest:  # a HEAD answer has no body: anything after the head means trouble
                connections[target] = sock
            else:
                sock.close()
            return status, reason, answer_headers

    def _connect(self, target: Target) -> socket.socket:
        try:
            sock = socket.create_connection((target.host, target.port), timeout=self._connect_timeout)
            if target.scheme == "https":
                sock = self._ssl_context().wrap_socket(sock, server_hostname=target.host)
        except TimeoutError as exc:
            raise ConnectTimeoutError(endpoint_url=target.endpoint) from exc
        except ssl.SSLError as exc:
            raise SSLError(endpoint_url=target.endpoint, error=exc) from exc
        except OSError as exc:
            raise EndpointConnectionError(endpoint_url=target.endpoint) from exc
        sock.settimeout(self._read_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            from botocore.httpsession import get_cert_path

            self._ssl = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True))
        return self._ssl
