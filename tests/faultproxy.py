"""A small asyncio HTTP proxy in front of the S3 server that tests switch between faults.

Modes: ``pass`` (forward), ``refuse`` (nothing listens: connection refused), ``hang`` (accept,
read the request, never answer), ``latency`` (forward after a delay), ``error`` (answer
``503 SlowDown`` or ``500 InternalError`` to a fraction of requests), ``reset`` (forward, then reset
the connection mid-response). Faults can be limited to requests whose path starts with a prefix
(``/bucket``, path-style addressing), so one bucket can fail while another stays healthy. The proxy
counts the requests it sees, per path prefix, to measure retries.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
from collections import Counter, deque
from dataclasses import dataclass


@dataclass
class Fault:
    mode: str = "pass"
    prefix: str = ""  # apply only to request paths starting with this ("" = every request)
    fraction: float = 1.0  # for "error": share of requests that fail
    status: int = 503  # for "error"
    delay: float = 0.0  # for "latency"


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.fault = Fault()
        self.requests: Counter[str] = Counter()  # by first path segment
        self.failed: Counter[str] = Counter()
        # The headers of the latest requests, names lower-cased: what really went over the wire.
        self.heads: deque[dict[str, str]] = deque(maxlen=1000)
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._call(self._listen())

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def set(self, mode: str = "pass", **kw: object) -> None:
        """Switch the fault; ``refuse`` closes the listening socket so connections are refused."""
        self.fault = Fault(mode, **kw)  # type: ignore[arg-type]
        if mode == "refuse" and not self.fault.prefix:
            self._call(self._unlisten())
        else:
            self._call(self._listen())

    def count(self, bucket: str) -> int:
        with self._lock:
            return self.requests[bucket]

    def close(self) -> None:
        self._call(self._unlisten())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # --- per connection ----------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                body = await self._read_body(reader, head)
                method, path = self._request_line(head)
                bucket = path.lstrip("/").split("/", 1)[0].split("?", 1)[0]
                with self._lock:
                    self.requests[bucket] += 1
                    self.heads.append(self._headers(head))
                fault = self.fault
                applies = path.startswith(fault.prefix)
                if applies and fault.mode == "hang":
                    await reader.read()  # until the client gives up
                    return
                if applies and fault.mode == "refuse":
                    self._reset(writer)
                    return
                if applies and fault.mode == "error" and random.random() < fault.fraction:
                    with self._lock:
                        self.failed[bucket] += 1
                    writer.write(self._error_response(fault.status, method))
                    await writer.drain()
                    continue
                if applies and fault.mode == "latency":
                    await asyncio.sleep(fault.delay)
                response = await self._forward(head + body, method)
                if applies and fault.mode == "reset":
                    writer.write(response[: max(1, len(response) // 2)])
                    await writer.drain()
                    self._reset(writer)
                    return
                writer.write(response)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()

    @staticmethod
    def _request_line(head: bytes) -> tuple[str, str]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        return (parts[0], parts[1] if len(parts) > 1 else "/")

    @staticmethod
    def _headers(head: bytes) -> dict[str, str]:
        fields = {}
        for line in head.decode("latin-1").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        return fields

    @staticmethod
    def _content_length(head: bytes) -> int:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value.strip() or 0)
        return 0

    async def _read_body(self, reader: asyncio.StreamReader, head: bytes) -> bytes:
        length = self._content_length(head)
        return await reader.readexactly(length) if length else b""

    async def _forward(self, request: bytes, method: str) -> bytes:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            up_writer.write(request)
            await up_writer.drain()
            head = await up_reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
            body = b"" if no_body else await up_reader.readexactly(self._content_length(head))
            return head + body
        finally:
            up_writer.close()

    @staticmethod
    def _error_response(status: int, method: str) -> bytes:
        code, reason = ("SlowDown", "Slow Down") if status == 503 else ("InternalError", "Internal Server Error")
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        return head if method == "HEAD" else head + body

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # SO_LINGER 0: close with RST, like a crashed peer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
