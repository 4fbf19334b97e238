"""Chaos soak: a swarm on shaped home links while volunteers' machines die and their links drop.

    python -m bench.chaos [--peers 6] [--minutes 10] [--fault-every 30] [--up-mbit 20] [--down-mbit 50]
                          [--no-baseline] [--seed 0] [--allowlist] [--out chaos-results]

Runs the swarm lab (each daemon on its own network namespace with a tbf-shaped link; needs root) for
``--minutes`` after the first global step, twice: without faults (the baseline) and with one fault
about every ``--fault-every`` seconds — a random peer powered off (its whole process group killed),
crashed (its main process killed, leaving its DHT and p2pd behind) or cut off the network, then
restarted or reconnected some 15–45 s later. At least two peers are left untouched at any time.
When the time is up every peer is brought back; once each has caught up with the swarm, the run is
ended four steps on (``END_AT``: peers must hear of it before they get there), and the peers finish with a final state-averaging round and write
their parameters.

Prints, per run: global steps in the window, longest stall between global steps, peers wedged (alive
and connected, but no step of theirs for 3 × averaging_timeout), the largest parameter difference
between the finished peers, checkpoints loadable / on disk, and exits other than 0. Writes
``chaos.json``. Exits 1 when a check fails: a wedged peer, a bad exit, a checkpoint that does not
load, peers that disagree beyond float32 rounding, or no step in the window.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from dedloc.checkpoint import list_checkpoints, load_checkpoint
from dedloc.config import default_run_config
from dedloc.lab.network import LabUnavailable, Network
from dedloc.lab.swarm import LabNode, LabSwarm

AVERAGING_TIMEOUT = 15.0
FAULTS = ("power_off", "crash", "cut")
PROGRESS = r"step=\d+ loss=|joined the swarm as|downloading its state|state downloaded in"  # a peer progressing
DIVERGENCE_LIMIT = 1e-5  # relative L2 difference: float32 rounding of state averaging without compression


@dataclass
class Fault:
    at_s: float
    peer: str
    kind: str
    recovered_at_s: Optional[float] = None


@dataclass
class SoakResult:
    label: str
    peers: int
    window_s: float
    steps: int
    longest_stall_s: float
    wedged: list[str]
    divergence: Optional[float]
    """Largest relative L2 difference of a finished peer's parameters from the first one's."""
    finished_peers: int
    checkpoints: int
    checkpoints_loadable: int
    bad_exits: dict[str, int]
    faults: list[Fault] = field(default_factory=list)
    unplanned_exits: list[str] = field(default_factory=list)
    """Peers that exited on their own during the run (restarted, as a supervisor would): not a failure
    of the soak, but reported."""

    def failures(self, max_divergence: float = DIVERGENCE_LIMIT) -> list[str]:
        problems = []
        if self.steps == 0:
            problems.append("no global step in the window")
        if self.wedged:
            problems.append(f"wedged: {', '.join(self.wedged)}")
        if self.bad_exits:
            problems.append(f"bad exits: {self.bad_exits}")
        if self.checkpoints_loadable < self.checkpoints or self.checkpoints == 0:
            problems.append(f"checkpoints loadable: {self.checkpoints_loadable} of {self.checkpoints}")
        if self.divergence is None or self.divergence > max_divergence:
            problems.append(f"finished peers disagree: {self.divergence}")
        return problems


def _config(path: Path, peers: int) -> Path:
    config = default_run_config(
        training={"target_batch_size": 128, "micro_batch_size": 16, "total_steps": 100_000, "min_peers": peers,
                  "wait_for_peers_timeout": 120.0},
        optimizer={"lr": 1e-3, "warmup_steps": 2},
        averaging={"averaging_timeout": AVERAGING_TIMEOUT},
        checkpoint={"every_steps": 5, "keep_last": 3, "heldout_sequences": 16},
    )
    path.write_text(config.to_toml(), encoding="utf-8")
    return path


def _history(swarm: LabSwarm) -> list[dict]:
    path = swarm.coordinator_dir / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _log_times(text: str, pattern: str, day: dt.date) -> list[float]:
    """Epoch seconds of the log lines matching ``pattern`` (lines start with HH:MM:SS, local time)."""
    times, previous, offset = [], None, 0.0
    for line in text.splitlines():
        found = re.match(r"(\d\d):(\d\d):(\d\d) ", line)
        if not found or not re.search(pattern, line):
            continue
        clock = dt.datetime.combine(day, dt.time(*map(int, found.groups()))).timestamp() + offset
        if previous is not None and clock < previous - 3600:  # past midnight
            offset += 86400
            clock += 86400
        previous = clock
        times.append(clock)
    return times


def _peer_step(node: LabNode) -> int:
    """The newest step the current incarnation of a peer reports holding (a step line or a download)."""
    found = re.findall(r"step=(\d+) loss=|now at step (\d+)", node.log_text())
    return max((int(a or b) for a, b in found), default=-1)


class Soak:
    def __init__(self, root: Path, peers: int, minutes: float, fault_every: float, up: float, down: float,
                 seed: int, faults: bool, allowlist: bool = False):
        self.root, self.n, self.window = root, peers, minutes * 60.0
        self.allowlist = allowlist
        self.fault_every, self.up, self.down, self.faults_on = fault_every, up, down, faults
        self.random = random.Random(seed)
        self.faults: list[Fault] = []
        self.down_since: dict[str, float] = {}  # peer → when its fault began (while not recovered)
        self.cut_windows: dict[str, list[tuple[float, float]]] = {}
        self.unplanned_exits: list[str] = []

    def run(self) -> SoakResult:
        label = "faults" if self.faults_on else "no faults"
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        network = Network()
        swarm = LabSwarm(network, self.root / "lab", _config(self.root / "run.toml", self.n), allowlist=self.allowlist)
        try:
            swarm.start_coordinator(up_mbit=self.up, down_mbit=self.down)
            for index in range(1, self.n + 1):
                name = f"peer-{index}"
                swarm.start_peer(name, up_mbit=self.up, down_mbit=self.down,
                                 extra=("--snapshot-dir", str(self.root / "lab" / name / "final")))
            first = self._wait(lambda: _history(swarm), 600, "the first global step", swarm)[0]["time"]
            print(f"[{label}] first global step; running for {self.window:.0f} s", flush=True)
            self.started = started = time.monotonic()
            next_fault = started + self._interval()
            while time.monotonic() - started < self.window:
                now = time.monotonic()
                self._recover_due(swarm, now)
                if self.faults_on and now >= next_fault:
                    self._inject(swarm, now - started)
                    next_fault = now + self._interval()
                self._check_alive(swarm)
                self._restart_exited(swarm, time.monotonic() - started)
                time.sleep(0.5)
            for name in list(self.down_since):
                self._recover(swarm, name, time.monotonic() - started)
            window_end = time.time()
            at_recovery = _history(swarm)[-1]["step"]
            print(f"[{label}] time is up at step {at_recovery}; waiting for every peer to catch up", flush=True)
            def caught_up() -> bool:
                self._restart_exited(swarm, time.monotonic() - started)
                return all(_peer_step(node) >= at_recovery for node in swarm.peers.values())

            self._wait(caught_up, 300, "every peer to catch up with the swarm", swarm)
            # the coordinator's history may lag the peers by a few steps
            last = max([_history(swarm)[-1]["step"]] + [_peer_step(node) for node in swarm.peers.values()])
            (swarm.coordinator_dir / "END_AT").write_text(f"{last + 4}\n")
            print(f"[{label}] every peer is at step {at_recovery} or later: ending the run at step {last + 4}", flush=True)
            nodes = [swarm.coordinator, *swarm.peers.values()]
            self._wait(lambda: all(node.poll() is not None for node in nodes), 600, "the run to end", None)
            return self._report(label, swarm, first, window_end)
        finally:
            swarm.close()
            network.close()

    def _interval(self) -> float:
        return self.fault_every * self.random.uniform(0.7, 1.3)

    def _wait(self, predicate, timeout: float, what: str, swarm: Optional[LabSwarm]):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if swarm is not None:
                self._check_alive(swarm)
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.5)

    def _check_alive(self, swarm: LabSwarm) -> None:
        if swarm.coordinator.poll() is not None:
            raise RuntimeError(f"the coordinator exited with {swarm.coordinator.poll()}:\n{swarm.coordinator.child.log_tail(30)}")

    def _inject(self, swarm: LabSwarm, at: float) -> None:
        healthy = [name for name, node in swarm.peers.items() if name not in self.down_since and node.poll() is None]
        if len(healthy) <= 2:
            return  # keep at least two peers training
        name, kind = self.random.choice(healthy), self.random.choice(FAULTS)
        node: LabNode = swarm.peers[name]
        getattr(node, kind)()
        self.faults.append(Fault(round(at, 1), name, kind))
        self.down_since[name] = time.monotonic() + self.random.uniform(0.5, 1.5) * self.fault_every
        if kind == "cut":
            self.cut_windows.setdefault(name, []).append((time.time(), float("inf")))
        print(f"[faults] {at:6.1f} s: {kind} {name}", flush=True)

    def _restart_exited(self, swarm: LabSwarm, at: float) -> None:
        """Restart a peer that exited on its own with an error (e.g. 3: it could not reach the swarm on a
        restart), as a volunteer's supervisor (systemd, docker's restart policy) would."""
        for name, node in swarm.peers.items():
            code = node.poll()
            if name in self.down_since or code is None or code == 0:
                continue
            reason = (node.child.log_tail(1) or "").strip().splitlines()[-1:] or ["?"]
            self.unplanned_exits.append(f"{name} exited with {code} at {at:.0f} s: {reason[0][:160]}")
            print(f"[faults] {at:6.1f} s: {name} exited with {code} on its own: restarting it ({reason[0][:120]})", flush=True)
            node.restart()

    def _recover_due(self, swarm: LabSwarm, now: float) -> None:
        for name, due in list(self.down_since.items()):
            if now >= due:
                self._recover(swarm, name, now - self.started)

    def _recover(self, swarm: LabSwarm, name: str, at: float) -> None:
        del self.down_since[name]
        node = swarm.peers[name]
        fault = next(f for f in reversed(self.faults) if f.peer == name)
        if fault.kind == "cut":
            node.restore()
            start, _ = self.cut_windows[name][-1]
            self.cut_windows[name][-1] = (start, time.time())
        else:
            node.restart()
        fault.recovered_at_s = round(at, 1)
        print(f"[faults] {at:6.1f} s: {name} back ({'restored' if fault.kind == 'cut' else 'restarted'})", flush=True)

    # ----------------------------------------------------------------------------------------------
    def _report(self, label: str, swarm: LabSwarm, first: float, window_end: float) -> SoakResult:
        history = _history(swarm)
        times = [first] + [r["time"] for r in history if first < r["time"] <= window_end] + [window_end]
        steps = len([r for r in history if first < r["time"] <= window_end])
        longest_stall = max(b - a for a, b in zip(times, times[1:]))
        wedged = [name for name, node in swarm.peers.items() if self._wedged(name, node, first, window_end)]
        bad_exits = {}
        for node in [swarm.coordinator, *swarm.peers.values()]:
            if node.poll() != 0:
                bad_exits[node.name] = node.poll()
        divergence, finished = self._divergence(swarm)
        checkpoints = list_checkpoints(swarm.coordinator_dir / "checkpoints")
        loadable = 0
        for path in checkpoints:
            try:
                load_checkpoint(path)
                loadable += 1
            except Exception as e:
                print(f"[{label}] checkpoint {path} does not load: {e}", flush=True)
        return SoakResult(label, self.n, round(window_end - first, 1), steps, round(longest_stall, 1), wedged,
                          divergence, finished, len(checkpoints), loadable, bad_exits, self.faults,
                          self.unplanned_exits)

    def _wedged(self, name: str, node: LabNode, first: float, window_end: float) -> bool:
        """Alive and connected for 3 × averaging_timeout in the window without progress: a step, or on
        the way back into the swarm after a restart or a cut, joining it or finishing a state download."""
        limit = 3 * AVERAGING_TIMEOUT
        day = dt.datetime.fromtimestamp(first).date()
        incarnations = [*node.previous, node.child]
        for child in incarnations:
            text = child.log_path.read_text(errors="replace")
            lines = _log_times(text, r".", day)
            if not lines:
                continue
            born, died = max(lines[0], first), min(lines[-1], window_end)
            marks = [born] + [t for t in _log_times(text, PROGRESS, day) if born <= t <= died] + [died]
            for a, b in zip(marks, marks[1:]):
                outage = sum(max(0.0, min(b, end) - max(a, start)) for start, end in self.cut_windows.get(name, []))
                if b - a - outage > limit:
                    print(f"{name}: no step from {dt.datetime.fromtimestamp(a):%H:%M:%S} to "
                          f"{dt.datetime.fromtimestamp(b):%H:%M:%S} ({b - a - outage:.0f} s connected)", flush=True)
                    return True
        return False

    def _divergence(self, swarm: LabSwarm) -> tuple[Optional[float], int]:
        states = []
        for name in swarm.peers:
            snapshots = sorted((self.root / "lab" / name / "final").glob("step-*"))
            if snapshots:
                states.append(load_file(str(snapshots[-1] / "model.safetensors")))
        if len(states) < 2:
            return None, len(states)
        reference = states[0]
        worst = 0.0
        for state in states[1:]:
            diff = sum(float((state[k].double() - reference[k].double()).square().sum()) for k in reference)
            norm = sum(float(reference[k].double().square().sum()) for k in reference)
            worst = max(worst, (diff / norm) ** 0.5)
        return worst, len(states)


def _table(results: list[SoakResult]) -> str:
    rows = [("run", "steps", "vs no faults", "longest stall s", "wedged", "param diff (rel)", "checkpoints ok",
             "bad exits", "faults", "restarted after exiting")]
    baseline = next((r for r in results if r.label == "no faults"), None)
    for r in results:
        ratio = f"{r.steps / baseline.steps:.2f}" if baseline and baseline.steps else "-"
        rows.append((r.label, str(r.steps), ratio, f"{r.longest_stall_s:.1f}", str(len(r.wedged)),
                     "-" if r.divergence is None else f"{r.divergence:.1e}", f"{r.checkpoints_loadable}/{r.checkpoints}",
                     str(len(r.bad_exits)), str(len(r.faults)), str(len(r.unplanned_exits))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of each run after its first step")
    parser.add_argument("--fault-every", type=float, default=30.0, help="seconds between faults, about")
    parser.add_argument("--up-mbit", type=float, default=20.0)
    parser.add_argument("--down-mbit", type=float, default=50.0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allowlist", action="store_true", help="a closed run: the coordinator admits the lab's peers only")
    parser.add_argument("--out", type=Path, default=Path("chaos-results"))
    parser.add_argument("--max-divergence", type=float, default=DIVERGENCE_LIMIT,
                        help="relative parameter difference between finished peers that fails the soak (default: "
                             "float32 rounding)")
    args = parser.parse_args(argv)
    if args.peers < 3 or args.minutes <= 0 or args.fault_every <= 0:
        parser.error("needs --peers ≥ 3 (two stay untouched), and positive --minutes and --fault-every")
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for faults in ([False] if not args.no_baseline else []) + [True]:
            soak = Soak(args.out / ("faults" if faults else "baseline"), args.peers, args.minutes, args.fault_every,
                        args.up_mbit, args.down_mbit, args.seed, faults, allowlist=args.allowlist)
            results.append(soak.run())
    except LabUnavailable as e:
        print(f"chaos: the swarm lab needs network namespaces: {e}", file=sys.stderr)
        return 2
    print(f"\n{args.peers} peers, {args.up_mbit:g} Mbit/s up / {args.down_mbit:g} down, averaging_timeout "
          f"{AVERAGING_TIMEOUT:g} s, {args.minutes:g} min per run\n")
    print(_table(results))
    for r in results:
        for exit_ in r.unplanned_exits:
            print(f"[{r.label}] {exit_}")
    (args.out / "chaos.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    failures = [f"{r.label}: {problem}" for r in results for problem in r.failures(args.max_divergence)]
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
