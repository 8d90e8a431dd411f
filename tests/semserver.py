"""A small threaded S3 server whose conditional-request semantics is a parameter.

It speaks enough S3 for HeadObject and HeadBucket, path-style, and ignores authentication. The test
sets each object's ETag, Last-Modified and version id directly (no PUT over the wire: any request
other than HEAD is refused with 405 and recorded, so a test can prove that poller wrote nothing).

Semantics (design.md section 1):
- ``rfc``: If-None-Match decides when present, If-Modified-Since only without it (RFC 9110).
- ``either_etag``: 304 when EITHER condition says "not modified"; the 304 carries ETag and Last-Modified.
- ``either_noetag``: the same, but the 304 carries neither (the case that hid changes).
- ``ims_ignored``: If-Modified-Since is never honoured; If-None-Match decides.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from conftest import serving

SEMANTICS = ("rfc", "either_etag", "either_noetag", "ims_ignored")


@dataclass
class Obj:
    etag: str
    last_modified: datetime
    version_id: str | None = None
    size: int = 1


class SemServer:
    """The state the handler serves; tests change it between polls."""

    def __init__(
        self,
        semantics: str,
        version_id_on_404: bool = True,
        strict_since: bool = False,
        exact_since: bool = False,
        *,
        send_date: bool = True,
        broken_inm: bool = False,
    ) -> None:
        assert semantics in SEMANTICS, semantics
        self.semantics = semantics
        self.send_date = send_date  # False: no Date header on any answer
        self.broken_inm = broken_inm  # any If-None-Match, even a non-matching one, answers 304 without headers
        self.strict_since = strict_since  # an equal If-Modified-Since counts as modified (an off-by-one server)
        self.exact_since = exact_since  # only an exactly equal If-Modified-Since is "not modified"
        self.version_id_on_404 = version_id_on_404
        self.buckets: set[str] = set()
        self.objects: dict[tuple[str, str], Obj] = {}
        self.markers: dict[tuple[str, str], str | None] = {}  # deleted keys: the delete marker's version id
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        self.fail = 0  # answer this many coming requests with 500 InternalError
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.refused: list[str] = []
        self.lock = threading.Lock()
        self.endpoint = ""

    def put(self, bucket: str, key: str, etag: str, last_modified: datetime, version_id: str | None = None) -> None:
        """Make this the current version of ``bucket/key`` (the bucket is created if needed)."""
        with self.lock:
            self.buckets.add(bucket)
            self.markers.pop((bucket, key), None)
            self.objects[(bucket, key)] = Obj(etag, last_modified.replace(microsecond=0), version_id)

    def delete(self, bucket: str, key: str, marker: str | None = None) -> None:
        with self.lock:
            self.objects.pop((bucket, key), None)
            self.markers[(bucket, key)] = marker

    def heads(self) -> list[dict[str, str]]:
        """The headers of every HEAD object request so far (lower-case names)."""
        with self.lock:
            return [h for m, path, h in self.requests if m == "HEAD" and path.count("/") >= 2]

    # --- the answer ---------------------------------------------------------------------

    def answer(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        with self.lock:
            self.requests.append((method, path, headers))
            if method != "HEAD":
                self.refused.append(f"{method} {path}")
                return 405, {}
            if self.fail > 0:
                self.fail -= 1
                return 500, {"x-amz-error-code": "InternalError"}
            bucket, _, key = unquote(urlsplit(path).path).lstrip("/").partition("/")
            if bucket not in self.buckets:
                return 404, {"x-amz-error-code": "NoSuchBucket"}
            if not key:
                return 200, {}
            obj = self.objects.get((bucket, key))
            if obj is None:
                out = {"x-amz-error-code": "NoSuchKey"}
                if (bucket, key) in self.markers:
                    out["x-amz-delete-marker"] = "true"
                    marker = self.markers[(bucket, key)]
                    if marker and self.version_id_on_404:
                        out["x-amz-version-id"] = marker
                return 404, out
            meta = {"etag": obj.etag, "last-modified": format_datetime(obj.last_modified, usegmt=True)}
            if obj.version_id:
                meta["x-amz-version-id"] = obj.version_id
            if self.broken_inm and "if-none-match" in headers:
                return 304, {}
            if self._not_modified(obj, headers):
                return 304, ({} if self.semantics == "either_noetag" else meta)
            return 200, {**meta, "content-length": str(obj.size)}

    def _not_modified(self, obj: Obj, headers: dict[str, str]) -> bool:
        inm = headers.get("if-none-match")
        match = inm is not None and any(t.strip() in (obj.etag, "*") for t in inm.split(","))
        ims_text = headers.get("if-modified-since")
        since = parsedate_to_datetime(ims_text) if ims_text else None
        unmodified = since is not None and (
            obj.last_modified == since
            if self.exact_since
            else obj.last_modified < since
            if self.strict_since
            else obj.last_modified <= since
        )
        if self.semantics == "rfc":
            return match if inm is not None else unmodified
        if self.semantics == "ims_ignored":
            return match
        return match or unmodified  # either_*


def _handler(server: SemServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, out = server.answer(self.command, self.path, headers)
            self.send_response(status)  # its Date header comes from date_time_string: the server's clock
            self.send_header("x-amz-request-id", "semserver")
            out.setdefault("content-length", "0")
            for name, value in out.items():
                self.send_header(name, value)
            self.end_headers()

        def send_response(self, code: int, message: str | None = None) -> None:
            if server.send_date:
                super().send_response(code, message)
            else:  # BaseHTTPRequestHandler's, without its Date header
                self.send_response_only(code, message)
                self.send_header("Server", self.version_string())

        def date_time_string(self, timestamp: float | None = None) -> str:
            return format_datetime(server.clock().replace(microsecond=0), usegmt=True)

        do_HEAD = do_GET = do_PUT = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def semserver(semantics: str, **kw: Any) -> Iterator[SemServer]:
    """A running SemServer; on exit it asserts that nothing but HEAD reached it."""
    server = SemServer(semantics, **kw)
    with serving(_handler(server)) as port:
        server.endpoint = f"http://127.0.0.1:{port}"
        yield server
    assert server.refused == [], f"poller sent write or read requests: {server.refused}"


T0 = datetime(2026, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
