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
        assert min(m["allreduce_s"]) >= 0.8 * bound_seconds(2, PARAMS, "none", 20.0), (system, m["allreduce_s"])
    assert by_system["dedloc"]["matchmaking_s"] and all(s > 0 for s in by_system["dedloc"]["matchmaking_s"])
    assert "| system | peers | all-reduce s" in run.stdout
