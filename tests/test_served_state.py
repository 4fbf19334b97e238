"""The state a peer serves to a newcomer is one instant's copy, not the live tensors it goes on training."""

from __future__ import annotations

import threading

import pytest
import torch

from dedloc.config import default_run_config
from helpers import local_dhts

pytestmark = pytest.mark.timeout(120)


def _parameters(averager) -> list[torch.Tensor]:
    return [p for group in averager.optimizer.param_groups for p in group["params"]]


def test_a_served_state_is_a_copy_taken_between_optimizer_steps():
    from dedloc.swarm.optimizer import build_optimizer

    config = default_run_config(training={"target_batch_size": 16, "micro_batch_size": 4})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    (dht,) = local_dhts(1)
    optimizer = None
    try:
        optimizer = build_optimizer(dht, config, "served", model, micro_batch_size=4)
        averager = optimizer.state_averager
        held = len(_parameters(averager))

        _, served, _ = averager.get_current_state()
        assert len(served) > held  # parameters, then the optimizer's statistics
        sent = [tensor.clone() for tensor in served]
        with torch.no_grad():  # the peer trains on while the state streams out
            for parameter in _parameters(averager):
                parameter.add_(1.0)
            for statistics in averager.optimizer.state.values():
                for value in statistics.values():
                    if torch.is_tensor(value) and value.dim() > 0:
                        value.add_(1.0)
        for before, now in zip(sent, served):
            assert torch.equal(before, now), "the served state changed with the peer's training"

        # a download asked for during an optimizer step is copied once the step has ended, whole
        averager.lock_optimizer.acquire()
        result: dict = {}
        fetch = threading.Thread(target=lambda: result.update(state=averager.get_current_state()), daemon=True)
        try:
            fetch.start()
            fetch.join(0.5)
            assert fetch.is_alive(), "the state was copied in the middle of an optimizer step"
            with torch.no_grad():
                for parameter in _parameters(averager):
                    parameter.mul_(2.0)
        finally:
            averager.lock_optimizer.release()
        fetch.join(30)
        assert not fetch.is_alive()
        _, served, _ = result["state"]
        for parameter, copy in zip(_parameters(averager), served[:held]):
            assert torch.equal(parameter.detach(), copy)
    finally:
        if optimizer is not None:
            optimizer.shutdown()
        dht.shutdown()
