"""Noticing that this peer has lost the swarm (its link went down), and getting back in touch.

hivemind does neither: a peer whose link drops keeps "averaging" alone (each failed round falls back
to its own gradients), its DHT routing table empties, and when the link comes back it stays on its
own — training a model nobody else has, at a step count that can even run ahead of the swarm's. A
:class:`SwarmContact` pings the coordinator and the other training peers it knows of every
``period`` seconds; the pings that are answered put those peers back into the DHT's routing table.
"""

from __future__ import annotations

import logging
import random
import threading
import time

import hivemind
from hivemind.p2p import PeerID

from dedloc.swarm.node import ping_peers
from dedloc.swarm.records import ONLINE_WINDOW, fetch_metrics

logger = logging.getLogger(__name__)

MAX_PINGS = 8


class SwarmContact(threading.Thread):
    """Watches whether this peer can reach the rest of the swarm.

    Contract: :attr:`lost` is set once neither the coordinator nor any other training peer this peer
    had seen online answered for ``lost_after`` seconds; it is cleared, and :attr:`regained` set, when
    one answers again. A peer that had no other training peer (alone in the run) is never "lost"
    because the coordinator alone is gone: it is the swarm. Peers in client mode are not pinged (they
    take no incoming connections). A ping round never takes longer than ``period``.
    """

    def __init__(self, dht: hivemind.DHT, prefix: str, peer_id: str, coordinator_id: PeerID,
                 period: float = 3.0, lost_after: float = 10.0):
        super().__init__(name="swarm-contact", daemon=True)
        self.dht, self.prefix, self.peer_id = dht, prefix, peer_id
        self.coordinator = coordinator_id.to_base58()
        self.period, self.lost_after = period, lost_after
        self.others: dict[str, float] = {}  # reachable training peers → when their newest record was written
        self.last_contact = time.monotonic()
        self.lost = threading.Event()
        self.regained = threading.Event()
        self._stopping = threading.Event()

    def _refresh_others(self) -> None:
        try:
            records, _ = fetch_metrics(self.dht, self.prefix, timeout=self.period)
        except Exception as e:
            logger.debug(f"cannot read the swarm's metrics: {e!r}")
            return
        for record in records.values():
            if record.peer_id != self.peer_id and not record.client_mode:
                self.others[record.peer_id] = max(record.time, self.others.get(record.peer_id, 0.0))
        now = time.time()
        for peer_id, seen in list(self.others.items()):
            if now - seen > ONLINE_WINDOW + self.lost_after:
                del self.others[peer_id]

    def check(self) -> None:
        """One round: refresh the peers known online, ping some, update :attr:`lost`."""
        self._refresh_others()
        others = list(self.others)
        targets = [self.coordinator, *random.sample(others, min(len(others), MAX_PINGS - 1))]
        answered = ping_peers(self.dht, targets, timeout=self.period)
        now = time.monotonic()
        if answered:
            self.last_contact = now
            if self.lost.is_set():
                logger.info(f"back in touch with the swarm ({len(answered)} of {len(targets)} pinged peers answered)")
                self.lost.clear()
                self.regained.set()
        elif others and not self.lost.is_set() and now - self.last_contact >= self.lost_after:
            logger.warning(
                f"lost touch with the swarm: neither the coordinator nor any of {len(others)} other peers answered for "
                f"{now - self.last_contact:.0f} s; pausing training until they do"
            )
            self.lost.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.check()
            except Exception as e:  # the contact check must never take training down
                logger.debug(f"contact check failed: {e!r}")
            self._stopping.wait(max(0.0, self.period - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stopping.set()
