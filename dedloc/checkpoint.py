"""Atomic, verifiable checkpoints in Hugging Face format.

A checkpoint is a directory ``<root>/step-NNNNNN/`` holding:

- ``config.json`` + ``model.safetensors`` — load with ``AutoModelForMaskedLM.from_pretrained(dir)``;
- ``tokenizer.json`` + ``tokenizer_config.json`` — load with ``AutoTokenizer.from_pretrained(dir)``;
- ``optimizer.safetensors`` — the optimizer's tensors (no pickle anywhere);
- ``trainer_state.json`` — global step, run id, run config and its hash, tokenizer hash, param groups;
- ``MANIFEST.json`` — every other file with its size and sha256, written last.

The newest ``keep_last`` checkpoints are kept, plus any an organiser pins (``touch DIR/PINNED``).

Contract of :func:`write_checkpoint`: the directory appears under its final name only complete
(written in a temporary directory, every file fsynced, then renamed), and ``<root>/latest`` names it
only after that. A crash at any point leaves either the previous checkpoint or the new one, never a
half-written "latest". :func:`load_checkpoint` verifies the manifest before reading anything else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from dedloc import __version__
from dedloc.errors import UserInputError
from dedloc.faults import fault_point

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
LATEST = "latest"
PINNED = "PINNED"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


class CorruptCheckpointError(UserInputError):
    """A checkpoint whose files do not match its manifest, or that is incomplete."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _json_safe(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer's state dict into tensors (for safetensors) and JSON-able metadata."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = _json_safe(value)
    return tensors, {"param_groups": _json_safe(state_dict["param_groups"]), "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a state dict for ``optimizer.load_state_dict`` from :func:`optimizer_to_tensors` output."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in metadata.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    param_groups = []
    for group in metadata["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        param_groups.append(group)
    return {"state": state, "param_groups": param_groups}


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    trainer_state: dict[str, Any]


def write_checkpoint(
    root: str | Path,
    step: int,
    model,
    tokenizer,
    optimizer: Optional[torch.optim.Optimizer],
    trainer_state: dict[str, Any],
    keep_last: Optional[int] = None,
) -> Path:
    """Write a complete checkpoint for ``step`` under ``root`` and point ``latest`` at it.

    ``model`` is a transformers model, ``tokenizer`` a transformers tokenizer. With ``keep_last``,
    older complete checkpoints beyond that many are removed afterwards. Raises ``OSError`` if the
    directory cannot be written; the previous checkpoint is untouched in that case.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        state = dict(trainer_state, global_step=step, saved_at=time.time(), dedloc_version=__version__)
        if optimizer is not None:
            tensors, metadata = optimizer_to_tensors(optimizer)
            save_file(tensors, str(tmp / OPTIMIZER_FILE))
            state["optimizer"] = metadata
        _write_json(tmp / TRAINER_STATE, state)
        fault_point("checkpoint-before-manifest")  # the files are written, the manifest is not
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in files:
            _fsync_file(path)
        manifest = {
            "step": step,
            "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        }
        _write_json(tmp / MANIFEST, manifest)
        _fsync_file(tmp / MANIFEST)
        _fsync_dir(tmp)
        final = root / name
        old = None
        if final.exists():  # a re-save of the same step: move the old one aside (a TMP name, so a
            old = root / f"{TMP_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}"  # crash leaves it ignored)
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(root, name)
    if keep_last is not None:
        prune(root, keep_last)
    return final


def _point_latest(root: Path, name: str) -> None:
    tmp = root / f"{TMP_PREFIX}{LATEST}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(name + "\n", encoding="utf-8")
    _fsync_file(tmp)
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", TRAINER_STATE)


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check every file against ``MANIFEST.json``; return the trainer state. Raises
    :class:`CorruptCheckpointError` naming the first problem (never another exception)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint {path} is incomplete: it has no {MANIFEST}") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptCheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable") from None
    for required in REQUIRED_FILES:
        if required not in files:
            raise CorruptCheckpointError(f"checkpoint {path}: {required} is missing from {MANIFEST}")
    for relative, expected in files.items():
        parts = Path(relative).parts
        if Path(relative).is_absolute() or ".." in parts or not parts:
            raise CorruptCheckpointError(f"checkpoint {path}: {MANIFEST} names a file outside it: {relative!r}")
        file = path / relative
        try:
            size, digest = int(expected["size"]), str(expected["sha256"])
            matches = file.is_file() and file.stat().st_size == size and _sha256(file) == digest
        except (OSError, KeyError, TypeError, ValueError):
            matches = False
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint {path}: {relative} is missing")
        if not matches:
            raise CorruptCheckpointError(f"checkpoint {path}: {relative} does not match its sha256 in {MANIFEST}")
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptCheckpointError(f"checkpoint {path}: {TRAINER_STATE} is unreadable") from None
    return state


def load_checkpoint(path: str | Path) -> CheckpointInfo:
    """Verify a checkpoint and return its description (load weights with ``from_pretrained(path)``)."""
    path = Path(path)
    state = verify_checkpoint(path)
    return CheckpointInfo(path=path, step=int(state["global_step"]), trainer_state=state)


def load_optimizer_state(path: str | Path, info: CheckpointInfo) -> Optional[dict[str, Any]]:
    """The optimizer state dict stored in a verified checkpoint, or None if it has none."""
    metadata = info.trainer_state.get("optimizer")
    file = Path(path) / OPTIMIZER_FILE
    if metadata is None or not file.is_file():
        return None
    return optimizer_from_tensors(load_file(str(file)), metadata)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete-looking checkpoint directories under ``root``, oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit() and (p / MANIFEST).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_valid_checkpoint(root: str | Path) -> Optional[CheckpointInfo]:
    """The newest checkpoint under ``root`` that verifies; corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(path)
        except CorruptCheckpointError as e:
            logger.warning(f"{e}; trying an older checkpoint")
    return None


def is_pinned(path: Path) -> bool:
    """An organiser keeps a checkpoint forever by creating a file named ``PINNED`` in it."""
    return (path / PINNED).exists()


def prune(root: str | Path, keep_last: int) -> None:
    """Remove all but the newest ``keep_last`` checkpoints (pinned ones stay, and do not count), and
    leftovers of interrupted writes."""
    root = Path(root)
    unpinned = [path for path in list_checkpoints(root) if not is_pinned(path)]
    for path in unpinned[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
