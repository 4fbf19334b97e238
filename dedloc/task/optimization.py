"""The optimizer every peer applies to the swarm's averaged gradient, and the learning-rate schedule.

Both are factories because hivemind builds the optimizer itself (on its offloaded copy of the
parameters) and steps the schedule once per *global* step, so the schedule is right after any restart.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from dedloc.config import OptimizerSection


class ClippedAdamW(torch.optim.AdamW):
    """AdamW that clips the (averaged) gradient to ``max_grad_norm`` right before each step."""

    def __init__(self, params: Iterable, *, max_grad_norm: float | None = None, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure=None):
        if self.max_grad_norm is not None:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_grad_norm)
        return super().step(closure)


def optimizer_factory(section: OptimizerSection) -> Callable[[Iterable], torch.optim.Optimizer]:
    def make(params: Iterable) -> torch.optim.Optimizer:
        return ClippedAdamW(
            params,
            lr=section.lr,
            betas=section.betas,
            eps=section.eps,
            weight_decay=section.weight_decay,
            max_grad_norm=section.clip_grad_norm or None,
        )

    return make


def lr_factor(step: int, section: OptimizerSection, total_steps: int) -> float:
    """Multiplier of the peak learning rate at global ``step``."""
    if step < section.warmup_steps:
        return (step + 1) / (section.warmup_steps + 1)
    if section.schedule == "constant":
        return 1.0
    span = max(1, total_steps - section.warmup_steps)
    progress = min(1.0, (step - section.warmup_steps) / span)
    if section.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(
    section: OptimizerSection, total_steps: int
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]:
    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, section, total_steps))

    return make
