"""Calibration (design.md section 1, rule 3): learn, read-only, how a server evaluates conditional HEADs.

Six HEADs on an object the daemon already watches (If-Modified-Since asked at two dates), between
two unconditional ones that give its current ETag and Last-Modified and show it did not move, tell whether
``If-Modified-Since`` can override a non-matching ``If-None-Match`` and whether a 304 carries the ETag.
``measure`` and ``choose_mode`` are pure; ``Book`` keeps what was learned per bucket and decides
when to learn it again. The HEADs themselves are sent by ``poller.probe.Prober``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from poller.model import Answer

Setting = Literal["auto", "both", "etag", "timestamp"]  # [s3] conditional
# The headers a poll sends; "none" (unconditional HEADs, the ETag comparison decides) only where no
# condition is sound, which no measured server needs but a broken If-None-Match would.
Mode = Literal["both", "etag", "timestamp", "none"]
Precedence = Literal["rfc", "either", "ims_ignored", "inm_ignored", "inm_broken", "unknown"]

# Before calibration (or after the server may have changed) only If-None-Match is sent: a 304 then
# means the ETag matched, whatever the server does with timestamps.
SAFE_MODE: Mode = "etag"
# Sent as the non-matching If-None-Match: quoted like a real ETag, equal to none.
NO_MATCH_ETAG = '"00000000000000000000000000000000-poller"'

# A run of this many failed polls in a row on one endpoint: it was down, replaced or failed over,
# which is when its semantics can change; go back to SAFE_MODE and measure again once it answers.
ERROR_RUN = 5
# Re-measured this often anyway: a rolling upgrade behind one endpoint changes semantics without
# a single error. Seven HEADs per bucket every few hours cost nothing.
MAX_AGE = 6 * 3600.0
# An inconclusive measurement (object gone or changed meanwhile, an error) is retried after this.
RETRY_AFTER = 60.0


class Inconclusive(Exception):
    """The answers cannot be trusted (the object changed meanwhile, or an answer was missing);
    ``retry_after``: seconds until the bucket is measured again."""

    def __init__(self, reason: str, retry_after: float = RETRY_AFTER) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Measured:
    """The answers of one calibration, all on the same object."""

    current: Answer  # unconditional: the object's ETag and Last-Modified
    mismatch_and_since: Answer  # (a) non-matching If-None-Match + If-Modified-Since (see since_for)
    match: Answer  # (b) matching If-None-Match
    since: Answer  # (c) the same If-Modified-Since, alone
    mismatch: Answer  # (d) non-matching If-None-Match, alone
    # (a) and (c) again with If-Modified-Since equal to Last-Modified, when ``since_for`` chose a second
    # later: a server that answers 304 only to an exact date would otherwise look as if it ignored the
    # header, while a poll (which sends the stored Last-Modified itself) misses a timestamp-keeping copy.
    mismatch_and_equal: Answer | None = None
    equal: Answer | None = None
    # Unconditional again, last: a rewrite of the same bytes keeps the ETag and moves Last-Modified, and
    # a 304 without headers cannot show it; an identical answer shows nothing moved in between.
    after: Answer | None = None


@dataclass(frozen=True, slots=True)
class Semantics:
    """How a server evaluates conditional HEADs, as measured."""

    inm_honoured: bool  # a matching If-None-Match answers 304
    inm_false_304: bool  # a NON-matching If-None-Match answers 304 (broken)
    ims_honoured: bool  # If-Modified-Since at or after Last-Modified answers 304
    ims_overrides: bool  # (a) answered 304: the timestamp wins over a non-matching ETag
    etag_on_304: bool | None  # every 304 carried the current ETag; None if no 304 came back

    @property
    def precedence(self) -> Precedence:
        if self.inm_false_304:
            return "inm_broken"
        if not self.inm_honoured:
            return "inm_ignored"
        if self.ims_overrides:
            return "either"
        if not self.ims_honoured:
            return "ims_ignored"
        return "rfc"


def since_for(current: Answer) -> datetime | None:
    """The If-Modified-Since of calibration: a second after Last-Modified when that is safely past.

    A second later, not equal: a server that counts an equal date as modified would otherwise look
    RFC-compliant while a rollback (an OLDER Last-Modified) still earns a 304. Not in the future by the
    server's own Date (with the same-second margin for its nodes' clocks): some servers ignore those.
    """
    lm = current.last_modified
    if lm is None:
        return None
    if current.server_date is not None and current.server_date - lm >= timedelta(seconds=2):
        return lm + timedelta(seconds=1)
    return lm


def measure(m: Measured) -> Semantics:
    """The semantics the answers show; raises Inconclusive if they cannot be trusted."""
    current = m.current
    if current.status != 200 or current.etag is None or current.last_modified is None:
        raise Inconclusive("the object gave no ETag and Last-Modified to calibrate with")
    at_equal = tuple(a for a in (m.mismatch_and_equal, m.equal) if a is not None)
    probes = (m.mismatch_and_since, m.match, m.since, m.mismatch, *at_equal)
    for answer in probes:
        if answer.status not in (200, 304):
            raise Inconclusive(f"a calibration HEAD answered {answer.status}")
        # Every 200 carries the ETag: another one means the object changed under the measurement,
        # and a 200 to (a) might then be the timestamp's doing, not the ETag's. A later Last-Modified
        # with the same ETag (the same bytes written again) makes every If-Modified-Since answer 200:
        # an either-condition server would look as if it ignored the header.
        if answer.status == 200 and answer.etag != current.etag:
            raise Inconclusive("the object changed during calibration")
        if answer.last_modified is not None and answer.last_modified != current.last_modified:
            raise Inconclusive("the object was written again during calibration")
    after = m.after
    if after is not None and (
        after.status != 200 or after.etag != current.etag or after.last_modified != current.last_modified
    ):
        raise Inconclusive("the object was written again during calibration")
    not_modified = [a for a in probes if a.status == 304]
    return Semantics(
        inm_honoured=m.match.status == 304,
        inm_false_304=m.mismatch.status == 304,
        # Either date answering 304 is enough: polls send dates equal to and after a new version's.
        ims_honoured=m.since.status == 304 or (m.equal is not None and m.equal.status == 304),
        ims_overrides=m.mismatch_and_since.status == 304
        or (m.mismatch_and_equal is not None and m.mismatch_and_equal.status == 304),
        etag_on_304=all(a.etag == current.etag for a in not_modified) if not_modified else None,
    )


def hiding_reason(mode: Mode, sem: Semantics) -> str | None:
    """Why ``mode`` can answer 304 to a changed object with nothing to cross-check, or None if it cannot."""
    if sem.etag_on_304:
        return None  # a 304 to a changed object carries the new ETag: the cross-check sees it
    if mode in ("etag", "both") and sem.inm_false_304:
        return "a non-matching If-None-Match answers 304 without the ETag"
    if mode == "both" and sem.ims_overrides:
        return (
            "If-Modified-Since overrides a changed ETag and the 304 carries no ETag: a new version whose "
            "Last-Modified is not later than the stored one (a rollback, a late multipart upload, a "
            "timestamp-preserving copy) is missed"
        )
    if mode == "timestamp" and sem.ims_honoured:
        return (
            "a 304 to If-Modified-Since carries no ETag: a new version whose Last-Modified is not later "
            "than the stored one is missed"
        )
    return None


def choose_mode(setting: Setting, sem: Semantics | None) -> Mode:
    """The headers to send: an explicit setting as asked; "auto" the most useful sound mode."""
    if setting != "auto":
        return setting
    if sem is None:
        return SAFE_MODE
    for mode in ("both", "etag"):
        if hiding_reason(mode, sem) is None:
            return mode
    return "none"


_PRECEDENCE_WORDS: dict[str, str] = {
    "rfc": "If-None-Match takes precedence over If-Modified-Since (RFC 9110)",
    "either": "If-Modified-Since overrides a non-matching If-None-Match (either-condition semantics)",
    "ims_ignored": "If-Modified-Since is ignored (If-None-Match decides)",
    "inm_ignored": "If-None-Match is ignored",
    "inm_broken": "a non-matching If-None-Match answers 304",
    "unknown": "conditional semantics not measured yet",
}
_MODE_WORDS: dict[str, str] = {
    "both": "polling with If-None-Match and If-Modified-Since",
    "etag": "polling with If-None-Match only",
    "timestamp": "polling with If-Modified-Since only",
    "none": "polling with unconditional HEADs (the ETag comparison decides)",
}


def precedence_words(precedence: str) -> str:
    return _PRECEDENCE_WORDS.get(precedence, precedence)


def etag_words(etag_on_304: bool | None) -> str:
    if etag_on_304 is None:
        return "no 304 seen"
    return "304s carry the ETag" if etag_on_304 else "304s carry no ETag"


def mode_words(mode: str) -> str:
    return _MODE_WORDS.get(mode, mode)


def describe(sem: Semantics, setting: Setting) -> str:
    """One sentence: what the server does and which headers poller sends there."""
    mode = choose_mode(setting, sem)
    text = f"{precedence_words(sem.precedence)}, {etag_words(sem.etag_on_304)}: {mode_words(mode)}"
    if setting != "auto":
        text += f' as [s3] conditional = "{setting}" asks'
    return text


def override_warning(setting: Setting, sem: Semantics) -> str | None:
    """Why an explicit ``[s3] conditional`` can miss a change on this server, and what to set; None if sound."""
    if setting == "auto":
        return None
    reason = hiding_reason(setting, sem)
    if reason is None:
        return None
    return (
        f'[s3] conditional = "{setting}" is unsound on this server: {reason}; remove it or set "auto" '
        f'(which polls it with "{choose_mode("auto", sem)}")'
    )


def version_id_words(value: bool | None) -> str:
    """What `status` and `doctor` say about version ids on deleted events."""
    if value is None:
        return "deleted events carry version ids: not known yet (no deletion on a versioned bucket seen)"
    if value:
        return "deleted events carry version ids (the 404 names the delete marker)"
    return "deleted events carry NO version id (the server sends no x-amz-version-id on the 404)"


def age_words(learned: timedelta) -> str:
    seconds = int(learned.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


@dataclass(slots=True)
class _Entry:
    sem: Semantics | None = None
    learned_at: float = 0.0
    due: bool = True  # measure (again) at the next chance
    busy: bool = False  # a worker is measuring right now
    retry_at: float = 0.0


class Book:
    """What is known per bucket of one endpoint, and when to measure again (thread-safe)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._errors = 0
        self._lock = threading.Lock()

    def semantics(self, bucket: str) -> Semantics | None:
        """What to poll this bucket by; None means not known (use SAFE_MODE under "auto")."""
        # Asked by every poll: without the lock (a dict read and an attribute read are atomic in
        # CPython), which workers queued for at 1,000 polls/s (9% of the GIL's time, py-spy).
        entry = self._entries.get(bucket)
        return entry.sem if entry is not None else None

    def claim(self, bucket: str) -> bool:
        """True when the caller should measure this bucket now (it then must call learned or failed)."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(bucket)  # every poll asks: no throwaway _Entry per call
            if entry is None:
                entry = self._entries[bucket] = _Entry()
            stale = entry.due or now - entry.learned_at >= MAX_AGE
            if not stale or entry.busy or now < entry.retry_at:
                return False
            entry.busy = True
            return True

    def learned(self, bucket: str, sem: Semantics) -> bool:
        """Store a measurement; True if it differs from what was known."""
        with self._lock:
            entry = self._entries.setdefault(bucket, _Entry())
            changed = entry.sem != sem
            entry.sem, entry.learned_at, entry.due, entry.busy = sem, self._clock(), False, False
            return changed

    def failed(self, bucket: str, retry_after: float = RETRY_AFTER) -> None:
        """An inconclusive measurement: keep what is known, try again after ``retry_after`` seconds."""
        with self._lock:
            entry = self._entries.setdefault(bucket, _Entry())
            entry.busy, entry.retry_at = False, self._clock() + retry_after

    def relearn(self) -> None:
        """Measure every bucket again at its next poll (a reload); what is known stays in use meanwhile."""
        with self._lock:
            for entry in self._entries.values():
                entry.due, entry.retry_at = True, 0.0

    def polled(self, ok: bool) -> bool:
        """Count a poll's outcome; True when a run of ERROR_RUN errors just made every bucket unknown."""
        with self._lock:
            if ok:
                self._errors = 0
                return False
            self._errors += 1
            if self._errors != ERROR_RUN:
                return False
            for entry in self._entries.values():
                entry.sem, entry.due, entry.retry_at = None, True, 0.0
            return True


def server_lines(rows: list[dict[str, Any]], now: datetime) -> list[str]:
    """`poller status`: one line per ``server_semantics`` row, in the words the daemon logged."""
    lines = []
    for row in rows:
        where = row["endpoint"] + (f" bucket {row['bucket']}" if row["bucket"] else "")
        parts = [row["detail"] or precedence_words(row["precedence"])]
        if not row["bucket"]:
            parts.append(version_id_words(row["version_id_on_404"]))
        learned = row["learned_at"]
        if isinstance(learned, datetime):
            parts.append(f"learned {age_words(now - learned)}")
        lines.append(f"  {where}: " + "; ".join(parts))
    return lines
