"""A volunteer pauses a peer (SIGUSR1) and resumes it (SIGUSR2): the swarm goes on without it, and it
comes back, takes the swarm's state and contributes again. Real processes on loopback."""

from __future__ import annotations

import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from helpers import join_addresses, read_history, small_run_config, wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

STEP_LINE = re.compile(r"step=(\d+) loss=\S+ samples/s=\S+ peers=\d+ contributed=(\d+)")


def _steps(text: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in STEP_LINE.finditer(text)]


def test_a_paused_peer_stays_out_and_comes_back(tmp_path, procs):
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 12})
    coordinator_dir = tmp_path / "coordinator"
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(coordinator_dir))
    join = join_addresses(coordinator_dir, coordinator)
    peers = [
        procs.dedloc("peer", "--join", *join, "--snapshot-dir", str(tmp_path / f"peer-{i}" / "final"), name=f"peer-{i}")
        for i in (1, 2)
    ]
    everyone = [coordinator, *peers]
    steady, volunteer = peers

    def swarm_step() -> int:
        history = read_history(coordinator_dir)
        return history[-1]["step"] if history else 0

    wait_for(lambda: swarm_step() >= 2, 240, "2 global steps", watch=everyone)
    os.kill(volunteer.pid, signal.SIGUSR1)
    paused = wait_for(lambda: re.search(r"paused at step (\d+)", volunteer.log_path.read_text()), 60,
                      "peer-2 to pause", watch=everyone)
    paused_step = int(paused[1])
    contributed_at_pause = max((c for _, c in _steps(volunteer.log_path.read_text())), default=0)
    # the swarm goes on without it
    wait_for(lambda: swarm_step() >= paused_step + 3, 180, "3 steps without peer-2", watch=everyone)
    text_while_paused = volunteer.log_path.read_text()[paused.end():]
    assert not _steps(text_while_paused), f"peer-2 stepped while paused:\n{text_while_paused[-2000:]}"
    assert "averaging gradients" not in text_while_paused, "peer-2 began an averaging round while paused"
    # it left hivemind's count at once: the other peer does not keep looking for it in every round
    # (before the record was withdrawn, each of its rounds failed to find a group, ~13 s a step)
    in_pause = steady.log_path.read_text()
    in_pause = in_pause[in_pause.find(f"step={paused_step + 1} "):]
    assert in_pause.count("could not find a group") <= 1, in_pause[-3000:]
    resumed_from = len(volunteer.log_path.read_text())
    os.kill(volunteer.pid, signal.SIGUSR2)
    wait_for(lambda: "resumed at step" in volunteer.log_path.read_text(), 60, "peer-2 to resume", watch=everyone)

    for child in everyone:
        wait_for(lambda: child.poll() is not None, 300, f"{child.name} to finish", watch=everyone)
        assert child.poll() == 0, f"{child.name} exited with {child.poll()}:\n{child.log_tail(30)}"

    after = volunteer.log_path.read_text()[resumed_from:]
    # behind the swarm when it came back: it took the swarm's state (its first step after the pause is
    # the swarm's, not the one after its own), then contributed again
    steps_after = _steps(after)
    assert steps_after and steps_after[0][0] >= paused_step + 3, (paused_step, steps_after, after[-3000:])
    assert max(c for _, c in steps_after) > contributed_at_pause, steps_after
    assert steps_after[-1][0] == 12
    # and it ended with the same parameters as the peer that never paused
    finals = [load_file(str(next((tmp_path / f"peer-{i}" / "final").glob("step-*")) / "model.safetensors"))
              for i in (1, 2)]
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-3, atol=1e-4)
