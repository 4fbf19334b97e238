"""The throughput benchmark's smoke version, as CI runs it: 2 peers on 20 Mbit/s links, every system,
a short window (``python -m bench.throughput``). It checks that the benchmark works and writes
well-formed results, not the performance targets (those are in docs/performance.md). Needs root for
the lab's namespaces; skipped with the reason elsewhere."""

from __future__ import annotations

import json

import pytest

from bench.throughput import SYSTEMS
from helpers import run_lab_bench



@pytest.mark.swarm
@pytest.mark.timeout(900)
def test_throughput_bench_smoke(tmp_path):
    out = tmp_path / "throughput"
    run = run_lab_bench("throughput", ["--peers", "2", "--warmup", "3", "--window", "20", "--repeats", "1",
         "--small-model", "--target-batch", "64", "--diloco-batch", "128", "--seq-length", "64", "--out", str(out)], timeout=840)
    report = json.loads((out / "throughput.json").read_text())
    assert report["peers"] == 2 and report["parameters"] > 0
    runs = {run["system"]: run for run in report["runs"]}
    assert set(runs) == set(SYSTEMS), runs
    for system, result in runs.items():
        assert result["error"] is None and result["started_s"] > 0 and result["samples_per_s"] >= 0, result
        assert result["peak_pss_mb"] > 50, result  # a torch process at least: the sampler saw the tree
        # plain hivemind is measured, not vouched for: in the clean-clone CI of 2b06053 its two peers
        # computed (first progress after 6 s), then stalled for the whole 20-s window — one stepped alone
        # 18 times in 3 s while the other downloaded the state again and again, then both waited in
        # matchmaking. The bench reported 0 samples/s for it, which is a measurement, not a bench failure
        if not system.startswith("hivemind"):
            assert result["samples_per_s"] > 0, result
    # averaging systems send their gradients (and states) over the shaped links; the ideal one does not
    assert runs["ideal"]["bytes_per_peer_per_step"] is None or runs["ideal"]["bytes_per_peer_per_step"] < 1e5, runs["ideal"]
    for system in ("dedloc", "dedloc-diloco", "ddp"):
        assert runs[system]["steps_in_window"] >= 1 and runs[system]["bytes_per_peer_per_step"] > 0.3 * report["parameters"], runs[system]
    assert "| system | samples/s" in run.stdout
