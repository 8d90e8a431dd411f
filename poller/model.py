"""The plain data every stage shares: watches, answers, object states and poll results.

Kept apart so that the probe, the lean HEAD path, the listing and the store import these
types from one place and the arrows between them run one way.
"""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal, NamedTuple, TypedDict

Outcome = Literal["unchanged", "modified", "missing", "error"]
Event = Literal["first_seen", "modified", "deleted", "created"]
Conditional = Literal["both", "etag", "timestamp"]
Payer = Literal["requester"]
# A prefix watch's (include, exclude) globs.
Filters = tuple[tuple[str, ...], tuple[str, ...]]


class RequestParams(TypedDict, total=False):
    """A watch's options as boto3 parameters; HeadObject and ListObjectsV2 take both."""

    RequestPayer: Payer
    ExpectedBucketOwner: str


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
    # Read on a kept-alive connection: a peer that answered an earlier request twice may have sent
    # this for that one (no client can tell in time), so a change it shows is asked again (probe.py).
    reused: bool = False


# What a poll is sent to (a change of any of these re-points a watch on reload), read the same way
# from a Watch and from a WatchSpec.
target_of: Callable[[object], tuple[object, ...]] = operator.attrgetter(
    "bucket", "key", "prefix", "include", "exclude", "max_keys", "request_payer", "expected_bucket_owner"
)
# The object (or prefix) itself, part of the target: a change of these drops the watch's stored state.
object_of: Callable[[object], tuple[object, ...]] = operator.attrgetter("bucket", "key", "prefix")
# What an object never has: an empty entity-tag (rclone sends one on a HEAD racing a DELETE).
EMPTY_ETAGS = frozenset({'""', 'W/""'})


class Watch(NamedTuple):
    """The identity and target of one watch, as the scheduler and store know it.

    A named tuple, not a frozen dataclass: as immutable, and built in a quarter of the time (a
    frozen dataclass sets each field through object.__setattr__), which a million watches feel.
    """

    id: int
    name: str
    bucket: str
    key: str  # the object key, or the prefix of a prefix watch
    prefix: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_keys: int = 100_000
    request_payer: Payer | None = None  # this account pays for a requester-pays bucket
    expected_bucket_owner: str | None = None  # the 12-digit account id that must own the bucket
    # Its schedule, as configured: the daemon keeps no other record of a watch (a million of them).
    interval_seconds: float | None = None
    cron: str | None = None

    @property
    def target(self) -> tuple[object, ...]:
        return target_of(self)

    @property
    def schedule(self) -> tuple[float | None, str | None]:
        return (self.interval_seconds, self.cron)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}" + ("*" if self.prefix else "")

    @property
    def request_params(self) -> RequestParams:
        """The watch's options as boto3 parameters of HeadObject and ListObjectsV2."""
        params: RequestParams = {}
        if self.request_payer is not None:
            params["RequestPayer"] = self.request_payer
        if self.expected_bucket_owner is not None:
            params["ExpectedBucketOwner"] = self.expected_bucket_owner
        return params


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
    # Prefix watches: every (include, exclude) its list passes have used, this one's included.
    filters: tuple[Filters, ...] | None = None


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One key's new state after a list pass; ``event`` is None for a silent refresh (same ETag)."""

    key: str
    event: Event | None
    previous: ObjectState | None
    state: ObjectState


@dataclass(frozen=True, slots=True)
class PrefixState:
    """What is committed for a prefix watch: whether it was ever listed, every key's state, and every
    (include, exclude) its list passes used since it took this prefix (None: not known, passes of a
    release before they were stored)."""

    listed: bool = False
    objects: dict[str, ObjectState] = field(default_factory=dict)
    filters: tuple[Filters, ...] | None = None

    def apply(self, changes: tuple[KeyChange, ...], filters: tuple[Filters, ...] | None) -> PrefixState:
        """The state after a pass's ``changes`` and ``filters`` were committed."""
        objects = dict(self.objects)
        objects.update((c.key, c.state) for c in changes)
        return PrefixState(True, objects, filters)


def canonical_etag(etag: str | None) -> str | None:
    """An ETag in the quoted form HEAD answers with (some servers list it without the quotes)."""
    if etag is None:
        return None
    text = etag.strip()
    if not text:
        return None
    if text.startswith('"') or text.startswith('W/"'):
        return text
    return f'"{text}"'


class ProtocolError(ValueError):
    """An answer that breaks HTTP or S3 rules; the message names the endpoint and the fault, escaped."""


# Visible ASCII, space, tab and obs-text: what an HTTP header value may hold, so what can be sent back.
_SENDABLE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
# An entity-tag (RFC 9110): one quoted opaque tag. Unquoted ETags (some S3 clones) hold no quote at all.
_ENTITY_TAG = re.compile(r'(?:W/)?"[^"]*"|[^"]*')
_ETAG_LIST = re.compile(r'\s*,\s*(?=(?:W/)?")')


def sendable(etag: str) -> bool:
    """True when the ETag can go back in an If-None-Match header (no CR, LF, control or non-latin-1 characters)."""
    return _SENDABLE.fullmatch(etag) is not None


def _etag(value: str | None) -> str | None:
    """The one ETag in a header value, quoted; an HTTP client joins repeated headers with ", " (equal ones agree)."""
    if not value:
        return None
    if not sendable(value):
        raise ProtocolError(f"the server sent an ETag with control characters: {value!r}")
    if "," in value and '"' not in value:
        # Unquoted ETags repeated, as botocore joins them ("abc, abc"); the lean client compares them.
        bare = {tag.strip() for tag in value.split(",")}
        if len(bare) != 1:
            raise ProtocolError(f"the server sent conflicting ETag headers: {value!r}")
        value = bare.pop()
    if _ENTITY_TAG.fullmatch(value) is None:
        tags = set(_ETAG_LIST.split(value))
        if len(tags) != 1 or _ENTITY_TAG.fullmatch(next(iter(tags))) is None:
            raise ProtocolError(f"the server sent conflicting or malformed ETag headers: {value!r}")
        value = tags.pop()
    if value in EMPTY_ETAGS:
        # An object always has an ETag; rclone sends this on a HEAD racing a DELETE. Stored, it would
        # be an invented `modified` (then a `deleted`): an error now, the next poll sees the truth.
        raise ProtocolError('the server answered with an empty ETag (""): not recorded, polled again next time')
    # Quoted, as the listing and migration 0005 store it: one spelling per ETag, whatever the server sends.
    return canonical_etag(value)


def answer_from_headers(status: int, headers: dict[str, str], *, reused: bool = False) -> Answer:
    """Build an Answer from an HTTP status and lower-cased response headers; a bad ETag raises ProtocolError."""
    size = headers.get("content-length")
    date, modified = headers.get("date"), headers.get("last-modified")
    if date is not None and len(date) > 29:  # an IMF-fixdate is 29 characters: maybe several, joined
        dates = _joined_dates(date)
        if dates is not None:  # two different Dates (a proxy's and the server's): trust neither
            date = dates[0] if len(set(dates)) == 1 else None
    if modified is not None and len(modified) > 29 and status in (200, 304):
        stamps = _joined_dates(modified)
        if stamps is not None:
            if len(set(stamps)) != 1:
                raise ProtocolError(f"the server sent conflicting Last-Modified headers: {modified!r}")
            modified = stamps[0]
    return Answer(
        status=status,
        # Read only where it describes the object: an empty or odd ETag on a 404 would otherwise make
        # every poll of a deleted object an error, and the deletion would never be recorded.
        etag=_etag(headers.get("etag")) if status in (200, 304) else None,
        last_modified=_http_date(modified),
        server_date=_http_date(date),
        version_id=headers.get("x-amz-version-id") or None,
        size=int(size) if size and size.isascii() and size.isdigit() and status == 200 else None,
        reused=reused,
    )


_MONTHS = {
    m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)
}
# IMF-fixdate (RFC 9110), what S3 sends in Date and Last-Modified: read by slicing, two per answer.
_IMF_FIXDATE = re.compile(
    r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"\d{4} \d\d:\d\d:\d\d GMT",
    re.ASCII,
)


def _joined_dates(value: str) -> list[str] | None:
    """The IMF-fixdates of a repeated date header as an HTTP client joins them ("d1, d2"), or None."""
    if (len(value) + 2) % 31:
        return None
    parts = [value[i : i + 29] for i in range(0, len(value), 31)]
    if any(value[i + 29 : i + 31] != ", " for i in range(0, len(value) - 29, 31)):
        return None
    return parts if all(_IMF_FIXDATE.fullmatch(part) for part in parts) else None


# Cached: every answer in a second has the same Date, objects written together share a Last-Modified,
# and a datetime is immutable. Each stored state then points at a shared one (48 bytes a watch less
# at a million watches) and most answers skip the parse.
@functools.lru_cache(maxsize=4096)
def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    if _IMF_FIXDATE.fullmatch(value) is not None:
        try:
            return datetime(
                int(value[12:16]),
                _MONTHS[value[8:11]],
                int(value[5:7]),
                int(value[17:19]),
                int(value[20:22]),
                int(value[23:25]),
                tzinfo=UTC,
            )
        except ValueError:
            pass  # an impossible date (31 Feb, second 60): the general parser decides
    try:
        parsed = parsedate_to_datetime(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (TypeError, ValueError, OverflowError):
        return None  # OverflowError: a date near year 9999 in a zone west of UTC is past datetime's range
