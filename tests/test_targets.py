"""Where the lean HEAD goes: exactly where boto3 sends it, signed the same; when it hands a bucket to boto3.

The parity matrix builds, for a fixed date, boto3's HeadObject (captured at ``before-send``, never sent)
and the lean request for the same bucket, key, conditions and watch options: host, path, signed headers
and the Authorization header must be equal byte for byte. The wire tests run against the moto server
through a recording proxy, on both request paths.
"""

from __future__ import annotations

import http.server
import itertools
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import boto3
import botocore.auth
import pytest
from botocore.auth import _host_from_url
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from conftest import ConfigFile, free_port, run_cli, serving
from faultproxy import FaultProxy

from poller.config import ConfigError, S3Settings, settings_from_mapping
from poller.lean import LeanHead, Signer, header_conditions
from poller.listing import poll_prefix
from poller.metrics import Metrics
from poller.model import PrefixState, Watch
from poller.probe import prober_for
from poller.s3client import make_client
from poller.targets import (
    EMPTY_SHA256,
    SENTINEL_KEY,
    Fallback,
    Target,
    fallback_counts,
    request_path,
    target_from_request,
)
from poller.watchlist import diff_watch_lists, specs_from_settings

ACCESS, SECRET, TOKEN = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "session-token/with+chars=="
FIXED = datetime(2026, 11, 25, 23, 59, 58, tzinfo=UTC)
AMZ_DATE = FIXED.strftime("%Y%m%dT%H%M%SZ")
OWNER = "123456789012"  # moto's account: it owns every bucket the tests create
UNSIGNED_BY_BOTOCORE = {"user-agent", "amz-sdk-invocation-id", "amz-sdk-request", "accept-encoding"}
KEYS = ["plain.json", "with space/ünïcode 日本.txt", "~tilde/!*'();:@=$,[]+&", "a//double/slash"]
REQUESTS: list[dict[str, Any]] = [
    {},
    {
        "IfNoneMatch": '"9b2cf535f27731c974343645a3985328-3"',
        "IfModifiedSince": datetime(2026, 11, 24, 10, 0, 3, tzinfo=UTC),
        "RequestPayer": "requester",
        "ExpectedBucketOwner": OWNER,
    },
]


class _Empty:
    def stream(self) -> Iterator[bytes]:
        return iter([b""])


@pytest.fixture(scope="module")
def session() -> boto3.session.Session:
    """One session for the matrix (fast), with explicit credentials; FIPS/dual-stack come from the environment."""
    return boto3.session.Session(aws_access_key_id=ACCESS, aws_secret_access_key=SECRET, aws_session_token=TOKEN)


@pytest.fixture
def fixed_date(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: FIXED)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def lean_for(settings: S3Settings, session: boto3.session.Session) -> tuple[LeanHead, Any]:
    """A LeanHead built as prober_for builds it, and its boto3 client."""
    client = make_client(settings, 1, session)
    resolver = make_client(settings, 1, session)
    return LeanHead(session, client, resolver, 1.0, 1.0, 1), client


def boto3_sends(client: Any, bucket: str, key: str, params: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """The URL and headers of boto3's HeadObject, captured at before-send (answered locally, never sent)."""
    captured: list[tuple[str, dict[str, str]]] = []

    def capture(request: Any, **_: Any) -> AWSResponse:
        headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()}
        captured.append((request.url, headers))
        return AWSResponse(request.url, 200, {}, _Empty())

    client.meta.events.register("before-send.s3", capture)
    try:
        client.head_object(Bucket=bucket, Key=key, **params)
    finally:
        client.meta.events.unregister("before-send.s3", capture)
    return captured[0]


REGIONS = ["us-east-1", "eu-west-1", "ap-southeast-2", "cn-north-1"]
STYLES = ["path", "virtual", "auto"]
ENDPOINTS = ["", "https://s3.example.test", "https://s3.example.test/base", "http://[::1]:9000"]
BUCKETS = ["my-bucket", "dotted.bucket.name"]
MATRIX = list(itertools.product(REGIONS, STYLES, [False, True], [False, True], ENDPOINTS, BUCKETS))


def _matrix_id(case: tuple[str, str, bool, bool, str, str]) -> str:
    region, style, fips, dualstack, endpoint, bucket = case
    flags = "".join(f for f, on in (("+fips", fips), ("+dualstack", dualstack)) if on)
    return f"{region}-{style}{flags}-{endpoint or 'aws'}-{bucket}"


@pytest.mark.parametrize("case", MATRIX, ids=[_matrix_id(c) for c in MATRIX])
def test_lean_request_is_byte_identical_to_boto3s(
    case: tuple[str, str, bool, bool, str, str],
    session: boto3.session.Session,
    fixed_date: None,
    no_proxy: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    region, style, fips, dualstack, endpoint, bucket = case
    # config.py has no FIPS/dual-stack keys: botocore reads these variables (and ~/.aws/config) itself.
    monkeypatch.setenv("AWS_USE_FIPS_ENDPOINT", str(fips).lower())
    monkeypatch.setenv("AWS_USE_DUALSTACK_ENDPOINT", str(dualstack).lower())
    settings = S3Settings(endpoint_url=endpoint, region=region, addressing_style=style)  # type: ignore[arg-type]
    lean, client = lean_for(settings, session)
    try:
        boto3_sends(client, bucket, SENTINEL_KEY, {})
    except Exception as refused:  # e.g. FIPS in the China partition: boto3 refuses, so does the lean path
        with pytest.raises(type(refused)):
            lean.target(bucket)
        return
    target = lean.target(bucket)
    if target is None:
        # Only boto3's own nonsense URL ("dotted.bucket.name.[::1]") is handed back to boto3.
        assert (style, endpoint, bucket) == ("virtual", "http://[::1]:9000", "dotted.bucket.name")
        return
    signer = Signer()
    for key, params in itertools.product(KEYS, REQUESTS):
        url, sent = boto3_sends(client, bucket, key, params)
        parts = urlsplit(url)
        path = request_path(target, key)
        assert (parts.scheme, parts.hostname, parts.port or target.port) == (target.scheme, target.host, target.port)
        assert target.host_header == _host_from_url(url)
        assert parts.path == path and not parts.query, (key, url)
        ours = signer.headers(target, path, header_conditions(params), ACCESS, SECRET, TOKEN, AMZ_DATE)
        assert sent["x-amz-date"] == AMZ_DATE
        assert ours["authorization"] == sent["authorization"], (key, params)
        assert {k: v for k, v in sent.items() if k not in UNSIGNED_BY_BOTOCORE} == {
            k: v for k, v in ours.items() if k != "host"
        }, (key, params)


def test_the_hosts_the_presigned_url_got_wrong(session, fixed_date, no_proxy, monkeypatch) -> None:
    """The regressions of issue 9: auto addressing outside us-east-1, and FIPS in us-west-2."""
    lean, _ = lean_for(S3Settings(region="eu-west-1"), session)
    target = lean.target("my-bucket")
    assert target is not None
    assert target.host_header == "my-bucket.s3.eu-west-1.amazonaws.com"  # the presigned URL said s3.amazonaws.com
    assert (target.prefix, target.region) == ("/", "eu-west-1")
    monkeypatch.setenv("AWS_USE_FIPS_ENDPOINT", "true")
    lean, _ = lean_for(S3Settings(region="us-west-2"), session)
    target = lean.target("my-bucket")
    assert target is not None
    assert (target.host_header, target.region) == ("my-bucket.s3-fips.us-west-2.amazonaws.com", "us-west-2")


def test_fips_and_dualstack_from_the_client_config_too(session, fixed_date, no_proxy) -> None:
    settings = S3Settings(region="ap-southeast-2", addressing_style="virtual")
    client = make_client(settings, 1, session, use_fips_endpoint=True, use_dualstack_endpoint=True)
    resolver = make_client(settings, 1, session, use_fips_endpoint=True, use_dualstack_endpoint=True)
    target = LeanHead(session, client, resolver, 1.0, 1.0, 1).target("my-bucket")
    url, sent = boto3_sends(client, "my-bucket", "k", {})
    assert target is not None and target.host_header == urlsplit(url).hostname
    assert target.host_header == "my-bucket.s3-fips.dualstack.ap-southeast-2.amazonaws.com"
    ours = Signer().headers(target, request_path(target, "k"), {}, ACCESS, SECRET, TOKEN, AMZ_DATE)
    assert ours["authorization"] == sent["authorization"]


class _Counting(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def do_HEAD(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("ETag", '"e"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_resolution_sends_nothing(session, no_proxy) -> None:
    handler = type("Handler", (_Counting,), {"seen": []})
    with serving(handler) as port:
        lean, _ = lean_for(S3Settings(endpoint_url=f"http://127.0.0.1:{port}", addressing_style="path"), session)
        for bucket in ("a-bucket", "b.bucket", "c--x-s3"):
            lean.target(bucket)
        assert handler.seen == []
        assert lean.head("a-bucket", "k", {}).status == 200
        assert handler.seen == ["/a-bucket/k"]
    # Nothing listens on this port: resolution still works, because it never connects.
    lean, _ = lean_for(S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}"), session)
    assert lean.target("bkt") is not None


def test_the_resolver_must_not_be_the_client(session) -> None:
    client = make_client(S3Settings(), 1, session)
    with pytest.raises(ValueError, match="resolver client of its own"):
        LeanHead(session, client, client, 1.0, 1.0, 1)


def test_a_resolution_error_is_a_poll_error_and_is_tried_again(tmp_path, monkeypatch, no_proxy) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    prober = prober_for(S3Settings(endpoint_url=f"http://127.0.0.1:{free_port()}", addressing_style="path"), 1)
    for _ in range(2):
        result = prober.probe(Watch(1, "w", "bkt", "k"), None)
        assert result.outcome == "error" and "no AWS credentials found" in (result.error or "")
    assert prober.lean is not None and prober.lean._targets == {}  # nothing cached: credentials may appear


@pytest.mark.parametrize(
    ("bucket", "reason"),
    [
        ("arn:aws:s3:us-east-1:123456789012:accesspoint/ap", "arn"),
        ("arn:aws:s3-object-lambda:us-east-1:123456789012:accesspoint/olap", "arn"),
        ("arn:aws:s3-outposts:us-east-1:123456789012:outpost/op-01234567890123456/accesspoint/ap", "outposts"),
        ("my-ap-abcdefghijklmnopqrstuvwxyz0123--op-s3", "outposts"),
        ("my-dir--use1-az4--x-s3", "s3_express"),
    ],
)
def test_buckets_boto3_serves_are_logged_once_and_counted(session, no_proxy, caplog, bucket, reason) -> None:
    caplog.set_level(logging.WARNING, logger="poller")
    before = fallback_counts().get(reason, 0)
    lean, _ = lean_for(S3Settings(region="us-east-1"), session)
    assert lean.target(bucket) is None
    assert lean.target(bucket) is None
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith(f"s3://{bucket}: lean HEAD path not used (")
    assert "boto3 sends this bucket's HEADs" in lines[0]
    assert fallback_counts()[reason] == before + 1


def test_a_proxy_hands_the_bucket_to_boto3_with_a_hint(session, caplog, monkeypatch) -> None:
    caplog.set_level(logging.WARNING, logger="poller")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.test:3128")
    monkeypatch.setenv("NO_PROXY", "")
    lean, _ = lean_for(S3Settings(region="eu-west-1"), session)
    assert lean.target("my-bucket") is None
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "an HTTPS_PROXY applies to my-bucket.s3.eu-west-1.amazonaws.com" in line and "NO_PROXY" in line


class _Redirect(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    agents: list[str] = []

    def do_HEAD(self) -> None:
        self.agents.append(self.headers.get("User-Agent", ""))
        self.send_response(301)
        self.send_header("x-amz-bucket-region", "eu-west-1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_region_redirect_is_logged_once_and_counted_in_the_metric(session, no_proxy, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="poller")
    metrics = Metrics()
    sample = "poller_lean_fallbacks_total"
    before = metrics.registry.get_sample_value(sample, {"reason": "region_redirect"}) or 0
    handler = type("Handler", (_Redirect,), {"agents": []})
    with serving(handler) as port:
        lean, _ = lean_for(S3Settings(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1), session)
        for key in ("a", "b", "c"):
            with pytest.raises(ClientError):
                lean.head("bkt", key, {})
    assert handler.agents[0].startswith("poller/")
    assert all(agent.startswith("Boto3/") for agent in handler.agents[1:])  # boto3 from then on
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "s3://bkt: lean HEAD path not used (region redirect to eu-west-1): boto3 sends this bucket's HEADs "
        '(about 9x the CPU); set [s3] region = "eu-west-1" if your buckets live there'
    ]
    assert metrics.registry.get_sample_value(sample, {"reason": "region_redirect"}) == before + 1


def _auth(signed: str = "host;x-amz-content-sha256;x-amz-date", scope: str = "eu-west-1/s3") -> str:
    return f"AWS4-HMAC-SHA256 Credential=AKID/20261125/{scope}/aws4_request, SignedHeaders={signed}, Signature=ab12"


@pytest.mark.parametrize(
    ("url", "headers", "expected"),
    [
        (
            "https://s3.example.test/base/b/poller-sentinel",
            {"Authorization": _auth(), "X-Amz-Content-SHA256": EMPTY_SHA256},
            Target("https", "s3.example.test", 443, "s3.example.test", "/base/b/", "eu-west-1"),
        ),
        (
            "http://[::1]:9000/b/poller-sentinel",
            {"Authorization": _auth().encode(), "x-amz-content-sha256": EMPTY_SHA256.encode()},
            Target("http", "::1", 9000, "[::1]:9000", "/b/", "eu-west-1"),
        ),
        (
            "https://b.s3.amazonaws.com:443/poller-sentinel",
            {"authorization": _auth(), "x-amz-content-sha256": EMPTY_SHA256},
            Target("https", "b.s3.amazonaws.com", 443, "b.s3.amazonaws.com", "/", "eu-west-1"),
        ),
        ("https://b.s3.amazonaws.com/poller-sentinel", {"authorization": "AWS AKID:sig"}, "signing"),
        (
            "https://b.s3.amazonaws.com/poller-sentinel",
            {"authorization": _auth().replace("AWS4-HMAC-SHA256", "AWS4-ECDSA-P256-SHA256")},
            "signing",
        ),
        (
            "https://b.s3.amazonaws.com/poller-sentinel",
            {"authorization": _auth(scope="us-east-1/s3express"), "x-amz-content-sha256": EMPTY_SHA256},
            "s3_express",
        ),
        (
            "https://b.s3.amazonaws.com/poller-sentinel",
            {
                "authorization": _auth(signed="host;x-amz-checksum-mode;x-amz-date"),
                "x-amz-content-sha256": EMPTY_SHA256,
            },
            "signing",
        ),
        (
            "https://b.s3.amazonaws.com/poller-sentinel",
            {"authorization": _auth(), "x-amz-content-sha256": "UNSIGNED-PAYLOAD"},
            "signing",
        ),
        (
            "http://dotted.b.[::1]:9000/poller-sentinel",
            {"authorization": _auth(), "x-amz-content-sha256": EMPTY_SHA256},
            "unsupported",
        ),
        (
            "https://b.s3.amazonaws.com/poller-sentinel?versionId=1",
            {"authorization": _auth(), "x-amz-content-sha256": EMPTY_SHA256},
            "unsupported",
        ),
    ],
)
def test_target_from_request(url: str, headers: dict[str, Any], expected: Target | str) -> None:
    found = target_from_request(url, headers)
    if isinstance(expected, Target):
        assert found == expected
    else:
        assert isinstance(found, Fallback) and found.reason == expected


def test_a_fallback_line_escapes_what_it_quotes() -> None:
    line = Fallback("region_redirect", "region redirect to eu\r\nERROR forged", "set x").message("b\nx")
    assert "\n" not in line and "\r" not in line and "eu\\r\\nERROR forged" in line


# --- the watch options ----------------------------------------------------------------------


def _settings(**watch: Any) -> Any:
    return settings_from_mapping({"watch": [{"name": "w", "bucket": "my-bucket", "key": "k", **watch}]}, "c.toml")


def test_watch_options_reach_the_watch_and_a_change_reaches_the_running_watch() -> None:
    plain = specs_from_settings(_settings())
    paid = specs_from_settings(_settings(request_payer="requester", expected_bucket_owner=OWNER))
    watch = paid["w"].as_watch(7)
    assert (watch.request_payer, watch.expected_bucket_owner) == ("requester", OWNER)
    assert watch.request_params == {"RequestPayer": "requester", "ExpectedBucketOwner": OWNER}
    assert plain["w"].as_watch(7).request_params == {}
    assert diff_watch_lists(plain, paid).retargeted == ["w"]


@pytest.mark.parametrize(
    ("watch", "words"),
    [
        ({"expected_bucket_owner": "12345678901"}, "must be a 12-digit AWS account id"),
        ({"expected_bucket_owner": "12345678901x"}, "must be a 12-digit AWS account id"),
        ({"expected_bucket_owner": 123456789012}, "in quotes"),
        ({"request_payer": "bucket-owner"}, "Input should be 'requester'"),
    ],
)
def test_watch_options_are_validated_at_load(watch: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as refused:
        _settings(**watch)
    field = next(iter(watch))
    assert f"c.toml: watch #1 ('w'): field '{field}'" in str(refused.value) and words in str(refused.value)


@pytest.fixture(params=["lean", "boto3"])
def recorded(request: pytest.FixtureRequest, s3_endpoint: str) -> Iterator[Callable[..., Any]]:
    """A prober on the given request path whose requests pass a recording proxy to moto."""
    proxy = FaultProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    settings = S3Settings(endpoint_url=proxy.endpoint, addressing_style="path", http_client=request.param)

    def make() -> tuple[Any, FaultProxy]:
        return prober_for(settings, 2), proxy

    yield make
    proxy.close()


def test_watch_options_go_over_the_wire_signed_on_both_paths(recorded, s3, bucket) -> None:
    prober, proxy = recorded()
    s3.put_object(Bucket=bucket, Key="paid/a.json", Body=b"one")
    watch = Watch(1, "w", bucket, "paid/a.json", request_payer="requester", expected_bucket_owner=OWNER)
    first = prober.probe(watch, None)
    again = prober.probe(watch, first.state)
    assert (first.outcome, first.event) == ("modified", "first_seen")
    assert (again.outcome, again.http_status) == ("unchanged", 304)
    heads = [h for h in proxy.heads if "authorization" in h]
    assert len(heads) >= 2
    for sent in heads:
        assert sent["x-amz-request-payer"] == "requester"
        assert sent["x-amz-expected-bucket-owner"] == OWNER
        signed = sent["authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")
        assert "x-amz-request-payer" in signed and "x-amz-expected-bucket-owner" in signed
    # A watch without options sends neither header.
    proxy.heads.clear()
    prober.probe(Watch(2, "v", bucket, "paid/a.json"), None)
    assert proxy.heads
    assert not any("x-amz-request-payer" in h or "x-amz-expected-bucket-owner" in h for h in proxy.heads)


def test_a_prefix_watch_lists_with_the_options(recorded, s3, bucket) -> None:
    prober, proxy = recorded()
    s3.put_object(Bucket=bucket, Key="logs/1.txt", Body=b"one")
    watch = Watch(1, "p", bucket, "logs/", prefix=True, request_payer="requester", expected_bucket_owner=OWNER)
    result = poll_prefix(prober, watch, PrefixState())
    assert result.outcome == "modified" and [c.key for c in result.changes] == ["logs/1.txt"]
    (listing,) = list(proxy.heads)
    assert listing["x-amz-request-payer"] == "requester" and listing["x-amz-expected-bucket-owner"] == OWNER


@pytest.mark.parametrize("http_client", ["lean", "boto3"])
def test_poller_once_sends_the_options_from_the_config_file(config: ConfigFile, s3, bucket, http_client) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"one")
    proxy = FaultProxy(int(config.sections["s3"]["endpoint_url"].rsplit(":", 1)[1]))
    try:
        paid = {"name": "paid", "bucket": bucket, "key": "k", "request_payer": "requester"}
        config.write(
            [{**paid, "expected_bucket_owner": OWNER}, {"name": "plain", "bucket": bucket, "key": "k"}],
            s3={"endpoint_url": proxy.endpoint, "http_client": http_client},
        )
        proc = run_cli("once", "--config", str(config.path))
        assert proc.returncode == 0, proc.stderr
        heads = list(proxy.heads)
    finally:
        proxy.close()
    with_options = [h for h in heads if h.get("x-amz-request-payer") == "requester"]
    assert with_options and all(h["x-amz-expected-bucket-owner"] == OWNER for h in with_options)
    assert any("x-amz-request-payer" not in h for h in heads)  # the plain watch sends neither
