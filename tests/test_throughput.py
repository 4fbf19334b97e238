"""The throughput benchmark's smoke version, as CI runs it: 2 peers on 20 Mbit/s links, a short window
(``python -m bench.throughput``), every system but ``hivemind-defaults`` — the same function of
bench/baselines.py as ``hivemind-example``, with the library's default options instead of the
example's; a CI run costs ~45 s per system. It checks that the benchmark works and writes well-formed
results, not the performance targets (those are in docs/performance.md). Needs root for the lab's
namespaces; skipped with the reason elsewhere."""

from __future__ import annotations

import json
import os

import pytest

from bench.throughput import SYSTEMS
from helpers import run_lab_bench

SMOKE_SYSTEMS = tuple(system for system in SYSTEMS if system != "hivemind-defaults")


@pytest.mark.swarm
@pytest.mark.timeout(900)
def test_throughput_bench_smoke(tmp_path):
    out = tmp_path / "throughput"
    run = run_lab_bench("throughput", ["--peers", "2", "--warmup", "3", "--window", "15", "--repeats", "1",
         "--systems", ",".join(SMOKE_SYSTEMS),
         "--small-model", "--target-batch", "64", "--diloco-batch", "128", "--seq-length", "64", "--out", str(out)], timeout=840)
    report = json.loads((out / "throughput.json").read_text())
    assert report["peers"] == 2 and report["parameters"] > 0
    runs = {run["system"]: run for run in report["runs"]}
    assert set(runs) == set(SMOKE_SYSTEMS), runs
    for system, result in runs.items():
        assert result["error"] is None and result["started_s"] > 0 and result["samples_per_s"] >= 0, result
        assert result["peak_pss_mb"] > 50, result  # a torch process at least: the sampler saw the tree
        assert result["peer_cpu"] > 0.05 and 0 < result["machine_cpu"] <= os.cpu_count() + 0.1, result
        # plain hivemind is measured, not vouched for: in the clean-clone CI of 2b06053 its two peers
        # computed (first progress after 6 s), then stalled for the whole 20-s window — one stepped alone
        # 18 times in 3 s while the other downloaded the state again and again, then both waited in
        # matchmaking. The bench reported 0 samples/s for it, which is a measurement, not a bench failure
        if not system.startswith("hivemind"):
            assert result["samples_per_s"] > 0, result
    # dedloc's peers run a DHT process, an averager and p2pd beside training; the ideal one runs nothing else
    assert runs["dedloc"]["side_cpu_share"] > 0 and runs["ideal"]["side_cpu_share"] < runs["dedloc"]["side_cpu_share"], runs
    # averaging systems send their gradients (and states) over the shaped links; the ideal one does not
    assert runs["ideal"]["bytes_per_peer_per_step"] is None or runs["ideal"]["bytes_per_peer_per_step"] < 1e5, runs["ideal"]
    for system in ("dedloc", "dedloc-diloco", "ddp"):
        assert runs[system]["steps_in_window"] >= 1 and runs[system]["bytes_per_peer_per_step"] > 0.3 * report["parameters"], runs[system]
    assert "| system | samples/s" in run.stdout


# spins for half a second, starts itself as a child that does the same, then both wait on stdin
_BUSY_TREE = """
import subprocess, sys, time
def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
if sys.argv[1:] == ["child"]:
    spin(0.5); print("ready", flush=True); sys.stdin.read(); sys.exit()
child = subprocess.Popen([sys.executable, __file__, "child"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
spin(0.5); child.stdout.readline(); print("ready", flush=True); sys.stdin.read(); child.stdin.close(); child.wait()
"""


@pytest.mark.timeout(60)
def test_cpu_accounting_splits_a_process_tree_into_its_leader_and_the_rest(tmp_path):
    import subprocess
    import sys

    from bench.throughput import machine_busy_seconds, tree_cpu_seconds

    program = tmp_path / "busy_tree.py"
    program.write_text(_BUSY_TREE, encoding="utf-8")
    busy_before = machine_busy_seconds()
    tree = subprocess.Popen([sys.executable, str(program)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert tree.stdout.readline().strip() == "ready"  # both processes have spun and still run
        [(leader, total)] = tree_cpu_seconds([tree.pid]).values()
        assert leader >= 0.5 and total - leader >= 0.5, (leader, total)
        assert machine_busy_seconds() - busy_before >= 1.0
    finally:
        tree.stdin.close()
        tree.wait(timeout=30)
