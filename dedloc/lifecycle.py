"""Process lifecycle shared by the daemons: graceful stop on Ctrl-C/SIGTERM, hard exit on the second.

hivemind runs the DHT and the averagers as child processes (and p2pd under them). A daemon must shut
them down in order on the first signal; on a second Ctrl-C it kills its whole process tree at once so
nothing is left behind as an orphan still holding a p2pd.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Optional

import psutil

from dedloc.errors import EXIT_INTERRUPTED

logger = logging.getLogger(__name__)


def kill_process_tree(pid: int, include_self: bool = False, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every descendant of ``pid`` (children first discovered, then all of them)."""
    try:
        parent = psutil.Process(pid)
        victims = parent.children(recursive=True)
        if include_self:
            victims.append(parent)
    except psutil.NoSuchProcess:
        return
    for proc in victims:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


class GracefulExit:
    """Turns SIGINT/SIGTERM into a stop request: ``requested`` is set on the first signal.

    The second signal kills this process's whole tree and exits with code 130 at once. Forked
    children (hivemind's DHT and averagers) inherit the handler: there SIGINT does nothing (a Ctrl-C
    reaches the whole process group, and the parent shuts its children down in order), while SIGTERM
    keeps its default meaning, so ``Process.terminate()`` still ends a child that hangs.
    """

    def __init__(self, name: str):
        self.name = name
        self.requested = threading.Event()
        self.reason: Optional[str] = None
        self._main_pid = os.getpid()

    @classmethod
    def install(cls, name: str) -> "GracefulExit":
        self = cls(name)
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._main_pid:
            if signum == signal.SIGTERM:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.requested.is_set():
            if signum == signal.SIGINT:
                logger.warning(f"{self.name}: second interrupt, exiting now")
                kill_process_tree(os.getpid())
                os._exit(EXIT_INTERRUPTED)
            return
        self.reason = signal.Signals(signum).name
        logger.warning(f"{self.name}: stopping ({self.reason}); press Ctrl-C again to exit at once")
        self.requested.set()

    def request(self, reason: str) -> None:
        self.reason = reason
        self.requested.set()

    def is_set(self) -> bool:
        return self.requested.is_set()

    def wait(self, timeout: float) -> bool:
        return self.requested.wait(timeout)


class ChildProcess:
    """A daemon started in its own session, so it and everything under it form one process group.

    :meth:`stop` ends the whole group — SIGTERM first (a graceful shutdown), SIGKILL after ``grace`` —
    which also reaps hivemind's helper processes and p2pd daemons a crashed child may leave behind.
    """

    def __init__(self, name: str, argv: list[str], log_path, env: Optional[dict] = None, cwd=None):
        import subprocess

        self.name, self.argv, self.log_path = name, argv, log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=cwd,
        )
        self.pid = self.popen.pid

    def poll(self) -> Optional[int]:
        return self.popen.poll()

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        import subprocess

        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> bool:
        """Whether any process of this child's group is still running (zombies excluded)."""
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.info["pid"]) == self.pid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    return True
            except (ProcessLookupError, psutil.Error, OSError):
                continue
        return False

    def stop(self, grace: float = 20.0) -> Optional[int]:
        """Stop the child and its whole group; returns the child's exit code (None if unknown)."""
        import time

        if self.poll() is None:
            self.signal_group(signal.SIGTERM)
            self.wait(grace)
        deadline = time.monotonic() + (grace if self.poll() is None else 5.0)
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.group_alive() or self.poll() is None:
            self.signal_group(signal.SIGKILL)
            self.wait(5)
        self._log.close()
        return self.poll()

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return ""
