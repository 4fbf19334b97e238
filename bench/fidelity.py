"""Fidelity: does the swarm train what synchronous large-batch training would?

Runs the same run twice over: as a swarm (``dedloc swarm``: a coordinator and N peer processes that
accumulate the global batch together and average over hivemind) and as a single process that takes
the same optimizer steps on the same global batch size, schedule, initial weights and number of
samples (accumulating micro-batches itself), once per data-order seed. Every model is evaluated on
the run's held-out documents with fixed masks, at the steps the swarm's coordinator checkpointed.

The claim holds when the swarm's final held-out loss is within max(3 %, 2 × the standard deviation
across the single-process seeds) of the single-process mean. With ``--mode diloco`` the swarm trains
in DiLoCo mode (local steps, an outer step per global batch) against the same synchronous reference,
and the claim is that it ends no worse than that margin above it.

    python -m bench.fidelity [--peers 2] [--steps 16] [--seeds 3] [--mode synchronous|diloco] [--out DIR]

prints both curves as a table, writes ``fidelity.json`` and (with matplotlib) ``fidelity.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from hivemind.optim.state_averager import initialize_optimizer_state_
from transformers import AutoModelForMaskedLM

from dedloc.checkpoint import list_checkpoints, load_checkpoint
from dedloc.config import RunConfig, default_run_config, load_run_config
from dedloc.task.build import build_peer_task, hf_tokenizer
from dedloc.task.evaluation import evaluate, heldout_set
from dedloc.task.optimization import optimizer_factory, scheduler_factory

RELATIVE_TOLERANCE = 0.03


@dataclass
class FidelityResult:
    steps: list[int]
    swarm: list[float]
    single: dict[int, list[float]]
    """Data-order seed → held-out loss at each of ``steps``."""
    peers: int
    wall_s: dict[str, float] = field(default_factory=dict)
    mode: str = "synchronous"
    """The swarm's mode; the single-process reference is synchronous either way."""

    @property
    def single_mean(self) -> list[float]:
        return [statistics.fmean(values) for values in zip(*self.single.values())]

    @property
    def single_std(self) -> list[float]:
        return [statistics.stdev(values) if len(values) > 1 else 0.0 for values in zip(*self.single.values())]

    @property
    def tolerance(self) -> float:
        return max(RELATIVE_TOLERANCE * self.single_mean[-1], 2 * self.single_std[-1])

    @property
    def gap(self) -> float:
        return abs(self.swarm[-1] - self.single_mean[-1])

    @property
    def holds(self) -> bool:
        if self.mode == "diloco":  # more optimizer steps than the reference: ending lower is no fault
            return self.swarm[-1] - self.single_mean[-1] <= self.tolerance
        return self.gap <= self.tolerance

    def table(self) -> str:
        seeds = sorted(self.single)
        header = ["step", "swarm", "single mean", "single std"] + [f"seed {s}" for s in seeds]
        rows = [header]
        for i, step in enumerate(self.steps):
            rows.append(
                [str(step), f"{self.swarm[i]:.4f}", f"{self.single_mean[i]:.4f}", f"{self.single_std[i]:.4f}"]
                + [f"{self.single[s][i]:.4f}" for s in seeds]
            )
        widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
        lines = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        verdict = "HOLDS" if self.holds else "DOES NOT HOLD"
        lines.append(
            f"final held-out loss: swarm ({self.mode}) {self.swarm[-1]:.4f} vs single {self.single_mean[-1]:.4f} "
            f"± {self.single_std[-1]:.4f}; gap {self.gap:.4f}, tolerance {self.tolerance:.4f} → {verdict}"
        )
        return "\n".join(lines)


def run_swarm(config_path: Path, peers: int, workdir: Path, timeout: float) -> Path:
    """``dedloc swarm`` on the config; returns the coordinator's checkpoints directory."""
    result = subprocess.run(
        [sys.executable, "-m", "dedloc", "swarm", "--config", str(config_path), "--peers", str(peers),
         "--workdir", str(workdir), "--timeout", str(timeout)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the swarm failed (exit {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return workdir / "coordinator" / "checkpoints"


def run_single(config: RunConfig, tokenizer_json: str, data_seed: int, eval_steps: list[int], batches) -> list[float]:
    """Synchronous training in one process: each step accumulates the whole global batch."""
    torch.set_num_threads(1)
    training = config.training
    task = build_peer_task(config, tokenizer_json, training.micro_batch_size, data_seed=data_seed)
    model, stream = task.model, iter(task.stream)
    optimizer = optimizer_factory(config.optimizer)(model.parameters())
    initialize_optimizer_state_(optimizer)  # as hivemind does before the first step
    scheduler = scheduler_factory(config.optimizer, training.total_steps)(optimizer)
    micro_steps = math.ceil(training.target_batch_size / training.micro_batch_size)
    losses = []
    for step in range(1, max(eval_steps) + 1):
        model.train()
        for _ in range(micro_steps):
            (model(**next(stream)).loss / micro_steps).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step in eval_steps:
            losses.append(evaluate(model, batches))
    return losses


def fidelity_config(steps: int) -> RunConfig:
    """The embedded default, short: every step checkpointed so both curves have the same points."""
    return default_run_config(
        training={"target_batch_size": 64, "micro_batch_size": 16, "total_steps": steps},
        optimizer={"lr": 3e-3, "warmup_steps": 2},
        checkpoint={"every_steps": 2, "keep_last": steps},
    )


def measure(
    config: RunConfig, peers: int = 2, seeds: int = 3, workdir: Optional[Path] = None, timeout: float = 900.0
) -> FidelityResult:
    workdir = Path(workdir or tempfile.mkdtemp(prefix="dedloc-fidelity-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "run.toml"
    config_path.write_text(config.to_toml(), encoding="utf-8")
    started = time.monotonic()
    checkpoints = run_swarm(config_path, peers, workdir / "swarm", timeout)
    swarm_s = time.monotonic() - started
    tokenizer_json = (workdir / "swarm" / "coordinator" / "tokenizer.json").read_text(encoding="utf-8")
    batches = heldout_set(config, hf_tokenizer(config, tokenizer_json))
    points = {}
    for path in list_checkpoints(checkpoints):
        info = load_checkpoint(path)
        points[info.step] = evaluate(AutoModelForMaskedLM.from_pretrained(path), batches)
    if config.training.total_steps not in points:
        raise RuntimeError(f"the swarm wrote no checkpoint of its last step ({sorted(points)})")
    steps = sorted(points)
    started = time.monotonic()
    single = {seed: run_single(config, tokenizer_json, seed, steps, batches) for seed in range(1, seeds + 1)}
    return FidelityResult(
        steps=steps, swarm=[points[s] for s in steps], single=single, peers=peers, mode=config.mode,
        wall_s={"swarm": round(swarm_s, 1), "single": round(time.monotonic() - started, 1)},
    )


def plot(result: FidelityResult, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for seed, values in sorted(result.single.items()):
        ax.plot(result.steps, values, color="tab:blue", alpha=0.35, linewidth=1)
    ax.plot(result.steps, result.single_mean, color="tab:blue", label="single process (mean of seeds)")
    ax.plot(result.steps, result.swarm, color="tab:orange", marker="o", label=f"swarm ({result.peers} peers)")
    ax.set_xlabel("global step")
    ax.set_ylabel("held-out masked-LM loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16, help="global steps (default: 16)")
    parser.add_argument("--seeds", type=int, default=3, help="single-process data-order seeds (default: 3)")
    parser.add_argument("--config", type=Path, help="run config (default: the embedded default, shortened)")
    parser.add_argument("--mode", choices=("synchronous", "diloco"), help="the swarm's mode (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("fidelity-results"), help="output directory")
    args = parser.parse_args(argv)
    config = load_run_config(args.config) if args.config else fidelity_config(args.steps)
    if args.mode is not None:
        config = config.with_overrides(mode=args.mode)
    result = measure(config, peers=args.peers, seeds=args.seeds, workdir=args.out / "work")
    print(result.table())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fidelity.json").write_text(
        json.dumps(dict(asdict(result), single_mean=result.single_mean, single_std=result.single_std,
                        gap=result.gap, tolerance=result.tolerance, holds=result.holds), indent=2) + "\n"
    )
    if plot(result, args.out / "fidelity.png"):
        print(f"plot: {args.out / 'fidelity.png'}")
    print(f"results: {args.out / 'fidelity.json'}; wall time {result.wall_s}")
    return 0 if result.holds else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
