"""A volunteer's training loop: accumulate toward the swarm's target batch, step together, report.

Contract of :meth:`PeerTrainer.run`: it returns when the run has ended (the coordinator announced the
final checkpoint, or the announcement did not come within ``end_grace`` after this peer reached the
last step) or when a stop was requested; it never leaves the optimizer mid-step. The caller shuts
the optimizer and the DHT down. While it trains, an enabled :class:`ProgressView` shows its progress;
the view is stopped (the terminal restored) however training ends.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import hivemind
import psutil
import torch
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from dedloc.config import RunConfig
from dedloc.errors import IncompatibleSwarmError
from dedloc.faults import fault_active
from dedloc.lifecycle import GracefulExit, PauseSwitch
from dedloc.swarm.identity import Identity
from dedloc.swarm.records import (
    PeerMetrics,
    RunManifest,
    METRICS_HEARTBEAT,
    ONLINE_WINDOW,
    RunStatus,
    describe_mismatch,
    fetch_metrics,
    fetch_status,
    owner_subkey,
    publish_metrics,
)
from dedloc.task.build import PeerTask
from dedloc.task.device import ComputePlan, describe_device, parameters_finite
from dedloc.task.model import parameter_fingerprint, parameter_sketch, sketch_distance

from .progress_view import PeerProgress, ProgressView
from .swarm_contact import SwarmContact

logger = logging.getLogger(__name__)

SWARM_RATE_PERIOD = 5.0
BACKGROUND_JOIN_TIMEOUT = 10.0  # a DHT read in flight times out within this
FINAL_SYNC_WINDOWS = 3
FINAL_MATCH_TOLERANCE = 1e-6  # relative L2 from the final checkpoint, with lossless state averaging
FINAL_MATCH_TOLERANCE_LOSSY = 2e-3  # ... with fp16 or 8-bit state averaging
FINAL_MATCH_ATTEMPTS = 2  # the first download may find a peer's state before the checkpoint's is offered
FINAL_SYNC_ROUNDS = 3  # rounds tried at the end while some peer leaves them half-done
NONFINITE_LOGGED = 3  # dropped micro-batches logged one by one; after that every 100th
RECOVERY_MAX_DELAY = 60.0  # seconds between tries to download a finite state, at most
# hivemind estimates the time to the next step from its samples/s, which starts near zero: such an
# estimate (years) is shown as unknown
MAX_ETA = 24 * 3600.0


class RunStatusWatcher(threading.Thread):
    """Polls the coordinator's run status in the background so training never waits on the DHT."""

    def __init__(self, dht: hivemind.DHT, coordinator_id: PeerID, period: float = 2.0):
        super().__init__(name="run-status-watcher", daemon=True)
        self.dht, self.coordinator_id, self.period = dht, coordinator_id, period
        self.status: Optional[RunStatus] = None
        self.changed = threading.Event()
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                status = fetch_status(self.dht, self.coordinator_id)
                if status is not None:
                    self.status = status
                    self.changed.set()
            except Exception as e:  # an incompatible or unreachable record must not kill training
                logger.debug(f"cannot read the run status: {e!r}")
            self._stopping.wait(self.period)

    def stop(self) -> None:
        self._stopping.set()


def online_peers(
    records: Iterable[PeerMetrics], now: Optional[float] = None, exclude: Optional[str] = None
) -> list[PeerMetrics]:
    """The records of peers online (newest record younger than ``ONLINE_WINDOW``), except ``exclude``."""
    now = time.time() if now is None else now
    return [m for m in records if now - m.time < ONLINE_WINDOW and m.peer_id != exclude]


def swarm_samples_per_second(
    records: Iterable[PeerMetrics], now: Optional[float] = None, exclude: Optional[str] = None
) -> float:
    """Samples/s summed over the peers whose newest record is recent, except the peer ``exclude``."""
    return sum(m.samples_per_second for m in online_peers(records, now, exclude))


class SwarmRateWatcher(threading.Thread):
    """Reads the other peers' samples/s from their metrics records in the background, for the view.

    This peer's own record is left out: its live rate is fresher. Separate from
    :class:`RunStatusWatcher` so that a slow metrics read never delays the run status, which decides
    when this peer stops.
    """

    def __init__(self, dht: hivemind.DHT, prefix: str, peer_id: str, period: float = SWARM_RATE_PERIOD):
        super().__init__(name="swarm-rate-watcher", daemon=True)
        self.dht, self.prefix, self.peer_id, self.period = dht, prefix, peer_id, period
        self.others_samples_per_second: Optional[float] = None
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                records, _ = fetch_metrics(self.dht, self.prefix, timeout=self.period)
                self.others_samples_per_second = swarm_samples_per_second(records.values(), exclude=self.peer_id)
            except Exception as e:  # only the view needs this figure
                logger.debug(f"cannot read the swarm's metrics: {e!r}")
            self._stopping.wait(self.period)

    def stop(self) -> None:
        self._stopping.set()


class MetricsHeartbeat(threading.Thread):
    """Republishes the peer's metrics when nothing was published for ``METRICS_HEARTBEAT`` seconds,
    also while training is held up in a long averaging round or a state download. A frozen peer
    (SIGSTOP, a suspended laptop) stops beating with it, and drops out of the swarm's count."""

    def __init__(self, trainer: "PeerTrainer"):
        super().__init__(name="metrics-heartbeat", daemon=True)
        self.trainer = trainer
        self._stopping = threading.Event()

    def run(self) -> None:
        while not self._stopping.wait(1.0):
            if time.monotonic() - self.trainer._last_publish > METRICS_HEARTBEAT:
                try:
                    # the step last published: a step just reached is published with its loss first
                    self.trainer.publish(self.trainer.last_loss, 0, step=self.trainer._published_step)
                except Exception as e:  # best effort: the next beat tries again
                    logger.debug(f"heartbeat failed: {e!r}")

    def stop(self) -> None:
        self._stopping.set()


@dataclass
class StepStats:
    """What this peer computed toward the current global step."""

    losses: list[float] = field(default_factory=list)
    samples: int = 0

    def mean_loss(self) -> Optional[float]:
        finite = [x for x in self.losses if math.isfinite(x)]
        return sum(finite) / len(finite) if finite else None


class PeerTrainer:
    def __init__(
        self,
        dht: hivemind.DHT,
        identity: Identity,
        manifest: RunManifest,
        coordinator_id: PeerID,
        task: PeerTask,
        optimizer: hivemind.Optimizer,
        micro_batch_size: int,
        stop: GracefulExit,
        volunteer: Optional[str] = None,
        end_grace: float = 120.0,
        view: Optional[ProgressView] = None,
        compute: Optional[ComputePlan] = None,
        pause: Optional[PauseSwitch] = None,
    ):
        """``compute``: device, precision and micro-batch (default: the CPU in fp32, ``micro_batch_size``);
        ``pause``: the volunteer's pause switch (SIGUSR1/SIGUSR2), if any."""
        self.dht, self.identity, self.manifest = dht, identity, manifest
        self.compute = compute or ComputePlan(torch.device("cpu"), "fp32", micro_batch_size)
        self.config: RunConfig = manifest.config
        self.prefix = manifest.swarm_prefix
        self.task, self.opt, self.micro_batch_size = task, optimizer, micro_batch_size
        self.stop, self.volunteer, self.end_grace = stop, volunteer, end_grace
        self.watcher = RunStatusWatcher(dht, coordinator_id)
        self.peer_id = identity.peer_id.to_base58()
        self.view = view or ProgressView(enabled=False)
        self.rate_watcher = SwarmRateWatcher(dht, self.prefix, self.peer_id)
        self.contact = SwarmContact(dht, self.prefix, self.peer_id, coordinator_id)
        self.samples_contributed = 0
        self.nonfinite_batches = 0  # micro-batches whose gradients were NaN or infinite (dropped)
        self._nan_fault = fault_active("nan-micro-batch")  # tests: this peer's third micro-batch gives a NaN loss
        self._nan_parameters_fault = fault_active("nan-parameters")  # tests: its parameters turn NaN at step 2
        self._recovery_delay = 1.0  # seconds before the next try to download a finite state
        self.last_loss: Optional[float] = None
        self._last_publish = 0.0
        self._publish_lock = threading.Lock()
        self._published_step = 0
        self.heartbeat = MetricsHeartbeat(self)
        self.pause = pause

    # ----------------------------------------------------------------------------------------------
    def stop_at(self) -> int:
        status = self.watcher.status
        if status is not None and status.stop_at is not None:
            return min(status.stop_at, self.config.training.total_steps)
        return self.config.training.total_steps

    def run_finished(self) -> bool:
        status = self.watcher.status
        return status is not None and status.finished

    def run_changed(self) -> Optional[str]:
        """What differs, if the coordinator now runs another config or tokenizer than this peer."""
        status = self.watcher.status
        return None if status is None else describe_mismatch(self.manifest, status)

    def publish(self, step_loss: Optional[float], mini_steps: int, step: Optional[int] = None) -> None:
        """Publish this peer's metrics (at ``step``, by default its current one) in the background; a
        diverged loss is sent as unknown."""
        if step_loss is not None and not (math.isfinite(step_loss) and 0.0 <= step_loss <= 1e4):
            step_loss = None
        metrics = PeerMetrics(
            peer_id=self.peer_id,
            step=self.opt.local_epoch if step is None else step,
            loss=step_loss,
            mini_steps=mini_steps,
            samples_per_second=float(self.opt.tracker.performance_ema.samples_per_second),
            samples=self.samples_contributed,
            time=time.time(),
            volunteer=self.volunteer,
            device=describe_device(self.compute.device)[:64],
            client_mode=bool(self.dht.client_mode),
        )
        with self._publish_lock:
            publish_metrics(self.dht, self.prefix, self.identity.public_key, metrics)
            self._last_publish, self._published_step = time.monotonic(), metrics.step

    def say_goodbye(self, timeout: float = 5.0) -> None:
        """Withdraw this peer's metrics so the coordinator stops counting it at once (best effort)."""
        try:
            publish_metrics(self.dht, self.prefix, self.identity.public_key, None).result(timeout)
        except Exception as e:  # the DHT may be gone already; the record then simply expires
            logger.debug(f"goodbye failed: {e!r}")

    # ----------------------------------------------------------------------------------------------
    def wait_for_peers(self) -> None:
        """Wait (up to ``wait_for_peers_timeout``) until ``min_peers`` peers are online, this one included."""
        wanted = self.config.training.min_peers
        started = time.monotonic()
        deadline = started + self.config.training.wait_for_peers_timeout
        announced = False
        while not self.stop.is_set():
            self.publish(None, 0)
            records, _ = fetch_metrics(self.dht, self.prefix)
            online = [m for m in records.values() if time.time() - m.time < ONLINE_WINDOW]
            if len(online) >= wanted:
                return
            if self.opt.local_epoch > 0 or any(m.step > 0 for m in online):
                # joining a run under way (also a restarted peer, still at step 0 until it downloads):
                # a peer that is downloading the state publishes metrics but no progress, so it may
                # never be counted; wait at most one online window for it
                deadline = min(deadline, started + ONLINE_WINDOW)
            if not announced:
                logger.info(f"waiting for the swarm: {len(online)} of {wanted} peers online")
                announced = True
            if time.monotonic() >= deadline:
                logger.warning(f"only {len(online)} of {wanted} peers came online; training with them")
                return
            self.stop.wait(1.0)

    def sync_with_swarm(self) -> None:
        """Download the current state if the swarm — or the coordinator's newest checkpoint, when every
        peer had left — is ahead of this peer."""
        self.opt.tracker.fetched_global_progress_this_epoch.wait(timeout=10)
        status = fetch_status(self.dht, self.watcher.coordinator_id)
        checkpoint_step = status.checkpoint_step if status is not None and not describe_mismatch(self.manifest, status) else None
        global_step = max(self.opt.tracker.global_epoch, checkpoint_step or 0)
        if global_step > self.opt.local_epoch:
            logger.info(f"the swarm is at step {global_step}: downloading its state")
            self.catch_up(global_step, attempts=1)  # the step may come from records of peers that have left

    def announce_to_tracker(self) -> None:
        """Publish this peer in hivemind's progress records (0 samples at its current step).

        hivemind's tracker publishes a peer only once it has accumulated samples, and counts the swarm
        from those records; a peer that is not counted yet believes it is alone, so its first step —
        which may come with its very first micro-batch when the others already have the batch — is
        taken alone ("there are no other peers"), and it skips the state averaging the others wait for.
        """
        tracker = self.opt.tracker
        progress = LocalTrainingProgress(
            peer_id=self.dht.peer_id.to_bytes(),
            epoch=self.opt.local_epoch,
            samples_accumulated=0,
            samples_per_second=0.0,
            time=get_dht_time(),
            client_mode=bool(tracker.client_mode),
        )
        try:
            self.dht.store(
                tracker.training_progress_key,
                subkey=owner_subkey(self.identity.public_key),
                value=progress.dict(),
                expiration_time=get_dht_time() + tracker.metadata_expiration,
                return_future=True,
            ).result(10)
        except Exception as e:
            logger.debug(f"could not announce this peer to the progress tracker: {e!r}")

    def wait_for_first_round(self) -> None:
        """Before contributing, wait until hivemind's tracker counts every peer online now (by their
        fresh metrics records, itself included), so its first step is taken together with them.

        The count is taken again every few seconds: a peer that left meanwhile is not waited for, and
        a restarted peer's own old record (same identity) does not count as another peer. In a run under
        way (this peer downloaded a step > 0) it waits at most ``ONLINE_WINDOW`` seconds.
        """
        timeout = self.config.training.wait_for_peers_timeout
        if self.opt.local_epoch > 0:
            # joining a run under way: a peer that is downloading the state publishes metrics but no
            # progress, so it may never be counted; wait at most one online window for it
            timeout = min(timeout, ONLINE_WINDOW)
        deadline = time.monotonic() + timeout
        wanted, counted_at, announced_at = 1, -math.inf, -math.inf
        while not self.stop.is_set() and time.monotonic() < deadline:
            if time.monotonic() - counted_at > 2.0:
                records, _ = fetch_metrics(self.dht, self.prefix)
                wanted = 1 + len(online_peers(records.values(), exclude=self.peer_id))
                counted_at = time.monotonic()
                if self.opt.tracker.global_progress.num_peers < wanted:
                    self.opt.refresh_swarm_progress()  # else it reads them up to 10 s from now
            if wanted <= 1 or self.opt.tracker.global_progress.num_peers >= wanted:
                return
            if time.monotonic() - announced_at > ONLINE_WINDOW / 2:  # the announcement expires
                self.announce_to_tracker()
                announced_at = time.monotonic()
            self.stop.wait(0.2)
        if not self.stop.is_set():
            logger.warning(f"hivemind sees {self.opt.tracker.global_progress.num_peers} of {wanted} peers; starting anyway")

    def log_step(self, stats: StepStats) -> None:
        progress = self.opt.tracker.global_progress
        loss = stats.mean_loss()
        logger.info(
            f"step={self.opt.local_epoch} loss={'n/a' if loss is None else f'{loss:.4f}'} "
            f"samples/s={self.opt.tracker.performance_ema.samples_per_second:.1f} "
            f"peers={max(progress.num_peers, 1)} contributed={self.samples_contributed} "
            f"params={parameter_fingerprint(self.task.model):.10g}"
        )

    def progress(self) -> PeerProgress:
        """A snapshot for the view; reads only what is in memory, so it is cheap every micro-step."""
        tracker = self.opt.tracker
        swarm = tracker.global_progress
        mine = float(tracker.performance_ema.samples_per_second)
        others = self.rate_watcher.others_samples_per_second
        eta = swarm.eta_next_epoch - get_dht_time()  # inf right after a step, until the next fetch
        return PeerProgress(
            global_step=self.opt.local_epoch,
            total_steps=self.stop_at(),
            samples_accumulated=swarm.samples_accumulated,
            target_batch_size=swarm.target_batch_size,
            my_samples_per_second=mine,
            swarm_samples_per_second=None if others is None else others + mine,
            peers=max(swarm.num_peers, 1),
            seconds_to_next_step=max(eta, 0.0) if eta < MAX_ETA else None,
            contributed=self.samples_contributed,
            loss=self.last_loss,
        )

    # ----------------------------------------------------------------------------------------------
    def train(self) -> None:
        model, opt = self.task.model, self.opt
        model.train()
        batches = iter(self.task.stream)
        stats = StepStats()
        epoch = opt.local_epoch
        final_synced = False
        self.view.update(self.progress())
        self.wait_for_first_round()
        while (
            not self.stop.is_set()
            and not self.run_finished()
            and not self.run_changed()
            and opt.local_epoch < self.stop_at()
        ):
            if self.contact.lost.is_set():
                self.wait_for_contact()
                stats, epoch = StepStats(), opt.local_epoch
                continue
            if self.pause is not None and self.pause.is_paused():
                self.hold_while_paused()
                stats, epoch = StepStats(), opt.local_epoch
                continue
            if self._nan_parameters_fault and opt.local_epoch >= 2 and len(stats.losses) == 1:
                self._nan_parameters_fault = False
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))
            batch = self.compute.to_device(next(batches))
            with self.compute.autocast():
                loss = model(**batch).loss
            if self._nan_fault and len(stats.losses) == 2:
                self._nan_fault, loss = False, loss * float("nan")
            opt.last_step = self.stop_at()
            if not self.compute.backward_and_step(loss, opt):
                self.drop_nonfinite_batch(loss)
                continue
            stats.losses.append(float(loss.detach()))
            opt.zero_grad(set_to_none=False)
            stats.samples += self.micro_batch_size
            # only what the optimizer accumulated counts: not the micro-batch that found this peer
            # behind the swarm, nor those computed while its state was older than the swarm's
            if self.samples_contributed == 0 and self.opt.samples_accumulated_total > 0:
                started = psutil.Process().create_time()
                logger.info(f"first samples contributed {time.time() - started:.1f} s after this process started")
            self.samples_contributed = self.opt.samples_accumulated_total
            if opt.local_epoch != epoch:
                epoch = opt.local_epoch
                if epoch >= self.stop_at():
                    # before the last step is published: the coordinator's final checkpoint, which it
                    # downloads once it sees that step, must hold the averaged parameters
                    self.final_sync()
                    final_synced = True
                self.last_loss = stats.mean_loss()
                self.publish(self.last_loss, len(stats.losses))
                self.log_step(stats)
                stats = StepStats()
            self.view.update(self.progress())
        if (
            not final_synced
            and not self.stop.is_set()
            and not self.run_finished()
            and not self.run_changed()
            and opt.local_epoch >= self.stop_at()
        ):
            # the end was announced only once this peer had got there (the announcement travels for a
            # few seconds): the final round is still due, and the step line is logged again after it
            logger.info(f"the run ends at step {self.stop_at()}, which this peer has reached: final state-averaging round")
            self.final_sync()
            self.log_step(stats)

    def hold_while_paused(self) -> None:
        """Paused by the volunteer (SIGUSR1) or by a busy GPU (``--pause-when-busy``): leave the
        averaging rotation cleanly (see :meth:`SwarmOptimizer.leave_rotation`) and compute nothing until
        resumed, stopped, or the run ends. The peer stays online meanwhile (metrics, state for
        newcomers). Resumed at the swarm's step it carries on without a download; behind it, its
        optimizer downloads the state."""
        opt = self.opt
        logger.info(f"paused at step {opt.local_epoch} ({self.pause.reason()}): leaving the averaging rotation")
        opt.leave_rotation()
        while self.pause.is_paused() and not self.stop.is_set() and not self.run_finished() and not self.run_changed():
            self.stop.wait(0.5)
        opt.rejoin_rotation()
        if not self.pause.is_paused():
            logger.info(f"resumed at step {opt.local_epoch}; the swarm is at step {opt.tracker.global_epoch}")

    def wait_for_contact(self) -> None:
        """Cut off from the swarm: train no further (what this peer would compute alone is lost anyway),
        and offer nobody this peer's state; once back in touch, take the swarm's state if other peers
        trained meanwhile. Gradients accumulated before the outage are dropped with the download."""
        for averager in self.state_servers():
            averager.state_sharing_priority = -1.0
        while self.contact.lost.is_set() and not self.stop.is_set() and not self.run_finished():
            self.stop.wait(0.5)
        if not self.contact.regained.is_set() or self.stop.is_set():
            return
        self.contact.regained.clear()
        records, _ = fetch_metrics(self.dht, self.prefix)
        others = online_peers(records.values(), exclude=self.peer_id)
        if not others:
            logger.info(f"no other peer trained while this one was cut off: continuing from step {self.opt.local_epoch}")
            for averager in self.state_servers():
                averager.state_sharing_priority = self.opt.local_epoch
            return
        swarm_step = max(m.step for m in others)
        logger.info(
            f"this peer is at step {self.opt.local_epoch}, the swarm at step {swarm_step}: downloading its state "
            "(gradients accumulated before the outage are dropped)"
        )
        self.catch_up(swarm_step)

    def drop_nonfinite_batch(self, loss: torch.Tensor) -> None:
        """A micro-batch's gradients came out NaN or infinite, and it was dropped (not sent, not counted).
        Logged one by one at first, then every 100th. When what is not finite is this peer's own
        parameters, no later micro-batch can be any better: it downloads the swarm's state instead."""
        self.nonfinite_batches += 1
        if not parameters_finite(self.task.model):
            self.recover_parameters()
        elif self.nonfinite_batches <= NONFINITE_LOGGED or self.nonfinite_batches % 100 == 0:
            logger.warning(f"a micro-batch gave NaN or infinite gradients (loss {float(loss.detach()):.4g}): "
                           f"dropped, not sent to the swarm ({self.nonfinite_batches} so far)")

    def recover_parameters(self) -> None:
        """This peer's parameters are NaN or infinite: it stops serving its state and downloads the
        swarm's. When no peer serves a finite one, it waits (a delay that doubles up to
        ``RECOVERY_MAX_DELAY``) and returns: the next micro-batch, NaN again, brings it back here."""
        servers = self.state_servers()
        for averager in servers:
            averager.allow_state_sharing = False
        logger.warning(f"this peer's parameters are NaN or infinite (step {self.opt.local_epoch}): it stops "
                       "serving its state and downloads the swarm's")
        started = time.monotonic()
        try:
            self.opt.load_state_from_peers()
        except Exception as e:  # hivemind raises timeouts and connection errors here
            logger.warning(f"downloading the swarm's state failed ({e!r})")
        if parameters_finite(self.task.model):
            for averager in servers:
                averager.allow_state_sharing = True
            self._recovery_delay = 1.0
            logger.info(f"a finite state downloaded in {time.monotonic() - started:.1f} s (step "
                        f"{self.opt.local_epoch}): training on")
            return
        logger.warning(f"no peer served a finite state; trying again in {self._recovery_delay:.0f} s")
        self.stop.wait(self._recovery_delay)
        self._recovery_delay = min(2 * self._recovery_delay, RECOVERY_MAX_DELAY)

    def state_servers(self) -> list:
        """The optimizer's averagers that serve state: the state averager, and the gradient averager
        except in DiLoCo mode (which has none); none in client mode."""
        return [a for a in (self.opt.state_averager, self.opt.grad_averager) if a is not None and not a.client_mode]

    def catch_up(self, swarm_step: int, attempts: int = 6) -> None:
        """Download the swarm's state until this peer is at ``swarm_step`` or later, retrying with backoff.

        hivemind's download returns without a word when no donor could serve (right after an outage
        the others cannot be dialled yet) or when the only donor is behind this peer, so the step is
        checked after each try. After ``attempts`` tries this peer carries on; hivemind downloads the
        state again once it sees this peer behind.
        """
        started, delay = time.monotonic(), 1.0
        for attempt in range(1, attempts + 1):
            self.opt.load_state_from_peers()
            # a state older than swarm_step (the swarm stepped meanwhile) is not downloaded again: the
            # optimizer takes the swarm's step at its next check
            got_state = self.opt.state_averager.downloaded_epoch is not None
            if self.opt.local_epoch >= swarm_step or got_state or self.stop.is_set() or attempt == attempts:
                break
            logger.info(f"no donor could serve step {swarm_step} yet (try {attempt} of {attempts}); retrying in {delay:.0f} s")
            self.stop.wait(delay)
            delay = min(delay * 2, 16.0)
        accumulated = self.opt.tracker.local_progress.samples_accumulated
        logger.info(
            f"state downloaded in {time.monotonic() - started:.1f} s: now at step {self.opt.local_epoch}, "
            f"{accumulated} samples accumulated"
        )

    def final_sync(self) -> None:
        """One last synchronous state-averaging round with the peers still here, so that every peer —
        and the checkpoint the coordinator takes from any of them — ends the run with the same parameters.

        A round that a peer left in the middle leaves the others' values differing (see
        :class:`CheckedStateAverager`); every peer that took part notices, so they all average once more,
        up to ``FINAL_SYNC_ROUNDS`` rounds. A peer whose round found nobody arrived after the others'
        round: it downloads their state instead.
        """
        averager = self.opt.state_averager
        averager.step(wait_for_delayed_updates=True)  # the last regular round, running in the background
        if self.opt.tracker.global_progress.num_peers < 2:
            return  # alone: nobody to agree with
        # peers reach the last step up to a few seconds apart (a slow or recovering one later): the
        # round starts FINAL_SYNC_WINDOWS matchmaking windows from now, and every peer that arrives
        # before the first one's round starts joins it, so they all end with the same parameters
        window = FINAL_SYNC_WINDOWS * self.config.averaging.matchmaking_time
        try:
            averager.final_round.set()
            for attempt in range(1, FINAL_SYNC_ROUNDS + 1):
                partial_rounds, rounds_done = averager.partial_rounds.value, averager.rounds_done.value
                averager.step(
                    averaging_round=True,
                    delay_averaging=False,
                    averaging_opts=dict(
                        scheduled_time=get_dht_time() + window, timeout=window + self.config.averaging.averaging_timeout
                    ),
                )
                if averager.rounds_done.value == rounds_done:
                    self.take_final_state()
                    return
                if averager.partial_rounds.value == partial_rounds:
                    return
                if attempt < FINAL_SYNC_ROUNDS:
                    logger.warning("the final state-averaging round was left half-done: averaging once more")
            logger.warning(f"{FINAL_SYNC_ROUNDS} final state-averaging rounds were left half-done; keeping this state")
        except Exception as e:
            logger.warning(f"the final state-averaging round failed ({e!r}); keeping this peer's own state")
        finally:
            averager.final_round.clear()

    def take_final_state(self) -> None:
        """This peer got to the last step after the others had averaged for the last time (it missed a
        round on the way): take the state they ended with. They serve it until the coordinator has its
        final checkpoint, which waits for this peer's last step."""
        logger.warning("the final state-averaging round found no other peer: downloading the state the others ended with")
        started = time.monotonic()
        self.opt.load_state_from_peers()
        logger.info(f"final state downloaded in {time.monotonic() - started:.1f} s (step {self.opt.local_epoch})")

    def wait_for_end(self) -> None:
        """After the last step: keep serving state until the coordinator has its final checkpoint."""
        if self.stop.is_set() or self.run_finished() or self.run_changed():
            return
        logger.info(f"reached step {self.opt.local_epoch}, the end of the run: waiting for the coordinator's final checkpoint")
        deadline = time.monotonic() + self.end_grace
        while not self.stop.is_set() and not self.run_finished() and time.monotonic() < deadline:
            self.watcher.changed.wait(1.0)
            self.watcher.changed.clear()
        if not self.run_finished() and not self.stop.is_set():
            logger.warning(f"the coordinator did not announce the end within {self.end_grace:.0f} s; leaving")

    def match_final_checkpoint(self) -> None:
        """The run is over: end with the final checkpoint's parameters. A final state-averaging round
        that split into groups, or that a peer left half-done without every peer noticing, leaves some
        peers apart from the checkpoint; such a peer (its :func:`parameter_sketch` further than the
        state averaging's precision from the one the coordinator published) downloads the checkpoint's
        state, which the coordinator now serves ahead of every peer's."""
        status = self.watcher.status
        if self.stop.is_set() or status is None or not status.finished or status.final_sketch is None:
            return
        if fault_active("final-state-astray"):  # as if this peer's final round had gone astray
            with torch.no_grad():
                for p in self.task.model.parameters():
                    p.mul_(1.0 + 1e-3)
        lossless = self.config.averaging.state_compression == "none"
        tolerance = FINAL_MATCH_TOLERANCE if lossless else FINAL_MATCH_TOLERANCE_LOSSY
        distance = sketch_distance(parameter_sketch(self.task.model), status.final_sketch)
        if distance <= tolerance:
            return
        logger.warning(
            f"this peer's parameters ended {distance:.1e} (relative) apart from the final checkpoint's: "
            "downloading the checkpoint's state"
        )
        started = time.monotonic()
        for attempt in range(1, FINAL_MATCH_ATTEMPTS + 1):
            # a peer that stepped past the end before it heard of it takes the checkpoint's state all the
            # same: hivemind takes no state of a step older than its own
            averager = self.opt.state_averager
            averager.local_epoch = min(averager.local_epoch, status.checkpoint_step or 0)
            try:
                self.opt.state_averager.load_state_from_peers(timeout=self.config.averaging.load_state_timeout)
            except Exception as e:  # hivemind raises timeouts and connection errors here
                logger.warning(f"downloading the final checkpoint's state failed ({e!r})")
            distance = sketch_distance(parameter_sketch(self.task.model), status.final_sketch)
            if distance <= tolerance or self.stop.is_set():
                break
        logger.log(
            logging.INFO if distance <= tolerance else logging.WARNING,
            f"final checkpoint's state downloaded in {time.monotonic() - started:.1f} s: now {distance:.1e} apart",
        )

    def stop_background_threads(self, timeout: float = BACKGROUND_JOIN_TIMEOUT) -> None:
        """Stop the watcher, contact, heartbeat and rate threads and wait (up to ``timeout`` in all) for
        their DHT calls in flight to return. A DHT call still in flight when this process exits makes
        hivemind's DHT process fail to unpickle the call's reply pipe and print a raw traceback."""
        threads = [self.watcher, self.contact, self.heartbeat, self.rate_watcher]
        for thread in threads:
            thread.stop()
        deadline = time.monotonic() + timeout
        for thread in threads:
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))

    def run(self) -> None:
        self.watcher.start()
        self.contact.start()
        self.heartbeat.start()
        if self.view.enabled:
            self.rate_watcher.start()
        try:
            self.wait_for_peers()
            if not self.stop.is_set():
                self.sync_with_swarm()
            with self.view:  # stopped on any exit, so the terminal is restored
                self.train()
            self.wait_for_end()
            self.match_final_checkpoint()
        finally:
            self.stop_background_threads()
        status = self.watcher.status
        changed = self.run_changed()
        if changed:
            raise IncompatibleSwarmError(
                f"the coordinator now runs a different run ({changed}); this peer stopped without averaging "
                "with it. Start it again to join the new run."
            )
        if self.stop.is_set():
            logger.info(f"stopped at step {self.opt.local_epoch} ({self.stop.reason}); contributed {self.samples_contributed} samples")
        elif status is not None and status.finished:
            logger.info(
                f"the run is finished at step {status.final_step}; final checkpoint at step "
                f"{status.checkpoint_step}, this peer ends with params={parameter_fingerprint(self.task.model):.10g}. "
                f"Contributed {self.samples_contributed} samples. Thank you!"
            )
