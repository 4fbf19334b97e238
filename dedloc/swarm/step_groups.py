"""Averaging groups keyed by the step: a round only ever holds members at the same step.

hivemind's matchmaking forms a group from whoever looks for one under the averager's group key at
about the same time; the key is the same for every round. On a loaded machine or a slow link a peer
whose step ended a few seconds late then lands in the others' *next* round, and averages its
gradients (or state) for step s with theirs for s + 1: it applies their next update to a state one
update short and stays a phase behind, round after round (docs/reliability.md, "Peers a step apart
in one round").

Here a gradient round is looked for under a key that carries the step its member's gradients are
for: members at different steps never meet. A late peer's round finds no group; the optimizer's usual
paths take over from there (it steps on its own gradients, then sees itself behind and downloads the
state, or takes the swarm's step and waits for a state round to make it level).

State rounds keep hivemind's single key. Keyed the same way (2026-11-29, partition scenario: 3 peers,
2 cores, 20 Mbit/s uplinks), 7-10 state rounds per peer in a 20-step run found no group: the peers'
state rounds follow their gradient rounds and optimizer steps at different moments, and what a state
round averages across neighbouring steps are parameters, which only pulls the peers closer together.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from hivemind.averaging.control import StepControl
from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.averaging.matchmaking import Matchmaking

STEP_BITS = 20  # steps a million apart share a key: never at the same time


def step_group_bits(step: int) -> str:
    """The group bits of a round for ``step`` (hivemind's group keys end in ``.0b<bits>``)."""
    return format(step % (1 << STEP_BITS), f"0{STEP_BITS}b")


def gathered_step(step_control: Optional[StepControl], serializer) -> Optional[int]:
    """The step a round's member gathered for it (from the data it sends its group), or None when it
    gathered none (a plain averager) or anything but an int."""
    if step_control is None:
        return None
    try:
        _bandwidth, _mode, user_data = serializer.loads(step_control.data_for_gather)
        step: Any = serializer.loads(user_data)
    except Exception:
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


class _StepGroupKeys(GroupKeyManager):
    """hivemind's group key manager, whose key carries the step of the round its matchmaking looks
    for a group for (any other time: hivemind's own key). hivemind reads the key when it declares
    itself, lists the others looking and answers a join request, so all three follow the round."""

    def __init__(self, base: GroupKeyManager, matchmaking: Matchmaking, step_of: Callable[[Optional[StepControl]], Optional[int]]):
        self.__dict__.update(base.__dict__)
        self._matchmaking, self._step_of = matchmaking, step_of

    @property
    def current_key(self) -> str:
        step = self._step_of(self._matchmaking.step_control)
        return f"{self.prefix}.0b{self.group_bits if step is None else step_group_bits(step)}"


class StepKeyedGroups:
    """Mixin for hivemind averagers (before the averager class): each round looks for its group
    under a key that holds the step it gathers (see the module's docstring). Rounds that gather no
    step (an int) keep hivemind's key."""

    _decoded: tuple[Optional[StepControl], Optional[int]] = (None, None)  # the last round's step, decoded once

    def group_step(self, control: Optional[StepControl]) -> Optional[int]:
        """The step whose group the round ``control`` looks for (read each time hivemind reads the key)."""
        if self._decoded[0] is not control:
            self._decoded = (control, gathered_step(control, self.serializer))
        return self._decoded[1]

    async def _step(self, *, step: StepControl, future_for_init):
        # runs in the averager's own process, where hivemind built its matchmaking
        matchmaking = self._matchmaking
        if not isinstance(matchmaking.group_key_manager, _StepGroupKeys):
            matchmaking.group_key_manager = _StepGroupKeys(matchmaking.group_key_manager, matchmaking, self.group_step)
        return await super()._step(step=step, future_for_init=future_for_init)
