"""SwarmTracker's bookkeeping on metrics records (what the coordinator makes of what peers report)."""

from __future__ import annotations

import time

import pytest

from coordinator.tracker import SwarmTracker
from dedloc.swarm.records import PeerMetrics

pytestmark = pytest.mark.timeout(30)


def _metrics(peer: str, step: int, now: float, loss: float = 1.0) -> PeerMetrics:
    return PeerMetrics(peer_id=peer, step=step, loss=loss, mini_steps=2, samples_per_second=4.0, samples=step * 8,
                       time=now)


def test_steps_finish_when_every_live_peer_reports_them():
    tracker, now = SwarmTracker(dht=None, prefix="run", last_step=10), time.time()
    records = tracker.absorb({"a": _metrics("a", 2, now), "b": _metrics("b", 1, now)}, now)
    assert [r.step for r in records] == [1]  # step 2: peer b has not reported it yet
    records = tracker.absorb({"a": _metrics("a", 2, now), "b": _metrics("b", 2, now)}, now)
    assert [r.step for r in records] == [2] and records[0].peers == 2 and records[0].reporters == 2


def test_peers_past_a_lowered_end_count_as_done():
    """The organiser moved the end to step 5 while the peers already stood at 6 and 7: the run must
    still reach its end (it used to ignore such peers and wait forever)."""
    tracker, now = SwarmTracker(dht=None, prefix="run", last_step=20), time.time()
    tracker.absorb({"a": _metrics("a", 4, now), "b": _metrics("b", 4, now)}, now)
    assert tracker.global_step == 4
    tracker.last_step = 5
    records = tracker.absorb({"a": _metrics("a", 6, now, loss=9.0), "b": _metrics("b", 7, now, loss=9.0)}, now)
    assert tracker.global_step == 5 and tracker.logged_until == 5
    assert [r.step for r in records] == [5]
    assert records[0].loss is None  # the losses the peers reported are for steps 6 and 7, not 5
    assert tracker.highest_claim == 7
    assert tracker.total_samples == 6 * 8 + 7 * 8


def test_stale_records_do_not_count():
    tracker, now = SwarmTracker(dht=None, prefix="run", last_step=10), time.time()
    records = tracker.absorb({"a": _metrics("a", 3, now), "old": _metrics("old", 9, now - 3600)}, now)
    assert [r.step for r in records] == [1, 2, 3] and set(tracker.alive) == {"a"} and tracker.highest_claim == 3
