"""The averaging-only benchmark's smoke version, as CI runs it: 2 peers on 20 Mbit/s links, dedloc's
averager and gloo, two rounds of a small vector (``python -m bench.allreduce``). It checks that the
benchmark measures real rounds over the shaped links, not the scaling target (docs/performance.md).
Needs root for the lab's namespaces; skipped with the reason elsewhere."""

from __future__ import annotations

import json

import pytest

from bench.allreduce import bound_bytes, bound_seconds
from helpers import run_lab_bench

PARAMS = 500_000


@pytest.mark.swarm
@pytest.mark.timeout(400)
def test_allreduce_bench_smoke(tmp_path):
    out = tmp_path / "allreduce"
    run = run_lab_bench("allreduce", ["--peers", "2", "--rounds", "2", "--params", str(PARAMS), "--out", str(out)],
                        timeout=360)
    report = json.loads((out / "allreduce.json").read_text())
    by_system = {m["system"]: m for m in report["measurements"]}
    assert set(by_system) == {"dedloc", "gloo"}, by_system
    for system, m in by_system.items():
        assert m["error"] is None and m["failed_rounds"] == 0 and len(m["allreduce_s"]) == 2, m
        # the vector went over the shaped link: each peer sent about the bound (2 MB at fp32), and a
        # round took at least the time the uplink needs for it (tbf lets a small burst through early)
        bound = bound_bytes(2, PARAMS, "none")
        assert 0.9 * bound <= m["bytes_per_round"] <= 1.5 * bound, (system, m["bytes_per_round"], bound)
        assert min(m["allreduce_s"]) >= 0.8 * bound_seconds(2, PARAMS, "none", [20.0, 20.0]), (system, m["allreduce_s"])
    assert by_system["dedloc"]["matchmaking_s"] and all(s > 0 for s in by_system["dedloc"]["matchmaking_s"])
    assert "| system | peers | uplinks Mbit/s |" in run.stdout


def test_the_bound_evens_out_the_uploads():
    # equal links: the bandwidth-optimal 2(n−1)/n·M·b / uplink
    for peers in (2, 4, 8):
        assert bound_seconds(peers, PARAMS, "none", [20.0] * peers) == pytest.approx(
            bound_bytes(peers, PARAMS, "none") * 8 / 20e6, rel=1e-6)
    # two peers: each sends all M whatever the shares, so the slower link decides
    assert bound_seconds(2, PARAMS, "none", [20.0, 5.0]) == pytest.approx(PARAMS * 4 * 8 / 5e6, rel=1e-6)
    # peer i uploads (M + (n−2)·s_i)·b. 4 peers, two 4× slower: they reduce nothing and still send
    # their M, which bounds the round, a third below equal shares (M·1.5 each)
    megabits = PARAMS * 4 * 8 / 1e6
    assert bound_seconds(4, PARAMS, "none", [20.0, 20.0, 5.0, 5.0]) == pytest.approx(megabits / 5.0, rel=1e-6)
    # 4 peers, one a little slower: every upload ends together, (M + 2·s_i)/b_i = T with Σ s_i = M
    seconds = bound_seconds(4, PARAMS, "none", [20.0, 20.0, 20.0, 16.0])
    shares = [(seconds * rate - megabits) / 2 for rate in (20.0, 20.0, 20.0, 16.0)]
    assert sum(shares) == pytest.approx(megabits, rel=1e-6) and min(shares) > 0
    assert seconds < (megabits + 2 * megabits / 4) / 16.0
