"""The watch list as plain data: build it from settings and diff two versions of it (for reloads)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from poller.config import ConfigError, Settings
from poller.model import Payer, Watch, target_of
from poller.signals import Rules


class WatchSpec(NamedTuple):
    """A watch as the config describes it: identity (name), target and schedule (a named tuple, as Watch)."""

    name: str
    bucket: str
    key: str  # the object key, or the prefix of a prefix watch
    interval_seconds: float | None
    cron: str | None
    prefix: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_keys: int = 100_000
    request_payer: Payer | None = None
    expected_bucket_owner: str | None = None

    @property
    def schedule(self) -> tuple[float | None, str | None]:
        return (self.interval_seconds, self.cron)

    @property
    def target(self) -> tuple[object, ...]:
        # The request options are part of what a poll sends: a change reaches the running watch on reload.
        return target_of(self)

    def as_watch(self, watch_id: int) -> Watch:
        """The Watch the scheduler and store use, under the given database id."""
        return Watch(
            watch_id,
            self.name,
            self.bucket,
            self.key,
            self.prefix,
            self.include,
            self.exclude,
            self.max_keys,
            self.request_payer,
            self.expected_bucket_owner,
            self.interval_seconds,
            self.cron,
        )

    @property
    def kind(self) -> str:
        return "prefix" if self.prefix else "key"


@dataclass(frozen=True, slots=True)
class WatchListDiff:
    """What a reload must do: names to add, remove, reschedule, or point at another object."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    rescheduled: list[str] = field(default_factory=list)
    retargeted: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.rescheduled or self.retargeted)

    def summary(self) -> str:
        return (
            f"{len(self.added)} added, {len(self.removed)} removed, "
            f"{len(self.rescheduled)} rescheduled, {len(self.retargeted)} retargeted"
        )


def specs_from_settings(settings: Settings) -> dict[str, WatchSpec]:
    """The configured watches by name, with the default interval applied."""
    default = settings.schedule.interval
    return {
        w.name: WatchSpec(
            w.name,
            w.bucket,
            w.key if w.prefix is None else w.prefix,
            None if w.cron is not None else w.interval if w.interval is not None else default,
            w.cron,
            w.prefix is not None,
            w.include,
            w.exclude,
            w.max_keys,
            w.request_payer,
            w.expected_bucket_owner,
        )
        for w in settings.watch
    }


def rules_from_settings(settings: Settings) -> dict[str, Rules]:
    """Each watch's signal rules: its own, else the ``[schedule]`` defaults.

    A watch that sets either deadline rule replaces both defaults (a cron deadline does not also
    inherit a default ``expect_change_within``).
    """
    d = settings.schedule
    rules: dict[str, Rules] = {}
    shared: dict[Rules, Rules] = {}  # one object per distinct set of rules, however many watches
    # Built once per distinct set of a watch's own fields: a million watches share a handful.
    known: dict[tuple[object, ...], Rules] = {}
    for w in settings.watch:
        # alert_after 3 (errors) and 3.0 (seconds) are equal as keys: the type tells them apart.
        own = (w.expect_change_within, w.expect_change_by, w.expect_grace, w.settle, w.alert_after, type(w.alert_after))
        if (found := known.get(own)) is not None:
            rules[w.name] = found
            continue
        own_deadline = w.expect_change_within is not None or w.expect_change_by is not None
        src = w if own_deadline else d
        alert = d.alert_after if w.alert_after is None else w.alert_after
        grace = w.expect_grace if w.expect_grace is not None else d.expect_grace
        these = Rules(
            expect_change_within=src.expect_change_within,
            expect_change_by=src.expect_change_by,
            expect_grace=grace or 0.0,
            settle=d.settle if w.settle is None else w.settle,
            alert_after_errors=alert if isinstance(alert, int) and alert > 0 else None,
            alert_after_seconds=alert if isinstance(alert, float) else None,
        )
        rules[w.name] = known[own] = shared.setdefault(these, these)
    return rules


def demand(specs: Iterable[WatchSpec | Watch]) -> float:
    """Polls per second the watch list asks for; a cron watch counts as once a minute, its most."""
    return sum(1.0 / spec.interval_seconds if spec.interval_seconds else 1.0 / 60 for spec in specs)


def diff_watch_lists(old: Mapping[str, WatchSpec | Watch], new: Mapping[str, WatchSpec]) -> WatchListDiff:
    """Compare two watch lists by name; unchanged watches appear in no list (they keep running)."""
    diff = WatchListDiff()
    for name, spec in new.items():
        before = old.get(name)
        if before is None:
            diff.added.append(name)
            continue
        if before.target != spec.target:
            diff.retargeted.append(name)
        if before.schedule != spec.schedule:
            diff.rescheduled.append(name)
    diff.removed.extend(name for name in old if name not in new)
    return diff


def require_watches(settings: Settings, source: str) -> None:
    """Refuse a config without watches unless it says so with a top-level ``watch = []``.

    An empty or truncated file (a write cut short, an editor's empty buffer) would otherwise
    deactivate every watch; an explicit empty list cannot be produced by accident.
    """
    if settings.watch or "watch" in settings.model_fields_set:
        return
    raise ConfigError(
        f"{source}: no [[watch]] entries: the file is empty or cut short, so poller refuses to stop "
        "watching everything. Add watches, or to run with none on purpose write `watch = []` on a line "
        "of its own at the top of the file (before any [section])."
    )
