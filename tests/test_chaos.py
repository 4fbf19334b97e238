"""The chaos soak's short version, as CI runs it: 4 peers on 20 Mbit/s links, 90 s of random
power-offs, crashes and cut links (``python -m bench.chaos``). Needs root for the lab's namespaces;
skipped with the reason elsewhere."""

from __future__ import annotations

import json

import pytest

from helpers import run_lab_bench

# Peers usually finish identical (1e-8 … 1e-11), but not always yet: rounds that a peer leaves
# half-done are averaged again at the end (docs/reliability.md), yet a peer that is still catching up
# when the run ends can miss the final round (1.4e-2 seen once). A peer that never caught up differs
# by ~1e-1, so this bound still fails on a peer left behind.
MAX_DIVERGENCE = 0.05


@pytest.mark.swarm
@pytest.mark.timeout(900)
def test_chaos_soak_short(tmp_path):
    out = tmp_path / "chaos"
    run_lab_bench("chaos", ["--peers", "4", "--minutes", "1.5", "--fault-every", "15",
         "--no-baseline", "--out", str(out), "--max-divergence", str(MAX_DIVERGENCE)], timeout=840)
    [result] = json.loads((out / "chaos.json").read_text())
    assert len(result["faults"]) >= 3, result["faults"]
    assert {fault["kind"] for fault in result["faults"]} <= {"power_off", "crash", "cut"}
    assert all(fault["recovered_at_s"] is not None for fault in result["faults"])
    assert result["steps"] > 0 and not result["wedged"] and not result["bad_exits"]
    assert result["finished_peers"] == 4 and result["divergence"] <= MAX_DIVERGENCE
    assert result["checkpoints"] >= 1 and result["checkpoints_loadable"] == result["checkpoints"]
