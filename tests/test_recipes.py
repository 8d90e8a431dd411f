"""Every ```sql block of the README runs on a populated SQLite file and PostgreSQL database.

A block whose first comment says "(SQLite" or "(PostgreSQL" is that database's variant; every other
block must run unchanged on both and give the same rows.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgserver import PgServer

from poller.model import ObjectState, PollResult
from poller.schema import to_text
from poller.signalcheck import SignalCheck, Watched
from poller.signals import Rules
from poller.store import Store, migrate, open_engine
from poller.watchlist import WatchSpec

README = Path(__file__).resolve().parent.parent / "README.md"
BACKENDS = ("sqlite", "postgresql")


def sql_blocks() -> list[str]:
    blocks = re.findall(r"^```sql\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks, "README.md has no ```sql blocks"
    return blocks


def statements(block: str) -> list[tuple[str, str]]:
    """(title, statement) pairs: each statement ends with ';', its title is the comment above it."""
    found = []
    for chunk in block.split(";\n"):
        lines = [line for line in chunk.strip().splitlines() if line.strip()]
        if not lines:
            continue
        title = next((line[2:].strip() for line in lines if line.startswith("--")), "")
        found.append((title, "\n".join(lines).rstrip(";")))
    return found


def backends_of(block: str) -> tuple[str, ...]:
    first = block.strip().splitlines()[0]
    if "(SQLite" in first:
        return ("sqlite",)
    if "(PostgreSQL" in first:
        return ("postgresql",)
    return BACKENDS


def populate(url: str, now: datetime) -> None:
    """Three watches: one changing, one failing now, one deleted two days ago; polls and events."""
    store = Store(open_engine(url))
    try:
        migrate(store.engine)
        specs = [WatchSpec(n, "bucket", f"k/{n}", 60.0, None) for n in ("app", "flaky", "gone")]
        w = store.sync_watches(specs, now - timedelta(days=3)).watches

        def ok(watch: Any, when: datetime, etag: str, event: str | None, prev: ObjectState | None) -> PollResult:
            state = ObjectState(etag, when, when, None, 10, True)
            outcome = "modified" if event else "unchanged"
            return PollResult(watch, when, outcome, 200, 5.0, prev, state, event, None)

        def err(watch: Any, when: datetime) -> PollResult:
            return PollResult(watch, when, "error", 503, 5.0, None, None, None, "S3 answered 503 SlowDown")

        old = now - timedelta(days=2)
        first = ObjectState('"a1"', old, old, None, 10, True)
        store.record([ok(w["app"], old, '"a1"', "first_seen", None), ok(w["gone"], old, '"g1"', "first_seen", None)])
        seen = ObjectState('"g1"', old, old, None, 10, True)
        gone = PollResult(
            w["gone"], old + timedelta(hours=1), "missing", 404, 5.0, seen, ObjectState(present=False), "deleted", None
        )
        store.record([gone])
        store.record([ok(w["app"], now - timedelta(hours=2), '"a2"', "modified", first)], lambda n, e: ["hook"])
        store.record([ok(w["flaky"], now - timedelta(hours=3), '"f1"', "first_seen", None)])
        store.record(
            [err(w["flaky"], now - timedelta(hours=2)), ok(w["app"], now - timedelta(hours=1), '"a2"', None, None)]
        )
        store.record([err(w["flaky"], now - timedelta(hours=1))])
        # "gone" was due a day after it was first seen: stale (README "Signals").
        check = SignalCheck(store, lambda: now)
        check.set_watches([Watched(w["gone"].id, "gone", w["gone"].key, Rules(expect_change_within=86400))])
        assert [s.event for s in check.run_once()] == ["stale"]
    finally:
        store.close()


@pytest.fixture(scope="module")
def databases(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    now = datetime.now(UTC)
    urls = {"sqlite": f"sqlite:///{tmp_path_factory.mktemp('recipes') / 'p.db'}"}
    name = pg_server.create_database()
    urls["postgresql"] = pg_server.url(name)
    for url in urls.values():
        populate(url, now)
    yield urls
    pg_server.drop_database(name)


def run(backend: str, url: str, sql: str) -> list[tuple[Any, ...]]:
    """The statement as a user pastes it: the plain driver, no SQLAlchemy, no parameters."""
    if backend == "sqlite":
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            return [tuple(row) for row in conn.execute(sql)]
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        return [tuple(row) for row in conn.execute(sql)]  # type: ignore[arg-type]


def plain_value(value: Any) -> Any:
    """One spelling per value: timestamptz as poller's ISO text, numeric as float, boolean as 0/1."""
    if isinstance(value, datetime):
        return to_text(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bool):
        return int(value)
    return value


def plain(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(plain_value(v) for v in row)


RECIPES = [(title, sql, backends_of(block)) for block in sql_blocks() for title, sql in statements(block)]


def test_the_readme_has_the_recipes():
    titles = [title for title, _, _ in RECIPES]
    assert len(titles) >= 6 and all(titles), titles
    # A database-specific variant always has its twin for the other database.
    variants: dict[str, set[str]] = {}
    for title, _, backends in RECIPES:
        if backends != BACKENDS:
            variants.setdefault(title.split(" (")[0], set()).update(backends)
    assert variants and all(found == set(BACKENDS) for found in variants.values()), variants


@pytest.mark.parametrize(("title", "sql", "backends"), RECIPES, ids=[t for t, _, _ in RECIPES])
def test_recipe_runs_on_its_databases(databases: dict[str, str], title: str, sql: str, backends: tuple[str, ...]):
    results = {b: sorted((plain(r) for r in run(b, databases[b], sql)), key=repr) for b in backends}
    for backend, rows in results.items():
        assert rows, f"{title!r} returned nothing on {backend}"
    if len(results) == 2:
        assert results["sqlite"] == results["postgresql"], title


def test_recipe_results_say_what_their_titles_say(databases: dict[str, str]):
    by_title = {title: (sql, backends) for title, sql, backends in RECIPES}
    failing = run("postgresql", databases["postgresql"], by_title["Watches failing right now"][0])
    assert [(r[0], r[1]) for r in failing] == [("flaky", 2)]
    rates = [
        plain(r)
        for r in run(
            "postgresql",
            databases["postgresql"],
            by_title["Error rate per watch over the retained polls (a polls row is a run of `count` identical polls)"][
                0
            ],
        )
    ]
    assert rates[0] == ("flaky", 3, 2, 66.7)
    latest = run("sqlite", databases["sqlite"], by_title["Latest change per key"][0])
    assert sorted((r[0], r[1], r[2]) for r in latest) == [
        ("app", "modified", '"a2"'),
        ("flaky", "first_seen", '"f1"'),
        ("gone", "deleted", None),
    ]
    # Both "last day" variants: the same rows, the two-day-old events left out.
    day = {
        b: sorted(plain(r) for r in run(b, databases[b], sql))
        for t, (sql, (b, *_)) in by_title.items()
        if t.startswith("Changes in the last day")
    }
    assert day["sqlite"] == day["postgresql"]
    assert sorted((r[1], r[2]) for r in day["sqlite"]) == [("app", "modified"), ("flaky", "first_seen")]
