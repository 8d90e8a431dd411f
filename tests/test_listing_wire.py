"""A ListObjectsV2 answer of 200 that is not a whole listing is an error, never an empty prefix.

A server (or a proxy) can answer 200 with an S3 error document inside, or cut the body short; read
as a listing, either would say every key under the prefix was deleted. poller's client checks each
listing itself (botocore's own check parsed every listing twice, and older botocore versions do not
check ListObjectsV2 at all). Over the wire, against a peer that answers what each test tells it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from types import SimpleNamespace
from typing import Any

import boto3
import botocore.handlers
import pytest
from botocore.exceptions import ClientError
from conftest import serving

from poller.config import S3Settings
from poller.listing import list_prefix, poll_prefix
from poller.model import ObjectState, PrefixState, Watch
from poller.s3client import make_client

XML = b'<?xml version="1.0" encoding="UTF-8"?>\n'
NS = b' xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def listing(*keys: str, declaration: bytes = XML, ns: bytes = NS, tail: bytes = b"\n") -> bytes:
    contents = b"".join(
        b"<Contents><Key>%s</Key><LastModified>2026-11-25T10:00:00.000Z</LastModified>"
        b'<ETag>"e-%s"</ETag><Size>3</Size><StorageClass>STANDARD</StorageClass></Contents>' % (k.encode(), k.encode())
        for k in keys
    )
    return (
        declaration + b"<ListBucketResult%s><Name>b</Name><Prefix>p/</Prefix><KeyCount>%d</KeyCount>"
        b"<MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>%s</ListBucketResult>%s"
        % (ns, len(keys), contents, tail)
    )


class Answers(BaseHTTPRequestHandler):
    """Answers each GET with the next of ``bodies`` (the last one again once the others are used)."""

    protocol_version = "HTTP/1.1"
    bodies: list[bytes] = []
    requests = 0
    port = 0

    def do_GET(self) -> None:
        peer = type(self)
        body = peer.bodies[min(peer.requests, len(peer.bodies) - 1)]
        peer.requests += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


Peer = type[Answers]


@pytest.fixture
def peer() -> Iterator[Peer]:
    handler: Peer = type("Answering", (Answers,), {"bodies": [], "requests": 0})
    with serving(handler) as port:
        handler.port = port
        yield handler


def _client(peer: Peer) -> Any:
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{peer.port}", addressing_style="path", max_attempts=2)
    return make_client(settings, 1, boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s"))


def _list(peer: Peer, *bodies: bytes) -> dict[str, object]:
    peer.bodies = list(bodies)
    listed, _ = list_prefix(_client(peer), Watch(1, "w", "b", "p/", prefix=True))
    return dict(listed)


@pytest.mark.parametrize(
    "body",
    [
        listing("p/a", "p/b"),
        listing("p/a", "p/b", declaration=b""),  # no XML declaration
        listing("p/a", "p/b", ns=b""),  # no namespace
        listing("p/a", "p/b", tail=b"<!-- a comment after the root -->\n"),  # parsed, and whole
    ],
    ids=["usual", "no-declaration", "no-namespace", "comment-after"],
)
def test_a_whole_listing_is_read(peer: Peer, body: bytes, monkeypatch: pytest.MonkeyPatch):
    parsed: list[bytes] = []
    full_parse = botocore.handlers._looks_like_special_case_error  # type: ignore[attr-defined]
    monkeypatch.setattr(
        botocore.handlers, "_looks_like_special_case_error", lambda s, b: parsed.append(b) or full_parse(s, b)
    )
    listed = _list(peer, body)
    assert sorted(listed) == ["p/a", "p/b"]
    assert listed["p/a"].last_modified == datetime(2026, 11, 25, 10, tzinfo=UTC)  # type: ignore[attr-defined]
    assert parsed == []  # botocore's second parse of the body is not run for a listing


ERROR = XML + b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"


@pytest.mark.parametrize(
    "body",
    [
        ERROR,
        listing("p/a", "p/b")[:-40],  # cut short: the peer's Content-Length says so too
        b"",  # no body at all
        XML + b"<ListAllMyBucketsResult><Buckets/></ListAllMyBucketsResult>",  # a whole document, not a listing
        XML + b"<ListBucketResult><Name>b</Name><IsTruncated>false</IsTruncated>",  # opens as one, never closes
    ],
    ids=["error-inside-200", "cut-short", "empty", "other-document", "unclosed"],
)
def test_a_200_without_a_whole_listing_is_retried_then_an_error(peer: Peer, body: bytes):
    with pytest.raises(ClientError):
        _list(peer, body)
    assert peer.requests == 2  # retried (max_attempts = 2), as botocore retries a 500


def test_a_bad_listing_then_a_good_one_is_read(peer: Peer):
    # The retry gets the whole listing: the pass sees every key, none of them deleted.
    assert sorted(_list(peer, ERROR, listing("p/a", "p/b"))) == ["p/a", "p/b"]
    assert peer.requests == 2


def test_a_listing_broken_inside_is_an_error_outcome(peer: Peer):
    # Its two ends pass the cheap check; botocore's parser then refuses it: the pass is an error, the
    # stored keys are untouched (no deletion invented), and the daemon's worker does not see an exception.
    broken = listing("p/a", "p/b").replace(b"</Key>", b"</Kee>", 1)
    peer.bodies = [broken]
    prober = SimpleNamespace(client=_client(peer), now=lambda: datetime.now(UTC))
    stored = PrefixState(True, {"p/a": ObjectState('"e-p/a"', None, None, None, 3, True)})
    result = poll_prefix(prober, Watch(1, "w", "b", "p/", prefix=True), stored)  # type: ignore[arg-type]
    assert result.outcome == "error" and result.changes == ()
    assert result.error is not None and result.error.startswith("the listing could not be read: Unable to parse")
    assert "p/b" not in result.error  # not the body (it can be a megabyte) in every error row


def page(
    *keys: str, truncated: bool | None = False, token: str = "", etag: str | None = '"e-{}"', prefix: str = "p/"
) -> bytes:
    """One ListObjectsV2 page: ``truncated`` None leaves IsTruncated out, ``etag`` None the ETags."""
    contents = b"".join(
        b"<Contents><Key>%s</Key><LastModified>2026-11-25T10:00:00.000Z</LastModified>%s<Size>3</Size></Contents>"
        % (k.encode(), b"" if etag is None else b"<ETag>%s</ETag>" % etag.format(k).encode())
        for k in keys
    )
    flag = b"" if truncated is None else b"<IsTruncated>%s</IsTruncated>" % str(truncated).lower().encode()
    more = b"<NextContinuationToken>%s</NextContinuationToken>" % token.encode() if token else b""
    return (
        XML
        + b"<ListBucketResult%s><Name>b</Name><Prefix>%s</Prefix><KeyCount>%d</KeyCount>%s%s%s</ListBucketResult>"
        % (NS, prefix.encode(), len(keys), flag, more, contents)
    )


STORED = PrefixState(
    True, {k: ObjectState(f'"e-{k}"', None, None, None, 3, True) for k in ("p/a", "p/b", "p/c", "p/d")}
)


def _pass(peer: Peer, *bodies: bytes) -> Any:
    peer.bodies = list(bodies)
    prober = SimpleNamespace(client=_client(peer), now=lambda: datetime.now(UTC))
    return poll_prefix(prober, Watch(1, "w", "b", "p/", prefix=True), STORED)  # type: ignore[arg-type]


def test_a_listing_in_pages_is_read_whole(peer: Peer):
    result = _pass(peer, page("p/a", "p/b", truncated=True, token="t1"), page("p/c", "p/d"))
    assert result.outcome == "unchanged" and not [c for c in result.changes if c.event], result.error
    assert peer.requests == 2 and "2 list pages" in result.note


@pytest.mark.parametrize(
    ("bodies", "error"),
    [
        # Read as the end, each would have every key of the pages never fetched recorded as deleted.
        ([page("p/a", "p/b", truncated=True)], "truncated (IsTruncated) but sent no NextContinuationToken"),
        ([page("p/a", "p/b", truncated=None, token="t1")], "continuation token on a page it did not mark truncated"),
        ([page("p/a", "p/b", truncated=False, token="t1")], "continuation token on a page it did not mark truncated"),
        # Loops: without a check the worker would list forever and the watch never be polled again.
        (
            [
                page("p/a", truncated=True, token="t1"),
                page("p/b", truncated=True, token="t2"),
                page("p/c", truncated=True, token="t1"),
            ],
            "continuation tokens came round again",
        ),
        (
            [page("p/a", "p/b", truncated=True, token=f"t{i}") for i in range(5)],
            "came round to a page it had already sent",
        ),
        # Entries that cannot be recorded: as on a HEAD, an error, not a `modified` to no ETag.
        ([page("p/a", "p/b", etag=None)], "'p/a' without an ETag"),
        ([page("p/a", "p/b", etag='""')], "'p/a' without an ETag"),
        ([page("p/a", "q/x")], "'q/x' outside the prefix"),
    ],
    ids=["truncated-no-token", "token-no-flag", "token-not-truncated", "tokens-loop", "token-ignored", "no-etag",
         "empty-etag", "outside-prefix"],
)  # fmt: skip
def test_a_listing_that_cannot_be_whole_is_an_error_and_deletes_nothing(peer: Peer, bodies: list[bytes], error: str):
    result = _pass(peer, *bodies)
    assert result.outcome == "error" and result.changes == (), result
    assert error in (result.error or ""), result.error
