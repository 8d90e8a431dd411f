"""The probe over real HTTP against the moto server: every classification row, headers on the wire."""

from __future__ import annotations

import http.server
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from conftest import free_port, serving
from faultproxy import FaultProxy

from poller.config import S3Settings
from poller.model import ObjectState, Watch
from poller.probe import prober_for


def settings(endpoint: str, **kw: Any) -> S3Settings:
    return S3Settings(endpoint_url=endpoint, addressing_style="path", connect_timeout=2, read_timeout=3, **kw)


class Wire:
    """A prober, plus the request headers that reached the server (recorded by a proxy on the way)."""

    def __init__(self, endpoint: str, http_client: str, mode: str = "both", observe: bool = True, **kw: Any) -> None:
        self.proxy = FaultProxy(int(endpoint.rsplit(":", 1)[1])) if observe else None
        url = self.proxy.endpoint if self.proxy else endpoint
        self.prober = prober_for(settings(url, conditional=mode, http_client=http_client, **kw), concurrency=4)
        self.seen = 0

    @property
    def sent(self) -> list[dict[str, str]]:
        assert self.proxy is not None
        return list(self.proxy.heads)[self.seen :]

    def poll(self, watch: Watch, state: ObjectState | None):
        if state is not None and state.present:  # as probe() does; its HEADs are not the poll's requests
            self.prober.calibrate(watch)
        self.seen = len(self.proxy.heads) if self.proxy else 0
        return self.prober.probe(watch, state)

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture(params=["lean", "boto3"])
def make_wire(request: pytest.FixtureRequest) -> Iterator[Callable[..., Wire]]:
    """Every test here runs on both request paths: the lean HEAD and plain boto3."""
    made: list[Wire] = []

    def make(endpoint: str, **kw: Any) -> Wire:
        made.append(Wire(endpoint, request.param, **kw))
        return made[-1]

    yield make
    for wire in made:
        wire.close()


@pytest.fixture
def wire(s3_endpoint: str, make_wire: Callable[..., Wire]) -> Wire:
    return make_wire(s3_endpoint)


def test_first_seen_then_304_unchanged(wire, s3, bucket):
    s3.put_object(Bucket=bucket, Key="a.json", Body=b"one")
    watch = Watch(1, "a", bucket, "a.json")
    first = wire.poll(watch, None)
    assert (first.outcome, first.event, first.http_status) == ("modified", "first_seen", 200)
    assert "if-none-match" not in wire.sent[0] and "if-modified-since" not in wire.sent[0]
    assert first.state.etag == s3.head_object(Bucket=bucket, Key="a.json")["ETag"]
    assert first.state.size == 3

    again = wire.poll(watch, first.state)
    assert (again.outcome, again.event, again.http_status) == ("unchanged", None, 304)
    assert wire.sent[0]["if-none-match"] == first.state.etag  # quotes included, exactly as served
    assert again.state.etag == first.state.etag


def test_both_headers_sent_once_the_timestamp_is_safe(wire, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"one")
    watch = Watch(1, "k", bucket, "k")
    state = wire.poll(watch, None).state
    # Pretend the version was confirmed long after it was written: the guard no longer applies.
    safe = ObjectState(state.etag, state.last_modified, state.last_modified + timedelta(seconds=5), None, 3, True)
    result = wire.poll(watch, safe)
    assert result.outcome == "unchanged"
    assert wire.sent[0]["if-none-match"] == state.etag
    assert wire.sent[0]["if-modified-since"].endswith("GMT")


def test_modified_in_a_later_second(wire, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"one")
    watch = Watch(1, "k", bucket, "k")
    state = wire.poll(watch, None).state
    lm = state.last_modified
    # A later second is needed for this row; wait on the server's clock, not a fixed sleep.
    while s3.put_object(Bucket=bucket, Key="k", Body=b"two") and (
        s3.head_object(Bucket=bucket, Key="k")["LastModified"] <= lm
    ):
        time.sleep(0.1)
    result = wire.poll(watch, state)
    assert (result.outcome, result.event, result.http_status) == ("modified", "modified", 200)
    assert result.previous.etag == state.etag and result.state.etag != state.etag


def _same_second_pair(s3: Any, bucket: str, key: str) -> None:
    """PUT twice with different bodies inside one server second (retrying across a second boundary)."""
    for _ in range(20):
        s3.put_object(Bucket=bucket, Key=key, Body=b"first")
        first = s3.head_object(Bucket=bucket, Key=key)["LastModified"]
        s3.put_object(Bucket=bucket, Key=key, Body=b"second body")
        if s3.head_object(Bucket=bucket, Key=key)["LastModified"] == first:
            return
    raise AssertionError("could not fit two PUTs into one second")


def test_same_second_overwrite_is_modified_via_guard(wire, s3, bucket):
    watch = Watch(1, "k", bucket, "k")
    for _ in range(20):
        s3.put_object(Bucket=bucket, Key="k", Body=b"first")
        seen = wire.poll(watch, None)
        s3.put_object(Bucket=bucket, Key="k", Body=b"second body")
        if s3.head_object(Bucket=bucket, Key="k")["LastModified"] == seen.state.last_modified:
            break
    else:
        raise AssertionError("could not fit two PUTs into one second")
    result = wire.poll(watch, seen.state)
    # The guard saw Date within 2 s of Last-Modified and sent If-None-Match alone.
    assert "if-modified-since" not in wire.sent[0]
    assert (result.outcome, result.event) == ("modified", "modified")
    assert result.state.etag != seen.state.etag


def test_same_second_overwrite_is_modified_via_cross_check(wire, s3, bucket):
    """moto lets If-Modified-Since win over a changed If-None-Match and answers 304 with the new ETag."""
    watch = Watch(1, "k", bucket, "k")
    _same_second_pair(s3, bucket, "k")
    head = s3.head_object(Bucket=bucket, Key="k")
    # A stored state from the first PUT of that second, wrongly believed safe (Date long after).
    stale = ObjectState(
        '"0123456789abcdef0123456789abcdef"',
        head["LastModified"],
        head["LastModified"] + timedelta(seconds=10),
        None,
        5,
        True,
    )
    result = wire.poll(watch, stale)
    assert (result.outcome, result.event) == ("modified", "modified")
    assert result.note == "304 with a new ETag"
    assert result.state.etag == head["ETag"]
    # Two requests on the wire: the conditional one (both headers), then the unconditional one.
    assert len(wire.sent) == 2
    assert "if-none-match" in wire.sent[0] and "if-modified-since" in wire.sent[0]
    assert "if-none-match" not in wire.sent[1] and "if-modified-since" not in wire.sent[1]


def test_timestamp_mode_with_risky_state_sends_unconditional_and_compares_etag(s3_endpoint, make_wire, s3, bucket):
    wire = make_wire(s3_endpoint, mode="timestamp")
    s3.put_object(Bucket=bucket, Key="k", Body=b"one")
    watch = Watch(1, "k", bucket, "k")
    seen = wire.poll(watch, None)
    result = wire.poll(watch, seen.state)
    # Server answered 200 (no condition sent): same ETag -> unchanged (the "condition ignored" row).
    assert (result.outcome, result.http_status) == ("unchanged", 200)
    assert "if-none-match" not in wire.sent[0] and "if-modified-since" not in wire.sent[0]


def test_delete_and_recreate(wire, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"one")
    watch = Watch(1, "k", bucket, "k")
    seen = wire.poll(watch, None).state
    s3.delete_object(Bucket=bucket, Key="k")
    gone = wire.poll(watch, seen)
    assert (gone.outcome, gone.event, gone.http_status) == ("missing", "deleted", 404)
    still = wire.poll(watch, gone.state)
    assert (still.outcome, still.event) == ("missing", None)
    s3.put_object(Bucket=bucket, Key="k", Body=b"two")
    back = wire.poll(watch, still.state)
    assert (back.outcome, back.event) == ("modified", "created")


def test_never_seen_missing_key(wire, bucket):
    result = wire.poll(Watch(1, "k", bucket, "nothing-here"), None)
    assert (result.outcome, result.event) == ("missing", None)


def test_missing_bucket_is_an_error(wire):
    state = ObjectState('"x"', None, None, None, 1, True)
    result = wire.poll(Watch(1, "k", "no-such-bucket-poller", "k"), state)
    assert result.outcome == "error" and "bucket not found" in result.error
    assert result.state is None  # stored state untouched


@pytest.mark.parametrize(
    "key",
    [
        "with space/and more.txt",
        "unicodé/日本語/ü.json",
        "plus+sign",
        "per%cent%20x",
        "q?uery&amp=1#frag",
        "~tilde/!*'();:@=$,[]",
        "a//double/slash",
    ],
)
def test_key_classes_round_trip(wire, s3, bucket, key):
    s3.put_object(Bucket=bucket, Key=key, Body=b"one")
    watch = Watch(1, "k", bucket, key)
    seen = wire.poll(watch, None)
    assert (seen.outcome, seen.event) == ("modified", "first_seen"), seen.error
    assert wire.poll(watch, seen.state).outcome == "unchanged"
    s3.put_object(Bucket=bucket, Key=key, Body=b"a different body")
    changed = wire.poll(watch, seen.state)
    assert (changed.outcome, changed.event) == ("modified", "modified")


def test_unreachable_endpoint_is_an_error(make_wire):
    port = free_port()  # nothing listens here
    wire = make_wire(f"http://127.0.0.1:{port}", max_attempts=1, observe=False)
    result = wire.poll(Watch(1, "k", "bucket", "k"), None)
    assert result.outcome == "error" and "cannot connect" in result.error


class _Fixed(http.server.BaseHTTPRequestHandler):
    """A real HTTP server that answers every request with one fixed status (403, 503 SlowDown, ...)."""

    status = 403
    code = "AccessDenied"
    hits = 0

    def do_HEAD(self) -> None:
        type(self).hits += 1
        self.send_response(self.status)
        self.send_header("x-amz-error-code", self.code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fixed_server() -> Iterator[tuple[str, type[_Fixed]]]:
    handler = type("Handler", (_Fixed,), {"hits": 0})
    with serving(handler) as port:
        yield f"http://127.0.0.1:{port}", handler


def test_403_is_an_error_that_explains_listbucket(fixed_server, make_wire):
    endpoint, _ = fixed_server
    wire = make_wire(endpoint, observe=False)
    state = ObjectState('"x"', None, None, None, 1, True)
    result = wire.poll(Watch(1, "k", "bucket", "k"), state)
    assert result.outcome == "error" and result.http_status == 403
    assert "s3:ListBucket" in result.error
    assert result.state is None


def test_throttling_is_retried_then_an_error(fixed_server, make_wire):
    endpoint, handler = fixed_server
    handler.status, handler.code = 503, "SlowDown"
    wire = make_wire(endpoint, max_attempts=3, observe=False)
    result = wire.poll(Watch(1, "k", "bucket", "k"), None)
    assert result.outcome == "error" and result.http_status == 503
    assert "throttled" in result.error
    assert handler.hits == 3  # botocore standard retries, bounded by max_attempts


def test_versioned_bucket_records_version_ids(wire, s3, bucket):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    watch = Watch(1, "k", bucket, "k")
    v1 = s3.put_object(Bucket=bucket, Key="k", Body=b"one")["VersionId"]
    first = wire.poll(watch, None)
    assert (first.event, first.state.version_id) == ("first_seen", v1)
    v2 = s3.put_object(Bucket=bucket, Key="k", Body=b"two")["VersionId"]
    second = wire.poll(watch, first.state)
    assert (second.event, second.state.version_id) == ("modified", v2)
    marker = s3.delete_object(Bucket=bucket, Key="k")["VersionId"]
    gone = wire.poll(watch, second.state)
    assert (gone.event, gone.state.version_id) == ("deleted", marker)
