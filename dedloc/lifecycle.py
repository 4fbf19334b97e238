"""Process lifecycle shared by the daemons: graceful stop on Ctrl-C/SIGTERM, hard exit on the second.

hivemind runs the DHT and the averagers as child processes (and p2pd under them). A daemon must shut
them down in order on the first signal; on a second Ctrl-C it kills its whole process tree at once so
nothing is left behind as an orphan still holding a p2pd.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import psutil

from dedloc.errors import EXIT_INTERRUPTED

logger = logging.getLogger(__name__)

T = TypeVar("T")

# a swarm node holds a connection (and p2pd a few sockets) per peer it talks to; hivemind swarms are known
# to hit "too many open files" under the common soft limit of 1024
WANTED_OPEN_FILES = 65536


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> tuple[int, int]:
    """Raise this process's soft limit on open files toward ``wanted``, never past the hard limit (an
    unprivileged process may not raise that) and never lower than it is. Children (the DHT, the
    averagers, p2pd) inherit it. Returns the (soft, hard) limits in force afterwards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:  # a platform that refuses: keep what there is
            logger.debug(f"could not raise the open-files limit from {soft} to {target}: {e}")
    return soft, hard


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
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGHUP: the terminal went away
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._main_pid:
            if signum != signal.SIGINT:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.requested.is_set():
            if signum == signal.SIGINT:
                logger.warning(f"{self.name}: second interrupt, exiting now")
                kill_process_tree(os.getpid())
                if sys.stdout.isatty():
                    sys.stdout.write("\x1b[?25h\n")  # a live progress view hid the cursor; no cleanup runs after _exit
                    sys.stdout.flush()
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


def poll_until(
    probe: Callable[[], Optional[T]],
    timeout: float,
    stop: GracefulExit,
    timed_out: Callable[[], Exception],
    poll: float = 0.5,
) -> T:
    """Call ``probe`` until it returns something other than ``None``, and return that.

    ``probe`` runs at least once, then every ``poll`` seconds until ``timeout`` seconds have passed, when
    ``timed_out()`` is raised; ``KeyboardInterrupt`` is raised as soon as ``stop`` is set. Exceptions
    from ``probe`` propagate (a probe raises for an answer that waiting will not change).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        if stop.is_set():
            raise KeyboardInterrupt
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise timed_out()
        if stop.wait(min(poll, remaining)):
            raise KeyboardInterrupt


class PauseSwitch:
    """SIGUSR1 pauses a peer's contributions and SIGUSR2 resumes them: :attr:`paused` is set in between.
    :attr:`busy` is the other reason to pause, set by a watcher while another program uses the GPU
    (``--pause-when-busy``); the peer is paused while either is set (:meth:`is_paused`).

    Only the process that installed it reacts; forked children (hivemind's DHT and averagers) inherit
    the handler and ignore both signals, where their default would end them. The handler only flips
    the event: the trainer notices it between micro-batches and logs the change.
    """

    def __init__(self):
        self.paused = threading.Event()
        self.busy = threading.Event()
        self._main_pid = os.getpid()

    def is_paused(self) -> bool:
        return self.paused.is_set() or self.busy.is_set()

    def reason(self) -> str:
        if self.paused.is_set():
            return "SIGUSR1; SIGUSR2 resumes"
        return "another program is using the GPU; resuming once it is free"

    @classmethod
    def install(cls) -> "PauseSwitch":
        self = cls()
        for signum in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._main_pid:
            return
        if signum == signal.SIGUSR1:
            self.paused.set()
        else:
            self.paused.clear()


def _terminate_with_parent() -> None:
    """In a freshly forked child: receive SIGTERM when the launching process dies (Linux), so a
    launcher killed outright does not leave a whole swarm running."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


def stop_all(children: list["ChildProcess"], grace: float = 20.0) -> None:
    """Stop several children at once: all are asked first, then each is reaped within one shared grace."""
    import time

    for child in children:
        child.request_stop()
    deadline = time.monotonic() + grace
    for child in children:
        child.stop(grace=max(0.0, deadline - time.monotonic()))


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
            start_new_session=True, env=env, cwd=cwd, preexec_fn=_terminate_with_parent,
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

    def request_stop(self) -> None:
        """Ask the daemon to shut down gracefully: SIGTERM to its main process only, so it can stop its
        own helpers (DHT, averagers, p2pd) in order."""
        if self.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 20.0) -> Optional[int]:
        """Stop the child and reap its whole group: a graceful stop first, then SIGKILL for whatever
        is left after ``grace`` seconds (or at once when the main process is gone); returns the exit code."""
        import time

        self.request_stop()
        self.wait(grace)
        deadline = time.monotonic() + (5.0 if self.poll() is not None else 0.0)
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
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


WORKDIR_MARK = "DEDLOC_WORKDIR"
OWNER_MARK = "DEDLOC_OWNER_PID"


def adopt_workdir(path: Path) -> list[int]:
    """Make ``path`` this daemon's own: kill what a crashed previous daemon on the same directory left
    behind; returns the pids killed. Call it early: the first call re-executes the process (same pid).

    A daemon killed outright (SIGKILL of its main process only, an OOM kill) leaves its helpers running
    — the DHT process, averagers and p2pd — which still answer for its identity and hold its locks.
    To recognise them, the daemon runs with the directory and its own pid in its environment
    (:data:`WORKDIR_MARK`, :data:`OWNER_MARK`), which every helper inherits; the process re-executes
    itself once so that the marks are in the environment the kernel shows for it and its forks. A
    marked process whose owner is no longer a daemon on that directory is a leftover.
    """
    path = Path(path).resolve()
    if os.environ.get(WORKDIR_MARK) != str(path) or os.environ.get(OWNER_MARK) != str(os.getpid()):
        env = dict(os.environ, **{WORKDIR_MARK: str(path), OWNER_MARK: str(os.getpid())})
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
    killed = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            env = proc.environ()
        except (psutil.Error, OSError):
            continue
        if env.get(WORKDIR_MARK) != str(path):
            continue
        owner = env.get(OWNER_MARK, "")
        if owner.isdigit() and psutil.pid_exists(int(owner)) and _is_daemon(int(owner), path):
            continue  # a live daemon's helper (a second daemon on the directory is refused by its lock)
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.Error:
            pass
    psutil.wait_procs([psutil.Process(pid) for pid in killed if psutil.pid_exists(pid)], timeout=5)
    return killed


def _is_daemon(pid: int, path: Path) -> bool:
    """Whether ``pid`` is a dedloc daemon marked with ``path`` as its own (not a recycled pid)."""
    try:
        env = psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return False
    return env.get(WORKDIR_MARK) == str(path) and env.get(OWNER_MARK) == str(pid)
