"""The lean HeadObject: SigV4-signed here, sent on one keep-alive socket per worker thread.

boto3 spends about 750 µs of CPU on one HeadObject (request pipeline, event hooks, signer,
urllib3, response parser); under the GIL that is the daemon's ceiling. This path spends about
85 µs (`python -m bench`, "CPU per conditional HEAD"). It sends the request boto3 would send, byte for byte in
everything signed (tests/test_lean.py proves it per key class and addressing style): the endpoint,
addressing style, signing region and credentials are still resolved by boto3/botocore, once per
bucket. A bucket it cannot serve the same way (an ARN, S3 Express, a proxy, a redirect to another
region) goes through boto3 instead, and ``[s3] http_client = "boto3"`` turns it off entirely.

What comes back is trusted less than boto3 does (tests/test_conformance.py runs both against a
hostile peer): the head must be strict HTTP/1.1 (CRLF only, no control characters, no conflicting
ETag), one deadline covers a whole attempt, a kept socket is reused only if nothing waits unread on
it, the first byte nobody asked for ends keep-alive to that endpoint for KEEPALIVE_OFF_SECONDS, and
a change read on a kept socket is asked again on a new one (probe.py), so that a stray answer is
never recorded under the next key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import re
import select
import socket
import ssl
import threading
import time
from datetime import UTC, datetime
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
from poller.model import Answer, ProtocolError, answer_from_headers
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


_DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTH_NAMES = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _imf_fixdate(moment: datetime) -> str:
    """``email.utils.format_datetime(..., usegmt=True)`` of the whole second, at a tenth of its cost."""
    t = moment.astimezone(UTC)
    return (
        f"{_DAY_NAMES[t.weekday()]}, {t.day:02d} {_MONTH_NAMES[t.month - 1]} {t.year:04d} "
        f"{t.hour:02d}:{t.minute:02d}:{t.second:02d} GMT"
    )


def header_conditions(conditions: dict[str, Any]) -> dict[str, str]:
    """HeadObject condition kwargs (``IfNoneMatch``, ``IfModifiedSince``) as botocore puts them on the wire."""
    out: dict[str, str] = {}
    etag = conditions.get("IfNoneMatch")
    if etag is not None:
        out["if-none-match"] = etag
    since = conditions.get("IfModifiedSince")
    if since is not None:
        out["if-modified-since"] = _imf_fixdate(since)
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


# Far above any S3 head (user metadata is capped at 2 KB); bounds what a hostile peer can make us buffer.
MAX_HEAD = 256 * 1024
# In a response head: a control character, a CR not before LF, an LF not after CR (HTTP needs CRLF).
_BAD_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
_STATUS_LINE = re.compile(r"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: (.*))?")
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NOT_A_HEADER_LINE = re.compile(r"\r\n(?![!#$%&'*+\-.^_`|~0-9A-Za-z]+:)")
# The bytes a head may hold: CR and LF (as CRLF only), tab, visible ASCII, space, obs-text.
_HEAD_BYTES = bytes([9, 10, 13, *range(0x20, 0x7F), *range(0x80, 0x100)])
# Headers an answer is read from: a second, different value is a protocol error, not a choice to make.
_SINGLE = frozenset({"etag", "last-modified", "content-length", "date", "x-amz-version-id", "x-amz-bucket-region"})

# An endpoint that sent bytes nobody asked for gets a new connection per request for this long: a
# stray answer on a kept connection could be read as the next key's. Not for good: one stray byte (a
# proxy's 408, a stray chunk) would otherwise cost a connection per request for the process's life,
# and a TLS handshake each, or run out of ports in TIME_WAIT.
KEEPALIVE_OFF_SECONDS = 600.0
# How many kept connections a worker thread holds (one per endpoint host; least recently used goes).
# Virtual-hosted buckets are hosts of their own: a worker cycling through more buckets than this pays
# a connection (and TLS handshake) per HEAD. The daemon raises its open-file limit to match.
MAX_KEPT = 16
_stray_lock = threading.Lock()
_no_keepalive: dict[str, float] = {}  # endpoint -> monotonic time keep-alive to it comes back
_keepalive_offs = 0
_clock = time.monotonic


def keepalive_disabled(endpoint: str) -> bool:
    """True while ``endpoint`` (``scheme://host[:port]``) gets a new connection per request after a stray byte."""
    until = _no_keepalive.get(endpoint)
    return until is not None and _clock() < until


def keepalive_disabled_count() -> int:
    """How many times a stray byte turned keep-alive off in this process (the ``poller_keepalive_disabled`` metric)."""
    with _stray_lock:
        return _keepalive_offs


def _stray(endpoint: str, what: str) -> None:
    """Turn keep-alive to ``endpoint`` off for a while: a stray answer on a kept connection reads as the next key's."""
    global _keepalive_offs
    with _stray_lock:
        if keepalive_disabled(endpoint):
            return
        _no_keepalive[endpoint] = _clock() + KEEPALIVE_OFF_SECONDS
        _keepalive_offs += 1
    log.warning(
        "endpoint %s sent %s: keep-alive to it is off for %d minutes (one new connection per request), so "
        "that a stray answer is never read as another key's",
        endpoint,
        what,
        KEEPALIVE_OFF_SECONDS // 60,
    )


def _shown(data: bytes) -> str:
    """Bytes from the peer, quoted and escaped for a message (never a raw control character in a log)."""
    text = data[:80].decode("latin-1")
    return ascii(text) if not text.isprintable() else repr(text)


def _first_line(data: bytes) -> str:
    return _shown(data.replace(b"\n", b"\r").partition(b"\r")[0])


def _fault(endpoint: str, what: str) -> ProtocolError:
    return ProtocolError(f"malformed HTTP response from {endpoint}: {what}")


def _read_head(sock: socket.socket, deadline: float, endpoint: str) -> tuple[bytes, bytes]:
    """Read up to the end of the final response head by ``deadline`` (monotonic); return it and the bytes after it.

    A HEAD answer has no body. Interim 1xx heads are skipped, including one that arrived in the same
    packet as the final answer. Raises TimeoutError at the deadline, ProtocolError on a malformed
    head, ConnectionError when the peer closes first.
    """
    buf = b""
    scanned = checked = 0
    while True:
        end = buf.find(b"\r\n\r\n", max(scanned - 3, 0))
        if end >= 0:
            head, buf = buf[:end], buf[end + 4 :]
            if head[9:10] == b"1" and head.startswith(b"HTTP/1."):
                _parse_head(head, endpoint)  # an interim answer, held to the same rules; the final one follows
                scanned = checked = 0
                continue
            return head, buf
        scanned = len(buf)
        if buf:
            # Fail fast, not at the deadline: a banner, an LF-only head, a control character.
            if not buf.startswith(b"HTTP/1."[: len(buf)]):
                raise _fault(endpoint, f"not an HTTP response: {_first_line(buf)}")
            lines_end = buf.rfind(b"\n") + 1
            _check_bytes(buf[checked:lines_end], endpoint)
            checked = max(checked, lines_end)
            if scanned > MAX_HEAD:
                raise _fault(endpoint, f"response head larger than {MAX_HEAD // 1024} KiB")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("response head not complete by the deadline")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            if buf:
                raise _fault(
                    endpoint,
                    f"the server closed the connection in the middle of the response head ({len(buf)} bytes received)",
                )
            raise ConnectionError("the server closed the connection before answering")
        buf += chunk


def _check_bytes(head: bytes, endpoint: str) -> None:
    """Refuse a bare CR or LF and control characters in a head: they split log lines and wedge a stored ETag."""
    bad = _BAD_BYTE.search(head)
    if bad is None:
        return
    start = head.rfind(b"\n", 0, bad.start()) + 1
    colon = head.find(b":", start, bad.start())
    name = head[start:colon].decode("latin-1").lower() if colon >= 0 else ""
    if _FIELD_NAME.fullmatch(name):
        where = f"the {name} header"
    else:
        where = "the status line" if head.startswith(b"HTTP/", start) else "a header line"
    if bad.group() == b"\n":
        raise _fault(endpoint, f"a bare LF ends {where} (HTTP requires CRLF)")
    if bad.group() == b"\r":
        raise _fault(endpoint, f"a bare CR in {where} (HTTP requires CRLF)")
    raise _fault(endpoint, f"control character 0x{bad.group()[0]:02x} in {where}")


def _parse_head(head: bytes, endpoint: str) -> tuple[int, str, dict[str, str], bool]:
    """Status, reason, lower-cased headers, and whether the connection may be kept alive; strict (RFC 9112)."""
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    breaks = len(lines) - 1
    # Cheap tests first (C speed, every answer); the exact fault is found only when there is one.
    if head.translate(None, _HEAD_BYTES) or head.count(b"\r") != breaks or head.count(b"\n") != breaks:
        _check_bytes(head, endpoint)
    status = _STATUS_LINE.fullmatch(lines[0])
    if status is None:
        raise _fault(endpoint, f"not an HTTP response: {_first_line(head)}")
    bad = _NOT_A_HEADER_LINE.search(text)
    if bad is not None:
        raise _fault(endpoint, f"not a header line: {_first_line(head[bad.end() :])}")
    fields = [line.partition(":") for line in lines[1:]]
    headers = {name.lower(): value.strip(" \t") for name, _, value in fields}
    if len(headers) != len(fields):  # a repeated header: rare, so checked apart
        headers = _merge(fields, endpoint)
    version, code, reason = status.groups()
    connection = headers.get("connection")
    if connection is None:
        keep = version == "1"
    else:
        tokens = {t.strip() for t in connection.lower().split(",")}
        keep = "close" not in tokens if version == "1" else "keep-alive" in tokens
    return int(code), reason or "", headers, keep


def _merge(fields: list[tuple[str, str, str]], endpoint: str) -> dict[str, str]:
    """Headers with repeats: joined as urllib3 does, except one an answer is read from that disagrees."""
    headers: dict[str, str] = {}
    dates_differ = False
    for name, _, value in fields:
        name = name.lower()
        value = value.strip(" \t")
        seen = headers.get(name)
        if seen is None:
            headers[name] = value
        elif name not in _SINGLE:
            headers[name] = f"{seen}, {value}"
        elif seen == value:
            continue
        elif name == "date":
            dates_differ = True
        else:
            shown = f"{_shown(seen.encode('latin-1'))} and {_shown(value.encode('latin-1'))}"
            raise _fault(endpoint, f"conflicting {name} headers: {shown}")
    if dates_differ:
        # A proxy's Date beside the server's: neither can be trusted for the same-second guard, and
        # without one the next poll asks by ETag alone (the safe side). Not worth failing every poll.
        del headers["date"]
    return headers


def _idle_state(sock: socket.socket) -> str:
    """What waits on an idle kept-alive socket: "" (nothing: reusable), "eof" (the peer closed it) or "data"."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return "data"
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(0):
        return ""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        # TLS: read a record (a session ticket is no data); plain: peek, so a byte is only looked at.
        got = sock.recv(1) if isinstance(sock, ssl.SSLSocket) else sock.recv(1, socket.MSG_PEEK)
    except (ssl.SSLWantReadError, BlockingIOError):
        sock.settimeout(timeout)
        return ""
    except OSError:
        return "eof"  # reset by the peer
    return "data" if got else "eof"


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

    def head(self, bucket: str, key: str, conditions: dict[str, Any], *, fresh: bool = False) -> Answer:
        """One HeadObject; a 304 or 404 is an Answer, anything else raises as boto3 would. ``fresh``: on a
        new connection, so the answer cannot be one an earlier request was owed."""
        target = self.target(bucket)
        if target is None:
            return head(self._client, bucket, key, **conditions)
        try:
            return self._head(target, request_path(target, key), header_conditions(conditions), fresh)
        except _Fallback as redirect:
            where = f"region redirect to {redirect.region}" if redirect.region else "region redirect"
            hint = f'set [s3] region = "{redirect.region}" if your buckets live there' if redirect.region else ""
            self._fall_back(bucket, Fallback("region_redirect", where, hint))
            return head(self._client, bucket, key, **conditions)

    def _head(self, target: Target, path: str, conditions: dict[str, str], fresh: bool) -> Answer:
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
                status, reason, answer_headers, reused = self._send(target, path, headers, fresh)
            except (
                ConnectTimeoutError,
                EndpointConnectionError,
                ReadTimeoutError,
                ConnectionClosedError,
                ProtocolError,
                SSLError,  # as botocore's standard mode: a load balancer's EOF mid-handshake is transient
            ):
                # botocore's standard mode retries these too (ConnectionError, HTTPClientError).
                if attempt >= self._max_attempts:
                    raise
                _backoff(attempt)
                continue
            if status in (200, 304, 404):
                return answer_from_headers(status, answer_headers, reused=reused)
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

    def _send(
        self, target: Target, path: str, headers: dict[str, str], fresh: bool = False
    ) -> tuple[int, str, dict[str, str], bool]:
        """One attempt, within read_timeout, on this thread's kept-alive connection or a new one.

        A kept connection is used only when nothing waits unread on it (as urllib3 checks before reuse);
        one the server closed while idle is replaced silently. Any byte nobody asked for ends keep-alive
        to the endpoint (``_stray``), and an answer read on a kept connection next to such bytes is asked
        again on a new connection: it may have been the answer to an earlier request. The last item says
        whether the answer was read on a kept connection (``Answer.reused``).
        """
        request = _request_bytes(path, headers)
        endpoint = target.endpoint
        # Keyed by where the socket goes, not by bucket: path-style buckets of one endpoint share it.
        connections: dict[tuple[str, str, int], socket.socket] = self._local.__dict__.setdefault("connections", {})
        where = (target.scheme, target.host, target.port)
        # Fresh: a new connection, and the kept one stays for the next request, whose idle check sees
        # what else the peer sent on it (a late answer there shows the peer answered twice).
        sock = None if fresh else connections.pop(where, None)
        if sock is not None:
            waiting = _idle_state(sock)
            if waiting:
                sock.close()
                sock = None
                if waiting == "data":
                    _stray(endpoint, "bytes nobody asked for on an idle kept-alive connection")
        reused = sock is not None
        deadline = 0.0
        while True:
            if sock is None:
                sock = self._connect(target)
            if not deadline:
                deadline = time.monotonic() + self._read_timeout  # the whole attempt: send and head
            received = False
            try:
                sock.sendall(request)  # a few hundred bytes to an idle socket: bounded by read_timeout
                head, rest = _read_head(sock, deadline, endpoint)
                received = True
                status, reason, answer_headers, keep = _parse_head(head, endpoint)
            except TimeoutError as exc:
                sock.close()
                raise ReadTimeoutError(endpoint_url=endpoint + path) from exc
            except ProtocolError:
                sock.close()
                sock = None
                if reused:  # on a kept connection this may be the tail of an earlier answer: ask again
                    _stray(endpoint, "a malformed answer on a kept-alive connection")
                    reused = False
                    continue
                raise
            except OSError as exc:
                sock.close()
                sock = None
                if reused and not received:  # the server closed an idle keep-alive connection: not an attempt
                    reused = False
                    continue
                raise ConnectionClosedError(endpoint_url=endpoint + path) from exc
            if reused and status == 408:
                # The server timed the idle connection out (HAProxy does) as the request went: not our answer.
                sock.close()
                sock = None
                _stray(endpoint, "a 408 on a kept-alive connection")
                reused = False
                continue
            if rest:  # a HEAD answer has no body: bytes after the head answer nothing we asked
                sock.close()
                sock = None
                _stray(endpoint, f"{len(rest)} bytes after a response head")
                if reused:
                    reused = False
                    continue
                return status, reason, answer_headers, reused
            if keep and not keepalive_disabled(endpoint) and where not in connections:
                connections[where] = sock  # the most recently used last
                if len(connections) > MAX_KEPT:
                    connections.pop(next(iter(connections))).close()
            else:
                sock.close()
            return status, reason, answer_headers, reused

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

            # The CA bundle botocore verifies with: AWS_CA_BUNDLE, or ca_bundle in the profile, else certifi's.
            bundle = self._session._session.get_config_variable("ca_bundle")
            self._ssl = ssl.create_default_context(cafile=bundle or get_cert_path(True))
        return self._ssl
