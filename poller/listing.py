"""Prefix watches: list a prefix with ListObjectsV2 and diff it against the stored object states.

One list page covers up to 1,000 keys, for the price of about 12 HEADs on AWS. ``diff_listing``
is a pure function; ``list_prefix`` is the I/O edge.
"""

from __future__ import annotations

import time
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError
from botocore.parsers import ResponseParserError

from poller.model import (
    EMPTY_ETAGS,
    Event,
    Filters,
    KeyChange,
    ObjectState,
    PollResult,
    PrefixState,
    Watch,
    canonical_etag,
)
from poller.probe import Prober, error_result
from poller.s3client import bucket_missing, describe_client_error, describe_transport_error, status_of

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class PrefixTooLarge(Exception):
    """The listing passed the watch's max_keys bound."""


class ListingError(Exception):
    """A listing whose answers cannot be the whole prefix (a truncated one without a way on, pages
    that loop, an entry without a key or an ETag, a key outside the prefix): nothing is recorded."""


def matches(key: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    """Whether a key passes the watch's include globs (any; none = all) and exclude globs (none)."""
    if include and not any(fnmatchcase(key, g) for g in include):
        return False
    return not any(fnmatchcase(key, g) for g in exclude)


def diff_listing(
    stored: PrefixState,
    listed: dict[str, ObjectState],
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> list[KeyChange]:
    """Compare a listing (of the keys passing ``include``/``exclude``) with the stored states:
    first_seen, created, modified, deleted, per key. A stored key the filters now leave out is no
    longer watched, not deleted (a reload narrowed them); a key that no earlier pass's filters let in
    is first seen, not created (a reload widened them: the key may be years old)."""
    changes = []
    for key, now in listed.items():
        before = stored.objects.get(key)
        if before is None or not before.present:
            # Without a row, the key was made after the last pass whose filters let it in, if any did.
            event: Event = "created" if stored.listed and (before is not None or covered(stored, key)) else "first_seen"
            changes.append(KeyChange(key, event, before, now))
        elif _changed(before, now):
            changes.append(KeyChange(key, "modified", before, now))
        elif (before.etag, before.last_modified, before.size) != (now.etag, now.last_modified, now.size):
            # Same ETag, so the same content: a rewrite or a listing that shows an upload's size
            # growing. Keep the new values without inventing an event.
            changes.append(KeyChange(key, None, before, now))
    for key, before in stored.objects.items():
        if before.present and key not in listed and matches(key, include, exclude):
            changes.append(KeyChange(key, "deleted", before, ObjectState(present=False)))
    return changes


def covered(stored: PrefixState, key: str) -> bool:
    """Whether an earlier list pass's filters let ``key`` in (not known: assume so, as before they were stored)."""
    return stored.filters is None or any(matches(key, include, exclude) for include, exclude in stored.filters)


def filters_after(stored: PrefixState, watch: Watch) -> tuple[Filters, ...]:
    """The filters stored with a pass of ``watch``: those of the passes before it, and its own."""
    own: Filters = (watch.include, watch.exclude)
    earlier = stored.filters or ()
    return earlier if own in earlier else (*earlier, own)


def _changed(before: ObjectState, now: ObjectState) -> bool:
    """Whether a listed key holds other content than the stored state: the ETag decides when both have one."""
    old_etag, new_etag = canonical_etag(before.etag), canonical_etag(now.etag)
    if old_etag is not None and new_etag is not None:
        return old_etag != new_etag
    return old_etag != new_etag or before.size != now.size


def list_prefix(client: S3Client, watch: Watch) -> tuple[dict[str, ObjectState], int]:
    """Every key under the watch's prefix that passes its filters, and the number of pages it took.

    Each page is checked before it counts: whatever a listing leaves out, the diff would report as
    deleted. So a page marked truncated must say where to go on, a page not marked truncated must not,
    the pages must not come round again (the same token, or the same first key: a server that
    ignores the token), and every entry needs a key under the prefix and an ETag (ListingError).
    """
    listed: dict[str, ObjectState] = {}
    pages = 0
    tokens: set[str] = set()
    first_keys: set[str] = set()
    args: dict[str, Any] = {"Bucket": watch.bucket, "Prefix": watch.key, **watch.request_params}
    while True:
        page = client.list_objects_v2(**args)
        pages += 1
        contents = page.get("Contents", [])
        if contents:
            first = str(contents[0].get("Key"))
            if first in first_keys:
                raise ListingError(
                    f"the listing came round to a page it had already sent (page {pages} starts at {first!r} again): "
                    "the server ignores the continuation token; not recorded"
                )
            first_keys.add(first)
        for item in contents:
            key = item.get("Key")
            if not isinstance(key, str) or not key.startswith(watch.key):
                raise ListingError(
                    f"the listing holds an entry {'without a key' if key is None else repr(key)}"
                    f"{'' if key is None else ' outside the prefix'}: the server ignores the Prefix parameter "
                    "or sends a broken listing; not recorded"
                )
            # The prefix itself (a "folder" marker) shares the watch's own row in object_state.
            if key == watch.key or not matches(key, watch.include, watch.exclude):
                continue
            etag = canonical_etag(item.get("ETag"))
            if etag is None or etag in EMPTY_ETAGS:
                # As on a HEAD: stored, it would be a `modified` to no ETag, then another back.
                raise ListingError(f"the listing shows {key!r} without an ETag: not recorded, listed again next time")
            listed[key] = ObjectState(
                etag=etag,
                last_modified=item.get("LastModified"),
                size=item.get("Size"),
                present=True,
            )
            if len(listed) > watch.max_keys:
                raise PrefixTooLarge(
                    f"the prefix holds more than max_keys = {watch.max_keys} matching keys; "
                    "narrow it with include/exclude or raise max_keys"
                )
        token = page.get("NextContinuationToken")
        if page.get("IsTruncated") is not True:
            if token:
                raise ListingError(
                    "the server sent a continuation token on a page it did not mark truncated (IsTruncated): "
                    "whether the listing is whole cannot be told; not recorded"
                )
            return listed, pages
        if not token:
            raise ListingError(
                f"the server marked page {pages} truncated (IsTruncated) but sent no NextContinuationToken: the "
                "rest of the prefix cannot be listed; not recorded"
            )
        if token in tokens:
            raise ListingError("the server's continuation tokens came round again: the listing loops; not recorded")
        tokens.add(token)
        args["ContinuationToken"] = token


def poll_prefix(prober: Prober, watch: Watch, stored: PrefixState) -> PollResult:
    """One list pass of a prefix watch: a PollResult carrying the per-key changes, or an error."""
    polled_at = prober.now()
    started = time.perf_counter()
    try:
        listed, pages = list_prefix(prober.client, watch)
    except ClientError as exc:
        status = status_of(exc)
        if status == 404:
            return error_result(watch, polled_at, started, None, 404, bucket_missing(watch))
        return error_result(watch, polled_at, started, None, status, describe_client_error(exc))
    except (PrefixTooLarge, ListingError) as exc:
        return error_result(watch, polled_at, started, None, 200, str(exc))
    except (BotoCoreError, OSError, ValueError) as exc:
        return error_result(watch, polled_at, started, None, None, describe_transport_error(exc))
    except ResponseParserError as exc:
        # A 200 that opens and closes as a listing but is broken inside (s3client checks only its ends).
        # botocore's message goes on with the whole body: the first line says why.
        reason = str(exc).split("\n", 1)[0].removesuffix(" Further retries may succeed:")
        return error_result(watch, polled_at, started, None, 200, f"the listing could not be read: {reason[:300]}")
    changes = tuple(diff_listing(stored, listed, watch.include, watch.exclude))
    return PollResult(
        watch=watch,
        polled_at=polled_at,
        outcome="modified" if any(c.event for c in changes) else "unchanged",
        http_status=200,
        duration_ms=(time.perf_counter() - started) * 1000,
        previous=None,
        # The pass's own row says the prefix was listed (present): an error pass later leaves that be.
        state=ObjectState(present=True),
        note=f"{len(listed)} keys, {pages} list page{'' if pages == 1 else 's'}",
        changes=changes,
        filters=filters_after(stored, watch),
    )
