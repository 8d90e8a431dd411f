"""The documents sinks receive for one event: CloudEvents 1.0, S3 Event Notification records, legacy.

Pure functions over the unified event row (the dict ``Store.due_notifications`` returns per outbox
row): no I/O, no clock. A row may lack the keys of newer releases (``seq``, ``event_id``, ``error``,
``detail``, ``dedup``); they read as None.

CloudEvents (structured mode, https://github.com/cloudevents/spec, version 1.0):
  ``source`` is ``/poller/watches/<watch name, percent-encoded as one path segment>``: the same on every
  daemon and across restarts, so ``source`` + ``id`` identify one change everywhere. ``type`` is
  ``io.poller.object.<event>`` for ETag-history events and ``io.poller.watch.<event>`` for watch
  signals; ``subject`` is the key (the prefix, for a prefix watch's signals). The shipped JSON Schema
  ``poller/event.schema.json`` describes every document :func:`cloudevent` builds.

S3 Event Notification (https://docs.aws.amazon.com/AmazonS3/latest/userguide/notification-content-structure.html):
  one record per document, ``eventVersion`` 2.1. ``eventSource`` is ``aws:s3`` although poller, not
  S3, saw the change: consumers written for S3 events (Lambda handlers, S3-event parsers in SDKs)
  check that field and drop records from any other source; the rest of the record says it is poller
  (``userIdentity.principalId`` "poller", ``responseElements.x-amz-request-id`` the event's id).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_plus

from poller.config import OBJECT_EVENTS
from poller.signals import loads

FORMATS = ("cloudevents", "s3", "legacy")
SPECVERSION = "1.0"
TYPE_PREFIX = "io.poller"
SOURCE_PREFIX = "/poller/watches/"
SCHEMA_FILE = "event.schema.json"  # package data next to this module
CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

# The keys of a unified event row; a row read before a schema change may lack some (None then).
ROW_KEYS = (
    "history_id", "event_id", "event", "watch", "bucket", "key", "detected_at", "etag", "previous_etag",
    "last_modified", "version_id", "size", "seq", "error", "detail", "dedup",
)  # fmt: skip


def is_object_event(event: str) -> bool:
    """True for ETag-history events (first_seen, modified, deleted, created), False for watch signals."""
    return event in OBJECT_EVENTS


def rfc3339(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a ``Z``, microseconds kept when there are any."""
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def event_type(event: str) -> str:
    """The CloudEvents ``type``: ``io.poller.object.modified``, ``io.poller.watch.stale``, ..."""
    return f"{TYPE_PREFIX}.{'object' if is_object_event(event) else 'watch'}.{event}"


def event_source(watch: str) -> str:
    """The CloudEvents ``source`` of a watch's events: a URI reference naming the watch."""
    return SOURCE_PREFIX + quote(watch, safe="")


def event_id(row: Mapping[str, Any]) -> str:
    """The idempotency id: equal for every delivery attempt, and on every daemon recording the change.

    An object event is one step of one key's history (``seq`` is unique per watch and key, enforced by
    the database); a watch signal is one (watch, event, dedup), unique in ``watch_events``."""
    event = row["event"]
    if is_object_event(event):
        parts = ["object", row["watch"], row["key"], row.get("seq"), row.get("etag"), row.get("version_id"), event]
    else:
        parts = ["watch", row["watch"], row["key"], event, row.get("dedup")]
    canonical = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def unified_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Every key of the unified row, from a row that may predate some of them (absent -> None); a
    ``poller history --changes`` row names the detection time ``time``."""
    out = {key: row.get(key) for key in ROW_KEYS}
    if out["detected_at"] is None:
        out["detected_at"] = row.get("time")
    return out


def event_data(row: Mapping[str, Any]) -> dict[str, Any]:
    """The ``data`` of a CloudEvent: every field of the row, timestamps as RFC 3339 strings."""
    event = row["event"]
    data: dict[str, Any] = {
        "watch": row["watch"],
        "bucket": row.get("bucket"),
        "key": row["key"],
        "event": event,
        "etag": row.get("etag"),
        "previous_etag": row.get("previous_etag"),
        "last_modified": rfc3339(row.get("last_modified")),
        "version_id": row.get("version_id"),
        "size": row.get("size"),
        "detected_at": rfc3339(row.get("detected_at") or row.get("time")),
        "sequence": row.get("seq"),
    }
    if is_object_event(event):
        data["history_id"] = row.get("history_id")
    else:
        data["error"] = row.get("error")
        data["detail"] = loads(row.get("detail"))  # parsed by the store; text parsed here
        data["dedup"] = row.get("dedup")
        data["watch_event_id"] = row.get("event_id")
    return data


def cloudevent(row: Mapping[str, Any]) -> dict[str, Any]:
    """The CloudEvents 1.0 structured-mode document for one event row."""
    detected = row.get("detected_at") or row.get("time")
    document = {
        "specversion": SPECVERSION,
        "id": event_id(row),
        "source": event_source(row["watch"]),
        "type": event_type(row["event"]),
        "subject": row["key"],
        "time": rfc3339(detected),
        "datacontenttype": JSON_CONTENT_TYPE,
        "data": event_data(row),
    }
    if not str(row["key"] or "").strip():
        # CloudEvents: a subject present is non-empty (SDKs reject "" and blanks); the data holds the key.
        del document["subject"]
    return document


def s3_key(key: str) -> str:
    """A key as S3 event records carry it: form-URL-encoded (a space is ``+``), slashes kept."""
    return quote_plus(key, safe="/")


def s3_sequencer(seq: int) -> str:
    """A hex string that grows with ``seq``; fixed width, so that S3's documented comparison (pad the
    shorter one with zeros, then compare as text) and a plain text comparison agree."""
    return f"{seq:016X}"


def _s3_time(value: datetime) -> str:
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def s3_event(row: Mapping[str, Any], *, configuration_id: str = "", region: str = "") -> dict[str, Any]:
    """An S3 Event Notification document (one record) for an object event; ``configuration_id`` is
    the sink's name, ``region`` the ``awsRegion``. Watch signals have no S3 counterpart: ValueError."""
    event = row["event"]
    if not is_object_event(event):
        raise ValueError(f"a {event!r} event has no S3 Event Notification form (object events only)")
    bucket = row.get("bucket") or ""
    removed = event == "deleted"
    obj: dict[str, Any] = {"key": s3_key(row["key"])}
    if not removed:
        # S3 sends neither size nor eTag for a removal; the eTag goes unquoted, as S3's records carry it.
        if row.get("size") is not None:
            obj["size"] = row["size"]
        if row.get("etag") is not None:
            obj["eTag"] = str(row["etag"]).strip('"')
    obj["versionId"] = row.get("version_id")
    # The history row's id: it grows with each change of a key (a change is recorded after the one
    # before it committed), also across a rename of the watch, which restarts the per-watch `seq`.
    order = row.get("history_id") if row.get("history_id") is not None else row.get("seq")
    if order is not None:
        obj["sequencer"] = s3_sequencer(int(order))
    record = {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": region,
        "eventTime": _s3_time(row.get("detected_at") or row["time"]),
        # A removal with a version id left a delete marker (versioned bucket): S3 names it so; a plain
        # "Delete" with a versionId says that version is gone for good.
        "eventName": (
            ("ObjectRemoved:DeleteMarkerCreated" if row.get("version_id") else "ObjectRemoved:Delete")
            if removed
            else "ObjectCreated:Put"
        ),
        "userIdentity": {"principalId": "poller"},
        "requestParameters": {"sourceIPAddress": ""},
        "responseElements": {"x-amz-request-id": event_id(row), "x-amz-id-2": ""},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": configuration_id,
            "bucket": {"name": bucket, "ownerIdentity": {"principalId": ""}, "arn": f"arn:aws:s3:::{bucket}"},
            "object": obj,
        },
    }
    return {"Records": [record]}


# The fields of the pre-CloudEvents document, in its order (after "id" and "event").
_LEGACY_FIELDS = (
    "watch",
    "bucket",
    "key",
    "etag",
    "previous_etag",
    "last_modified",
    "version_id",
    "size",
    "detected_at",
)


def legacy_payload(row: Mapping[str, Any]) -> dict[str, Any]:
    """The document sinks received before CloudEvents (``format = "legacy"``): object events only."""
    data = event_data(row)
    return {"id": row.get("history_id"), "event": data["event"], **{k: data[k] for k in _LEGACY_FIELDS}}


def render(row: Mapping[str, Any], fmt: str, *, sink: str = "", region: str = "") -> dict[str, Any]:
    """The document of ``fmt`` ("cloudevents", "s3" or "legacy") for one event row."""
    if fmt == "cloudevents":
        return cloudevent(row)
    if fmt == "s3":
        return s3_event(row, configuration_id=sink, region=region)
    if fmt == "legacy":
        return legacy_payload(row)
    raise ValueError(f"unknown event format {fmt!r}; choose from {', '.join(FORMATS)}")


def content_type(fmt: str) -> str:
    """The webhook Content-Type of a format: CloudEvents' own media type for structured mode."""
    return CLOUDEVENTS_CONTENT_TYPE if fmt == "cloudevents" else JSON_CONTENT_TYPE
