"""NAT without flags: a volunteer whose machine accepts no incoming connections (its namespace drops
every incoming connection attempt, as a home router without port forwarding does) starts with no
network flags, learns from the coordinator's dial-back that nobody can reach it, runs in client mode,
and trains with the swarm: it contributes samples, averages with the reachable peer every step, and
ends holding the same model. Needs network namespaces and iptables (root); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dedloc.checkpoint import load_checkpoint
from dedloc.lab.network import LabUnavailable, Network
from dedloc.lab.swarm import TINY_MODEL, LabSwarm
from helpers import read_history, small_run_config, wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(360)]

CLIENT_MODE = "running in client mode"
REACHED = "the coordinator connected back to this peer"


def _final_params(peer_dir):
    [snapshot] = sorted((peer_dir / "final").glob("step-*"))
    return load_checkpoint(snapshot).step, load_file(str(snapshot / "model.safetensors"))


def test_a_peer_nobody_can_reach_trains_in_client_mode(tmp_path):
    try:
        network = Network()
    except LabUnavailable as e:
        pytest.skip(f"network namespaces are not available here: {e}")
    swarm = None
    try:
        config = small_run_config(tmp_path / "run.toml", training={"total_steps": 6, "min_peers": 2}, **TINY_MODEL)
        swarm = LabSwarm(network, tmp_path / "lab", config)
        swarm.start_coordinator(up_mbit=20, down_mbit=50)
        peers = {}
        for name, incoming in (("reachable", True), ("walled", False)):
            peers[name] = swarm.start_peer(name, up_mbit=20, down_mbit=50, incoming=incoming,
                                           extra=("--snapshot-dir", str(tmp_path / "lab" / name / "final")))
        children = [swarm.coordinator.child, *(p.child for p in peers.values())]
        for node in peers.values():
            wait_for(lambda: node.poll() is not None, 300, f"{node.name} to finish", watch=children)
            assert node.poll() == 0, f"{node.name} exited with {node.poll()}:\n{node.child.log_tail(30)}"

        walled, reachable = peers["walled"].log_text(), peers["reachable"].log_text()
        assert CLIENT_MODE in walled and REACHED not in walled, peers["walled"].child.log_tail(40)
        assert REACHED in reachable and CLIENT_MODE not in reachable, peers["reachable"].child.log_tail(40)
        assert "first samples contributed" in walled
        contributed = [line for line in walled.splitlines() if "Contributed" in line]
        assert contributed and " 0 samples" not in contributed[-1], peers["walled"].child.log_tail(20)

        # every step counted both peers, and they ended with one model: the walled peer's gradients
        # reached the reachable one's share of each all-reduce, and the averages came back
        history = read_history(swarm.coordinator_dir)
        assert [record["step"] for record in history] == list(range(1, 7))
        assert max(record["peers"] for record in history) == 2
        (step_1, params_1), (step_2, params_2) = (_final_params(tmp_path / "lab" / name) for name in peers)
        assert step_1 == step_2 == 6
        for name in params_1:
            torch.testing.assert_close(params_1[name], params_2[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    finally:
        if swarm is not None:
            swarm.close()
        network.close()
