"""The coordinator's history store, on real SQLite files: persistence, contribution accounting, and
recovery from corrupt and locked files."""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time

import pytest

from coordinator.history_store import HistoryStore
from dedloc.logs import short_id
from dedloc.swarm.records import PeerMetrics

ALICE_1 = "QmTgbGgCzEpnNPfoxYVq8oDUPKP3ZTDTZUUHER1vJwWN9i"
ALICE_2 = "QmS4KTxbivGJDBEE1b7VbLZtFDD3tPPsQKn4HZkcumqrNB"
ANON = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def step(n: int, loss: float | None = 2.0, t: float = 1000.0) -> dict:
    return dict(step=n, loss=loss, samples_per_second=10.0 * n, peers=2, samples=100 * n, time=t + n, reporters=2)


def metrics(peer_id: str, samples: int, t: float, volunteer: str | None = None, **extra) -> PeerMetrics:
    return PeerMetrics(
        peer_id=peer_id, step=3, samples_per_second=5.0, samples=samples, time=float(t), volunteer=volunteer, **extra
    )


def update(store: HistoryStore, *records: PeerMetrics, now: float = 2000.0) -> None:
    store.update_contributions({m.peer_id: m for m in records}, now)


def write_jsonl(path, steps: range, torn: bool = False) -> None:
    text = "".join(json.dumps(step(n)) + "\n" for n in steps)
    path.write_text(text + ('{"step": 99, "loss": 1.' if torn else ""), encoding="utf-8")


def moved_aside(directory) -> list:
    """The database files set aside (their -wal/-shm side files go along with them)."""
    return [p for p in directory.iterdir() if re.fullmatch(r"history\.db\.broken-\d+", p.name)]


@pytest.fixture
def store(tmp_path):
    store = HistoryStore.open(tmp_path / "history.db")
    yield store
    store.close()


def test_steps_round_trip_and_survive_reopen(tmp_path):
    store = HistoryStore.open(tmp_path / "history.db")
    for n in (1, 2, 3):
        store.add_step(step(n, loss=None if n == 1 else 3.0 - n / 10))
    assert store.steps() == [step(1, loss=None), step(2, loss=2.8), step(3, loss=2.7)]
    assert [row["step"] for row in store.steps(since=1)] == [2, 3]
    store.close()

    store = HistoryStore.open(tmp_path / "history.db")
    assert store.steps() == [step(1, loss=None), step(2, loss=2.8), step(3, loss=2.7)]
    assert store.last_step() == 3
    store.close()


def test_add_step_is_idempotent(store):
    store.add_step(step(5, loss=2.0))
    store.add_step(step(5, loss=1.5))
    assert store.steps() == [step(5, loss=1.5)]
    assert store.last_step() == 5


def test_limit_keeps_the_newest_steps(store):
    assert store.last_step() == 0 and store.steps() == []
    for n in range(1, 11):
        store.add_step(step(n))
    assert [row["step"] for row in store.steps(limit=3)] == [8, 9, 10]
    assert [row["step"] for row in store.steps(since=8, limit=5)] == [9, 10]


def test_heldout_round_trip(tmp_path):
    store = HistoryStore.open(tmp_path / "history.db")
    store.add_heldout(20, 3.5, 1020.0)
    store.add_heldout(10, 4.0, 1010.0)
    store.add_heldout(30, 3.0)  # the checkpointer's callback passes no time
    store.close()
    store = HistoryStore.open(tmp_path / "history.db")
    points = store.heldout()
    assert points[:2] == [dict(step=10, loss=4.0, time=1010.0), dict(step=20, loss=3.5, time=1020.0)]
    assert points[2]["step"] == 30 and abs(points[2]["time"] - time.time()) < 60
    assert store.heldout_steps() == {10, 20, 30}
    store.close()


def test_contributions_accumulate_across_polls_and_restarts(tmp_path):
    store = HistoryStore.open(tmp_path / "history.db")
    update(store, metrics(ALICE_1, 100, t=1000, volunteer="alice", device="cuda"))
    update(store, metrics(ALICE_1, 100, t=1000, volunteer="alice", device="cuda"))  # the same record, polled again
    assert store.peers()[0]["samples"] == 100
    update(store, metrics(ALICE_1, 250, t=1010))
    assert store.peers()[0]["samples"] == 250
    update(store, metrics(ALICE_1, 30, t=1020, client_mode=True))  # the peer restarted: its count starts over
    update(store, metrics(ALICE_1, 250, t=1010))  # an older record seen again must not count as a restart
    [peer] = store.peers()
    assert peer == dict(
        peer_id=ALICE_1, volunteer="alice", device="cuda", client_mode=True, samples=280,
        samples_per_second=5.0, step=3, first_seen=1000.0, last_seen=1020.0,
    )
    store.close()

    store = HistoryStore.open(tmp_path / "history.db")  # a coordinator restart keeps the peer's last count
    update(store, metrics(ALICE_1, 50, t=1030))
    [peer] = store.peers()
    assert peer["samples"] == 300 and peer["client_mode"] is True and peer["volunteer"] == "alice"
    store.close()


def test_far_future_record_does_not_freeze_a_peer(store):
    update(store, metrics(ALICE_1, 100, t=1000), now=1000)
    update(store, metrics(ALICE_1, 10**6, t=10**9), now=1010)
    update(store, metrics(ALICE_1, 150, t=1020), now=1020)
    assert store.peers()[0]["samples"] == 150


def test_leaderboard_groups_by_volunteer(store):
    update(
        store,
        metrics(ALICE_1, 300, t=1000, volunteer="alice"),
        metrics(ALICE_2, 200, t=1005),  # named only in a later record
        metrics(ANON, 400, t=1000),
    )
    update(store, metrics(ALICE_2, 250, t=1010, volunteer="alice"))
    assert store.leaderboard() == [
        dict(name="alice", samples=550, peers=2, last_seen=1010.0),
        dict(name=short_id(ANON), samples=400, peers=1, last_seen=1000.0),
    ]
    assert [row["name"] for row in store.leaderboard(limit=1)] == ["alice"]


def test_alive_within(store):
    update(store, metrics(ALICE_1, 10, t=1000), metrics(ANON, 20, t=1050))
    assert [p["peer_id"] for p in store.peers()] == [ANON, ALICE_1]
    assert [p["peer_id"] for p in store.peers(alive_within=60, now=1080)] == [ANON]
    assert store.peers(alive_within=60, now=1200) == []


def test_empty_store_is_filled_from_jsonl_and_catches_up(tmp_path):
    write_jsonl(tmp_path / "history.jsonl", range(1, 4))
    store = HistoryStore.open(tmp_path / "history.db", jsonl=tmp_path / "history.jsonl")
    assert store.steps() == [step(1), step(2), step(3)]
    store.add_step(step(3, loss=1.0))  # what the store holds wins over the jsonl for steps it has
    store.close()
    write_jsonl(tmp_path / "history.jsonl", range(1, 6))  # steps the store missed, e.g. a crash between writes
    store = HistoryStore.open(tmp_path / "history.db", jsonl=tmp_path / "history.jsonl")
    assert store.steps() == [step(1), step(2), step(3, loss=1.0), step(4), step(5)]
    store.close()


def test_corrupt_file_is_moved_aside_and_rebuilt(tmp_path, caplog):
    db, jsonl = tmp_path / "history.db", tmp_path / "history.jsonl"
    db.write_bytes(b"this is not a database\x00" * 200)
    write_jsonl(jsonl, range(1, 4), torn=True)
    with caplog.at_level(logging.WARNING, logger="coordinator.history_store"):
        store = HistoryStore.open(db, jsonl=jsonl)
        store.add_step(step(4))
    [aside] = moved_aside(tmp_path)
    assert aside.read_bytes().startswith(b"this is not a database")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(db) in warnings[0] and "not a database" in warnings[0]
    assert [row["step"] for row in store.steps()] == [1, 2, 3, 4]
    store.close()

    caplog.clear()
    store = HistoryStore.open(db, jsonl=jsonl)  # the new file is healthy: no warning, nothing moved
    assert [row["step"] for row in store.steps()] == [1, 2, 3, 4]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(moved_aside(tmp_path)) == 1
    store.close()


def test_unknown_schema_version_is_moved_aside(tmp_path):
    store = HistoryStore.open(tmp_path / "history.db")
    store.add_step(step(1))
    store.close()
    db = sqlite3.connect(tmp_path / "history.db")
    db.execute("PRAGMA user_version = 99")  # e.g. written by a newer dedloc
    db.close()
    store = HistoryStore.open(tmp_path / "history.db")
    assert store.steps() == []
    store.add_step(step(2))
    assert store.last_step() == 2
    assert len(moved_aside(tmp_path)) == 1
    store.close()


@pytest.mark.parametrize("made_by_store", [True, False], ids=["wal", "rollback-journal"])
def test_locked_file_neither_raises_nor_hangs(tmp_path, made_by_store):
    db, jsonl = tmp_path / "history.db", tmp_path / "history.jsonl"
    write_jsonl(jsonl, range(1, 3))
    if made_by_store:
        HistoryStore.open(db, jsonl=jsonl).close()
    else:
        sqlite3.connect(db).execute("CREATE TABLE other (x)").connection.close()
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        store = HistoryStore.open(db, jsonl=jsonl)
        store.add_step(step(3))
        store.add_heldout(3, 2.5, 1003.0)
        update(store, metrics(ALICE_1, 10, t=1000))
        rows = store.steps()
        store.close()
        assert time.monotonic() - started < 3.0
    finally:
        locker.close()
    assert [row["step"] for row in rows] == [1, 2, 3]
    [aside] = moved_aside(tmp_path)
    if made_by_store:  # the WAL's side files go with it, not left to be mixed into the new file
        assert aside.with_name(aside.name + "-wal").exists() and not (tmp_path / "history.db-wal").exists()


def test_unusable_location_falls_back_to_memory(tmp_path, caplog):
    write_jsonl(tmp_path / "history.jsonl", range(1, 3))
    with caplog.at_level(logging.WARNING, logger="coordinator.history_store"):
        store = HistoryStore.open(tmp_path / "missing" / "history.db", jsonl=tmp_path / "history.jsonl")
    assert any("memory" in r.getMessage() for r in caplog.records)
    store.add_step(step(3))
    update(store, metrics(ANON, 10, t=1000))
    assert [row["step"] for row in store.steps()] == [1, 2, 3]
    assert store.leaderboard()[0]["samples"] == 10
    store.close()
    store.add_step(step(4))  # after close: dropped, not raised
    assert store.steps() == []


def test_concurrent_writer_and_readers(store):
    for n in range(1, 51):
        store.add_step(step(n))
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(200):
                rows = store.steps()
                assert len(rows) >= 50 and [row["step"] for row in rows] == list(range(1, len(rows) + 1))
        except BaseException as e:
            errors.append(e)

    readers = [threading.Thread(target=read) for _ in range(3)]
    for thread in readers:
        thread.start()
    for n in range(51, 201):
        store.add_step(step(n))
    for thread in readers:
        thread.join()
    assert not errors
    assert store.last_step() == 200 and len(store.steps()) == 200
