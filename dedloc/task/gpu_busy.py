"""Whether another program is using this peer's GPU heavily (``dedloc peer --pause-when-busy``).

A volunteer's GPU is theirs first: while a game, a render or their own training holds the GPU, the
peer pauses its contributions (as SIGUSR1 would) and resumes once the GPU has been free of such
programs for a while. "Heavily" means: another process holds at least ``min_memory_mib`` of the GPU's
memory (``nvidia-smi``'s list of compute processes; a desktop's compositor holds far less).

:func:`other_gpu_processes` asks ``nvidia-smi``; :class:`BusyGpuWatcher` turns its answers into the
pause switch's ``busy`` flag, with a quiet period before resuming so that a program that briefly
releases the GPU does not make the peer flap.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

QUERY = ["--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits"]


def parse_compute_apps(text: str, gpu_uuid: str, own_pids: set[int]) -> list[tuple[int, int]]:
    """(pid, MiB) of the processes ``nvidia-smi`` lists on the GPU ``gpu_uuid``, without ``own_pids``.
    Lines that do not parse (``[N/A]`` memory, a header) are skipped."""
    found = []
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 3 or parts[0].lower() != gpu_uuid.lower():
            continue
        try:
            pid, mib = int(parts[1]), int(parts[2])
        except ValueError:
            continue
        if pid not in own_pids:
            found.append((pid, mib))
    return found


def gpu_uuid(index: int) -> str:
    """The UUID ``nvidia-smi`` shows for CUDA device ``index`` (``GPU-…``)."""
    import torch

    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def own_process_tree() -> set[int]:
    import psutil

    me = psutil.Process(os.getpid())
    return {me.pid, *(child.pid for child in me.children(recursive=True))}


def other_gpu_processes(index: int) -> Optional[list[tuple[int, int]]]:
    """(pid, MiB) of other programs' processes on CUDA device ``index``; None when ``nvidia-smi`` is
    missing or fails (the watcher then never pauses)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, *QUERY], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    return parse_compute_apps(done.stdout, gpu_uuid(index), own_process_tree())


class BusyGpuWatcher(threading.Thread):
    """Sets ``busy`` while another process holds ≥ ``min_memory_mib`` of the GPU; clears it once no such
    process has been seen for ``quiet_s`` seconds. :meth:`check` is one look (the thread calls it every
    ``period`` seconds); it logs each change."""

    def __init__(self, probe: Callable[[], Optional[list[tuple[int, int]]]], busy: threading.Event,
                 min_memory_mib: int = 512, quiet_s: float = 30.0, period: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(name="busy-gpu-watcher", daemon=True)
        self.probe, self.busy = probe, busy
        self.min_memory_mib, self.quiet_s, self.period, self.clock = min_memory_mib, quiet_s, period, clock
        self._last_seen: Optional[float] = None
        self._stopping = threading.Event()
        self._unavailable_logged = False

    def check(self) -> None:
        processes = self.probe()
        if processes is None:
            if not self._unavailable_logged:
                logger.warning("--pause-when-busy: nvidia-smi cannot list the GPU's processes here; never pausing")
                self._unavailable_logged = True
            return
        heavy = [(pid, mib) for pid, mib in processes if mib >= self.min_memory_mib]
        now = self.clock()
        if heavy:
            self._last_seen = now
            if not self.busy.is_set():
                listed = ", ".join(f"process {pid} ({mib} MiB)" for pid, mib in heavy)
                logger.info(f"another program is using the GPU ({listed}): pausing until it has been free for {self.quiet_s:.0f} s")
                self.busy.set()
        elif self.busy.is_set() and self._last_seen is not None and now - self._last_seen >= self.quiet_s:
            logger.info(f"the GPU has been free for {now - self._last_seen:.0f} s: resuming")
            self.busy.clear()

    def run(self) -> None:
        while not self._stopping.wait(self.period):
            try:
                self.check()
            except Exception as e:  # never take the peer down
                logger.debug(f"busy-GPU check failed: {e!r}")

    def stop(self) -> None:
        self._stopping.set()
