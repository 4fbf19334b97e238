"""Building hivemind's optimizer and state averager from the run config.

Peers train with :func:`build_optimizer` (a ``hivemind.Optimizer``: local accumulation toward the
swarm's target batch, then gradient all-reduce and a synchronous optimizer step; in DiLoCo mode, local
optimizer steps and a parameter all-reduce with an outer step per target batch). The coordinator
uses :func:`build_state_reader` to download the shared state (parameters, optimizer statistics,
global step) for checkpoints, without ever training or taking part in averaging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import signal
import threading
from functools import partial
from typing import AsyncIterator, Callable, Optional, Sequence

import hivemind
import torch
from hivemind.compression import (
    CompressionBase,
    Float16Compression,
    NoCompression,
    ScaledFloat16Compression,
    Uniform8BitQuantization,
)
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import AllReducePhases, PowerSGDGradientAverager
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

from dedloc.config import Compression, RunConfig
from dedloc.faults import active_attack, fault_pause, fault_point, poison
from dedloc.swarm.records import ONLINE_WINDOW
from dedloc.swarm.access import AdmittedPeersOnly
from dedloc.swarm.diloco import OuterStep
from dedloc.swarm.reduction import CheckedReduction
from dedloc.swarm.step_groups import StepKeyedGroups
from dedloc.swarm.timeouts import (averaging_timeout_floor, round_reducer_timeout, round_sender_timeout, slowest_uplink,
                                   wire_bytes)
from dedloc.swarm.weight_bound import PublishedProgress, read_progress, step_the_others_reached
from dedloc.task.optimization import optimizer_factory, scheduler_factory

logger = logging.getLogger(__name__)

# the averaging weight of a peer that takes part in a round only to receive its result (its own values
# then move the average by a millionth of their difference from the others')
NEGLIGIBLE_WEIGHT = 1e-6
# the optimizer's statistics averaged with the parameters: AdamW's moments, and its step count, which
# sets the moments' bias correction (a newcomer that took the swarm's steps without an optimizer step
# of its own counts fewer)
OPTIMIZER_STATISTICS = ("exp_avg", "exp_avg_sq", "step")
NON_NEGATIVE_STATISTICS = ("exp_avg_sq", "step")


def _local_step_only(averaging_round: bool, kwargs: dict) -> bool:
    """Whether a ``TrainingStateAverager.step`` call asks for a local optimizer step and nothing else."""
    others = ("increment_epoch", "zero_grad", "delay_optimizer_step", "wait_for_trigger")
    return bool(kwargs.get("optimizer_step")) and not averaging_round and not any(kwargs.get(key) for key in others) \
        and kwargs.get("wait_for_delayed_updates") is not True


@contextlib.contextmanager
def _keeping_sigint_handler():
    """hivemind 1.1.12's ``DecentralizedAverager.run_in_background`` sets SIGINT to SIG_IGN in the
    *calling* process (to keep it from the averager child) and never restores it, which would make a
    daemon deaf to Ctrl-C. The averager child keeps ignoring SIGINT; the caller gets its handler back."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)


def make_compression(name: Compression) -> CompressionBase:
    return {
        "none": NoCompression,
        "fp16": Float16Compression,
        "scaled_fp16": ScaledFloat16Compression,
        "uint8": Uniform8BitQuantization,
    }[name]()


def state_averager_prefix(prefix: str) -> str:
    """DHT prefix under which peers share state (must match what ``hivemind.Optimizer`` uses)."""
    return f"{prefix}_state_averager"


class ReducerShares:
    """Mixin for hivemind averagers: a peer can take part in a round without reducing any share of it.

    In hivemind's all-reduce every member of a group averages ("reduces") a slice of the vector for
    all the others, sized by the bandwidth each announces. A member that is slow to deliver its slice
    — a newcomer still busy with its download, a peer with nothing to contribute — holds up the whole
    group, and when it fails, the others keep their own values for its slice. Such a member announces
    bandwidth 0 (:meth:`announce`) and only sends and receives.

    A member that reduces announces its upload bandwidth when its volunteer set one (``--upload-mbps``,
    given to the averager as hivemind's ``bandwidth``), else nothing; the shares then follow the
    bandwidths, within bounds (:func:`dedloc.swarm.reduction.reduction_shares`).

    hivemind's load balancing refuses a group in which *every* member announced 0 (an assertion in
    ``load_balance_peers``, 1.1.12): there, every member reduces an equal share instead. All members
    see the same gathered announcements and so agree on the shares.
    """

    def announce(self, reduces: bool) -> None:
        """Announce, in the rounds this peer schedules from now on, whether it reduces a share."""
        if not hasattr(self, "_upload_mbps"):
            self._upload_mbps = self.bandwidth  # as configured; None: "as the group's others" (hivemind)
        self.bandwidth = self._upload_mbps if reduces else 0.0

    def set_upload_mbps(self, mbps: float) -> None:
        """The upload bandwidth this peer announces from its next round on (measured after start:
        :mod:`dedloc.swarm.bandwidth`)."""
        self._upload_mbps = float(mbps)

    # hivemind reads the all-reduce timeout in its background process (``_step``, 1.1.12): a shared value,
    # so that a floor raised after the averager started (:meth:`allow_round_bytes`) reaches it
    @property
    def _allreduce_timeout(self) -> Optional[float]:
        seconds = self._shared_allreduce_timeout.value
        return None if seconds < 0 else seconds

    @_allreduce_timeout.setter
    def _allreduce_timeout(self, seconds: Optional[float]) -> None:
        if not hasattr(self, "_shared_allreduce_timeout"):  # hivemind's __init__: the configured value
            self._shared_allreduce_timeout = mp.Value("d", -1.0)
            self._configured_allreduce_timeout = seconds
        self._shared_allreduce_timeout.value = -1.0 if seconds is None else float(seconds)

    def allow_round_bytes(self, round_bytes: float, upload_mbps: Optional[float]) -> Optional[float]:
        """Allow this averager's rounds from now on the time ``round_bytes`` (on the wire) need over an
        uplink of ``upload_mbps`` (:func:`dedloc.swarm.timeouts.averaging_timeout_floor`: the configured
        timeout is the floor), from either of its processes; the new timeout if that raised it."""
        configured = self._configured_allreduce_timeout
        if configured is None:
            return None
        seconds = averaging_timeout_floor(configured, round_bytes, upload_mbps)
        with self._shared_allreduce_timeout.get_lock():
            if seconds <= self._allreduce_timeout:
                return None
            self._allreduce_timeout = seconds
            return seconds

    async def _aggregate_with_group(self, group_info: GroupInfo, *args, **kwargs):
        bandwidths = [self.serializer.loads(entry)[0] for entry in group_info.gathered]
        # a groupmate's chunks cross its uplink to every other member at once: on slow uplinks they
        # take longer than the configured sender timeout, and the round would go on without them
        slowest = slowest_uplink(bandwidths)
        round_bytes = wire_bytes(self.total_size, kwargs["compression"]) if "compression" in kwargs else 0.0
        if "sender_timeout" in kwargs and kwargs["sender_timeout"] is not None:
            sender_timeout = round_sender_timeout(kwargs["sender_timeout"],
                                                  kwargs.get("part_size_bytes", DEFAULT_PART_SIZE_BYTES),
                                                  group_info.group_size, slowest)
            kwargs["sender_timeout"] = max(kwargs["sender_timeout"], sender_timeout)
            # a reducer's answers queue behind the parts it sends through the same uplink
            if kwargs.get("reducer_timeout") is not None:
                kwargs["reducer_timeout"] = round_reducer_timeout(kwargs["reducer_timeout"], kwargs["sender_timeout"],
                                                                  round_bytes, slowest)
        # ... and a round as a whole may take longer than the configured timeout allows: this averager's
        # later rounds get the time the slowest uplink it averaged with needs (this one's deadline is set)
        if slowest is not None and "compression" in kwargs:
            raised = self.allow_round_bytes(round_bytes, slowest)
            if raised is not None:
                logger.info(f"averaging rounds may take up to {raised:.0f} s from now on: a groupmate's uplink "
                            f"is {slowest:.1f} Mbit/s")
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(f"{type(self).__name__}: a round with {group_info.group_size} peers, bandwidths announced "
                         f"{bandwidths}, sender timeout {kwargs.get('sender_timeout')} s")
        return await super()._aggregate_with_group(_with_reducers(group_info, self.serializer), *args, **kwargs)


def _with_reducers(group_info: GroupInfo, serializer) -> GroupInfo:
    """``group_info`` itself, or — when no member would reduce a share — a copy in which every member
    that is not in client mode announces the group's default bandwidth (hivemind's load balancing,
    which runs before dedloc's split replaces its result, asserts otherwise)."""
    announced = [serializer.loads(entry) for entry in group_info.gathered]  # [bandwidth, mode, user data]
    if any(bandwidth != 0 and AveragingMode(mode) != AveragingMode.CLIENT for bandwidth, mode, _ in announced):
        return group_info
    gathered = tuple(
        serializer.dumps([None if AveragingMode(mode) != AveragingMode.CLIENT else bandwidth, mode, user_data])
        for bandwidth, mode, user_data in announced
    )
    return dataclasses.replace(group_info, gathered=gathered)


class ReportingGradientAverager(AdmittedPeersOnly, StepKeyedGroups, CheckedReduction, ReducerShares, GradientAverager):
    """hivemind's gradient averager, logging (at info) when this peer begins a gradient-averaging round:
    an operator sees where a stall happens, and fault tests use the line as their cue.

    A newcomer — a peer whose gradient rounds have not yet completed one since it joined or downloaded
    the swarm's state (:meth:`rejoined`) — and a peer with no samples accumulated when its round is
    scheduled reduce no share of the round (see :class:`ReducerShares`): the others do not wait on it.
    An auxiliary peer (hivemind's ``AveragingMode.AUX``: it sends no gradients) always reduces its
    share; :attr:`numbers_reduced` counts what it reduced in the rounds it completed, and each such
    round is logged.
    """

    def __init__(self, *args, **kwargs):
        self.rounds_completed = mp.Value("i", 0)  # shared with the averager's background process
        self.numbers_reduced = mp.Value("q", 0)  # an auxiliary peer's share of the rounds it completed
        self.swarm_step = mp.Value("i", -1)  # an auxiliary peer's: the step the swarm is at, as last seen
        self._completed_at_join = 0
        self.attack = active_attack()  # a scripted bad volunteer (attack benchmark) only
        super().__init__(*args, **kwargs)

    def load_accumulators_into_averager_(self):
        super().load_accumulators_into_averager_()
        if self.attack is not None:
            with self.get_tensors() as gradients:
                poison(self.attack, gradients)

    def rejoined(self) -> None:
        """This peer just took the swarm's state: it is a newcomer again until one of its rounds completes."""
        self._completed_at_join = self.rounds_completed.value

    @property
    def newcomer(self) -> bool:
        return self.rounds_completed.value == self._completed_at_join

    @property
    def auxiliary(self) -> bool:
        return self.mode == AveragingMode.AUX

    step_of_round: Optional[Callable[[], int]] = None  # the global step whose gradients this peer averages

    def schedule_step(self, *args, **kwargs):
        self.announce(reduces=self.auxiliary or (not self.newcomer and self.local_samples_accumulated > 0))
        if self.step_of_round is not None:
            # each member tells the group which step its gradients are for (as hivemind's state rounds
            # do with the step): a round holding members at different steps is logged (CheckedReduction)
            kwargs.setdefault("gather", self.step_of_round())
        return super().schedule_step(*args, **kwargs)

    def group_step(self, control) -> Optional[int]:
        # a helper has no step of its own: it looks for the group of the step the swarm is at, which it
        # follows while it looks (the helper's own step count, moved along between its rounds, trails it
        # by a round on a fast swarm)
        if self.auxiliary and self.swarm_step.value >= 0:
            return self.swarm_step.value
        return super().group_step(control)

    round_samples = 0  # samples this peer brought to its latest gradient round

    def step(self, *args, weight: Optional[float] = None, **kwargs):
        self.rounds_begun = getattr(self, "rounds_begun", 0) + 1
        self.round_samples = self.local_samples_accumulated
        logger.info(f"averaging gradients (round {self.rounds_begun}, {self.local_samples_accumulated} local samples)")
        if self.attack == "attack-weight":
            weight = 1000.0 * max(1, self.local_samples_accumulated)
        if weight is None and self.local_samples_accumulated == 0 and not self.auxiliary:
            # a peer with nothing accumulated takes part with a negligible weight, never zero: a group
            # whose weights all were zero would average to 0/0 (hivemind's reducer divides by their sum)
            weight = NEGLIGIBLE_WEIGHT
        return super().step(*args, weight=weight, **kwargs)

    def _last_allreduce_id(self, group_info: GroupInfo) -> bytes:
        """The id under which the round's last all-reduce registers its runner."""
        return group_info.group_id

    async def _aggregate_with_group(self, group_info: GroupInfo, *args, **kwargs):
        registered = self._running_groups[self._last_allreduce_id(group_info)]  # resolves to that AllReduceRunner
        gathered = await super()._aggregate_with_group(group_info, *args, **kwargs)
        with self.rounds_completed.get_lock():
            self.rounds_completed.value += 1
        runner = registered.result() if registered.done() and not registered.cancelled() else None
        if self.auxiliary and runner is not None:
            reducer = runner.tensor_part_reducer
            share = sum(shape.numel() for shape in reducer.part_shapes)
            with self.numbers_reduced.get_lock():
                self.numbers_reduced.value += share
            logger.info(f"helped average gradients: reduced {share} of {runner.tensor_part_container.total_size} "
                        f"numbers for {len(runner.sender_peer_ids)} peers")
        return gathered


POWERSGD_SEED = 0x5EED


class PowerSGDReportingAverager(ReportingGradientAverager, PowerSGDGradientAverager):
    """:class:`ReportingGradientAverager` sending PowerSGD's low-rank factors instead of whole gradients
    (``averaging.powersgd_rank``; Vogels et al., 2019, as hivemind's ``PowerSGDGradientAverager``).

    Each round runs two all-reduces, through the same checks as a plain round (admission, finite parts
    of the right shape, bounded weights, the configured aggregation): first P = M·Q for every matrix
    (M: the gradient plus the error-feedback buffer), then, after orthogonalising P, Q = Mᵀ·P together
    with the tensors PowerSGD leaves whole (vectors, and matrices it would not shrink by half). Every
    peer's gradient becomes P·Qᵀ; what that misses stays in the peer's error-feedback buffer for the
    next round. A matrix of m × n numbers travels as (m + n) × rank.

    hivemind draws each peer's starting Q at random; here every peer draws the same (a fixed seed), so
    that the first round's P factors are sums over the same Q. A peer that joins later starts from that
    Q while the others' has moved on (hivemind keeps Q per peer and does not hand it to newcomers with
    the state): its first P factors are slightly off, and error feedback carries the difference over.
    A peer that takes the swarm's state (:meth:`rejoined`) drops its error-feedback buffers: what they
    hold are parts of gradients computed on parameters it no longer has.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        generator = torch.Generator().manual_seed(POWERSGD_SEED)
        for q in self._qs:  # shared memory: the averager's process sees the same values
            q.copy_(torch.rand(q.shape, generator=generator))

    def rejoined(self) -> None:
        super().rejoined()
        for buffer in self._ms:  # shared memory, as the Qs
            buffer.zero_()

    def _last_allreduce_id(self, group_info: GroupInfo) -> bytes:
        return group_info.group_id + AllReducePhases.PHASE_Q.name.encode()


class ClosesStepExecutor:
    """Shuts the state averager's step executor down with the averager.

    hivemind 1.1.12's ``TrainingStateAverager.shutdown`` leaves its ``step_executor`` running (no
    upstream issue found); its idle worker is a non-daemon thread, so a process that waits for its
    threads before exiting (``dedloc.cli``) waited out its whole grace period — 10 s at every exit.
    """

    def shutdown(self) -> None:
        try:
            super().shutdown()
        finally:
            self.step_executor.shutdown(wait=False)


class ServesSnapshot:
    """State averager mixin: a state download is served from a copy of the state taken at one instant.

    hivemind 1.1.12's ``TrainingStateAverager.get_current_state`` hands the live tensors (parameters,
    optimizer statistics) to the averager's process, which compresses and streams them while the
    peer goes on training: a download taking longer than a step got some tensors from before an update
    and some from after it — a state no peer ever held. Here the tensors are copied while no optimizer
    step (``lock_optimizer``), state download or averaging result (``lock_averaged_tensors``) writes
    them, and the copy is what gets streamed. The cost: one transient copy of the state per download
    being served. The step number sent with it is read just before the copy, as hivemind reads it.
    """

    def get_current_state(self):
        with self.lock_optimizer:
            metadata, tensors, infos = super().get_current_state()
            with torch.no_grad(), self.lock_averaged_tensors:
                return metadata, [tensor.clone() for tensor in tensors], infos


class CheckedStateAverager(AdmittedPeersOnly, ServesSnapshot, CheckedReduction, ReducerShares, ClosesStepExecutor, TrainingStateAverager):
    """hivemind's state averager, noticing rounds that were left half-done.

    When a peer vanishes in the middle of an all-reduce, hivemind (1.1.12,
    ``TensorPartContainer.register_failed_reducer``) keeps each remaining peer's own values for the
    slice of the tensors that peer was averaging, and still reports the round as a success: the peers
    then hold different parameters. Every such round is logged and counted in :attr:`partial_rounds`,
    shared with the averager's background process, so a caller can average once more. Rounds that
    found a group at all are counted in :attr:`rounds_done` (hivemind logs a failed state-averaging
    round at debug level only).

    The wire protocol is hivemind's own (handler names of ``TrainingStateAverager``), so the
    coordinator's plain state reader and this averager serve each other's state downloads.
    """

    def __init__(self, *args, **kwargs):
        # created before hivemind forks the averager's process, so both sides share them
        self.partial_rounds = mp.Value("i", 0)
        self.rounds_done = mp.Value("i", 0)  # rounds this peer averaged with a group, whole or half-done
        # set by the peer around its final round; the fault point ``final-state-round`` fires only then
        self.final_round = mp.Event()
        self.downloaded_epoch: Optional[int] = None
        self._receiving_since: Optional[int] = None  # rounds_done when receiving began
        super().__init__(*args, **kwargs)

    def load_state_from_peers(self, **kwargs) -> None:
        """hivemind's download; afterwards :attr:`downloaded_epoch` is the step of the state received, or
        None when no peer served a state newer than the one held."""
        held = self.local_epoch
        super().load_state_from_peers(**kwargs)
        self.downloaded_epoch = self.local_epoch if self.local_epoch > held else None

    def receive_next_average(self) -> None:
        """Weigh this peer's state as good as nothing in the state-averaging rounds from now until one
        of them finds a group, and reduce no share of them: the peer then takes the others' average
        without pulling it toward its own, older state, and without the others waiting on it."""
        self._receiving_since = self.rounds_done.value

    @property
    def receiving(self) -> bool:
        """Whether this peer still waits for a state average to bring it level with the others."""
        if self._receiving_since is not None and self.rounds_done.value > self._receiving_since:
            self._receiving_since = None
        return self._receiving_since is not None

    def stop_receiving(self) -> None:
        self._receiving_since = None

    def schedule_step(self, *args, **kwargs):
        self.announce(reduces=not self.receiving)
        return super().schedule_step(*args, **kwargs)

    # DiLoCo mode, overlapped (hivemind's delta rule on): the outer step that ends the round in flight
    outer_round: Optional[OuterStep] = None
    outer_round_step: Optional[int] = None  # the global step that round is for (for the log)
    steps_beside_round = 0  # local steps taken while that round was in flight

    _on_outer_round_applied: Optional[Callable[[], None]] = None

    def begin_outer_round(self, outer: OuterStep, step: int, on_applied: Optional[Callable[[], None]] = None) -> None:
        """The next background round's result is the swarm's average for ``step``: when it is applied,
        ``outer`` steps on it (see :meth:`_apply_averaging_results_`), then ``on_applied`` is called."""
        self.outer_round, self.outer_round_step, self.steps_beside_round = outer, step, 0
        self._on_outer_round_applied = on_applied

    def cancel_outer_round(self) -> None:
        self.outer_round = self.outer_round_step = self._on_outer_round_applied = None

    def step(self, *args, averaging_round: bool = False, averaging_control=None, averaging_opts=None, **kwargs):
        if averaging_round and averaging_control is None:
            self.announce(reduces=not self.receiving)
        if averaging_round and self.receiving:
            if averaging_control is not None:
                averaging_control.weight = NEGLIGIBLE_WEIGHT
            else:
                averaging_opts = {**(averaging_opts or {}), "weight": NEGLIGIBLE_WEIGHT}
        if self.delta_rule_averaging and self.pending_updates and not args and _local_step_only(averaging_round, kwargs):
            return self._local_step_beside_round(grad_scaler=kwargs.get("grad_scaler"))
        return super().step(
            *args, averaging_round=averaging_round, averaging_control=averaging_control, averaging_opts=averaging_opts, **kwargs
        )

    def _local_step_beside_round(self, grad_scaler=None) -> None:
        """A local optimizer step while a background round is in flight (DiLoCo mode, overlapped).

        hivemind 1.1.12's delta rule makes every local step wait for the round in flight
        (``TrainingStateAverager.step``: ``should_wait`` counts ``optimizer_step``), which would undo the
        overlap. The step runs here, in the caller's thread, instead: the round averages the snapshot
        it copied when it began (copied under ``lock_optimizer``, see
        :meth:`_load_local_tensors_into_averager_`), and its result is applied as a delta on top of the
        steps taken meanwhile, at the first step after it ended."""
        super().step(apply_delayed_updates=True)  # a round that has ended is applied first
        self.steps_beside_round += self.outer_round is not None
        with self.lock_optimizer:
            if grad_scaler is None:
                self.optimizer.step()
            else:
                with grad_scaler.running_global_step():
                    assert grad_scaler.step(self.optimizer)
            self._update_scheduler()

    @torch.no_grad()
    def _load_local_tensors_into_averager_(self):
        # the round's snapshot, copied in hivemind's background thread: never in the middle of a local
        # step taken beside the round (see _local_step_beside_round)
        with self.lock_optimizer:
            super()._load_local_tensors_into_averager_()

    @torch.no_grad()
    def _apply_averaging_results_(self):
        """hivemind's application of an ended round — unless it was an overlapped DiLoCo round: then the
        anchor takes the outer step on the swarm's average of the snapshot, the parameters move by as
        much as the anchor moved past the snapshot (keeping the local steps taken since), and the
        optimizer statistics move by the average's difference from the snapshot (hivemind's delta rule;
        the second moments kept non-negative)."""
        outer, step, on_applied = self.outer_round, self.outer_round_step, self._on_outer_round_applied
        self.cancel_outer_round()
        snapshot, self._old_tensors = self._old_tensors, None  # used once: a failed round sets none
        if outer is None:
            self._old_tensors = snapshot
            return super()._apply_averaging_results_()
        try:
            if snapshot is None:  # the round failed before it copied the parameters: the outer step on this peer's own
                return self._log_outer_step(step, outer.step())
            self._apply_outer_round(outer, step, snapshot)
        finally:
            if on_applied is not None:
                on_applied()

    @torch.no_grad()
    def _apply_outer_round(self, outer: OuterStep, step: Optional[int], snapshot: Sequence[torch.Tensor]) -> None:
        with self.get_tensors() as averaged_tensors:
            local_tensors = list(self._local_tensors())
            position = {id(tensor): index for index, tensor in enumerate(local_tensors)}
            indices = [position[id(param)] for param in outer.params]
            moved = outer.step_anchor([averaged_tensors[index] for index in indices])
            for index, anchor in zip(indices, outer.anchor):
                local_tensors[index].add_((anchor - snapshot[index]).to(local_tensors[index].dtype))
            stepped = set(indices)
            non_negative = set(self._statistics_indices(NON_NEGATIVE_STATISTICS))
            for index, (local, new, old) in enumerate(zip(local_tensors, averaged_tensors, snapshot)):
                if index in stepped:
                    continue
                local.add_((new - old).to(device=local.device, dtype=local.dtype))
                if index in non_negative:
                    local.clamp_(min=0)
        self._log_outer_step(step, moved, f" ({self.steps_beside_round} local steps taken during the round)")

    @staticmethod
    def _log_outer_step(step: Optional[int], moved: float, note: str = "") -> None:
        logger.info(f"outer step to step {step}: pseudo-gradient norm {moved:.4f}{note}")

    def _statistics_indices(self, keys) -> list:
        """Positions, in hivemind's order of averaged tensors, of the optimizer statistics named ``keys``."""
        indices, index = [], sum(len(group["params"]) for group in self.optimizer.param_groups)
        for key in self.opt_keys_for_averaging:
            for group in self.optimizer.param_groups:
                for _ in group["params"]:
                    if key in keys:
                        indices.append(index)
                    index += 1
        return indices

    @classmethod
    def _get_handle_name(cls, namespace: Optional[str], method_name: str) -> str:
        return TrainingStateAverager._get_handle_name(namespace, method_name)

    async def _aggregate_with_group(self, group_info: GroupInfo, *args, **kwargs):
        registered = self._running_groups[group_info.group_id]  # resolves to the round's AllReduceRunner
        gathered = await super()._aggregate_with_group(group_info, *args, **kwargs)
        with self.rounds_done.get_lock():
            self.rounds_done.value += 1
        # counted before the round's result reaches the caller, who reads the count right after it
        runner = registered.result() if registered.done() and not registered.cancelled() else None
        kept = runner.tensor_part_container.failed_size if runner is not None else 0
        if kept:
            with self.partial_rounds.get_lock():
                self.partial_rounds.value += 1
            logger.warning(
                f"a state-averaging round was left half-done: a peer left in the middle, and this peer "
                f"kept its own values for {kept} of {runner.tensor_part_container.total_size} numbers"
            )
        return gathered

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        if self.final_round.is_set():
            fault_point("final-state-round")  # a peer vanishing while it averages others' parts
        async for message in super().rpc_aggregate_part(stream, context):
            yield message


class _WithdrawableProgress:
    """The DHT as hivemind's progress tracker sees it: while ``withdrawn`` is set, every progress record
    it stores says "not here" (None, hivemind's own marker for a peer that left), so the swarm stops
    counting this peer; while :meth:`freeze` holds, every record says the step and samples frozen
    (see :meth:`SwarmOptimizer._update_global_epoch`); everything else passes through."""

    def __init__(self, dht: hivemind.DHT, withdrawn: threading.Event):
        self._dht, self._withdrawn = dht, withdrawn
        self._frozen: Optional[dict] = None

    def __getattr__(self, name):
        return getattr(self._dht, name)

    def freeze(self, step: int, samples: int) -> None:
        self._frozen = {"epoch": step, "samples_accumulated": samples}

    def thaw(self) -> None:
        self._frozen = None

    def store(self, *args, **kwargs):
        if self._withdrawn.is_set():
            kwargs["value"] = None
        elif self._frozen is not None and isinstance(kwargs.get("value"), dict):
            kwargs["value"] = {**kwargs["value"], **self._frozen}
        return self._dht.store(*args, **kwargs)


class SwarmOptimizer(hivemind.Optimizer):
    """``hivemind.Optimizer`` that never lets a peer step on gradients the swarm did not average with it.

    hivemind lets a peer that missed the swarm's last round — it was cut off, paused, or slow — "catch
    up" by averaging alone and stepping with its own gradients, computed on parameters the swarm has
    already moved past (``_should_load_state_from_peers`` tolerates being one step behind). Such a peer
    holds a model nobody else has. Here it drops those gradients and downloads the swarm's state
    instead. Each step taken with this peer's own gradients alone (averaging failed, or no other peer
    was there) is logged and counted in :attr:`solo_steps`.

    A download the swarm outran (it stepped while the state was on its way) is not repeated: the peer
    takes the swarm's step and receives the next state average without contributing until then, so a
    peer whose download takes longer than a step still catches up. :attr:`samples_accumulated_total`
    counts the samples this peer accumulated toward the swarm's batches.

    In DiLoCo mode (:attr:`outer` set; hivemind's ``use_local_updates``: no gradient averager, the
    optimizer steps on every micro-batch) each global step averages the parameters and then applies
    :class:`OuterStep`; a downloaded state restarts the outer step from the parameters received.
    """

    solo_steps = 0
    steps_apart = 0  # steps taken after a failed gradient round: solo steps, and those with no samples
    samples_accumulated_total = 0
    _downloaded_epoch: Optional[int] = None  # step of the state last downloaded, until this peer contributes
    _sitting_out: Optional[int] = None  # a step taken from the swarm whose averaging rounds this peer sits out
    last_step: Optional[int] = None  # the run's last step, set by the trainer: no round begins there or past it
    outer: Optional[OuterStep] = None  # DiLoCo mode's outer step
    _downloaded_now = False  # a state download happened inside the current step() call
    _delayed_round = False  # a gradient round of delayed updates ends in the background thread now
    state_averager: CheckedStateAverager
    grad_averager: Optional[ReportingGradientAverager]  # None in DiLoCo mode

    def _averagers(self) -> list[ReducerShares]:
        return [a for a in (getattr(self, "grad_averager", None), getattr(self, "state_averager", None))
                if isinstance(a, ReducerShares)]

    @property
    def averaging_timeout(self) -> Optional[float]:
        """The configured averaging timeout, or more where this peer's averagers allow their rounds more
        (its own uplink, or the slowest one it averaged with, needs it: :mod:`dedloc.swarm.timeouts`):
        hivemind waits this long for a round's result, so no round is given up while it may still end."""
        configured = self._configured_averaging_timeout
        if configured is None:
            return None
        return max([configured, *(a._allreduce_timeout or 0.0 for a in self._averagers())])

    @averaging_timeout.setter
    def averaging_timeout(self, seconds: Optional[float]) -> None:
        self._configured_averaging_timeout = seconds

    def set_upload_mbps(self, mbps: float) -> None:
        """Announce ``mbps`` as this peer's upload bandwidth in its gradient and state rounds from now on,
        and give its rounds the time that uplink needs (:func:`dedloc.swarm.timeouts.averaging_timeout_floor`
        over the larger of the two rounds; the configured averaging timeout is the floor)."""
        averagers = self._averagers()
        for averager in averagers:
            averager.set_upload_mbps(mbps)
        largest = max((wire_bytes(a.total_size, a.allreduce_kwargs["compression"]) for a in averagers), default=0.0)
        raised = [seconds for a in averagers if (seconds := a.allow_round_bytes(largest, mbps)) is not None]
        if raised:
            logger.info(f"averaging rounds may take up to {max(raised):.0f} s: the uplink is {mbps:.1f} Mbit/s "
                        f"({largest / 1e6:.1f} MB a round)")

    def step(self, closure=None, batch_size: Optional[int] = None, grad_scaler=None):
        if self.grad_averager is not None or self.auxiliary:
            return super().step(closure, batch_size, grad_scaler)
        # DiLoCo mode: hivemind reports every micro-batch as accumulated, except when the step found this
        # peer out of sync (it downloads the state instead); samples computed on a state that waits for a
        # state average to bring it level are not this peer's contribution either
        self._downloaded_now = False
        counted = not self.state_averager.receiving and self._sitting_out is None
        loss = super().step(closure, batch_size, grad_scaler)
        if counted and not self._downloaded_now:
            self.samples_accumulated_total += batch_size if batch_size is not None else self.batch_size_per_step
            self._downloaded_epoch = None
        return loss

    def _make_state_averager(self, **kwargs) -> CheckedStateAverager:
        # hivemind.Optimizer's own wiring, with the checked averager class
        return CheckedStateAverager(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            max_weight=1.0,  # every peer's state weighs 1 (or as good as nothing while it receives)
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            **kwargs,
        )

    def _should_load_state_from_peers(self) -> bool:
        swarm_step = self.tracker.global_epoch
        if self._downloaded_epoch is not None and self.local_epoch < swarm_step and not self.auxiliary:
            # the swarm stepped while the state was on its way (hivemind pauses the progress records
            # during a download, so this shows only now): downloading again would be outrun again
            self._take_swarm_step(swarm_step, self._downloaded_epoch)
            return False
        if super()._should_load_state_from_peers():
            return True
        behind = self.local_epoch < self.tracker.global_epoch
        if behind and not self.auxiliary:
            logger.info(
                f"the swarm moved to step {self.tracker.global_epoch} without this peer (at step {self.local_epoch}): "
                "dropping its gradients and downloading the swarm's state"
            )
        return behind

    def refresh_swarm_progress(self) -> None:
        """Have hivemind's progress tracker read the swarm's progress records now, not at its next
        scheduled read. The tracker spaces its reads by the time it expects until the next step; before
        anyone has trained that is its longest period (hivemind's ``max_refresh_period``, 10 s), so a
        peer waiting to see the others at the start of a run saw them up to 10 s after they announced
        themselves. (hivemind 1.1.12's fetch loop re-reads its next fetch time when woken.)"""
        tracker = self.tracker
        tracker.global_progress.next_fetch_time = get_dht_time()
        tracker.global_state_updated.set()

    def load_state_from_peers(self, **kwargs) -> None:
        """hivemind's download. A download at home-uplink speed can take longer than a step: when the
        swarm stepped while the state was on its way, this peer takes the swarm's step instead of
        downloading again and again (see :meth:`_take_swarm_step`) — here, when hivemind already took
        it (one step behind), or at the next check, when the progress records show it."""
        self._downloaded_now = True
        super().load_state_from_peers(**kwargs)
        downloaded = self.state_averager.downloaded_epoch
        if downloaded is None:
            return
        self._downloaded_epoch = downloaded
        self._sitting_out = None  # whatever was sat out before, this state is new
        if self.grad_averager is not None:
            self.grad_averager.rejoined()
        if self.outer is not None:
            self.outer.restart()
        if downloaded < self.local_epoch:
            self._take_swarm_step(self.local_epoch, downloaded)
        elif self.tracker.global_progress.num_peers > 1 and self.tracker.ready_to_update_epoch:
            self._sit_out_round(downloaded)

    def _make_progress_tracker(self, target_batch_size: int, **kwargs):
        tracker = super()._make_progress_tracker(target_batch_size, **kwargs)
        self.withdrawn = threading.Event()  # set while this peer is out of the rotation (paused)
        tracker.dht = _WithdrawableProgress(tracker.dht, self.withdrawn)
        return tracker

    def leave_rotation(self) -> None:
        """Stop contributing for a while (a volunteer's pause) without holding anyone up: a gradient
        round already scheduled is joined with zero weight, as hivemind does before a download (the
        others' group does not wait for this peer's part), a scheduled state round is cancelled, the
        samples accumulated toward the step under way are dropped, and this peer's progress record is
        withdrawn — otherwise the others, counting it, would keep looking for it in every round until
        the record expired. :meth:`rejoin_rotation` undoes the last. At its next ``step()`` the
        optimizer downloads the swarm's state if the swarm moved on meanwhile; otherwise it simply
        carries on."""
        if self.scheduled_grads is not None and not self.scheduled_grads.done():
            self._tag_along_with_zero_weight(self.scheduled_grads)
        self.scheduled_grads = None
        if self.scheduled_state is not None and not self.scheduled_state.done():
            self.scheduled_state.cancel()
        self.scheduled_state = None
        if self.grad_averager is not None:
            self.grad_averager.reset_accumulated_grads_()
        self.withdrawn.set()
        self.tracker.report_local_progress(self.local_epoch, samples_accumulated=0)
        # hivemind's tracker republishes a peer only while it is at most one step behind: withdraw the
        # record now, as hivemind's own shutdown does (the subkey is the tracker's signing key)
        self.dht.store(
            self.tracker.training_progress_key,
            subkey=self.tracker._local_public_key,
            value=None,
            expiration_time=get_dht_time() + self.tracker.metadata_expiration,
            return_future=True,
        )

    def _hold_step_until_round_ends(self) -> None:
        """Before a round that runs in the background: the round before it ends first (at most one is in
        flight; in DiLoCo mode its outer step lands), then the swarm sees this peer at its current step,
        with its samples, until :meth:`_publish_step` — a peer that has not yet noticed the step still
        joins the round instead of finding itself a step behind and downloading the state (the rule
        of synchronous rounds, which end before a peer publishes its next step)."""
        self.state_averager.step(wait_for_delayed_updates=True)
        self.tracker.dht.freeze(self.local_epoch, self.tracker.local_progress.samples_accumulated)

    def _publish_step(self) -> None:
        """The round begun at the last step has ended: publish this peer's step and samples again."""
        self.tracker.dht.thaw()
        self.tracker.report_local_progress(self.local_epoch, self.tracker.local_progress.samples_accumulated)

    def rejoin_rotation(self) -> None:
        """Back from a pause: this peer's progress is published again (from its next samples on)."""
        self.withdrawn.clear()
        self.tracker.report_local_progress(self.local_epoch, samples_accumulated=0)

    def _sit_out_round(self, step: int) -> None:
        """The state of ``step`` arrived while the others average for the step after it: their round
        forms its group without this peer, and a round of this peer's at ``step`` would find nobody
        (gradient rounds meet by step, :mod:`dedloc.swarm.step_groups`) and cost it the averaging
        timeout. Instead it sits the round out, accumulating nothing, takes the swarm's step when the
        round is over (see :meth:`_should_load_state_from_peers`) and is made level by the next state
        average."""
        logger.info(
            f"the state of step {step} arrived while the swarm averages for step {step + 1}: sitting out that "
            "round; this peer contributes again once a state average has brought it level"
        )
        self._sitting_out = step
        self.state_averager.receive_next_average()

    def _take_swarm_step(self, swarm_step: int, held_step: int) -> None:
        """Move to ``swarm_step`` with the state of ``held_step``. Until a state-averaging round brings
        this peer level, it accumulates no gradients (they would be older than the swarm's state), its
        state weighs as good as nothing in that round, and it offers its state to newcomers only as a
        state of ``held_step``.

        The first step taken after a download is sat out: the others are already averaging for it (or
        about to), and a peer that starts matchmaking then misses their group and finds nobody else at
        that step. It takes the step after it with them."""
        # not taken right after sitting out the step before: the round sat out is over, the next is
        # this peer's too. A swarm that moved further meanwhile (the tracker's view was stale during a
        # download) is in a round this peer cannot join in time: that one is sat out as well
        first = self._sitting_out is None or swarm_step > self._sitting_out + 1
        if first:
            logger.info(
                f"the swarm stepped during the download (state of step {held_step}, swarm at step {swarm_step}): "
                "taking its step and sitting out the round the others are in; this peer contributes again "
                "once a state average has brought it level"
            )
        else:
            logger.info(f"the swarm moved on to step {swarm_step}: taking part in its rounds from now on")
        self._sitting_out = swarm_step if first else None
        # a round scheduled at the step held is looked for under that step's key: nobody is there now
        for scheduled in (self.scheduled_grads, self.scheduled_state):
            if scheduled is not None and not scheduled.done():
                scheduled.cancel()
        self.scheduled_grads = self.scheduled_state = None
        self.state_averager.local_epoch = swarm_step
        self.state_averager.receive_next_average()
        self.tracker.report_local_progress(local_epoch=swarm_step, samples_accumulated=0)
        self._share_state_as(held_step)

    def _update_global_epoch(self, grad_scaler) -> None:
        if self._sitting_out == self.local_epoch and self.tracker.global_progress.num_peers > 1:
            return  # the others' round for this step: not this peer's (see _take_swarm_step)
        if self.last_step is not None and self.local_epoch >= self.last_step:
            # at the run's end (reached, say, by taking the swarm's step in this very call): no round
            # is due, and one begun now would find nobody and step past the end alone
            return
        fault_pause("pause-before-gradient-round")  # a peer that wakes up after the others stepped on
        if self._left_behind():
            return
        self._sitting_out = None
        held_step = self.local_epoch
        averager = self.state_averager
        # a round in the background: synchronous mode's delayed updates (its end, in
        # _average_gradients_and_load_into_optimizer, shows the new step) or DiLoCo's overlap
        delayed = self.delay_grad_averaging and self.tracker.global_progress.num_peers > 1
        overlapped = self.outer is not None and averager.delta_rule_averaging
        if delayed or overlapped:
            self._hold_step_until_round_ends()
        if overlapped:
            averager.begin_outer_round(self.outer, held_step + 1, on_applied=self._publish_step)
        steps_apart = self.steps_apart
        super()._update_global_epoch(grad_scaler)
        if self.steps_apart > steps_apart and self.local_epoch > held_step and not delayed:
            self._share_state_as(self.local_epoch - 0.5)  # stepped alone: see _load_local_gradients_into_optimizer
        if delayed and not self._began_round:
            self._publish_step()  # no round began, so none will end and show the new step
        if overlapped and averager.pending_updates and self.local_epoch > held_step:
            averager.outer_round_step = self.local_epoch  # the outer step lands when the round ends
            return
        if overlapped:
            averager.cancel_outer_round()  # no round began (this peer is alone)
            self._publish_step()
        if self.outer is not None and self.local_epoch > held_step:
            moved = self.outer.step()
            averager._log_outer_step(self.local_epoch, moved)

    _began_round = False  # whether the step under way began a gradient round (delayed updates)

    PROGRESS_READ_TIMEOUT = 2.0
    """How long the check before a gradient round waits for the progress records (then it goes ahead)."""

    def _left_behind(self) -> bool:
        """Just before this peer looks for the group of its gradient round: whether most of the others
        already stepped past its step (read from the DHT now — hivemind's tracker refreshes its view
        every few seconds, so a peer whose last micro-batch ended just after the others' round formed
        still sees the step as due). Such a round would find nobody at its step and cost this peer the
        matchmaking timeout, then a solo step and a download; instead it drops the gradients (computed
        on parameters the swarm has left) and downloads the swarm's state now. A failed or slow read
        says no: the round goes ahead as ever."""
        if self.auxiliary or self.grad_averager is None or self.tracker.global_progress.num_peers <= 1:
            return False
        try:
            records = read_progress(self.dht, self.tracker.training_progress_key, self.PROGRESS_READ_TIMEOUT)
        except Exception as e:
            logger.debug(f"cannot read the swarm's progress before a gradient round: {e!r}")
            return False
        reached = step_the_others_reached(records, self.dht.peer_id, get_dht_time(), ONLINE_WINDOW)
        if reached is None or reached <= self.local_epoch:
            return False
        logger.info(f"most of the others already stepped to step {reached} (this peer at step {self.local_epoch}): "
                    "its round would find nobody; dropping its gradients and downloading the swarm's state")
        # a round scheduled at this step still looking for its group can find nobody: cancelled. One that
        # has its group (other peers as late) is left to hivemind's download, which joins it with zero weight
        if self.scheduled_grads is not None and not self.scheduled_grads.done() \
                and not self.scheduled_grads.began_allreduce:
            self.scheduled_grads.cancel()
            self.scheduled_grads = None
        self.load_state_from_peers()
        return True

    def _share_state_as(self, priority: float) -> None:
        """Offer this peer's state for download at ``priority`` (hivemind asks donors in its order; it
        sets the step itself at every step) until hivemind's next step sets it again. A client-mode peer
        serves no state."""
        if self.client_mode:
            return
        self.state_averager.state_sharing_priority = priority
        if self.grad_averager is not None:
            self.grad_averager.state_sharing_priority = priority

    def _begin_averaging_gradients(self, grad_scaler) -> bool:
        self._began_round = super()._begin_averaging_gradients(grad_scaler)
        return self._began_round

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control) -> None:
        """hivemind's end of a gradient round. With delayed updates it runs in the state averager's
        background thread while the next step's micro-batches accumulate, so a failed round falls back
        to the gradients the round began with (in the averager's buffers), never to the accumulators,
        and when it is over this peer shows the swarm its new step."""
        self._delayed_round = self.delay_grad_averaging and maybe_step_control is not None
        try:
            super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        finally:
            if self._delayed_round:
                logger.info(
                    f"the gradient round before step {self.local_epoch} ended in the background; "
                    f"{self.grad_averager.local_samples_accumulated} samples of the next step were computed meanwhile"
                )
            self._delayed_round = False
            if self.delay_grad_averaging:
                self._publish_step()

    def _maybe_schedule_gradient_averaging(self) -> None:
        if self._sitting_out is None:  # a scheduled round that this peer would never trigger stalls the others
            super()._maybe_schedule_gradient_averaging()

    def _maybe_schedule_state_averaging(self) -> None:
        if self._sitting_out is None:
            super()._maybe_schedule_state_averaging()

    def _check_and_accumulate_gradients(self, batch_size: int, grad_scaler) -> bool:
        if self.state_averager.receiving or self._sitting_out is not None:
            if self.tracker.global_progress.num_peers > 1:
                # computed on a state older than the swarm's, or for a round this peer sits out (the
                # swarm steps without them; a state average arriving meanwhile does not change that):
                # dropped, only the step is reported
                self.tracker.report_local_progress(self.local_epoch, samples_accumulated=0)
                return True
            self.state_averager.stop_receiving()  # alone: this peer's state is the swarm's
            self._sitting_out = None
        accumulated = super()._check_and_accumulate_gradients(batch_size, grad_scaler)
        if accumulated:
            self._downloaded_epoch = None  # contributing: the download is behind it
            self.samples_accumulated_total += batch_size
        return accumulated

    def _load_local_gradients_into_optimizer(self):
        averager = self.grad_averager
        # a round that was begun and failed: its gradients are this peer's own, already in the averager's
        # buffers, and the accumulators were reset when the round began
        if self.auxiliary:  # no gradients of its own, no optimizer step
            logger.info("a gradient round this auxiliary peer was to help with failed")
            averager.notify_used_averaged_gradients()
            return
        failed_round = (averager._new_averaged_grads and averager.local_times_accumulated == 0) or self._delayed_round
        samples = averager.round_samples if failed_round else averager.local_samples_accumulated
        if self.tracker.global_progress.num_peers > 1:  # alone in the run, stepping alone is the norm
            self.steps_apart += 1
            if samples == 0:
                # nothing of its own to step on (a peer waiting for a state average to make it level, whose
                # round found the others gone to their next step): not counted as a step taken alone
                logger.info(f"this peer's gradient round for step {self.local_epoch} failed; it had no samples in it")
            else:
                self.solo_steps += 1
                logger.info(f"stepping with this peer's own gradients only ({samples} samples): averaging with the others failed")
            # a state stepped alone is no state the swarm holds: it is offered half a step below its
            # step, so a peer that averaged is asked first (once, locally, a straggler's solo step became
            # the final checkpoint and every peer's model). Synchronous: set in _update_global_epoch once
            # the step is counted; delayed updates: hivemind counted it when the step began
            if self._delayed_round:
                self._share_state_as(self.local_epoch - 0.5)
        if failed_round:
            # hivemind 1.1.12 would load the reset accumulators here (no issue filed upstream): a step
            # on zero gradients, i.e. on Adam's momentum alone. The buffers hold the round's gradients
            # (where a round failed half-way, partly averaged already)
            self._load_averaged_gradients_into_optimizer_()
            return
        return super()._load_local_gradients_into_optimizer()


def build_optimizer(
    dht: hivemind.DHT,
    config: RunConfig,
    prefix: str,
    model: torch.nn.Module,
    micro_batch_size: Optional[int],
    verbose: bool = False,
    auxiliary: bool = False,
    upload_mbps: Optional[float] = None,
) -> SwarmOptimizer:
    """A :class:`SwarmOptimizer` (``hivemind.Optimizer``) for ``model`` under the swarm's ``prefix`` (see
    :attr:`RunManifest.swarm_prefix`): every ``step()`` adds ``micro_batch_size`` samples. ``auxiliary``
    (``micro_batch_size`` None): a peer that computes nothing and helps average (hivemind's auxiliary
    mode; see :mod:`dedloc.peer.auxiliary`). ``upload_mbps``: the volunteer's upload bandwidth, announced
    to the groups this peer averages with (see :class:`ReducerShares`).

    Client mode comes from the DHT. It is passed explicitly: hivemind 1.1.12's Optimizer takes the DHT's
    mode only when given a value (``client_mode if client_mode is None else dht.client_mode``), and
    without one keeps ``None``, so its own ``if not self.client_mode`` paths would offer the state of
    a client-mode peer, whose averagers refuse that with a ValueError.
    """
    averaging = config.averaging
    # hivemind warns (and may deadlock in rare cases) when requests may outlive matchmaking
    averager_opts = {
        "request_timeout": min(3.0, averaging.matchmaking_time / 2),
        # in an all-reduce, a peer silent for this long is dropped from the round. hivemind's default,
        # matchmaking_time (2 s), dropped busy peers from rounds on a loaded machine; state downloads
        # wait longer (download_chunk_timeout, below)
        "sender_timeout": averaging.sender_timeout,
        "reducer_timeout": 2 * averaging.sender_timeout,
        "bandwidth": upload_mbps,
    }
    if averaging.target_group_size is not None:
        averager_opts["target_group_size"] = averaging.target_group_size
    if config.mode == "diloco":
        averager_opts.update(sender_timeout=config.diloco.sender_timeout, reducer_timeout=2 * config.diloco.sender_timeout)
        mode_opts = dict(
            # every micro-batch steps the (inner) optimizer; each global step averages the parameters,
            # in the background (hivemind's delta rule) or synchronously, and the outer step follows on
            # the average (see dedloc.swarm.diloco)
            use_local_updates=True,
            delay_state_averaging=config.diloco.overlap,
            average_state_every=1,
        )
    else:
        mode_opts = dict(
            average_state_every=averaging.average_state_every,
            delay_grad_averaging=averaging.delayed_updates,
            delay_optimizer_step=averaging.delayed_updates,
            grad_averager_factory=partial(
                ReportingGradientAverager if averaging.powersgd_rank is None else
                partial(PowerSGDReportingAverager, averager_rank=averaging.powersgd_rank),
                aggregation=averaging.aggregation,
                clip_tau=averaging.centered_clip_tau,
                max_weight=float(config.training.target_batch_size),  # a round's weight is its samples
                # ... and no more than the sender's own progress records account for
                weight_bound=PublishedProgress(f"{prefix}_progress", config.training.micro_batch_size),
                **averager_opts,
            ),
        )
    # an auxiliary peer has no samples of its own, so while the trainers' speed is unknown (the run's first
    # rounds) hivemind's tracker would read the swarm's progress only every 10 s: a helper learnt of rounds
    # that had already run (it sat out the first three steps of a run whose steps took 2 s). It reads it
    # at least every matchmaking period
    helper_polling = {"max_refresh_period": max(0.5, averaging.matchmaking_time)} if auxiliary else {}
    with _keeping_sigint_handler():
        optimizer = SwarmOptimizer(
            dht=dht,
            run_id=prefix,
            client_mode=bool(dht.client_mode),
            auxiliary=auxiliary,
            target_batch_size=config.training.target_batch_size,
            batch_size_per_step=micro_batch_size,
            params=model.parameters(),
            optimizer=optimizer_factory(config.optimizer),
            scheduler=scheduler_factory(config.optimizer, config.training.total_steps),
            matchmaking_time=averaging.matchmaking_time,
            averaging_timeout=averaging.averaging_timeout,
            load_state_timeout=averaging.load_state_timeout,
            # hivemind defaults this to matchmaking_time (2 s): a donor busy on a home uplink then fails
            # state downloads
            next_chunk_timeout=averaging.download_chunk_timeout,
            average_opt_statistics=OPTIMIZER_STATISTICS if averaging.average_optimizer_state else (),
            grad_compression=make_compression(averaging.grad_compression),
            state_averaging_compression=make_compression(averaging.state_compression),
            averager_opts=averager_opts,
            # a frozen peer stops refreshing its progress record: it leaves hivemind's count (and its
            # samples the target batch) once the record expires, as it leaves dedloc's metrics count
            tracker_opts={"metadata_expiration": ONLINE_WINDOW, **helper_polling},
            verbose=verbose,
            **mode_opts,
        )
    if config.mode == "diloco" and not auxiliary:
        optimizer.outer = OuterStep(model.parameters(), config.diloco)
    if optimizer.grad_averager is not None:
        optimizer.grad_averager.step_of_round = lambda: optimizer.local_epoch
    if upload_mbps is not None:
        optimizer.set_upload_mbps(upload_mbps)  # the volunteer's figure: the timeouts follow it too
    return optimizer


class _ReaderStateAverager(AdmittedPeersOnly, ServesSnapshot, ClosesStepExecutor, TrainingStateAverager):
    """The reader's averager: serves state downloads to the run's members only (hivemind's handler names)."""

    @classmethod
    def _get_handle_name(cls, namespace: Optional[str], method_name: str) -> str:
        return TrainingStateAverager._get_handle_name(namespace, method_name)


class StateReader:
    """Holds a copy of the swarm's training state (model + optimizer + global step): downloads it from
    peers, and serves it to peers once it holds a real one (:meth:`share`).

    It never joins an averaging group. Its copy is offered with a priority just below its step, so a
    newcomer downloads from a live peer at the same step or later whenever there is one, and from the
    reader only when no peer is as far along — e.g. after every peer has left and the coordinator
    restarted from a checkpoint.
    """

    def __init__(self, dht: hivemind.DHT, config: RunConfig, prefix: str, model: torch.nn.Module):
        self.model = model
        with _keeping_sigint_handler():
            self.averager = _ReaderStateAverager(
                dht=dht,
                prefix=state_averager_prefix(prefix),
                optimizer=optimizer_factory(config.optimizer),
                params=model.parameters(),
                scheduler=scheduler_factory(config.optimizer, config.training.total_steps),
                initialize_optimizer=True,
                client_mode=False,
                allow_state_sharing=False,
                next_chunk_timeout=config.averaging.download_chunk_timeout,
                start=True,
            )

    def share(self, final: bool = False) -> None:
        """Offer the state held now to peers that download state, with priority its step − ½ — or, for
        the run's final checkpoint (``final``), step + ½: it then outranks every peer's own state."""
        self.averager.allow_state_sharing = True
        self.averager.state_sharing_priority = self.averager.local_epoch + (0.5 if final else -0.5)

    def load(self, model_state: dict, optimizer_state: Optional[dict], step: int) -> None:
        """Hold the given state (from a checkpoint) as the state of global ``step``."""
        with torch.no_grad():
            self.model.load_state_dict(model_state)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        self.averager.local_epoch = step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.averager.optimizer

    @property
    def step(self) -> int:
        """Global step of the state held now."""
        return self.averager.local_epoch

    def download(self, timeout: float) -> Optional[int]:
        """Fetch the newest state from the swarm's most advanced peer into the local model and optimizer.

        Returns the global step of the state now held, or None when no peer served a state at least
        as new as the one held already.
        """
        held = self.averager.local_epoch
        # TrainingStateAverager reports nothing and skips states older than its own epoch: with the
        # epoch set to -1 any served state is taken, and an epoch still at -1 afterwards means none was.
        self.averager.local_epoch = -1
        try:
            self.averager.load_state_from_peers(timeout=timeout)
        finally:
            loaded = self.averager.local_epoch
            if loaded < 0:
                self.averager.local_epoch = held
        return loaded if loaded >= 0 else None

    def shutdown(self) -> None:
        self.averager.shutdown()
