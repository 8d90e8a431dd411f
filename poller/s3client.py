"""The boto3 edge: the client poller builds, HeadObject through it, and the operator's words for its errors."""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

import boto3
import botocore.handlers
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    InvalidConfigError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    SSLError,
)
from botocore.utils import parse_timestamp as botocore_parse_timestamp

from poller.model import Answer, ProtocolError, Watch, answer_from_headers

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from poller.config import S3Settings

log = logging.getLogger(__name__)


def make_client(
    settings: S3Settings, concurrency: int, session: boto3.session.Session | None = None, **extra: Any
) -> S3Client:
    """One thread-safe S3 client sized for ``concurrency`` polls in flight."""
    session = session or boto3.session.Session(profile_name=settings.profile or None)
    # Before the client exists: it takes its response parser from the session's factory when built.
    session._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    config = BotoConfig(
        region_name=settings.region,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        # max_attempts counts every attempt, as in ~/.aws/config; botocore's own key of that name counts retries.
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        max_pool_connections=max(concurrency + 4, 10),
        s3={"addressing_style": settings.addressing_style},
        user_agent_extra="poller",
        **extra,
    )
    client = session.client("s3", endpoint_url=settings.endpoint_url or None, config=config)
    if not settings.endpoint_url:
        _warn_if_unknown_region(session._session, settings.region)
    events = client.meta.events
    if _botocore_200_check is not None:
        events.unregister("before-parse.s3.*", _botocore_200_check)
    events.register_first("before-parse.s3.*", _check_200_body)
    return client


_warned_regions: set[str] = set()


def _warn_if_unknown_region(core: Any, region: str) -> None:
    """Warn once about an AWS region botocore does not list: a typo (us-east-l) fails every poll on
    DNS. Not an error: a region newer than the installed botocore is valid."""
    if region == "us-east-1" or region in _warned_regions:
        return
    try:
        known = {r for p in core.get_available_partitions() for r in core.get_available_regions("s3", partition_name=p)}
    except Exception:  # the check is advice: botocore's data unreadable is not the operator's fault
        return
    if known and region not in known:
        _warned_regions.add(region)
        near = sorted(difflib.get_close_matches(region, sorted(known), n=3))
        log.warning(
            "[s3] region %r is not an AWS region botocore %s knows%s: if it is a typo, every poll will fail "
            "to resolve the endpoint; if it is newer than botocore, upgrade botocore or ignore this "
            "(an S3-compatible server: set [s3] endpoint_url)",
            region,
            botocore.__version__,
            f" (near: {', '.join(near)})" if near else "",
        )


# botocore >= 1.36 parses every S3 answer of 200 with a body once more, looking for an error; older
# versions check a few operations only, and ListObjectsV2 is not one of them.
_botocore_200_check: Callable[..., None] | None = getattr(botocore.handlers, "_handle_200_error", None)

# A listing that opens and closes as one: neither an error nor cut short (a reply's XML tags are ASCII).
_LISTING_OPENS = re.compile(rb"\s*(?:<\?xml[^>]*\?>\s*)?<ListBucketResult[\s>]")
_LISTING_CLOSES = b"</ListBucketResult>"


def _check_200_body(operation_model: Any, response_dict: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """A ListObjectsV2 answer of 200 must be a whole listing: anything else (an error inside a 200, a
    body cut short, no body) becomes a 500, which botocore retries and then raises. Read as a listing,
    it would say every key was deleted. Other operations keep botocore's own check."""
    if operation_model.name != "ListObjectsV2":
        if _botocore_200_check is not None:
            _botocore_200_check(operation_model=operation_model, response_dict=response_dict, **kwargs)
        return
    if not response_dict or response_dict.get("status_code") != 200:
        return
    body = response_dict.get("body") or b""
    # botocore's check parsed the whole body a second time: 30% of the CPU of a pass over a million
    # keys (py-spy). The common case is decided from its two ends; anything unusual is parsed.
    if _LISTING_OPENS.match(body, 0, 1024) and body[-256:].rstrip().endswith(_LISTING_CLOSES):
        return
    if not _is_listing(body):
        log.warning(
            "the S3 endpoint answered a ListObjectsV2 with 200 but no whole listing (an error inside, or "
            "the body cut short): taken as a 500 and retried, never as an empty prefix"
        )
        response_dict["status_code"] = 500


def _is_listing(body: bytes) -> bool:
    """Whether ``body`` is a well-formed XML document whose root is a ListBucketResult."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return False
    return root.tag.rpartition("}")[2] == "ListBucketResult"


def parse_timestamp(value: str) -> datetime:
    """botocore's timestamp parser, with ListObjectsV2's ISO-8601 form read by the standard library.

    botocore parses every key's LastModified with dateutil: 45% of a prefix watch's list pass (py-spy,
    200,000 keys). Only an ISO-8601 date-time with an offset takes the fast path; anything else
    (HTTP dates, epoch seconds) goes to botocore, as before. Same instant either way.
    """
    if len(value) >= 20 and value[4] == "-" and value[10] == "T":
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    result: datetime = botocore_parse_timestamp(value)
    return result


def head(client: S3Client, bucket: str, key: str, **conditions: Any) -> Answer:
    """One HeadObject; a 304 or 404 is an Answer (botocore raises them as ClientError), anything else raises."""
    try:
        response = client.head_object(Bucket=bucket, Key=key, **conditions)
    except ClientError as exc:
        status = status_of(exc)
        if status in (304, 404):
            return answer_from_headers(status, exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}))
        raise
    status = response["ResponseMetadata"].get("HTTPStatusCode", 200)
    if status < 200:
        # http.client skips only a 100 Continue: another 1xx (a 103 Early Hints) reaches botocore as the answer.
        raise ProtocolError(
            f"the endpoint sent an interim HTTP {status} that the HTTP client took as the final answer to "
            'HeadObject; the real answer was not read (use [s3] http_client = "lean", which skips 1xx answers)'
        )
    return answer_from_headers(200, response["ResponseMetadata"]["HTTPHeaders"])


def status_of(exc: ClientError) -> int | None:
    meta = exc.response.get("ResponseMetadata", {})
    status = meta.get("HTTPStatusCode")
    if isinstance(status, int):
        return status
    code = exc.response.get("Error", {}).get("Code", "")
    return int(code) if code.isdigit() else None


def bucket_missing(watch: Watch) -> str:
    return (
        f"bucket not found: s3://{watch.bucket} does not exist on this endpoint "
        "(check the watch's bucket name and [s3] endpoint_url/region)"
    )


# Error codes that say the request named a key the server will not take, not a misrouted request.
_KEY_CODES = ("KeyTooLongError", "InvalidArgument", "InvalidObjectName", "InvalidURI", "InvalidKey")
# Error codes that do point at the region or addressing settings.
_ROUTING_CODES = (
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "InvalidBucketName",
    "InvalidRegion",
    "PermanentRedirect",
)
_THROTTLE_CODES = ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests")


def describe_client_error(exc: ClientError) -> str:
    """An operator-facing reason for an S3 error answer, from its error code where the server sent one."""
    status = status_of(exc)
    raw = str(exc.response.get("Error", {}).get("Code", "") or "")
    # A HEAD answer has no body, so botocore (and the lean path) use the status as the code.
    code = "" if raw.isdigit() or not raw else raw
    attempts = int(exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0) + 1
    answered = f"HTTP {status} ({code})" if code else f"HTTP {status}"
    if code == "SignatureDoesNotMatch":
        return (
            "the secret key does not match the access key id (SignatureDoesNotMatch): check the credentials "
            "for this endpoint"
        )
    if code == "InvalidAccessKeyId":
        return (
            "the access key id is unknown to this endpoint (InvalidAccessKeyId): check the credentials "
            "(profile, environment or instance role) and [s3] endpoint_url"
        )
    if code in ("ExpiredToken", "TokenRefreshRequired", "InvalidToken"):
        return f"the session token was refused ({code}): refresh the temporary credentials"
    if code == "RequestTimeTooSkewed":
        return "this machine's clock is too far from the server's (RequestTimeTooSkewed): fix the time (NTP)"
    if status == 403:
        return (
            "access denied (403): the credentials may not s3:GetObject this key; on AWS a missing key "
            "also answers 403 to a caller without s3:ListBucket on the bucket"
        )
    if status == 301 or code == "PermanentRedirect":
        return "wrong region (301): the bucket lives in another region; set [s3] region"
    if code in _KEY_CODES:
        return f"the server refuses this key ({answered}): check the watch's key (length, characters)"
    if code in _THROTTLE_CODES or status in (429, 503):
        return f"throttled or unavailable ({answered}) after {attempts} attempts; polling goes on at the next interval"
    if status == 400:
        if code in _ROUTING_CODES:
            return f"bad request ({answered}): check [s3] region, addressing_style and endpoint_url"
        if code:
            return f"bad request ({answered}): the server refused the request; check the watch's bucket and key"
        return (
            "bad request (HTTP 400, no error code: a HEAD answer has no body): check the watch's key, "
            "and [s3] region, addressing_style and endpoint_url"
        )
    if status is not None and status >= 500:
        return f"S3 answered {answered} after {attempts} attempts; polling goes on at the next interval"
    return f"S3 answered {answered}"


def describe_transport_error(exc: BaseException) -> str:
    """An operator-facing reason for a failure below HTTP (network, timeout, credentials)."""
    if isinstance(exc, ReadTimeoutError):
        return "read timeout: the endpoint accepted the connection but did not answer in [s3] read_timeout"
    if isinstance(exc, ConnectTimeoutError):
        return "connect timeout: the endpoint did not accept a connection in [s3] connect_timeout"
    if isinstance(exc, SSLError):
        if "CERTIFICATE_VERIFY_FAILED" not in str(exc):
            return f"TLS handshake failed ({exc}): the endpoint or a proxy in between ended it"
        return (
            f"TLS certificate verification failed ({exc}); for a private CA set AWS_CA_BUNDLE (or ca_bundle in the "
            "AWS profile) to its certificate"
        )
    if isinstance(exc, EndpointConnectionError):
        return "cannot connect to the endpoint (connection refused or DNS failure); check [s3] endpoint_url"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an instance role"
    if isinstance(exc, PartialCredentialsError):
        return f"incomplete AWS credentials ({exc}): set both the access key id and the secret key"
    if isinstance(exc, CredentialRetrievalError | InvalidConfigError | ProfileNotFound):
        return f"cannot get AWS credentials: {exc}; check the profile in the AWS config files"
    return f"{type(exc).__name__}: {exc}"
