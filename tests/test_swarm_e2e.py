"""End to end: a coordinator and two peers as real processes on loopback train the real model together."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer

from dedloc.checkpoint import LATEST, load_checkpoint
from helpers import join_addresses, read_history, small_run_config, wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]


def _final_state(peer_dir):
    [snapshot] = sorted((peer_dir / "final").glob("step-*"))
    info = load_checkpoint(snapshot)
    return info.step, load_file(str(snapshot / "model.safetensors"))


@pytest.mark.parametrize(
    "overrides, tolerance",
    [
        # the default: fp16 gradients on the wire (a peer's own share of the average is not rounded)
        (dict(averaging={"grad_compression": "fp16"}), dict(rtol=1e-3, atol=1e-4)),
        # local optimizer steps on every micro-batch; each global step averages the parameters without
        # compression and applies the same outer step on both peers. hivemind applies averages as
        # deltas (x + (avg - x)), so the peers agree up to float32 rounding, not bit for bit
        # (the round overlapped with the next local steps, which the run checks)
        (dict(mode="diloco", diloco={"overlap": True}), dict(rtol=1e-5, atol=1e-6)),
        # each step's gradient round and optimizer step in the background while the next step computes
        (dict(averaging={"grad_compression": "fp16", "delayed_updates": True}), dict(rtol=1e-3, atol=1e-4)),
    ],
    ids=["synchronous", "diloco", "delayed"],
)
def test_two_peers_train_together(tmp_path, procs, overrides, tolerance):
    config = small_run_config(tmp_path / "run.toml", **overrides)
    coordinator_dir = tmp_path / "coordinator"
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(coordinator_dir))
    join = join_addresses(coordinator_dir, coordinator)
    peers = []
    # in synchronous mode, one micro-batch of peer-2 gives a NaN loss (fault point): the peer drops it
    # instead of sending NaN gradients, which every reducer would refuse, leaving it to step alone on them;
    # and peer-1's parameters turn NaN at step 2 (fault point): it downloads peer-2's state and trains on
    nan_batch = overrides.get("mode") != "diloco" and not overrides["averaging"].get("delayed_updates")
    faults = {1: ("nan-parameters",), 2: ("nan-micro-batch",)} if nan_batch else {}
    for index in (1, 2):
        peer_dir = tmp_path / f"peer-{index}"
        peers.append(
            procs.dedloc(
                "peer", "--join", *join, "--workdir", str(peer_dir), "--snapshot-dir", str(peer_dir / "final"),
                name=f"peer-{index}", faults=faults.get(index, ()),
            )
        )

    # the run ends by itself at total_steps: every process exits 0
    for child in [coordinator, *peers]:
        wait_for(lambda: child.poll() is not None, 300, f"{child.name} to finish", watch=[coordinator, *peers])
        assert child.poll() == 0, f"{child.name} exited with {child.poll()}:\n{child.log_tail(30)}"
    for child in [coordinator, *peers]:
        assert "Traceback" not in child.log_path.read_text(), f"{child.name} logged a traceback"
    for peer in peers:  # the start-up figure the performance doc reports
        assert "first samples contributed" in peer.log_path.read_text(), peer.log_tail(30)
        # each measured its upload to the coordinator (one probe at a time: one of them waited)
        assert "upload measured: " in peer.log_path.read_text(), peer.log_tail(30)
    if nan_batch:
        log = peers[1].log_path.read_text()
        assert "fault injected: nan-micro-batch" in log and "gave NaN or infinite gradients" in log, peers[1].log_tail(30)
        # nothing non-finite of peer-2's reached a reducer (peer-1's NaN parameters may have met a state round)
        peer_2_id = re.search(r"joined the swarm as (\w+)", log).group(1)
        assert f"rejected a part from {peer_2_id}" not in peers[0].log_path.read_text()
        log = peers[0].log_path.read_text()
        assert "fault injected: nan-parameters" in log and "parameters are NaN or infinite" in log, peers[0].log_tail(30)
        assert "a finite state downloaded" in log, peers[0].log_tail(30)
    if overrides.get("mode") == "diloco":
        overlapped = 0
        for peer in peers:  # an outer step at each of the 6 global steps
            outer_steps = [line for line in peer.log_path.read_text().splitlines() if "outer step to step" in line]
            assert len(outer_steps) >= 6, f"{peer.name} took {len(outer_steps)} outer steps:\n{peer.log_tail(30)}"
            beside = [re.search(r"\((\d+) local steps taken during the round", line) for line in outer_steps]
            overlapped += sum(int(match.group(1)) > 0 for match in beside if match)
        # overlapped: some local steps were taken while a round ran
        assert overlapped > 0, "no local step was taken beside a parameter round"
    if overrides.get("averaging", {}).get("delayed_updates"):
        computed = [int(m[1]) for peer in peers for m in re.finditer(
            r"ended in the background; (\d+) samples of the next step were computed meanwhile", peer.log_path.read_text())]
        # one line per round (5 rounds before the last step at least, per peer), and micro-batches of
        # the next step were computed while some of them ran
        assert len(computed) >= 10 and max(computed) > 0, computed

    # both peers reached the same global step, and their parameters agree
    (step_1, params_1), (step_2, params_2) = (_final_state(tmp_path / "peer-1"), _final_state(tmp_path / "peer-2"))
    assert step_1 == step_2 == 6
    assert params_1.keys() == params_2.keys()
    for name in params_1:
        torch.testing.assert_close(params_1[name], params_2[name], **tolerance, msg=lambda m: f"{name}: {m}")

    # the swarm learned: the coordinator saw every step, and the loss fell
    history = read_history(coordinator_dir)
    assert [record["step"] for record in history] == list(range(1, 7))
    losses = [record["loss"] for record in history]
    assert all(loss is not None for loss in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    assert max(record["peers"] for record in history) == 2

    # the coordinator's checkpoint: verified, loadable with from_pretrained, the right step, the swarm's weights
    root = coordinator_dir / "checkpoints"
    latest = root / (root / LATEST).read_text().strip()
    info = load_checkpoint(latest)
    assert info.step == 6 and latest.name == "step-000006"
    assert info.trainer_state["optimizer"]["param_groups"], "optimizer state missing"
    model = AutoModelForMaskedLM.from_pretrained(latest)
    tokenizer = AutoTokenizer.from_pretrained(latest)
    assert tokenizer.mask_token == "[MASK]" and model.config.vocab_size == len(tokenizer)
    checkpoint_params = load_file(str(latest / "model.safetensors"))
    for name in checkpoint_params:
        torch.testing.assert_close(checkpoint_params[name], params_1[name], **tolerance)
    coordinator_info = json.loads((coordinator_dir / "coordinator.json").read_text())
    assert info.trainer_state["config_sha256"] == coordinator_info["config_sha256"]

    # nothing is left running: no DHT helper, no p2pd
    for child in [coordinator, *peers]:
        assert not child.group_alive(), f"{child.name} left processes behind"
