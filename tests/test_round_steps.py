"""Rounds between peers at different steps: real averagers of dedloc's kind on a local DHT. A member
at another step than the round's weighs nothing: the others' average is not pulled toward it. In a
state round it keeps its own state and step (as if the round had failed for it); in a gradient round
it receives the others' average."""

from __future__ import annotations

import concurrent.futures
from functools import partial

import pytest
import torch
from hivemind.utils import get_dht_time

from dedloc.swarm.optimizer import CheckedStateAverager, ReportingGradientAverager
from helpers import local_dhts

pytestmark = pytest.mark.timeout(120)


def _state_round(values: list[float], steps: list[int], scheduled: bool) -> list[tuple[float, int, bool]]:
    """One state-averaging round of ``len(values)`` peers, each holding a parameter filled with its value
    at its step; per peer, the parameter's mean, the step it is at afterwards and whether the round
    counted for it. ``scheduled``: each peer pre-schedules the round, as a peer does when it expects
    its next step, and takes it."""
    dhts = local_dhts(len(values))
    averagers = []
    try:
        for dht, value, step in zip(dhts, values, steps):
            averager = CheckedStateAverager(
                dht=dht, prefix="state-steps", params=[torch.nn.Parameter(torch.full((2048,), value))],
                optimizer=partial(torch.optim.SGD, lr=0.1), target_group_size=len(values),
                min_matchmaking_time=2.0, request_timeout=1.0, start=True)
            averager.local_epoch = step
            averagers.append(averager)

        def one(averager: CheckedStateAverager) -> None:
            if scheduled:
                # the round runs after the step this peer is about to take: it gathers that step
                control = averager.schedule_step(scheduled_time=get_dht_time() + 3.0, timeout=40)
                averager.step(increment_epoch=True, averaging_round=True, averaging_control=control, delay_averaging=False)
            else:
                averager.step(averaging_round=True, delay_averaging=False, averaging_opts=dict(timeout=40))

        with concurrent.futures.ThreadPoolExecutor(len(averagers)) as pool:
            list(pool.map(one, averagers))
        return [(float(averager.main_parameters[0].detach().mean()), averager.local_epoch, averager.rounds_done.value == 1)
                for averager in averagers]
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


@pytest.mark.parametrize("scheduled", [False, True], ids=["begun-at-the-step", "pre-scheduled"])
def test_a_state_round_leaves_a_peer_of_another_step_out(scheduled):
    after = _state_round([1.0, 3.0, 11.0], steps=[8, 8, 7], scheduled=scheduled)
    step = 9 if scheduled else 8  # a pre-scheduled round runs after the step the peer then takes
    assert after[:2] == [(pytest.approx(2.0, abs=1e-5), step, True)] * 2, after
    assert after[2] == (11.0, step - 1, False), after


def test_of_two_peers_the_one_a_step_behind_is_left_out():
    after = _state_round([1.0, 3.0], steps=[8, 7], scheduled=False)
    assert after == [(1.0, 8, True), (3.0, 7, False)], after


def test_two_peers_steps_apart_average_as_they_are():
    """Steps further apart than one: no telling which is right — the plain average (a peer claiming a
    far step does not move the other's)."""
    after = _state_round([1.0, 3.0], steps=[9, 7], scheduled=False)
    assert after == [(pytest.approx(2.0, abs=1e-5), 9, True), (pytest.approx(2.0, abs=1e-5), 7, True)], after


def test_gradients_of_another_step_weigh_nothing():
    values, steps = [1.0, 3.0, 11.0], [8, 8, 7]
    dhts = local_dhts(len(values))
    averagers, params = [], []
    try:
        for dht, step in zip(dhts, steps):
            param = torch.nn.Parameter(torch.zeros(2048))
            averager = ReportingGradientAverager(
                [param], dht=dht, prefix="gradient-steps", target_group_size=len(values),
                min_matchmaking_time=2.0, request_timeout=1.0, start=True)
            averager.step_of_round = lambda step=step: step
            averagers.append(averager)
            params.append(param)

        def one(peer: int) -> torch.Tensor:
            params[peer].grad = torch.full((2048,), values[peer])
            averagers[peer].accumulate_grads_(batch_size=4)
            averagers[peer].step(timeout=40)
            with averagers[peer].get_tensors() as (averaged,):
                return averaged.clone()

        with concurrent.futures.ThreadPoolExecutor(len(values)) as pool:
            results = list(pool.map(one, range(len(values))))
        # every member, the one at step 7 included, holds the mean of the two gradients of step 8
        assert all(torch.allclose(result, torch.full((2048,), 2.0)) for result in results), [float(r.mean()) for r in results]
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
