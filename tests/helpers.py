"""Helpers for tests that run a real swarm: small run configs and waiting on files a daemon writes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

if TYPE_CHECKING:
    from subprocess import CompletedProcess

from dedloc.config import default_run_config
from dedloc.lifecycle import ChildProcess


def small_run_config(path: Path, **overrides) -> Path:
    """The embedded default shrunk for tests: a few small global steps, checkpoints every 2 steps."""
    sections = dict(
        training={"target_batch_size": 64, "micro_batch_size": 16, "total_steps": 6, "min_peers": 2,
                  "wait_for_peers_timeout": 60.0},
        optimizer={"lr": 3e-3, "warmup_steps": 1},
        checkpoint={"every_steps": 2, "keep_last": 2},
    )
    for name, value in overrides.items():  # a section's fields, or a top-level value (``mode="diloco"``)
        if isinstance(value, dict):
            sections.setdefault(name, {}).update(value)
        else:
            sections[name] = value
    config = default_run_config(**sections)
    path.write_text(config.to_toml(), encoding="utf-8")
    return path


def wait_for(predicate: Callable[[], object], timeout: float, what: str, watch: Optional[list[ChildProcess]] = None):
    """Poll ``predicate`` until it returns something truthy; fail early if a watched process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for child in watch or []:
            if child.poll() not in (None, 0):
                raise AssertionError(f"{child.name} exited with {child.poll()} while waiting for {what}:\n{child.log_tail(30)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def join_addresses(coordinator_dir: Path, coordinator: ChildProcess, timeout: float = 120) -> list[str]:
    info = coordinator_dir / "coordinator.json"
    wait_for(info.is_file, timeout, "the coordinator's join address", watch=[coordinator])
    return json.loads(info.read_text())["join"]


def read_history(coordinator_dir: Path) -> list[dict]:
    path = coordinator_dir / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_lab_bench(module: str, args: list[str], timeout: float) -> "CompletedProcess":
    """Run ``python -m bench.<module> ARGS`` from the repository root (skipped, with the reason, where the
    swarm lab's namespaces cannot be made); prints its output and requires exit 0."""
    import subprocess
    import sys

    import pytest

    from dedloc.lab.network import LabUnavailable, Network

    try:
        Network().close()
    except LabUnavailable as e:
        pytest.skip(f"network namespaces are not available here: {e}")
    run = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=Path(__file__).resolve().parent.parent,
                         capture_output=True, text=True, timeout=timeout)
    print(run.stdout)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def local_dhts(count: int) -> list:
    """``count`` started hivemind DHTs on loopback (ports chosen by the OS, no network probing), the
    others bootstrapped from the first. The caller shuts them down."""
    import hivemind

    local = dict(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
    first = hivemind.DHT(**local)
    return [first] + [hivemind.DHT(**local, initial_peers=[str(a) for a in first.get_visible_maddrs()])
                      for _ in range(count - 1)]
