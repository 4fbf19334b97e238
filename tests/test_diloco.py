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
