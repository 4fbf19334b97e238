"""What a reducing peer accepts from its groupmates in an all-reduce, and how it combines their parts.

In hivemind's all-reduce every member reduces a slice ("part") of the vector for the whole group: it
receives that part from every sender, combines them and sends the result back. hivemind's reducer
(``TensorPartReducer``, 1.1.12) adds up whatever arrives, weighted by whatever weight its sender
claims. :class:`CheckedPartReducer` instead

- bans from the round a sender whose part is not finite, has the wrong shape, or comes with a weight
  that is not a finite number ≥ 0 (hivemind then finishes the part without that sender, as when one
  fails);
- counts a claimed weight above ``max_weight`` as ``max_weight``, and a sender's claim above its own
  bound (``sender_bounds``: what its published progress allows, :mod:`dedloc.swarm.weight_bound`) as
  that bound;
- combines the parts by their weighted mean (``"mean"``, hivemind's arithmetic) or by
  :func:`centered_clip` (``"centered_clip"``), which bounds what any one sender can move the result
  (and how much weight it carries).

:class:`CheckedAllReduceRunner` checks what each member's reducer sends back, too: an average of the
wrong shape, with NaN or infinite values, or over :data:`ANSWER_BOUND` × the size of what the member
sent for that part, is dropped — the member keeps its own values for that reducer's span, as when a
reducer vanishes, and the reducer is banned from the round as a sender. (A false average of plausible
size is not caught: see docs/security.md.)

It also keeps a refused member from holding up a round: a sender banned
in one all-reduce of a round is left out of the round's later ones (PowerSGD's two phases), and a
reducer finishes its share without its own refused part. Averagers take it in with
:class:`CheckedReduction`, which also answers a part for a round that already ended at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
from typing import Any, AsyncIterator, Collection, Literal, Optional, Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import hagenbach_bishoff
from hivemind.averaging.partition import AllreduceException, TensorPartReducer
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import achain, anext, as_aiter, azip

from dedloc.faults import REDUCER_LIES, active_attack, fault_active, lie

logger = logging.getLogger(__name__)

Aggregation = Literal["mean", "centered_clip"]
CLIP_ITERATIONS = 20
DEFAULT_UPLOAD_MBPS = 20.0
"""The upload bandwidth (Mbit/s) counted for a reducing member that announced none: a home uplink."""
ENDED_ROUNDS_KEPT = 16
"""How many of its latest rounds an averager remembers as ended (a part for one is answered at once)."""
SHARE_SPREAD = 4.0
"""No reducer's bandwidth counts for more than this many times the group's median, nor less than its
inverse: a volunteer claiming a fast uplink reduces a bounded share, never the whole vector."""


def usable_mbps(bandwidth: Any) -> bool:
    """Whether an announced bandwidth is a figure (a finite positive number, Mbit/s)."""
    return isinstance(bandwidth, (int, float)) and not isinstance(bandwidth, bool) and math.isfinite(bandwidth) \
        and bandwidth > 0


def reduction_shares(total_size: int, announced: Sequence[tuple[Optional[float], AveragingMode]]) -> tuple[int, ...]:
    """How many of the vector's ``total_size`` numbers each member of a group reduces, from what each
    announced (bandwidth, mode): client-mode members and members announcing 0 reduce none; the others
    in proportion to their announced upload bandwidth (Mbit/s; none announced: :data:`DEFAULT_UPLOAD_MBPS`),
    each clamped to within :data:`SHARE_SPREAD` of the reducers' median. With no reducer at all, every
    member not in client mode reduces an equal share. Exact integer arithmetic on the gathered data, so
    every member computes the same split (hivemind's load balancing — a linear program — hands the
    whole vector to a member only twice as fast as the others)."""
    reducing = [mode != AveragingMode.CLIENT and (bandwidth is None or usable_mbps(bandwidth))
                for bandwidth, mode in announced]
    if not any(reducing):
        reducing = [mode != AveragingMode.CLIENT for _, mode in announced]
        scores = [1.0 if r else 0.0 for r in reducing]
    else:
        scores = [(DEFAULT_UPLOAD_MBPS if bandwidth is None else float(bandwidth)) if r else 0.0
                  for (bandwidth, _), r in zip(announced, reducing)]
        median = sorted(s for s in scores if s > 0)[(sum(1 for s in scores if s > 0) - 1) // 2]
        scores = [min(max(s, median / SHARE_SPREAD), median * SHARE_SPREAD) if s > 0 else 0.0 for s in scores]
    if not any(scores):
        raise AllreduceException("no member of the group can reduce (all are in client mode)")
    return tuple(hagenbach_bishoff(total_size, scores))


def round_step(labels: Sequence[Any]) -> Optional[int]:
    """The step a round is for, from the step each sending member gathered: the one held by more
    senders than any other; of two steps one apart that tie for most (a group of two, one member a
    step behind), the later. None when no sender gathered a step (plain averagers gather none) or
    when steps further apart tie. Anything but an int counts as no step."""
    counts: dict[int, int] = {}
    for label in labels:
        if isinstance(label, int) and not isinstance(label, bool):
            counts[label] = counts.get(label, 0) + 1
    if not counts:
        return None
    most = max(counts.values())
    tied = [label for label, count in counts.items() if count == most]
    return None if max(tied) - min(tied) > 1 else max(tied)


def gathered_steps(announced: Sequence[Sequence[Any]], serializer) -> tuple[Optional[int], list]:
    """The step of a round (:func:`round_step` over its senders; auxiliary members send nothing and do
    not count) and the step each member gathered, from the members' loaded gathered data
    ``[bandwidth, mode, user data]``."""
    labels = []
    for entry in announced:
        try:
            labels.append(serializer.loads(entry[2]))
        except Exception:  # malformed data from a member: it gathered no step
            labels.append(None)
    senders = [label for label, entry in zip(labels, announced) if entry[1] != AveragingMode.AUX.value]
    return round_step(senders), labels


def robust_weights(weights: torch.Tensor) -> torch.Tensor:
    """``weights`` with each capped at their (lower) median — with two senders, at the smaller one —
    so that no sender outweighs the others by claiming a bigger batch than theirs."""
    weights = weights.float()
    positive = weights[weights > 0]
    return weights.clamp(max=float(positive.median())) if len(positive) else weights


def centered_clip(parts: torch.Tensor, weights: torch.Tensor, tau: Optional[float] = None,
                  iterations: int = CLIP_ITERATIONS) -> torch.Tensor:
    """CenteredClip (Karimireddy et al., 2021; the aggregation of BTARD, Gorbunov et al., 2022) of
    ``parts`` (one row per sender) with ``weights`` (capped by :func:`robust_weights`): start at the
    coordinate-wise median, then move the center by the weighted mean of each part's difference from
    it, every difference clipped to L2 norm ``tau``. Parts within ``tau`` of the result count fully, as
    in the mean; one further away pulls by ``tau`` at most, whatever its size.

    ``tau=None``: the median distance of the parts from the coordinate-wise median — a scale that
    senders in the minority cannot move.

    Two parts have no majority (their median is their mean, and either could be the bad one): each is
    clipped to the smaller one's L2 norm and the two are averaged, so neither moves the result further
    than the other can. A sign flip × 1000 then cancels the honest part instead of reversing it.
    """
    parts, weights = parts.float(), weights.float()
    if bool((weights > 0).any()):  # a sender with nothing accumulated moves neither median nor norms
        parts, weights = parts[weights > 0], weights[weights > 0]
    else:
        weights = torch.ones_like(weights)
    weights = robust_weights(weights)
    weights = weights / weights.sum()
    if parts.shape[0] == 1:
        return parts[0].clone()
    if parts.shape[0] == 2:
        norms = parts.norm(dim=1)
        scale = (norms.min() / norms.clamp_min(1e-12)).clamp(max=1.0)
        return (parts * (weights * scale)[:, None]).sum(dim=0)
    center = parts.quantile(0.5, dim=0)
    if tau is None:
        tau = float((parts - center).norm(dim=1).quantile(0.5))
    if tau <= 0:
        return center
    for _ in range(iterations):
        differences = parts - center
        scale = (tau / differences.norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
        move = (differences * (weights * scale)[:, None]).sum(dim=0)
        center += move
        if float(move.norm()) <= 1e-7 * (float(center.norm()) + 1e-12):
            break
    return center


class _PartCollector:
    """Stands in for hivemind's running sum of a part: keeps each sender's part and weight, and
    combines them when hivemind divides the sum by the total weight."""

    def __init__(self, shape: torch.Size, aggregation: Aggregation, tau: Optional[float]):
        self.shape, self.aggregation, self.tau = shape, aggregation, tau
        self.parts: list[torch.Tensor] = []
        self.weights: list[float] = []

    def add_(self, part: torch.Tensor, alpha: float = 1.0) -> "_PartCollector":
        self.parts.append(part.detach().float().clone())
        self.weights.append(float(alpha))
        return self

    def div_(self, denominator: float) -> torch.Tensor:
        if not self.parts:  # every sender failed: nobody is left to receive the result
            return torch.zeros(self.shape)
        parts, weights = torch.stack(self.parts), torch.tensor(self.weights)
        if not float(weights.sum()) > 0:  # every sender weighs 0 (each tags along): their plain mean, never 0/0
            return parts.mean(dim=0)
        if self.aggregation == "centered_clip" and len(self.parts) > 1:
            return centered_clip(parts, weights, self.tau)
        return (parts * (weights / denominator)[:, None]).sum(dim=0)


class CheckedPartReducer(TensorPartReducer):
    """hivemind's reducer with checked inputs, a bounded weight and a chosen aggregation (module doc).

    It keeps hivemind's bookkeeping of which sender delivered which part, and replaces only its
    running sum (:class:`_PartCollector`). A rejected part raises :class:`RejectedPart` before hivemind
    counts it: the runner then bans the sender, and the part is finished without it. ``lie`` (the attack
    benchmark's scripted bad reducer only, :data:`~dedloc.faults.REDUCER_LIES`): what it sends back to the
    senders other than ``own_sender`` instead of the average.
    """

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, sender_names: Sequence[str],
                 aggregation: Aggregation = "mean", max_weight: Optional[float] = None, tau: Optional[float] = None,
                 sender_bounds: Optional[Sequence[Optional[float]]] = None, lie: Optional[str] = None,
                 own_sender: Optional[int] = None):
        self.aggregation, self.max_weight, self.tau = aggregation, max_weight, tau
        self.lie, self.own_sender = lie, own_sender
        self.sender_names = list(sender_names)
        self.sender_bounds = list(sender_bounds) if sender_bounds is not None else [None] * num_senders
        self._bounded: set[int] = set()  # senders whose claim was bounded in this round (logged once each)
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        super().reset_accumulators()
        if not self.finished.is_set():
            self.accumulator = _PartCollector(self.part_shapes[self.current_part_index], self.aggregation, self.tau)

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        if 0 <= part_index < self.num_parts and 0 <= sender_index < self.num_senders:
            problem = self._problem(part_index, tensor_part, weight)
            if problem is not None:
                logger.warning(f"rejected a part from {self.sender_names[sender_index]}: {problem}; it is left out of this round")
                raise RejectedPart(f"sender {self.sender_names[sender_index]}: {problem}")
        if self.max_weight is not None and weight > self.max_weight:
            weight = self.max_weight
        bound = self.sender_bounds[sender_index] if 0 <= sender_index < len(self.sender_bounds) else None
        if bound is not None and weight > bound:
            if sender_index not in self._bounded:
                self._bounded.add(sender_index)
                logger.info(f"counted {self.sender_names[sender_index]}'s claimed weight {weight:g} as {bound:.1f}: "
                            "more samples than its published progress accounts for")
            weight = bound
        average = await super().accumulate_part(sender_index, part_index, tensor_part, weight=weight)
        if self.lie is not None and sender_index != self.own_sender:
            return lie(self.lie, average)
        return average

    def _problem(self, part_index: int, tensor_part: torch.Tensor, weight: float) -> Optional[str]:
        expected = self.part_shapes[part_index]
        if tuple(tensor_part.shape) != tuple(expected):
            return f"part {part_index} has shape {tuple(tensor_part.shape)}, expected {tuple(expected)}"
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            return f"weight {weight!r} is not a finite number ≥ 0"
        if not bool(torch.isfinite(tensor_part).all()):
            return f"part {part_index} holds NaN or infinite values"
        return None


class RejectedPart(AllreduceException):
    """A sender's part failed :class:`CheckedPartReducer`'s checks."""


class RejectedAverage(AllreduceException):
    """What a member's reducer sent back cannot be the average of its span (see :func:`average_problem`)."""


ANSWER_BOUND = 100.0
"""A reducer's answer for a part whose norm is more than this many times what the receiving member
sent for it is refused (see :func:`average_problem`)."""


def average_problem(delta: torch.Tensor, sent: torch.Tensor, rms: float) -> Optional[str]:
    """Why ``delta`` (a reducer's answer for the part ``sent``: the average's difference from ``sent``)
    cannot be the average of that part, or None. Besides its shape and finiteness: the average may be
    at most :data:`ANSWER_BOUND` × as large as the part sent, counted no smaller than a part of its size
    at ``rms`` (the root mean square of the whole vector the receiver sent: a slice of its own that is
    all but zero, e.g. embedding rows its batch never used, can still take the others' values). The
    members of a round hold the same model and data stream, so an honest average is of the size of
    each member's own values; a lie 1000 × the true average is not. A receiver that sent nothing but
    zeros (``rms`` 0) cannot judge sizes and checks the rest only."""
    if tuple(delta.shape) != tuple(sent.shape):
        return f"shape {tuple(delta.shape)} for a part of shape {tuple(sent.shape)}"
    if not bool(torch.isfinite(delta).all()):
        return "NaN or infinite values"
    if rms > 0:
        scale = max(float(sent.float().norm()), rms * math.sqrt(sent.numel()))
        size = float((sent.float() + delta.float()).norm())
        if size > ANSWER_BOUND * scale:
            return f"an average {size / scale:.0f} × the size of this peer's own part (at most {ANSWER_BOUND:.0f} ×)"
    return None


class CheckedAllReduceRunner(AllReduceRunner):
    """hivemind's all-reduce runner with a :class:`CheckedPartReducer` in place of its own."""

    def __init__(self, *args, aggregation: Aggregation = "mean", max_weight: Optional[float] = None,
                 clip_tau: Optional[float] = None, weight_bounds: Optional[dict] = None,
                 left_out: Collection[PeerID] = (), lie: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        # hivemind's own reducer, replaced before it saw any part, would warn "Reducer: received 0.0% of
        # input tensors" when garbage-collected (its __del__ finalizes it): marked finished, it stays quiet
        self.tensor_part_reducer.finished.set()
        self.tensor_part_reducer = CheckedPartReducer(
            self.tensor_part_reducer.part_shapes,
            self.tensor_part_reducer.num_senders,
            sender_names=[str(peer_id) for peer_id in self.sender_peer_ids],
            aggregation=aggregation,
            max_weight=max_weight,
            tau=clip_tau,
            sender_bounds=[(weight_bounds or {}).get(peer_id) for peer_id in self.sender_peer_ids],
            lie=lie,
            own_sender=self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None,
        )
        self._check_averages_received()
        # members this peer banned in an earlier all-reduce of the same round (PowerSGD's P phase before
        # its Q phase): neither waited for as senders nor sent parts to as reducers — a member whose P
        # factors were refused fails its own round and never joins the Q phase, and the others would wait
        # for it until the sender and reducer timeouts
        self.left_out = frozenset(p for p in left_out if p != self.peer_id and p in self.ordered_peer_ids)
        for peer_id in self.left_out & set(self.sender_peer_ids):
            self.banned_senders.add(peer_id)
            self.active_senders.add(peer_id)  # nobody waits for its first part either
            self.tensor_part_reducer.on_sender_failed(self.sender_peer_ids.index(peer_id))
        if len(self.active_senders) == len(self.sender_peer_ids):
            self.all_senders_started.set()

    def _check_averages_received(self) -> None:
        """Every answer another member's reducer sends back passes :func:`average_problem` before it is
        used, or raises :class:`RejectedAverage`: hivemind's runner then keeps this peer's own values
        for the rest of that reducer's span (``register_failed_reducer``), as for a reducer that fails.
        hivemind 1.1.12 has no hook there: the container's ``register_processed_part`` is wrapped."""
        container = self.tensor_part_container
        register = container.register_processed_part
        own = self.ordered_peer_ids.index(self.peer_id)
        numel = sum(tensor.numel() for tensor in container.local_tensors)
        squares = sum(float(tensor.detach().float().square().sum()) for tensor in container.local_tensors)
        rms = math.sqrt(squares / numel) if numel and math.isfinite(squares) else 0.0

        def register_checked(peer_index: int, part_index: int, part: torch.Tensor) -> None:
            if peer_index != own and part_index < len(container._input_parts_by_peer[peer_index]):
                problem = average_problem(part, container._input_parts_by_peer[peer_index][part_index][0], rms)
                if problem is not None:
                    raise RejectedAverage(f"part {part_index} came back with {problem}")
            register(peer_index, part_index, part)

        container.register_processed_part = register_checked

    async def _communicate_with_peer(self, peer_id: PeerID):
        if peer_id in self.left_out:  # its share of the vector stays as this peer's own
            self.tensor_part_container.register_failed_reducer(self.ordered_peer_ids.index(peer_id))
            return
        try:
            await super()._communicate_with_peer(peer_id)
        except RejectedAverage as e:
            # hivemind's runner already kept this peer's own values for the rest of the reducer's span
            logger.warning(f"dropped the average that {peer_id} sent back: {e}; its span of the vector keeps this "
                           "peer's own values, and it is left out of this round")
            if peer_id in self.sender_peer_ids:
                await self._ban_sender(peer_id)
        except RejectedPart:
            if peer_id != self.peer_id:
                raise
            # this peer's own part failed its own reducer's checks. hivemind's runner would leave the task
            # failed and the reducer waiting for that part: the others' averages of this span, and this
            # peer's round, would hang until their timeouts. The reducer finishes without it instead, and
            # this peer keeps its own values for the span
            await self._ban_sender(self.peer_id)
            self.tensor_part_container.register_failed_reducer(self.ordered_peer_ids.index(peer_id))


class CheckedReduction:
    """Averager mixin: every all-reduce round of this averager runs with a :class:`CheckedAllReduceRunner`
    (``aggregation``, ``max_weight`` and ``clip_tau`` as there; given to the constructor, since the
    averager's rounds run in the process it forks when it starts). ``weight_bound`` (a
    :class:`~dedloc.swarm.weight_bound.PublishedProgress`) bounds each sender's claimed weight by its
    published progress as well."""

    def __init__(self, *args, aggregation: Aggregation = "mean", max_weight: Optional[float] = None,
                 clip_tau: Optional[float] = None, weight_bound=None, **kwargs):
        self.aggregation, self.max_weight, self.clip_tau = aggregation, max_weight, clip_tau
        self.weight_bound = weight_bound
        self._banned_in_round: tuple[bytes, frozenset] = (b"", frozenset())  # (round's group id, senders banned)
        self._ended_rounds: collections.deque = collections.deque(maxlen=ENDED_ROUNDS_KEPT)  # their group ids
        # the attack benchmark's baseline: hivemind's own reducer (any part, any weight, the mean)
        self.unchecked = fault_active("defences-off")
        attack = active_attack()  # the attack benchmark's bad reducer: it lies in every round it reduces
        self.lie = attack if attack in REDUCER_LIES else None
        super().__init__(*args, **kwargs)

    async def _step(self, **kwargs):
        if self.weight_bound is not None and not self.unchecked:
            self.weight_bound.start(self.dht)  # the senders' records are read while the group forms
        return await super()._step(**kwargs)

    @contextlib.contextmanager
    def _register_allreduce_group(self, group_info: GroupInfo):
        try:
            with super()._register_allreduce_group(group_info):
                yield
        finally:
            self._ended_rounds.append(group_info.group_id)

    # hivemind registers rpc_* methods by their annotations
    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        request = await anext(stream)
        if any(request.group_id.startswith(ended) for ended in self._ended_rounds):
            # hivemind 1.1.12 makes a part for a group it does not run wait until the next group of this
            # averager registers — after a round that failed here, while the caller's reducer timeout runs
            # out. A round that already ended here is answered at once: the caller finishes without us
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        async for message in super().rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo,
                                      group_id: Optional[bytes] = None, **kwargs):
        # hivemind 1.1.12's _aggregate_with_group reads every member's mode from the gathered data but does
        # not hand it to the runner (no issue filed upstream), which then derives the modes from the
        # shares: an auxiliary peer with a share counted as a sender, and the others waited for its (zero,
        # weight-0) gradients and sent it the average. The modes the members announced are passed here
        announced = [self.serializer.loads(entry) for entry in group_info.gathered]  # [bandwidth, mode, user data]
        kwargs.setdefault("modes", tuple(AveragingMode(entry[1]) for entry in announced))
        # dedloc's split of the vector replaces hivemind's (computed from the same gathered data)
        kwargs["peer_fractions"] = reduction_shares(self.total_size, [(b, AveragingMode(m)) for b, m, _ in announced])
        if self.unchecked and self.lie is None:
            return await super()._run_allreduce_inplace_(tensors, group_info, group_id, **kwargs)
        step, labels = gathered_steps(announced, self.serializer)
        apart = sorted(str(label) for label in labels if step is not None and label != step)
        if apart:
            # hivemind forms groups by time, not by step: a peer whose step ended late can land in the
            # others' next round. Gradient rounds meet by step (dedloc.swarm.step_groups); a state round
            # holding members a step apart is logged and averaged as ever (docs/reliability.md)
            logger.info(f"a round of {self.prefix} for step {step} holds {len(apart)} of {group_info.group_size} "
                        f"members at another step ({', '.join(apart)})")
        if self.weight_bound is not None:
            kwargs["weight_bounds"] = await self.weight_bound.bounds(self.dht, group_info.peer_ids)
        # hivemind 1.1.12's DecentralizedAverager._run_allreduce_inplace_, building dedloc's runner: the
        # runner's reducer has no other hook
        group_id = group_info.group_id if group_id is None else group_id
        round_id, banned = self._banned_in_round
        left_out = banned if round_id == group_info.group_id else frozenset()
        if left_out:
            logger.info(f"left {len(left_out)} member(s) of {self.prefix}'s round out of its next all-reduce: their "
                        f"parts were refused in the one before ({', '.join(sorted(map(str, left_out)))})")
        runner = CheckedAllReduceRunner(
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            aggregation=self.aggregation,
            max_weight=self.max_weight,
            clip_tau=self.clip_tau,
            left_out=left_out,
            lie=self.lie,
            **kwargs,
        )
        assert group_id in self._running_groups, f"group {group_id} was not registered"
        self._running_groups[group_id].set_result(runner)
        try:
            if runner.modes[group_info.peer_ids.index(self.peer_id)] != AveragingMode.AUX:
                async for tensor, update in azip(as_aiter(*tensors), runner):
                    tensor.add_(update, alpha=self._averaging_alpha)
                    self.last_updated = get_dht_time()
                    self._state_updated.set()
            else:
                async for _ in runner:
                    raise ValueError("auxiliary peers receive no averaged tensors")
        finally:
            self._banned_in_round = (group_info.group_id, frozenset(left_out | runner.banned_senders))

