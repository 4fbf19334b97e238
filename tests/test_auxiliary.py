"""Auxiliary peers: a helper that trains nothing carries a share of every gradient all-reduce.

Two training peers and one ``dedloc peer --auxiliary`` on loopback: the helper reduces a slice of the
gradient vector in the rounds of the run (its log says how much of it, for how many senders), the
training peers end with one model, and the helper is not counted as a training peer.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from dedloc.checkpoint import load_checkpoint
from dedloc.lab.swarm import TINY_MODEL
from helpers import join_addresses, read_history, small_run_config, wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]

STEPS = 8
HELPED = re.compile(r"helped average gradients: reduced (\d+) of (\d+) numbers for (\d+) peers")


def _final_params(peer_dir):
    [snapshot] = sorted((peer_dir / "final").glob("step-*"))
    return load_checkpoint(snapshot).step, load_file(str(snapshot / "model.safetensors"))


def test_an_auxiliary_peer_carries_a_share_of_the_all_reduce(tmp_path, procs):
    # hivemind hands each member whole parts of the vector (a tensor, or 512 KiB of one), the one a share's
    # boundary falls in to the member holding most of it: a share smaller than the largest tensor can
    # round to nothing (with the tiny model's 64000-number embedding, the helper reduced 0 in one round of
    # three). Here a third of the vector (equal uplinks announced) outweighs the largest tensor (a
    # smaller vocabulary), so the helper holds a share in every round it takes part in
    model = {**TINY_MODEL, "tokenizer": {"vocab_size": 320}}
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": STEPS, "min_peers": 2}, **model)
    uplink = ("--upload-mbps", "100")
    coordinator_dir = tmp_path / "coordinator"
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(coordinator_dir))
    join = join_addresses(coordinator_dir, coordinator)
    helper = procs.dedloc("peer", "--join", *join, "--auxiliary", *uplink, "--workdir", str(tmp_path / "helper"), name="helper")
    # the trainers start once the helper is ready to average: on a loaded machine a helper still building
    # its model when the run began joined at step 4 of 6 (CI), and a short run left it too few rounds
    wait_for(lambda: "helping the swarm average" in helper.log_path.read_text(), 180, "the helper to be ready",
             watch=[coordinator, helper])
    trainers = [
        procs.dedloc("peer", "--join", *join, *uplink, "--workdir", str(tmp_path / f"peer-{i}"),
                     "--snapshot-dir", str(tmp_path / f"peer-{i}" / "final"), name=f"peer-{i}")
        for i in (1, 2)
    ]
    everyone = [coordinator, helper, *trainers]
    for child in [*trainers, helper]:  # the helper leaves when the coordinator announces the end
        wait_for(lambda: child.poll() is not None, 330, f"{child.name} to finish", watch=everyone)
        assert child.poll() == 0, f"{child.name} exited with {child.poll()}:\n{child.log_tail(30)}"
    for child in everyone:
        assert "Traceback" not in child.log_path.read_text(), f"{child.name} logged a traceback"

    helped = [tuple(map(int, m.groups())) for m in HELPED.finditer(helper.log_path.read_text())]
    # a share of the vector, not all of it (the trainers reduce the rest), in most rounds, and for both
    # trainers' gradients in some (the first rounds may hold one trainer: the other still starting)
    shares = [(share, total, senders) for share, total, senders in helped if 0 < share < total]
    # (on this tiny model a step takes ~2 s, and the helper may notice a round too late now and then)
    assert len(shares) >= 3 and any(senders == 2 for *_, senders in shares), \
        f"the helper reduced a share in {len(shares)} rounds:\n{helper.log_tail(40)}"
    assert "the run is finished" in helper.log_path.read_text()

    (step_1, params_1), (step_2, params_2) = (_final_params(tmp_path / f"peer-{i}") for i in (1, 2))
    assert step_1 == step_2 == STEPS
    for name in params_1:
        torch.testing.assert_close(params_1[name], params_2[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    history = read_history(coordinator_dir)
    assert [record["step"] for record in history] == list(range(1, STEPS + 1))
    assert max(record["peers"] for record in history) == 2  # the helper trains nothing: not counted


def test_an_auxiliary_peer_refuses_a_diloco_run(tmp_path):
    """Before it builds anything: a DiLoCo run has no gradient all-reduce to help with."""
    from types import SimpleNamespace

    from dedloc.config import load_run_config
    from dedloc.errors import UserInputError
    from dedloc.lifecycle import GracefulExit
    from peer.daemon import run_auxiliary

    config = load_run_config(small_run_config(tmp_path / "run.toml", mode="diloco"))
    with pytest.raises(UserInputError, match="DiLoCo mode"):
        run_auxiliary(None, SimpleNamespace(config=config), None, GracefulExit("test"))
