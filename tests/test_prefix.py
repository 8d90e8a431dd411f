"""Prefix watches: ListObjectsV2 passes over real HTTP, each change detected once, request counts measured."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import ConfigFile, make_client, run_cli
from faultproxy import FaultProxy

from poller.listing import diff_listing, filters_after, matches
from poller.model import Filters, ObjectState, PrefixState, Watch

T = datetime(2026, 11, 24, tzinfo=UTC)


def obj(etag: str, size: int = 1) -> ObjectState:
    return ObjectState(etag=etag, last_modified=T, size=size, present=True)


def test_diff_listing_events():
    stored = PrefixState(
        True, {"same": obj('"a"'), "changed": obj('"b"'), "gone": obj('"c"'), "back": ObjectState(present=False)}
    )
    listed = {"same": obj('"a"'), "changed": obj('"B"'), "back": obj('"d"'), "new": obj('"e"')}
    events = {c.key: c.event for c in diff_listing(stored, listed)}
    assert events == {"changed": "modified", "back": "created", "new": "created", "gone": "deleted"}
    first = {c.key: c.event for c in diff_listing(PrefixState(), {"x": obj('"x"')})}
    assert first == {"x": "first_seen"}


def test_a_key_the_filters_now_leave_out_is_not_deleted():
    """A reload narrowed include/exclude: the key still exists, it is only no longer watched."""
    stored = PrefixState(True, {"p/a.csv": obj('"a"'), "p/b.json": obj('"b"')})
    listed = {"p/a.csv": obj('"a"')}  # listed under the new filter
    assert diff_listing(stored, listed, include=("*.csv",)) == []
    assert diff_listing(stored, listed, exclude=("*.json",)) == []
    assert [(c.key, c.event) for c in diff_listing(stored, listed)] == [("p/b.json", "deleted")]


def test_a_key_the_filters_now_let_in_is_first_seen_not_created():
    """A reload widened include/exclude: a key no earlier pass's filters let in may be years old."""
    csv: Filters = (("*.csv",), ())
    stored = PrefixState(True, {"p/a.csv": obj('"a"'), "p/gone.json": ObjectState(present=False)}, (csv,))
    listed = {"p/a.csv": obj('"a"'), "p/new.csv": obj('"n"'), "p/old.json": obj('"o"'), "p/gone.json": obj('"g"')}
    widened = {c.key: c.event for c in diff_listing(stored, listed, include=("*.csv", "*.json"))}
    # A key whose deletion was recorded is back: created, whatever the filters were meanwhile.
    assert widened == {"p/new.csv": "created", "p/old.json": "first_seen", "p/gone.json": "created"}
    # An exclude lifted: the same.
    stored = PrefixState(True, stored.objects, (((), ("*.json",)),))
    assert {c.key: c.event for c in diff_listing(stored, listed)} == widened
    # Narrowed, then widened back: a key the first filters let in has no row, so it was made since.
    stored = PrefixState(True, stored.objects, ((("*.json", "*.csv"), ()), csv))
    assert {c.key: c.event for c in diff_listing(stored, listed)}["p/old.json"] == "created"
    # Filters not known (passes of an earlier release): every new key is created, as it was.
    legacy = PrefixState(True, stored.objects)
    assert {c.key: c.event for c in diff_listing(legacy, listed)}["p/old.json"] == "created"


def test_a_pass_adds_its_filters_to_those_stored():
    w = Watch(1, "p", "b", "p/", prefix=True, include=("*.csv",))
    assert filters_after(PrefixState(), w) == ((("*.csv",), ()),)
    both = ((("*.json",), ()), (("*.csv",), ()))
    assert filters_after(PrefixState(True, {}, both[:1]), w) == both
    assert filters_after(PrefixState(True, {}, both), w) == both, "a pair already stored is not added again"


def test_widening_the_filters_reports_the_keys_let_in_as_first_seen(config: ConfigFile, s3, bucket):
    """Over the wire and across processes: the filters of the last pass are stored with it."""
    for key in ("p/a.csv", "p/b.json"):
        s3.put_object(Bucket=bucket, Key=key, Body=b"v1")
    config.write([{"name": "p", "bucket": bucket, "prefix": "p/", "include": ["*.csv"]}])
    args = ("once", "--config", str(config.path))
    assert run_cli(*args).returncode == 0
    assert events(config.db) == [("p/a.csv", "first_seen")]
    s3.put_object(Bucket=bucket, Key="p/c.csv", Body=b"v1")  # made while the watch had the old filters
    s3.put_object(Bucket=bucket, Key="p/d.json", Body=b"v1")
    config.write([{"name": "p", "bucket": bucket, "prefix": "p/", "include": ["*.csv", "*.json"]}])
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert sorted(events(config.db)[1:]) == [
        ("p/b.json", "first_seen"),
        ("p/c.csv", "created"),
        ("p/d.json", "first_seen"),
    ]
    s3.put_object(Bucket=bucket, Key="p/e.json", Body=b"v1")
    assert run_cli(*args).returncode == 0
    assert events(config.db)[4:] == [("p/e.json", "created")], "the widened filters are stored now"
    # Narrowed, then widened back: a key the wide filters would have listed was made in between.
    config.write([{"name": "p", "bucket": bucket, "prefix": "p/", "include": ["*.csv"]}])
    assert run_cli(*args).returncode == 0
    s3.put_object(Bucket=bucket, Key="p/f.json", Body=b"v1")
    assert run_cli(*args).returncode == 0
    config.write([{"name": "p", "bucket": bucket, "prefix": "p/", "include": ["*.csv", "*.json"]}])
    assert run_cli(*args).returncode == 0
    assert events(config.db)[5:] == [("p/f.json", "created")]


def test_same_etag_new_time_is_a_silent_refresh():
    stored = PrefixState(True, {"k": obj('"a"')})
    later = ObjectState(etag='"a"', last_modified=T.replace(hour=1), size=1, present=True)
    (change,) = diff_listing(stored, {"k": later})
    assert change.event is None and change.state.last_modified == later.last_modified


def test_include_exclude():
    assert matches("drops/a.csv", ("*.csv",), ())
    assert not matches("drops/a.json", ("*.csv",), ())
    assert not matches("drops/tmp/a.csv", ("*.csv",), ("*/tmp/*",))
    assert matches("anything", (), ())


def events(db: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(db)
    try:
        return [(k, e) for k, e in conn.execute("SELECT key, event FROM etag_history ORDER BY id")]
    finally:
        conn.close()


def put_many(s3: Any, bucket: str, keys: list[str], body: bytes) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=bucket, Key=k, Body=body), keys))


class SeedableS3:
    """A moto server in a thread of this process: the poller still lists it over HTTP, but a test can
    seed thousands of keys through moto's own backend (5,000 in 0.4 s; as PUTs, moto takes ~45 s)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._werkzeug_level = logging.getLogger("werkzeug").level
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access-log line per request
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.port = port
        self.endpoint = f"http://{host}:{port}"
        self.client = make_client(self.endpoint)

    def put_many(self, bucket: str, keys: list[str], body: bytes) -> None:
        """The same objects a PUT makes (ETag, size, Last-Modified), without 5,000 HTTP requests."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key in keys:
            backend.put_object(bucket, key, body)

    def close(self) -> None:
        urllib.request.urlopen(urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")).close()
        self.server.stop()
        logging.getLogger("werkzeug").setLevel(self._werkzeug_level)


@pytest.fixture
def seedable() -> Iterator[SeedableS3]:
    s = SeedableS3()
    yield s
    s.close()


@pytest.fixture
def proxy(seedable: SeedableS3) -> Iterator[FaultProxy]:
    p = FaultProxy(seedable.port)
    yield p
    p.close()


@pytest.mark.slow
def test_five_thousand_keys_each_change_once(tmp_path: Path, seedable: SeedableS3, proxy: FaultProxy):
    s3, bucket = seedable.client, "t-five-thousand"
    s3.create_bucket(Bucket=bucket)
    config = ConfigFile(tmp_path / "poller.toml", seedable.endpoint)
    keys = [f"drops/2026/{i:05d}.csv" for i in range(5000)]
    seedable.put_many(bucket, keys, b"v1")
    assert s3.head_object(Bucket=bucket, Key=keys[0])["ETag"] == f'"{hashlib.md5(b"v1").hexdigest()}"'
    s3.put_object(Bucket=bucket, Key="drops/2026/tmp/skip.csv", Body=b"x")
    s3.put_object(Bucket=bucket, Key="other/outside.csv", Body=b"x")
    config.write(
        [{"name": "drops", "bucket": bucket, "prefix": "drops/2026/", "exclude": ["*/tmp/*"]}],
        s3={"endpoint_url": proxy.endpoint},
    )
    args = ("once", "--config", str(config.path))

    first = run_cli(*args)
    assert first.returncode == 0, first.stderr
    # 5,001 keys under the prefix (one excluded client-side): 6 pages of up to 1,000.
    assert "5000 keys, 6 list pages" in first.stdout and "5000 first seen" in first.stdout
    assert proxy.count(bucket) == 6, "5,000 keys cost 6 list requests (5,000 HEADs as key watches)"
    assert len(events(config.db)) == 5000 and {e for _, e in events(config.db)} == {"first_seen"}

    overwritten, deleted, added = keys[:10], keys[10:15], [f"drops/2026/new-{i}.csv" for i in range(7)]
    put_many(s3, bucket, overwritten, b"v2")
    for key in deleted:
        s3.delete_object(Bucket=bucket, Key=key)
    put_many(s3, bucket, added, b"v1")
    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    new_events = events(config.db)[5000:]
    assert sorted(new_events) == sorted(
        [(k, "modified") for k in overwritten] + [(k, "deleted") for k in deleted] + [(k, "created") for k in added]
    )

    third = run_cli(*args)
    assert "unchanged (list: 5002 keys" in third.stdout
    assert len(events(config.db)) == 5000 + 22, "nothing is reported twice"
    conn = sqlite3.connect(config.db)
    polls = conn.execute("SELECT sum(count), min(key), max(key) FROM polls").fetchone()
    assert polls == (3, "drops/2026/", "drops/2026/"), "one polls row per list pass, not per key"
    gone = conn.execute("SELECT present, last_outcome FROM object_state WHERE key = ?", (deleted[0],)).fetchone()
    assert gone == (0, "missing")
    history = run_cli("history", "drops", "--changes", "--limit", "3", "--format", "json", "--config", str(config.path))
    assert history.returncode == 0 and '"watch": "drops"' in history.stdout


def test_prefix_watch_in_the_daemon_with_max_keys_and_missing_bucket(config: ConfigFile, s3, bucket, start_daemon):
    from conftest import wait_for
    from daemonproc import query

    put_many(s3, bucket, [f"p/{i}" for i in range(30)], b"v1")
    config.write(
        [
            {"name": "p", "bucket": bucket, "prefix": "p/"},
            {"name": "small", "bucket": bucket, "prefix": "p/", "max_keys": 10},
            {"name": "nob", "bucket": "no-such-bucket-prefix", "prefix": "x/"},
        ]
    )
    daemon = start_daemon(config)
    daemon.notify.wait("READY=1")

    def outcome(name: str) -> list[tuple[Any, ...]]:
        try:
            return query(
                config.db,
                "SELECT p.outcome, p.error FROM poll_samples_view p JOIN watches w ON w.id = p.watch_id "
                "WHERE w.name = ? ORDER BY p.id",
                name,
            )
        except sqlite3.OperationalError:
            return []

    wait_for(lambda: len(outcome("p")) >= 2 and outcome("small") and outcome("nob"), what="list passes")
    assert [o for o, _ in outcome("p")][:2] == ["modified", "unchanged"]
    assert outcome("small")[0][0] == "error" and "max_keys = 10" in outcome("small")[0][1]
    assert outcome("nob")[0][0] == "error" and "bucket not found" in outcome("nob")[0][1]
    s3.put_object(Bucket=bucket, Key="p/3", Body=b"v2")
    wait_for(lambda: ("p/3", "modified") in events(config.db), what="overwrite in the prefix detected")
    assert "p s3://" in daemon.log and "p/3 modified etag" in daemon.log
    status = run_cli("status", "--config", str(config.path), "--format", "json")
    assert '"name": "small"' in status.stdout and '"consecutive_errors": ' in status.stdout
    assert daemon.stop() == 0


def test_key_and_prefix_are_exclusive(tmp_path: Path):
    path = tmp_path / "c.toml"
    path.write_text('[[watch]]\nname = "x"\nbucket = "b"\nkey = "k"\nprefix = "p/"\n')
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "watch #1" in proc.stderr and "either key or prefix" in proc.stderr
    path.write_text('[[watch]]\nname = "x"\nbucket = "b"\nkey = "k"\ninclude = ["*"]\n')
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "prefix watches only" in proc.stderr
