"""``dedloc export``: a verified checkpoint → a plain Hugging Face model directory.

The result holds the model (config + safetensors), the tokenizer and a README (model card) with the
run's figures; ``AutoModelForMaskedLM.from_pretrained(out)`` and ``push_to_hub`` take it as it is.
Optimizer state and dedloc's own bookkeeping stay behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from dedloc.checkpoint import (
    MANIFEST,
    OPTIMIZER_FILE,
    TRAINER_STATE,
    CheckpointInfo,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from dedloc.errors import UserInputError

LEFT_BEHIND = {MANIFEST, OPTIMIZER_FILE, TRAINER_STATE}


def find_checkpoint(path: Path) -> CheckpointInfo:
    """``path`` may be a checkpoint, a checkpoints directory, or a coordinator's state directory."""
    if not path.exists():
        raise UserInputError(f"no such checkpoint or directory: {path}")
    if (path / MANIFEST).is_file():
        return load_checkpoint(path)
    for root in (path, path / "checkpoints"):
        if list_checkpoints(root):
            found = latest_valid_checkpoint(root)
            if found is None:
                raise UserInputError(f"no checkpoint in {root} verifies")
            return found
    raise UserInputError(f"{path} holds no dedloc checkpoint")


def _history(info: CheckpointInfo) -> list[dict]:
    for candidate in (info.path.parent.parent / "history.jsonl", info.path.parent / "history.jsonl"):
        if candidate.is_file():
            records = []
            for line in candidate.read_text(encoding="utf-8").splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
            return [r for r in records if isinstance(r, dict) and r.get("step", 0) <= info.step]
    return []


def model_card(info: CheckpointInfo) -> str:
    state = info.trainer_state
    config = state.get("run_config") or {}
    model = config.get("model", {})
    training = config.get("training", {})
    history = _history(info)
    losses = [r["loss"] for r in history if r.get("loss") is not None]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: fill-mask",
        "tags: [dedloc, collaborative-training, albert]",
        "---",
        f"# {state.get('run_id', 'dedloc run')}",
        "",
        "An ALBERT-style masked language model pretrained collaboratively by volunteers' peers with "
        "dedloc (gradients accumulated across the swarm up to a large global batch, "
        "averaged over a hivemind DHT, one synchronous optimizer step).",
        "",
        "| figure | value |",
        "|---|---|",
        f"| global steps | {info.step} |",
    ]
    if training:
        lines.append(f"| global batch (samples per step) | {training.get('target_batch_size')} |")
        lines.append(f"| samples seen (steps × batch) | {info.step * int(training.get('target_batch_size', 0))} |")
    if model:
        lines.append(
            f"| model | hidden {model.get('hidden_size')}, {model.get('num_hidden_layers')} shared layers, "
            f"embedding {model.get('embedding_size')} |"
        )
    if losses:
        lines.append(f"| training loss, first → last step | {losses[0]:.3f} → {losses[-1]:.3f} |")
    if history:
        lines.append(f"| most peers at once | {max(r.get('peers', 0) for r in history)} |")
    lines += [
        f"| run config sha256 | `{state.get('config_sha256', '?')}` |",
        f"| tokenizer sha256 | `{state.get('tokenizer_sha256', '?')}` |",
        "",
        "```python",
        "from transformers import AutoModelForMaskedLM, AutoTokenizer",
        'model = AutoModelForMaskedLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
    ]
    return "\n".join(lines)


def export_checkpoint(source: Path, out: Path, overwrite: bool = False) -> CheckpointInfo:
    """Export the (verified) checkpoint found at ``source`` into ``out``; returns what was exported."""
    info = find_checkpoint(source)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserInputError(f"{out} is not empty; choose a new directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for file in sorted(info.path.iterdir()):
            if file.is_file() and file.name not in LEFT_BEHIND:
                shutil.copy2(file, out / file.name)
        (out / "README.md").write_text(model_card(info), encoding="utf-8")
    except OSError as e:
        raise UserInputError(f"cannot write {out}: {e.strerror or e}") from None
    return info
