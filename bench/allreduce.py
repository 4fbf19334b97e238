"""Averaging-only benchmark: how long one all-reduce takes on shaped home-internet links, from 2 to 8
peers, next to the bandwidth bound — no training compute, so it measures the network path and not CPU
contention on a small machine.

    python -m bench.allreduce [--peers 2,4,8] [--up-mbit 20] [--down-mbit 50] [--params 2000000]
                              [--slow-peers 0] [--slow-up-mbit X] [--compression none] [--rounds 6]
                              [--sender-timeout 60]
                              [--systems dedloc,gloo] [--out allreduce-results]

For every peer count, ``--peers`` processes, each in its own network namespace with a tbf-shaped uplink
and downlink (the swarm lab; needs root), average a vector of ``--params`` float32 numbers ``--rounds``
times (plus one warm-up round, not counted):

- ``dedloc``: hivemind's decentralized averager with dedloc's reducer (``CheckedReduction``: checked
  parts, bounded weights), matchmaking over a DHT the processes share, compression as in the run
  config's ``grad_compression``. Matchmaking is measured apart from the all-reduce: each process asks
  for a group, and the all-reduce starts once every member has its group (hivemind's averaging trigger);
- ``dedloc-measured``: the same, but each peer first measures its upload against a coordinator's
  upload probe (an unshaped host of its own, :mod:`dedloc.swarm.bandwidth`) and announces it, as a
  peer does when it joins; the shares of the all-reduce then follow the uplinks (not run by default);
- ``gloo``: ``torch.distributed.all_reduce`` over gloo (ring), fp32, the reference synchronous
  data-parallel training uses.

``--slow-peers K --slow-up-mbit X``: the last K peers' uplinks are X Mbit/s instead of ``--up-mbit``.
``--sender-timeout S``: dedloc's configured sender timeout (a floor: rounds with slow members wait
longer, :mod:`dedloc.swarm.timeouts`); the default 60 s keeps slow senders in every round.

Every round averages fresh numbers, and each member checks its result against the mean: a round that
ended with a member off it (a part dropped after the sender timeout) counts as *partial*, apart from
the timed rounds.

Printed per system and peer count: median all-reduce seconds over the rounds (from the moment the
last member is ready to the moment the last member has the result) and its spread, the bound
2(n−1)/n·M·b / uplink (M numbers of b bytes: what each peer must send in a bandwidth-optimal
all-reduce; with unequal uplinks, the fastest round a split of the shares allows, see
:func:`bound_seconds`), their ratio, matchmaking seconds (dedloc), and the bytes each peer sent per round (its
namespace's interface counter) next to 2(n−1)/n·M·b. The scaling column divides the all-reduce
time by the bound's factor 2(n−1)/n and by the same figure at the smallest peer count: 1.0 means the
time grows exactly as the bound does. Results go to ``allreduce.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from bench.baselines import _rendezvous_peers
from bench.throughput import read_jsonl, sent_bytes
from dedloc.lab.network import LabUnavailable, Network
from dedloc.lifecycle import ChildProcess, stop_all

SYSTEMS = ("dedloc", "dedloc-measured", "gloo")
DEFAULT_SYSTEMS = ("dedloc", "gloo")
COMPRESSIONS = ("none", "fp16")
BYTES_PER_NUMBER = {"none": 4, "fp16": 2}
PARTIAL_ERROR = {"none": 1e-4, "fp16": 2e-2}
"""A member's result further than this from the mean (max over the numbers, which are N(0, 1)) means a
part of the round was dropped; within it, the wire format's rounding."""
PREFIX = "allreduce-bench"
GLOO_PORT = 29510
ROUND_TIMEOUT = 300.0


# --- the worker: one process per peer, in its namespace ----------------------------------------------


def _record(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(row) + "\n")


def _barrier(rendezvous: Path, name: str, rank: int, world: int, timeout: float = ROUND_TIMEOUT) -> None:
    """Every rank touches ``name-RANK``; returns once all ``world`` have (the ranks share a file system)."""
    (rendezvous / f"{name}-{rank}").touch()
    deadline = time.monotonic() + timeout
    while sum((rendezvous / f"{name}-{other}").exists() for other in range(world)) < world:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not every rank reached {name}")
        time.sleep(0.05)


def run_desk_worker(address: str, rendezvous: Path) -> None:
    """The coordinator's part in ``dedloc-measured``: a DHT node serving the upload probe, until stopped."""
    import hivemind

    dht = hivemind.DHT(host_maddrs=[f"/ip4/{address}/tcp/0"], nat_port_map=False, auto_nat=False, start=True)
    dht.run_coroutine(_serve_probe, return_future=True).result(30)
    (rendezvous / "desk-id").write_text(dht.peer_id.to_base58())
    _rendezvous_peers(rendezvous, 0, [str(maddr) for maddr in dht.get_visible_maddrs()])
    while True:
        time.sleep(3600)


async def _serve_probe(dht, node) -> None:
    from dedloc.swarm.bandwidth import ProbeDesk, serve_upload_probe

    await serve_upload_probe(node.p2p, ProbeDesk())


def round_vector(rank: int, index: int, params: int):
    """What peer ``rank`` averages in round ``index``: fresh numbers every round, so that a round left
    half-done (a member's part dropped) shows in the result even after whole rounds made peers equal."""
    import torch

    return torch.randn(params, generator=torch.Generator().manual_seed(1_000_003 * index + rank))


def run_dedloc_worker(rank: int, world: int, address: str, rendezvous: Path, params: int, compression: str,
                      rounds: int, results: Path, measure_upload: bool = False, sender_timeout: float = 60.0) -> None:
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage
    from hivemind.p2p import PeerID

    from dedloc.swarm.bandwidth import UploadMeasurement
    from dedloc.swarm.optimizer import ReducerShares, make_compression
    from dedloc.swarm.reduction import CheckedReduction

    class BenchAverager(CheckedReduction, ReducerShares, hivemind.averaging.DecentralizedAverager):
        """dedloc's reduction path on a plain vector."""

    # probing the local network (UPnP/NAT-PMP, AutoNAT) is off, as everywhere in dedloc's tests and benches
    network = dict(host_maddrs=[f"/ip4/{address}/tcp/0"], nat_port_map=False, auto_nat=False)
    if measure_upload:  # the desk started the DHT
        dht = hivemind.DHT(initial_peers=_rendezvous_peers(rendezvous, 1, []), start=True, **network)
    elif rank == 0:
        dht = hivemind.DHT(start=True, **network)
        _rendezvous_peers(rendezvous, 0, [str(maddr) for maddr in dht.get_visible_maddrs()])
    else:
        dht = hivemind.DHT(initial_peers=_rendezvous_peers(rendezvous, rank, []), start=True, **network)
    torch.manual_seed(rank)
    # request_timeout below min_matchmaking_time, as hivemind recommends (dedloc's run config does the
    # same): at 5 s, one member of a 4-peer group never learnt that its group had formed (the others
    # ran the round without its part) in one round of a mixed-link run
    averager = BenchAverager(
        [torch.randn(params)], dht=dht, prefix=PREFIX, target_group_size=world, min_matchmaking_time=2.0,
        request_timeout=1.0, compression=make_compression(compression), sender_timeout=sender_timeout,
        reducer_timeout=2 * sender_timeout, allreduce_timeout=ROUND_TIMEOUT, start=True,
    )
    announced = None
    if measure_upload:  # as a peer does when it joins: measured against the coordinator, then announced
        upload = UploadMeasurement(dht, PeerID.from_base58((rendezvous / "desk-id").read_text()))
        upload.run()
        if upload.mbps is not None:
            averager.set_upload_mbps(upload.mbps)
            averager.announce(reduces=True)
            announced = upload.mbps
    try:
        for index in range(rounds + 1):  # round 0: warm-up (connections), not counted
            with averager.get_tensors() as (tensor,):
                tensor.copy_(round_vector(rank, index, params))
            _barrier(rendezvous, f"round-{index}", rank, world)
            began = time.time()
            control = averager.step(wait=False, require_trigger=True, timeout=ROUND_TIMEOUT)
            while control.stage in (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP) and not control.done():
                time.sleep(0.005)
            grouped = time.time()
            control.allow_allreduce()
            try:
                gathered = control.result(ROUND_TIMEOUT)
                size, error = len(gathered), None
            except Exception as e:  # recorded: the parent reports failed rounds
                size, error = 0, repr(e)[:300]
            done = time.time()
            expected = sum(round_vector(r, index, params) for r in range(world)) / world
            with averager.get_tensors() as (tensor,):
                max_error = float((tensor - expected).abs().max())
            _record(results, dict(rank=rank, round=index, began=began, grouped=grouped, done=done,
                                  group_size=size, error=error, announced_mbps=announced, max_error=max_error))
        _barrier(rendezvous, "finished", rank, world)
    finally:
        averager.shutdown()
        dht.shutdown()


def run_gloo_worker(rank: int, world: int, master: str, rendezvous: Path, params: int, rounds: int,
                    results: Path) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{master}:{GLOO_PORT}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=ROUND_TIMEOUT))
    try:
        vector = torch.randn(params)
        for index in range(rounds + 1):
            dist.barrier()
            began = time.time()
            dist.all_reduce(vector)
            _record(results, dict(rank=rank, round=index, began=began, grouped=began, done=time.time(),
                                  group_size=world, error=None))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# --- the parent: namespaces, processes, the table -----------------------------------------------------


@dataclass
class Measurement:
    system: str
    peers: int
    compression: str
    allreduce_s: list[float] = field(default_factory=list)
    """Per counted round: last member ready → last member done."""
    matchmaking_s: list[float] = field(default_factory=list)
    """Per counted round: first member asks → last member has its group (dedloc only)."""
    bytes_per_round: Optional[float] = None
    """Mean over the peers of what each sent, per round (warm-up included in neither)."""
    failed_rounds: int = 0
    partial_rounds: int = 0
    """Rounds that ended, but with some member's result off the mean (a part dropped after the sender
    timeout): not counted in ``allreduce_s``."""
    error: Optional[str] = None
    uplinks_mbit: list[float] = field(default_factory=list)
    """Each peer's shaped uplink, in rank order."""
    announced_mbps: list[Optional[float]] = field(default_factory=list)
    """The upload bandwidth each peer announced (``dedloc-measured``: its measurement), in rank order."""


def bound_bytes(peers: int, params: int, compression: str) -> float:
    """What each peer must send in a bandwidth-optimal all-reduce: 2(n−1)/n·M·b."""
    return 2 * (peers - 1) / peers * params * BYTES_PER_NUMBER[compression]


def bound_seconds(peers: int, params: int, compression: str, uplinks_mbit: list[float]) -> float:
    """The fastest all-reduce the uplinks allow when each peer reduces a share: peer i sends the others'
    shares of its vector and its reduced share to the n−1 others, (M + (n−2)·s_i)·b bytes, so the
    shares are chosen to even out those uploads (equal links: 2(n−1)/n·M·b / uplink)."""
    total = params * BYTES_PER_NUMBER[compression] * 8 / 1e6  # Mbit
    rates = uplinks_mbit[:peers]

    def shares_fit(seconds: float) -> bool:  # can the shares (each ≥ 0, summing to M) finish in `seconds`?
        if peers == 2:
            return all(total <= seconds * rate for rate in rates)
        room = [(seconds * rate - total) / (peers - 2) for rate in rates]
        return min(room) >= 0 and sum(room) >= total

    low, high = 0.0, total * 2 * peers / min(rates)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if shares_fit(middle) else (middle, high)
    return high


def uplinks(peers: int, up_mbit: float, slow_peers: int, slow_up_mbit: Optional[float]) -> list[float]:
    """Each rank's uplink: the last ``slow_peers`` ranks on ``slow_up_mbit``, the others on ``up_mbit``."""
    slow = min(slow_peers, peers) if slow_up_mbit else 0
    return [up_mbit] * (peers - slow) + [slow_up_mbit] * slow


def measure(system: str, peers: int, params: int, compression: str, rounds: int, uplinks_mbit: list[float],
            down_mbit: float, workdir: Path, sender_timeout: float = 60.0) -> Measurement:
    """One system at one peer count: ``rounds`` counted rounds after a warm-up round. ``dedloc-measured``
    adds an unshaped host for the coordinator's upload probe, which every peer measures against first."""
    result = Measurement(system, peers, compression if system.startswith("dedloc") else "none",
                         uplinks_mbit=list(uplinks_mbit))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(exist_ok=True)
    rows_path = workdir / "rounds.jsonl"
    with Network() as network:
        hosts = [network.add_host(f"peer-{i + 1}", up, down_mbit) for i, up in enumerate(uplinks_mbit)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        children = []
        if system == "dedloc-measured":
            desk = network.add_host("desk")
            argv = [sys.executable, "-m", "bench.allreduce", "--worker", "desk", "--address", desk.address,
                    "--rendezvous", str(workdir)]
            children.append(ChildProcess(desk.name, desk.command(argv), workdir / "logs" / "desk.log", env=env,
                                         cwd=Path(__file__).resolve().parent.parent))
        for rank, host in enumerate(hosts):
            argv = [sys.executable, "-m", "bench.allreduce", "--worker", system, "--rank", str(rank),
                    "--world", str(peers), "--address", host.address, "--master", hosts[0].address,
                    "--rendezvous", str(workdir), "--params", str(params), "--compression", compression,
                    "--rounds", str(rounds), "--results", str(rows_path), "--sender-timeout", str(sender_timeout)]
            # gloo picks its interface by the host name, which resolves to loopback here: name the link
            children.append(ChildProcess(host.name, host.command(argv), workdir / "logs" / f"{host.name}.log",
                                         env={**env, "GLOO_SOCKET_IFNAME": host.inner_link},
                                         cwd=Path(__file__).resolve().parent.parent))
        try:
            counted_from: Optional[list[int]] = None
            deadline = time.monotonic() + 120.0 + (rounds + 1) * ROUND_TIMEOUT
            while True:
                rows = read_jsonl(rows_path)
                if counted_from is None and sum(1 for row in rows if row["round"] == 0) == peers:
                    counted_from = [sent_bytes(host) for host in hosts]  # after the warm-up round
                if sum(1 for row in rows if row["round"] == rounds) == peers:
                    sent = [sent_bytes(host) - before for host, before in zip(hosts, counted_from or [0] * peers)]
                    break
                gone = [f"{child.name} exited with {child.poll()}: {child.log_tail(3)}"
                        for child in children if child.poll() not in (None, 0)]
                if gone or time.monotonic() > deadline:
                    result.error = ("; ".join(gone) or "timed out")[:500]
                    return result
                time.sleep(0.2)
        finally:
            stop_all(children, grace=5.0)
    for index in range(1, rounds + 1):
        members = [row for row in rows if row["round"] == index]
        if any(row["error"] or row["group_size"] != peers for row in members):
            result.failed_rounds += 1
            continue
        if any((row.get("max_error") or 0.0) > PARTIAL_ERROR[compression] for row in members):
            result.partial_rounds += 1
            continue
        result.allreduce_s.append(max(row["done"] for row in members) - max(row["grouped"] for row in members))
        if system.startswith("dedloc"):
            result.matchmaking_s.append(max(row["grouped"] for row in members) - min(row["began"] for row in members))
    result.bytes_per_round = statistics.fmean(sent) / rounds
    by_rank = {row["rank"]: row.get("announced_mbps") for row in rows}
    result.announced_mbps = [by_rank.get(rank) for rank in range(peers)]
    return result


def _median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def table(measurements: list[Measurement], params: int) -> str:
    lines = ["| system | peers | uplinks Mbit/s | announced Mbit/s | all-reduce s (median, min–max) | bound s | × bound "
             "| scaling vs bound | matchmaking s | MB sent per peer per round | bound MB | failed rounds | partial rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    first: dict[str, float] = {}
    for m in measurements:
        median = _median(m.allreduce_s)
        bound = bound_seconds(m.peers, params, m.compression, m.uplinks_mbit)
        ratio = median / bound if median is not None else None
        scaling = None
        if median is not None:
            per_factor = median / (2 * (m.peers - 1) / m.peers)
            first.setdefault(m.system, per_factor)
            scaling = per_factor / first[m.system]
        spread = f" ({min(m.allreduce_s):.2f}–{max(m.allreduce_s):.2f})" if m.allreduce_s else ""
        sent = None if m.bytes_per_round is None else m.bytes_per_round / 1e6
        lines.append(
            f"| {m.system} ({m.compression}) | {m.peers} | {','.join(f'{u:g}' for u in m.uplinks_mbit)} "
            f"| {','.join(_fmt(a, 1) for a in m.announced_mbps) or '—'} | {_fmt(median)}{spread} | {_fmt(bound)} | {_fmt(ratio)} "
            f"| {_fmt(scaling)} | {_fmt(_median(m.matchmaking_s))} | {_fmt(sent)} "
            f"| {bound_bytes(m.peers, params, m.compression) / 1e6:.2f} | {m.failed_rounds}"
            + (f" — {m.error}" if m.error else "") + f" | {m.partial_rounds} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.allreduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="2,4,8", help="comma-separated peer counts")
    parser.add_argument("--up-mbit", type=float, default=20.0)
    parser.add_argument("--down-mbit", type=float, default=50.0)
    parser.add_argument("--sender-timeout", type=float, default=60.0,
                        help="dedloc's configured sender timeout (s; the run config's default is 5)")
    parser.add_argument("--slow-peers", type=int, default=0, help="how many peers (the last ranks) have a slower uplink")
    parser.add_argument("--slow-up-mbit", type=float, help="their uplink (Mbit/s)")
    parser.add_argument("--params", type=int, default=2_000_000, help="numbers averaged (default: the reference "
                        "workload's ~2 M parameters)")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="none", help="dedloc's wire format (gloo: fp32)")
    parser.add_argument("--rounds", type=int, default=6, help="counted rounds (after one warm-up round)")
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, from: {', '.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)})")
    parser.add_argument("--out", type=Path, default=Path("allreduce-results"))
    # a worker's own arguments (the parent starts them)
    parser.add_argument("--worker", choices=(*SYSTEMS, "desk"), help=argparse.SUPPRESS)
    for name in ("--rank", "--world"):
        parser.add_argument(name, type=int, help=argparse.SUPPRESS)
    for name in ("--address", "--master"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in ("--rendezvous", "--results"):
        parser.add_argument(name, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker in ("dedloc", "dedloc-measured"):
        run_dedloc_worker(args.rank, args.world, args.address, args.rendezvous, args.params, args.compression,
                          args.rounds, args.results, measure_upload=args.worker == "dedloc-measured",
                          sender_timeout=args.sender_timeout)
        return 0
    if args.worker == "desk":
        run_desk_worker(args.address, args.rendezvous)
        return 0
    if args.worker == "gloo":
        run_gloo_worker(args.rank, args.world, args.master, args.rendezvous, args.params, args.rounds, args.results)
        return 0

    try:
        counts = [int(text) for text in args.peers.split(",") if text.strip()]
    except ValueError:
        parser.error(f"--peers takes comma-separated numbers, not {args.peers!r}")
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = [name for name in systems if name not in SYSTEMS]
    if unknown or not counts or min(counts) < 2 or args.rounds < 1 or args.params < 1 or args.up_mbit <= 0 \
            or args.slow_peers < 0 or (args.slow_up_mbit is not None and args.slow_up_mbit <= 0):
        parser.error(f"unknown systems {unknown}" if unknown else
                     "--peers must be ≥ 2 each, --rounds ≥ 1, --params ≥ 1, --up-mbit and --slow-up-mbit > 0, "
                     "--slow-peers ≥ 0")
    try:
        Network().close()  # fail early, with the reason, where namespaces cannot be made
    except LabUnavailable as e:
        print(f"the all-reduce benchmark needs network namespaces: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    measurements: list[Measurement] = []
    for system in systems:
        for peers in counts:
            m = measure(system, peers, args.params, args.compression, args.rounds,
                        uplinks(peers, args.up_mbit, args.slow_peers, args.slow_up_mbit), args.down_mbit,
                        args.out / f"{system}-{peers}", args.sender_timeout)
            measurements.append(m)
            print(f"{system}, {peers} peers: all-reduce {_fmt(_median(m.allreduce_s))} s (median of "
                  f"{len(m.allreduce_s)}), {m.failed_rounds} failed, {m.partial_rounds} partial" + (f" — {m.error}" if m.error else ""), flush=True)
            (args.out / "allreduce.json").write_text(json.dumps(
                dict(params=args.params, up_mbit=args.up_mbit, down_mbit=args.down_mbit,
                     measurements=[asdict(x) for x in measurements]), indent=2) + "\n")
    print(table(measurements, args.params))
    return 1 if any(m.error or not m.allreduce_s for m in measurements) else 0


if __name__ == "__main__":
    sys.exit(main())
