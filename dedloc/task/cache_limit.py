"""Keeping a volunteer's data cache under the size they allow (``dedloc peer --cache-limit-mb``).

A peer keeps the run's data, tokenized, in its data cache (Hugging Face ``datasets`` arrow files) so a
restart does not tokenize again. Over many runs these add up. After the peer has loaded the current
run's data, :func:`prune_cache` deletes the least recently written datasets of the cache — each a
directory holding arrow files, deleted whole — until the cache fits the limit, never the directories
the current run's data lives in. If the current run's data alone is over the limit, it is kept (the
peer needs it) and the caller says so. Other files (``datasets``' downloads of hub data, lock files)
count toward the size but are not deleted.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)


def tree_size(path: Path) -> int:
    """Bytes in the regular files under ``path`` (0 if it does not exist)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def dataset_dirs(root: Path) -> list[Path]:
    """The directories under ``root`` that hold arrow files (one cached dataset, or a version of one)."""
    return sorted({arrow.parent for arrow in root.rglob("*.arrow") if arrow.is_file()})


@dataclass(frozen=True)
class PruneResult:
    freed: int
    """Bytes deleted."""
    used: int
    """Bytes the cache holds afterwards."""
    kept_over_limit: bool
    """Still over the limit with nothing left to delete: the data in use (kept) and what is not a
    dataset (downloads, locks) are over it."""
    in_use: int = 0
    """Bytes in the directories in use."""


def prune_cache(root: Path, limit_bytes: int, in_use: Iterable[Path] = ()) -> PruneResult:
    """Delete the least recently written dataset directories of ``root`` (see :func:`dataset_dirs`)
    until it holds at most ``limit_bytes``; never one that contains, or is inside, a path of ``in_use``."""
    if not root.is_dir():
        return PruneResult(0, 0, False)
    protected = [Path(p).resolve() for p in in_use]
    in_use_bytes = sum(tree_size(p) for p in protected if p.exists())

    def is_protected(directory: Path) -> bool:
        directory = directory.resolve()
        return any(p == directory or directory in p.parents or p in directory.parents for p in protected)

    used = tree_size(root)
    freed = 0
    candidates = [d for d in dataset_dirs(root) if not is_protected(d)]
    newest = {d: max((f.stat().st_mtime for f in d.rglob("*") if f.is_file()), default=0.0) for d in candidates}
    for directory in sorted(candidates, key=newest.__getitem__):
        if used <= limit_bytes:
            break
        size = tree_size(directory)
        shutil.rmtree(directory, ignore_errors=True)
        logger.info(f"data cache over its limit: deleted {directory} ({size / 2**20:.0f} MB, a dataset no longer in use)")
        used -= size
        freed += size
    return PruneResult(freed, used, used > limit_bytes, in_use_bytes)
