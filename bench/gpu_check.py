"""GPU check: a GPU peer and a CPU peer train together in one swarm on this machine (loopback).

Starts a coordinator, a CPU peer (``--device cpu``) and a GPU peer (``--device auto``) with a fresh
micro-batch cache, lets them train for ``--seconds``, stops them with Ctrl-C (as a volunteer would),
and reports, per GPU peer run: the device and precision it chose, the micro-batch it found, its
samples/s next to the CPU peer's, and its peak GPU memory. One swarm per precision in
``--precisions`` (``auto`` is what a volunteer gets).

    python -m bench.gpu_check [--seconds 90] [--precisions auto,fp16] [--cpu-threads 8] [--out DIR]

prints a table and writes ``gpu_check.json``. Needs a CUDA GPU; without one it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from dedloc.config import default_run_config

STEP = re.compile(r"(\d\d):(\d\d):(\d\d) INFO .*step=(\d+) loss=\S+ samples/s=([\d.]+) peers=\d+ contributed=(\d+)")
COMPUTING = re.compile(r"computing on (.+) in (\w+), micro-batch (\d+)")
FOUND = re.compile(r"micro-batch (\d+): the largest that fits \(tried (\{.*?\}) in ([\d.]+) s")
PEAK = re.compile(r"peak GPU memory: (\d+) MiB")


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dedloc", *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, env=env, start_new_session=True,
    )


def _stop(process: subprocess.Popen, timeout: float = 60.0) -> Optional[int]:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def _rates(text: str, skip: int = 2) -> tuple[Optional[float], Optional[float]]:
    """(compute, contributed): the peer's compute rate as hivemind's moving average has it at its last
    step line (samples/s while computing), and the samples it contributed per second of wall time from
    its ``skip``-th step line to its last (averaging and waiting included)."""
    rows = [(int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]), float(m[5]), int(m[6])) for m in STEP.finditer(text)]
    if len(rows) <= skip + 1:
        return None, None
    (t0, _, c0), (t1, rate, c1) = rows[skip], rows[-1]
    return rate, ((c1 - c0) / ((t1 - t0) % 86400) if t1 != t0 else None)


def run_once(root: Path, seconds: float, precision: str, cpu_threads: int) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    config = default_run_config(training={"total_steps": 10_000, "min_peers": 2, "wait_for_peers_timeout": 120.0})
    (root / "run.toml").write_text(config.to_toml(), encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    join = root / "join.json"
    coordinator = _start(["coordinator", "--config", str(root / "run.toml"), "--workdir", str(root / "coordinator"),
                          "--join-file", str(join), "--no-dashboard"], root / "coordinator.log", env)
    peers = {
        "cpu": _start(["peer", "--join-file", str(join), "--device", "cpu", "--threads", str(cpu_threads),
                       "--workdir", str(root / "cpu")], root / "cpu.log", env),
        "gpu": _start(["peer", "--join-file", str(join), "--device", "auto", "--precision", precision,
                       "--cache-dir", str(root / "cache"), "--workdir", str(root / "gpu")], root / "gpu.log", env),
    }
    try:
        deadline = time.monotonic() + 300
        while not STEP.search((root / "gpu.log").read_text(errors="replace")):
            if time.monotonic() > deadline or any(p.poll() is not None for p in [coordinator, *peers.values()]):
                raise RuntimeError(f"no global step within 300 s; see the logs in {root}")
            time.sleep(1)
        time.sleep(seconds)
    finally:
        codes = {name: _stop(process) for name, process in peers.items()}
        codes["coordinator"] = _stop(coordinator)
    gpu, cpu = (root / "gpu.log").read_text(errors="replace"), (root / "cpu.log").read_text(errors="replace")
    computing, found, peak = COMPUTING.search(gpu), FOUND.search(gpu), PEAK.search(gpu)
    (gpu_compute, gpu_contributed), (cpu_compute, cpu_contributed) = _rates(gpu), _rates(cpu)
    return dict(
        requested_precision=precision,
        device=computing[1] if computing else None,
        precision=computing[2] if computing else None,
        micro_batch=int(computing[3]) if computing else None,
        micro_batch_search=dict(tried=found[2], seconds=float(found[3])) if found else None,
        gpu_compute_samples_per_second=gpu_compute,
        cpu_compute_samples_per_second=cpu_compute,
        gpu_contributed_per_second=gpu_contributed,
        cpu_contributed_per_second=cpu_contributed,
        global_steps=max([int(m[4]) for m in STEP.finditer(gpu)] or [0]),
        peak_gpu_memory_mib=int(peak[1]) if peak else None,
        exit_codes=codes,
    )


def _pair(gpu: Optional[float], cpu: Optional[float]) -> str:
    if gpu is None or cpu is None:
        return "—"
    return f"{gpu:.0f} / {cpu:.0f} ({gpu / cpu:.1f}×)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="training time measured per run (default: 90)")
    parser.add_argument("--precisions", default="auto", help="GPU peer precisions, one swarm each (default: auto)")
    parser.add_argument("--cpu-threads", type=int, default=8, help="threads of the CPU peer (default: 8)")
    parser.add_argument("--out", type=Path, help="directory for logs and gpu_check.json (default: a new one)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is usable here", file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="dedloc-gpu-check-"))
    results = []
    for precision in args.precisions.split(","):
        result = run_once(out / precision, args.seconds, precision, args.cpu_threads)
        results.append(result)
        print(json.dumps(result), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; CPU peer: {args.cpu_threads} threads")
    print("| precision asked | device | precision | micro-batch | computing, samples/s: GPU / CPU peer | contributed per "
          "wall second: GPU / CPU peer | peak GPU MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['requested_precision']} | {r['device']} | {r['precision']} | {r['micro_batch']} | "
              f"{_pair(r['gpu_compute_samples_per_second'], r['cpu_compute_samples_per_second'])} | "
              f"{_pair(r['gpu_contributed_per_second'], r['cpu_contributed_per_second'])} | {r['peak_gpu_memory_mib']} |")
    print(f"\nlogs and gpu_check.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
