"""The conditional HeadObject and the classification of its answer (design.md section 1).

``request_conditions`` and ``classify`` are pure functions on plain data; ``Prober`` is the
I/O edge that sends the HEAD with boto3 and turns whatever happens into a ``PollResult``. It also
sends the read-only calibration HEADs (``poller.calibrate``) that pick the conditional headers.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from poller.calibrate import (
    MAX_AGE,
    NO_MATCH_ETAG,
    RETRY_AFTER,
    Book,
    Inconclusive,
    Measured,
    Mode,
    Semantics,
    Setting,
    choose_mode,
    describe,
    measure,
    override_warning,
    since_for,
    version_id_words,
)
from poller.lean import LeanHead
from poller.model import Answer, Event, ObjectState, Outcome, PollResult, ProtocolError, Watch, sendable
from poller.redact import redact
from poller.s3client import (
    bucket_missing,
    describe_client_error,
    describe_transport_error,
    head,
    make_client,
    status_of,
)
from poller.safetext import printable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from poller.config import S3Settings

log = logging.getLogger(__name__)

# A Date this close to Last-Modified leaves room for a same-second overwrite (rule 1).
SAME_SECOND_MARGIN = timedelta(seconds=2)
BUCKET_CHECK_TTL = 300.0


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    event: Event | None
    state: ObjectState
    # A 304 carrying a different ETag: fetch full metadata with an unconditional HEAD, then classify that.
    needs_full_head: bool = False


def request_conditions(state: ObjectState | None, mode: Mode) -> dict[str, Any]:
    """The conditional headers (as boto3 HeadObject kwargs) for the next poll of this state."""
    # An ETag stored by an older version that cannot be sent back (control characters): ask unconditionally.
    if state is None or not state.present or state.etag is None or not sendable(state.etag):
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


def classify(state: ObjectState | None, answer: Answer, *, conditional: bool = True) -> Verdict:
    """Map a HEAD answer (200, 304 or 404) against the stored state to outcome, event and new state;
    ``conditional``: whether the HEAD carried a condition. An answer that cannot be one raises ProtocolError."""
    known = state is not None and state.present is True
    if answer.status == 304:
        if state is None or not known or not conditional:
            # Taken as an answer it would record a `modified` to the ETag already stored, or miss a change.
            raise ProtocolError(
                "the server answered 304 Not Modified to a HEAD without conditions: not recorded, polled again "
                "next time"
            )
        if answer.etag is not None and answer.etag != state.etag:
            return Verdict("modified", "modified", state, needs_full_head=True)
        return Verdict("unchanged", None, _confirmed(state, answer))
    if answer.status == 200:
        if answer.etag is None:
            # S3 sends one with every object. Recorded, this would be a `modified` to no ETag, then
            # (the next poll unconditional) another back; and a later change would read as unchanged.
            raise ProtocolError("the server answered 200 without an ETag: not recorded, polled again next time")
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
    # Built directly: dataclasses.replace costs ~13 us, and this runs on every 304.
    return ObjectState(state.etag, state.last_modified, date, state.version_id, state.size, state.present)


class SemanticsSink(Protocol):
    """Where a Prober records what it learned about its server (the Store)."""

    def save_semantics(
        self, endpoint: str, bucket: str, sem: Semantics, mode: str, learned_at: datetime, detail: str
    ) -> None: ...

    def forget_semantics(self, endpoint: str, bucket: str) -> None: ...

    def note_version_id_on_404(self, endpoint: str, value: bool, now: datetime) -> None: ...


def prober_for(settings: S3Settings, concurrency: int, sink: SemanticsSink | None = None) -> Prober:
    """A Prober with its own client, built from the [s3] settings (lean HEAD path unless turned off)."""
    session = boto3.session.Session(profile_name=settings.profile or None)
    client = make_client(settings, concurrency, session)
    if settings.http_client == "boto3":
        return Prober(client, settings.conditional, sink=sink)
    resolver = make_client(settings, 1, session)  # configured as the client: the lean path copies its requests
    lean = LeanHead(session, client, resolver, settings.connect_timeout, settings.read_timeout, settings.max_attempts)
    return Prober(client, settings.conditional, lean=lean, sink=sink)


class Prober:
    """Sends the conditional HEAD for a watch and classifies the answer; never raises for S3 trouble.

    Under ``conditional = "auto"`` the headers come from calibration, per bucket, measured before the
    bucket's first conditional poll and again after a reload, a run of errors, or MAX_AGE.
    """

    def __init__(
        self,
        client: S3Client,
        mode: Setting,
        clock: Any = None,
        lean: LeanHead | None = None,
        sink: SemanticsSink | None = None,
        book: Book | None = None,
    ) -> None:
        self.client = client
        self.lean = lean
        self.setting: Setting = mode
        self.now = clock or (lambda: datetime.now(UTC))
        self.sink = sink
        self.book = book or Book()
        self.endpoint = redact(str(client.meta.endpoint_url).rstrip("/"))
        self._bucket_cache: dict[str, tuple[float, bool]] = {}
        self._bucket_lock = threading.Lock()
        self._learn_lock = threading.Lock()
        self._reference: tuple[str, Semantics] | None = None  # the bucket whose answer is endpoint-wide
        self._said: set[tuple[str, str]] = set()
        self._version_id_on_404: bool | None = None

    def relearn(self) -> None:
        """Measure every bucket's semantics again at its next poll (on reload)."""
        self.book.relearn()

    def mode_for(self, bucket: str) -> Mode:
        """The conditional mode a poll of this bucket uses now."""
        return choose_mode(self.setting, self.book.semantics(bucket))

    def probe(self, watch: Watch, state: ObjectState | None) -> PollResult:
        """Poll one watch against its stored state."""
        if state is not None and state.present and state.etag is not None:
            self.calibrate(watch)
        result = self._probe(watch, state, self.mode_for(watch.bucket))
        if self.book.polled(result.outcome != "error"):
            log.warning(
                "endpoint %s: polls keep failing; its conditional semantics will be measured again once it "
                "answers (If-None-Match only until then)",
                self.endpoint,
            )
        return result

    def _probe(self, watch: Watch, state: ObjectState | None, mode: Mode) -> PollResult:
        polled_at = self.now()
        started = time.perf_counter()
        status: int | None = None
        try:
            conditions = request_conditions(state, mode)
            answer, verdict, note = self._ask(watch, state, conditions, fresh=False)
            if verdict.event is not None and answer.reused:
                # A change read on a kept-alive connection is asked again on a new one: a peer that
                # answered an earlier request twice would have that answer recorded as this key's
                # change (and the next poll a change back). Changes are rare: this costs little.
                answer, verdict, note = self._ask(watch, state, conditions, fresh=True)
            status = answer.status
            if answer.status == 404 and not self._bucket_exists(watch.bucket):
                return error_result(watch, polled_at, started, state, 404, bucket_missing(watch))
            if verdict.event == "deleted":
                self._observe_deletion(state, answer)
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

    def _ask(
        self, watch: Watch, state: ObjectState | None, conditions: dict[str, Any], *, fresh: bool
    ) -> tuple[Answer, Verdict, str]:
        """The conditional HEAD and its verdict, after an unconditional one if the first was a 304 with a new ETag."""
        answer = self._head(watch, conditions, fresh=fresh)
        verdict = classify(state, answer, conditional=bool(conditions))
        if not verdict.needs_full_head:
            return answer, verdict, ""
        answer = self._head(watch, {}, fresh=fresh)
        return answer, classify(state, answer, conditional=False), "304 with a new ETag"

    # --- calibration ----------------------------------------------------------------

    def calibrate(self, watch: Watch) -> None:
        """Measure the watch's bucket now if it is due (a poll with stored state does this by itself)."""
        if self.book.claim(watch.bucket):
            self._calibrate(watch)

    def _calibrate(self, watch: Watch) -> None:
        """Up to eight read-only HEADs on the watch's object; what they show decides the bucket's mode."""

        def ask(conditions: dict[str, Any]) -> Answer:
            # On new connections: an answer an earlier request was owed would teach the wrong semantics.
            return self._head(watch, conditions, fresh=True)

        try:
            current = ask({})
            lm = current.last_modified
            if current.status != 200 or current.etag is None or lm is None:
                raise Inconclusive(f"the object answered {current.status} without ETag and Last-Modified")
            since = since_for(current)
            later = since != lm
            if not later and current.server_date is not None:
                # Only the equal date could be asked: an off-by-one server would look RFC-compliant.
                raise Inconclusive("the object was written less than 2 s ago; measured again later")
            sem = measure(
                Measured(
                    current=current,
                    mismatch_and_since=ask({"IfNoneMatch": NO_MATCH_ETAG, "IfModifiedSince": since}),
                    match=ask({"IfNoneMatch": current.etag}),
                    since=ask({"IfModifiedSince": since}),
                    mismatch=ask({"IfNoneMatch": NO_MATCH_ETAG}),
                    mismatch_and_equal=(ask({"IfNoneMatch": NO_MATCH_ETAG, "IfModifiedSince": lm}) if later else None),
                    equal=ask({"IfModifiedSince": lm}) if later else None,
                    after=ask({}),
                )
            )
            if not later and not sem.etag_on_304 and choose_mode("auto", sem) == "both":
                # No Date: If-Modified-Since was asked at the object's own date only, where a server
                # that counts an equal date as modified looks RFC-compliant; polls whose answers carry
                # a Date would then send it with nothing to cross-check. What needs no date is still
                # learned (a broken If-None-Match must lead to unconditional polls, not to "etag").
                raise Inconclusive("the answers carried no usable Date header; measured again later", MAX_AGE)
        except (Inconclusive, ClientError, BotoCoreError, OSError, ValueError) as exc:
            # A server that sends no Date will not start to within a minute: measured again much later.
            self.book.failed(watch.bucket, exc.retry_after if isinstance(exc, Inconclusive) else RETRY_AFTER)
            reason = describe_client_error(exc) if isinstance(exc, ClientError) else str(exc)
            where, why = printable(watch.url), printable(redact(reason))
            log.debug("endpoint %s: calibration on %s inconclusive: %s", self.endpoint, where, why)
            return
        self.book.learned(watch.bucket, sem)
        self._publish(watch, sem)

    def _publish(self, watch: Watch, sem: Semantics) -> None:
        """Log what was learned once, warn about an unsound override once, and record it."""
        bucket = watch.bucket
        with self._learn_lock:
            reference = self._reference
            endpoint_wide = reference is None or reference[0] == bucket
            if endpoint_wide:
                self._reference = (bucket, sem)
            differs = reference is not None and not endpoint_wide and reference[1] != sem
        where = f"endpoint {self.endpoint}" + ("" if endpoint_wide else f" bucket {bucket}")
        detail = describe(sem, self.setting)
        warning = override_warning(self.setting, sem)
        if endpoint_wide or differs:
            self._say_once(logging.INFO, where, detail)
            if warning:
                self._say_once(logging.WARNING, where, warning)
        if self.sink is None:
            return
        mode = choose_mode(self.setting, sem)
        # `poller status` prints this: a key with a line break must not start a line of its own.
        text = detail + (f"; {warning}" if warning else "") + f" (measured on {printable(watch.url)})"
        try:
            if endpoint_wide or differs:
                self.sink.save_semantics(self.endpoint, "" if endpoint_wide else bucket, sem, mode, self.now(), text)
            else:
                self.sink.forget_semantics(self.endpoint, bucket)
        except Exception as exc:  # the database is the writer's business; polling goes on
            log.warning("endpoint %s: could not record its conditional semantics: %s", self.endpoint, redact(str(exc)))

    def _say_once(self, level: int, where: str, text: str) -> None:
        with self._learn_lock:
            if (where, text) in self._said:
                return
            self._said.add((where, text))
        log.log(level, "%s: %s", where, text)

    def _observe_deletion(self, previous: ObjectState | None, answer: Answer) -> None:
        """A deleted object that had a version id tells whether this server's 404 names the delete marker."""
        if previous is None or previous.version_id in (None, "null"):
            return  # an unversioned object: its 404 says nothing about version ids
        value = answer.version_id is not None
        with self._learn_lock:
            if self._version_id_on_404 == value:
                return
            self._version_id_on_404 = value
        log.info("endpoint %s: %s", self.endpoint, version_id_words(value))
        if self.sink is None:
            return
        try:
            self.sink.note_version_id_on_404(self.endpoint, value, self.now())
        except Exception as exc:
            log.warning("endpoint %s: could not record version-id behaviour: %s", self.endpoint, redact(str(exc)))

    def _head(self, watch: Watch, conditions: dict[str, Any], *, fresh: bool = False) -> Answer:
        conditions = {**conditions, **watch.request_params}  # request payer, expected owner: signed on both paths
        if self.lean is not None:
            return self.lean.head(watch.bucket, watch.key, conditions, fresh=fresh)
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
