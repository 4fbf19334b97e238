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

With ``diloco.overlap`` (the default, with ``outer_momentum`` 0.5) the round runs in the background while the peers go on with
their next local steps: a peer averages the parameters it held at the global step (its *snapshot*),
and when the round ends it moves the anchor by the outer step on that average and its parameters by
as much as the anchor moved past the snapshot — the local steps taken during the round are kept on
top (hivemind's "delta rule"). The outer step then lags the boundary by one round's duration, as in
streaming/overlapped DiLoCo; at most one round is in flight (the next global step waits for it).
"""

from __future__ import annotations

from typing import Iterable, Sequence

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
        moved = self.step_anchor([p.detach() for p in self.params])
        for anchor, param in zip(self.anchor, self.params):
            param.copy_(anchor)
        return moved

    @torch.no_grad()
    def step_anchor(self, averaged: Sequence[torch.Tensor]) -> float:
        """Move the anchor by the outer optimizer along ``anchor − averaged`` (``averaged``: one tensor
        per parameter, in :attr:`params`' order) without touching the parameters; returns the
        pseudo-gradient's L2 norm. The overlapped round (:class:`dedloc.swarm.optimizer.CheckedStateAverager`)
        then moves the parameters by as much as the anchor moved past the values it averaged."""
        squared = 0.0
        for anchor, value in zip(self.anchor, averaged):
            pseudo_gradient = anchor - value.to(anchor.dtype)
            squared += float(pseudo_gradient.float().pow(2).sum())
            anchor.grad = pseudo_gradient
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return squared**0.5

    @torch.no_grad()
    def restart(self) -> None:
        for anchor, param in zip(self.anchor, self.params):
            anchor.copy_(param.detach())
        self.optimizer.state.clear()
