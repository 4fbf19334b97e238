"""Throughput benchmark: dedloc against the compute ceiling, plain hivemind and synchronous DDP, on
shaped home-internet links.

    python -m bench.throughput [--peers 4] [--up-mbit 20] [--down-mbit 50] [--systems ideal,dedloc,...]
                               [--warmup 60] [--window 120] [--repeats 3] [--target-batch 256]
                               [--seq-length 128] [--diloco-batch 2048] [--small-model] [--out throughput-results]

Every system runs the same workload — the embedded default run (model, data, optimizer) with the given
sequence length and target global batch — on ``--peers`` processes, each in its own network namespace
with a tbf-shaped uplink and downlink (the swarm lab; needs root), one system after another:

- ``ideal``: each process trains alone, no averaging (the compute ceiling);
- ``dedloc``: a coordinator and ``dedloc peer`` daemons with the run config's defaults;
- ``dedloc-diloco``: the same in DiLoCo mode (``mode = "diloco"``: local optimizer steps, a parameter
  all-reduce and an outer step every ``--diloco-batch`` samples; its "global steps" are outer steps);
- ``hivemind-defaults`` / ``hivemind-example``: ``hivemind.Optimizer`` wired by hand, with the library's
  defaults / with the settings of hivemind's collaborative ALBERT example (see :mod:`bench.baselines`);
- ``ddp``: torch DDP over gloo, one all-reduce per global batch.

Each run is measured over ``--window`` seconds that start ``--warmup`` seconds after the system's first
progress (a sample computed; for dedloc, the first global step). Printed per system (median over
``--repeats`` runs, with the spread): samples/s summed over the peers and its ratio to ideal; global
steps in the window; bytes each peer sent per global step (its namespace's interface counter) next to
the ring all-reduce bound 2(n−1)/n·M (M: the parameters in fp32); the peak memory of a peer (PSS summed
over its whole process tree, DHT process and p2pd included); the CPU a peer's process tree used in the
window, the share of it spent outside the training process (DHT, averager, p2pd: on a machine with
fewer cores than processes it is taken from training), and the whole machine's busy cores. Results go
to ``throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from dedloc.config import RunConfig, default_run_config
from dedloc.errors import UserInputError
from dedloc.lab.network import Host, LabUnavailable, Network
from dedloc.lab.swarm import TINY_MODEL, LabSwarm
from dedloc.lifecycle import ChildProcess, stop_all

SYSTEMS = ("ideal", "dedloc", "dedloc-diloco", "hivemind-defaults", "hivemind-example", "ddp")
STARTUP_TIMEOUT = 240.0


@dataclass
class SystemRun:
    """One run of one system."""

    system: str
    samples_per_s: Optional[float]
    steps_in_window: Optional[int]
    bytes_per_peer_per_step: Optional[float]
    """Mean over the peers of the bytes each sent in the window, divided by the global steps in it."""
    peak_pss_mb: Optional[float]
    """The largest peak over the peers of one peer's process tree's PSS."""
    started_s: Optional[float]
    """Seconds from starting the processes to the system's first progress."""
    error: Optional[str] = None
    peer_cpu: Optional[float] = None
    """CPU cores one peer's process tree kept busy in the window (mean over the peers)."""
    side_cpu_share: Optional[float] = None
    """Share of the peers' CPU time spent outside their training processes (DHT, averager, p2pd)."""
    machine_cpu: Optional[float] = None
    """CPU cores the whole machine kept busy in the window (the coordinator and this bench included)."""


@dataclass
class Report:
    peers: int
    up_mbit: Optional[float]
    down_mbit: Optional[float]
    parameters: int
    target_batch: int
    seq_length: int
    warmup_s: float
    window_s: float
    runs: list[SystemRun] = field(default_factory=list)

    @property
    def bound_bytes(self) -> float:
        """The ring all-reduce bound 2(n−1)/n·M for fp32 parameters."""
        return 2 * (self.peers - 1) / self.peers * self.parameters * 4

    def median(self, system: str, attribute: str) -> Optional[float]:
        values = [getattr(run, attribute) for run in self.runs if run.system == system and getattr(run, attribute) is not None]
        return statistics.median(values) if values else None

    def spread(self, system: str, attribute: str) -> str:
        values = [getattr(run, attribute) for run in self.runs if run.system == system and getattr(run, attribute) is not None]
        return f"{min(values):.1f}–{max(values):.1f}" if len(values) > 1 else "—"

    def table(self) -> str:
        ideal = self.median("ideal", "samples_per_s")
        lines = [
            f"{self.peers} peers, uplink {self.up_mbit or '∞'} Mbit/s, downlink {self.down_mbit or '∞'} Mbit/s; "
            f"{self.parameters / 1e6:.2f} M parameters, seq {self.seq_length}, global batch {self.target_batch}; "
            f"window {self.window_s:.0f} s after {self.warmup_s:.0f} s warm-up",
            "| system | samples/s (median) | spread | × ideal | global steps | MB sent/peer/step | bound 2(n−1)/n·M (fp32) | "
            "peak PSS/peer (MB) | CPU/peer (cores) | side processes' CPU | machine busy (cores) | runs (failed) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for system in dict.fromkeys(run.system for run in self.runs):
            rate = self.median(system, "samples_per_s")
            sent = self.median(system, "bytes_per_peer_per_step")
            steps = self.median(system, "steps_in_window")
            pss = self.median(system, "peak_pss_mb")
            side = self.median(system, "side_cpu_share")
            runs = [run for run in self.runs if run.system == system]
            lines.append(
                f"| {system} | {_fmt(rate)} | {self.spread(system, 'samples_per_s')} | "
                f"{_fmt(rate / ideal if rate is not None and ideal else None, 2)} | {_fmt(steps, 0)} | "
                f"{_fmt(sent / 1e6 if sent is not None else None, 2)} | {self.bound_bytes / 1e6:.2f} | {_fmt(pss, 0)} | "
                f"{_fmt(self.median(system, 'peer_cpu'), 2)} | {_fmt(side * 100 if side is not None else None, 0)} % | "
                f"{_fmt(self.median(system, 'machine_cpu'), 2)} | {len(runs)} ({sum(run.error is not None for run in runs)}) |"
            )
        errors = [f"{run.system}: {run.error}" for run in self.runs if run.error]
        return "\n".join(lines + errors)


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def parse_override(text: str) -> tuple[str, str, object]:
    """``SECTION.KEY=VALUE`` (the value as TOML reads it, else as a string) → (section, key, value)."""
    import tomllib

    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"{text!r} is not SECTION.KEY=VALUE")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key.strip(), value


def bench_config(target_batch: int, seq_length: int, small_model: bool, tokenizer_path: Optional[Path] = None,
                 overrides: tuple[tuple[str, str, object], ...] = ()) -> RunConfig:
    sections: dict[str, dict] = {name: dict(values) for name, values in (TINY_MODEL if small_model else {}).items()}
    sections.setdefault("training", {}).update(target_batch_size=target_batch, micro_batch_size=16, total_steps=100_000)
    sections.setdefault("checkpoint", {}).update(every_steps=100_000, heldout_sequences=0)
    sections.setdefault("data", {})["seq_length"] = seq_length
    if tokenizer_path is not None:
        sections.setdefault("tokenizer", {})["path"] = str(tokenizer_path)
    for section, key, value in overrides:
        sections.setdefault(section, {})[key] = value
    return default_run_config(**sections)


def diloco_config(config: Path, target_batch: int) -> Path:
    """``config`` in DiLoCo mode with an outer step every ``target_batch`` samples, next to it (without
    PowerSGD, which compresses synchronous mode's gradients only)."""
    from dedloc.config import load_run_config

    path = config.with_name("run-diloco.toml")
    diloco = load_run_config(config).with_overrides(
        mode="diloco", training={"target_batch_size": target_batch}, averaging={"powersgd_rank": None})
    path.write_text(diloco.to_toml(), encoding="utf-8")
    return path


def prepare(out: Path, target_batch: int, seq_length: int, small_model: bool,
            overrides: tuple[tuple[str, str, object], ...] = ()) -> tuple[Path, int]:
    """The run config every system trains (its tokenizer trained once, here) and its parameter count."""
    from dedloc.task.build import hf_tokenizer, prepare_tokenizer
    from dedloc.task.model import build_model, count_parameters

    draft = bench_config(target_batch, seq_length, small_model, overrides=overrides)
    tokenizer_json = prepare_tokenizer(draft, out / "tokenizer")
    config = bench_config(target_batch, seq_length, small_model, out / "tokenizer" / "tokenizer.json", overrides)
    path = out / "run.toml"
    path.write_text(config.to_toml(), encoding="utf-8")
    parameters = count_parameters(build_model(config.model, hf_tokenizer(config, tokenizer_json), seed=0))
    return path, parameters


# --- measuring -----------------------------------------------------------------------------------


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _session_processes(session_ids: list[int]) -> Iterator[tuple[int, int]]:
    """(session id, pid) of every running process in one of the given sessions."""
    wanted = set(session_ids)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                sid = os.getsid(int(entry))
            except OSError:
                continue
            if sid in wanted:
                yield sid, int(entry)


def tree_pss_mb(session_ids: list[int]) -> dict[int, float]:
    """PSS (MB) of every process of each session (a lab daemon and everything it started)."""
    totals = {sid: 0 for sid in session_ids}
    for sid, pid in _session_processes(session_ids):
        totals[sid] += _pss_kb(pid)
    return {sid: kb / 1024 for sid, kb in totals.items()}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_cpu_seconds(session_ids: list[int]) -> dict[int, tuple[float, float]]:
    """(CPU seconds of the session's leader, of every process in the session) for each session. A
    process that exits takes its CPU seconds along: read it at both ends of a window and subtract."""
    leaders = {sid: _cpu_seconds(sid) for sid in session_ids}
    totals = {sid: 0.0 for sid in session_ids}
    for sid, pid in _session_processes(session_ids):
        totals[sid] += _cpu_seconds(pid)
    return {sid: (leaders[sid], totals[sid]) for sid in session_ids}


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (/proc/stat: all but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class MemorySampler(threading.Thread):
    """Samples the process trees' PSS every ``period`` seconds; :attr:`peaks` holds each tree's peak."""

    def __init__(self, session_ids: list[int], period: float = 2.0):
        super().__init__(daemon=True)
        self.session_ids, self.period = session_ids, period
        self.peaks = {sid: 0.0 for sid in session_ids}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            for sid, mb in tree_pss_mb(self.session_ids).items():
                self.peaks[sid] = max(self.peaks[sid], mb)


def sent_bytes(host: Host) -> int:
    """Bytes the host has sent: what the bridge side of its link received."""
    return int(Path(f"/sys/class/net/{host.link}/statistics/rx_bytes").read_text())


def _at(points: list[tuple[float, float]], t: float) -> float:
    """The cumulative count at time ``t``, interpolated between progress points (sorted by time)."""
    if not points or t <= points[0][0]:
        return points[0][1] if points else 0.0
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)
    return points[-1][1]


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of ``path`` so far (a line still being written, or a missing file, is skipped)."""
    rows = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass  # a line being written
    except OSError:
        pass
    return rows


# --- running -------------------------------------------------------------------------------------


@dataclass
class _Running:
    """A system's processes while it runs: how to read its progress and stop it."""

    hosts: list[Host]
    session_ids: list[int]
    first_progress: Callable[[], Optional[float]]
    """Wall time of the system's first progress, once there is some."""
    measure: Callable[[float, float], tuple[Optional[float], Optional[int]]]
    """(samples/s, global steps) over a window of wall time."""
    alive: Callable[[], Optional[str]]
    """None while all processes run; else what exited."""
    stop: Callable[[], None]


def _start_dedloc(network: Network, config: Path, peers: int, up: Optional[float], down: Optional[float], workdir: Path) -> _Running:
    swarm = LabSwarm(network, workdir, config)
    swarm.start_coordinator(up, down, extra=("--no-dashboard",))
    nodes = [swarm.start_peer(f"peer-{i + 1}", up, down) for i in range(peers)]
    history = swarm.coordinator_dir / "history.jsonl"

    def first_progress() -> Optional[float]:
        rows = read_jsonl(history)
        return rows[0]["time"] if rows else None

    def measure(start: float, end: float):
        rows = [row for row in read_jsonl(history) if start <= row["time"] <= end]
        if len(rows) < 2:
            return None, len(rows)
        return (rows[-1]["samples"] - rows[0]["samples"]) / (rows[-1]["time"] - rows[0]["time"]), rows[-1]["step"] - rows[0]["step"]

    def alive() -> Optional[str]:
        gone = [f"{node.name} exited with {node.poll()}" for node in [swarm.coordinator, *nodes] if node.poll() is not None]
        return "; ".join(gone) or None

    def stop() -> None:
        for node in [*nodes, swarm.coordinator]:
            node.power_off()  # measured already: nothing to shut down gracefully for
        swarm.close()

    return _Running([node.host for node in nodes], [node.pid for node in nodes], first_progress, measure, alive, stop)


def _start_workers(network: Network, system: str, config: Path, peers: int, up: Optional[float], down: Optional[float],
                   workdir: Path, seconds: float) -> _Running:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    hosts = [network.add_host(f"peer-{i + 1}", up, down) for i in range(peers)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    progress = [workdir / f"progress-{i}.jsonl" for i in range(peers)]
    children = []
    for rank, host in enumerate(hosts):
        argv = [sys.executable, "-m", "bench.baselines", "--system", system, "--config", str(config), "--rank", str(rank),
                "--world", str(peers), "--address", host.address, "--master", hosts[0].address,
                "--rendezvous", str(workdir), "--seconds", str(seconds), "--progress", str(progress[rank])]
        # gloo picks its interface by the host name, which resolves to loopback here: name the link
        children.append(ChildProcess(host.name, host.command(argv), workdir / "logs" / f"{host.name}.log",
                                     env={**env, "GLOO_SOCKET_IFNAME": host.inner_link},
                                     cwd=Path(__file__).resolve().parent.parent))

    def points(path: Path, key: str) -> list[tuple[float, float]]:
        return [(row["t"], row[key]) for row in read_jsonl(path)]

    def first_progress() -> Optional[float]:
        firsts = [rows[0]["t"] for rows in map(read_jsonl, progress) if rows]
        return max(firsts) if len(firsts) == len(progress) else None  # every process computing

    def measure(start: float, end: float):
        samples = sum(_at(points(path, "samples"), end) - _at(points(path, "samples"), start) for path in progress)
        steps = points(progress[0], "step")
        return samples / (end - start), round(_at(steps, end) - _at(steps, start))

    def alive() -> Optional[str]:
        gone = [f"{child.name} exited with {child.poll()}: {child.log_tail(3)}" for child in children if child.poll() is not None]
        return "; ".join(gone) or None

    return _Running(hosts, [child.pid for child in children], first_progress, measure, alive,
                    lambda: stop_all(children, grace=1.0))


def run_system(system: str, config: Path, peers: int, up: Optional[float], down: Optional[float], warmup: float,
               window: float, workdir: Path) -> SystemRun:
    with Network() as network:
        began = time.time()
        try:
            if system in ("dedloc", "dedloc-diloco"):  # the caller passes each its own run config
                running = _start_dedloc(network, config, peers, up, down, workdir)
            else:
                running = _start_workers(network, system, config, peers, up, down, workdir,
                                         seconds=STARTUP_TIMEOUT + warmup + window + 30)
        except Exception as e:  # reported in the table; the other systems still run
            return SystemRun(system, None, None, None, None, None, f"could not start: {e}".splitlines()[0][:300])
        sampler = MemorySampler(running.session_ids)
        sampler.start()
        try:
            first = None
            while first is None:
                problem = running.alive()
                if problem or time.time() - began > STARTUP_TIMEOUT:
                    return SystemRun(system, None, None, None, None, None, problem or f"no progress within {STARTUP_TIMEOUT:.0f} s")
                first = running.first_progress()
                time.sleep(0.5)
            start, end = first + warmup, first + warmup + window
            time.sleep(max(0.0, start - time.time()))
            sent_before = [sent_bytes(host) for host in running.hosts]
            cpu_before, busy_before = tree_cpu_seconds(running.session_ids), machine_busy_seconds()
            time.sleep(max(0.0, end - time.time()))
            sent = [sent_bytes(host) - before for host, before in zip(running.hosts, sent_before)]
            cpu_after, busy = tree_cpu_seconds(running.session_ids), machine_busy_seconds() - busy_before
            used = {sid: (cpu_after[sid][0] - cpu_before[sid][0], cpu_after[sid][1] - cpu_before[sid][1]) for sid in cpu_after}
            trees = sum(total for _, total in used.values())
            side = (trees - sum(main for main, _ in used.values())) / trees if trees > 0 else None
            time.sleep(1.0)  # the progress written at the window's end
            problem = running.alive()
            rate, steps = running.measure(start, end)
            per_step = statistics.fmean(sent) / steps if steps else None
            return SystemRun(system, rate, steps, per_step, max(sampler.peaks.values()), first - began, problem,
                             peer_cpu=trees / len(used) / window, side_cpu_share=side, machine_cpu=busy / window)
        finally:
            sampler.done.set()
            running.stop()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--up-mbit", type=float, default=20.0)
    parser.add_argument("--down-mbit", type=float, default=50.0)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds after the first progress before measuring")
    parser.add_argument("--window", type=float, default=120.0, help="seconds measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target-batch", type=int, default=256)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--diloco-batch", type=int, default=2048,
                        help="samples the swarm computes between DiLoCo's outer steps (system dedloc-diloco)")
    parser.add_argument("--small-model", action="store_true", help="a model a tenth of the default's size (smoke runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change the run config, e.g. averaging.average_state_every=4 (repeatable; dedloc reads "
                             "every section, the other systems the model, data and optimizer)")
    parser.add_argument("--out", type=Path, default=Path("throughput-results"))
    args = parser.parse_args(argv)
    try:
        overrides = tuple(parse_override(text) for text in args.overrides)
    except ValueError as e:
        parser.error(str(e))
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in systems if name not in SYSTEMS]
    if unknown or args.peers < 2 or args.repeats < 1 or args.window <= 0 or args.warmup < 0:
        parser.error(f"unknown systems {unknown}" if unknown else "--peers must be ≥ 2, --repeats ≥ 1, --window > 0")
    try:
        Network().close()  # fail early, with the reason, where namespaces cannot be made
    except LabUnavailable as e:
        print(f"the throughput benchmark needs network namespaces: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        config, parameters = prepare(args.out, args.target_batch, args.seq_length, args.small_model, overrides)
        configs = {"dedloc-diloco": diloco_config(config, args.diloco_batch)}
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyError as e:
        print(f"error: the run config has no section {e}", file=sys.stderr)
        return 2
    report = Report(args.peers, args.up_mbit, args.down_mbit, parameters, args.target_batch, args.seq_length,
                    args.warmup, args.window)
    for repeat in range(args.repeats):
        for system in systems:
            run = run_system(system, configs.get(system, config), args.peers, args.up_mbit, args.down_mbit, args.warmup, args.window,
                             args.out / f"{system}-{repeat + 1}")
            report.runs.append(run)
            print(f"{system} (run {repeat + 1}): {_fmt(run.samples_per_s)} samples/s, {_fmt(run.steps_in_window, 0)} "
                  f"steps, first progress after {_fmt(run.started_s, 0)} s" + (f" — {run.error}" if run.error else ""),
                  flush=True)
            (args.out / "throughput.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(report.table())
    return 1 if any(run.samples_per_s is None for run in report.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
