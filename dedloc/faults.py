"""Fault injection points, for tests that must kill a daemon at an exact moment.

A test sets ``DEDLOC_FAULTS`` to a comma-separated list of point names in a daemon's environment; when
the daemon reaches a listed point it logs ``fault injected: NAME`` and hangs there until it is killed
(:func:`fault_point`), stops itself until the test sends SIGCONT (:func:`fault_pause`), or misbehaves
there as the name says (:func:`fault_active`). A peer started with one of :data:`ATTACKS` is a scripted
bad volunteer for the attack benchmark: it poisons what it sends to gradient averaging (:func:`poison`),
or, as a reducer, the averages it sends back (:data:`REDUCER_LIES`).
Without the variable (every normal run) a point costs one dictionary lookup and does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional, Sequence

logger = logging.getLogger(__name__)

ENV = "DEDLOC_FAULTS"


def fault_active(name: str) -> bool:
    """Whether ``name`` is among the faults this process was started with (logged): the caller then
    misbehaves as the point's name says, instead of hanging."""
    if name in os.environ.get(ENV, "").split(","):
        logger.warning(f"fault injected: {name}")
        return True
    return False


def fault_point(name: str) -> None:
    """Hang here (logging it) if ``name`` is among the faults this process was started with."""
    if name in os.environ.get(ENV, "").split(","):
        logger.warning(f"fault injected: {name}; hanging here until killed")
        threading.Event().wait()


_paused_at: set[str] = set()  # the pause points this process already stopped at


def fault_pause(name: str) -> None:
    """Stop this process (SIGSTOP, logging it first) the first time it reaches this point, if ``name`` is
    among the faults it was started with: it goes on where it stopped once the test sends SIGCONT. Every
    thread of the process stops with it (its children, p2pd and the DHT's process, run on)."""
    if name in os.environ.get(ENV, "").split(",") and name not in _paused_at:
        _paused_at.add(name)
        logger.warning(f"fault injected: {name}; stopped until SIGCONT")
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)


ATTACKS = {
    "attack-sign-flip": "its gradient × −1000",
    "attack-random": "a random direction with 1000 × its gradient's norm",
    "attack-nan": "NaN in every gradient it sends",
    "attack-weight": "its honest gradient with a claimed weight of 1000 × its samples",
    "attack-reducer-nan": "as a reducer, NaN in place of the average it sends back",
    "attack-reducer-scale": "as a reducer, 1000 × the average it sends back",
}
"""The scripted attacks a peer can be started with (``DEDLOC_FAULTS=attack-…``), as in BTARD's experiments."""
REDUCER_LIES = ("attack-reducer-nan", "attack-reducer-scale")
"""The attacks made as a reducer (:class:`dedloc.swarm.reduction.CheckedPartReducer`), not on what the peer sends."""


def active_attack() -> Optional[str]:
    """The attack this process was started with, if any (logged)."""
    for name in os.environ.get(ENV, "").split(","):
        if name in ATTACKS:
            logger.warning(f"fault injected: {name} ({ATTACKS[name]})")
            return name
    return None


def poison(attack: str, gradients: Sequence) -> None:
    """Turn this peer's averaged-to-be ``gradients`` (torch tensors, in place) into the attack's."""
    import torch

    with torch.no_grad():
        if attack == "attack-sign-flip":
            for tensor in gradients:
                tensor.mul_(-1000.0)
        elif attack == "attack-random":
            norm = float(torch.sqrt(sum(tensor.float().square().sum() for tensor in gradients)))
            noise = [torch.randn_like(tensor) for tensor in gradients]
            scale = 1000.0 * norm / max(float(torch.sqrt(sum(n.square().sum() for n in noise))), 1e-12)
            for tensor, direction in zip(gradients, noise):
                tensor.copy_(direction.mul_(scale))
        elif attack == "attack-nan":
            for tensor in gradients:
                tensor.fill_(float("nan"))


def lie(attack: str, average):
    """What a lying reducer (``attack``, one of :data:`REDUCER_LIES`) sends back in place of ``average``
    (a torch tensor, left as it is: the result is a new one)."""
    import torch

    if attack == "attack-reducer-nan":
        return torch.full_like(average, float("nan"))
    return average * 1000.0
