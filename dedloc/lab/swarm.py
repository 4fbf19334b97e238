"""dedloc processes on lab hosts: a coordinator and peers, each in its own network namespace, that a
test or benchmark can crash, pause, restart and cut off like volunteers' machines (on a
:class:`LoopbackNetwork`, everything but cutting off).

Each process is a real ``dedloc`` daemon started through ``ip netns exec`` in its own process group
(:class:`dedloc.lifecycle.ChildProcess`), listening on its host's address. Peers keep a persistent
identity in their work directory, so a restarted peer is the same volunteer coming back.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dedloc.allowlist import add_volunteer
from dedloc.lifecycle import ChildProcess, stop_all
from dedloc.swarm.identity import Identity

from .network import Host, LoopbackNetwork, Network


TINY_MODEL = dict(
    model={"embedding_size": 32, "hidden_size": 64, "intermediate_size": 128},
    tokenizer={"vocab_size": 2000},
    data={"seq_length": 64},
)
"""Run-config sections for a model a tenth of the embedded default's size: for scenarios and benchmarks
that test how the swarm behaves, not what it learns (a step is then mostly matchmaking)."""


@dataclass
class LabNode:
    """One daemon on one host; :meth:`restart` starts it again with the same arguments."""

    name: str
    host: Host
    argv: list[str]
    logdir: Path
    env: dict
    network: Network | LoopbackNetwork
    child: Optional[ChildProcess] = None
    incarnation: int = 0
    previous: list[ChildProcess] = field(default_factory=list)

    def start(self) -> "LabNode":
        self.incarnation += 1
        log = self.logdir / (f"{self.name}.log" if self.incarnation == 1 else f"{self.name}.{self.incarnation}.log")
        self.child = ChildProcess(self.name, self.host.command(self.argv), log, env=self.env)
        return self

    @property
    def pid(self) -> int:
        return self.child.pid

    def poll(self) -> Optional[int]:
        return self.child.poll()

    def crash(self) -> None:
        """SIGKILL the main process only, as in a crash: its helpers (DHT, p2pd) are left behind."""
        try:
            os.kill(self.child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.child.wait(10)

    def power_off(self) -> None:
        """SIGKILL the whole process group at once, as when the machine dies."""
        self.child.signal_group(signal.SIGKILL)
        self.child.wait(10)

    def pause(self) -> None:
        self.child.signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self.child.signal_group(signal.SIGCONT)

    def cut(self) -> None:
        self.network.cut(self.host)

    def restore(self) -> None:
        self.network.restore(self.host)

    def restart(self, env: Optional[dict] = None) -> "LabNode":
        """Start it again (the previous process must be gone); ``env`` replaces its environment."""
        if self.child is not None:
            self.previous.append(self.child)
        if env is not None:
            self.env = env
        return self.start()

    def log_text(self) -> str:
        return self.child.log_path.read_text(errors="replace") if self.child else ""

    def stop(self, grace: float = 15.0) -> None:
        stop_all([c for c in [*self.previous, self.child] if c is not None], grace=grace)


class LabSwarm:
    """A coordinator and peers on hosts of ``network``; :meth:`close` stops them all."""

    def __init__(self, network: Network | LoopbackNetwork, workdir: Path, config: Path, threads: int = 1,
                 allowlist: bool = False):
        """``allowlist``: the coordinator admits only the lab's peers (each by its identity), as a closed run."""
        self.network, self.workdir, self.config = network, workdir, config
        self.allowlist = workdir / "allowlist.toml" if allowlist else None
        self.logdir = workdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(
            os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), HF_DATASETS_OFFLINE="1",
            HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
        )
        self.coordinator: Optional[LabNode] = None
        self.peers: dict[str, LabNode] = {}

    def _node(self, name: str, host: Host, args: list[str], env: Optional[dict] = None) -> LabNode:
        argv = [sys.executable, "-m", "dedloc", *args]
        return LabNode(name, host, argv, self.logdir, {**self.env, **(env or {})}, self.network).start()

    @property
    def coordinator_dir(self) -> Path:
        return self.workdir / "coordinator"

    def start_coordinator(self, up_mbit: Optional[float] = None, down_mbit: Optional[float] = None,
                          extra: tuple[str, ...] = (), env: Optional[dict] = None) -> LabNode:
        """``env``: extra environment variables (e.g. ``DEDLOC_FAULTS``)."""
        host = self.network.add_host("coordinator", up_mbit, down_mbit)
        if self.allowlist is not None:
            self.allowlist.parent.mkdir(parents=True, exist_ok=True)
            self.allowlist.write_text("", encoding="utf-8")
            extra = ("--allowlist", str(self.allowlist), *extra)
        self.coordinator = self._node("coordinator", host, [
            "coordinator", "--config", str(self.config), "--workdir", str(self.coordinator_dir),
            "--host", host.address, "--dashboard-host", host.address, *extra,
        ], env)
        return self.coordinator

    def join_info(self, timeout: float = 120.0) -> dict:
        """The coordinator's join information, once its current incarnation has written it."""
        path = self.coordinator_dir / "coordinator.json"
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = json.loads(path.read_text())
                if info.get("pid") == self.coordinator.pid:
                    return info
            except (OSError, ValueError):
                pass
            if self.coordinator.poll() is not None:
                raise RuntimeError(f"the coordinator exited with {self.coordinator.poll()}:\n{self.coordinator.child.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the coordinator wrote no join information within {timeout:.0f} s")
            time.sleep(0.2)

    def start_peer(self, name: str, up_mbit: Optional[float] = None, down_mbit: Optional[float] = None,
                   extra: tuple[str, ...] = (), env: Optional[dict] = None, incoming: bool = True) -> LabNode:
        """``extra``: more ``dedloc peer`` arguments; ``env``: extra environment variables; ``incoming=False``:
        the peer's host drops incoming connection attempts (behind NAT, as far as others can tell)."""
        host = self.network.add_host(name, up_mbit, down_mbit)
        if not incoming:
            self.network.refuse_incoming(host)
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        if self.allowlist is not None:  # the coordinator re-reads the file: the peer is admitted by its identity
            add_volunteer(self.allowlist, name, peer_id=Identity.load_or_create(workdir / "identity.key").peer_id.to_base58())
        node = self._node(name, host, [
            "peer", "--join", *self.join_info()["join"], "--host", host.address, "--workdir", str(workdir),
            "--identity", str(workdir / "identity.key"), *extra,
        ], env)
        self.peers[name] = node
        return node

    def close(self) -> None:
        nodes = [*self.peers.values(), *([self.coordinator] if self.coordinator else [])]
        for node in nodes:
            node.resume()  # a paused process cannot shut down
        for node in nodes:
            node.stop()
