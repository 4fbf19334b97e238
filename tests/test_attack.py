"""The attack benchmark's short version, as CI runs it: 4 peers, one of them flipping its gradient's
sign × 1000, with dedloc's defences on and off, against a clean run (``python -m bench.attack``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8  # a run's start-up, not its steps, is most of its time


@pytest.mark.swarm
@pytest.mark.timeout(1200)
def test_a_sign_flipping_peer_is_held_off_by_the_defences(tmp_path):
    out = tmp_path / "attack"
    done = subprocess.run(
        [sys.executable, "-m", "bench.attack", "--attacks", "sign-flip", "--peers", "4", "--steps", str(STEPS), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=1150,
    )
    print(done.stdout)
    runs = {run["label"]: run for run in json.loads((out / "attack.json").read_text())}
    clean, on, off = (runs["clean (no attacker, default run)"], runs["sign-flip, defences on"],
                      runs["sign-flip, defences off"])
    assert clean["heldout_loss"] is not None and clean["final_step"] == STEPS, clean
    # defended: the run finishes, within 5 % of the clean run's held-out loss (the bench's own check)
    assert on["heldout_loss"] is not None and on["ratio_to_clean"] <= 1.05, on
    assert done.returncode == 0, done.stderr[-3000:]
    # undefended: the same attack does measurable harm (or the run never reaches a final checkpoint). In
    # 12 steps the clean run learns ~0.4 nats (7.6 → 7.2); undefended, the attack undid most of that
    # (0.31 … 0.85 above clean in three runs), while runs with defences landed 0.03 … 0.15 above it.
    # In 8 steps (two runs): clean 7.3352 / 7.3373, defended 7.3797 / 7.3576, undefended 7.9078 / 7.8665
    # (0.53–0.57 above clean). Harm is judged against both: more than 0.1 nats
    # (ten times the clean runs' spread) above the clean run and above the defended one
    harmed = off["heldout_loss"] is None or not math.isfinite(off["heldout_loss"]) or (
        off["heldout_loss"] - clean["heldout_loss"] > 0.1 and off["heldout_loss"] - on["heldout_loss"] > 0.1)
    assert harmed, off
