"""PowerSGD gradient rounds (``averaging.powersgd_rank``): real averagers of dedloc's kind on a local
DHT, each holding its own gradient. A mean of rank ≤ r comes through whole; a fuller one comes through
as its rank-r approximation, and error feedback sends the rest in the next round; a non-finite
gradient is refused by the reducers' checks in the factor all-reduces too, and its sender holds up
neither phase."""

from __future__ import annotations

import concurrent.futures
from typing import Optional

import pytest
import torch

from dedloc.config import default_run_config
from dedloc.errors import UserInputError
from dedloc.swarm.optimizer import PowerSGDReportingAverager
from helpers import local_dhts

pytestmark = pytest.mark.timeout(180)

SHAPES = [(64, 32), (32,)]  # a matrix PowerSGD factorises, a vector it sends whole


class _Averager(PowerSGDReportingAverager):
    """Reduces a share of each round or not as the test says (in a swarm, a peer reduces once one of
    its rounds has completed and it has samples: every peer here would be a newcomer)."""

    reduces = True

    def announce(self, reduces: bool) -> None:
        super().announce(self.reduces)


def _rounds(gradients: list[list[list[torch.Tensor]]], rank: int, reduces: list[bool],
            timeouts: Optional[dict] = None) -> list[list[Optional[list[torch.Tensor]]]]:
    """``gradients[round][peer]``: one gradient round per entry with every peer; per round and peer,
    the averaged gradient that peer ended with (None: the round failed for it). ``timeouts`` replace
    the averagers' sender/reducer/all-reduce timeouts, and a round that fails is then not retried."""
    peers = len(gradients[0])
    dhts = local_dhts(peers)
    averagers, parameters = [], []
    try:
        for dht, reducing in zip(dhts, reduces):
            params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
            averager = _Averager(
                params, averager_rank=rank, dht=dht, prefix="powersgd", target_group_size=peers,
                min_matchmaking_time=2.0, request_timeout=1.0,
                **(timeouts or dict(sender_timeout=5.0, reducer_timeout=10.0)), start=False)
            averager.reduces = reducing
            averager.run_in_background(await_ready=True)
            averagers.append(averager)
            parameters.append(params)

        def one_round(peer: int, grads: list[torch.Tensor]) -> Optional[list[torch.Tensor]]:
            for param, grad in zip(parameters[peer], grads):
                param.grad = grad.clone()
            averagers[peer].accumulate_grads_(batch_size=1)
            try:
                averagers[peer].step(timeout=60, allow_retries=timeouts is None)
            except Exception:  # the round failed for this peer (hivemind raises)
                return None
            with averagers[peer].get_tensors() as averaged:
                return [tensor.clone() for tensor in averaged]

        results = []
        with concurrent.futures.ThreadPoolExecutor(peers) as pool:
            for round_gradients in gradients:
                results.append(list(pool.map(one_round, range(peers), round_gradients)))
        return results
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def _gradient(generator: torch.Generator, matrix_rank: int) -> list[torch.Tensor]:
    rows, cols = SHAPES[0]
    matrix = torch.randn(rows, matrix_rank, generator=generator) @ torch.randn(matrix_rank, cols, generator=generator)
    return [matrix, torch.randn(SHAPES[1], generator=generator)]


def _mean(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(tensors).mean(dim=0) for tensors in zip(*grads)]


def test_a_mean_of_low_rank_comes_through_whole_and_every_peer_agrees():
    # their mean has rank 3. (With rank 4, P would have a column of rounding noise that hivemind's
    # Gram-Schmidt scales up to unit length: the result would be off, differently on each peer —
    # real gradient matrices are of higher rank than PowerSGD's)
    generator = torch.Generator().manual_seed(1)
    grads = [_gradient(generator, matrix_rank=1) for _ in range(3)]
    [ended] = _rounds([grads], rank=3, reduces=[True] * 3)
    mean = _mean(grads)
    for peer in ended:
        for tensor, expected in zip(peer, mean):
            torch.testing.assert_close(tensor, expected, rtol=1e-4, atol=1e-4)


def test_what_a_low_rank_round_misses_follows_in_the_next():
    generator = torch.Generator().manual_seed(2)
    grads = [_gradient(generator, matrix_rank=2) for _ in range(2)]  # their mean has rank 4
    nothing = [[torch.zeros(shape) for shape in SHAPES] for _ in range(2)]
    rounds = _rounds([grads, nothing], rank=2, reduces=[True, True])
    mean = _mean(grads)
    for ended in rounds:  # the peers agree on every round's result
        torch.testing.assert_close(ended[0][0], ended[1][0], rtol=1e-4, atol=1e-4)
    # a rank-2 round of a rank-4 mean misses part of it, a rank-2 rest; the next round, with no new
    # gradient, sends that rest (error feedback)
    sent = torch.cumsum(torch.stack([ended[0][0] for ended in rounds]), dim=0)
    misses = [float((mean[0] - total).norm() / mean[0].norm()) for total in sent]
    assert misses[0] > 0.2 and misses[1] < 1e-3, misses
    torch.testing.assert_close(rounds[0][0][1], mean[1])  # the vector went whole
    torch.testing.assert_close(rounds[1][0][1], torch.zeros(SHAPES[1]))  # and left nothing behind


def test_a_non_finite_gradient_is_refused_in_the_factor_rounds():
    generator = torch.Generator().manual_seed(3)
    grads = [_gradient(generator, matrix_rank=1) for _ in range(2)]
    poisoned = [torch.full(shape, float("nan")) for shape in SHAPES]
    [ended] = _rounds([[*grads, poisoned]], rank=2, reduces=[True, True, False])
    mean = _mean(grads)
    # the reducers refuse its P and its Q factors: the others average the honest ones
    for peer in ended[:2]:
        assert peer is not None, "an honest peer's round failed"
        for tensor, expected in zip(peer, mean):
            torch.testing.assert_close(tensor, expected, rtol=1e-4, atol=1e-4)


def test_a_member_whose_factors_are_refused_holds_up_nobody():
    # the poisoned peer reduces a share too. Refused in the P all-reduce, it is left out of the Q
    # all-reduce by the reducers that refused it; its own reducer finishes its share without its own
    # part. Without that the others wait for it until the sender/reducer timeouts (30/60 s here), past
    # the all-reduce timeout (15 s), and their round fails
    generator = torch.Generator().manual_seed(4)
    grads = [_gradient(generator, matrix_rank=1) for _ in range(2)]
    poisoned = [torch.full(shape, float("nan")) for shape in SHAPES]
    timeouts = dict(sender_timeout=30.0, reducer_timeout=60.0, allreduce_timeout=15.0)
    [ended] = _rounds([[*grads, poisoned]], rank=2, reduces=[True, True, True], timeouts=timeouts)
    for peer in ended[:2]:
        assert peer is not None, "an honest peer's round failed"
        assert all(bool(torch.isfinite(tensor).all()) for tensor in peer)
    assert ended[2] is not None, "the poisoned peer's own round hung"


def test_powersgd_is_for_synchronous_mode():
    assert default_run_config(averaging={"powersgd_rank": 4}).averaging.powersgd_rank == 4
    with pytest.raises(UserInputError, match="powersgd_rank"):
        default_run_config(mode="diloco", averaging={"powersgd_rank": 4})
    with pytest.raises(UserInputError):
        default_run_config(averaging={"powersgd_rank": 0})


@pytest.mark.timeout(180)
def test_two_peers_take_a_global_step_on_a_powersgd_round():
    """The optimizer a peer builds with ``averaging.powersgd_rank``: two peers in one process, each on
    its own DHT, accumulate the target batch from different data and take the same step."""
    from hivemind.utils.crypto import RSAPrivateKey

    from dedloc.swarm.optimizer import build_optimizer
    from helpers import wait_for

    config = default_run_config(training={"target_batch_size": 16, "micro_batch_size": 4},
                                averaging={"matchmaking_time": 3.0, "powersgd_rank": 2})
    dhts, opts, models = [], [], []
    process_key = RSAPrivateKey._process_wide_key
    try:
        dhts.extend(local_dhts(2))
        for dht in dhts:
            RSAPrivateKey._process_wide_key = RSAPrivateKey()  # its own record-signing key, as in its own process
            torch.manual_seed(0)  # the same initial parameters on both peers
            models.append(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1)))
            opts.append(build_optimizer(dht, config, "powersgd-step", models[-1], micro_batch_size=4))
        initial = [p.detach().clone() for p in models[0].parameters()]
        assert all(isinstance(opt.grad_averager, PowerSGDReportingAverager) for opt in opts)

        def local_step(peer: int, seed: int) -> None:
            batch = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))
            opts[peer].zero_grad()
            models[peer](batch).pow(2).mean().backward()
            opts[peer].step()

        # 12 of the 16 samples, then the last micro-batch of each peer together: both see the batch full
        local_step(0, 1), local_step(0, 2), local_step(1, 3)
        wait_for(lambda: all(opt.tracker.global_progress.samples_accumulated >= 12 for opt in opts), 60,
                 "both peers to see 12 samples")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(local_step, (0, 1), (4, 5)))
        assert [opt.local_epoch for opt in opts] == [1, 1]
        assert [opt.grad_averager.rounds_completed.value for opt in opts] == [1, 1], "the PowerSGD round failed"
        for a, b, before in zip(models[0].parameters(), models[1].parameters(), initial):
            torch.testing.assert_close(a, b)  # the same step on both peers
            assert not torch.equal(a, before)
        # a rank-2 round of these gradients left a rest for the next round; a peer that takes the
        # swarm's state drops it (it belongs to parameters the peer no longer holds)
        feedback = opts[0].grad_averager._ms
        assert any(float(buffer.abs().max()) > 0 for buffer in feedback)
        opts[0].grad_averager.rejoined()
        assert all(float(buffer.abs().max()) == 0 for buffer in feedback)
    finally:
        for opt in opts:
            opt.shutdown()
        for dht in dhts:
            dht.shutdown()
        RSAPrivateKey._process_wide_key = process_key
