"""`poller doctor`: measure how an endpoint answers conditional HEADs, and recommend `[s3] conditional`.

It writes a temporary object in a scratch bucket, overwrites it within one second, sends each
combination of conditional headers, records what comes back, and deletes the object afterwards.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from poller.model import Answer
from poller.s3client import describe_transport_error, head

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

SAME_SECOND_TRIES = 20


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
    recommendation: str
    reasons: list[str]


def recommend(checks: dict[str, Check]) -> tuple[str, list[str]]:
    """Pick the `conditional` mode from the measured answers (pure: testable without a server)."""
    reasons = []
    etag_ok = checks["inm-match"].answer.status == 304
    ims_ok = checks["ims-same"].answer.status == 304
    if not etag_ok:
        reasons.append("If-None-Match is not honoured: every poll costs a 200, and the ETag comparison decides")
        return ("timestamp" if ims_ok else "etag"), reasons
    combo = checks.get("both-after-overwrite")
    if combo is not None and combo.answer.status == 304:
        if combo.answer.etag is None:
            reasons.append(
                "a same-second overwrite answers 304 without an ETag when both headers are sent: "
                "only If-None-Match is safe here"
            )
            return "etag", reasons
        reasons.append(
            "a same-second overwrite answers 304 with both headers, but the 304 carries the new "
            "ETag, so poller's cross-check still sees it"
        )
    if not ims_ok:
        reasons.append("If-Modified-Since is ignored: poller relies on If-None-Match")
        return "etag", reasons
    reasons.append("both headers are honoured; the same-second guard and the ETag cross-check cover the rest")
    return "both", reasons


def run_doctor(client: S3Client, bucket: str) -> Report:
    """Measure the endpoint with a temporary object in ``bucket``; always deletes what it wrote."""
    key = f".poller-doctor/{uuid.uuid4().hex}"
    try:
        return _measure(client, bucket, key)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        raise DoctorError(
            f"s3://{bucket}: the endpoint answered {code or 'an error'}; doctor needs a bucket "
            "it may write to and delete from (s3:PutObject, s3:DeleteObject, s3:GetObject)"
        ) from None
    except BotoCoreError as exc:
        raise DoctorError(f"s3://{bucket}: {describe_transport_error(exc)}") from None
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


def _measure(client: S3Client, bucket: str, key: str) -> Report:
    put = client.put_object(Bucket=bucket, Key=key, Body=b"poller doctor 1")
    first = head(client, bucket, key)
    assert first.etag is not None and first.last_modified is not None
    checks = {
        "inm-match": Check(
            "If-None-Match, same ETag",
            f"If-None-Match: {first.etag}",
            "304",
            head(client, bucket, key, IfNoneMatch=first.etag),
        ),
        "inm-unquoted": Check(
            "If-None-Match, unquoted ETag",
            f"If-None-Match: {first.etag.strip(chr(34))}",
            "304",
            head(client, bucket, key, IfNoneMatch=first.etag.strip('"')),
        ),
        "ims-same": Check(
            "If-Modified-Since = Last-Modified",
            "If-Modified-Since: Last-Modified",
            "304",
            head(client, bucket, key, IfModifiedSince=first.last_modified),
        ),
        "ims-future": Check(
            "If-Modified-Since in the future",
            "If-Modified-Since: +1 day",
            "304",
            head(client, bucket, key, IfModifiedSince=first.last_modified + timedelta(days=1)),
        ),
    }
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
    mode, reasons = recommend(checks)
    if "both-after-overwrite" not in checks:
        reasons.append(
            f"could not fit two PUTs into one server second in {SAME_SECOND_TRIES} tries; "
            "the same-second check was not measured"
        )
    return Report(list(checks.values()), bool(put.get("VersionId")) or first.version_id is not None, mode, reasons)


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
    lines.append(f"versioned bucket: {'yes (version ids are recorded on every event)' if report.versioned else 'no'}")
    lines.append(f'recommended: [s3] conditional = "{report.recommendation}"')
    lines += [f"  - {reason}" for reason in report.reasons]
    return "\n".join(lines)
