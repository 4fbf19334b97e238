"""Durable runs: the coordinator and every peer die; the run resumes from the newest valid checkpoint."""

from __future__ import annotations

import json
import signal

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer

from dedloc.checkpoint import latest_valid_checkpoint, list_checkpoints, load_checkpoint
from helpers import join_addresses, read_history, small_run_config, wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(420)]


def _optimizer_step_count(checkpoint) -> float:
    """Adam's own step counter, as the checkpoint stores it: every optimizer step ever taken (hivemind
    adds one zero-gradient step when it first builds the optimizer's state)."""
    tensors = load_file(str(checkpoint / "optimizer.safetensors"))
    return max(float(t) for key, t in tensors.items() if key.endswith(".step"))


def test_everything_dies_and_the_run_resumes(tmp_path, procs):
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 10, "min_peers": 1})
    state = tmp_path / "coordinator"
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(state), name="coordinator-1")
    join = join_addresses(state, coordinator)
    first = procs.dedloc("peer", "--join", *join, name="peer-1")
    wait_for(lambda: len(list_checkpoints(state / "checkpoints")) >= 2, 240, "two checkpoints", watch=[coordinator, first])

    # the machines die: whole process groups, no goodbye
    coordinator.signal_group(signal.SIGKILL)
    first.signal_group(signal.SIGKILL)
    wait_for(lambda: not coordinator.group_alive() and not first.group_alive(), 20, "the killed processes to vanish")
    (state / "coordinator.json").unlink()

    # the newest checkpoint got corrupted on disk: it is refused and the previous one used
    newest, previous = list_checkpoints(state / "checkpoints")[-1], list_checkpoints(state / "checkpoints")[-2]
    with open(newest / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"garbage!")
    resumed_step = load_checkpoint(previous).step
    resumed_count = _optimizer_step_count(previous)
    history_before = read_history(state)

    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(state), name="coordinator-2")
    assert join_addresses(state, coordinator) == join, "the join address changed across the restart"
    wait_for(lambda: f"resumed from checkpoint step={resumed_step}" in coordinator.log_path.read_text(), 60,
             "the coordinator to resume", watch=[coordinator])
    assert "does not match its sha256" in coordinator.log_path.read_text()

    # no peer is alive: a new one starts from the checkpoint, not from scratch
    second = procs.dedloc("peer", "--join", *join, "--snapshot-dir", str(tmp_path / "final"), name="peer-2")
    for child in (coordinator, second):
        wait_for(lambda: child.poll() is not None, 240, f"{child.name} to finish", watch=[coordinator, second])
        assert child.poll() == 0, child.log_tail(30)
    log = second.log_path.read_text()
    assert f"the swarm is at step {resumed_step}: downloading its state" in log
    assert f"step={resumed_step + 1} " in log and "step=1 " not in log

    # the run went on from the checkpoint: optimizer statistics and step count carried over
    final = latest_valid_checkpoint(state / "checkpoints")
    assert final.step == 10
    assert _optimizer_step_count(final.path) - resumed_count == 10 - resumed_step, (
        "the optimizer state restarted instead of resuming"
    )
    steps = [r["step"] for r in read_history(state)]
    assert steps == sorted(set(steps)) and steps[-1] == 10
    assert len(history_before) < len(steps)


def test_export_writes_a_plain_model(tmp_path, procs):
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 2, "min_peers": 1})
    state = tmp_path / "coordinator"
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(state))
    join = join_addresses(state, coordinator)
    peer = procs.dedloc("peer", "--join", *join)
    for child in (coordinator, peer):
        wait_for(lambda: child.poll() is not None, 200, f"{child.name} to finish", watch=[coordinator, peer])
    out = tmp_path / "export"
    exporter = procs.dedloc("export", str(state), str(out))
    wait_for(lambda: exporter.poll() is not None, 60, "the export")
    assert exporter.poll() == 0, exporter.log_tail()
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    assert not (out / "optimizer.safetensors").exists()
    model = AutoModelForMaskedLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer)
    card = (out / "README.md").read_text()
    assert "| global steps | 2 |" in card and "training loss" in card
    again = procs.dedloc("export", str(state), str(out), name="export-again")
    wait_for(lambda: again.poll() is not None, 60, "the second export")
    assert again.poll() == 2 and "is not empty" in again.log_path.read_text()


def test_coordinator_refuses_when_no_checkpoint_verifies(tmp_path, procs):
    config = small_run_config(tmp_path / "run.toml")
    state = tmp_path / "coordinator"
    broken = state / "checkpoints" / "step-000004"
    broken.mkdir(parents=True)
    (broken / "MANIFEST.json").write_text(json.dumps({"files": {"model.safetensors": {"size": 1, "sha256": "0"}}}))
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(state))
    wait_for(lambda: coordinator.poll() is not None, 90, "the coordinator to refuse")
    assert coordinator.poll() == 2
    assert "none of the checkpoints" in coordinator.log_path.read_text()


def test_peer_of_an_older_config_leaves_with_a_reason(tmp_path, procs):
    """The coordinator restarts with another run config: a peer still running the old one never averages
    with the new run; it stops with a message that says what differs."""
    old = small_run_config(tmp_path / "old.toml", training={"total_steps": 1000, "min_peers": 1})
    new = small_run_config(tmp_path / "new.toml", training={"total_steps": 1000, "min_peers": 1},
                           optimizer={"lr": 1e-3, "warmup_steps": 1})
    state = tmp_path / "coordinator"
    coordinator = procs.dedloc("coordinator", "--config", str(old), "--workdir", str(state), name="coordinator-old")
    join = join_addresses(state, coordinator)
    peer = procs.dedloc("peer", "--join", *join)
    wait_for(lambda: "step=2 " in peer.log_path.read_text(), 180, "the peer's second step", watch=[coordinator, peer])
    wait_for(lambda: (state / "network.json").is_file() and "peers" in (state / "network.json").read_text(), 60,
             "the coordinator to remember its peers", watch=[coordinator, peer])
    coordinator.stop(grace=30)
    (state / "coordinator.json").unlink()
    coordinator = procs.dedloc("coordinator", "--config", str(new), "--workdir", str(state), name="coordinator-new")
    assert join_addresses(state, coordinator) == join
    wait_for(lambda: peer.poll() is not None, 120, "the old peer to leave", watch=[coordinator])
    assert peer.poll() == 2
    log = peer.log_path.read_text()
    assert "the coordinator now runs a different run (run config" in log and "Traceback" not in log


def test_coordinator_restarts_under_a_training_swarm(tmp_path, procs):
    """The coordinator's machine dies while a peer trains; restarted, it finds the swarm again, keeps its
    address and follows the run from where the peer is, without repeating or losing recorded steps."""
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 14, "min_peers": 1})
    state = tmp_path / "coordinator"
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(state), name="coordinator-1")
    join = join_addresses(state, coordinator)
    peer = procs.dedloc("peer", "--join", *join)
    wait_for(lambda: (state / "network.json").is_file() and "peers" in (state / "network.json").read_text()
             and len(list_checkpoints(state / "checkpoints")) >= 1, 180, "a checkpoint and a remembered peer",
             watch=[coordinator, peer])
    coordinator.signal_group(signal.SIGKILL)
    wait_for(lambda: not coordinator.group_alive(), 20, "the coordinator to vanish")
    recorded = [r["step"] for r in read_history(state)]
    (state / "coordinator.json").unlink()
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(state), name="coordinator-2")
    assert join_addresses(state, coordinator) == join
    for child in (coordinator, peer):
        wait_for(lambda: child.poll() is not None, 240, f"{child.name} to finish", watch=[coordinator, peer])
        assert child.poll() == 0, child.log_tail(30)
    steps = [r["step"] for r in read_history(state)]
    assert steps[: len(recorded)] == recorded and steps == sorted(set(steps)) and steps[-1] == 14
    assert latest_valid_checkpoint(state / "checkpoints").step == 14


def test_unwritable_checkpoint_directory_does_not_stop_tracking(tmp_path, procs):
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 4, "min_peers": 1})
    state = tmp_path / "coordinator"
    state.mkdir()
    (state / "checkpoints").write_text("a file where the checkpoint directory should be")
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(state))
    peer = procs.dedloc("peer", "--join", *join_addresses(state, coordinator))
    for child in (coordinator, peer):
        wait_for(lambda: child.poll() is not None, 200, f"{child.name} to finish", watch=[coordinator, peer])
    log = coordinator.log_path.read_text()
    assert "cannot write a checkpoint" in log and "Traceback" not in log
    assert [r["step"] for r in read_history(state)] == [1, 2, 3, 4], "tracking stopped"
    assert (state / "checkpoints").read_text().startswith("a file"), "the path in the way was touched"
