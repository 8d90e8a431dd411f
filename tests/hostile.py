"""A raw-socket S3 peer that misbehaves on purpose, chosen per request (by object key).

It speaks just enough S3 for HeadObject (path style, ``/bucket/key``, auth ignored) and
HeadBucket (``HEAD /bucket`` answers 200). Each key can be given a behaviour: a function that
writes whatever bytes it likes to the connection, as broken proxies, load balancers and S3
clones do. Every object ``key`` has the ETag ``etag_of(key)``, so a test can tell an answer
recorded under the wrong key.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import unquote

import pytest

LAST_MODIFIED = "Wed, 25 Nov 2026 10:00:00 GMT"
SIZE = 42


def etag_of(key: str) -> str:
    return f'"etag-{key}"'


@dataclass
class Request:
    conn: int  # which connection it came on (1, 2, ... in accept order)
    path: str
    bucket: str
    key: str  # "" for HeadBucket
    headers: dict[str, str]


@dataclass
class Peer:
    """One accepted connection, as a behaviour sees it."""

    server: HostileServer
    sock: socket.socket
    number: int
    owed: bytes = b""  # sent before the answer to the next request on this connection (a desync)
    served: int = 0  # requests read on this connection so far, this one included
    closed: bool = False

    def send(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(data)

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def later(self, delay: float, data: bytes, close: bool = False) -> None:
        """Send ``data`` unasked, ``delay`` seconds from now (the server's timer, not a test's sleep)."""

        def fire() -> None:
            time.sleep(delay)
            self.send(data)
            if close:
                self.close()
            with self.server.lock:
                self.server.pending -= 1

        with self.server.lock:
            self.server.pending += 1
        threading.Thread(target=fire, daemon=True).start()


Behaviour = Callable[[Peer, Request], None]


def head_lines(req: Request, server: HostileServer, version: str = "HTTP/1.1") -> list[str]:
    """The status line and headers a sane S3 server sends for this HEAD."""
    date = formatdate(usegmt=True)
    if req.key == "":
        return [f"{version} 200 OK", f"Date: {date}", "x-amz-bucket-region: us-east-1", "Content-Length: 0"]
    if req.key in server.missing:
        return [f"{version} 404 Not Found", f"Date: {date}", "Content-Length: 0"]
    etag = etag_of(req.key)
    if req.headers.get("if-none-match") == etag:
        return [f"{version} 304 Not Modified", f"Date: {date}", f"ETag: {etag}", f"Last-Modified: {LAST_MODIFIED}"]
    return [
        f"{version} 200 OK",
        f"Date: {date}",
        f"ETag: {etag}",
        f"Last-Modified: {LAST_MODIFIED}",
        f"Content-Length: {SIZE}",
        "Content-Type: application/json",
    ]


def render(lines: list[str], eol: str = "\r\n") -> bytes:
    return (eol.join(lines) + eol + eol).encode("latin-1")


def answer(req: Request, server: HostileServer) -> bytes:
    return render(head_lines(req, server))


def normal(peer: Peer, req: Request) -> None:
    peer.send(answer(req, peer.server))


def _replace(lines: list[str], name: str, *new: str) -> list[str]:
    out = [line for line in lines if not line.lower().startswith(name.lower() + ":")]
    return out[:1] + list(new) + out[1:]


def _etag_value(suffix: str) -> Behaviour:
    def behave(peer: Peer, r: Request) -> None:
        lines = _replace(head_lines(r, peer.server), "ETag", f"ETag: {etag_of(r.key)}{suffix}")
        peer.send(render(lines))

    return behave


def _empty_etag(peer: Peer, req: Request) -> None:
    # rclone answers a HEAD that races a DELETE this way: 200 with `ETag: ""`.
    peer.send(render(_replace(head_lines(req, peer.server), "ETag", 'ETag: ""')))


def _extra_same_packet(peer: Peer, req: Request) -> None:
    peer.send(answer(req, peer.server) * 2)


def _extra_late(peer: Peer, req: Request) -> None:
    peer.later(0.02, answer(req, peer.server))  # counted as pending before the answer goes
    peer.send(answer(req, peer.server))


def _extra_before_next(peer: Peer, req: Request) -> None:
    # The classic desync: the next request on this connection is first answered with this one's answer.
    peer.send(answer(req, peer.server))
    peer.owed = answer(req, peer.server)


def _idle_408(peer: Peer, req: Request) -> None:
    peer.later(0.02, b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", close=True)
    peer.send(answer(req, peer.server))


def _timeout_408_as_reused(peer: Peer, req: Request) -> None:
    # The idle-timeout race: the 408 went out just as the request came in on a kept connection.
    if peer.served > 1:
        peer.send(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        peer.close()
    else:
        normal(peer, req)


def _late_zero_chunk(peer: Peer, req: Request) -> None:
    lines = _replace(head_lines(req, peer.server), "Content-Length", "Transfer-Encoding: chunked")
    peer.later(0.02, b"0\r\n\r\n")
    peer.send(render(lines))


def _late_body(peer: Peer, req: Request) -> None:
    peer.later(0.02, b'{"a": 1}')
    peer.send(answer(req, peer.server))


def _lf_only(peer: Peer, req: Request) -> None:
    peer.send(render(head_lines(req, peer.server), eol="\n"))


def _interim(status: str) -> Behaviour:
    def behave(peer: Peer, req: Request) -> None:
        peer.send(f"HTTP/1.1 {status}\r\nLink: </hint>; rel=preload\r\n\r\n".encode() + answer(req, peer.server))

    return behave


def _trickle(peer: Peer, req: Request) -> None:
    data = answer(req, peer.server)
    # One byte per 100 ms for 3 s, then the rest: a peer that keeps a per-recv timeout alive.
    for i in range(30):
        if peer.closed:
            return
        try:
            peer.sock.sendall(data[i : i + 1])
        except OSError:
            return
        time.sleep(0.1)
    peer.send(data[30:])


def _without(name: str) -> Behaviour:
    def behave(peer: Peer, req: Request) -> None:
        peer.send(render(_replace(head_lines(req, peer.server), name)))

    return behave


def _chunked(peer: Peer, req: Request) -> None:
    peer.send(render(_replace(head_lines(req, peer.server), "Content-Length", "Transfer-Encoding: chunked")))


def _http10(peer: Peer, req: Request) -> None:
    peer.send(render(head_lines(req, peer.server, "HTTP/1.0")))
    peer.close()


def _connection_close(peer: Peer, req: Request) -> None:
    peer.send(render([*head_lines(req, peer.server), "Connection: close"]))
    peer.close()


def _close_mid_head(peer: Peer, req: Request) -> None:
    data = answer(req, peer.server)
    peer.send(data[: len(data) // 2])
    peer.close()


def _banner(peer: Peer, req: Request) -> None:
    peer.send(b"SSH-2.0-OpenSSH_9.6\r\n")


def _big_head(total: int, line: int) -> Behaviour:
    def behave(peer: Peer, req: Request) -> None:
        lines = head_lines(req, peer.server)
        pad = "x" * line
        lines += [f"x-amz-meta-pad{i}: {pad}" for i in range(total // line)]
        peer.send(render(lines))

    return behave


def _duplicate_etag(same: bool) -> Behaviour:
    def behave(peer: Peer, req: Request) -> None:
        other = etag_of(req.key) if same else '"etag-other"'
        lines = head_lines(req, peer.server)
        lines.insert(3, f"ETag: {other}")
        peer.send(render(lines))

    return behave


def _unquoted_etag_twice(same: bool) -> Behaviour:
    # A clone that sends bare ETags, the header repeated (botocore joins the copies with ", ").
    def behave(peer: Peer, req: Request) -> None:
        bare = etag_of(req.key).strip('"')
        lines = _replace(head_lines(req, peer.server), "ETag", f"ETag: {bare}", f"ETag: {bare if same else 'other'}")
        peer.send(render(lines))

    return behave


def _empty_etag_on_404(peer: Peer, req: Request) -> None:
    # A 404 carrying an empty ETag: it describes no object, and must not make the deletion an error.
    peer.send(render([*head_lines(req, peer.server), 'ETag: ""']))


def _always_304(peer: Peer, req: Request) -> None:
    # A broken cache or clone: 304 with another ETag, whatever the request asked (none at all too).
    lines = ["HTTP/1.1 304 Not Modified", f"Date: {formatdate(usegmt=True)}", 'ETag: "etag-other"']
    peer.send(render([*lines, f"Last-Modified: {LAST_MODIFIED}"]))


def _far_future_date(peer: Peer, req: Request) -> None:
    # Past datetime's range once converted to UTC (year 10000): the parser must not raise out of the poll.
    date = "Fri, 31 Dec 9999 23:59:59 -0100"
    peer.send(render(_replace(head_lines(req, peer.server), "Last-Modified", f"Last-Modified: {date}")))


def _stray_before(peer: Peer, req: Request) -> None:
    peer.send(b"garbage!" + answer(req, peer.server))


BEHAVIOURS: dict[str, Behaviour] = {
    "normal": normal,
    "extra_same_packet": _extra_same_packet,
    "extra_late": _extra_late,
    "extra_before_next": _extra_before_next,
    "idle_408": _idle_408,
    "408_as_the_request_goes": _timeout_408_as_reused,
    "late_zero_chunk": _late_zero_chunk,
    "late_body": _late_body,
    "bare_lf_in_header": _etag_value("\nX-Injected: yes"),
    "lf_only_head": _lf_only,
    "bare_cr_in_header": _etag_value("\rX-Injected: yes"),
    "ctl_in_header": _etag_value("\x01"),
    "nul_in_header": _etag_value("\x00"),
    "interim_100": _interim("100 Continue"),
    "interim_103": _interim("103 Early Hints"),
    "trickle": _trickle,
    "no_content_length": _without("Content-Length"),
    "chunked": _chunked,
    "http10": _http10,
    "connection_close": _connection_close,
    "close_mid_head": _close_mid_head,
    "banner": _banner,
    "head_100k": _big_head(100_000, 2000),
    "head_10m": _big_head(10_000_000, 60_000),
    "duplicate_etag_same": _duplicate_etag(True),
    "duplicate_etag_differ": _duplicate_etag(False),
    "stray_before": _stray_before,
    "empty_etag": _empty_etag,
    "no_etag": _without("ETag"),
    "always_304": _always_304,
    "far_future_date": _far_future_date,
    "unquoted_etag_twice_same": _unquoted_etag_twice(True),
    "unquoted_etag_twice_differ": _unquoted_etag_twice(False),
    "empty_etag_on_404": _empty_etag_on_404,
}


@dataclass
class HostileServer:
    """Listens on 127.0.0.1; ``behaviours[key]`` answers HEADs of that key (default: a sane answer)."""

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: int = 0  # unasked sends still to come
    tls: ssl.SSLContext | None = None  # serve HTTPS with this server-side context

    def __post_init__(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._peers: list[Peer] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def settled(self) -> bool:
        """True once every unasked send has gone out."""
        with self.lock:
            return self.pending == 0

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        for peer in list(self._peers):
            peer.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                peer = Peer(self, sock, len(self._peers) + 1)
                self._peers.append(peer)
            threading.Thread(target=self._serve, args=(peer,), daemon=True).start()

    def _serve(self, peer: Peer) -> None:
        if self.tls is not None:
            try:
                peer.sock = self.tls.wrap_socket(peer.sock, server_side=True)
            except OSError:
                peer.close()
                return
        buf = b""
        while not peer.closed:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                try:
                    chunk = peer.sock.recv(65536)
                except OSError:
                    return
                if not chunk:
                    peer.close()
                    return
                buf += chunk
                continue
            head, buf = buf[:end].decode("latin-1"), buf[end + 4 :]
            lines = head.split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            bucket, _, key = unquote(path.partition("?")[0]).lstrip("/").partition("/")
            req = Request(peer.number, path, bucket, key, headers)
            with self.lock:
                self.requests.append(req)
            peer.served += 1
            if peer.owed:
                owed, peer.owed = peer.owed, b""
                peer.send(owed)
                time.sleep(0.005)  # the peer's own pacing: the real answer follows in a later packet
            self.behaviours.get(key, normal)(peer, req)


@pytest.fixture(name="hostile")
def hostile_fixture() -> Iterator[HostileServer]:
    """A HostileServer for one test (import ``hostile_fixture`` to use the ``hostile`` fixture)."""
    server = HostileServer()
    yield server
    server.close()
