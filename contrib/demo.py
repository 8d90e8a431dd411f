"""A self-contained demo: a local S3 server (moto), a bucket, the daemon, and changes it detects.

Run from a checkout after `pip install -e '.[test]'`:  python contrib/demo.py
Everything lives in ./demo-run/ and on 127.0.0.1; nothing touches AWS.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config

HERE = Path.cwd() / "demo-run"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def poller(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "poller", *args, "--config", str(HERE / "poller.toml")],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def main() -> None:
    shutil.rmtree(HERE, ignore_errors=True)
    HERE.mkdir()
    os.environ.update(AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo-secret", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    print(f"== starting a local S3 server (moto) on {endpoint}")
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon = None
    try:

        def moto_up() -> bool:
            try:
                urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
                return True
            except OSError:
                return False

        wait_for("the S3 server", moto_up)
        s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))
        s3.create_bucket(Bucket="demo-bucket")
        s3.put_object(Bucket="demo-bucket", Key="config/app.json", Body=b'{"version": 1}')
        s3.put_object(Bucket="demo-bucket", Key="reports/daily report.csv", Body=b"a,b\n1,2\n")
        (HERE / "poller.toml").write_text(f"""
[s3]
endpoint_url = "{endpoint}"
addressing_style = "path"

[database]
url = "sqlite:///{HERE / "poller.db"}"

[schedule]
interval = "1s"

[[watch]]
name = "app-config"
bucket = "demo-bucket"
key = "config/app.json"

[[watch]]
name = "daily-report"
bucket = "demo-bucket"
key = "reports/daily report.csv"

[[watch]]
name = "not-yet"
bucket = "demo-bucket"
key = "incoming/later.txt"
""")
        print("== starting `poller run` (interval 1s); its log follows")
        daemon = subprocess.Popen([sys.executable, "-m", "poller", "run", "--config", str(HERE / "poller.toml")])

        def changes() -> int:
            try:
                return poller("history", "--changes", "--format", "csv").count("\n") - 1
            except subprocess.CalledProcessError:
                return 0

        wait_for("the first polls", lambda: changes() >= 2)
        steps = [
            (
                "overwrite config/app.json",
                lambda: s3.put_object(Bucket="demo-bucket", Key="config/app.json", Body=b'{"version": 2}'),
            ),
            (
                "overwrite it again within the same second",
                lambda: (
                    s3.put_object(Bucket="demo-bucket", Key="config/app.json", Body=b'{"version": 3}'),
                    s3.put_object(Bucket="demo-bucket", Key="config/app.json", Body=b'{"version": 4}'),
                ),
            ),
            (
                "delete reports/daily report.csv",
                lambda: s3.delete_object(Bucket="demo-bucket", Key="reports/daily report.csv"),
            ),
            (
                "re-create it",
                lambda: s3.put_object(Bucket="demo-bucket", Key="reports/daily report.csv", Body=b"a,b\n3,4\n"),
            ),
            (
                "create incoming/later.txt",
                lambda: s3.put_object(Bucket="demo-bucket", Key="incoming/later.txt", Body=b"hello"),
            ),
        ]
        for label, action in steps:
            before = changes()
            print(f"== {label}", flush=True)
            action()
            wait_for(f"poller to see: {label}", lambda before=before: changes() > before)
        time.sleep(2)  # let a few more unchanged (304) polls land, for the history below
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        daemon = None
        print("\n== poller status")
        print(poller("status"))
        print("== poller history --changes   (every ETag change)")
        print(poller("history", "--changes"))
        print("== poller history app-config --limit 8   (runs of identical polls, newest first)")
        print(poller("history", "app-config", "--limit", "8"))
        print(f"The database is {HERE / 'poller.db'}; try: sqlite3 {HERE / 'poller.db'} 'SELECT * FROM etag_history'")
    finally:
        if daemon is not None:
            daemon.kill()
        moto.terminate()
        moto.wait(10)


if __name__ == "__main__":
    main()
