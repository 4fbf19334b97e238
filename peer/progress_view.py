"""The volunteer's terminal view: where the swarm's step stands and what this peer adds to it.

On a terminal, :class:`ProgressView` draws a small live panel on stdout — a bar of the samples the
swarm has accumulated toward the target batch, this peer's and the swarm's samples/s, peers online,
time to the next averaging and this peer's total contribution — and log lines are printed above it
(:func:`dedloc.logs.log_through`). Anywhere else it does nothing at all: the trainer's per-step log
lines (``step=… loss=… samples/s=… peers=… contributed=…``) are the output there.

Contract: :meth:`ProgressView.update` only swaps a reference, so the training loop may call it after
every micro-step; the panel is redrawn from the newest snapshot at most :data:`REFRESH_PER_SECOND`
times a second by rich's refresh thread. The caller must call :meth:`ProgressView.stop` (or use the
view as a context manager) so the cursor and the log handler are restored.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from dedloc.logs import log_through

REFRESH_PER_SECOND = 4
BAR_WIDTH = 40


@dataclass(frozen=True)
class PeerProgress:
    """One snapshot of the figures the view shows."""

    global_step: int
    total_steps: int
    samples_accumulated: int
    """Samples the swarm has accumulated toward the current step."""
    target_batch_size: int
    my_samples_per_second: float
    swarm_samples_per_second: Optional[float]
    """Summed over the peers online; None until known."""
    peers: int
    seconds_to_next_step: Optional[float]
    """hivemind's estimate of the time left until the swarm averages; None when unknown."""
    contributed: int
    """Samples this peer has contributed since it started."""
    loss: Optional[float] = None


def format_duration(seconds: float) -> str:
    seconds = math.ceil(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def describe_eta(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "next averaging: unknown"
    if seconds <= 0:
        return "averaging now"
    return f"next averaging in ~{format_duration(seconds)}"


def render(progress: PeerProgress, elapsed: float = 0.0) -> RenderableType:
    """The panel for ``progress``, taken ``elapsed`` seconds ago (the countdown keeps running)."""
    p = progress
    target = max(p.target_batch_size, 1)
    bar_line = Table.grid(padding=(0, 1))
    bar_line.add_row(
        Text(f"step {p.global_step}/{p.total_steps}", style="bold"),
        ProgressBar(total=target, completed=min(p.samples_accumulated, target), width=BAR_WIDTH),
        Text(f"{p.samples_accumulated}/{p.target_batch_size} samples"),
    )
    swarm = "n/a" if p.swarm_samples_per_second is None else f"{p.swarm_samples_per_second:.1f}"
    rates = Text(
        f"samples/s: me {p.my_samples_per_second:.1f} · swarm {swarm}   "
        f"{p.peers} {'peer' if p.peers == 1 else 'peers'} online"
    )
    eta = None if p.seconds_to_next_step is None else p.seconds_to_next_step - elapsed
    loss = "" if p.loss is None else f"   loss {p.loss:.4f}"
    totals = Text(f"{describe_eta(eta)}   contributed {p.contributed:,} samples{loss}")
    return Panel(Group(bar_line, rates, totals), title="dedloc peer", title_align="left", expand=False)


class ProgressView:
    """A live progress panel on a terminal; a no-op elsewhere.

    ``enabled`` defaults to whether the console (stdout, when none is given) is a terminal.
    ``capture_logs`` — print log lines through the console while live — defaults to whether stderr is
    a terminal: only then do they share the screen with the panel; a log redirected to a file stays there.
    """

    def __init__(
        self,
        enabled: Optional[bool] = None,
        console: Optional[Console] = None,
        capture_logs: Optional[bool] = None,
    ):
        if enabled is None:
            enabled = console.is_terminal if console is not None else sys.stdout.isatty()
        self.enabled = enabled
        self.capture_logs = sys.stderr.isatty() if capture_logs is None else capture_logs
        self.console = (console or Console()) if enabled else None
        self._snapshot: Optional[PeerProgress] = None
        self._taken_at = time.monotonic()
        self._live: Optional[Live] = None
        self._restore_logs: Callable[[], None] = lambda: None

    def start(self) -> None:
        if not self.enabled or self._live is not None:
            return
        self._live = Live(
            console=self.console,
            get_renderable=self._renderable,
            refresh_per_second=REFRESH_PER_SECOND,
            redirect_stderr=self.capture_logs,
        )
        if self.capture_logs:
            self._restore_logs = log_through(self.console)
        self._live.start(refresh=self._snapshot is not None)

    def update(self, snapshot: PeerProgress) -> None:
        if self.enabled:
            self._snapshot, self._taken_at = snapshot, time.monotonic()

    def stop(self) -> None:
        """Draw the last snapshot once more and leave it on screen; restore the cursor and logging."""
        live, self._live = self._live, None
        if live is None:
            return
        try:
            live.stop()
        finally:
            self._restore_logs()
            self._restore_logs = lambda: None

    def __enter__(self) -> "ProgressView":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _renderable(self) -> RenderableType:
        if self._snapshot is None:
            return Text("waiting for the swarm…")
        return render(self._snapshot, time.monotonic() - self._taken_at)
