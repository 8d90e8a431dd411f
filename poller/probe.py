"""The conditional HeadObject and the classification of its answer (design.md section 1).

``request_conditions`` and ``classify`` are pure functions on plain data; ``Prober`` is the
I/O edge that sends the HEAD with boto3 and turns whatever happens into a ``PollResult``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Literal

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)

from poller.redact import redact

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from poller.config import S3Settings
    from poller.lean import LeanHead
    from poller.listing import KeyChange

Outcome = Literal["unchanged", "modified", "missing", "error"]
Event = Literal["first_seen", "modified", "deleted", "created"]
Conditional = Literal["both", "etag", "timestamp"]

# A Date this close to Last-Modified leaves room for a same-second overwrite (rule 1).
SAME_SECOND_MARGIN = timedelta(seconds=2)
BUCKET_CHECK_TTL = 300.0


@dataclass(frozen=True, slots=True)
class ObjectState:
    """What we last committed about one object; ``present`` is None until first seen or missed."""

    etag: str | None = None
    last_modified: datetime | None = None
    observed_server_date: datetime | None = None
    version_id: str | None = None
    size: int | None = None
    present: bool | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """The part of a HEAD answer that matters, read from its HTTP status and headers."""

    status: int
    etag: str | None = None
    last_modified: datetime | None = None
    server_date: datetime | None = None
    version_id: str | None = None
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    event: Event | None
    state: ObjectState
    # A 304 carrying a different ETag: fetch full metadata with an unconditional HEAD, then classify that.
    needs_full_head: bool = False


@dataclass(frozen=True, slots=True)
class Watch:
    """The identity and target of one watch, as the scheduler and store know it."""

    id: int
    name: str
    bucket: str
    key: str  # the object key, or the prefix of a prefix watch
    prefix: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_keys: int = 100_000

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}" + ("*" if self.prefix else "")


@dataclass(frozen=True, slots=True)
class PollResult:
    """One finished poll: what the store records and the log reports."""

    watch: Watch
    polled_at: datetime
    outcome: Outcome
    http_status: int | None
    duration_ms: float
    previous: ObjectState | None
    state: ObjectState | None  # None for an error: the stored state stays untouched
    event: Event | None = None
    error: str | None = None
    note: str = ""
    changes: tuple[KeyChange, ...] = ()  # prefix watches: the per-key changes of this list pass


def request_conditions(state: ObjectState | None, mode: Conditional) -> dict[str, Any]:
    """The conditional headers (as boto3 HeadObject kwargs) for the next poll of this state."""
    if state is None or not state.present or state.etag is None:
        return {}
    risky = (
        state.last_modified is None
        or state.observed_server_date is None
        or state.observed_server_date - state.last_modified < SAME_SECOND_MARGIN
    )
    conditions: dict[str, Any] = {}
    if mode in ("both", "etag"):
        conditions["IfNoneMatch"] = state.etag
    if mode in ("both", "timestamp") and not risky:
        conditions["IfModifiedSince"] = state.last_modified
    # In "timestamp" mode a risky state gets an unconditional HEAD: the ETag comparison in
    # classify() still sees a same-second overwrite.
    return conditions


def classify(state: ObjectState | None, answer: Answer) -> Verdict:
    """Map a HEAD answer (200, 304 or 404) against the stored state to outcome, event and new state."""
    known = state is not None and state.present is True
    if answer.status == 304:
        if state is None or not known:
            raise ValueError("a 304 answered a HEAD that carried no condition")
        if answer.etag is not None and answer.etag != state.etag:
            return Verdict("modified", "modified", state, needs_full_head=True)
        return Verdict("unchanged", None, _confirmed(state, answer))
    if answer.status == 200:
        new = ObjectState(
            etag=answer.etag,
            last_modified=answer.last_modified,
            observed_server_date=answer.server_date,
            version_id=answer.version_id,
            size=answer.size,
            present=True,
        )
        if state is not None and known and answer.etag == state.etag:
            if answer.last_modified == state.last_modified:
                return Verdict("unchanged", None, _confirmed(state, answer))
            return Verdict("unchanged", None, new)
        if state is None or state.present is None:
            return Verdict("modified", "first_seen", new)
        if state.present is False:
            return Verdict("modified", "created", new)
        return Verdict("modified", "modified", new)
    if answer.status == 404:
        # On a versioned bucket the 404 carries the delete marker's version id: keep it for the event.
        gone = ObjectState(present=False, observed_server_date=answer.server_date, version_id=answer.version_id)
        if known:
            return Verdict("missing", "deleted", gone)
        return Verdict("missing", None, gone)
    raise ValueError(f"classify() takes 200, 304 or 404, not {answer.status}")


def _confirmed(state: ObjectState, answer: Answer) -> ObjectState:
    """The stored state, with the latest server Date that confirmed it (for the same-second guard)."""
    date = answer.server_date
    if date is None or (state.observed_server_date is not None and state.observed_server_date >= date):
        return state
    return replace(state, observed_server_date=date)


def answer_from_headers(status: int, headers: dict[str, str]) -> Answer:
    """Build an Answer from an HTTP status and botocore's lower-cased response headers."""
    size = headers.get("content-length")
    return Answer(
        status=status,
        etag=headers.get("etag") or None,
        last_modified=_http_date(headers.get("last-modified")),
        server_date=_http_date(headers.get("date")),
        version_id=headers.get("x-amz-version-id") or None,
        size=int(size) if size and size.isdigit() and status == 200 else None,
    )


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def make_client(
    settings: S3Settings, concurrency: int, session: boto3.session.Session | None = None, **extra: Any
) -> S3Client:
    """One thread-safe S3 client sized for ``concurrency`` polls in flight."""
    session = session or boto3.session.Session(profile_name=settings.profile or None)
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
    return session.client("s3", endpoint_url=settings.endpoint_url or None, config=config)


def prober_for(settings: S3Settings, concurrency: int) -> Prober:
    """A Prober with its own client, built from the [s3] settings (lean HEAD path unless turned off)."""
    session = boto3.session.Session(profile_name=settings.profile or None)
    client = make_client(settings, concurrency, session)
    if settings.http_client == "boto3":
        return Prober(client, settings.conditional)
    from poller.lean import LeanHead

    resolver = make_client(settings, 1, session, signature_version="s3v4")
    lean = LeanHead(session, client, resolver, settings.connect_timeout, settings.read_timeout, settings.max_attempts)
    return Prober(client, settings.conditional, lean=lean)


def head(client: S3Client, bucket: str, key: str, **conditions: Any) -> Answer:
    """One HeadObject; a 304 or 404 is an Answer (botocore raises them as ClientError), anything else raises."""
    try:
        response = client.head_object(Bucket=bucket, Key=key, **conditions)
    except ClientError as exc:
        status = status_of(exc)
        if status in (304, 404):
            return answer_from_headers(status, exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}))
        raise
    return answer_from_headers(200, response["ResponseMetadata"]["HTTPHeaders"])


class Prober:
    """Sends the conditional HEAD for a watch and classifies the answer; never raises for S3 trouble."""

    def __init__(self, client: S3Client, mode: Conditional, clock: Any = None, lean: LeanHead | None = None) -> None:
        self.client = client
        self.lean = lean
        self.mode: Conditional = mode
        self.now = clock or (lambda: datetime.now(UTC))
        self._bucket_cache: dict[str, tuple[float, bool]] = {}
        self._bucket_lock = threading.Lock()

    def probe(self, watch: Watch, state: ObjectState | None) -> PollResult:
        """Poll one watch against its stored state."""
        polled_at = self.now()
        started = time.perf_counter()
        status: int | None = None
        try:
            answer = self._head(watch, request_conditions(state, self.mode))
            status = answer.status
            note = ""
            if answer.status == 404 and not self._bucket_exists(watch.bucket):
                return error_result(watch, polled_at, started, state, 404, bucket_missing(watch))
            verdict = classify(state, answer)
            if verdict.needs_full_head:
                note = "304 with a new ETag"
                answer = self._head(watch, {})
                status = answer.status
                verdict = classify(state, answer)
        except ClientError as exc:
            code = status_of(exc)
            return error_result(watch, polled_at, started, state, code, describe_client_error(exc))
        except (BotoCoreError, OSError, ValueError) as exc:
            return error_result(watch, polled_at, started, state, status, describe_transport_error(exc))
        return PollResult(
            watch=watch,
            polled_at=polled_at,
            outcome=verdict.outcome,
            http_status=status,
            duration_ms=(time.perf_counter() - started) * 1000,
            previous=state,
            state=verdict.state,
            event=verdict.event,
            note=note,
        )

    def _head(self, watch: Watch, conditions: dict[str, Any]) -> Answer:
        if self.lean is not None:
            return self.lean.head(watch.bucket, watch.key, conditions)
        return head(self.client, watch.bucket, watch.key, **conditions)

    def _bucket_exists(self, bucket: str) -> bool:
        """HeadBucket once per bucket and TTL: a HEAD's 404 cannot tell a missing key from a missing bucket."""
        now = time.monotonic()
        with self._bucket_lock:
            cached = self._bucket_cache.get(bucket)
        if cached is not None and now - cached[0] < BUCKET_CHECK_TTL:
            return cached[1]
        try:
            self.client.head_bucket(Bucket=bucket)
            exists = True
        except ClientError as exc:
            # 403 means the bucket exists but we may not list it; only a 404 proves it is gone.
            exists = status_of(exc) != 404
        with self._bucket_lock:
            self._bucket_cache[bucket] = (now, exists)
        return exists


def error_result(
    watch: Watch, polled_at: datetime, started: float, state: ObjectState | None, status: int | None, msg: str
) -> PollResult:
    """A failed poll: the reason (credentials redacted), and no new state."""
    return PollResult(
        watch=watch,
        polled_at=polled_at,
        outcome="error",
        http_status=status,
        duration_ms=(time.perf_counter() - started) * 1000,
        previous=state,
        state=None,
        error=redact(msg),
    )


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


def describe_client_error(exc: ClientError) -> str:
    """An operator-facing reason for an S3 error answer."""
    status = status_of(exc)
    code = exc.response.get("Error", {}).get("Code", "") or str(status)
    if status == 403:
        return (
            "access denied (403): the credentials may not s3:GetObject this key; on AWS a missing key "
            "also answers 403 to a caller without s3:ListBucket on the bucket"
        )
    if status == 301 or code == "PermanentRedirect":
        return "wrong region (301): the bucket lives in another region; set [s3] region"
    if status == 400:
        return f"bad request (400 {code}): check [s3] region, addressing_style and endpoint_url"
    if code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "503") or status == 503:
        return f"throttled or unavailable ({status} {code}) after retries; polling goes on at the next interval"
    return f"S3 answered {status} {code} after retries"


def describe_transport_error(exc: BaseException) -> str:
    """An operator-facing reason for a failure below HTTP (network, timeout, credentials)."""
    if isinstance(exc, ReadTimeoutError):
        return "read timeout: the endpoint accepted the connection but did not answer in [s3] read_timeout"
    if isinstance(exc, ConnectTimeoutError):
        return "connect timeout: the endpoint did not accept a connection in [s3] connect_timeout"
    if isinstance(exc, SSLError):
        return f"TLS certificate verification failed ({exc}); for a private CA set AWS_CA_BUNDLE to its certificate"
    if isinstance(exc, EndpointConnectionError):
        return "cannot connect to the endpoint (connection refused or DNS failure); check [s3] endpoint_url"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an instance role"
    return f"{type(exc).__name__}: {exc}"
