"""How much weight a peer may claim in a gradient round: what its own published progress allows.

A gradient round's weight is the number of samples a member accumulated toward the step, and every
member states it itself. The run's target batch bounds every claim (``max_weight`` of
:class:`~dedloc.swarm.reduction.CheckedPartReducer`). :class:`PublishedProgress` bounds each sender
tighter, by what that sender tells the swarm in its progress record — hivemind's
``LocalTrainingProgress`` under ``RUN_progress``, signed by the sender's identity key (the subkey names
the key, so the record is the sender's own) and republished at every micro-batch: the samples it had
accumulated then, plus what its published throughput adds over the time since, with slack for the
records' delay (:func:`claim_bound`). A sender claiming more counts for that bound, and the reducer logs
it. A sender without a current record (a newcomer, a paused peer, a record that expired) is bounded by
the target batch alone.

This catches a peer whose claim disagrees with its own records (the attack benchmark's "1000 ×
weight"); a peer that publishes inflated records as well also inflates the swarm's sample count, so it
hastens every step, and is bounded by the target batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from dedloc.swarm.records import owner_of_subkey

logger = logging.getLogger(__name__)

SLACK = 2.0
"""A claim may exceed what the sender's records account for by this factor, plus :data:`SLACK_MICRO_BATCHES`
micro-batches. Measured (4 peers, the reference workload on 2 cores, 121 gradient claims): honest
claims reached 2.07 × what the records accounted for (a record a few seconds late, the throughput
estimate below the burst rate); at the slack chosen the largest was 0.82 of its bound."""
SLACK_MICRO_BATCHES = 2
REFRESH_SECONDS = 1.0
"""How often the records are read again, in the background, while rounds are run."""
FIRST_READ_WAIT = 1.0
"""A round waits at most this long for the very first read (later rounds use what was read last)."""


@dataclass(frozen=True)
class Progress:
    """What a peer's newest progress record says: samples accumulated toward the step under way, its
    throughput estimate (samples/s) and when it published the record (DHT time)."""

    samples: int
    samples_per_second: float
    time: float
    epoch: int = -1  # the step its publisher is at (-1: the record did not say)


def claim_bound(progress: Progress, now: float, micro_batch: int) -> float:
    """The largest weight ``progress``'s publisher may claim at ``now``: ``SLACK`` × (samples then +
    throughput × time since) + ``SLACK_MICRO_BATCHES`` micro-batches."""
    accounted = progress.samples + progress.samples_per_second * max(0.0, now - progress.time)
    return SLACK * accounted + SLACK_MICRO_BATCHES * micro_batch


def parse_progress(value: Any) -> dict[PeerID, Progress]:
    """The progress records found under a run's progress key (hivemind's ``{subkey: ValueWithExpiration}``),
    by the peer id of the key that signed each. Anything malformed is left out."""
    found: dict[PeerID, Progress] = {}
    if not isinstance(value, dict):
        return found
    for subkey, entry in value.items():
        owner = owner_of_subkey(subkey)
        record = getattr(entry, "value", None)
        if owner is None or not isinstance(record, dict):
            continue
        samples, rate, time = record.get("samples_accumulated"), record.get("samples_per_second"), record.get("time")
        if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 0):
            continue
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (rate, time)):
            continue
        if rate < 0:
            continue
        epoch = record.get("epoch")
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else -1
        found[owner] = Progress(samples, float(rate), float(time), epoch)
    return found


def read_progress(dht: hivemind.DHT, progress_key: str, timeout: Optional[float] = None) -> dict[PeerID, Progress]:
    """The progress records under ``progress_key``, read from the DHT now (blocking, at most ``timeout``
    seconds; a read that times out or fails raises), as :func:`parse_progress` leaves them."""
    found = dht.get(progress_key, latest=True, return_future=True).result(timeout)
    return parse_progress(found.value if found is not None else None)


def step_the_others_reached(records: dict[PeerID, Progress], me: PeerID, now: float,
                            window: float) -> Optional[int]:
    """The step that more than half of the other peers' current records (published within ``window``
    seconds of ``now``) show, when they show one at all: the smallest step that a majority of them
    reached (None: no records of others, or no majority past any step). One record alone — a wrong
    clock, a volunteer lying about its step — cannot move the answer past the others'."""
    steps = sorted((progress.epoch for owner, progress in records.items()
                    if owner != me and progress.epoch >= 0 and now - progress.time <= window), reverse=True)
    if not steps:
        return None
    return steps[len(steps) // 2]  # the step at least ⌊n/2⌋ + 1 of the n records reached


class PublishedProgress:
    """Per-sender weight bounds from the senders' progress records under ``progress_key``, read in the
    background of the averager's own process (a round never waits on the DHT, but for
    :data:`FIRST_READ_WAIT` at the first one). Created before the averager forks; :meth:`bounds` is
    called from its event loop."""

    def __init__(self, progress_key: str, micro_batch: int):
        self.progress_key, self.micro_batch = progress_key, micro_batch
        self._progress: dict[PeerID, Progress] = {}
        self._reader: Optional[asyncio.Task] = None
        self._first_read: Optional[asyncio.Event] = None

    def start(self, dht: hivemind.DHT) -> None:
        """Begin reading the records (once; in the running event loop)."""
        if self._reader is None:
            self._first_read = asyncio.Event()
            self._reader = asyncio.create_task(self._read_forever(dht))

    async def bounds(self, dht: hivemind.DHT, peer_ids: Sequence[PeerID]) -> dict[PeerID, float]:
        """The bound of each of ``peer_ids`` that has a current record."""
        self.start(dht)
        if not self._first_read.is_set():
            try:
                await asyncio.wait_for(self._first_read.wait(), FIRST_READ_WAIT)
            except asyncio.TimeoutError:
                pass
        now = get_dht_time()
        return {peer_id: claim_bound(self._progress[peer_id], now, self.micro_batch)
                for peer_id in peer_ids if peer_id in self._progress}

    async def _read_forever(self, dht: hivemind.DHT) -> None:
        while True:
            try:
                found = await dht.get(self.progress_key, latest=True, return_future=True)
                self._progress = parse_progress(found.value if found is not None else None)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed read keeps the last one; the target batch still bounds
                logger.debug(f"reading the progress records failed: {e!r}")
            self._first_read.set()
            await asyncio.sleep(REFRESH_SECONDS)
