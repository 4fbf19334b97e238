"""One training process of a throughput baseline, as :mod:`bench.throughput` starts it on each lab host.

    python -m bench.baselines --system SYSTEM --config run.toml --rank R --world N --address IP \
        --rendezvous DIR --seconds S --progress FILE

Every system trains the run config's model on the run's data (this process's data order seeded by its
rank) with the run's optimizer and schedule, as a dedloc peer would, and differs only in how the
processes share their gradients:

- ``ideal``: not at all — each process steps alone on its share of the global batch (the compute
  ceiling a swarm could reach if communication were free);
- ``hivemind-defaults``: ``hivemind.Optimizer`` with the library's defaults (what a user who wires
  hivemind by hand starts from);
- ``hivemind-example``: ``hivemind.Optimizer`` with the settings of hivemind's collaborative ALBERT
  example (delayed parameter updates and gradient averaging, fp16 gradients and state, matchmaking 5 s);
- ``ddp``: synchronous data-parallel training, ``torch.nn.parallel.DistributedDataParallel`` over gloo,
  one all-reduce per global batch (micro-batches accumulated under ``no_sync``).

The process appends one JSON line per micro-batch to ``--progress``: wall time, the samples it has
computed so far, and the global steps it has taken. It stops after ``--seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dedloc.config import RunConfig, load_run_config
from dedloc.task.build import build_peer_task
from dedloc.task.optimization import optimizer_factory, scheduler_factory
from dedloc.task.tokenizer import read_tokenizer_json

SYSTEMS = ("ideal", "hivemind-defaults", "hivemind-example", "ddp")
DDP_PORT = 29500
RUN_ID = "throughput-bench"


class Progress:
    """Appends ``{"t", "samples", "step"}`` lines to a file, flushed at once (the bench reads it live)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")
        self.samples = 0

    def add(self, samples: int, step: int) -> None:
        self.samples += samples
        self.file.write(json.dumps({"t": time.time(), "samples": self.samples, "step": step}) + "\n")
        self.file.flush()


def _task(config: RunConfig, rank: int):
    tokenizer_json = read_tokenizer_json(config.tokenizer.path)
    task = build_peer_task(config, tokenizer_json, config.training.micro_batch_size, data_seed=1000 + rank)
    task.model.train()
    return task.model, iter(task.stream)


def _micro_steps(config: RunConfig, world: int) -> int:
    """Micro-batches one process computes per global step when the global batch is split evenly."""
    return max(1, math.ceil(config.training.target_batch_size / world / config.training.micro_batch_size))


def run_ideal(config: RunConfig, rank: int, world: int, deadline: float, progress: Progress) -> None:
    model, stream = _task(config, rank)
    optimizer = optimizer_factory(config.optimizer)(model.parameters())
    scheduler = scheduler_factory(config.optimizer, config.training.total_steps)(optimizer)
    micro_steps, step = _micro_steps(config, world), 0
    while time.time() < deadline:
        for _ in range(micro_steps):
            batch = next(stream)
            (model(**batch).loss / micro_steps).backward()
            progress.add(len(batch["input_ids"]), step)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        step += 1


def run_ddp(config: RunConfig, rank: int, world: int, master: str, deadline: float, progress: Progress) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://{master}:{DDP_PORT}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=120))
    try:
        model, stream = _task(config, rank)
        ddp = DistributedDataParallel(model)
        optimizer = optimizer_factory(config.optimizer)(ddp.parameters())
        scheduler = scheduler_factory(config.optimizer, config.training.total_steps)(optimizer)
        micro_steps, step = _micro_steps(config, world), 0
        go_on = torch.ones(1)
        while True:
            # every rank takes the same number of steps: rank 0's clock decides when to stop
            go_on.fill_(1.0 if time.time() < deadline else 0.0)
            dist.broadcast(go_on, src=0)
            if not go_on.item():
                break
            for index in range(micro_steps):
                batch = next(stream)
                with ddp.no_sync() if index < micro_steps - 1 else nullcontext():
                    (ddp(**batch).loss / micro_steps).backward()  # the last one all-reduces
                progress.add(len(batch["input_ids"]), step)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
    finally:
        dist.destroy_process_group()


def _rendezvous_peers(rendezvous: Path, rank: int, dht_maddrs: list[str], timeout: float = 120.0) -> list[str]:
    """Rank 0 publishes its addresses in ``rendezvous``; the others read them."""
    path = rendezvous / "initial_peers.json"
    if rank == 0:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dht_maddrs))
        os.replace(tmp, path)
        return dht_maddrs
    deadline = time.monotonic() + timeout
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError("rank 0 published no DHT address")
        time.sleep(0.2)
    return json.loads(path.read_text())


def run_hivemind(config: RunConfig, system: str, rank: int, address: str, rendezvous: Path, deadline: float,
                 progress: Progress) -> None:
    import hivemind
    from hivemind.compression import Float16Compression

    # probing the local network (UPnP/NAT-PMP, AutoNAT) is off, as everywhere in dedloc's tests and benches
    network = dict(host_maddrs=[f"/ip4/{address}/tcp/0"], nat_port_map=False, auto_nat=False)
    if rank == 0:
        dht = hivemind.DHT(start=True, **network)
        _rendezvous_peers(rendezvous, 0, [str(maddr) for maddr in dht.get_visible_maddrs()])
    else:
        dht = hivemind.DHT(initial_peers=_rendezvous_peers(rendezvous, rank, []), start=True, **network)
    model, stream = _task(config, rank)
    settings = {}
    if system == "hivemind-example":  # hivemind's examples/albert (run_trainer.py and its arguments)
        settings = dict(
            matchmaking_time=5.0, averaging_timeout=60.0, offload_optimizer=True, delay_optimizer_step=True,
            delay_grad_averaging=True, grad_compression=Float16Compression(),
            state_averaging_compression=Float16Compression(),
        )
    optimizer = hivemind.Optimizer(
        dht=dht, run_id=RUN_ID, target_batch_size=config.training.target_batch_size,
        batch_size_per_step=config.training.micro_batch_size, params=model.parameters(),
        optimizer=optimizer_factory(config.optimizer),
        scheduler=scheduler_factory(config.optimizer, config.training.total_steps), **settings,
    )
    try:
        while time.time() < deadline:
            batch = next(stream)
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            progress.add(len(batch["input_ids"]), optimizer.local_epoch)
    finally:
        optimizer.shutdown()
        dht.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=SYSTEMS, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--address", required=True, help="this host's address")
    parser.add_argument("--master", help="rank 0's address (ddp)")
    parser.add_argument("--rendezvous", type=Path, required=True, help="a directory shared by the processes")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--progress", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    config = load_run_config(args.config)
    deadline = time.time() + args.seconds
    progress = Progress(args.progress)
    if args.system == "ideal":
        run_ideal(config, args.rank, args.world, deadline, progress)
    elif args.system == "ddp":
        run_ddp(config, args.rank, args.world, args.master or args.address, deadline, progress)
    else:
        run_hivemind(config, args.system, args.rank, args.address, args.rendezvous, deadline, progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
