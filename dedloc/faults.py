"""Fault injection points, for tests that must kill a daemon at an exact moment.

A test sets ``DEDLOC_FAULTS`` to a comma-separated list of point names in a daemon's environment; when
the daemon reaches a listed point it logs ``fault injected: NAME`` and hangs there until it is killed
(:func:`fault_point`), stops itself until the test sends SIGCONT (:func:`fault_pause`), or misbehaves
there as the name says (:func:`fault_active`).
Without the variable (every normal run) a point costs one dictionary lookup and does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

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


def fault_pause(name: str) -> None:
    """Stop this process (SIGSTOP, logging it first) if ``name`` is among the faults it was started
    with: it goes on where it stopped once the test sends SIGCONT. Used before threads or children
    exist, so that nothing else of the process runs meanwhile."""
    if name in os.environ.get(ENV, "").split(","):
        logger.warning(f"fault injected: {name}; stopped until SIGCONT")
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
