"""Settings: the TOML file plus ``POLLER_<SECTION>__<KEY>`` environment overrides.

Every error is turned into a :class:`ConfigError` whose message names the file, the
watch (index and name) and the field, so the CLI can print it as one paragraph.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import parse_qsl, urlsplit

# tomli's compiled wheel parses 2.6x faster than the standard library's tomllib (its pure-Python
# twin): 9.6 s against 25 s for a million [[watch]] tables. Same parser, same errors.
import tomli as tomllib
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from poller.redact import redact
from poller.safetext import printable, redact_url
from poller.signals import WATCH_EVENTS

log = logging.getLogger(__name__)

DEFAULT_PATHS = (Path("poller.toml"), Path("/etc/poller/config.toml"))
MAX_KEY_BYTES = 1024
MAX_DURATION_SECONDS = 366 * 86400

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
# A `[[watch]]` table header on a line of its own, and a line opening any other header (or whatever
# else starts with '[', which is then treated as one): see without_watches().
_AFTER_FIRST_BRACKET = r"\[[ \t]*watch[ \t]*\]\][ \t]*(?:#[^\n]*)?\r?$"  # of `[[watch]]  # comment`
_WATCH_HEADER = re.compile(rf"^[ \t]*\[{_AFTER_FIRST_BRACKET}", re.MULTILINE)
_OTHER_HEADER = re.compile(rf"^[ \t]*\[(?!{_AFTER_FIRST_BRACKET})", re.MULTILINE)


class ConfigError(Exception):
    """The configuration cannot be used; the message is written for the operator."""

    def __init__(self, message: str) -> None:
        # A value quoted back to the operator may be a URL with credentials in it.
        super().__init__(redact(message))


_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def parse_duration(value: object) -> float:
    """Turn ``"30s"``, ``"5m"``, ``"1h30m"``, ``"1d"`` or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30s", "5m", "1h" or "1d"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _SECONDS.fullmatch(value.strip()):
        seconds = float(value)  # "60": seconds, as `interval = 60` in TOML (an environment value is text)
    elif isinstance(value, str):
        text = value.strip().lower()
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if not text or pos != len(text):
            raise ValueError(f'expected a duration such as "30s", "5m", "1h" or "1d", got {value!r}')
    else:
        raise ValueError('expected a duration such as "30s", "5m", "1h" or "1d"')
    if seconds != seconds or seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {value!r} is out of range (at most 366 days)")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds the way the config writes them (``90`` -> ``"1m30s"``)."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    out, rest = [], round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            out.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(out) or "0s"


Duration = Annotated[float, BeforeValidator(parse_duration)]


def parse_alert_after(value: object) -> int | float:
    """``3`` (consecutive errors, an int) or ``"10m"`` (how long a streak lasts, seconds as a float)."""
    if isinstance(value, bool | float):
        raise ValueError('expected a number of consecutive errors (3) or a duration ("10m"); 0 turns alerts off')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative (0 turns failure alerts off)")
        return value
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise ValueError(
            f'expected a number of consecutive errors (3) or a duration ("10m"), got {_short(value)}'
        ) from None
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero (0 turns failure alerts off)")
    return float(seconds)


AlertAfter = Annotated[int | float, BeforeValidator(parse_alert_after)]

MAX_SIZE = 10**15
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)", re.IGNORECASE)


def parse_size(value: object) -> int:
    """Turn ``"2GB"``, ``"500MiB"``, ``"1.5G"`` or a number of bytes into bytes."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as "500MB" or "2GB"')
    size: float | None = None
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a size must not be negative")
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            unit = match.group(2).lower()
            power = "_kmgt".index(unit[0]) if unit[:1] in ("k", "m", "g", "t") else 0
            size = float(match.group(1)) * (1024 if "i" in unit else 1000) ** power
    if size is None:
        raise ValueError(f'expected a size such as "500MB" or "2GB", got {_short(value)}')
    if not size <= MAX_SIZE:  # inf and NaN too
        raise ValueError(f"size {_short(value)} is out of range (at most 1 PB)")
    return int(size)


ByteSize = Annotated[int, BeforeValidator(parse_size)]


def _positive(name: str, value: float) -> float:
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Settings(_Section):
    region: str = "us-east-1"
    endpoint_url: str = ""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    profile: str = ""
    # "auto": the headers calibration finds sound on the server (poller.calibrate); others are overrides.
    conditional: Literal["auto", "both", "etag", "timestamp"] = "auto"
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 10.0
    max_attempts: int = Field(default=3, ge=1, le=20)
    # "lean": HeadObject signed and sent by poller.lean (about 5x less CPU), boto3 for everything else.
    http_client: Literal["lean", "boto3"] = "lean"
    # False: accept any bucket name boto3 accepts, for S3-compatible stores with looser rules.
    strict_bucket_names: bool = True

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        _check_region(value)
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value:
            _check_endpoint_url(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> S3Settings:
        _positive("connect_timeout", self.connect_timeout)
        _positive("read_timeout", self.read_timeout)
        # The AWS config files are read here, at load, so a missing or broken profile is a config
        # error at start and a refused reload rather than a traceback from boto3 later.
        _check_aws_profile(self.profile)
        return self


def _check_region(region: str) -> None:
    """Refuse what botocore would refuse when the client is built (it must be a DNS label)."""
    from botocore.exceptions import InvalidRegionError
    from botocore.utils import validate_region_name

    if not region.strip():
        raise ValueError('region must not be empty (e.g. "us-east-1"; S3-compatible servers accept any name)')
    try:
        validate_region_name(region)
    except InvalidRegionError:
        raise ValueError(
            f"region {region!r} is not a valid region name: letters, digits and hyphens only, "
            'such as "us-east-1" or "eu-central-1"'
        ) from None


def _check_endpoint_url(url: str) -> None:
    """Parse the URL fully (scheme, host, port, IPv6 brackets) as botocore will, and refuse what it refuses."""
    from urllib.parse import urlsplit

    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    hint = 'write it as "http://host:port" or "https://host" (an IPv6 address in brackets: "http://[::1]:9000")'
    shown = redact(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise ValueError(f"endpoint_url {shown!r} cannot be parsed ({exc}); {hint}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"endpoint_url {shown!r} must start with http:// or https://; {hint}")
    if not parts.hostname:
        raise ValueError(f"endpoint_url {shown!r} names no host; {hint}")
    if port == 0 or parts.netloc.endswith(":"):
        raise ValueError(f"endpoint_url {shown!r} has an empty or zero port; {hint}")
    if not (is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url)):
        raise ValueError(f"endpoint_url {shown!r} is not a valid URL for boto3 (bad host name or character); {hint}")


_CREDENTIAL_SOURCES = ("Environment", "Ec2InstanceMetadata", "EcsContainer")


def _check_aws_profile(profile: str) -> None:
    """Check, offline, that the profile (or $AWS_PROFILE) exists and its credential settings are coherent."""
    name = profile or os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or ""
    if not name:
        return  # before importing botocore: `poller status` has no use for it (half a second)
    import shlex
    import shutil

    import botocore.session
    from botocore.exceptions import BotoCoreError

    where = "profile" if profile else "$AWS_PROFILE"
    files = "the AWS config files (~/.aws/config, ~/.aws/credentials, $AWS_CONFIG_FILE, $AWS_SHARED_CREDENTIALS_FILE)"
    try:
        profiles: dict[str, dict[str, Any]] = botocore.session.Session().full_config.get("profiles", {})
    except BotoCoreError as exc:
        raise ValueError(f"cannot read {files}: {exc}") from None
    if name not in profiles:
        if name == "default" and not profile:
            return  # botocore tolerates a missing default profile
        known = ", ".join(sorted(profiles)[:10]) or "none"
        raise ValueError(
            f"{where} {name!r} is not defined in {files} (profiles there: {known}); "
            "fix the name, add the profile, or leave profile empty to use the default credential chain"
        )
    seen: set[str] = set()
    current = name
    while True:
        entry = profiles[current]
        seen.add(current)
        process = str(entry.get("credential_process", "")).strip()
        if "credential_process" in entry:
            argv = shlex.split(process) if process else []
            if not argv or not (shutil.which(argv[0]) or os.path.isfile(argv[0])):
                raise ValueError(
                    f"AWS profile {current!r}: credential_process {process!r} names no program that exists; "
                    "fix the path in the AWS config file"
                )
        if "role_arn" not in entry:
            return
        source, sourced = entry.get("source_profile"), entry.get("credential_source")
        if source is not None and sourced is not None:
            raise ValueError(f"AWS profile {current!r}: role_arn with both source_profile and credential_source")
        if sourced is not None:
            if sourced not in _CREDENTIAL_SOURCES:
                raise ValueError(
                    f"AWS profile {current!r}: credential_source {sourced!r} is not one of "
                    + ", ".join(_CREDENTIAL_SOURCES)
                )
            return
        if source is None:
            if entry.get("web_identity_token_file"):
                return
            raise ValueError(
                f"AWS profile {current!r}: role_arn needs source_profile, credential_source or "
                "web_identity_token_file to say where the credentials for AssumeRole come from"
            )
        if source not in profiles:
            raise ValueError(f"AWS profile {current!r}: source_profile {source!r} is not defined in {files}")
        if source in seen:
            if source == current and "aws_access_key_id" in entry:
                return  # a profile may source its own static keys
            raise ValueError(f"AWS profile {current!r}: source_profile chain loops back to {source!r}")
        current = source


class DatabaseSettings(_Section):
    url: str = "sqlite:///poller.db"
    poll_retention: Duration = 30 * 86400.0
    # Every poll's exact time and duration (poll_samples); 0 keeps none. Runs keep every poll counted.
    sample_retention: Duration = 3600.0
    # Prune the oldest poll runs beyond this many bytes of rows and indexes; 0: no limit.
    max_db_size: ByteSize = 0

    @model_validator(mode="after")
    def _check(self) -> DatabaseSettings:
        _positive("poll_retention", self.poll_retention)
        if self.sample_retention < 0:
            raise ValueError("sample_retention must not be negative (0 keeps no samples)")
        if not self.url.strip():
            raise ValueError("url must not be empty")
        # At load as well as in open_engine(): a reload must not take a URL the writer cannot use.
        problem = postgres_driver_problem(self.url) or database_url_problem(self.url)
        if problem:
            raise ValueError(f"url: {problem}")
        return self


def database_url_problem(url: str) -> str | None:
    """Why SQLAlchemy would refuse ``url`` when the database is opened, or None (never quoting the URL:
    it may hold a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    expected = "expected sqlite:///PATH or postgresql://HOST:PORT/DATABASE"
    try:
        parsed = make_url(url)
        port = parsed.port  # parsed as a number on access in some versions
    except (ArgumentError, ValueError, TypeError):
        return f"cannot be read as a database URL ({expected})"
    if parsed.get_backend_name() not in ("sqlite", "postgresql", "postgres"):
        return f"the database {parsed.get_backend_name()!r} is not supported ({expected})"
    if parsed.get_backend_name() == "sqlite" and parsed.get_driver_name() not in ("pysqlite", ""):
        return f"the SQLite driver {parsed.get_driver_name()!r} is not supported (write sqlite:///PATH)"
    if parsed.get_backend_name() == "sqlite" and (parsed.database or "").startswith("file:"):
        # Its options (mode=, vfs=, cache=) would decide where the data goes; the one-writer lock needs a path.
        return "SQLite URI filenames (file:...) are not supported: write sqlite:///PATH"
    if port is not None and not 0 < port < 65536:
        return f"port {port} is out of range"
    return None


def postgres_driver_problem(url: str) -> str | None:
    """Why a PostgreSQL URL names a driver poller cannot use, or None. The writer's PostgreSQL paths
    (COPY, pipelines, the staged compare-and-set) are psycopg 3's; another driver would run code no
    test runs, in the part that records each change exactly once."""
    backend, _, driver = url.partition("://")[0].strip().lower().partition("+")
    if backend not in ("postgresql", "postgres") or driver in ("", "psycopg"):
        return None
    return (
        f"the driver {driver!r} is not supported; poller uses PostgreSQL through psycopg 3 only: write "
        "postgresql://... (or postgresql+psycopg://...) and install the driver with: pip install 'poller[postgres]'"
    )


class ScheduleSettings(_Section):
    interval: Duration = 60.0
    jitter: Duration = 0.0
    # The most polls in flight; worker threads start as the work needs them (rate x round trip).
    concurrency: int = Field(default=256, ge=1, le=1024)
    # Signal defaults for every watch (poller.signals); a watch may set its own.
    expect_change_within: Duration | None = None
    expect_change_by: str | None = None
    expect_grace: Duration | None = None
    settle: Duration | None = None
    alert_after: AlertAfter = 3

    @model_validator(mode="after")
    def _check(self) -> ScheduleSettings:
        _positive("interval", self.interval)
        if self.jitter < 0:
            raise ValueError("jitter must not be negative")
        _check_signals(self)
        return self


class _SignalFields(Protocol):
    @property
    def expect_change_within(self) -> float | None: ...
    @property
    def expect_change_by(self) -> str | None: ...
    @property
    def expect_grace(self) -> float | None: ...
    @property
    def settle(self) -> float | None: ...


def _check_signals(section: _SignalFields) -> None:
    if section.expect_change_within is not None:
        _positive("expect_change_within", section.expect_change_within)
    if section.expect_change_within is not None and section.expect_change_by is not None:
        raise ValueError("set either expect_change_within or expect_change_by, not both")
    if section.expect_change_by is not None:
        try:
            _check_cron(section.expect_change_by)
        except ValueError as exc:
            raise ValueError(f"expect_change_by: {exc}") from None
    if section.expect_grace is not None and section.expect_grace < 0:
        raise ValueError("expect_grace must not be negative")
    if section.settle is not None:
        _positive("settle", section.settle)


def _account_id(value: object) -> object:
    """An AWS account id as S3's x-amz-expected-bucket-owner takes it: exactly 12 digits, as a string."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{12}", value):
        return value
    quote = " in quotes (a bare TOML number loses leading zeros)" if isinstance(value, int) else ""
    raise ValueError(f'must be a 12-digit AWS account id such as "123456789012"{quote}, got {_short(value)}')


AccountId = Annotated[str, BeforeValidator(_account_id)]


class WatchSettings(_Section):
    name: str = ""
    bucket: str
    key: str = ""
    prefix: str | None = None  # watch every key under a prefix with ListObjectsV2 (exclusive with key)
    include: list[str] = Field(default_factory=list)  # prefix watches: globs a key must match (any)
    exclude: list[str] = Field(default_factory=list)  # prefix watches: globs that drop a key
    max_keys: int = Field(default=100_000, ge=1, le=10_000_000)  # prefix watches: refuse larger listings
    interval: Duration | None = None
    cron: str | None = None
    # Sent with every HEAD and ListObjectsV2 of this watch (signed): this account pays for a requester-pays
    # bucket; S3 refuses (403) when the bucket is not owned by this account id.
    request_payer: Literal["requester"] | None = None
    expected_bucket_owner: AccountId | None = None
    expect_change_within: Duration | None = None
    expect_change_by: str | None = None
    expect_grace: Duration | None = None
    settle: Duration | None = None
    alert_after: AlertAfter | None = None

    @model_validator(mode="after")
    def _check(self) -> WatchSettings:
        _check_signals(self)
        if not self.bucket.strip():
            raise ValueError("bucket must not be empty")
        if self.prefix is None and not self.key:
            raise ValueError("key is missing or empty: set key, or prefix to watch every key under a prefix")
        if self.prefix is not None and self.key:
            raise ValueError("set either key or prefix, not both")
        if self.prefix is None and (self.include or self.exclude):
            raise ValueError("include and exclude apply to prefix watches only")
        target = self.key if self.prefix is None else self.prefix
        for field, value in (("name", self.name), ("key" if self.prefix is None else "prefix", target)):
            if "\x00" in value:
                # PostgreSQL's text cannot hold one, and S3 keys cannot either.
                raise ValueError(f"field {field!r} contains a NUL character")
        if len(target.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise ValueError(f"key is longer than S3's limit of {MAX_KEY_BYTES} bytes")
        if self.interval is not None:
            _positive("interval", self.interval)
        if self.interval is not None and self.cron is not None:
            raise ValueError("set either interval or cron, not both")
        if self.cron is not None:
            _check_cron(self.cron)
        problem = bucket_name_problem(self.bucket, strict=False)
        if problem:
            raise ValueError(f"field 'bucket': {problem}")
        if not self.name:
            object.__setattr__(self, "name", f"{self.bucket}/{target}" + ("*" if self.prefix is not None else ""))
        return self


@dataclass(frozen=True, slots=True)
class WatchEntry:
    """One validated ``[[watch]]``: the fields of WatchSettings in a slotted record.

    A pydantic model costs ~1 KB a watch (a dict of 20 fields and a field set); a million watches
    held as models doubled the daemon's peak memory. The entries are what Settings.watch holds.
    """

    name: str
    bucket: str
    key: str = ""
    prefix: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_keys: int = 100_000
    interval: float | None = None
    cron: str | None = None
    request_payer: Literal["requester"] | None = None
    expected_bucket_owner: str | None = None
    expect_change_within: float | None = None
    expect_change_by: str | None = None
    expect_grace: float | None = None
    settle: float | None = None
    alert_after: int | float | None = None

    @classmethod
    def from_model(cls, w: WatchSettings) -> WatchEntry:
        return cls(
            w.name,
            sys.intern(w.bucket),
            w.key,
            w.prefix,
            tuple(w.include),
            tuple(w.exclude),
            w.max_keys,
            w.interval,
            w.cron,
            w.request_payer,
            w.expected_bucket_owner,
            w.expect_change_within,
            w.expect_change_by,
            w.expect_grace,
            w.settle,
            w.alert_after,
        )


class InvalidWatches(Exception):
    """Some ``[[watch]]`` entries failed validation: their errors, located in the whole file.

    Not a ValueError, so pydantic lets it through instead of folding it into one message without a location.
    """

    def __init__(self, errors: list[ErrorDetails]) -> None:
        super().__init__(f"{len(errors)} invalid watch fields")
        self.errors = errors


_PLAIN_FIELDS = frozenset(("name", "bucket", "key"))


def _plain_entry(item: object) -> WatchEntry | None:
    """The common shape (name, bucket and key, all strings) checked without pydantic, as WatchSettings would.

    None for anything else, or anything WatchSettings would refuse: the full model then decides and explains.
    """
    if type(item) is not dict or not item.keys() <= _PLAIN_FIELDS:
        return None
    name, bucket, key = item.get("name", ""), item.get("bucket"), item.get("key", "")
    if type(name) is not str or type(bucket) is not str or type(key) is not str:
        return None
    if not key or not bucket.strip() or "\x00" in name or "\x00" in key:
        return None
    if len(key) > MAX_KEY_BYTES // 4 and len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return None
    if bucket_name_problem(bucket, strict=False) is not None:
        return None
    return WatchEntry(name or f"{bucket}/{key}", sys.intern(bucket), key)


def watch_entries(value: object) -> list[WatchEntry]:
    """Validate the ``watch`` array: plain entries on the fast path, the rest by WatchSettings.

    Raise InvalidWatches with every failing entry's errors, located as ``("watch", index, field)``.
    """
    if not isinstance(value, list | tuple):
        raise ValueError("must be an array of [[watch]] tables")
    entries: list[WatchEntry] = []
    errors: list[ErrorDetails] = []
    for index, item in enumerate(value):
        if isinstance(item, WatchEntry):
            entries.append(item)
            continue
        entry = _plain_entry(item)
        if entry is None:
            try:
                entry = WatchEntry.from_model(WatchSettings.model_validate(item))
            except ValidationError as exc:
                errors += [{**e, "loc": ("watch", index, *e["loc"])} for e in exc.errors(include_url=False)]
                continue
        entries.append(entry)
    if errors:
        raise InvalidWatches(errors)
    return entries


def _check_cron(expr: str) -> None:
    from poller.crontab import trigger as cron_trigger

    try:
        trigger = cron_trigger(expr)
    except ValueError as exc:
        raise ValueError(f"cron {expr!r} is not a valid crontab expression ({exc})") from None
    if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
        raise ValueError(f"cron {expr!r} never fires (a day that no month has, such as 30 February)")


# What botocore itself accepts as a Bucket parameter (botocore.handlers.VALID_BUCKET / VALID_S3_ARN):
# anything else never reaches the wire on the boto3 path, so the lean path must not send it either.
_BOTOCORE_BUCKET = re.compile(r"^[a-zA-Z0-9.\-_]{1,255}$")
_S3_ARN = re.compile(
    r"^arn:(aws).*:(s3|s3-object-lambda):[a-z\-0-9]*:[0-9]{12}:accesspoint[/:][a-zA-Z0-9\-.]{1,63}$"
    r"|^arn:(aws).*:s3-outposts:[a-z\-0-9]+:[0-9]{12}:outpost[/:][a-zA-Z0-9\-]{1,63}[/:]accesspoint[/:]"
    r"[a-zA-Z0-9\-]{1,63}$"
)
_STRICT_BUCKET = re.compile(r"^[a-z0-9.-]+$")
_IP_LIKE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
# Names S3 reserves for things that are not general purpose buckets and cannot be HEADed by that name.
_RESERVED_SUFFIXES = {".mrap": "a Multi-Region Access Point alias (use its ARN)", "--table-s3": "an S3 table bucket"}


@functools.lru_cache(maxsize=4096)  # a million watches name a handful of buckets
def bucket_name_problem(bucket: str, *, strict: bool) -> str | None:
    """Why ``bucket`` cannot be a watch's bucket, or None.

    Always: what boto3 itself accepts (letters, digits, ``.-_``, 1-255 characters, or an access point
    ARN), so no control character, space or ``/`` ever reaches a request line. ``strict`` adds S3's
    rules for general purpose buckets. Access point aliases (``-s3alias``, ``--ol-s3``) and directory
    buckets (``--x-s3``) are accepted: HeadObject takes them where a bucket name goes.
    """
    if _S3_ARN.match(bucket):
        return None
    shown = repr(bucket) if len(bucket) <= 80 else repr(bucket[:77]) + "..."
    if not bucket.isprintable() or any(ch.isspace() for ch in bucket):
        return f"{shown} contains a control character or whitespace; bucket names never do"
    if "/" in bucket:
        return f"{shown} contains '/'; put the path in key (or prefix), the bucket name alone in bucket"
    if not _BOTOCORE_BUCKET.match(bucket):
        return f"{shown} may hold only letters, digits, '.', '-' and '_' (1 to 255 characters)"
    if not strict:
        return None
    hint = (
        " (S3's bucket naming rules; for an S3-compatible store that allows such names, "
        "set [s3] strict_bucket_names = false)"
    )
    if not 3 <= len(bucket) <= 63:
        return f"{shown} must be 3 to 63 characters long{hint}"
    if not _STRICT_BUCKET.match(bucket):
        return f"{shown} may hold only lowercase letters, digits, '.' and '-'{hint}"
    if not (bucket[0].isalnum() and bucket[-1].isalnum()):
        return f"{shown} must begin and end with a letter or digit{hint}"
    if ".." in bucket:
        return f"{shown} must not contain two adjacent periods{hint}"
    if _IP_LIKE.match(bucket):
        return f"{shown} must not be formatted as an IP address{hint}"
    for prefix in _RESERVED_PREFIXES:
        if bucket.startswith(prefix):
            return f"{shown} must not start with {prefix!r}, a prefix S3 reserves{hint}"
    for suffix, what in _RESERVED_SUFFIXES.items():
        if bucket.endswith(suffix):
            return f"{shown} ends with {suffix!r}, which names {what}{hint}"
    return None


class MetricsSettings(_Section):
    listen: str = ""  # "127.0.0.1:9464" serves Prometheus metrics; empty = off; ":9464" = 127.0.0.1:9464

    @model_validator(mode="after")
    def _check(self) -> MetricsSettings:
        if self.listen:
            _, sep, port = self.listen.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"listen must be HOST:PORT such as 127.0.0.1:9464, got {self.listen!r}")
        return self


class ClusterSettings(_Section):
    """Several daemons on one PostgreSQL database (ignored on SQLite, where one daemon runs)."""

    shards: int = Field(default=64, ge=1, le=4096)  # every daemon on a database must use the same number
    lease: Duration = 15.0  # a dead daemon's watches move to the others after this (+ one heartbeat)
    heartbeat: Duration = 3.0

    @model_validator(mode="after")
    def _check(self) -> ClusterSettings:
        _positive("lease", self.lease)
        _positive("heartbeat", self.heartbeat)
        if self.heartbeat * 2 > self.lease:
            raise ValueError(
                f"heartbeat ({format_duration(self.heartbeat)}) must be at most half of lease "
                f"({format_duration(self.lease)}), so a lease is renewed at least twice before it expires"
            )
        return self


OBJECT_EVENTS = ("first_seen", "modified", "deleted", "created")
EVENTS = OBJECT_EVENTS + WATCH_EVENTS
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def webhook_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a webhook URL, or None; the message never quotes the path or query."""
    if not url:
        return 'a webhook sink needs url = "https://host/path"'
    if any(ord(ch) <= 0x20 or ord(ch) == 0x7F or not ch.isprintable() for ch in url):
        return "contains a space or a control character; percent-encode it (a space is %20)"
    if not url.isascii():
        return (
            "contains non-ASCII characters; percent-encode them in the path and query, and write an "
            "international host name in its xn-- form"
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        return "is not a valid URL (an IPv6 address goes in brackets: http://[::1]:8080/...)"
    if parts.scheme not in ("http", "https"):
        return "must start with http:// or https://"
    netloc = parts.netloc.rpartition("@")[2]
    if not netloc:
        return "names no host (expected http(s)://host[:port]/path)"
    if netloc.startswith("["):
        host = netloc[1 : netloc.find("]")] if "]" in netloc else ""
        try:
            ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return "has an invalid IPv6 address between [ and ]"
    else:
        host = netloc.rpartition(":")[0] if ":" in netloc else netloc
        if ":" in host:
            return "has an IPv6 address without brackets; write it as http://[::1]:8080/..."
        if not _HOSTNAME.match(host):
            return "has an invalid host name"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or netloc.endswith(":"):
        return "has an invalid port (expected a number from 1 to 65535)"
    return None


class NotifySettings(_Section):
    """One notification sink: a command (argv, no shell) or a webhook (HTTP POST of JSON)."""

    name: str = ""
    type: Literal["command", "webhook"]
    command: list[str] = Field(default_factory=list)
    url: str = ""
    secret: str = ""  # HMAC-SHA256 key for webhooks; never logged or stored
    env: dict[str, str] = Field(default_factory=dict)  # command sinks: variables added to the allow-listed environment
    timeout: Duration = 10.0
    watches: list[str] = Field(default_factory=lambda: ["*"])
    events: list[str] = Field(default_factory=lambda: list(EVENTS))  # "s3" and "legacy": OBJECT_EVENTS
    backoff: Duration = 5.0  # first retry delay; doubles per attempt, capped at one hour
    max_age: Duration = 86400.0  # give up (status "failed") when undelivered for this long
    # The document sent (poller.events): CloudEvents 1.0, S3 Event Notification records, or the old shape.
    format: Literal["cloudevents", "s3", "legacy"] = "cloudevents"
    # The "s3" format's awsRegion: [s3] region, set by Settings (not a key of its own).
    _region: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _check(self) -> NotifySettings:
        if "\x00" in self.name:
            raise ValueError("field 'name' contains a NUL character")
        _positive("timeout", self.timeout)
        _positive("backoff", self.backoff)
        _positive("max_age", self.max_age)
        if self.type == "command" and (not self.command or not self.command[0]):
            raise ValueError('a command sink needs command = ["program", "arg", ...]')
        if self.type == "webhook":
            problem = webhook_url_problem(self.url)
            if problem:
                shown = f" ({redact_url(self.url)})" if self.url and problem.startswith("has") else ""
                raise ValueError(f"field 'url'{shown}: {problem}")
        if self.env and self.type != "command":
            raise ValueError("field 'env': applies to command sinks only")
        for name, value in self.env.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"field 'env': {printable(name)!r} is not a valid environment variable name")
            if name.upper().startswith("POLLER_"):
                raise ValueError(f"field 'env': {name!r}: POLLER_* variables are set by poller for each event")
            if "\0" in value:
                raise ValueError(f"field 'env': the value of {name!r} contains a NUL character")
        unknown = [e for e in self.events if e not in EVENTS]
        if unknown:
            raise ValueError(f"events: unknown event {unknown[0]!r}; choose from {', '.join(EVENTS)}")
        if self.format in ("s3", "legacy"):
            if "events" not in self.model_fields_set:
                object.__setattr__(self, "events", list(OBJECT_EVENTS))
            signals = [e for e in self.events if e not in OBJECT_EVENTS]
            if signals:
                raise ValueError(
                    f"field 'events': {signals[0]!r} is a watch event, which format = {self.format!r} cannot carry "
                    f'(object events only: {", ".join(OBJECT_EVENTS)}); use format = "cloudevents" for watch events'
                )
        if not self.watches:
            raise ValueError('watches must name at least one glob (default ["*"])')
        return self


class Settings(BaseSettings):
    """The whole configuration; the TOML data is passed in, environment variables override it."""

    model_config = SettingsConfigDict(
        env_prefix="POLLER_", env_nested_delimiter="__", extra="forbid", frozen=True, case_sensitive=False
    )

    s3: S3Settings = S3Settings()
    database: DatabaseSettings = DatabaseSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    metrics: MetricsSettings = MetricsSettings()
    cluster: ClusterSettings = ClusterSettings()
    watch: Annotated[list[WatchEntry], PlainValidator(watch_entries)] = Field(default_factory=list)
    notify: list[NotifySettings] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first so that it overrides the TOML data handed in as init kwargs.
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _name_sinks(self) -> Settings:
        seen: set[str] = set()
        for index, sink in enumerate(self.notify):
            if not sink.name:
                if len(self.notify) > 1:
                    # Queued events are matched to their sink by name: a name by position would hand
                    # them to another sink's URL (and secret) after a reorder or a removal.
                    raise ValueError(
                        f"notify #{index + 1} ({sink.type}): field 'name': required when there are several "
                        "[[notify]] tables (queued events find their sink by name; a default by position would "
                        "send them to another sink after the tables are reordered or one is removed). To keep "
                        "events already queued, name each as it was called: its type and position, such as "
                        f"{sink.type}-{index + 1}"
                    )
                object.__setattr__(sink, "name", f"{sink.type}-{index + 1}")
            sink._region = self.s3.region
            if sink.name in seen:
                raise ValueError(f"notify #{index + 1} ({sink.name!r}): field 'name': duplicate sink name")
            seen.add(sink.name)
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        seen: dict[str, int] = {}
        for index, watch in enumerate(self.watch):
            if watch.name in seen:
                raise ValueError(
                    f"watch #{index + 1} ({watch.name!r}): field 'name': duplicate name, "
                    f"already used by watch #{seen[watch.name] + 1}; names must be unique"
                )
            seen[watch.name] = index
            if watch.interval is None and watch.cron is None and self.schedule.jitter >= self.schedule.interval:
                raise ValueError("[schedule] field 'jitter': must be shorter than the interval")
            if watch.interval is not None and self.schedule.jitter >= watch.interval:
                raise ValueError(
                    f"watch #{index + 1} ({watch.name!r}): field 'interval': must be longer than "
                    f"[schedule] jitter ({format_duration(self.schedule.jitter)})"
                )
        return self

    @model_validator(mode="after")
    def _strict_bucket_names(self) -> Settings:
        if not self.s3.strict_bucket_names:
            return self
        for index, watch in enumerate(self.watch):
            problem = bucket_name_problem(watch.bucket, strict=True)
            if problem:
                raise ValueError(f"watch #{index + 1} ({watch.name!r}): field 'bucket': {problem}")
        return self


def find_config(explicit: str | os.PathLike[str] | None) -> Path:
    """Pick the config file: ``--config``, ``$POLLER_CONFIG``, ``./poller.toml``, ``/etc/poller/config.toml``."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("POLLER_CONFIG")
    if env:
        return Path(env)
    for candidate in DEFAULT_PATHS:
        if candidate.exists():
            return candidate
    raise ConfigError(
        "No configuration file found: looked for ./poller.toml and /etc/poller/config.toml. "
        "Pass --config PATH or set POLLER_CONFIG (config.example.toml shows every key)."
    )


def load_settings(path: Path, *, watches: bool = True) -> Settings:
    """Read, check the permissions of, parse and validate the config file (at start and on every reload).

    Raise ConfigError with an operator-facing message; warn when a file others can read holds a secret.
    ``watches=False`` (the commands that only read the database): the watch list is neither parsed,
    where that can be told safely, nor checked, and ``settings.watch`` is empty.
    """
    try:
        with path.open("rb") as handle:
            # The mode of the file actually read, not of whatever the name points at a moment later.
            mode = os.fstat(handle.fileno()).st_mode
            raw = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found. Pass --config PATH or set POLLER_CONFIG.") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror}).") from None
    check_permissions(path, mode)
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")  # a byte order mark some editors write
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: the file is not valid UTF-8 (TOML files must be UTF-8).") from None
    data = _parse_without_watches(text) if not watches else None
    if data is None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: TOML syntax error: {exc}.") from None
        except RecursionError:  # tomli's parser recurses once per nesting level
            raise ConfigError(f"{path}: TOML syntax error: arrays or tables nested too deep.") from None
    if not watches:
        data.pop("watch", None)
    if mode & stat.S_IROTH:
        secrets = find_secrets(data, text)
        if secrets:
            log.warning(
                "%s holds %s and is readable by every user on this machine (mode %s); run `chmod 600 %s` "
                "(or `chmod 640` with the daemon's group as the file's group: only others matter), or better, "
                "keep credentials in the AWS credential chain or the environment",
                path,
                _join(secrets),
                _mode(mode),
                path,
            )
    del raw, text  # a million watches: 150 MB the validation need not carry
    return settings_from_mapping(data, source=str(path))


def without_watches(text: str) -> str | None:
    """The config text before its first `[[watch]]` header, if all that follows is `[[watch]]` tables
    (the usual layout: settings first, then the list); None when that cannot be told from the lines.

    Parsing 100,000 watches takes a second or more: `poller status` and `history` need none of them.
    A line `[[watch]]` is a header or sits in a multi-line string; in a string, the text before it
    ends inside that string and does not parse, and the caller parses the whole file. After it, any
    line starting with '[' that is not such a header (another table, an array's continuation, a
    string's content) makes the answer None, so no setting after the list is ever dropped.
    """
    first = _WATCH_HEADER.search(text)
    if first is None or _OTHER_HEADER.search(text, first.end()) is not None:
        return None
    return text[: first.start()]


def _parse_without_watches(text: str) -> dict[str, Any] | None:
    """The TOML data of everything but the watch list, or None to parse the whole file instead."""
    head = without_watches(text)
    if head is None:
        return None
    try:
        return tomllib.loads(head)
    except (tomllib.TOMLDecodeError, RecursionError):
        return None  # cut inside a multi-line string, or a syntax error: the whole file says which


def _mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def _join(items: list[str]) -> str:
    unique = list(dict.fromkeys(items))
    shown = ", ".join(unique[:4])
    return shown + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")


def check_permissions(path: Path, mode: int) -> None:
    """Refuse a config file others may write, or one in a directory where others may replace it.

    Whoever can change the config can run any command as the daemon (a [[notify]] command sink) and
    point it at another database or endpoint. The file's owner is trusted; its group and everyone
    else must not be able to write it. A directory writable by every user without the sticky bit
    lets anyone rename another file over it. A group-writable directory is allowed: with a umask of
    002 every directory is one, and the group there is usually the user's own.
    """
    if not stat.S_ISREG(mode):
        return  # a pipe (`--config <(...)`) or a device: nobody else can rewrite what was read
    writers = [who for who, bit in (("its group", stat.S_IWGRP), ("all users", stat.S_IWOTH)) if mode & bit]
    if writers:
        raise ConfigError(
            f"{path}: the configuration file is writable by {' and '.join(writers)} (mode {_mode(mode)}); "
            "whoever can write it can run commands as the daemon through a [[notify]] command sink. "
            f"Run `chmod go-w {path}` (0600, or 0640 with the daemon's group)."
        )
    directory = path.parent
    try:
        dir_mode = directory.stat().st_mode
    except OSError:
        return
    if dir_mode & stat.S_IWOTH and not dir_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{path}: its directory {directory} is writable by all users without the sticky bit "
            f"(mode {_mode(dir_mode)}), so anyone can replace the configuration file. "
            f"Run `chmod o-w {directory}` or move the file."
        )


# Key names whose non-empty string value is a credential wherever they appear (inline tables and
# quoted keys included: the TOML is parsed, not grepped).
_SECRET_KEY = re.compile(
    r"(^|_)(secret|password|passwd|token|api_?key|private_?key|credentials?|aws_access_key_id)(_|$)", re.IGNORECASE
)
_TOKEN_PARAM = re.compile(
    r"(^|[_-])(token|secret|sig|signature|password|passwd|pass|pwd|key|apikey|auth|code|credential)s?($|[_-])",
    re.IGNORECASE,
)


def find_secrets(data: Mapping[str, Any], text: str = "") -> list[str]:
    """Where the parsed config holds a credential: a description per place, never the value.

    Looks at notify secrets, any key named like a secret or an AWS credential, passwords in URLs
    (``[s3] endpoint_url``, ``[database] url``), userinfo and token-like query parameters in HTTP
    URLs; and at full-line comments that parse as TOML (a commented-out credential is still readable).
    """
    hits: list[tuple[str, tuple[str | int, ...]]] = []
    _scan(_without_plain_watch_list(data, text), (), "", hits)
    found = [f"{kind} ({_label(where, data)})" for kind, where in hits]
    if "#" in text:
        number, counted = 1, 0
        for comment in _COMMENT_LINE.finditer(text):
            number += text.count("\n", counted, comment.start())
            counted = comment.start()
            body = comment.group().strip()
            try:
                commented = tomllib.loads(body.lstrip("#").strip())
            except (tomllib.TOMLDecodeError, ValueError, RecursionError):
                continue
            in_comment: list[tuple[str, tuple[str | int, ...]]] = []
            _scan(commented, (), "", in_comment)
            if in_comment:
                found.append(f"a credential in a comment (line {number})")
    return found


# A whole line that is a comment (a '#' inside a multi-line string may match too: it is only parsed).
_COMMENT_LINE = re.compile(r"^[ \t]*#.*$", re.MULTILINE)
# The words of the key names _SECRET_KEY matches: a watch list whose text has none of them (nor a
# URL, nor an escape or a non-ASCII letter that could spell one) holds no secret, and a million
# watches need not be walked leaf by leaf.
_SECRET_WORDS = ("secret", "passw", "token", "apikey", "api_key", "privatekey", "private_key", "credential")


def _without_plain_watch_list(data: Mapping[str, Any], text: str) -> Mapping[str, Any]:
    """``data`` without its watch list when the list's text (after the settings, the usual layout)
    can hold no secret; else ``data`` as it is."""
    head = without_watches(text) if text and isinstance(data.get("watch"), list) else None
    if head is None or _may_hold_secret(text, len(head)):
        return data
    return {name: value for name, value in data.items() if name != "watch"}


def _may_hold_secret(text: str, start: int) -> bool:
    # In pieces: a case-insensitive regex over 80 MB took 6 s, one lower-cased copy would double it.
    step = 1 << 20
    for at in range(start, len(text), step):
        piece = text[at : at + step + 32]  # overlapping by more than a word
        if not piece.isascii() or "://" in piece or "\\" in piece:
            return True
        lowered = piece.lower()
        if any(word in lowered for word in _SECRET_WORDS):
            return True
    return False


def _scan(node: object, where: tuple[str | int, ...], key: str, hits: list[tuple[str, tuple[str | int, ...]]]) -> None:
    """Append (kind, path) for each secret-holding leaf under ``node``; ``key`` is the nearest key name
    (a list item inherits its list's). A plain recursive function: this runs over 100,000 watches."""
    if isinstance(node, dict):
        for name, value in node.items():
            if isinstance(value, dict | list):
                _scan(value, (*where, name), name, hits)
            else:
                kind = _secret_kind(name, value)
                if kind:
                    hits.append((kind, (*where, name)))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            if isinstance(value, dict | list):
                _scan(value, (*where, index), key, hits)
            else:
                kind = _secret_kind(key, value)
                if kind:
                    hits.append((kind, (*where, index)))


def _secret_kind(key: str, value: object) -> str:
    """What kind of secret a leaf holds ("a password", ...), or "" (called for every leaf: keep it cheap)."""
    if not isinstance(value, str) or not value:
        return ""
    if _secret_key(key):
        return "a credential"
    if "://" not in value:
        return ""
    try:
        parts = urlsplit(value.strip())
        password, username = parts.password, parts.username
    except ValueError:
        return ""
    if password:
        return "a password"
    if parts.scheme in ("http", "https"):
        if username:
            return "credentials in the URL"
        if any(_TOKEN_PARAM.search(name) for name, _ in parse_qsl(parts.query, keep_blank_values=True)):
            return "a token in the URL's query"
    return ""


@functools.lru_cache(maxsize=1024)
def _secret_key(key: str) -> bool:
    return _SECRET_KEY.search(key) is not None


def _label(where: tuple[str | int, ...], data: Mapping[str, Any]) -> str:
    if not where:
        return "a comment"
    head = where[0]
    if head in ("watch", "notify") and len(where) >= 2 and isinstance(where[1], int):
        entries = data.get(str(head))
        entry = entries[where[1]] if isinstance(entries, list) and where[1] < len(entries) else {}
        name = _watch_name(entry)
        rest = ".".join(str(p) for p in where[2:])
        return f"{head} #{where[1] + 1}" + (f" ({printable(name)!r})" if name else "") + (f" {rest}" if rest else "")
    if len(where) == 1:
        return printable(str(head))
    return f"[{printable(str(head))}] " + printable(".".join(str(p) for p in where[1:]))


def settings_from_mapping(data: Mapping[str, Any], source: str) -> Settings:
    """Validate already-parsed TOML data (plus environment overrides) into Settings."""
    try:
        return Settings(**dict(data))
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + describe_validation_error(exc, data)) from None
    except InvalidWatches as bad:
        # The watches' errors cut the validation short: the other sections' errors are reported too.
        errors = bad.errors
        try:
            Settings(**{**data, "watch": []})
        except ValidationError as exc:
            errors = exc.errors(include_url=False) + errors
        except ValueError:
            pass
        raise ConfigError(f"{source}: " + describe_errors(errors, data)) from None
    except ValueError as exc:  # raised by pydantic-settings while decoding environment values
        raise ConfigError(f"{source}: {exc}") from None


def describe_validation_error(exc: ValidationError, data: Mapping[str, Any]) -> str:
    """One sentence per problem, naming the section or watch (index and name) and the field."""
    return describe_errors(exc.errors(include_url=False), data)


def describe_errors(errors: list[ErrorDetails], data: Mapping[str, Any]) -> str:
    """What describe_validation_error says, for errors gathered from several validations."""
    parts = []
    for err in errors:
        loc = list(err["loc"])
        msg = str(err["msg"]).removeprefix("Value error, ")
        where = _describe_location(loc, data)
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; config.example.toml lists every key)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif (
            "input" in err
            and err["type"] not in ("value_error",)
            and not isinstance(err["input"], dict | list)
            and loc[-1:] not in (["secret"], ["url"])  # may carry tokens: never echo them
        ):
            msg = f"{msg} (got {_short(err['input'])})"
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) + "."


def _describe_location(loc: list[int | str], data: Mapping[str, Any]) -> str:
    if not loc:
        return ""
    head = loc[0]
    if head in ("watch", "notify") and len(loc) >= 2 and isinstance(loc[1], int):
        index = loc[1]
        entries = data.get(str(head))
        entry = entries[index] if isinstance(entries, list) and index < len(entries) else {}
        name = _watch_name(entry)
        field = ".".join(str(p) for p in loc[2:])
        label = f"{head} #{index + 1} ({name!r})" if name else f"{head} #{index + 1}"
        return f"{label}: field {field!r}" if field else label
    if len(loc) == 1:
        return (
            f"field {head!r}"
            if head not in ("s3", "database", "schedule", "metrics", "cluster", "watch", "notify")
            else f"[{head}]"
        )
    return f"[{head}] field {'.'.join(str(p) for p in loc[1:])!r}"


def _watch_name(entry: object) -> str:
    if not isinstance(entry, dict):
        return ""
    name = entry.get("name")
    if isinstance(name, str) and name:
        return name
    bucket, key = entry.get("bucket"), entry.get("key")
    if isinstance(bucket, str) and isinstance(key, str):
        return f"{bucket}/{key}"
    return ""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
