"""`dedloc swarm` as a user runs it: a real coordinator and peers, a summary with exactly the promised keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dedloc.checkpoint import latest_valid_checkpoint
from dedloc.local_swarm import SUMMARY_KEYS
from helpers import small_run_config

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]


def test_swarm_command_runs_and_summarizes(tmp_path):
    config = small_run_config(tmp_path / "run.toml")
    workdir = tmp_path / "swarm"
    result = subprocess.run(
        [sys.executable, "-m", "dedloc", "swarm", "--peers", "2", "--max-steps", "3", "--workdir", str(workdir),
         "--config", str(config)],
        capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["global_step"] == 3 and summary["peers"] == 2
    assert summary["loss_last"] < summary["loss_first"]
    assert summary["samples"] >= 3 * 64 and summary["wall_s"] > 0
    assert latest_valid_checkpoint(workdir / "coordinator" / "checkpoints").step == 3
    assert {p.name for p in (workdir / "logs").iterdir()} == {"coordinator.log", "peer-1.log", "peer-2.log"}
    assert "step=3" in result.stdout and str(workdir) in result.stdout


def test_swarm_refuses_a_used_workdir(tmp_path):
    (tmp_path / "coordinator").mkdir()
    (tmp_path / "coordinator" / "history.jsonl").write_text("")
    result = subprocess.run([sys.executable, "-m", "dedloc", "swarm", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "already holds a swarm run" in result.stderr
