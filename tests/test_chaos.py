"""The chaos soak's short version, as CI runs it: 4 peers on 20 Mbit/s links, 2 minutes of random
power-offs, crashes and cut links (``python -m bench.chaos``). Needs root for the lab's namespaces;
skipped with the reason elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dedloc.lab.network import LabUnavailable, Network

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.swarm
@pytest.mark.timeout(900)
def test_chaos_soak_short(tmp_path):
    try:
        Network().close()
    except LabUnavailable as e:
        pytest.skip(f"network namespaces are not available here: {e}")
    out = tmp_path / "chaos"
    run = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--peers", "4", "--minutes", "2", "--fault-every", "20",
         "--no-baseline", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=840,
    )
    print(run.stdout)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    [result] = json.loads((out / "chaos.json").read_text())
    assert len(result["faults"]) >= 3, result["faults"]
    assert {fault["kind"] for fault in result["faults"]} <= {"power_off", "crash", "cut"}
    assert all(fault["recovered_at_s"] is not None for fault in result["faults"])
    assert result["steps"] > 0 and not result["wedged"] and not result["bad_exits"]
    assert result["finished_peers"] == 4 and result["divergence"] <= 1e-5
    assert result["checkpoints"] >= 1 and result["checkpoints_loadable"] == result["checkpoints"]
