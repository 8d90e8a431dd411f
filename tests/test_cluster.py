"""Several daemons on one PostgreSQL database (issue 11, parts 3-4): shard leases and rebalancing,
fencing in the committing transaction, exactly-once history (compare-and-set and a unique per-key
sequence, on both backends), the outbox claimed with SKIP LOCKED, one pruner, `poller status`."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from conftest import ConfigFile, fail_once, run_cli, wait_for
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from poller.cluster import Membership, shard_of
from poller.config import ClusterSettings
from poller.model import ObjectState, PollResult, Watch
from poller.store import (
    _FENCE_SQL,
    Fenced,
    Retargeted,
    Store,
    StoreError,
    Superseded,
    fair_share,
    migrate,
    migrations_dir,
    open_engine,
    session_name,
)
from poller.watchlist import WatchSpec

NOW = datetime(2026, 11, 24, 10, 0, 0, tzinfo=UTC)
pg_only = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


def _store(url: str) -> Store:
    engine = open_engine(url)
    migrate(engine)
    return Store(engine)


@pytest.fixture
def stores(db_url: str) -> Iterator[list[Store]]:
    """Three stores on one database, as three daemons would have."""
    made = [_store(db_url) for _ in range(3)]
    yield made
    for s in made:
        s.close()


def specs(*names: str) -> list[WatchSpec]:
    return [WatchSpec(n, "bucket", f"key/{n}", 60.0, None) for n in names]


def state(etag: str | None, present: bool = True) -> ObjectState:
    return ObjectState(etag, NOW, NOW, None, 3, present)


def change(watch: Watch, previous: ObjectState | None, new: ObjectState, event: str) -> PollResult:
    outcome = "missing" if not new.present else "modified"
    return PollResult(watch, NOW, outcome, 200, 1.0, previous, new, event)  # type: ignore[arg-type]


def unchanged(watch: Watch, current: ObjectState) -> PollResult:
    return PollResult(watch, NOW, "unchanged", 304, 1.0, current, current)


def history(store: Store) -> list[tuple[str, str, int]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT event, etag, seq FROM etag_history ORDER BY id"))]  # type: ignore[misc]


def stored_etag(store: Store, watch: Watch) -> tuple[str | None, int]:
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT etag, seq FROM object_state WHERE watch_id = :w"), {"w": watch.id}).one()
    return row[0], int(row[1])


def test_fair_share_and_shard_of_are_stable():
    assert [fair_share(64, n) for n in (0, 1, 2, 3, 64, 100)] == [64, 64, 32, 22, 1, 1]
    assert shard_of("a", 64) == shard_of("a", 64)
    counts = [0] * 8
    for i in range(8000):
        counts[shard_of(f"w{i}", 8)] += 1
    assert min(counts) > 800  # names spread over the shards


def test_heartbeat_must_fit_twice_in_a_lease():
    with pytest.raises(ValueError, match="at most half of lease"):
        ClusterSettings(lease=5.0, heartbeat=3.0)


# --- exactly-once recording: both backends --------------------------------------------------


def test_a_change_is_recorded_once_when_two_writers_report_it(stores: list[Store]):
    a, b, _ = stores
    watch = a.sync_watches(specs("w"), NOW).watches["w"]
    assert a.record([change(watch, None, state('"x"'), "first_seen")]) == {}
    x = state('"x"')
    assert a.record([change(watch, x, state('"y"'), "modified")]) == {}
    refused = b.record([change(watch, x, state('"y"'), "modified")])
    assert list(refused) == [0] and isinstance(refused[0], Superseded)
    assert history(a) == [("first_seen", '"x"', 1), ("modified", '"y"', 2)]
    assert stored_etag(a, watch) == ('"y"', 2)
    # The loser's stale "unchanged" must not put the old ETag back either.
    b.record([unchanged(watch, x)])
    assert stored_etag(a, watch) == ('"y"', 2)
    # Two first sightings: the second one finds the row and records nothing.
    other = a.sync_watches(specs("w", "v"), NOW).watches["v"]
    assert a.record([change(other, None, state('"p"'), "first_seen")]) == {}
    assert isinstance(b.record([change(other, None, state('"q"'), "first_seen")])[0], Superseded)
    assert [h for h in history(a) if h[1] in ('"p"', '"q"')] == [("first_seen", '"p"', 1)]


def test_a_batch_of_changes_is_decided_change_by_change(stores: list[Store]):
    """On PostgreSQL a batch's compare-and-sets go in one pipeline: each change is still recorded or
    refused on its own, a key never stored is inserted, and one that only held errors is taken over."""
    a, b, _ = stores
    ws = a.sync_watches(specs("w0", "w1", "w2", "w3", "w4"), NOW).watches
    x = state('"x"')
    assert a.record([change(ws[n], None, x, "first_seen") for n in ("w0", "w1", "w2")]) == {}
    assert a.record([PollResult(ws["w4"], NOW, "error", None, 1.0, None, None, None, "503 Slow Down")]) == {}
    assert b.record([change(ws["w1"], x, state('"b"'), "modified")]) == {}  # another writer was first
    refused = a.record(
        [
            change(ws["w0"], x, state('"y0"'), "modified"),
            change(ws["w1"], x, state('"y1"'), "modified"),
            change(ws["w2"], x, state(None, present=False), "deleted"),
            change(ws["w3"], None, state('"y3"'), "first_seen"),
            change(ws["w4"], None, state('"y4"'), "first_seen"),
        ]
    )
    assert list(refused) == [1] and isinstance(refused[1], Superseded)
    assert [stored_etag(a, ws[n]) for n in ("w0", "w1", "w2", "w3", "w4")] == [
        ('"y0"', 2),
        ('"b"', 2),
        (None, 2),
        ('"y3"', 1),
        ('"y4"', 1),
    ]
    assert sorted(history(a))[-1] == ("modified", '"y0"', 2)
    assert len(history(a)) == 3 + 1 + 4  # the refused change left no row


def test_an_unchanged_poll_of_a_state_another_writer_moved_on_from_is_refused(stores: list[Store]):
    """`poller once` (it fences nothing) records X -> Y while a daemon's cache still says X, and the
    object goes back to X: the daemon's poll says unchanged (a 304 to If-None-Match X). The guard
    keeps Y; were that silent, the daemon would keep polling against X and Y -> X would never be
    recorded. Refused, the daemon reads Y back and its next poll records the change."""
    daemon, once = stores[0], stores[1]
    watches = daemon.sync_watches(specs(*[f"w{i:02d}" for i in range(12)]), NOW).watches
    x = state('"x"')
    assert daemon.record([change(w, None, x, "first_seen") for w in watches.values()]) == {}
    w0 = watches["w00"]
    assert once.record([change(w0, x, state('"y"'), "modified")]) == {}
    # Alone, and in a batch large enough to be staged on PostgreSQL.
    for batch in ([unchanged(w0, x)], [unchanged(w, x) for w in watches.values()]):
        refused = daemon.record(batch)
        assert list(refused) == [0] and isinstance(refused[0], Superseded), refused
        assert "unchanged, but not against the stored state" in str(refused[0])
    assert stored_etag(daemon, w0) == ('"y"', 2)
    assert stored_etag(daemon, watches["w01"]) == ('"x"', 1)
    assert daemon.record([change(w0, state('"y"'), x, "modified")]) == {}
    assert history(daemon)[-2:] == [("modified", '"y"', 2), ("modified", '"x"', 3)]


def test_the_database_refuses_a_second_history_row_at_one_sequence_number(stores: list[Store]):
    a = stores[0]
    watch = a.sync_watches(specs("w"), NOW).watches["w"]
    a.record([change(watch, None, state('"x"'), "first_seen")])
    with pytest.raises(IntegrityError), a.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO etag_history (watch_id, key, detected_at, event, etag, seq) "
                "VALUES (:w, :k, :t, 'first_seen', '\"z\"', 1)"
            ),
            {"w": watch.id, "k": watch.key, "t": NOW.isoformat()},
        )


def test_a_key_retargeted_away_and_back_keeps_numbering(stores: list[Store]):
    a = stores[0]
    watch = a.sync_watches(specs("w"), NOW).watches["w"]
    a.record([change(watch, None, state('"x"'), "first_seen")])
    a.sync_watches([WatchSpec("w", "bucket", "elsewhere", 60.0, None)], NOW)
    watch = a.sync_watches(specs("w"), NOW).watches["w"]  # back: its state row was dropped
    assert a.record([change(watch, None, state('"y"'), "first_seen")]) == {}
    assert [seq for _, _, seq in history(a)] == [1, 2]


# --- leases, fencing, outbox: PostgreSQL ---------------------------------------------------------


def _members(stores: list[Store], shards: int = 8, lease: float = 30.0) -> list[Membership]:
    settings = ClusterSettings(shards=shards, lease=lease, heartbeat=lease / 3)
    members = []
    for s in stores:
        m = Membership(s, settings, lambda gained, lost: None)
        s.fence = m
        members.append(m)
    return members


@pg_only
def test_daemons_split_the_shards_and_rebalance_when_one_joins(stores: list[Store]):
    (a,) = _members(stores[:1])
    a.beat()
    assert len(a.epochs()) == 8  # alone: every shard
    b, c = _members(stores[1:])
    b.beat()
    c.beat()  # live = 3: nothing is free yet
    assert b.epochs() == {} and c.epochs() == {}
    for m in (a, b, c):  # a gives back what exceeds its share; b and c take it
        m.beat()
    for m in (a, b, c):
        m.beat()
    held = [set(m.epochs()) for m in (a, b, c)]
    assert sorted(len(h) for h in held) == [2, 3, 3]
    assert set().union(*held) == set(range(8)) and sum(len(h) for h in held) == 8
    rows = stores[0].cluster_status()
    assert [len(r["shards"]) for r in rows] == [len(h) for h in held]
    assert all(r["heartbeat_age"] < 5 for r in rows)


@pg_only
def test_a_daemon_whose_lease_moved_on_cannot_commit(stores: list[Store]):
    a, b, _ = _members(stores, shards=1)
    a.beat()
    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]
    assert stores[0].record([change(watch, None, state('"x"'), "first_seen")]) == {}
    # a pauses past its lease; b takes the shard over (a new epoch).
    with stores[0].engine.begin() as conn:
        conn.execute(text("UPDATE shard_leases SET expires_at = now() - interval '1 second'"))
    b.beat()
    assert b.epochs() == {0: 2}
    refused = stores[0].record([change(watch, state('"x"'), state('"y"'), "modified")])
    assert isinstance(refused[0], Fenced)
    assert history(stores[0]) == [("first_seen", '"x"', 1)]
    with stores[0].engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM polls")).scalar() == 1  # not even the poll row
    assert stores[1].record([change(watch, state('"x"'), state('"y"'), "modified")]) == {}
    # a comes back: it holds nothing, so it polls nothing until the next rebalance.
    a.beat()
    assert a.epochs() == {}


@pg_only
def test_a_result_polled_before_a_handover_and_back_is_refused(stores: list[Store]):
    """A poll made under one epoch, committed after the shard went to another daemon and came back:
    the other recorded a creation and a deletion meanwhile, so the stored state is again the one the
    poll started from and a compare-and-set on the ETag would take the old `created` a second time."""
    a, b, _ = _members(stores, shards=1)
    a.beat()
    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]
    gone = state(None, present=False)
    assert stores[0].record([change(watch, None, state('"x"'), "first_seen")]) == {}
    assert stores[0].record([change(watch, state('"x"'), gone, "deleted")]) == {}
    polled_at = a.epoch_of("w")
    assert polled_at == a.epochs()[0]
    late = change(watch, gone, state('"y"'), "created")  # a's poll, its commit delayed
    # a pauses past its lease; b takes the shard and records what a saw, then the next deletion.
    with stores[0].engine.begin() as conn:
        conn.execute(text("UPDATE shard_leases SET expires_at = now() - interval '1 second'"))
    b.beat()
    assert stores[1].record([change(watch, gone, state('"y"'), "created")], epochs=[b.epoch_of("w")]) == {}
    assert stores[1].record([change(watch, state('"y"'), gone, "deleted")], epochs=[b.epoch_of("w")]) == {}
    b.stop()  # b leaves; a claims the shard again, at a later epoch
    a.beat()
    assert a.epoch_of("w") is not None and a.epoch_of("w") != polled_at
    refused = stores[0].record([late], epochs=[polled_at])
    assert isinstance(refused[0], Fenced) and "claimed back since this poll was made" in str(refused[0])
    assert history(stores[0]) == [
        ("first_seen", '"x"', 1),
        ("deleted", None, 2),
        ("created", '"y"', 3),
        ("deleted", None, 4),
    ]
    # A poll made under the epoch held now commits.
    assert stores[0].record([change(watch, gone, state('"z"'), "created")], epochs=[a.epoch_of("w")]) == {}
    assert history(stores[0])[-1] == ("created", '"z"', 5)


@pg_only
def test_a_poll_is_not_made_for_a_shard_not_held(stores: list[Store], db_url: str):
    """The daemon's poll path reads the epoch before it observes anything: none held, no request."""
    from poller.pipeline import PollService, Recorder

    (a,) = _members(stores[:1], shards=1)
    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]

    class Prober:
        calls = 0

        def probe(self, w: Watch, s: ObjectState | None) -> PollResult:
            Prober.calls += 1
            return change(w, None, state('"x"'), "first_seen")

    service = PollService(stores[0], Prober(), Recorder(stores[0]), db_url)  # type: ignore[arg-type]
    try:
        assert service.poll(watch) is None and Prober.calls == 0  # no beat yet: nothing held
        a.beat()
        assert service.poll(watch) is not None and Prober.calls == 1
    finally:
        service.recorder.close()
    assert history(stores[0]) == [("first_seen", '"x"', 1)]


@pg_only
def test_a_result_of_a_target_another_daemon_re_pointed_is_refused(stores: list[Store]):
    """Daemons reload one after the other: the first re-points a watch to another bucket (same key)
    and drops the old object's state; the holder, not reloaded yet, still polls the old object. Its
    304 would put the old object's state back as the new target's, which the holder then conditions
    its first poll of the new target on."""
    (a,) = _members(stores[:1], shards=1)
    a.beat()
    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]
    assert stores[0].record([change(watch, None, state('"x"'), "first_seen")], epochs=[a.epoch_of("w")]) == {}
    elsewhere = [WatchSpec("w", "elsewhere", "key/w", 60.0, None)]
    assert stores[1].sync_watches(elsewhere, NOW).retargeted  # the other daemon's reload
    refused = stores[0].record([unchanged(watch, state('"x"'))], epochs=[a.epoch_of("w")])
    assert isinstance(refused[0], Retargeted) and "re-pointed by another daemon's reload" in str(refused[0])
    with stores[0].engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM object_state")).scalar() == 0
    moved = stores[0].sync_watches(elsewhere, NOW).watches["w"]  # the holder reloads: its polls count again
    assert stores[0].record([change(moved, None, state('"x"'), "first_seen")], epochs=[a.epoch_of("w")]) == {}
    assert history(stores[0]) == [("first_seen", '"x"', 1), ("first_seen", '"x"', 2)]


@pg_only
def test_a_result_committed_while_a_re_pointing_sync_is_open_waits_and_is_refused(stores: list[Store]):
    """The target check reads committed rows: a batch committed while another daemon's sync that
    re-points its watch is still open waits for that sync (REPOINT_LOCK), then sees the new target.
    Unlocked, it read the old one and put the old object's state back after the sync dropped it."""
    from sqlalchemy import event

    (a,) = _members(stores[:1], shards=1)
    a.beat()
    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]
    assert stores[0].record([change(watch, None, state('"x"'), "first_seen")], epochs=[a.epoch_of("w")]) == {}
    inside, go = threading.Event(), threading.Event()

    def hold_commit(conn: Any) -> None:
        if not inside.is_set():
            inside.set()
            assert go.wait(30)

    event.listen(stores[1].engine, "commit", hold_commit)
    elsewhere = [WatchSpec("w", "elsewhere", "key/w", 60.0, None)]
    synced: list[Any] = []
    refused: list[dict[int, Exception]] = []
    sync = threading.Thread(target=lambda: synced.append(stores[1].sync_watches(elsewhere, NOW)))
    write = threading.Thread(
        target=lambda: refused.append(stores[0].record([unchanged(watch, state('"x"'))], epochs=[a.epoch_of("w")]))
    )
    sync.start()
    try:
        assert inside.wait(30), "the sync reached its commit"
        write.start()

        def waiting() -> bool:
            with stores[2].engine.connect() as conn:
                return bool(conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")).scalar())

        wait_for(waiting, what="the batch waiting for the open sync")
        assert write.is_alive()
    finally:
        go.set()
        sync.join(30)
        write.join(30)
        event.remove(stores[1].engine, "commit", hold_commit)
    assert synced[0].retargeted and isinstance(refused[0][0], Retargeted)
    with stores[0].engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM object_state")).scalar() == 0


@pg_only
def test_two_daemons_syncing_one_re_point_drop_the_old_state_once(stores: list[Store], monkeypatch: pytest.MonkeyPatch):
    """Both daemons reload the same config: the second read the watch rows before the first
    committed the re-point, and the new target's first state is stored meanwhile. The second must
    not take the watch for still re-pointed (it read the rows again under the lock) and drop it."""
    import poller.store as store_module

    (a,) = _members(stores[:1], shards=1)
    a.beat()
    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]
    assert stores[0].record([change(watch, None, state('"x"'), "first_seen")], epochs=[a.epoch_of("w")]) == {}
    elsewhere = [WatchSpec("w", "elsewhere", "key/w", 60.0, None)]
    read, go = threading.Event(), threading.Event()
    reads = store_module._watch_rows
    second: list[threading.Thread] = []

    def paused_read(conn: Any) -> Any:
        rows = reads(conn)
        if threading.current_thread() in second and not read.is_set():
            read.set()
            assert go.wait(30)
        return rows

    monkeypatch.setattr(store_module, "_watch_rows", paused_read)
    synced: list[Any] = []
    second.append(threading.Thread(target=lambda: synced.append(stores[1].sync_watches(elsewhere, NOW))))
    second[0].start()
    try:
        assert read.wait(30)
        moved = stores[0].sync_watches(elsewhere, NOW).watches["w"]  # the first daemon's reload
        assert stores[0].record([change(moved, None, state('"y"'), "first_seen")], epochs=[a.epoch_of("w")]) == {}
    finally:
        go.set()
        second[0].join(30)
    assert not synced[0].retargeted
    with stores[0].engine.connect() as conn:
        assert conn.execute(text("SELECT etag FROM object_state")).scalars().all() == ['"y"']


def test_a_re_pointed_watchs_dropped_results_are_told_once(stores: list[Store], db_url: str, caplog: Any):
    """Every poll of it is dropped until this daemon reloads: one warning, not a line per poll."""
    from poller.pipeline import PollService, Recorder

    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]
    service = PollService(stores[0], None, Recorder(stores[0]), db_url)  # type: ignore[arg-type]
    try:
        dropped = unchanged(watch, state('"x"'))
        with caplog.at_level("WARNING", logger="poller.pipeline"):
            for _ in range(3):
                service._unrecorded(dropped, Retargeted("the watch was re-pointed by another daemon's reload"))
            service.forget(watch.id)  # this daemon's own reload re-points it: a later mismatch is told again
            service._unrecorded(dropped, Retargeted("the watch was re-pointed by another daemon's reload"))
    finally:
        service.recorder.close()
    told = [r for r in caplog.records if "re-pointed by another daemon's reload" in r.getMessage()]
    assert len(told) == 2 and all(r.levelname == "WARNING" for r in told)


@pg_only
def test_lapsed_lease_is_not_used_even_before_anyone_claims_it(stores: list[Store]):
    clock = [0.0]
    settings = ClusterSettings(shards=2, lease=10.0, heartbeat=3.0)
    m = Membership(stores[0], settings, lambda gained, lost: None, clock=lambda: clock[0])
    stores[0].fence = m
    m.beat()
    assert len(m.epochs()) == 2
    clock[0] = 10.5  # no renewal for a lease (e.g. the database unreachable): stop trusting it
    assert m.epochs() == {}


@pg_only
def test_outbox_rows_are_claimed_by_one_daemon(stores: list[Store]):
    a, b, _ = _members(stores)
    a.beat()
    b.beat()
    watch = stores[0].sync_watches(specs(*[f"w{i}" for i in range(20)]), NOW).watches
    stores[2].fence = None  # recorded by a writer that fences nothing (as `poller once` does)
    stores[2].record(
        [change(w, None, state(f'"{w.name}"'), "first_seen") for w in watch.values()],
        route=lambda name, event: ["hook"],
    )
    first = stores[0].due_notifications(NOW + timedelta(seconds=1), limit=12)
    second = stores[1].due_notifications(NOW + timedelta(seconds=1), limit=100)
    assert len(first) == 12 and len(second) == 8
    assert not {r["id"] for r in first} & {r["id"] for r in second}
    # a dies holding its claims: once its heartbeat is a lease old, b takes them.
    stores[1].delivered(second[0]["id"], NOW)
    with stores[0].engine.begin() as conn:
        conn.execute(
            text("UPDATE instances SET heartbeat_at = now() - interval '1 hour' WHERE id = :i"), {"i": a.instance_id}
        )
    again = stores[1].due_notifications(NOW + timedelta(seconds=1), limit=100)
    assert {r["id"] for r in again} == {r["id"] for r in first} | {r["id"] for r in second[1:]}


@pg_only
def test_a_daemon_claims_no_row_of_a_sink_it_does_not_know(stores: list[Store]):
    """A sink added to one daemon's config before the other's reload: the other neither claims its
    rows nor gives them up ("sink no longer configured" failed them for good)."""
    a, b, _ = _members(stores)
    a.beat()
    b.beat()
    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]
    stores[2].fence = None
    stores[2].record([change(watch, None, state('"x"'), "first_seen")], route=lambda name, event: ["old", "new"])
    later = NOW + timedelta(seconds=1)
    assert [r["sink"] for r in stores[1].due_notifications(later, sinks=["old"])] == ["old"]
    assert [r["sink"] for r in stores[0].due_notifications(later, sinks=["old", "new"])] == ["new"]


@pg_only
def test_one_instance_prunes_at_a_time(stores: list[Store]):
    with stores[0].engine.connect() as holder:
        holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": 0x706F6C6C6572 + 1})
        holder.commit()
        assert stores[1].prune_polls(NOW).runs == 0  # skipped, not blocked
        holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": 0x706F6C6C6572 + 1})
        holder.commit()


@pg_only
def test_leave_hands_every_shard_back(stores: list[Store]):
    a, b, c = _members(stores, shards=4)
    a.beat()
    assert len(a.epochs()) == 2  # three live instances: at most 2 of 4 shards each
    a.stop()
    b.beat()
    c.beat()
    assert len(b.epochs()) == 2 and len(c.epochs()) == 2  # a's went back at once, no lease to wait
    assert [r["id"] for r in stores[1].cluster_status()] == [b.instance_id, c.instance_id]


@pg_only
def test_status_shows_the_daemons_their_heartbeats_and_watches(stores: list[Store], db_url: str, config: ConfigFile):
    stores[0].sync_watches(specs(*[f"w{i}" for i in range(10)]), NOW)
    config.write(
        watches=[{"name": f"w{i}", "bucket": "bucket", "key": f"key/w{i}"} for i in range(10)],
        database={"url": db_url},
        cluster={"shards": 4},
    )
    a, b, _ = _members(stores, shards=4)
    a.beat()
    b.beat()
    out = run_cli("status", "--config", str(config.path))
    assert out.returncode == 0, out.stderr
    text_out = out.stdout
    assert "daemons (PostgreSQL; 10 watches in 4 shards, lease 15s):" in text_out
    per_shard = [sum(1 for i in range(10) if shard_of(f"w{i}", 4) == s) for s in range(4)]
    for m in (a, b):
        shards = sorted(m.epochs())
        line = f"instance {m.instance_id} {m.host} pid {m.pid} started "
        assert line in text_out
        assert f"{len(shards)} shards, {sum(per_shard[s] for s in shards)} watches" in text_out
    assert "held by no daemon now" not in text_out
    # The third registered instance never renewed: no shards, and a stale heartbeat once a lease is gone.
    assert f"instance {stores[2].fence.instance_id} " in text_out  # type: ignore[union-attr]


@pg_only
def test_a_daemon_that_fails_to_start_leaves_no_live_instance(
    stores: list[Store], db_url: str, config: ConfigFile, start_daemon: Any
):
    """Its instance row would count as live for a lease: the others would shrink their share and
    give back shards nobody claims (a crash-looping unit keeps a few such rows live)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config.write(
            [{"name": "a", "bucket": "bucket", "key": "a"}],
            database={"url": db_url},
            metrics={"listen": f"127.0.0.1:{port}"},
        )
        daemon = start_daemon(config)
        assert daemon.proc.wait(60) == 1
    assert "cannot serve metrics" in daemon.log, daemon.log
    with stores[0].engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM instances")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM shard_leases WHERE instance_id IS NOT NULL")).scalar() == 0


@pg_only
def test_once_is_refused_while_daemons_poll_the_database(stores: list[Store], db_url: str, config: ConfigFile):
    """As SQLite's writer lock refuses it: `once` beside daemons would poll their watches a second
    time and write states their caches have not seen."""
    config.write([{"name": "w", "bucket": "bucket", "key": "key/w"}], database={"url": db_url}, cluster={"shards": 4})
    (a,) = _members(stores[:1], shards=4)
    a.beat()
    out = run_cli("once", "--config", str(config.path))
    assert out.returncode == 1, out.stderr
    assert f"1 daemon polls this database (instance {a.instance_id} on {a.host} pid {a.pid})" in out.stderr
    assert "Traceback" not in out.stderr
    # Its own lease may be longer than this config's: a daemon holding an unexpired shard counts too.
    with stores[0].engine.begin() as conn:
        conn.execute(text("UPDATE instances SET heartbeat_at = now() - interval '1 minute'"))
    out = run_cli("once", "--config", str(config.path))
    assert out.returncode == 1 and "1 daemon polls this database" in out.stderr, out.stderr
    a.stop()  # gone: `once` runs
    out = run_cli("once", "--config", str(config.path))
    assert "daemon polls this database" not in out.stderr, out.stderr


@pg_only
def test_a_daemon_with_another_shard_count_is_refused(stores: list[Store]):
    _members(stores[:1], shards=8)[0].beat()
    refused = r"\[cluster\] shards = 16, but the daemons running on this database \(1\) use 8"
    with pytest.raises(StoreError, match=refused):
        _members(stores[1:2], shards=16)
    with stores[0].engine.begin() as conn:  # all stopped: the new count takes over
        conn.execute(text("UPDATE instances SET heartbeat_at = now() - interval '1 hour'"))
        old_top = conn.execute(text("SELECT max(epoch) FROM shard_leases")).scalar()
    (m,) = _members(stores[1:2], shards=16)
    m.beat()
    assert len(m.epochs()) == 16
    assert min(m.epochs().values()) > old_top  # no epoch of the old table comes back


@pg_only
def test_a_daemon_paused_across_a_shard_count_change_stops_polling(
    stores: list[Store], caplog: pytest.LogCaptureFixture
):
    """It wakes with 8 shards while the others now use 16: shard 3 names other watches now, so it
    must hold nothing (not claim rows of the new table under its own count) and say why."""
    (a,) = _members(stores[:1], shards=8)
    a.beat()
    assert len(a.epochs()) == 8
    with stores[0].engine.begin() as conn:  # a paused a long time; the operator restarted the rest
        conn.execute(text("UPDATE instances SET heartbeat_at = now() - interval '1 hour'"))
    (b,) = _members(stores[1:2], shards=16)
    with caplog.at_level("ERROR", logger="poller.cluster"):
        a.beat()
        a.beat()
    assert a.epochs() == {}
    refusals = [r.getMessage() for r in caplog.records if "this one's [cluster] shards = 8" in r.getMessage()]
    assert len(refusals) == 1, refusals  # said once, not at every heartbeat
    assert "now use 16 shards" in refusals[0]
    b.beat()
    assert len(b.epochs()) == 16  # nothing of the new table went to a


def test_migration_0006_numbers_the_history_already_recorded(db_url: str):
    engine = open_engine(db_url)
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    with engine.connect() as conn, conn.begin():
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO watches (name, bucket, key, kind, active, created_at)"
                 " VALUES ('a', 'b', 'k', 'key', :y, :t)"),
            {"y": True, "t": NOW.isoformat()},
        )  # fmt: skip
        conn.execute(
            text("INSERT INTO object_state (watch_id, key, etag, present, consecutive_errors)"
                 " VALUES (1, 'k', '\"z\"', :y, 0)"),
            {"y": True},
        )  # fmt: skip
        # Two keys' histories interleaved, as a prefix watch writes them.
        for key, event, etag in [("k", "first_seen", '"x"'), ("j", "first_seen", '"p"'), ("k", "modified", '"y"'),
                                 ("k", "modified", '"z"'), ("j", "deleted", None)]:  # fmt: skip
            conn.execute(
                text(
                    "INSERT INTO etag_history (watch_id, key, detected_at, event, etag) VALUES (1, :k, :t, :e, :etag)"
                ),
                {"k": key, "t": NOW.isoformat(), "e": event, "etag": etag},
            )
    migrate(engine)
    store = Store(engine)
    try:
        with engine.connect() as conn:
            seqs = conn.execute(text("SELECT key, seq FROM etag_history ORDER BY id")).all()
            assert [tuple(r) for r in seqs] == [("k", 1), ("j", 1), ("k", 2), ("k", 3), ("j", 2)]
            assert conn.execute(text("SELECT seq FROM object_state")).scalar() == 3
        # The next change continues the numbering.
        watch = store.sync_watches([WatchSpec("a", "b", "k", 60.0, None)], NOW).watches["a"]
        assert store.record([change(watch, state('"z"'), state('"w"'), "modified")]) == {}
        assert history(store)[-1] == ("modified", '"w"', 4)
    finally:
        store.close()


@pg_only
def test_a_daemon_frozen_inside_a_transaction_does_not_keep_its_shards_locked(db_url: str):
    """SIGSTOP (or a paused VM) mid-commit: the fencing share lock on its shard rows would block every
    claim (SKIP LOCKED skips them) for as long as the process stays frozen. The server ends the idle
    transaction, and the shards can be claimed."""
    from conftest import wait_for

    frozen_engine = open_engine(db_url, idle_in_transaction=1.0)
    migrate(frozen_engine)
    with frozen_engine.begin() as conn:
        conn.execute(text("INSERT INTO shard_leases (shard, epoch) VALUES (0, 1) ON CONFLICT DO NOTHING"))
    frozen = frozen_engine.connect()
    frozen.begin()
    frozen.execute(text("SELECT shard FROM shard_leases WHERE shard = 0 FOR SHARE"))  # as a commit's fence does
    other = open_engine(db_url)

    def claimable() -> bool:
        with other.begin() as conn:
            rows = conn.execute(text("SELECT shard FROM shard_leases WHERE shard = 0 FOR UPDATE SKIP LOCKED"))
            return rows.first() is not None

    try:
        assert not claimable()  # held while the frozen transaction lives
        wait_for(claimable, 15, what="the server to end the frozen daemon's idle transaction")
    finally:
        frozen.invalidate()
        frozen_engine.dispose()
        other.dispose()


def _expire(store: Store, member: Membership) -> None:
    """``member`` stops beating: its leases and heartbeat lapse."""
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE shard_leases SET expires_at = now() - interval '1 second'"))
        conn.execute(
            text("UPDATE instances SET heartbeat_at = now() - interval '1 minute' WHERE id = :i"),
            {"i": member.instance_id},
        )


def _frozen_inside_a_copy(store: Store, observer: Store, member: Membership) -> tuple[Any, Any]:
    """A writer's connection of ``member`` stopped inside a batch: shard 0 locked as the fence locks
    it, a COPY open. Returns the pool's connection (invalidate it when done) and the COPY, which must
    stay referenced: collected, psycopg would end it (CopyFail) and the transaction with it."""
    raw = store.engine.raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    cursor = driver.cursor()
    cursor.execute("SELECT shard FROM shard_leases WHERE shard = 0 FOR KEY SHARE")  # as the fence locks
    copy = cursor.copy("COPY poll_samples (run_id, polled_at, duration_us) FROM STDIN")
    copy.__enter__().write_row((1, 2, 3))
    with observer.engine.connect() as conn:
        frozen = conn.execute(
            text("SELECT application_name, state FROM pg_stat_activity WHERE pid = :p"), {"p": driver.info.backend_pid}
        )
        # "active", not "idle in transaction": no server timeout applies.
        assert tuple(frozen.one()) == (session_name(member.instance_id, "public"), "active")
    return raw, copy


@pg_only
def test_a_daemon_frozen_inside_a_copy_has_its_sessions_ended_by_the_claimer(stores: list[Store]):
    """SIGSTOP mid-COPY: the session counts as active, so no server timeout ends it, and the fence's
    row locks would keep its shards from every claim for as long as it stays frozen. The daemon
    that wants them ends that instance's sessions (found by their application_name), then claims."""
    from conftest import wait_for

    (a,) = _members(stores[:1], shards=2, lease=30.0)
    a.beat()
    assert len(a.epochs()) == 2
    (b,) = _members(stores[1:2], shards=2, lease=30.0)
    _expire(stores[1], a)
    raw, _copy = _frozen_inside_a_copy(stores[0], stores[1], a)

    def claimed_both() -> bool:
        b.beat()
        return len(b.epochs()) == 2

    try:
        wait_for(claimed_both, 10, what="b to end a's frozen sessions and claim its locked shard")

        def sessions_left() -> int:
            with stores[1].engine.connect() as conn:
                return int(
                    conn.execute(
                        text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :n"),
                        {"n": session_name(a.instance_id, "public")},
                    ).scalar_one()
                )

        wait_for(lambda: sessions_left() == 0, 10, what="every session of a to end")
    finally:
        raw.invalidate()
    # a wakes: what it had not committed is refused by the fence (its connection is gone; a new one
    # finds the shards held by b at a new epoch).
    watch = stores[0].sync_watches(specs("w"), NOW).watches["w"]
    refused = stores[0].record([change(watch, None, state('"x"'), "first_seen")])
    assert isinstance(refused[0], Fenced)
    assert stores[1].record([change(watch, None, state('"x"'), "first_seen")]) == {}  # b records it
    assert history(stores[0]) == [("first_seen", '"x"', 1)]


@pg_only
def test_a_claimer_not_allowed_to_end_a_frozen_holder_says_so_and_keeps_its_own_leases(
    stores: list[Store], db_url: str, caplog: pytest.LogCaptureFixture
):
    """Daemons under different database roles: PostgreSQL refuses to end another role's sessions.
    The heartbeat still renews and claims what it can, and the log says what to do."""
    (a,) = _members(stores[:1], shards=2, lease=30.0)  # the fixture's superuser
    a.beat()
    role = f"r_{uuid.uuid4().hex[:12]}"
    with stores[0].engine.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {role}"))
        conn.execute(text(f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role}"))
    other = _store(db_url.replace("://postgres@", f"://{role}@"))
    try:
        (b,) = _members([other], shards=2, lease=30.0)
        _expire(other, a)
        raw, _copy = _frozen_inside_a_copy(stores[0], stores[1], a)
        try:
            b.beat()
            b.beat()
            assert list(b.epochs()) == [1]  # the unlocked shard; its own heartbeat did not fail
            assert f"could not end the database sessions of {session_name(a.instance_id, 'public')}" in caplog.text
            assert "run every daemon as the same role" in caplog.text
            assert caplog.text.count("could not end the database sessions") == 1  # not at every heartbeat
        finally:
            raw.invalidate()
    finally:
        other.close()


@pg_only
def test_a_live_daemon_inside_a_long_write_keeps_renewing_and_is_not_taken_for_frozen(stores: list[Store]):
    """Its writer's fence must not hold back its own heartbeat: otherwise a write longer than the
    lease lets the lease and heartbeat lapse, and the others end the sessions of a live daemon."""
    (a,) = _members(stores[:1], shards=2, lease=30.0)
    a.beat()
    (b,) = _members(stores[1:2], shards=2, lease=30.0)
    raw = stores[0].engine.raw_connection()  # a's writer, in the middle of a long batch
    try:
        cursor = raw.cursor()
        cursor.execute(_FENCE_SQL, ([0, 1], a.instance_id))
        assert len(cursor.fetchall()) == 2
        with stores[1].engine.begin() as conn:  # the lease lapsed meanwhile; a's heartbeat has not
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))  # under FOR SHARE, this waited too
            conn.execute(text("UPDATE shard_leases SET expires_at = now() - interval '1 second'"))
        beat = threading.Thread(target=a.beat)  # renews under FOR NO KEY UPDATE: not held back by its writer
        beat.start()
        beat.join(10)
        assert not beat.is_alive(), "the heartbeat waited for its own writer's fence"
        assert a.epochs() == {0: 1}  # renewed its fair share, gave shard 1 back (b has joined)
        b.beat()  # a is live: b ends nobody, and cannot claim shard 1 before a's write commits
        assert b.epochs() == {}
        cursor.execute("SELECT 1")  # the writer's session is alive
        raw.commit()
        b.beat()
        assert b.epochs() == {1: 2}
    finally:
        raw.invalidate()


def test_a_database_error_taking_over_shards_is_retried_not_fatal(
    config: ConfigFile, s3, bucket, pg_server, caplog, monkeypatch
):
    """Reading the taken-over watches' state failed: the exception ended the main loop (and the
    daemon), and the shards' watches, popped from the list of changes, were never polled again."""

    from poller.config import load_settings
    from poller.daemon import Daemon
    from poller.sdnotify import Notifier

    s3.put_object(Bucket=bucket, Key="k", Body=b"v1")
    with pg_server.database() as url:
        config.write([{"name": f"w{i}", "bucket": bucket, "key": "k"} for i in range(5)], database={"url": url})
        daemon = Daemon(config.path, load_settings(config.path), Notifier(""))
        fail_once(monkeypatch, daemon.service, "resume", "server closed the connection unexpectedly")
        try:
            daemon.start(paused=True)  # claims every shard; the read fails
            assert len(daemon.timetable) == 0 and "trying again" in caplog.text
            daemon._apply_shard_changes()  # the main loop's next turn
            assert len(daemon.timetable) == 5
        finally:
            daemon.shutdown()
