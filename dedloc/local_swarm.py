"""``dedloc swarm``: a coordinator and N peers as separate processes on loopback, start to finish.

The work directory receives ``run.toml`` (the run, with ``min_peers`` set to N so the peers start
together), ``logs/`` (one file per process), ``coordinator/`` (its state, history and checkpoints),
``peer-K/final/`` (each peer's final local state) and ``summary.json`` with exactly the keys
``global_step``, ``loss_first``, ``loss_last``, ``peers``, ``samples``, ``wall_s``.

Every process runs in its own process group, and every group is stopped on the way out — on success,
on failure and on Ctrl-C — so no DHT helper or p2pd survives the launcher.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from dedloc.config import default_run_config, load_run_config
from dedloc.errors import EXIT_INTERRUPTED, EXIT_UNEXPECTED, UserInputError
from dedloc.lifecycle import ChildProcess, GracefulExit, stop_all

logger = logging.getLogger(__name__)

SUMMARY_KEYS = ("global_step", "loss_first", "loss_last", "peers", "samples", "wall_s")
ECHO_MARKERS = ("step=", "checkpoint", "held-out", "run finished", "is up", "ERROR", "error")


@dataclass
class SwarmOptions:
    peers: int = 2
    max_steps: Optional[int] = None
    workdir: Optional[Path] = None
    config: Optional[Path] = None
    timeout: float = 1800.0
    log_level: str = "info"
    startup_timeout: float = 180.0
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 0
    extra_peer_args: tuple[str, ...] = ()


def _dedloc_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dedloc", *args]


def _fresh_workdir() -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path.cwd() / f"dedloc-swarm-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = Path.cwd() / f"dedloc-swarm-{stamp}-{suffix}"
    return path


def summarize(history_path: Path, wall_s: float) -> dict:
    """Build summary.json's content from the coordinator's per-step history."""
    records = []
    if history_path.is_file():
        for line in history_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    return dict(
        global_step=max((r["step"] for r in records), default=0),
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        peers=max((r["peers"] for r in records), default=0),
        samples=max((r["samples"] for r in records), default=0),
        wall_s=round(wall_s, 1),
    )


class _LogFollower:
    """Echoes the interesting lines of a child's log file to the console as they appear."""

    def __init__(self, path: Path, prefix: str):
        self.path, self.prefix, self.offset = path, prefix, 0

    def pump(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk.rfind(b"\n") + 1
        self.offset += complete
        for raw in chunk[:complete].splitlines():
            line = raw.decode(errors="replace")
            if any(marker in line for marker in ECHO_MARKERS) or line.startswith("dedloc peer --join"):
                print(f"{self.prefix}{line}", flush=True)


def run_local_swarm(options: SwarmOptions, stop: Optional[GracefulExit] = None) -> int:
    stop = stop or GracefulExit.install("swarm")
    started = time.monotonic()
    config = load_run_config(options.config) if options.config else default_run_config()
    config = config.with_overrides(training={"min_peers": options.peers})
    workdir = (options.workdir or _fresh_workdir()).expanduser().resolve()
    try:
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create work directory {workdir}: {e.strerror or e}") from None
    if (workdir / "coordinator" / "history.jsonl").exists():
        raise UserInputError(f"{workdir} already holds a swarm run; pass a new --workdir")
    (workdir / "run.toml").write_text(config.to_toml(), encoding="utf-8")
    print(f"dedloc swarm: {options.peers} peers, run '{config.run_id}', work directory {workdir}", flush=True)

    threads = max(1, (os.cpu_count() or 1) // options.peers)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads))
    children: list[ChildProcess] = []
    try:
        coordinator_args = ["coordinator", "--config", str(workdir / "run.toml"), "--workdir", str(workdir / "coordinator"),
                            "--log-level", options.log_level]
        if options.max_steps is not None:
            coordinator_args += ["--max-steps", str(options.max_steps)]
        if options.dashboard:
            coordinator_args += ["--dashboard-host", options.dashboard_host, "--dashboard-port", str(options.dashboard_port)]
        else:
            coordinator_args += ["--no-dashboard"]
        coordinator = ChildProcess("coordinator", _dedloc_command(*coordinator_args), workdir / "logs" / "coordinator.log", env=env)
        children.append(coordinator)
        follower = _LogFollower(workdir / "logs" / "coordinator.log", "")

        info = _wait_for_join_info(workdir / "coordinator" / "coordinator.json", coordinator, options.startup_timeout, stop)
        if info is None:
            return EXIT_INTERRUPTED
        join = info["join"]
        if info.get("dashboard"):
            print(f"dedloc swarm: dashboard at {info['dashboard']}", flush=True)
        for index in range(1, options.peers + 1):
            peer_dir = workdir / f"peer-{index}"
            peer_dir.mkdir(exist_ok=True)
            argv = _dedloc_command(
                "peer", "--join", *join, "--workdir", str(peer_dir), "--snapshot-dir", str(peer_dir / "final"),
                "--threads", str(threads), "--log-level", options.log_level, *options.extra_peer_args,
            )
            children.append(ChildProcess(f"peer-{index}", argv, workdir / "logs" / f"peer-{index}.log", env=env))

        deadline = started + options.timeout
        while coordinator.poll() is None:
            follower.pump()
            for child in children[1:]:
                code = child.poll()
                if code not in (None, 0):
                    print(f"dedloc swarm: {child.name} failed (exit code {code}); its log ends with:\n{child.log_tail()}",
                          file=sys.stderr)
                    return EXIT_UNEXPECTED
            if time.monotonic() > deadline:
                print(f"dedloc swarm: gave up after {options.timeout:.0f} s (see {workdir / 'logs'})", file=sys.stderr)
                return EXIT_UNEXPECTED
            if stop.wait(0.5):
                print("dedloc swarm: stopping every process", file=sys.stderr)
                return EXIT_INTERRUPTED
        follower.pump()
        if coordinator.poll() != 0:
            print(f"dedloc swarm: the coordinator failed (exit code {coordinator.poll()}):\n{coordinator.log_tail()}",
                  file=sys.stderr)
            return EXIT_UNEXPECTED
        for child in children[1:]:
            if child.wait(timeout=max(1.0, deadline - time.monotonic())) not in (0,):
                print(f"dedloc swarm: {child.name} did not end cleanly (exit code {child.poll()}):\n{child.log_tail()}",
                      file=sys.stderr)
                return EXIT_UNEXPECTED
        summary = summarize(workdir / "coordinator" / "history.jsonl", time.monotonic() - started)
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        print(f"dedloc swarm: done. {json.dumps(summary)}", flush=True)
        print(f"dedloc swarm: checkpoints in {workdir / 'coordinator' / 'checkpoints'}, logs in {workdir / 'logs'}", flush=True)
        return 0
    finally:
        stop_all(list(reversed(children)))


def _wait_for_join_info(path: Path, coordinator: ChildProcess, timeout: float, stop: GracefulExit) -> Optional[dict]:
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if coordinator.poll() is not None:
            raise UserInputError(
                f"the coordinator exited with code {coordinator.poll()} before it was ready:\n{coordinator.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator was not ready within {timeout:.0f} s:\n{coordinator.log_tail()}")
        if stop.wait(0.2):
            return None
    return json.loads(path.read_text(encoding="utf-8"))
