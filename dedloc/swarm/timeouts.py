"""Averaging timeouts that follow the uplinks: a run's configured timeouts are floors, raised where the
volume of a round cannot cross the announced or measured upload bandwidths in time.

Two timeouts decide whether a round on a slow link completes:

- the **sender timeout**, how long a reducer waits for a groupmate's next chunk before it leaves that
  groupmate out of the round. A sender streams its chunks (hivemind's parts, ``part_size_bytes`` after
  compression) to every other member at once, so one chunk takes
  ``part_size_bytes × (group size − 1) / uplink``: 512 KiB to three groupmates at 2 Mbit/s is 6.3 s,
  past the default 5 s. Each round derives it from the slowest uplink its members announced
  (:func:`round_sender_timeout`);
- the **reducer timeout**, how long a member waits for a reducer's next answer before it keeps its own
  numbers for the rest of that reducer's share. A reducer's first answer leaves through the same
  uplink as the parts it sends to everyone, and queues behind those already buffered — on a slow link
  up to the whole vector — so each round allows the time the vector takes over the slowest uplink,
  and at least twice the sender timeout (:func:`round_reducer_timeout`);
- the **averaging timeout**, after which a round is abandoned. A member's round moves at most twice
  the vector through its uplink (the all-reduce's 2(n−1)/n·M, below 2M), so a peer derives a floor
  from its own measured upload and the size of what it averages (:func:`averaging_timeout_floor`).

Both keep :data:`SAFETY` × the estimate, and grow to at most :data:`MAX_STRETCH` × the configured value. Announced figures are a volunteer's claim: the slowest one
counts for no less than the group's median / :data:`dedloc.swarm.reduction.SHARE_SPREAD` (the bound
the shares use too), so one member announcing a crawl cannot stretch the others' timeouts at will.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from hivemind.compression import CompressionBase, CompressionInfo
from hivemind.utils.tensor_descr import TensorDescriptor

from dedloc.swarm.reduction import SHARE_SPREAD, usable_mbps

MAX_STRETCH = 10.0
"""No timeout grows past this many times its configured value: a member announcing a crawl cannot hold
its groupmates for ever, and an organiser whose volunteers' uplinks need more raises the configured
timeouts."""
SAFETY = 3.0
"""Timeouts keep this many times the transfer time the uplinks allow (the all-reduce bench's rounds took
1.4–1.8 × the bandwidth bound on shaped links, docs/performance.md)."""


def transfer_seconds(nbytes: float, mbps: float) -> float:
    """Seconds ``nbytes`` take through a link of ``mbps`` Mbit/s."""
    return nbytes * 8 / (mbps * 1e6)


def slowest_uplink(announced: Sequence[Any]) -> Optional[float]:
    """The slowest of the uplinks a group's members announced (Mbit/s), counted no lower than the
    median of the announced figures / ``SHARE_SPREAD``; None when nobody announced one (0: a member
    that reduces nothing; None: a member that does not know its uplink)."""
    figures = sorted(float(b) for b in announced if usable_mbps(b))
    if not figures:
        return None
    median = figures[(len(figures) - 1) // 2]
    return max(figures[0], median / SHARE_SPREAD)


def round_sender_timeout(configured: float, part_size_bytes: int, group_size: int,
                         slowest_mbps: Optional[float]) -> float:
    """The sender timeout for one round: ``configured``, or more where a chunk of ``part_size_bytes``,
    sent to ``group_size − 1`` groupmates at once over the slowest uplink, needs longer."""
    if slowest_mbps is None or group_size < 2:
        return configured
    chunk = transfer_seconds(part_size_bytes * (group_size - 1), slowest_mbps)
    return min(max(configured, SAFETY * chunk), MAX_STRETCH * configured)


def round_reducer_timeout(configured: float, sender_timeout: float, round_bytes: float,
                          slowest_mbps: Optional[float]) -> float:
    """The reducer timeout for one round: ``configured``, or more — at least twice the round's
    ``sender_timeout``, and where the slowest uplink needs longer for ``round_bytes`` (the vector on the
    wire; a reducer's first answer can queue behind that much), that time, up to :data:`MAX_STRETCH` ×
    ``configured``."""
    seconds = max(configured, 2 * sender_timeout)
    if slowest_mbps is not None and round_bytes > 0:
        seconds = max(seconds, min(SAFETY * transfer_seconds(round_bytes, slowest_mbps), MAX_STRETCH * configured))
    return seconds


def wire_bytes(total_size: int, compression: CompressionBase) -> float:
    """Bytes ``total_size`` float32 numbers take on the wire under ``compression`` (its own estimate)."""
    info = CompressionInfo(key=0, descriptor=TensorDescriptor(size=(total_size,), dtype=torch.float32))
    return 4.0 * total_size * compression.estimate_compression_ratio(info)


def averaging_timeout_floor(configured: float, round_bytes: float, upload_mbps: Optional[float]) -> float:
    """The averaging timeout for a peer that averages ``round_bytes`` (on the wire) over an uplink of
    ``upload_mbps``: ``configured``, or more where 2 × ``round_bytes`` need longer (at most
    :data:`MAX_STRETCH` × ``configured``)."""
    if not usable_mbps(upload_mbps):
        return configured
    return min(max(configured, SAFETY * transfer_seconds(2 * round_bytes, upload_mbps)), MAX_STRETCH * configured)
