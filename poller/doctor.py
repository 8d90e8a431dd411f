"""`poller doctor`: measure how an endpoint answers conditional HEADs, in the daemon's own terms.

It writes a temporary object in a scratch bucket and runs on it the same five read-only HEADs the
daemon's calibration sends (``poller.calibrate``), so both reach the same verdict. It also does
what the daemon never does, because it writes: overwrites the object within one server second and
sends both headers, and on a versioned bucket deletes it to see whether the 404 names the delete
marker. Everything it wrote is deleted afterwards (all versions and markers).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from poller.calibrate import (
    NO_MATCH_ETAG,
    Inconclusive,
    Measured,
    Semantics,
    Setting,
    choose_mode,
    describe,
    measure,
    override_warning,
    since_for,
    version_id_words,
)
from poller.model import Answer
from poller.s3client import describe_transport_error, head

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SAME_SECOND_TRIES = 20
AGE_TRIES = 12  # half a second each: Last-Modified is truncated, so an object is 2 s old within 3 s


class DoctorError(Exception):
    """The endpoint could not be measured (bucket missing, access denied, unreachable)."""


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    sent: str
    expected: str
    answer: Answer

    @property
    def verdict(self) -> str:
        return "as RFC 9110" if str(self.answer.status) == self.expected else "differs"


@dataclass(frozen=True, slots=True)
class Report:
    checks: list[Check]
    versioned: bool
    recommendation: str  # the [s3] conditional value to set
    reasons: list[str]
    semantics: Semantics | None = None
    version_id_on_404: bool | None = None
    warnings: list[str] = field(default_factory=list)


def with_overwrite(sem: Semantics, combo: Answer | None, new_etag: str | None) -> Semantics:
    """Fold the same-second overwrite (both headers, old ETag) into what calibration measured."""
    if combo is None or combo.status != 304:
        return sem
    carried = combo.etag is not None and combo.etag == new_etag
    etag_on_304 = carried if sem.etag_on_304 is None else sem.etag_on_304 and carried
    return replace(sem, ims_overrides=True, etag_on_304=etag_on_304)


def recommend(calibrated: Semantics, seen: Semantics, setting: Setting) -> tuple[str, list[str], list[str]]:
    """The ``conditional`` value to set, the reasons, and warnings (pure: testable without a server).

    ``calibrated`` is what the daemon's read-only calibration sees; ``seen`` adds what only a write
    shows (a real same-second overwrite). They agree on every server measured so far.
    """
    reasons = [f"this server: {describe(seen, 'auto')}"]
    warnings = []
    daemon_mode = choose_mode("auto", calibrated)
    sound_mode = choose_mode("auto", seen)
    if seen.ims_overrides and seen.etag_on_304:
        reasons.append("a 304 to a changed object carries its new ETag, so poller's cross-check sees the change")
    if seen.precedence == "ims_ignored":
        reasons.append("If-Modified-Since is ignored: If-None-Match alone decides, the timestamp costs nothing")
    if daemon_mode == sound_mode:
        recommendation = "auto"
        reasons.append(
            f'"auto" (the default) measures this with the same read-only HEADs at start and polls this server '
            f'with "{daemon_mode}"'
        )
    else:
        recommendation = sound_mode
        reasons.append(
            f'the same-second overwrite showed what read-only calibration cannot: "auto" would pick '
            f'"{daemon_mode}", which can miss a change here; set "{sound_mode}"'
        )
    if setting != "auto":
        warning = override_warning(setting, seen)
        if warning:
            warnings.append(warning)
        else:
            reasons.append(f'your [s3] conditional = "{setting}" is sound on this server')
    return recommendation, reasons, warnings


def run_doctor(client: S3Client, bucket: str, setting: Setting = "auto") -> Report:
    """Measure the endpoint with a temporary object in ``bucket``; always deletes what it wrote."""
    key = f".poller-doctor/{uuid.uuid4().hex}"
    try:
        return _measure(client, bucket, key, setting)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise DoctorError(
            f"s3://{bucket}: the endpoint answered {code or 'an error'}; doctor needs a bucket "
            "it may write to and delete from (s3:PutObject, s3:DeleteObject, s3:GetObject)"
        ) from None
    except BotoCoreError as exc:
        raise DoctorError(f"s3://{bucket}: {describe_transport_error(exc)}") from None
    except Inconclusive as exc:
        raise DoctorError(f"s3://{bucket}: the measurement was disturbed ({exc}); run doctor again") from None
    finally:
        _clean_up(client, bucket, key)


def _clean_up(client: S3Client, bucket: str, key: str) -> None:
    """Delete the temporary object and, on a versioned bucket, every version and marker it left."""
    with contextlib.suppress(ClientError, BotoCoreError):
        client.delete_object(Bucket=bucket, Key=key)
    with contextlib.suppress(ClientError, BotoCoreError):
        listing = client.list_object_versions(Bucket=bucket, Prefix=key)
        for item in [*listing.get("Versions", []), *listing.get("DeleteMarkers", [])]:
            if item.get("Key") == key and item.get("VersionId") not in (None, "null"):
                client.delete_object(Bucket=bucket, Key=key, VersionId=item["VersionId"])


def _measure(client: S3Client, bucket: str, key: str, setting: Setting) -> Report:
    put = client.put_object(Bucket=bucket, Key=key, Body=b"poller doctor 1")
    first = head(client, bucket, key)
    if first.etag is None or first.last_modified is None:
        raise Inconclusive("the object was served without ETag or Last-Modified")
    # The daemon measures only objects at least 2 s old by the server's clock, at Last-Modified + 1 s
    # and at Last-Modified itself: wait until this one is, so doctor asks exactly what it asks.
    for _ in range(AGE_TRIES):
        if since_for(first) != first.last_modified:
            break
        time.sleep(0.5)
        first = head(client, bucket, key)
    if first.etag is None or first.last_modified is None:
        raise Inconclusive("the object was served without ETag or Last-Modified")
    since = since_for(first) or first.last_modified
    if since == first.last_modified:
        raise Inconclusive("the server's Date did not pass the object's Last-Modified by 2 s")
    other = NO_MATCH_ETAG
    lm = first.last_modified
    at = "Last-Modified + 1 s"
    checks = {
        "inm-match": Check(
            "If-None-Match, same ETag",
            f"If-None-Match: {first.etag}",
            "304",
            head(client, bucket, key, IfNoneMatch=first.etag),
        ),
        "inm-other": Check(
            "If-None-Match, other ETag",
            "If-None-Match: other",
            "200",
            head(client, bucket, key, IfNoneMatch=other),
        ),
        "inm-unquoted": Check(
            "If-None-Match, unquoted ETag",
            f"If-None-Match: {first.etag.strip(chr(34))}",
            "304",
            head(client, bucket, key, IfNoneMatch=first.etag.strip('"')),
        ),
        "ims-same": Check(
            f"If-Modified-Since = {at}",
            f"If-Modified-Since: {at}",
            "304",
            head(client, bucket, key, IfModifiedSince=since),
        ),
        "ims-future": Check(
            "If-Modified-Since in the future",
            "If-Modified-Since: +1 day",
            "304",
            head(client, bucket, key, IfModifiedSince=first.last_modified + timedelta(days=1)),
        ),
        "other-and-ims": Check(
            f"other ETag + If-Modified-Since = {at}",
            "If-None-Match: other + If-Modified-Since",
            "200",
            head(client, bucket, key, IfNoneMatch=other, IfModifiedSince=since),
        ),
        "ims-equal": Check(
            "If-Modified-Since = Last-Modified",
            "If-Modified-Since: Last-Modified",
            "304",
            head(client, bucket, key, IfModifiedSince=lm),
        ),
        "other-and-ims-equal": Check(
            "other ETag + If-Modified-Since = Last-Modified",
            "If-None-Match: other + If-Modified-Since",
            "200",
            head(client, bucket, key, IfNoneMatch=other, IfModifiedSince=lm),
        ),
    }
    calibrated = measure(
        Measured(
            current=first,
            mismatch_and_since=checks["other-and-ims"].answer,
            match=checks["inm-match"].answer,
            since=checks["ims-same"].answer,
            mismatch=checks["inm-other"].answer,
            mismatch_and_equal=checks["other-and-ims-equal"].answer,
            equal=checks["ims-equal"].answer,
        )
    )
    after: Answer | None = None
    for _ in range(SAME_SECOND_TRIES):
        client.put_object(Bucket=bucket, Key=key, Body=b"poller doctor 1")
        before = head(client, bucket, key)
        client.put_object(Bucket=bucket, Key=key, Body=b"poller doctor 2, overwritten")
        after = head(client, bucket, key)
        if before.last_modified == after.last_modified and before.etag != after.etag:
            assert before.etag is not None and before.last_modified is not None
            checks["both-after-overwrite"] = Check(
                "both headers after a same-second overwrite",
                "If-None-Match: old ETag + If-Modified-Since",
                "200",
                head(client, bucket, key, IfNoneMatch=before.etag, IfModifiedSince=before.last_modified),
            )
            break
    combo = checks.get("both-after-overwrite")
    seen = with_overwrite(calibrated, combo.answer if combo else None, after.etag if after else None)
    mode, reasons, warnings = recommend(calibrated, seen, setting)
    if combo is None:
        reasons.append(
            f"could not fit two PUTs into one server second in {SAME_SECOND_TRIES} tries; "
            "the same-second check was not measured"
        )
    versioned = bool(put.get("VersionId")) or first.version_id is not None
    version_id_on_404 = None
    if versioned:
        client.delete_object(Bucket=bucket, Key=key)  # a delete marker; _clean_up removes it
        version_id_on_404 = head(client, bucket, key).version_id is not None
    return Report(list(checks.values()), versioned, mode, reasons, seen, version_id_on_404, warnings)


def render(report: Report) -> str:
    """The report as a table plus the recommendation, for the terminal."""
    rows = [("check", "sent", "RFC 9110", "got", "ETag on reply", "Last-Modified on reply", "verdict")]
    for c in report.checks:
        rows.append(
            (
                c.name,
                c.sent,
                c.expected,
                str(c.answer.status),
                "yes" if c.answer.etag else "no",
                "yes" if c.answer.last_modified else "no",
                c.verdict,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    if report.versioned:
        lines.append(f"versioned bucket: yes; {version_id_words(report.version_id_on_404)}")
    else:
        lines.append("versioned bucket: no (its objects have no version ids, so no event carries one)")
    lines += [f"WARNING: {warning}" for warning in report.warnings]
    lines.append(f'recommended: [s3] conditional = "{report.recommendation}"')
    lines += [f"  - {reason}" for reason in report.reasons]
    return "\n".join(lines)
