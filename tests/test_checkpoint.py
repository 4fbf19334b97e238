from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from dedloc.checkpoint import (
    LATEST,
    CorruptCheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    write_checkpoint,
)
from dedloc.config import default_run_config
from dedloc.task.model import build_model
from dedloc.task.optimization import optimizer_factory
from dedloc.task.tokenizer import to_hf_tokenizer, train_tokenizer

TEXTS = ["the quick brown fox jumps over the lazy dog"] * 50 + ["a swarm of peers trains one model together"] * 50


@pytest.fixture(scope="module")
def parts():
    config = default_run_config()
    tokenizer = to_hf_tokenizer(train_tokenizer(TEXTS, vocab_size=200).to_str(), 128)
    model = build_model(config.model, tokenizer, seed=0)
    optimizer = optimizer_factory(config.optimizer)(model.parameters())
    batch = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    return model, tokenizer, optimizer


def test_written_checkpoint_loads_with_from_pretrained(tmp_path, parts):
    model, tokenizer, optimizer = parts
    path = write_checkpoint(tmp_path, 7, model, tokenizer, optimizer, {"run_id": "r"})
    assert path.name == "step-000007" and (tmp_path / LATEST).read_text().strip() == path.name
    info = load_checkpoint(path)
    assert info.step == 7 and info.trainer_state["run_id"] == "r"
    loaded = AutoModelForMaskedLM.from_pretrained(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert AutoTokenizer.from_pretrained(path)("a swarm")["input_ids"] == tokenizer("a swarm")["input_ids"]


def test_optimizer_state_round_trips_without_pickle(tmp_path, parts):
    model, tokenizer, optimizer = parts
    path = write_checkpoint(tmp_path, 1, model, tokenizer, optimizer, {})
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in path.iterdir())
    restored = optimizer_factory(default_run_config().optimizer)(model.parameters())
    restored.load_state_dict(load_optimizer_state(path, load_checkpoint(path)))
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(restored.state_dict()["state"][index][key], value)
    assert restored.param_groups[0]["betas"] == optimizer.param_groups[0]["betas"]


def test_corrupt_file_is_refused_and_previous_used(tmp_path, parts):
    model, tokenizer, optimizer = parts
    write_checkpoint(tmp_path, 1, model, tokenizer, optimizer, {})
    newer = write_checkpoint(tmp_path, 2, model, tokenizer, optimizer, {})
    with open(newer / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CorruptCheckpointError, match="does not match its sha256"):
        load_checkpoint(newer)
    assert latest_valid_checkpoint(tmp_path).step == 1


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path, parts):
    model, tokenizer, optimizer = parts
    (tmp_path / ".tmp-step-000009-abcd").mkdir()
    half = tmp_path / "step-000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")  # no manifest: never complete
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, model, tokenizer, optimizer, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    assert not (tmp_path / ".tmp-step-000009-abcd").exists()
    assert latest_valid_checkpoint(tmp_path).step == 3


def test_unwritable_root_raises_and_keeps_previous(tmp_path, parts):
    if os.geteuid() == 0:
        # root ignores directory permissions; a file in place of the directory fails for everyone
        root = tmp_path / "blocked"
        root.write_text("not a directory")
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
    model, tokenizer, optimizer = parts
    with pytest.raises(OSError):
        write_checkpoint(root, 1, model, tokenizer, optimizer, {})


def test_manifest_lists_every_file(tmp_path, parts):
    model, tokenizer, optimizer = parts
    path = write_checkpoint(tmp_path, 3, model, tokenizer, optimizer, {})
    manifest = json.loads((path / "MANIFEST.json").read_text())
    on_disk = {p.name for p in path.iterdir()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == on_disk
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.safetensors", "trainer_state.json"} <= on_disk


def test_malformed_manifest_is_refused_not_crashed(tmp_path, parts):
    model, tokenizer, optimizer = parts
    good = write_checkpoint(tmp_path, 1, model, tokenizer, optimizer, {})
    bad = write_checkpoint(tmp_path, 2, model, tokenizer, optimizer, {})
    for content in ('{"files": {"../../etc/passwd": {"size": 1, "sha256": "x"}}}', '{"files": []}', "[1, 2",
                    '{"files": {"config.json": {}}}'):
        (bad / "MANIFEST.json").write_text(content)
        with pytest.raises(CorruptCheckpointError):
            load_checkpoint(bad)
        assert latest_valid_checkpoint(tmp_path).path == good


def test_steps_sort_numerically(tmp_path, parts):
    model, tokenizer, optimizer = parts
    for step in (999_999, 1_000_000):
        write_checkpoint(tmp_path, step, model, tokenizer, None, {}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1000000"]


def test_pinned_checkpoints_survive_pruning(tmp_path, parts):
    model, tokenizer, optimizer = parts
    pinned = write_checkpoint(tmp_path, 1, model, tokenizer, None, {})
    (pinned / "PINNED").touch()
    for step in (2, 3, 4):
        write_checkpoint(tmp_path, step, model, tokenizer, None, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001", "step-000003", "step-000004"]
    assert load_checkpoint(pinned).step == 1  # the marker does not break verification
