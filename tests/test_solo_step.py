"""A peer whose gradient round fails steps with the gradients it brought to the round, not with zeros;
and a peer at the run's last step begins no round at all."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Callable

import hivemind
import pytest
import torch
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.crypto import RSAPrivateKey

from dedloc.swarm.optimizer import ReportingGradientAverager, SwarmOptimizer
from helpers import wait_for

pytestmark = pytest.mark.timeout(120)

BATCH = 10**6  # so large that the swarm's batch is full only when the silent peer says so


@dataclass
class Swarm:
    model: torch.nn.Module
    initial: torch.nn.Module
    opt: SwarmOptimizer
    accumulate: Callable[[], None]
    fill_the_batch: Callable[[], None]
    batch: torch.Tensor
    target: torch.Tensor


@pytest.fixture
def swarm():
    """This peer's optimizer, and another peer in the run (its progress record counts toward the
    batch) that never averages: every gradient round of this peer finds no group."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    initial = copy.deepcopy(model)
    batch, target = torch.randn(4, 8), torch.randn(4, 1)
    local = dict(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
    dht = hivemind.DHT(**local)
    other_dht = hivemind.DHT(**local, initial_peers=[str(a) for a in dht.get_visible_maddrs()])
    silent = opt = None
    try:
        # its own key: a record is stored under its signer's public key, and this process's default
        # key is the optimizer's too
        silent = ProgressTracker(other_dht, prefix="solo", target_batch_size=BATCH, private_key=RSAPrivateKey(), start=True)
        opt = SwarmOptimizer(
            dht=dht, run_id="solo", target_batch_size=BATCH, batch_size_per_step=4, params=model.parameters(),
            optimizer=partial(torch.optim.Adam, lr=0.1), matchmaking_time=1.0, averaging_timeout=4.0,
            grad_averager_factory=ReportingGradientAverager,
            tracker_opts=dict(min_refresh_period=0.2, max_refresh_period=0.5, default_refresh_period=0.2),
        )

        def accumulate() -> None:  # the same batch every time: the mean of equal gradients is that gradient
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(batch), target).backward()
            opt.step()

        def fill_the_batch() -> None:
            silent.report_local_progress(local_epoch=0, samples_accumulated=BATCH)
            wait_for(lambda: opt.tracker.global_progress.samples_accumulated >= BATCH, 60, "the full batch to show")

        silent.report_local_progress(local_epoch=0, samples_accumulated=4)
        accumulate()
        wait_for(lambda: opt.tracker.global_progress.num_peers == 2, 60, "both peers' progress records")
        yield Swarm(model, initial, opt, accumulate, fill_the_batch, batch, target)
    finally:
        if opt is not None:
            opt.shutdown()
        if silent is not None:
            silent.shutdown()
        other_dht.shutdown()
        dht.shutdown()


def test_a_failed_round_steps_on_this_peers_own_gradients(swarm):
    """hivemind resets the accumulators when a round begins and, when it fails, would step on them —
    zeros, which leave a fresh Adam where it was. The step must be plain Adam's on this peer's gradient."""
    swarm.fill_the_batch()
    swarm.accumulate()  # the round begins, and finds no group
    assert swarm.opt.local_epoch == 1 and swarm.opt.solo_steps == 1, (swarm.opt.local_epoch, swarm.opt.solo_steps)

    reference = swarm.initial
    expected = torch.optim.Adam(reference.parameters(), lr=0.1)
    for parameter in reference.parameters():  # hivemind creates Adam's state with a step on zeros
        parameter.grad = torch.zeros_like(parameter)
    expected.step()
    expected.zero_grad()
    torch.nn.functional.mse_loss(reference(swarm.batch), swarm.target).backward()
    expected.step()
    for stepped, wanted in zip(swarm.model.parameters(), reference.parameters()):
        assert torch.allclose(stepped, wanted, atol=1e-6), (stepped, wanted)


def test_a_state_stepped_alone_is_offered_after_the_swarms(swarm):
    """The state this peer stepped to on its own gradients is no state of the swarm's: it is offered for
    download below the step's priority (a peer that averaged at that step is asked first), above the
    previous step's. (hivemind sets the next step's priority itself when this peer steps again.)"""
    assert swarm.opt.state_averager.state_sharing_priority == 0
    swarm.fill_the_batch()
    swarm.accumulate()  # the round finds no group: a step alone
    assert swarm.opt.local_epoch == 1 and swarm.opt.solo_steps == 1
    assert swarm.opt.state_averager.state_sharing_priority == 0.5
    assert swarm.opt.grad_averager.state_sharing_priority == 0.5


def test_no_round_begins_at_the_runs_last_step(swarm):
    """A peer that got to the last step (for instance by taking the swarm's step) begins no round,
    which would find nobody and step past the end alone."""
    swarm.opt.last_step = 0
    swarm.fill_the_batch()
    swarm.accumulate()
    assert swarm.opt.local_epoch == 0 and swarm.opt.solo_steps == 0
    assert getattr(swarm.opt.grad_averager, "rounds_begun", 0) == 0
    for stepped, before in zip(swarm.model.parameters(), swarm.initial.parameters()):
        assert torch.equal(stepped, before)
