"""A volunteer's data cache stays under ``--cache-limit-mb``: older runs' datasets go, the current one stays."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dedloc.config import default_run_config
from dedloc.task.build import build_peer_task, prepare_tokenizer
from dedloc.task.cache_limit import PruneResult, dataset_dirs, prune_cache, tree_size
from dedloc.task.corpus import embedded_corpus_path

pytestmark = pytest.mark.timeout(120)


def _dataset(root: Path, name: str, megabytes: float, age: float) -> Path:
    directory = root / name / "default" / "0.0.0" / "abc"
    directory.mkdir(parents=True)
    arrow = directory / "data.arrow"
    arrow.write_bytes(b"\0" * int(megabytes * 2**20))
    (directory / "dataset_info.json").write_text("{}")
    stamp = 1_700_000_000 + age
    for f in directory.iterdir():
        os.utime(f, (stamp, stamp))
    return directory


def test_the_oldest_datasets_go_first_and_the_one_in_use_stays(tmp_path):
    old = _dataset(tmp_path, "old", 3, age=0)
    middle = _dataset(tmp_path, "middle", 3, age=100)
    current = _dataset(tmp_path, "current", 3, age=50)  # older than `middle`, but in use
    (tmp_path / "lock").write_text("")
    result = prune_cache(tmp_path, 5 * 2**20, in_use=[current / "data.arrow"])
    assert not old.exists() and not middle.exists() and current.exists()
    assert result.freed == 2 * (3 * 2**20 + 2) and result.used == tree_size(tmp_path) and not result.kept_over_limit
    # alone over the limit, the dataset in use is kept and the caller is told
    result = prune_cache(tmp_path, 2**20, in_use=[current])
    assert current.exists() and result.kept_over_limit and result.freed == 0
    assert prune_cache(tmp_path / "missing", 1) == PruneResult(0, 0, False, 0)


def test_a_peer_cache_keeps_the_current_run_and_drops_an_earlier_one(tmp_path):
    """Real datasets caches: an earlier run's data and the current run's, tokenized by the peer's code."""
    tokenizer_json = prepare_tokenizer(default_run_config(), tmp_path / "state")
    cache = tmp_path / "cache"
    lines = embedded_corpus_path().read_text().splitlines()
    earlier, current = tmp_path / "earlier.txt", tmp_path / "current.txt"
    earlier.write_text("\n".join(lines[:600]))
    current.write_text("\n".join(lines[600:1200]))
    build_peer_task(default_run_config(data={"source": str(earlier)}), tokenizer_json, 2, data_seed=0, cache_dir=cache)
    task = build_peer_task(default_run_config(data={"source": str(current)}), tokenizer_json, 2, data_seed=0, cache_dir=cache)
    before = dataset_dirs(cache)
    in_use = [Path(f["filename"]).parent for f in task.stream.blocks.cache_files]
    assert len(before) == 2 and in_use, (before, in_use)
    result = prune_cache(cache, 1, in_use)  # a limit only the data in use can exceed
    [remaining] = dataset_dirs(cache)
    assert remaining.resolve() in {d.resolve() for d in in_use} and result.kept_over_limit and result.freed > 0
    assert next(iter(task.stream))["input_ids"].shape == (2, 128)  # the current run still reads its data
