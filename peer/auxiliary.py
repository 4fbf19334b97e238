"""An auxiliary peer: it trains nothing and helps the swarm average (DeDLOC's auxiliary peers).

A machine without a GPU but with a good uplink (a server, a spare home machine) takes part in every
gradient all-reduce in hivemind's auxiliary role (``AveragingMode.AUX``): it reduces a share of the
vector — receives that slice from every training peer, averages it, sends the result back — and
sends no gradients of its own, so the training peers each reduce, and upload, less. It joins the
state-averaging rounds in the same role. It holds the model only for its shapes (no data, no
optimizer steps) and publishes no training metrics, so it does not count toward the run's peers.

Contract of :meth:`AuxiliaryHelper.run`: returns when the coordinator announces the run finished or a
stop is requested; it never leaves the optimizer inside a step. The caller shuts the optimizer down.
"""

from __future__ import annotations

import logging
import threading
import time

from hivemind.p2p import PeerID

from dedloc.lifecycle import GracefulExit
from dedloc.swarm.optimizer import SwarmOptimizer
from dedloc.swarm.weight_bound import read_progress

from .trainer import BACKGROUND_JOIN_TIMEOUT, RunStatusWatcher

logger = logging.getLogger(__name__)

POLL_PERIOD = 0.2
"""Seconds between the helper's optimizer steps: it must notice a round's start about as soon as the
training peers do, or they wait for its share."""


class SwarmStepWatcher(threading.Thread):
    """Reads the training peers' progress records every ``period`` seconds and hands the step the swarm
    is at to the helper's gradient averager, which looks for that step's group (gradient rounds meet by
    step, :mod:`dedloc.swarm.step_groups`). The helper's own tracker cannot tell it: hivemind holds the
    tracker still while the helper is in a round, which is when it looks for the next group."""

    def __init__(self, optimizer: SwarmOptimizer, period: float = 0.5):
        super().__init__(name="swarm-step-watcher", daemon=True)
        self.opt, self.period = optimizer, period
        self._stopping = threading.Event()

    def run(self) -> None:
        tracker = self.opt.tracker
        while not self._stopping.is_set():
            try:
                steps = [p.epoch for p in read_progress(self.opt.dht, tracker.training_progress_key).values()]
                if max(steps, default=-1) >= 0:
                    self.opt.grad_averager.swarm_step.value = max(steps)
            except Exception as e:  # the DHT unreachable for a while: the last step seen stands
                logger.debug(f"cannot read the swarm's progress: {e!r}")
            self._stopping.wait(self.period)

    def stop(self) -> None:
        self._stopping.set()


class AuxiliaryHelper:
    def __init__(self, dht, coordinator_id: PeerID, optimizer: SwarmOptimizer, stop: GracefulExit,
                 total_steps: int, poll: float = POLL_PERIOD):
        self.opt, self.stop, self.total_steps, self.poll = optimizer, stop, total_steps, poll
        self.watcher = RunStatusWatcher(dht, coordinator_id)
        self.steps = SwarmStepWatcher(optimizer)

    def finished(self) -> bool:
        status = self.watcher.status
        return status is not None and status.finished

    def keep_level(self) -> None:
        """Move to the swarm's step when the swarm is ahead (at the start, or after a round this peer
        missed): hivemind would otherwise open a round for every step behind, and find nobody in it."""
        swarm_step = self.opt.tracker.global_epoch
        if swarm_step > self.opt.local_epoch:
            if self.opt.local_epoch > 0:
                logger.info(f"the swarm moved to step {swarm_step} without this helper (at step {self.opt.local_epoch})")
            self.opt.state_averager.local_epoch = swarm_step
            self.opt.tracker.report_local_progress(local_epoch=swarm_step, samples_accumulated=0)

    def run(self) -> None:
        self.watcher.start()
        self.steps.start()
        try:
            logger.info("helping the swarm average as an auxiliary peer (no training); Ctrl-C to leave")
            self.opt.last_step = self.total_steps
            reported_step, reduced = self.opt.local_epoch, 0
            while not self.stop.is_set() and not self.finished():
                self.keep_level()
                if self.opt.local_epoch < self.total_steps:
                    self.opt.step()
                if self.opt.local_epoch != reported_step:
                    total = self.opt.grad_averager.numbers_reduced.value
                    logger.info(f"step {self.opt.local_epoch}: helped with {total - reduced} numbers of the gradient "
                                f"all-reduce ({total} in all)")
                    reported_step, reduced = self.opt.local_epoch, total
                self.stop.wait(self.poll)
            if self.finished():
                logger.info(f"the run is finished; this helper reduced {self.opt.grad_averager.numbers_reduced.value} "
                            "numbers of the swarm's gradients. Thank you!")
        finally:
            self.watcher.stop()
            self.steps.stop()
            deadline = time.monotonic() + BACKGROUND_JOIN_TIMEOUT
            for thread in (self.watcher, self.steps):
                if thread.is_alive():
                    thread.join(max(0.0, deadline - time.monotonic()))
