"""DiLoCo's outer step: the pseudo-gradient, Nesterov momentum, and a restart after a state download."""

from __future__ import annotations

import pytest
import torch

from bench.fidelity import FidelityResult
from dedloc.config import DilocoSection, default_run_config
from dedloc.errors import UserInputError
from dedloc.swarm.diloco import OuterStep

pytestmark = pytest.mark.timeout(60)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _move(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    """Stand-in for a round of local steps and a parameter average: move every parameter at random."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    return [p.detach().clone() for p in model.parameters()]


def test_outer_step_is_nesterov_sgd_on_the_pseudo_gradient():
    lr, mu = 0.7, 0.9
    model = _model()
    outer = OuterStep(model.parameters(), DilocoSection(outer_lr=lr, outer_momentum=mu, nesterov=True))
    anchor = [p.detach().clone() for p in model.parameters()]
    momentum = [torch.zeros_like(a) for a in anchor]
    for round_ in range(3):
        averaged = _move(model, seed=round_)
        norm = outer.step()
        deltas = [a - x for a, x in zip(anchor, averaged)]
        assert norm == pytest.approx(sum(float(d.pow(2).sum()) for d in deltas) ** 0.5, rel=1e-5)
        momentum = [mu * m + d for m, d in zip(momentum, deltas)]
        anchor = [a - lr * (d + mu * m) for a, d, m in zip(anchor, deltas, momentum)]
        for expected, p in zip(anchor, model.parameters()):
            torch.testing.assert_close(p.detach(), expected)
    assert outer.steps == 3


def test_outer_step_without_momentum_at_rate_one_keeps_the_average():
    """``outer_lr = 1`` and no momentum is plain parameter averaging (local SGD)."""
    model = _model()
    outer = OuterStep(model.parameters(), DilocoSection(outer_lr=1.0, outer_momentum=0.0, nesterov=False))
    for round_ in range(2):
        averaged = _move(model, seed=round_)
        outer.step()
        for expected, p in zip(averaged, model.parameters()):
            torch.testing.assert_close(p.detach(), expected)


def test_restart_takes_the_parameters_held_and_forgets_the_momentum():
    section = DilocoSection(outer_lr=0.5, outer_momentum=0.9)
    model = _model()
    outer = OuterStep(model.parameters(), section)
    _move(model, seed=1)
    outer.step()  # builds momentum
    downloaded = _move(model, seed=2)  # a state download replaces the parameters
    outer.restart()
    moved = _move(model, seed=3)
    outer.step()
    # the same as a fresh outer step from the downloaded parameters
    fresh_model = _model(seed=5)
    with torch.no_grad():
        for p, d in zip(fresh_model.parameters(), downloaded):
            p.copy_(d)
    fresh = OuterStep(fresh_model.parameters(), section)
    with torch.no_grad():
        for p, m in zip(fresh_model.parameters(), moved):
            p.copy_(m)
    fresh.step()
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(a.detach(), b.detach())


def test_config_rejects_nesterov_without_momentum_and_unknown_modes():
    with pytest.raises(UserInputError, match="nesterov"):
        default_run_config(diloco={"outer_momentum": 0.0, "nesterov": True})
    with pytest.raises(UserInputError, match="mode"):
        default_run_config(mode="async")
    with pytest.raises(UserInputError, match="DiLoCo mode averages parameters"):
        default_run_config(mode="diloco", averaging={"aggregation": "centered_clip"})
    assert default_run_config(mode="diloco").mode == "diloco"


def test_fidelity_verdict_for_diloco_accepts_a_lower_loss_but_not_a_higher_one():
    single = {1: [8.0, 7.60], 2: [8.0, 7.62], 3: [8.0, 7.58]}
    lower = FidelityResult(steps=[2, 4], swarm=[7.5, 6.9], single=single, peers=2, mode="diloco")
    higher = FidelityResult(steps=[2, 4], swarm=[8.1, 7.9], single=single, peers=2, mode="diloco")
    assert lower.holds and not higher.holds
    # the synchronous verdict is two-sided: the same lower curve does not match the reference
    assert not FidelityResult(steps=[2, 4], swarm=[7.5, 6.9], single=single, peers=2).holds


@pytest.mark.timeout(180)
def test_overlapped_round_lets_local_steps_run_and_lands_the_outer_step_on_top_of_them():
    """DiLoCo with ``overlap``: two peers in one process, on two DHTs. Peer A reaches the global step
    first and takes three more local steps while its round waits for peer B — they return at once
    (hivemind alone would make each wait for the round). B, which still sees A at step 0 (A publishes
    its step once its round has ended), then joins the round. Both peers' anchors
    take the same outer step, on the average of the snapshots taken at the global step (A's three
    extra steps are not in it), and A keeps those three steps on top of the new anchor."""
    from hivemind.utils.crypto import RSAPrivateKey

    from dedloc.swarm.optimizer import build_optimizer
    from helpers import local_dhts, wait_for

    config = default_run_config(
        mode="diloco",
        training={"target_batch_size": 16, "micro_batch_size": 4},
        averaging={"matchmaking_time": 5.0, "average_optimizer_state": True},
        diloco={"overlap": True},
    )
    dhts, opts, models = [], [], []
    process_key = RSAPrivateKey._process_wide_key
    try:
        dhts.extend(local_dhts(2))
        for dht in dhts:
            # each peer signs its progress record with a key of its own, as in separate processes
            RSAPrivateKey._process_wide_key = RSAPrivateKey()
            models.append(_model())  # the same initial parameters on both peers
            opts.append(build_optimizer(dht, config, "overlap", models[-1], micro_batch_size=4))
        (a, b), (model_a, model_b) = opts, models
        anchor_before = [t.clone() for t in a.outer.anchor]
        batches = [torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]

        def local_step(opt, model, batch) -> None:
            opt.zero_grad()
            model(batch).pow(2).mean().backward()
            opt.step()

        local_step(a, model_a, batches[0])
        local_step(a, model_a, batches[1])
        local_step(b, model_b, batches[2])
        wait_for(lambda: a.tracker.global_progress.samples_accumulated >= 12, 60, "A to see both peers' samples")
        local_step(a, model_a, batches[3])  # 16 samples, the global step: A's round begins, in the background
        assert a.local_epoch == 1 and a.state_averager.pending_updates
        # the round copies its snapshot in hivemind's background thread: the steps below come after it
        wait_for(lambda: a.state_averager._old_tensors is not None, 30, "A's round to take its snapshot")
        for batch in batches[4:7]:
            local_step(a, model_a, batch)
        assert a.state_averager.steps_beside_round == 3
        assert a.state_averager.outer_round is not None, "A's round ended without B"

        wait_for(lambda: b.tracker.ready_to_update_epoch, 60, "B to see the global step")
        assert b.tracker.global_epoch == 0, "A published its step before its round ended"
        local_step(b, model_b, batches[7])  # B's global step: it joins A's round
        for opt in opts:
            wait_for(lambda: opt.state_averager.finished_averaging_round.is_set(), 60, "the round to end")
        snapshots = [[t.clone() for t in opt.state_averager._old_tensors[: len(anchor_before)]] for opt in opts]
        held_a = [p.detach().clone() for p in model_a.parameters()]
        for opt in opts:
            opt.state_averager.step(wait_for_delayed_updates=True)  # applies the ended round

        # the same outer step on both peers, on the mean of the two snapshots
        reference = _model(seed=9)
        with torch.no_grad():
            for p, anchor in zip(reference.parameters(), anchor_before):
                p.copy_(anchor)
        expected = OuterStep(reference.parameters(), config.diloco)
        with torch.no_grad():
            for p, snap_a, snap_b in zip(reference.parameters(), *snapshots):
                p.copy_((snap_a + snap_b) / 2)
        expected.step()
        for want, got_a, got_b in zip(expected.anchor, a.outer.anchor, b.outer.anchor):
            torch.testing.assert_close(got_a, want)
            torch.testing.assert_close(got_b, want)
        # A's snapshot holds none of its three extra steps; it keeps them on top of the new anchor
        assert any(not torch.equal(h, s) for h, s in zip(held_a, snapshots[0]))
        for p, anchor, held, snap in zip(model_a.parameters(), a.outer.anchor, held_a, snapshots[0]):
            torch.testing.assert_close(p.detach(), anchor + (held - snap))
        for p, anchor in zip(model_b.parameters(), b.outer.anchor):  # B took no step beside the round
            torch.testing.assert_close(p.detach(), anchor)
        for opt in opts:  # Adam's second moments stay non-negative after the delta
            for state in opt.state_averager.optimizer.state.values():
                assert float(state["exp_avg_sq"].min()) >= 0
    finally:
        for opt in opts:
            opt.shutdown()
        for dht in dhts:
            dht.shutdown()
        RSAPrivateKey._process_wide_key = process_key
