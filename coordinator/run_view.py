"""The run as the coordinator sees it, as plain JSON: what the dashboard, its API, ``/metrics`` and the
summary record for ``dedloc status`` all show.

Live figures (the current step, throughput, what the swarm has accumulated toward the next step, the
newest checkpoint) are pushed in by the coordinator's loop with :meth:`RunView.update`; history, peers
and the leaderboard come from the :class:`HistoryStore`. Readers (HTTP threads) never touch the DHT.
Nothing here names an address or a path outside the state directory.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from dedloc import PROTOCOL_VERSION
from dedloc.logs import short_id
from dedloc.swarm.records import MAX_SUMMARY_CONTRIBUTORS, ONLINE_WINDOW, Contributor, RunManifest, RunSummary

from .history_store import HistoryStore



@dataclass(frozen=True)
class LiveFigures:
    step: int = 0
    loss: Optional[float] = None
    """Training loss peers reported for the newest logged step."""
    samples_per_second: float = 0.0
    peers: int = 0
    samples: int = 0
    samples_accumulated: int = 0
    """Samples the swarm has accumulated toward the next global step."""
    eta_next_step: Optional[float] = None
    """Seconds until the swarm has the next global batch, at its current speed."""
    checkpoint_step: Optional[int] = None
    checkpoint_time: Optional[float] = None
    checkpoint_path: Optional[Path] = None
    finished: bool = False
    updated_at: float = field(default_factory=time.time)


class RunView:
    def __init__(self, manifest: RunManifest, store: HistoryStore, state_root: Path, stop_at: int):
        self.manifest, self.store, self.state_root, self.stop_at = manifest, store, state_root, stop_at
        self.started_at = time.time()
        self._live = LiveFigures()
        self._lock = threading.Lock()

    def update(self, **figures) -> None:
        with self._lock:
            self._live = replace(self._live, updated_at=time.time(), **figures)

    @property
    def live(self) -> LiveFigures:
        with self._lock:
            return self._live

    def _checkpoint(self, live: LiveFigures) -> Optional[dict]:
        if live.checkpoint_step is None:
            return None
        path = live.checkpoint_path
        if path is not None:
            try:
                path = path.relative_to(self.state_root)
            except ValueError:
                path = Path(path.name)  # only ever a path inside the state directory is shown
        return dict(step=live.checkpoint_step, time=live.checkpoint_time, path=None if path is None else str(path))

    def heldout_latest(self) -> Optional[dict]:
        points = self.store.heldout()
        return points[-1] if points else None

    def status(self) -> dict:
        """``/api/status``: where the run stands now."""
        live, config = self.live, self.manifest.config
        heldout = self.heldout_latest()
        return dict(
            protocol=PROTOCOL_VERSION,
            run_id=config.run_id,
            config_sha256=self.manifest.config_sha256,
            tokenizer_sha256=self.manifest.tokenizer_sha256,
            step=live.step,
            stop_at=self.stop_at,
            finished=live.finished,
            loss=live.loss,
            heldout_loss=heldout["loss"] if heldout else None,
            heldout_step=heldout["step"] if heldout else None,
            samples_per_second=live.samples_per_second,
            peers=live.peers,
            samples=live.samples,
            samples_accumulated=live.samples_accumulated,
            target_batch_size=config.training.target_batch_size,
            eta_next_step=live.eta_next_step,
            checkpoint=self._checkpoint(live),
            started_at=self.started_at,
            updated_at=live.updated_at,
        )

    def history(self, since: int = 0) -> dict:
        """``/api/history``: one row per global step after ``since``, and the held-out evaluations."""
        return dict(steps=self.store.steps(since=since), heldout=self.store.heldout())

    def peers(self) -> list[dict]:
        """``/api/peers``: peers seen in the last minute (no addresses: ids, names, figures)."""
        rows = self.store.peers(alive_within=ONLINE_WINDOW, now=time.time())
        return [dict(row, short_id=short_id(row["peer_id"])) for row in rows]

    def leaderboard(self, limit: int = 50) -> list[dict]:
        """``/api/leaderboard``: samples contributed per volunteer over the whole run."""
        return self.store.leaderboard(limit=limit)

    def summary(self) -> RunSummary:
        """The record ``dedloc status`` reads from the DHT."""
        status = self.status()
        top = [
            Contributor(name=row["name"][:64], samples=int(row["samples"]))
            for row in self.leaderboard(limit=MAX_SUMMARY_CONTRIBUTORS)
        ]
        return RunSummary(
            run_id=status["run_id"],
            step=status["step"],
            stop_at=status["stop_at"],
            loss=status["loss"],
            heldout_loss=status["heldout_loss"],
            heldout_step=status["heldout_step"],
            samples_per_second=float(status["samples_per_second"]),
            peers=status["peers"],
            samples=status["samples"],
            checkpoint_step=status["checkpoint"]["step"] if status["checkpoint"] else None,
            finished=status["finished"],
            updated_at=time.time(),
            top=top,
        )
