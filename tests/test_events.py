"""The typed event stream (issue #12): CloudEvents 1.0 against the shipped JSON Schema, S3 Event
Notification records read by a handler written from AWS's documented record format, the legacy shape,
the idempotency id; then real deliveries (local HTTP servers, a real command, moto) and the CLI's JSONL."""

from __future__ import annotations

import http.server
import json
import sys
import urllib.parse
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import ConfigFile, run_cli, serving
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.config import EVENTS, OBJECT_EVENTS, NotifySettings
from poller.events import cloudevent, event_id, legacy_payload, render, s3_event, s3_sequencer, unified_row
from poller.signals import WATCH_EVENTS

NOW = datetime(2026, 11, 24, 10, 0, 4, 512301, tzinfo=UTC)
ROOT = Path(__file__).parent.parent

SCHEMA = json.loads(resources.files("poller").joinpath("event.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

# Detail objects as events-spec.md and poller.signals write them.
DETAILS: dict[str, dict[str, Any]] = {
    "stale": {"deadline": "2026-11-24T07:30:00.000Z", "last_change_at": None, "rule": "expect_change_by 0 7 * * *"},
    "fresh": {"stale_deadline": "2026-11-24T07:30:00.000Z", "stale_at": "2026-11-24T07:30:01.000Z"},
    "settled": {
        "keys": ["drops/part-0001.parquet", "drops/_SUCCESS"],
        "keys_truncated": False,
        "changes": 3,
        "burst_started_at": "2026-11-24T09:50:00.000Z",
        "last_change_at": "2026-11-24T09:54:00.000Z",
        "settle_seconds": 300.0,
    },
    "failing": {"consecutive_errors": 3, "since": "2026-11-24T09:58:00.000Z", "http_status": 503},
    "recovered": {"since": "2026-11-24T09:58:00.000Z", "signals": ["failing"]},
    "access_lost": {"since": "2026-11-24T10:00:00.000Z", "http_status": 403},
}


def object_row(event: str = "modified", **kw: Any) -> dict[str, Any]:
    """A unified event row for an ETag-history event, as Store.due_notifications returns it."""
    row = {
        "history_id": 7,
        "event_id": None,
        "event": event,
        "watch": "app-config",
        "bucket": "my-bucket",
        "key": "config/app.json",
        "detected_at": NOW,
        "etag": None if event == "deleted" else '"1f0e3dad99908345f7439f8ffabdffc4"',
        "previous_etag": None if event == "first_seen" else '"9b2cf535f27731c974343645a3985328"',
        "last_modified": None if event == "deleted" else datetime(2026, 11, 24, 10, 0, 3, tzinfo=UTC),
        "version_id": None,
        "size": None if event == "deleted" else 1234,
        "seq": 2,
        "error": None,
        "detail": None,
        "dedup": None,
    }
    return {**row, **kw}


def watch_row(event: str, **kw: Any) -> dict[str, Any]:
    """A unified event row for a watch signal."""
    row = {
        "history_id": None,
        "event_id": 3,
        "event": event,
        "watch": "nightly",
        "bucket": "vendor-drops",
        "key": "drops/",
        "detected_at": NOW,
        "etag": '"e1"' if event == "access_lost" else None,
        "previous_etag": None,
        "last_modified": None,
        "version_id": None,
        "size": None,
        "seq": None,
        "error": {"failing": "HTTP 503 from server", "access_lost": "HTTP 403 Forbidden"}.get(event),
        "detail": DETAILS[event],
        "dedup": "2026-11-24T09:58:00.000Z",
    }
    return {**row, **kw}


def every_kind() -> list[dict[str, Any]]:
    rows = [object_row(e) for e in OBJECT_EVENTS] + [watch_row(e) for e in WATCH_EVENTS]
    # Awkward but real values: unicode and spaces in names and keys, versioned buckets, big objects,
    # an empty prefix, multipart ETags, a first change numbered 1, a row before the seq column existed.
    rows += [
        object_row("first_seen", watch="bucket/dir with space/ä.json", key="dir with space/ä+b=c&d.json", seq=1),
        object_row("created", version_id="3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY", size=5 * 2**40, etag='"abc-12"'),
        object_row("deleted", version_id="null", previous_etag='"abc-12"'),
        object_row("modified", seq=None, history_id=None),
        watch_row("settled", key="", detail={**DETAILS["settled"], "keys": ["a"] * 1000, "keys_truncated": True}),
        watch_row("failing", detail={**DETAILS["failing"], "http_status": None}, error="timed out"),
        watch_row("recovered", detail={"since": "2026-11-24T09:58:00.000Z", "signals": ["access_lost", "failing"]}),
        watch_row("stale", detail={**DETAILS["stale"], "last_change_at": "2026-11-23T06:10:00.000Z"}),
    ]
    return rows


def schema_errors(document: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in VALIDATOR.iter_errors(document)]


# --- CloudEvents and the shipped schema ------------------------------------------------------------


def test_the_shipped_schema_is_a_valid_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    types = set(SCHEMA["properties"]["type"]["enum"])
    assert types == {f"io.poller.object.{e}" for e in OBJECT_EVENTS} | {f"io.poller.watch.{e}" for e in WATCH_EVENTS}
    assert set(EVENTS) == set(OBJECT_EVENTS) | set(WATCH_EVENTS)


@pytest.mark.parametrize("row", every_kind(), ids=lambda r: f"{r['event']}-{r['key'][:12]}")
def test_every_kind_of_event_validates_and_keeps_every_field(row: dict[str, Any]):
    ce = json.loads(json.dumps(cloudevent(row)))  # as a consumer parses it
    assert schema_errors(ce) == []
    assert ce["specversion"] == "1.0" and ce["datacontenttype"] == "application/json"
    assert ce.get("subject", "") == row["key"] == ce["data"]["key"]  # absent for a whole-bucket prefix (empty)
    assert urllib.parse.unquote(ce["source"].removeprefix("/poller/watches/")) == row["watch"] == ce["data"]["watch"]
    kind = "object" if row["event"] in OBJECT_EVENTS else "watch"
    assert ce["type"] == f"io.poller.{kind}.{row['event']}"
    assert ce["time"] == ce["data"]["detected_at"] == "2026-11-24T10:00:04.512301Z"
    data = ce["data"]
    # Lossless: every field of the row comes back.
    fields = ("bucket", "etag", "previous_etag", "version_id", "size")
    assert [data[f] for f in fields] == [row[f] for f in fields] and data["sequence"] == row["seq"]
    lm = row["last_modified"]
    assert data["last_modified"] == (None if lm is None else lm.isoformat().replace("+00:00", "Z"))
    if kind == "object":
        assert data["history_id"] == row["history_id"] and "error" not in data
    else:
        assert (data["error"], data["detail"], data["dedup"], data["watch_event_id"]) == (
            row["error"], row["detail"], row["dedup"], row["event_id"]
        )  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "where"),
    [
        (lambda ce: ce.update(type="io.poller.object.renamed"), "type"),
        (lambda ce: ce.update(type="io.poller.object.deleted"), "data"),  # data.event and etag disagree
        (lambda ce: ce.pop("id"), "id"),
        (lambda ce: ce.update(id="1"), "id"),
        (lambda ce: ce.update(time="2026-11-24 10:00:04"), "time"),
        (lambda ce: ce.update(source="poller"), "source"),
        (lambda ce: ce["data"].pop("sequence"), "data"),
        (lambda ce: ce["data"].update(size="1234"), "data"),
        (lambda ce: ce["data"].update(detail={"x": 1}), "data"),
        (lambda ce: ce.update(extra=1), "extra"),
    ],
)
def test_the_schema_refuses_what_poller_never_sends(mutate: Any, where: str):
    ce = json.loads(json.dumps(cloudevent(object_row("modified"))))
    mutate(ce)
    assert schema_errors(ce), f"a document with a wrong {where} validated"


@pytest.mark.parametrize(
    ("event", "broken"),
    [
        ("failing", {"consecutive_errors": 3}),  # since and http_status missing
        ("recovered", {"since": "2026-11-24T09:58:00.000Z", "signals": ["stale"]}),
        ("access_lost", {"since": "2026-11-24T10:00:00.000Z", "http_status": 404}),
        ("settled", {**DETAILS["settled"], "keys": ["a"] * 1001}),
    ],
)
def test_the_schema_checks_each_signals_detail(event: str, broken: dict[str, Any]):
    assert schema_errors(cloudevent(watch_row(event))) == []
    assert schema_errors(cloudevent(watch_row(event, detail=broken)))
    ce = cloudevent(watch_row(event))
    ce["data"]["sequence"] = 4  # a signal has no place in a key's ETag history
    assert schema_errors(ce)


def test_unified_row_takes_history_rows_of_any_age():
    change = {k: v for k, v in object_row("modified").items() if k not in ("seq", "error", "detail", "dedup")}
    change["time"] = change.pop("detected_at")
    row = unified_row(change)
    assert row["detected_at"] == NOW and row["seq"] is None and row["dedup"] is None
    assert schema_errors(cloudevent(row)) == []


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)  # keys are UTF-8


@settings(max_examples=200, deadline=None)
@given(
    event=st.sampled_from(OBJECT_EVENTS),
    watch=TEXT.filter(bool),
    key=TEXT,
    etag=st.one_of(st.none(), TEXT),
    version=st.one_of(st.none(), TEXT),
    size=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
    seq=st.integers(1, 2**63 - 1),
)
def test_any_names_keys_and_etags_make_valid_events(event, watch, key, etag, version, size, seq):
    row = object_row(event, watch=watch, key=key, etag=etag, version_id=version, size=size, seq=seq)
    if event == "deleted":
        row["etag"] = None
    if event == "first_seen":
        row["previous_etag"] = None
    ce = json.loads(json.dumps(cloudevent(row), ensure_ascii=False))
    assert schema_errors(ce) == []
    assert urllib.parse.unquote(ce["source"].removeprefix("/poller/watches/")) == watch
    assert ce.get("subject") == (key if key.strip() else None)  # CloudEvents: a subject is never empty
    [record] = lambda_handler(json.loads(json.dumps(s3_event({**row, "history_id": seq}))))
    assert record["key"] == key and record["sequencer"] == f"{seq:016X}"


# --- the idempotency id ---------------------------------------------------------------------------


def test_event_id_is_the_same_for_every_retry_and_every_daemon():
    first = object_row("modified")
    # Another daemon recording the same change: another row id, its own clock, keys in another order.
    other = dict(reversed(list({**first, "history_id": 9001, "detected_at": NOW + timedelta(seconds=3)}.items())))
    assert event_id(first) == event_id(dict(first)) == event_id(other)
    assert cloudevent(first)["id"] == cloudevent(other)["id"]
    assert len(event_id(first)) == 32 and int(event_id(first), 16) >= 0
    # Anything that makes it another change makes another id.
    changed = [
        {"seq": 3}, {"etag": '"other"'}, {"version_id": "v2"}, {"event": "created"}, {"key": "config/other.json"},
        {"watch": "app-config-2"},
    ]  # fmt: skip
    ids = {event_id({**first, **c}) for c in changed} | {event_id(first)}
    assert len(ids) == len(changed) + 1
    # The same ETag coming back later is a later step of the key's history: another event.
    assert event_id(object_row("modified", seq=5)) != event_id(object_row("modified", seq=7))


def test_watch_event_id_is_its_dedup():
    failing = watch_row("failing")
    assert event_id(failing) == event_id({**failing, "event_id": 99, "detected_at": NOW + timedelta(minutes=1)})
    assert event_id(failing) != event_id({**failing, "dedup": "2026-11-25T09:58:00.000Z"})
    assert event_id(failing) != event_id({**failing, "event": "access_lost"})


# --- S3 Event Notification records ----------------------------------------------------------------


def lambda_handler(event: dict[str, Any], context: Any = None) -> list[dict[str, Any]]:
    """A handler written from AWS's documented S3 event message structure (eventVersion 2.x), the way
    Lambda examples read it: not from poller's code."""
    seen = []
    for record in event["Records"]:
        if record["eventSource"] != "aws:s3" or not record["eventVersion"].startswith("2."):
            continue
        s3 = record["s3"]
        obj = s3["object"]
        seen.append(
            {
                "action": record["eventName"].split(":")[0],
                "bucket": s3["bucket"]["name"],
                "arn": s3["bucket"]["arn"],
                "key": urllib.parse.unquote_plus(obj["key"], encoding="utf-8"),
                "size": obj.get("size"),
                "etag": obj.get("eTag"),
                "version": obj.get("versionId"),
                "sequencer": obj.get("sequencer"),
                "time": datetime.strptime(record["eventTime"], "%Y-%m-%dT%H:%M:%S.%fZ"),
                "region": record["awsRegion"],
                "rule": s3["configurationId"],
            }
        )
    return seen


# The documented record, as a schema: every field AWS shows for a 2.1 PUT/DELETE record.
S3_RECORD_FIELDS = [
    "eventVersion", "eventSource", "awsRegion", "eventTime", "eventName", "userIdentity", "requestParameters",
    "responseElements", "s3",
]  # fmt: skip
S3_RECORD_SCHEMA = {
    "type": "object",
    "required": ["Records"],
    "properties": {
        "Records": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": S3_RECORD_FIELDS,
                "properties": {
                    "eventVersion": {"const": "2.1"},
                    "eventSource": {"const": "aws:s3"},
                    "eventTime": {"pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"},
                    "eventName": {
                        "enum": ["ObjectCreated:Put", "ObjectRemoved:Delete", "ObjectRemoved:DeleteMarkerCreated"]
                    },
                    "userIdentity": {"required": ["principalId"]},
                    "requestParameters": {"required": ["sourceIPAddress"]},
                    "responseElements": {"required": ["x-amz-request-id", "x-amz-id-2"]},
                    "s3": {
                        "required": ["s3SchemaVersion", "configurationId", "bucket", "object"],
                        "properties": {
                            "s3SchemaVersion": {"const": "1.0"},
                            "bucket": {"required": ["name", "ownerIdentity", "arn"]},
                            "object": {
                                "required": ["key", "sequencer"],
                                "properties": {
                                    "key": {"type": "string"},
                                    "size": {"type": "integer"},
                                    "eTag": {"type": "string", "pattern": '^[^"]*$'},
                                    "sequencer": {"type": "string", "pattern": "^[0-9A-F]+$"},
                                },
                            },
                        },
                    },
                },
            },
        }
    },
}


@pytest.mark.parametrize(
    "key", ["config/app.json", "dir with space/red flower.jpg", "a+b=c&d%e?.txt", "données/été 2026/ø.csv", "x/"]
)
def test_s3_records_work_with_a_handler_written_from_aws_docs(key: str):
    created = s3_event(
        object_row("first_seen", key=key, etag='"abc-3"', seq=1, history_id=1), configuration_id="lake", region="eu"
    )
    deleted = s3_event(
        object_row("deleted", key=key, version_id="dm1", seq=2, history_id=2), configuration_id="lake", region="eu"
    )
    for doc in (created, deleted):
        jsonschema.validate(json.loads(json.dumps(doc)), S3_RECORD_SCHEMA)
    [put] = lambda_handler(json.loads(json.dumps(created)))
    [gone] = lambda_handler(json.loads(json.dumps(deleted)))
    assert put == {
        "action": "ObjectCreated",
        "bucket": "my-bucket",
        "arn": "arn:aws:s3:::my-bucket",
        "key": key,
        "size": 1234,
        "etag": "abc-3",
        "version": None,
        "sequencer": "0000000000000001",
        "time": datetime(2026, 11, 24, 10, 0, 4, 512000),
        "region": "eu",
        "rule": "lake",
    }
    assert (gone["action"], gone["key"], gone["version"], gone["size"], gone["etag"]) == (
        "ObjectRemoved", key, "dm1", None, None
    )  # fmt: skip
    assert gone["sequencer"] > put["sequencer"]
    sent = created["Records"][0]["s3"]["object"]["key"]
    assert " " not in sent and ("+" in sent) == (" " in key)  # a "+" of the key itself is %2B


def test_s3_sequencer_grows_with_seq_under_both_documented_comparisons():
    seqs = [1, 2, 9, 10, 15, 16, 255, 256, 4095, 2**32, 2**40 + 1]
    sequencers = [s3_sequencer(s) for s in seqs]
    assert sequencers == sorted(sequencers)
    width = max(map(len, sequencers))
    assert [s.ljust(width, "0") for s in sequencers] == sorted(s.ljust(width, "0") for s in sequencers)
    assert [s.rjust(width, "0") for s in sequencers] == sorted(s.rjust(width, "0") for s in sequencers)


def test_each_object_event_has_its_s3_event_name_and_signals_have_none():
    names = {e: s3_event(object_row(e))["Records"][0]["eventName"] for e in OBJECT_EVENTS}
    assert names == {
        "first_seen": "ObjectCreated:Put",
        "modified": "ObjectCreated:Put",
        "created": "ObjectCreated:Put",
        "deleted": "ObjectRemoved:Delete",
    }
    # A versioned bucket's removal left a delete marker (its version id): "Delete" would say that
    # version is gone for good (a mirroring consumer would purge it).
    marker = s3_event(object_row("deleted", version_id="dm1"))["Records"][0]
    assert (marker["eventName"], marker["s3"]["object"]["versionId"]) == ("ObjectRemoved:DeleteMarkerCreated", "dm1")
    # The sequencer follows the history row's id, which a rename of the watch (seq from 1 again) keeps growing.
    renamed = s3_event(object_row("first_seen", seq=1, history_id=900))["Records"][0]
    assert renamed["s3"]["object"]["sequencer"] == s3_sequencer(900)
    for event in WATCH_EVENTS:
        with pytest.raises(ValueError, match="object events only"):
            s3_event(watch_row(event))


def test_legacy_format_is_the_old_payload():
    row = object_row("modified")
    assert (
        render(row, "legacy")
        == legacy_payload(row)
        == {
            "id": 7,
            "event": "modified",
            "watch": "app-config",
            "bucket": "my-bucket",
            "key": "config/app.json",
            "etag": row["etag"],
            "previous_etag": row["previous_etag"],
            "last_modified": "2026-11-24T10:00:03Z",
            "version_id": None,
            "size": 1234,
            "detected_at": "2026-11-24T10:00:04.512301Z",
        }
    )


def test_sink_format_defaults():
    assert NotifySettings(type="webhook", url="http://h/").format == "cloudevents"
    assert NotifySettings(type="webhook", url="http://h/").events == list(EVENTS)
    for fmt in ("s3", "legacy"):
        assert NotifySettings(type="webhook", url="http://h/", format=fmt).events == list(OBJECT_EVENTS)
        explicit = NotifySettings(type="webhook", url="http://h/", format=fmt, events=["deleted"])
        assert explicit.events == ["deleted"]


@pytest.mark.parametrize(
    ("entry", "fragments"),
    [
        ('format = "xml"', ["notify #1 ('lake')", "field 'format'", "'cloudevents', 's3' or 'legacy'", "'xml'"]),
        ('format = "s3"\nevents = ["deleted", "settled"]', ["notify #1 ('lake')", "field 'events'", "'settled'"]),
        ('format = "legacy"\nevents = ["stale"]', ["notify #1 ('lake')", "field 'events'", 'format = "cloudevents"']),
    ],
)
def test_bad_format_config_is_exit_2_naming_sink_and_field(tmp_path: Path, entry: str, fragments: list[str]):
    path = tmp_path / "c.toml"
    path.write_text(f'[[notify]]\nname = "lake"\ntype = "webhook"\nurl = "http://h/"\n{entry}\n')
    proc = run_cli("check", "--config", str(path))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)


# --- real deliveries ------------------------------------------------------------------------------


class Hook(http.server.BaseHTTPRequestHandler):
    """Records (path, headers, body) of every POST; answers 500 to the first ``fail_first``."""

    received: list[tuple[str, dict[str, str], bytes]]
    fail_first = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), body))
        failing = len(self.received) <= self.fail_first
        self.send_response(500 if failing else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def hook(fail_first: int = 0) -> type[Hook]:
    return type("H", (Hook,), {"received": [], "fail_first": fail_first})


def test_each_format_delivered_to_a_webhook_and_a_command(config: ConfigFile, s3, bucket, tmp_path: Path):
    out = tmp_path / "command.jsonl"
    script = (
        "import json, os, sys; doc = json.load(sys.stdin); "
        f"open({str(out)!r}, 'a').write(json.dumps({{'env': {{k: v for k, v in os.environ.items() "
        "if k.startswith('POLLER_')}, 'stdin': doc}) + '\\n')"
    )
    key = "drops/red flower+1.csv"
    s3.put_object(Bucket=bucket, Key=key, Body=b"v1")
    handler = hook()
    with serving(handler) as port:
        base = f"http://127.0.0.1:{port}"
        config.write(
            [{"name": "drop", "bucket": bucket, "key": key}],
            notify=[
                {"name": "ce", "type": "webhook", "url": f"{base}/ce", "secret": "k"},
                {"name": "lake", "type": "webhook", "url": f"{base}/s3", "format": "s3"},
                {"name": "old", "type": "webhook", "url": f"{base}/legacy", "format": "legacy"},
                {"name": "cmd", "type": "command", "command": [sys.executable, "-c", script]},
            ],
            s3={"region": "eu-central-1"},
        )
        for change in (None, b"v2", "delete"):
            if change == "delete":
                s3.delete_object(Bucket=bucket, Key=key)
            elif change:
                s3.put_object(Bucket=bucket, Key=key, Body=change)
            once = run_cli("once", "--config", str(config.path))
            assert once.returncode == 0, once.stderr
    by_path: dict[str, list[tuple[dict[str, str], Any]]] = {}
    for path, headers, body in handler.received:
        by_path.setdefault(path, []).append((headers, json.loads(body)))
    assert sorted(by_path) == ["/ce", "/legacy", "/s3"] and all(len(v) == 3 for v in by_path.values())

    cloud = [body for _, body in by_path["/ce"]]
    assert [ce["type"] for ce in cloud] == [f"io.poller.object.{e}" for e in ("first_seen", "modified", "deleted")]
    for (headers, ce), raw in zip(by_path["/ce"], [b for p, _, b in handler.received if p == "/ce"], strict=True):
        assert schema_errors(ce) == [], ce
        assert headers["Content-Type"] == "application/cloudevents+json; charset=utf-8"
        assert headers["X-Poller-Delivery"] == ce["id"] and headers["X-Poller-Event"] == ce["data"]["event"]
        from poller.notify import sign

        assert headers["X-Poller-Signature"] == sign("k", raw)
    assert [ce["data"]["sequence"] for ce in cloud] == [1, 2, 3]
    assert cloud[1]["data"]["previous_etag"] == cloud[0]["data"]["etag"] and cloud[0]["subject"] == key

    records = [lambda_handler(body)[0] for _, body in by_path["/s3"]]
    for headers, body in by_path["/s3"]:
        jsonschema.validate(body, S3_RECORD_SCHEMA)
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Poller-Delivery"] == body["Records"][0]["responseElements"]["x-amz-request-id"]
    assert [(r["action"], r["key"], r["bucket"], r["region"], r["rule"]) for r in records] == [
        ("ObjectCreated", key, bucket, "eu-central-1", "lake"),
        ("ObjectCreated", key, bucket, "eu-central-1", "lake"),
        ("ObjectRemoved", key, bucket, "eu-central-1", "lake"),
    ]
    assert records[1]["etag"] == cloud[1]["data"]["etag"].strip('"') and records[1]["size"] == 2
    assert records[0]["sequencer"] < records[1]["sequencer"] < records[2]["sequencer"]
    # The same change has the same id in every format.
    assert [h["X-Poller-Delivery"] for h, _ in by_path["/s3"]] == [ce["id"] for ce in cloud]

    legacy = [(h, b) for h, b in by_path["/legacy"]]
    assert [b["event"] for _, b in legacy] == ["first_seen", "modified", "deleted"]
    assert all(h["X-Poller-Delivery"] == str(b["id"]) and isinstance(b["id"], int) for h, b in legacy)
    assert legacy[0][0]["Content-Type"] == "application/json" and legacy[1][1]["etag"] == cloud[1]["data"]["etag"]

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["stdin"] for line in lines] == cloud, "the command gets the same document as the webhook"
    for line in lines:
        env, ce = line["env"], line["stdin"]
        assert env["POLLER_EVENT_ID"] == ce["id"] and env["POLLER_TYPE"] == ce["type"]
        assert env["POLLER_KEY"] == key and env["POLLER_EVENT"] == ce["data"]["event"]


def test_a_retry_sends_the_same_document(config: ConfigFile, s3, bucket):
    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    handler = hook(fail_first=1)
    with serving(handler) as port:
        config.write(
            [{"name": "app", "bucket": bucket, "key": "k"}],
            notify=[{"name": "ce", "type": "webhook", "url": f"http://127.0.0.1:{port}/", "backoff": "1ms"}],
        )
        assert run_cli("once", "--config", str(config.path)).returncode == 0
        assert run_cli("once", "--config", str(config.path)).returncode == 0  # the retry
    [(_, h1, first), (_, h2, second)] = handler.received
    assert first == second and h1["X-Poller-Delivery"] == h2["X-Poller-Delivery"] == json.loads(first)["id"]
    assert schema_errors(json.loads(second)) == []


def test_watch_signals_are_delivered_as_cloudevents_and_s3_sinks_skip_them(config: ConfigFile, s3, bucket):
    handler = hook()
    with serving(handler) as port:
        config.write(
            [{"name": "gone", "bucket": bucket, "key": "k"}],
            notify=[
                {"name": "ce", "type": "webhook", "url": f"http://127.0.0.1:{port}/ce"},
                {"name": "lake", "type": "webhook", "url": f"http://127.0.0.1:{port}/s3", "format": "s3"},
            ],
        )
        s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
        assert run_cli("once", "--config", str(config.path)).returncode == 0
        # The endpoint goes away (a port nobody listens on): errors until alert_after (3), then failing.
        working = dict(config.sections["s3"])
        config.write(s3={"endpoint_url": "http://127.0.0.1:9", "max_attempts": 1, "connect_timeout": "1s"})
        for _ in range(3):
            assert run_cli("once", "--config", str(config.path)).returncode == 1
        config.write(s3=working)
        assert run_cli("once", "--config", str(config.path)).returncode == 0
    cloud = [json.loads(b) for p, _, b in handler.received if p == "/ce"]
    assert [ce["type"] for ce in cloud] == ["io.poller.object.first_seen", "io.poller.watch.failing",
                                            "io.poller.watch.recovered"]  # fmt: skip
    for ce in cloud:
        assert schema_errors(ce) == [], ce
    failing = cloud[1]["data"]
    assert failing["error"] and failing["detail"]["consecutive_errors"] == 3 and failing["sequence"] is None
    assert [lambda_handler(json.loads(b))[0]["action"] for p, _, b in handler.received if p == "/s3"] == [
        "ObjectCreated"
    ]


def test_history_changes_jsonl_is_the_delivered_stream(config: ConfigFile, s3, bucket):
    handler = hook()
    with serving(handler) as port:
        config.write(
            [{"name": "a b", "bucket": bucket, "key": "x y"}, {"name": "c", "bucket": bucket, "key": "z"}],
            notify=[{"name": "ce", "type": "webhook", "url": f"http://127.0.0.1:{port}/"}],
        )
        s3.put_object(Bucket=bucket, Key="x y", Body=b"1")
        s3.put_object(Bucket=bucket, Key="z", Body=b"1")
        run_cli("once", "--config", str(config.path))
        s3.put_object(Bucket=bucket, Key="x y", Body=b"2")
        s3.delete_object(Bucket=bucket, Key="z")
        run_cli("once", "--config", str(config.path))
    jsonl = run_cli("history", "--changes", "--format", "jsonl", "--config", str(config.path))
    table = run_cli("history", "--changes", "--format", "json", "--config", str(config.path))
    assert jsonl.returncode == 0 and table.returncode == 0, jsonl.stderr + table.stderr
    lines = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert len(lines) == 4
    for ce in lines:
        assert schema_errors(ce) == [], ce
    in_table = [(r["watch"], r["key"], r["event"]) for r in json.loads(table.stdout)]
    assert [(ce["data"]["watch"], ce["subject"], ce["data"]["event"]) for ce in lines] == in_table
    delivered = {json.loads(b)["id"]: json.loads(b) for _, _, b in handler.received}
    assert {ce["id"] for ce in lines} == set(delivered), "the CLI and the sinks name each event alike"
    for ce in lines:
        assert ce == delivered[ce["id"]]
    only = run_cli("history", "a b", "--changes", "--format", "jsonl", "--limit", "1", "--config", str(config.path))
    assert [json.loads(line)["data"]["event"] for line in only.stdout.splitlines()] == ["modified"]
    polls = run_cli("history", "--format", "jsonl", "--config", str(config.path))
    assert polls.returncode == 2 and "--changes" in polls.stderr
