"""Following the swarm's progress from the metrics records peers publish after every global step.

:meth:`SwarmTracker.poll` turns what it reads into one :class:`StepRecord` per finished global step,
in order, each exactly once. A step is finished when some peer has moved past it, or when every live
peer has reported reaching it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Optional

import hivemind
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import get_dht_time

from dedloc.swarm.records import ONLINE_WINDOW, PeerMetrics, fetch_metrics

logger = logging.getLogger(__name__)

"""A peer counts as alive if its newest record is younger than this (peers refresh every 30 s)."""


@dataclass
class StepRecord:
    """One global step as the coordinator saw it (the same keys appear in logs and history)."""

    step: int
    loss: Optional[float]
    samples_per_second: float
    peers: int
    samples: int
    time: float
    reporters: int

    def to_json(self) -> dict:
        return asdict(self)

    def log_line(self) -> str:
        loss = "n/a" if self.loss is None else f"{self.loss:.4f}"
        return (
            f"step={self.step} loss={loss} samples/s={self.samples_per_second:.1f} "
            f"peers={self.peers} samples={self.samples}"
        )


@dataclass
class NextStep:
    """The swarm's progress toward its next global step, from hivemind's progress records."""

    samples_accumulated: int = 0
    eta: Optional[float] = None
    """Seconds until the target batch is reached at the swarm's current speed (None: unknown)."""


def fetch_next_step(dht: hivemind.DHT, prefix: str, target_batch_size: int, timeout: float = 5.0) -> NextStep:
    """Sum what the peers of the newest epoch have accumulated, and estimate when they reach the target."""
    try:
        found = dht.get(f"{prefix}_progress", latest=True, return_future=True).result(timeout)
    except Exception as e:
        logger.debug(f"cannot read the swarm's progress: {e!r}")
        return NextStep()
    if found is None or not isinstance(found.value, dict):
        return NextStep()
    entries = []
    for item in found.value.values():
        try:
            entries.append(LocalTrainingProgress.parse_obj(item.value))
        except Exception:
            continue  # hivemind's schema validator already refuses malformed progress records
    if not entries:
        return NextStep()
    now = get_dht_time()
    epoch = max(entry.epoch for entry in entries)
    current = [entry for entry in entries if entry.epoch == epoch]
    accumulated = sum(entry.samples_accumulated for entry in current)
    estimated = sum(entry.samples_accumulated + max(0.0, now - entry.time) * entry.samples_per_second for entry in current)
    speed = sum(entry.samples_per_second for entry in entries)
    eta = max(0.0, target_batch_size - estimated) / speed if speed > 0 else None
    return NextStep(samples_accumulated=min(accumulated, target_batch_size), eta=eta)


class SwarmTracker:
    def __init__(self, dht: hivemind.DHT, prefix: str, last_step: int, start_step: int = 0):
        """``prefix``: the swarm's DHT prefix; ``last_step``: the run's final global step (a record
        claiming more counts as reaching it); ``start_step``: the last step already recorded (on a restart)."""
        self.dht, self.prefix, self.last_step = dht, prefix, last_step
        self.logged_until = start_step
        self.global_step = start_step
        self.alive: dict[str, PeerMetrics] = {}
        self.peer_samples: dict[str, int] = {}
        self._reports: dict[int, dict[str, PeerMetrics]] = {}
        self._warned: set[str] = set()
        self._beyond_end: set[str] = set()
        self.highest_claim = start_step
        """The highest step any live peer has claimed, including claims beyond ``last_step``."""

    @property
    def total_samples(self) -> int:
        """Samples contributed by all peers seen so far (each peer's own running total, summed)."""
        return sum(self.peer_samples.values())

    def poll(self, final: bool = False) -> list[StepRecord]:
        """New finished steps. ``final``: the run is over — every step some peer reached counts as
        finished, even while a slower peer that is still alive has not reported it."""
        metrics, dropped = fetch_metrics(self.dht, self.prefix)
        for peer in dropped:
            if peer not in self._warned:
                self._warned.add(peer)
                logger.warning(f"dropping malformed metrics published by peer {peer}")
        return self.absorb(metrics, now=time.time(), final=final)

    def absorb(self, metrics: dict[str, PeerMetrics], now: float, final: bool = False) -> list[StepRecord]:
        """:meth:`poll` on metrics already read (``now``: the wall-clock time they were read at).

        A peer claiming a step beyond ``last_step`` counts as standing at ``last_step``: the organiser
        may have moved the end below where the peers already are, and such peers are done.
        """
        fresh = {pid: m for pid, m in metrics.items() if now - m.time < ONLINE_WINDOW}
        self.highest_claim = max([self.highest_claim] + [m.step for m in fresh.values()])
        for pid, m in fresh.items():
            if m.step > self.last_step and pid not in self._beyond_end:
                self._beyond_end.add(pid)
                logger.info(f"peer {pid} is at step {m.step}, past the run's last step {self.last_step}: it counts as done")
        self.alive = {
            pid: (m if m.step <= self.last_step else m.copy(update=dict(step=self.last_step)))
            for pid, m in fresh.items()
        }
        for pid, m in fresh.items():
            self.peer_samples[pid] = max(self.peer_samples.get(pid, 0), m.samples)
            if m.loss is not None and m.mini_steps > 0 and self.logged_until < m.step <= self.last_step:
                self._reports.setdefault(m.step, {})[pid] = m
        self.global_step = max([self.global_step] + [m.step for m in self.alive.values()])

        finished = []
        for step in range(self.logged_until + 1, self.global_step + 1):
            everyone_there = all(m.step >= step for m in self.alive.values())
            if step >= self.global_step and not everyone_there and not final:
                break
            reports = self._reports.pop(step, {})
            total_mini_steps = sum(r.mini_steps for r in reports.values())
            loss = (
                sum(r.loss * r.mini_steps for r in reports.values()) / total_mini_steps if total_mini_steps else None
            )
            finished.append(
                StepRecord(
                    step=step,
                    loss=loss,
                    samples_per_second=sum(m.samples_per_second for m in self.alive.values()),
                    peers=len(self.alive),
                    samples=self.total_samples,
                    time=now,
                    reporters=len(reports),
                )
            )
            self.logged_until = step
        return finished
