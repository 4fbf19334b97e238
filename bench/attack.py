"""Attack benchmark: one scripted bad volunteer among the peers, with dedloc's defences on and off.

    python -m bench.attack [--attacks sign-flip,random,nan,weight] [--peers 4] [--steps 16] [--out attack-results]
                           [--set SECTION.KEY=VALUE ...]

Runs a small swarm (coordinator and ``--peers`` peers as real processes on loopback) once without an
attacker (the clean run), then, for every attack, twice with peer-1 attacking: with the defences on
(``aggregation = "centered_clip"`` plus the reducer's checks on parts and weights, see
docs/security.md) and off (hivemind's own reducer: any part, any claimed weight, the plain mean).
The clean run is the default run (the checked mean). The attacks (``dedloc.faults.ATTACKS``): sign flip × 1000, a random direction with 1000 × the
gradient's norm, NaN gradients, an honest gradient with a 1000 × claimed weight; and, as a reducer
(``reducer-nan``, ``reducer-scale``, not in the default list), NaN or 1000 × the true average in the
answers it sends back for its share of every round.

Prints one row per run: the coordinator's held-out loss at the last step, its ratio to the clean
run's, the steps the run finished and the attacker's gradient rounds (begun with samples of its own,
not failed: the steps its attack could reach). Writes ``attack.json``. The target: with the defences on, within
5 % of the clean run; off, measurably worse. Exits 1 when a defended run misses that target.
``--set`` changes the run config of every run, the clean one included (e.g.
``--set averaging.powersgd_rank=4``: the attacks against PowerSGD's factors).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dedloc.config import default_run_config
from dedloc.faults import ATTACKS
from dedloc.lab.network import LoopbackNetwork
from dedloc.lab.swarm import TINY_MODEL, LabSwarm

from bench.throughput import parse_override

TOLERANCE = 0.05
RUN_TIMEOUT = 600.0


@dataclass
class AttackRun:
    label: str
    attack: Optional[str]
    defences: Optional[bool]
    """True: CenteredClip and the reducer's checks; False: hivemind's reducer; None: the default run (checked mean)."""
    heldout_loss: Optional[float]
    final_step: int
    seconds: float
    ratio_to_clean: Optional[float] = None
    attacker_rounds: Optional[int] = None
    """Gradient rounds of the attacker (peer-1) that did not fail: how many of the run's steps its
    gradients could reach (None: no attacker)."""


def run_config(path: Path, steps: int, peers: int, defences: Optional[bool],
               overrides: tuple[tuple[str, str, object], ...] = ()) -> Path:
    sections: dict[str, dict] = {name: dict(values) for name, values in TINY_MODEL.items()}
    sections["training"] = {"target_batch_size": 64, "micro_batch_size": 16, "total_steps": steps, "min_peers": peers,
                            "wait_for_peers_timeout": 120.0}
    sections["optimizer"] = {"lr": 3e-3, "warmup_steps": 1}
    sections["checkpoint"] = {"every_steps": steps, "keep_last": 1}
    sections["averaging"] = {"aggregation": "centered_clip" if defences else "mean"}
    for section, key, value in overrides:
        sections.setdefault(section, {})[key] = value
    config = default_run_config(**sections)
    path.write_text(config.to_toml(), encoding="utf-8")
    return path


def run_once(workdir: Path, label: str, attack: Optional[str], defences: Optional[bool], peers: int, steps: int,
             overrides: tuple[tuple[str, str, object], ...] = ()) -> AttackRun:
    """One swarm to its last step; peer-1 runs ``attack`` (``attack-…``) when given."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = run_config(workdir / "run.toml", steps, peers, defences, overrides)
    swarm = LabSwarm(LoopbackNetwork(), workdir / "lab", config)
    started = time.monotonic()
    try:
        swarm.start_coordinator(extra=("--no-dashboard",))
        for index in range(1, peers + 1):
            faults = [attack] if attack and index == 1 else []
            if defences is False:
                faults.append("defences-off")
            swarm.start_peer(f"peer-{index}", env={"DEDLOC_FAULTS": ",".join(faults)} if faults else None)
        deadline = time.monotonic() + RUN_TIMEOUT
        while swarm.coordinator.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
    finally:
        swarm.close()
    log = swarm.coordinator.log_text()
    losses = re.findall(r"held-out loss at step (\d+): (\S+)", log)
    steps_done = [int(m) for m in re.findall(r"step=(\d+) loss=", log)]
    loss = float(losses[-1][1]) if losses and int(losses[-1][0]) == steps else None
    rounds = attacker_rounds(swarm.peers["peer-1"].log_text()) if attack else None
    return AttackRun(label, attack, defences, loss, max(steps_done, default=0), time.monotonic() - started,
                     attacker_rounds=rounds)


def attacker_rounds(log: str) -> int:
    """The gradient rounds a peer's log shows it began with samples of its own (a round's weight is its
    samples: with none, what it sends weighs nothing), less those it logged as failed."""
    begun = sum(int(samples) > 0 for samples in re.findall(r"averaging gradients \(round \d+, (\d+) local samples", log))
    return max(0, begun - log.count("averaging with the others failed"))


def run_matrix(out: Path, attacks: list[str], peers: int, steps: int, echo=print,
               overrides: tuple[tuple[str, str, object], ...] = ()) -> list[AttackRun]:
    runs = [run_once(out / "clean", "clean (no attacker, default run)", None, None, peers, steps, overrides)]
    echo(describe(runs[-1]))
    for attack in attacks:
        for defences in (True, False):
            label = f"{attack.removeprefix('attack-')}, defences {'on' if defences else 'off'}"
            run = run_once(out / label.replace(", ", "-").replace(" ", "-"), label, attack, defences, peers, steps,
                           overrides)
            runs.append(run)
            echo(describe(run))
    clean = runs[0].heldout_loss
    for run in runs:
        if clean and run.heldout_loss is not None and math.isfinite(run.heldout_loss):
            run.ratio_to_clean = run.heldout_loss / clean
    return runs


def describe(run: AttackRun) -> str:
    loss = "none" if run.heldout_loss is None else f"{run.heldout_loss:.4f}"
    rounds = "" if run.attacker_rounds is None else f", the attacker in {run.attacker_rounds} gradient rounds"
    return f"{run.label}: held-out loss {loss} at step {run.final_step} ({run.seconds:.0f} s{rounds})"


def table(runs: list[AttackRun]) -> str:
    lines = ["| run | held-out loss at the last step | × clean | steps done | attacker's rounds |", "|---|---|---|---|---|"]
    for run in runs:
        loss = "— (no final checkpoint)" if run.heldout_loss is None else f"{run.heldout_loss:.4f}"
        ratio = "—" if run.ratio_to_clean is None else f"{run.ratio_to_clean:.3f}"
        rounds = "—" if run.attacker_rounds is None else str(run.attacker_rounds)
        lines.append(f"| {run.label} | {loss} | {ratio} | {run.final_step} | {rounds} |")
    return "\n".join(lines)


def defended_within_target(runs: list[AttackRun]) -> list[str]:
    """The defended runs that missed the target (empty: all within ``TOLERANCE`` of the clean run)."""
    return [run.label for run in runs if run.defences and run.attack
            and (run.ratio_to_clean is None or run.ratio_to_clean > 1 + TOLERANCE)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", default="sign-flip,random,nan,weight",
                        help="comma-separated, from: " + ", ".join(a.removeprefix("attack-") for a in ATTACKS))
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("attack-results"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change every run's config (repeatable), e.g. averaging.powersgd_rank=4")
    args = parser.parse_args(argv)
    attacks = [f"attack-{name.strip()}" for name in args.attacks.split(",") if name.strip()]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or args.peers < 3 or args.steps < 2:
        parser.error(f"unknown attacks {unknown}" if unknown else "--peers must be ≥ 3 and --steps ≥ 2")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        overrides = tuple(parse_override(text) for text in args.overrides)
        run_config(args.out / "run.toml", args.steps, args.peers, True, overrides)  # a bad --set fails here, not in a peer
    except Exception as error:
        parser.error(f"--set: {error}")
    runs = run_matrix(args.out, attacks, args.peers, args.steps, overrides=overrides)
    print(table(runs))
    (args.out / "attack.json").write_text(json.dumps([asdict(run) for run in runs], indent=2) + "\n")
    missed = defended_within_target(runs)
    if missed:
        print(f"defended runs beyond {TOLERANCE:.0%} of the clean run: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
