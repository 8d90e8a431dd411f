"""Settings: the TOML file plus ``POLLER_<SECTION>__<KEY>`` environment overrides.

Every error is turned into a :class:`ConfigError` whose message names the file, the
watch (index and name) and the field, so the CLI can print it as one paragraph.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from poller.redact import redact

DEFAULT_PATHS = (Path("poller.toml"), Path("/etc/poller/config.toml"))
MAX_KEY_BYTES = 1024
MAX_DURATION_SECONDS = 366 * 86400

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


class ConfigError(Exception):
    """The configuration cannot be used; the message is written for the operator."""

    def __init__(self, message: str) -> None:
        # A value quoted back to the operator may be a URL with credentials in it.
        super().__init__(redact(message))


def parse_duration(value: object) -> float:
    """Turn ``"30s"``, ``"5m"``, ``"1h30m"``, ``"1d"`` or a number of seconds into seconds."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "30s", "5m", "1h" or "1d"')
    if isinstance(value, int | float):
        seconds = float(value)
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
    conditional: Literal["both", "etag", "timestamp"] = "both"
    connect_timeout: Duration = 5.0
    read_timeout: Duration = 10.0
    max_attempts: int = Field(default=3, ge=1, le=20)
    # "lean": HeadObject signed and sent by poller.lean (about 5x less CPU), boto3 for everything else.
    http_client: Literal["lean", "boto3"] = "lean"

    @model_validator(mode="after")
    def _check(self) -> S3Settings:
        _positive("connect_timeout", self.connect_timeout)
        _positive("read_timeout", self.read_timeout)
        if self.endpoint_url and not re.match(r"^https?://[^/\s]+", self.endpoint_url):
            raise ValueError(
                f"endpoint_url must start with http:// or https:// and name a host, got {self.endpoint_url!r}"
            )
        return self


class DatabaseSettings(_Section):
    url: str = "sqlite:///poller.db"
    poll_retention: Duration = 30 * 86400.0

    @model_validator(mode="after")
    def _check(self) -> DatabaseSettings:
        _positive("poll_retention", self.poll_retention)
        if not self.url.strip():
            raise ValueError("url must not be empty")
        return self


class ScheduleSettings(_Section):
    interval: Duration = 60.0
    jitter: Duration = 0.0
    concurrency: int = Field(default=32, ge=1, le=1024)

    @model_validator(mode="after")
    def _check(self) -> ScheduleSettings:
        _positive("interval", self.interval)
        if self.jitter < 0:
            raise ValueError("jitter must not be negative")
        return self


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

    @model_validator(mode="after")
    def _check(self) -> WatchSettings:
        if not self.bucket.strip():
            raise ValueError("bucket must not be empty")
        if self.prefix is None and not self.key:
            raise ValueError("key is missing or empty: set key, or prefix to watch every key under a prefix")
        if self.prefix is not None and self.key:
            raise ValueError("set either key or prefix, not both")
        if self.prefix is None and (self.include or self.exclude):
            raise ValueError("include and exclude apply to prefix watches only")
        target = self.key if self.prefix is None else self.prefix
        if len(target.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise ValueError(f"key is longer than S3's limit of {MAX_KEY_BYTES} bytes")
        if self.interval is not None:
            _positive("interval", self.interval)
        if self.interval is not None and self.cron is not None:
            raise ValueError("set either interval or cron, not both")
        if self.cron is not None:
            _check_cron(self.cron)
        if not self.name:
            object.__setattr__(self, "name", f"{self.bucket}/{target}" + ("*" if self.prefix is not None else ""))
        return self


def _check_cron(expr: str) -> None:
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expr, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"cron {expr!r} is not a valid crontab expression ({exc})") from None


class MetricsSettings(_Section):
    listen: str = ""  # "127.0.0.1:9464" serves Prometheus metrics; empty = off; ":9464" = 127.0.0.1:9464

    @model_validator(mode="after")
    def _check(self) -> MetricsSettings:
        if self.listen:
            _, sep, port = self.listen.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"listen must be HOST:PORT such as 127.0.0.1:9464, got {self.listen!r}")
        return self


EVENTS = ("first_seen", "modified", "deleted", "created")


class NotifySettings(_Section):
    """One notification sink: a command (argv, no shell) or a webhook (HTTP POST of JSON)."""

    name: str = ""
    type: Literal["command", "webhook"]
    command: list[str] = Field(default_factory=list)
    url: str = ""
    secret: str = ""  # HMAC-SHA256 key for webhooks; never logged or stored
    timeout: Duration = 10.0
    watches: list[str] = Field(default_factory=lambda: ["*"])
    events: list[str] = Field(default_factory=lambda: list(EVENTS))
    backoff: Duration = 5.0  # first retry delay; doubles per attempt, capped at one hour
    max_age: Duration = 86400.0  # give up (status "failed") when undelivered for this long

    @model_validator(mode="after")
    def _check(self) -> NotifySettings:
        _positive("timeout", self.timeout)
        _positive("backoff", self.backoff)
        _positive("max_age", self.max_age)
        if self.type == "command" and (not self.command or not self.command[0]):
            raise ValueError('a command sink needs command = ["program", "arg", ...]')
        if self.type == "webhook" and not re.match(r"^https?://[^/\s]+", self.url):
            raise ValueError('a webhook sink needs url = "http(s)://host/..."')
        unknown = [e for e in self.events if e not in EVENTS]
        if unknown:
            raise ValueError(f"events: unknown event {unknown[0]!r}; choose from {', '.join(EVENTS)}")
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
    watch: list[WatchSettings] = Field(default_factory=list)
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
                object.__setattr__(sink, "name", f"{sink.type}-{index + 1}")
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


def watch_interval(settings: Settings, watch: WatchSettings) -> float | None:
    """The effective interval of a watch in seconds, or None for a cron watch."""
    if watch.cron is not None:
        return None
    return watch.interval if watch.interval is not None else settings.schedule.interval


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


def load_settings(path: Path) -> Settings:
    """Read, parse and validate the config file; raise ConfigError with an operator-facing message."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: configuration file not found. Pass --config PATH or set POLLER_CONFIG.") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror}).") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: the file is not valid UTF-8 (TOML files must be UTF-8).") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}.") from None
    return settings_from_mapping(data, source=str(path))


def settings_from_mapping(data: Mapping[str, Any], source: str) -> Settings:
    """Validate already-parsed TOML data (plus environment overrides) into Settings."""
    try:
        return Settings(**dict(data))
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + describe_validation_error(exc, data)) from None
    except ValueError as exc:  # raised by pydantic-settings while decoding environment values
        raise ConfigError(f"{source}: {exc}") from None


def describe_validation_error(exc: ValidationError, data: Mapping[str, Any]) -> str:
    """One sentence per problem, naming the section or watch (index and name) and the field."""
    parts = []
    for err in exc.errors(include_url=False):
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
            if head not in ("s3", "database", "schedule", "metrics", "watch", "notify")
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
