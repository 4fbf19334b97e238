"""DiLoCo's outer step (Douillard et al., 2023; OpenDiLoCo, 2024).

In DiLoCo mode every peer steps its own (inner) optimizer on each micro-batch. Once the swarm has
computed its target batch, the peers average their parameters, and each applies the outer step: the
pseudo-gradient is how far the average moved from the parameters of the last outer step (the
*anchor*), and an SGD step with Nesterov momentum on the anchor gives the new parameters. Averaging
the parameters and subtracting them from a shared anchor is the same as averaging the peers' own
pseudo-gradients, so one all-reduce of the parameters serves.

Peers that took the same rounds hold the same anchor and momentum and so stay identical. A peer that
downloaded the swarm's state starts from the downloaded parameters with no momentum: its outer step
then differs from the others' by a part that shrinks with every round (by a factor
``1 − outer_lr`` for the anchor), and a state average brings its parameters level each round.
"""

from __future__ import annotations

from typing import Iterable

import torch

from dedloc.config import DilocoSection


class OuterStep:
    """The anchor (parameters at the last outer step), its momentum, and the outer step on them.

    :meth:`step` takes the parameters as the round left them (the swarm's average, or this peer's own
    when no round was held), moves the anchor by the outer optimizer along the pseudo-gradient
    ``anchor − parameters``, and writes the new anchor into the parameters. :meth:`restart` makes the
    parameters held now the anchor and forgets the momentum (after a state download).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], section: DilocoSection):
        self.params = [p for p in params if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]
        self.optimizer = torch.optim.SGD(
            self.anchor, lr=section.outer_lr, momentum=section.outer_momentum, nesterov=section.nesterov
        )
        self.steps = 0

    @torch.no_grad()
    def step(self) -> float:
        """Apply the outer step; returns the L2 norm of the pseudo-gradient (how far the round moved)."""
        squared = 0.0
        for anchor, param in zip(self.anchor, self.params):
            pseudo_gradient = anchor - param.detach()
            squared += float(pseudo_gradient.float().pow(2).sum())
            anchor.grad = pseudo_gradient
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for anchor, param in zip(self.anchor, self.params):
            param.copy_(anchor)
        self.steps += 1
        return squared**0.5

    @torch.no_grad()
    def restart(self) -> None:
        for anchor, param in zip(self.anchor, self.params):
            anchor.copy_(param.detach())
        self.optimizer.state.clear()
