"""HTTP conformance: both request paths against a hostile raw-socket peer (tests/hostile.py).

For every case and both ``[s3] http_client`` settings: the outcome is the right one or an
``error`` whose message names the real cause; no answer is recorded under another key; no
stored ETag that cannot be sent back; no poll longer than read_timeout x max_attempts (plus
the backoff). The same cases run end to end through ``poller once``, several watches back to
back on one connection.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import ConfigFile, run_cli, wait_for
from hostile import BEHAVIOURS, HostileServer, etag_of, hostile_fixture  # noqa: F401 (the fixture)
from prometheus_client import generate_latest

from poller.config import S3Settings
from poller.metrics import Metrics
from poller.model import ObjectState, PollResult, Watch
from poller.probe import prober_for

READ_TIMEOUT = 0.5
MAX_ATTEMPTS = 2
# Per-attempt deadline x attempts, plus botocore's largest standard-mode backoff for one retry
# (50 ms x 2) and room for a loaded machine.
BOUND = READ_TIMEOUT * MAX_ATTEMPTS + 0.1 + 0.6
BUCKET = "bkt"
SENDABLE = re.compile(r"[\x20-\x7e\x80-\xff\t]*")


@dataclass(frozen=True)
class Case:
    lean: str  # "ok", or a regex the lean error message must match
    # "ok" or "error" (botocore's words are its own); "wrong: ..." a known boto3 flaw (xfail), "either: ..."
    # a known boto3 flaw whose outcome depends on the peer's timing or cut
    boto3: str
    spoils_next: bool = False  # a desync no client can see in time: the next poll may read this answer


CASES: dict[str, Case] = {
    "normal": Case("ok", "ok"),
    "normal_304": Case("ok", "ok"),
    "normal_404": Case("ok", "ok"),
    "extra_same_packet": Case("ok", "ok"),
    "extra_late": Case("ok", "ok"),
    "extra_before_next": Case(
        "ok",
        "either: http.client's buffer swallows the real answers, the desync runs on unseen while polls follow fast",
        spoils_next=True,
    ),
    "idle_408": Case("ok", "ok"),
    "408_as_the_request_goes": Case("ok", "error"),
    "late_zero_chunk": Case("ok", "ok"),
    "late_body": Case("ok", "ok"),
    "bare_lf_in_header": Case("bare LF ends the etag header", "ok"),
    "lf_only_head": Case("bare LF ends the status line", "ok"),
    "bare_cr_in_header": Case("bare CR in the etag header", "ok"),
    "ctl_in_header": Case(r"control character 0x01 in the etag header", "error"),
    "nul_in_header": Case(r"control character 0x00 in the etag header", "error"),
    "interim_100": Case("ok", "ok"),
    "interim_103": Case("ok", "error"),
    "trickle": Case("read timeout", "wrong: the read timeout is per recv, a trickle holds the poll 3 s"),
    "no_content_length": Case("ok", "ok"),
    "chunked": Case("ok", "ok"),
    "http10": Case("ok", "ok"),
    "connection_close": Case("ok", "ok"),
    "close_mid_head": Case(
        "closed the connection in the middle of the response head",
        "either: http.client takes a head cut short by a close as complete (headers after the cut lost)",
    ),
    "empty_etag": Case("an empty ETag", "error"),
    "no_etag": Case("200 without an ETag", "error"),
    # Polled from a known state: a 304 with a new ETag, then 304 again to the HEAD without conditions.
    "always_304": Case("304 Not Modified to a HEAD without conditions", "error"),
    "far_future_date": Case("ok", "ok"),
    # Both clients read the same answer alike: a switch of client must not invent a change.
    "unquoted_etag_twice_same": Case("ok", "ok"),
    "unquoted_etag_twice_differ": Case("conflicting etag headers", "conflicting ETag headers"),
    "empty_etag_on_404": Case("ok", "ok"),
    "banner": Case(r"not an HTTP response: 'SSH-2\.0-OpenSSH_9\.6'", "error"),
    "head_100k": Case("ok", "ok"),
    "head_10m": Case("response head larger than 256 KiB", "error"),
    "duplicate_etag_same": Case("ok", "ok"),
    "duplicate_etag_differ": Case("conflicting etag headers", "error"),
    "stray_before": Case("not an HTTP response: 'garbage!HTTP/1.1 200 OK'", "error"),
}
assert set(CASES) - {"normal_304", "normal_404"} == set(BEHAVIOURS)
MISSING_CASES = ("normal_404", "empty_etag_on_404")  # the key does not exist: right is `missing`


def settings(endpoint: str, http_client: str) -> S3Settings:
    return S3Settings(
        endpoint_url=endpoint,
        addressing_style="path",
        connect_timeout=READ_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        max_attempts=MAX_ATTEMPTS,
        http_client=http_client,  # type: ignore[arg-type]
    )


def arrange(server: HostileServer, case: str, key: str = "h") -> ObjectState | None:
    """Give ``key`` the case's behaviour; return the stored state its poll starts from."""
    if case in MISSING_CASES:
        server.missing.add(key)
    server.behaviours[key] = BEHAVIOURS.get(case, BEHAVIOURS["normal"])
    if case in ("normal_304", "always_304"):
        lm = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
        return ObjectState(etag_of(key), lm, lm + timedelta(hours=1), None, 42, True)
    return None


def is_right(case: str, result: PollResult, key: str) -> bool:
    """The answer for ``key``, classified as its case says."""
    if case in MISSING_CASES:
        return result.outcome == "missing"
    if case == "normal_304":
        return (result.outcome, result.http_status) == ("unchanged", 304) and result.state.etag == etag_of(key)
    return (result.outcome, result.http_status) == ("modified", 200) and result.state.etag == etag_of(key)


@dataclass
class Run:
    hostile: PollResult
    hostile_seconds: float
    others: dict[str, PollResult]  # the polls around it, by key
    connections_after: list[int]  # the connection each request after the hostile one came on
    warned_before: dict[str, bool]  # lean: keep-alive to the peer was already off when this poll began


def _keepalive_off(endpoint: str) -> bool:
    from poller import lean

    return bool(getattr(lean, "keepalive_disabled", lambda _: False)(endpoint))


def run_case(server: HostileServer, case: str, http_client: str) -> Run:
    """Poll k0 (opens the connection), then h (the case), then k1..k3 on what the client kept."""
    state = arrange(server, case)
    prober = prober_for(settings(server.endpoint, http_client), 1)
    others = {"k0": prober.probe(Watch(1, "k0", BUCKET, "k0"), None)}
    started = time.monotonic()
    answered = prober.probe(Watch(2, "h", BUCKET, "h"), state)
    seconds = time.monotonic() - started
    wait_for(server.settled, timeout=5, what="the peer's unasked sends")
    mark = len(server.requests)
    warned = {}
    for i, key in enumerate(("k1", "k2", "k3")):
        warned[key] = _keepalive_off(server.endpoint)
        others[key] = prober.probe(Watch(3 + i, key, BUCKET, key), None)
    return Run(answered, seconds, others, [r.conn for r in server.requests[mark:] if r.key], warned)


def check_run(case: str, http_client: str, run: Run) -> None:
    expect = CASES[case]
    wanted = expect.lean if http_client == "lean" else expect.boto3
    result = run.hostile
    for polled in (result, *run.others.values()):
        if polled.state is not None and polled.state.etag is not None:
            assert SENDABLE.fullmatch(polled.state.etag), f"unsendable ETag stored: {polled.state.etag!r}"
        if polled.error:
            assert SENDABLE.fullmatch(polled.error), f"control characters in an error: {polled.error!r}"
    assert run.hostile_seconds < BOUND, f"the poll took {run.hostile_seconds:.2f}s (bound {BOUND}s)"
    if wanted.startswith("either"):
        pass  # a known boto3 weakness whose outcome depends on where the peer cut
    elif wanted == "ok":
        assert is_right(case, result, "h"), (result.outcome, result.http_status, result.state, result.error)
    elif wanted == "error":
        assert result.outcome == "error", (result.outcome, result.state)
    else:
        assert result.outcome == "error", (result.outcome, result.state, result.error)
        assert re.search(wanted, result.error or "", re.IGNORECASE), result.error
    # No answer under another key. For a desync no client can see coming (the peer answers the next
    # request with an old answer first), a poll may read the previous answer: on the lean path a change
    # read on a kept connection is asked again on a new one, so none is recorded; on boto3 the desync
    # runs on unseen (http.client's buffer swallows the real answer) until a pause lets a stray answer
    # reach the socket first.
    for key, polled in run.others.items():
        if polled.outcome == "modified" and polled.state.etag == etag_of(key):
            continue
        assert expect.spoils_next and http_client == "boto3", (key, polled.error, polled.state)


def _params() -> Iterator[Any]:
    for case, expect in CASES.items():
        for client in ("lean", "boto3"):
            wanted = expect.lean if client == "lean" else expect.boto3
            marks = [pytest.mark.xfail(strict=True, reason=wanted)] if wanted.startswith("wrong") else []
            yield pytest.param(case, client, marks=marks, id=f"{case}-{client}")


@pytest.mark.parametrize(("case", "http_client"), list(_params()))
def test_case_through_the_prober(hostile: HostileServer, case: str, http_client: str) -> None:
    check_run(case, http_client, run_case(hostile, case, http_client))


STRAY_CASES = ("extra_same_packet", "extra_late", "extra_before_next", "idle_408", "late_zero_chunk", "late_body")


@pytest.mark.parametrize("case", STRAY_CASES)
def test_after_a_stray_byte_every_request_takes_a_fresh_connection(hostile: HostileServer, case: str) -> None:
    from poller import lean

    run_case(hostile, case, "lean")
    assert lean.keepalive_disabled(hostile.endpoint)
    assert lean.keepalive_disabled_count() >= 1
    exported = generate_latest(Metrics().registry).decode()
    assert re.search(r"^poller_keepalive_disabled_total [1-9]", exported, re.MULTILINE), exported
    prober = prober_for(settings(hostile.endpoint, "lean"), 1)
    used = {r.conn for r in hostile.requests}
    for i in range(3):
        assert prober.probe(Watch(10 + i, f"k{i}", BUCKET, f"k{i}"), None).state.etag == etag_of(f"k{i}")
        assert hostile.requests[-1].conn not in used, "a connection was reused after a stray byte"
        used.add(hostile.requests[-1].conn)


@pytest.mark.parametrize("http_client", ["lean", "boto3"])
@pytest.mark.parametrize("poison", ['"etag-k0"\nX-Injected: yes', '"etag-k0"\x01', '"etag-k0\u20ac"'])
def test_a_poisoned_stored_etag_is_recovered_by_an_unconditional_head(
    hostile: HostileServer, http_client: str, poison: str
) -> None:
    prober = prober_for(settings(hostile.endpoint, http_client), 1)
    lm = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    stored = ObjectState(poison, lm, lm + timedelta(hours=1), None, 42, True)
    result = prober.probe(Watch(1, "k0", BUCKET, "k0"), stored)
    assert "if-none-match" not in hostile.requests[-1].headers
    assert result.outcome == "modified" and result.state.etag == etag_of("k0"), result.error
    again = prober.probe(Watch(1, "k0", BUCKET, "k0"), result.state)
    assert (again.outcome, again.http_status) == ("unchanged", 304)


# --- end to end: `poller once`, watches back to back on one connection -------------------


def once(server: HostileServer, tmp_path: Path, http_client: str, keys: list[str]) -> tuple[Any, dict[str, Any]]:
    """Run `poller once` over one watch per key, in order, on one worker (one connection, back to back)."""
    config = ConfigFile(tmp_path / "poller.toml", server.endpoint)
    config.sections["s3"].update(
        read_timeout=f"{int(READ_TIMEOUT * 1000)}ms", connect_timeout="500ms", http_client=http_client
    )
    config.sections["s3"]["max_attempts"] = MAX_ATTEMPTS
    config.sections["schedule"]["concurrency"] = 1
    config.write([{"name": key, "bucket": BUCKET, "key": key} for key in keys])
    done = run_cli("once", "--config", str(config.path), timeout=120)
    assert done.returncode in (0, 1), done.stderr
    if http_client == "lean":  # (urllib3 itself logs a traceback with its warning on a malformed head)
        assert "Traceback" not in done.stderr, done.stderr
    with sqlite3.connect(config.db) as conn:
        rows = conn.execute(
            "SELECT w.name, p.outcome, p.etag, p.error, p.polled_at FROM polls p JOIN watches w ON w.id = p.watch_id"
            " ORDER BY p.id"
        ).fetchall()
    polls: dict[str, Any] = {}
    for name, outcome, etag, error, polled_at in rows:
        assert name not in polls, f"{name} polled twice"
        assert etag is None or SENDABLE.fullmatch(etag), f"unsendable ETag stored for {name}: {etag!r}"
        assert error is None or SENDABLE.fullmatch(error), f"control characters in an error: {error!r}"
        polls[name] = (outcome, etag, error, datetime.fromisoformat(polled_at))
    assert sorted(polls) == sorted(keys), polls
    return done, polls


def check_once(case: str, wanted: str, polled: tuple[Any, ...], key: str) -> None:
    outcome, etag, error, _ = polled
    if wanted.startswith("either"):
        return
    if wanted == "ok" or wanted.startswith("wrong"):
        expected = ("missing", None) if case in MISSING_CASES else ("modified", etag_of(key))
        assert (outcome, etag) == expected, (case, outcome, etag, error)
    else:
        assert outcome == "error", (case, outcome, etag)
        assert wanted == "error" or re.search(wanted, error or "", re.IGNORECASE), (case, error)


def _wanted(case: str, http_client: str) -> str:
    return CASES[case].lean if http_client == "lean" else CASES[case].boto3


@pytest.mark.parametrize("http_client", ["lean", "boto3"])
def test_every_parsing_case_end_to_end(hostile: HostileServer, tmp_path: Path, http_client: str) -> None:
    """All the non-desync cases in one run: each hostile key followed by a sane one, one connection."""
    cases = [case for case in CASES if case not in STRAY_CASES and case != "normal_304"]
    keys: list[str] = []
    for case in cases:
        arrange(hostile, case, f"h-{case}")
        keys += [f"h-{case}", f"n-{case}"]
    _, polls = once(hostile, tmp_path, http_client, keys)
    for case in cases:
        check_once(case, _wanted(case, http_client), polls[f"h-{case}"], f"h-{case}")
        assert polls[f"n-{case}"][:2] == ("modified", etag_of(f"n-{case}")), (case, polls[f"n-{case}"])


@pytest.mark.parametrize("http_client", ["lean", "boto3"])
@pytest.mark.parametrize("case", STRAY_CASES)
def test_stray_bytes_end_to_end(hostile: HostileServer, tmp_path: Path, case: str, http_client: str) -> None:
    """The next request follows within a millisecond: no answer lands on another key once a stray is seen."""
    keys = ["k0", "k1", "h", "k2", "k3", "k4"]
    arrange(hostile, case)
    done, polls = once(hostile, tmp_path, http_client, keys)
    check_once(case, _wanted(case, http_client), polls["h"], "h")
    wrong = [key for key in keys if key != "h" and polls[key][:2] != ("modified", etag_of(key))]
    warnings = [line for line in done.stderr.splitlines() if "keep-alive to it is off" in line]
    if http_client == "lean":
        assert len(warnings) <= 1 and all(hostile.endpoint in line for line in warnings), warnings
    if not CASES[case].spoils_next or http_client == "lean":
        # The peer may answer k2 with h's answer first, which no client can tell in time; the lean
        # path asks a change read on a kept connection again on a new one, so none lands on k2.
        assert not wrong, polls


@pytest.mark.parametrize(
    ("head", "fault"),
    [
        (b'HTTP/1.1 200 OK\r\nETag: "a"\r\n folded', "not a header line: ' folded'"),
        (b'HTTP/1.1 200 OK\r\nETag : "a"', "not a header line: 'ETag : \"a\"'"),
        (b"HTTP/1.1 200 OK\r\nno colon here", "not a header line"),
        (b'HTTP/2 200\r\nETag: "a"', "not an HTTP response: 'HTTP/2 200'"),
        (b'HTTP/1.1 200 OK\r\nETag: "a\x7f"', "control character 0x7f in the etag header"),
        (b'HTTP/1.1 200 O\x00K\r\nETag: "a"', "control character 0x00 in the status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2", "conflicting content-length headers"),
    ],
)
def test_strict_head_parsing(head: bytes, fault: str) -> None:
    from poller.lean import _parse_head
    from poller.model import ProtocolError

    with pytest.raises(ProtocolError, match=re.escape(fault)):
        _parse_head(head, "http://peer")


def test_what_a_head_may_say() -> None:
    from poller.lean import _parse_head

    assert _parse_head(b"HTTP/1.1 304", "e") == (304, "", {}, True)
    status, _, headers, keep = _parse_head(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nX-A: 1\r\nx-a: 2", "e")
    assert (status, headers, keep) == (200, {"connection": "Keep-Alive", "x-a": "1, 2"}, True)
    assert _parse_head(b"HTTP/1.1 200 OK\r\nConnection: foo, close", "e")[3] is False
    assert _parse_head(b'HTTP/1.1 200 OK\r\nETag: "a"\r\nETag: "a"', "e")[2] == {"etag": '"a"'}
    # Two Dates (a proxy's beside the server's): neither is kept; the poll goes on without one.
    two_dates = b"HTTP/1.1 200 OK\r\nDate: Fri, 27 Nov 2026 09:00:00 GMT\r\nDate: Fri, 27 Nov 2026 09:00:07 GMT"
    assert _parse_head(two_dates, "e")[2] == {}


@pytest.mark.parametrize("case", ["normal", "extra_late"])
def test_over_tls_keepalive_is_kept_until_a_stray_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """TLS records that carry no data (TLS 1.3 session tickets) are not stray bytes; data is."""
    import ssl

    from test_lean import _self_signed

    from poller import lean

    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server = HostileServer(tls=tls)
    try:
        run = run_case(server, case, "lean")
        check_run(case, "lean", run)
        conns = [r.conn for r in server.requests if r.key]
        if case == "normal":
            assert not lean.keepalive_disabled(server.endpoint)
            # k0, h, k1..k3 on one TLS connection; each first sighting read on it (all but k0's) is
            # asked again on a new connection of its own, and the kept one stays.
            keys = [r.key for r in server.requests if r.key and r.conn == 1]
            assert keys == ["k0", "h", "k1", "k2", "k3"], conns
            confirmations = [c for c in conns if c != 1]
            assert len(confirmations) == 4 and len(set(confirmations)) == 4, conns
        else:
            assert lean.keepalive_disabled(server.endpoint)
            assert len(set(conns[-3:])) == 3, conns
    finally:
        server.close()


def test_only_sendable_etags_are_read_or_sent_back() -> None:
    from poller.model import ProtocolError, answer_from_headers, sendable
    from poller.probe import request_conditions

    assert sendable('"9b2c-3"') and sendable('W/"x"') and sendable("unquoted") and sendable('"caf\u00e9"')
    for bad in ('"a"\r\nX: 1', '"a"\n', '"a"\x00', '"a"\x7f', '"a\u20ac"', '"a"\u2028'):
        assert not sendable(bad), bad
        with pytest.raises(ProtocolError, match="control characters"):
            answer_from_headers(200, {"etag": bad})
    # An HTTP client joins repeated headers with ", ": the same tag twice is that tag, two tags an error.
    assert answer_from_headers(200, {"etag": '"a", "a"'}).etag == '"a"'
    with pytest.raises(ProtocolError, match="conflicting"):
        answer_from_headers(200, {"etag": '"a", "b"'})
    # On a 404 the ETag describes no object: one empty or malformed must not make a deletion an error.
    from poller.probe import classify

    gone = answer_from_headers(404, {"etag": '""'})
    assert gone.etag is None
    lm = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
    stored = ObjectState('"a"', lm, lm + timedelta(hours=1), None, 1, True)
    assert classify(stored, gone).event == "deleted"
    poisoned = ObjectState('"a"\nX-Injected: yes', lm, lm + timedelta(hours=1), None, 1, True)
    assert request_conditions(poisoned, "both") == {}
    assert request_conditions(replace(poisoned, etag='"a"'), "both").get("IfNoneMatch") == '"a"'


def _target(server: HostileServer, bucket: str = BUCKET) -> Any:
    from poller.targets import Target

    port = int(server.endpoint.rsplit(":", 1)[1])
    return Target("http", "127.0.0.1", port, f"127.0.0.1:{port}", f"/{bucket}/", "us-east-1")


def _send(head: Any, target: Any, key: str) -> int:
    """One HEAD through the lean client's connection handling (signing aside): its status."""
    status: int = head._send(target, f"{target.prefix}{key}", {"host": target.host_header})[0]
    return status


def test_path_style_buckets_of_one_endpoint_share_a_workers_connection(hostile: HostileServer) -> None:
    """Kept connections go by host, not by bucket: each bucket had its own, per worker thread, and
    a few path-style buckets at full concurrency ran the process out of file descriptors."""
    head = prober_for(settings(hostile.endpoint, "lean"), 1).lean
    for bucket in ["b1", "b2", "b3", "b1"]:
        assert _send(head, _target(hostile, bucket), "k0") == 200
    assert [(r.bucket, r.conn) for r in hostile.requests] == [("b1", 1), ("b2", 1), ("b3", 1), ("b1", 1)]


def test_a_worker_keeps_at_most_max_kept_connections() -> None:
    """One per endpoint host (virtual-hosted buckets are hosts of their own), the least recent closed."""
    from poller import lean

    servers = [HostileServer() for _ in range(lean.MAX_KEPT + 1)]
    try:
        head = prober_for(settings(servers[0].endpoint, "lean"), 1).lean
        for server in servers:
            assert _send(head, _target(server), "k0") == 200
        kept = head._local.connections  # type: ignore[union-attr]
        assert [port for _, _, port in kept] == [_target(s).port for s in servers[1:]]
    finally:
        for server in servers:
            server.close()


def test_keepalive_comes_back_after_a_while(hostile: HostileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray byte turns keep-alive off for KEEPALIVE_OFF_SECONDS, not for the life of the process:
    one proxy's 408 would otherwise cost a connection (and a TLS handshake) per request for good."""
    from poller import lean

    run_case(hostile, "late_body", "lean")
    assert lean.keepalive_disabled(hostile.endpoint)
    head = prober_for(settings(hostile.endpoint, "lean"), 1).lean
    target = _target(hostile)
    assert target.endpoint == hostile.endpoint
    mark = len(hostile.requests)
    for _ in range(2):
        assert _send(head, target, "k1") == 200
    assert len({r.conn for r in hostile.requests[mark:]}) == 2, "off: a new connection per request"
    later = time.monotonic() + lean.KEEPALIVE_OFF_SECONDS + 1
    monkeypatch.setattr(lean, "_clock", lambda: later)
    assert not lean.keepalive_disabled(hostile.endpoint)
    mark = len(hostile.requests)
    for _ in range(3):
        assert _send(head, target, "k1") == 200
    assert len({r.conn for r in hostile.requests[mark:]}) == 1, "back on: the new connection is kept"


def test_repeated_headers_read_alike_by_both_clients() -> None:
    """botocore joins a repeated header with ", "; the lean client compares the copies. The same
    answer must read the same on both paths (switching paths must not invent a change)."""
    from poller.model import ProtocolError, answer_from_headers

    d1, d2 = "Fri, 27 Nov 2026 10:00:00 GMT", "Fri, 27 Nov 2026 10:00:01 GMT"
    assert answer_from_headers(200, {"etag": "abc, abc"}).etag == '"abc"'  # lean: '"abc"', not '"abc, abc"'
    with pytest.raises(ProtocolError, match="conflicting ETag"):
        answer_from_headers(200, {"etag": "abc, def"})
    # Two different Dates (a proxy's beside the server's): neither is trusted for the same-second guard.
    assert answer_from_headers(200, {"etag": '"a"', "date": f"{d1}, {d2}"}).server_date is None
    assert answer_from_headers(200, {"etag": '"a"', "date": f"{d1}, {d1}"}).server_date == datetime(
        2026, 11, 27, 10, 0, tzinfo=UTC
    )
    with pytest.raises(ProtocolError, match="conflicting Last-Modified"):
        answer_from_headers(200, {"etag": '"a"', "last-modified": f"{d1}, {d2}"})
    assert answer_from_headers(404, {"last-modified": f"{d1}, {d2}"}).status == 404  # a deletion stays one
