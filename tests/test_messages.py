"""Operator messages name the real cause (issue 10 point 8), and prefix listings compare canonical ETags:
pure tests of the helpers, plus the CLI and a ListObjectsV2 server over real HTTP."""

from __future__ import annotations

import http.server
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from botocore.exceptions import ClientError, ProfileNotFound
from conftest import ConfigFile, run_cli, serving
from daemonproc import query

from poller.listing import diff_listing
from poller.model import ObjectState, PrefixState, canonical_etag
from poller.s3client import describe_client_error, describe_transport_error

T = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


def client_error(status: int, code: str | None = None, retries: int = 0, op: str = "HeadObject") -> ClientError:
    """A ClientError shaped as botocore builds it (a HEAD has no body: its code is the status)."""
    return ClientError(
        {
            "Error": {"Code": code or str(status), "Message": ""},
            "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": {}, "RetryAttempts": retries},
        },
        op,
    )


# --- describe_client_error ---------------------------------------------------------------------


@pytest.mark.parametrize("code", ["KeyTooLongError", "InvalidArgument"])
def test_a_rejected_key_is_not_blamed_on_region_or_addressing(code: str):
    text = describe_client_error(client_error(400, code, op="ListObjectsV2"))
    assert f"the server refuses this key (HTTP 400 ({code}))" in text and "watch's key" in text
    assert "region" not in text and "addressing_style" not in text


def test_a_400_that_points_at_routing_says_so():
    text = describe_client_error(client_error(400, "AuthorizationHeaderMalformed"))
    assert "check [s3] region, addressing_style and endpoint_url" in text


def test_a_server_error_names_status_code_and_attempts_once():
    text = describe_client_error(client_error(500, "InternalError", retries=2, op="ListObjectsV2"))
    assert text.startswith("S3 answered HTTP 500 (InternalError) after 3 attempts")
    bare = describe_client_error(client_error(500, retries=2))  # a HEAD: no body, no code
    assert bare.startswith("S3 answered HTTP 500 after 3 attempts")
    assert "500 500" not in text + bare


def test_throttling_counts_attempts_without_repeating_the_status():
    text = describe_client_error(client_error(503, retries=3))
    assert "throttled or unavailable (HTTP 503) after 4 attempts" in text and "503 503" not in text


def test_credential_errors_have_their_own_words():
    assert describe_client_error(client_error(403, "SignatureDoesNotMatch", op="ListObjectsV2")) == (
        "the secret key does not match the access key id (SignatureDoesNotMatch): check the credentials "
        "for this endpoint"
    )
    unknown = describe_client_error(client_error(403, "InvalidAccessKeyId", op="ListObjectsV2"))
    assert unknown.startswith("the access key id is unknown to this endpoint (InvalidAccessKeyId)")
    assert "s3:GetObject" not in unknown


def test_a_403_without_a_code_keeps_the_access_denied_wording():
    text = describe_client_error(client_error(403))
    assert text.startswith("access denied (403): the credentials may not s3:GetObject this key")
    assert "s3:ListBucket" in text


def test_transport_error_for_a_profile_that_vanished():
    text = describe_transport_error(ProfileNotFound(profile="gone"))
    assert "cannot get AWS credentials" in text and "gone" in text


def test_a_tls_failure_is_called_a_certificate_problem_only_when_it_is_one():
    from botocore.exceptions import SSLError

    eof = describe_transport_error(SSLError(endpoint_url="https://s3", error="EOF occurred in violation of protocol"))
    assert eof.startswith("TLS handshake failed") and "AWS_CA_BUNDLE" not in eof
    cert = describe_transport_error(SSLError(endpoint_url="https://s3", error="[SSL: CERTIFICATE_VERIFY_FAILED] x"))
    assert cert.startswith("TLS certificate verification failed") and "ca_bundle in the AWS profile" in cert


# --- canonical ETags and the listing diff ------------------------------------------------------


def test_canonical_etag():
    assert canonical_etag(None) is None
    assert canonical_etag("") is None
    assert canonical_etag("abc") == '"abc"'
    assert canonical_etag('"abc"') == '"abc"'
    assert canonical_etag(' "abc-2" ') == '"abc-2"'
    assert canonical_etag('W/"abc"') == 'W/"abc"'


def state(etag: str | None, size: int = 1, minute: int = 0) -> ObjectState:
    return ObjectState(etag=etag, last_modified=T.replace(minute=minute), size=size, present=True)


def test_an_equal_etag_is_never_modified():
    stored = PrefixState(True, {"grow": state('"a"', 10), "legacy": state("b"), "real": state('"c"')})
    listed = {"grow": state('"a"', 20, minute=1), "legacy": state('"b"'), "real": state('"d"', 1)}
    changes = {c.key: c for c in diff_listing(stored, listed)}
    assert {k: c.event for k, c in changes.items()} == {"grow": None, "legacy": None, "real": "modified"}
    # The refresh carries the new size and time, and rewrites a stored unquoted ETag in the quoted form.
    assert changes["grow"].state.size == 20
    assert changes["legacy"].state.etag == '"b"'


def test_without_etags_the_size_still_tells():
    stored = PrefixState(True, {"k": state(None, 1)})
    assert [c.event for c in diff_listing(stored, {"k": state(None, 2)})] == ["modified"]
    assert diff_listing(stored, {"k": state(None, 1)}) == []


# --- over the wire: a server that lists ETags without quotes and a growing size ------------------


class _Listing(http.server.BaseHTTPRequestHandler):
    """ListObjectsV2 for one key: unquoted ETag, Size and LastModified grow per request (an upload
    in progress on some servers), the ETag changes only when the test says so."""

    calls = 0
    etag = "abc123"

    def do_GET(self) -> None:
        cls = type(self)
        cls.calls += 1
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>'
            '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            "<Name>bkt-listing</Name><Prefix>p/</Prefix><KeyCount>1</KeyCount><MaxKeys>1000</MaxKeys>"
            "<IsTruncated>false</IsTruncated>"
            f"<Contents><Key>p/a</Key><LastModified>2026-11-24T10:00:{cls.calls:02d}.000Z</LastModified>"
            f"<ETag>{cls.etag}</ETag><Size>{cls.calls * 100}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            "</ListBucketResult>"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_unquoted_listing_etags_and_a_growing_size_over_the_wire(config: ConfigFile):
    with serving(_Listing) as port:
        config.write(
            [{"name": "p", "bucket": "bkt-listing", "prefix": "p/"}],
            s3={"endpoint_url": f"http://127.0.0.1:{port}", "conditional": "etag"},
        )
        for _ in range(3):
            proc = run_cli("once", "--config", str(config.path))
            assert proc.returncode == 0, proc.stderr
        _Listing.etag = "def456"
        proc = run_cli("once", "--config", str(config.path))
        assert proc.returncode == 0, proc.stderr
    history = query(config.db, "SELECT event, etag, previous_etag FROM etag_history ORDER BY id")
    assert history == [("first_seen", '"abc123"', None), ("modified", '"def456"', '"abc123"')]
    stored = query(config.db, "SELECT etag, size FROM object_state WHERE key = 'p/a'")
    assert stored == [('"def456"', 400)]


# --- CLI --------------------------------------------------------------------------------------


def test_history_of_an_unknown_watch_is_an_error(config: ConfigFile, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"1")
    config.write([{"name": "a", "bucket": bucket, "key": "k"}, {"name": "b", "bucket": bucket, "key": "absent"}])
    assert run_cli("once", "--config", str(config.path)).returncode == 0
    args = ("--config", str(config.path))
    proc = run_cli("history", "nosuch", *args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "no watch named 'nosuch' in the database (known: a, b)" in proc.stderr
    glob = run_cli("history", "z*", *args)
    assert glob.returncode == 1 and "no watch matches 'z*'" in glob.stderr
    # A watch that exists but has no rows of that kind: an empty table, exit 0.
    empty = run_cli("history", "b", "--changes", "--format", "json", *args)
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    assert run_cli("history", "a*", "--changes", *args).returncode == 0


def test_check_probe_claims_no_change(config: ConfigFile, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"1")
    config.write([{"name": "x", "bucket": bucket, "key": "k"}, {"name": "gone", "bucket": bucket, "key": "absent"}])
    proc = run_cli("check", "--probe", "--config", str(config.path))
    assert proc.returncode == 0, proc.stderr
    assert "first seen" not in proc.stdout and "modified (" not in proc.stdout
    assert "x s3://" in proc.stdout and 'present (200), etag "' in proc.stdout and "(not recorded)" in proc.stdout
    assert "gone s3://" in proc.stdout and "missing (404) (not recorded)" in proc.stdout
    assert not config.db.exists()


class _WrongSecret(http.server.BaseHTTPRequestHandler):
    """A server that refuses the signature: a HEAD's 403 has no body, a GET's names the code."""

    def _refuse(self, body: bytes) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._refuse(b"")

    def do_GET(self) -> None:
        self._refuse(
            b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SignatureDoesNotMatch</Code>'
            b"<Message>The request signature we calculated does not match the signature you provided.</Message>"
            b"</Error>"
        )

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("http_client", ["lean", "boto3"])
def test_check_probe_tells_a_wrong_secret_from_a_missing_permission(config: ConfigFile, http_client: str):
    with serving(_WrongSecret) as port:
        config.write(
            [{"name": "x", "bucket": "bkt-secret", "key": "k"}],
            s3={"endpoint_url": f"http://127.0.0.1:{port}", "conditional": "etag", "http_client": http_client},
        )
        proc = run_cli("check", "--probe", "--config", str(config.path))
    assert proc.returncode == 1, proc.stderr
    assert "the secret key does not match the access key id (SignatureDoesNotMatch)" in proc.stdout, proc.stdout
    assert "s3:GetObject" not in proc.stdout


def test_an_aws_region_botocore_does_not_know_is_warned_about_once(caplog):
    """A typo such as us-east-l passes the name check (it is a DNS label) and would fail every poll
    on DNS: the client's build says so, suggesting the near region; an endpoint_url silences it."""
    from poller.config import S3Settings
    from poller.s3client import make_client

    with caplog.at_level("WARNING", logger="poller.s3client"):
        make_client(S3Settings(region="eu-west-l"), 1)
        make_client(S3Settings(region="eu-west-l"), 1)
        make_client(S3Settings(region="eu-west-1"), 1)
        make_client(S3Settings(region="my-minio", endpoint_url="http://127.0.0.1:9"), 1)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1, warned
    assert "'eu-west-l' is not an AWS region" in warned[0] and "(near: eu-west-1, eu-west-2, eu-west-3)" in warned[0]
