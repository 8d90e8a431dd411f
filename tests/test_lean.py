"""The lean HEAD path sends what boto3 sends: same host, path and signed headers, same signature.

For every key class and addressing style, boto3's HeadObject is captured (over the wire where the
endpoint is local, else through botocore's ``before-send`` event, before anything is sent) and the
lean request is built for the same bucket, key, conditions, credentials and X-Amz-Date: the
Authorization headers must be equal byte for byte, which proves the canonical requests are.
"""

from __future__ import annotations

import contextlib
import http.server
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.exceptions import ClientError, SSLError
from conftest import serving
from test_targets import boto3_sends, lean_for

from poller.config import S3Settings
from poller.lean import Signer, header_conditions
from poller.s3client import describe_transport_error
from poller.targets import request_path, target_from_presigned

KEYS = [
    "plain.json",
    "with space/and more.txt",
    "unicodé/日本語/ü.json",
    "plus+sign=equals",
    "per%cent%20x",
    "q?uery&amp=1#frag",
    "~tilde/!*'();:@=$,[]",
    "a//double/slash",
    "/leading-slash",
    "trailing/",
    "..",
]
CONDITIONS: list[dict[str, Any]] = [
    {},
    {"IfNoneMatch": '"9b2cf535f27731c974343645a3985328"'},
    {
        "IfNoneMatch": '"9b2cf535f27731c974343645a3985328-3"',
        "IfModifiedSince": datetime(2026, 11, 24, 10, 0, 3, 500, UTC),
    },
]
UNSIGNED_BY_BOTOCORE = {"user-agent", "amz-sdk-invocation-id", "amz-sdk-request", "accept-encoding"}


@pytest.fixture(params=[None, "session-token/with+chars=="], ids=["keys", "keys+token"])
def credentials(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, str | None]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    if request.param:
        monkeypatch.setenv("AWS_SESSION_TOKEN", request.param)
    else:
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", request.param


ENDPOINTS = [
    # (endpoint_url, region, addressing_style, bucket)
    ("http://localhost:9000", "us-east-1", "path", "my-bucket"),
    ("http://localhost:9000", "eu-west-1", "virtual", "my-bucket"),
    ("http://127.0.0.1:9000", "us-east-1", "auto", "my-bucket"),
    ("https://s3.example.test:8443", "eu-central-1", "path", "my-bucket"),
    ("https://s3.example.test", "eu-central-1", "virtual", "my-bucket"),
    ("", "us-east-1", "auto", "my-bucket"),
    ("", "eu-west-1", "virtual", "my-bucket"),
    ("", "eu-west-1", "path", "my-bucket"),
    ("", "ap-southeast-2", "auto", "dotted.bucket.name"),
]


@pytest.mark.parametrize(("endpoint", "region", "style", "bucket"), ENDPOINTS)
def test_lean_request_equals_boto3_for_every_key_class_and_addressing_style(
    credentials: tuple[str, str, str | None], endpoint: str, region: str, style: str, bucket: str
) -> None:
    access, secret, token = credentials
    settings = S3Settings(endpoint_url=endpoint, region=region, addressing_style=style)  # type: ignore[arg-type]
    lean, client = lean_for(settings, boto3.session.Session())
    target = lean.target(bucket)
    assert target is not None
    signer = Signer()
    for key in KEYS:
        for conditions in CONDITIONS:
            url, sent = boto3_sends(client, bucket, key, conditions)
            parts = urlsplit(url)
            path = request_path(target, key)
            assert f"{parts.scheme}://{parts.netloc}" == target.endpoint, (key, url)
            assert parts.path == path and not parts.query, (key, url)
            ours = signer.headers(
                target, path, header_conditions(conditions), access, secret, token, sent["x-amz-date"]
            )
            # Same headers, same values; the signature covers the Host header boto3's HTTP layer adds.
            assert {k: v for k, v in sent.items() if k not in UNSIGNED_BY_BOTOCORE} == {
                k: v for k, v in ours.items() if k != "host"
            }, (key, conditions)


class _Recorder(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, dict[str, str]]] = []

    def do_HEAD(self) -> None:
        self.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self.send_response(304)
        self.send_header("ETag", '"9b2cf535f27731c974343645a3985328"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[tuple[str, dict[str, str]]]]]:
    handler = type("Handler", (_Recorder,), {"seen": []})
    with serving(handler) as port:
        yield f"http://127.0.0.1:{port}", handler.seen


def test_on_the_wire_both_paths_send_the_same_request(credentials, recorder) -> None:
    access, secret, token = credentials
    endpoint, seen = recorder
    settings = S3Settings(endpoint_url=endpoint, addressing_style="path")
    lean, client = lean_for(settings, boto3.session.Session())
    target = lean.target("bkt")
    assert target is not None
    for key in KEYS:
        for conditions in CONDITIONS:
            seen.clear()
            with contextlib.suppress(client.exceptions.ClientError):
                client.head_object(Bucket="bkt", Key=key, **conditions)
            answer = lean.head("bkt", key, conditions)
            assert answer.status == 304
            (boto_path, boto_headers), (lean_path, lean_headers) = seen
            assert boto_path == lean_path
            assert lean_headers["host"] == boto_headers["host"]
            for name in ("if-none-match", "if-modified-since", "x-amz-content-sha256", "x-amz-security-token"):
                assert lean_headers.get(name) == boto_headers.get(name), name
            # Re-signed at boto3's X-Amz-Date, the lean request carries boto3's exact signature.
            resigned = Signer().headers(
                target, lean_path, header_conditions(conditions), access, secret, token, boto_headers["x-amz-date"]
            )
            assert resigned["authorization"] == boto_headers["authorization"]


def test_targets_the_lean_path_does_not_serve() -> None:
    v2 = "https://b.s3.amazonaws.com/poller-sentinel?AWSAccessKeyId=x&Signature=y&Expires=1"
    express = (
        "https://b--use1-az4--x-s3.s3express-use1-az4.us-east-1.amazonaws.com/poller-sentinel?"
        "X-Amz-Credential=AKID%2F20261125%2Fus-east-1%2Fs3express%2Faws4_request&X-Amz-Signature=z"
    )
    assert target_from_presigned(v2) is None
    assert target_from_presigned(express) is None
    plain = target_from_presigned(
        "http://127.0.0.1:80/b/poller-sentinel?X-Amz-Credential=AKID%2F20261125%2Feu-west-1%2Fs3%2Faws4_request"
    )
    assert plain is not None
    assert (plain.host_header, plain.prefix, plain.region) == ("127.0.0.1", "/b/", "eu-west-1")


def test_an_access_point_arn_and_a_proxy_go_through_boto3(credentials, monkeypatch) -> None:
    settings = S3Settings(endpoint_url="http://127.0.0.1:9000", addressing_style="path")
    lean, _ = lean_for(settings, boto3.session.Session())
    assert lean.target("arn:aws:s3:us-east-1:123456789012:accesspoint/ap") is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example.test:3128")
    monkeypatch.setenv("NO_PROXY", "")
    settings = S3Settings(endpoint_url="http://s3.example.test:9000", addressing_style="path")
    lean, _ = lean_for(settings, boto3.session.Session())
    assert lean.target("bkt") is None


def _self_signed(tmp_path: Any) -> tuple[str, str]:
    """A certificate for localhost and 127.0.0.1 (cryptography comes with moto), and its key."""
    import ipaddress
    from datetime import timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


def test_https_endpoint_is_verified_against_the_ca_bundle(credentials, tmp_path, monkeypatch) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    handler = type("Handler", (_Recorder,), {"seen": []})
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    with serving(handler, tls) as port:
        endpoint = f"https://localhost:{port}"
        # Without the CA, the certificate is refused: an error, never an unverified answer.
        lean, _ = lean_for(S3Settings(endpoint_url=endpoint, addressing_style="path"), boto3.session.Session())
        with pytest.raises(SSLError) as refused:
            lean.head("bkt", "k", {})
        assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
        assert "AWS_CA_BUNDLE" in describe_transport_error(refused.value)
        assert handler.seen == []
        monkeypatch.setenv("AWS_CA_BUNDLE", cert)
        lean, _ = lean_for(S3Settings(endpoint_url=endpoint, addressing_style="path"), boto3.session.Session())
        answer = lean.head("bkt", "k", {"IfNoneMatch": '"9b2cf535f27731c974343645a3985328"'})
        assert answer.status == 304 and answer.etag == '"9b2cf535f27731c974343645a3985328"'
        assert lean.head("bkt", "k", {}).status == 304  # the same TLS connection, kept alive
        assert [path for path, _ in handler.seen] == ["/bkt/k", "/bkt/k"]
        # ca_bundle in the AWS profile, as botocore reads it (the environment variable unset).
        monkeypatch.delenv("AWS_CA_BUNDLE")
        profile = tmp_path / "aws-config"
        profile.write_text(f"[default]\nca_bundle = {cert}\n")
        monkeypatch.setenv("AWS_CONFIG_FILE", str(profile))
        lean, _ = lean_for(S3Settings(endpoint_url=endpoint, addressing_style="path"), boto3.session.Session())
        assert lean.head("bkt", "k", {}).status == 304


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


def test_a_region_redirect_hands_the_bucket_to_boto3(credentials) -> None:
    handler = type("Handler", (_Redirect,), {"agents": []})
    with serving(handler) as port:
        lean, _ = lean_for(S3Settings(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1), boto3.session.Session())
        with pytest.raises(ClientError):
            lean.head("bkt", "k", {})
        assert lean.target("bkt") is None  # from now on boto3 serves this bucket
        assert handler.agents[0].startswith("poller/") and handler.agents[1].startswith("Boto3/")


@pytest.mark.parametrize("value", ['"a"\r\nx-evil: 1', '"a"\nx-evil: 1', '"a"\rx'])
def test_a_header_value_with_a_line_break_is_refused(value: str) -> None:
    from poller.lean import _request_bytes

    with pytest.raises(ValueError, match="line break"):
        _request_bytes("/bkt/k", {"if-none-match": value})
    assert _request_bytes("/bkt/k", {"if-none-match": '"a"'}) == b'HEAD /bkt/k HTTP/1.1\r\nif-none-match: "a"\r\n\r\n'


def test_if_modified_since_is_written_as_format_datetime_writes_it() -> None:
    from email.utils import format_datetime

    start = datetime(1970, 1, 1, tzinfo=UTC)
    for seconds in range(0, 5_000_000_000, 49_999_991):
        moment = start + timedelta(seconds=seconds, microseconds=seconds % 999_999)
        expected = format_datetime(moment.replace(microsecond=0), usegmt=True)
        assert header_conditions({"IfModifiedSince": moment})["if-modified-since"] == expected
