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
import time

from hivemind.p2p import PeerID

from dedloc.lifecycle import GracefulExit
from dedloc.swarm.optimizer import SwarmOptimizer

from .trainer import BACKGROUND_JOIN_TIMEOUT, RunStatusWatcher

logger = logging.getLogger(__name__)

POLL_PERIOD = 0.2
"""Seconds between the helper's optimizer steps: it must notice a round's start about as soon as the
training peers do, or they wait for its share."""


class AuxiliaryHelper:
    def __init__(self, dht, coordinator_id: PeerID, optimizer: SwarmOptimizer, stop: GracefulExit,
                 total_steps: int, poll: float = POLL_PERIOD):
        self.opt, self.stop, self.total_steps, self.poll = optimizer, stop, total_steps, poll
        self.watcher = RunStatusWatcher(dht, coordinator_id)

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
            deadline = time.monotonic() + BACKGROUND_JOIN_TIMEOUT
            if self.watcher.is_alive():
                self.watcher.join(max(0.0, deadline - time.monotonic()))
