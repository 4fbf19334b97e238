from __future__ import annotations

import json

import pytest
import torch

from dedloc.config import default_run_config
from dedloc.errors import UserInputError
from dedloc.task import data as data_lib
from dedloc.task.build import build_peer_task, prepare_tokenizer
from dedloc.task.corpus import embedded_corpus_path
from dedloc.task.model import build_model, parameter_sketch, sketch_distance
from dedloc.task.optimization import lr_factor
from dedloc.task.tokenizer import SPECIAL_TOKENS, to_hf_tokenizer, tokenizer_sha256


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    config = default_run_config()
    return prepare_tokenizer(config, tmp_path_factory.mktemp("state"))


def test_embedded_corpus_is_real_text():
    text = embedded_corpus_path().read_text(encoding="utf-8")
    assert 200_000 < len(text.encode()) < 5_000_000
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "is", "to"} for w in words) / len(words) > 0.08


def test_tokenizer_is_cached_and_hash_is_stable(tmp_path, tokenizer_json):
    config = default_run_config()
    first = prepare_tokenizer(config, tmp_path)
    assert tokenizer_sha256(first) == tokenizer_sha256(prepare_tokenizer(config, tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    reordered = json.dumps(json.loads(first), indent=1)  # formatting does not change the hash
    assert tokenizer_sha256(reordered) == tokenizer_sha256(first)
    tokenizer = to_hf_tokenizer(first, 128)
    assert all(tokenizer.convert_tokens_to_ids(t) is not None for t in SPECIAL_TOKENS)
    assert 4000 < len(tokenizer) <= 8000


def test_configured_tokenizer_file(tmp_path, tokenizer_json):
    path = tmp_path / "tok.json"
    path.write_text(tokenizer_json)
    config = default_run_config(tokenizer={"path": str(path)})
    assert prepare_tokenizer(config, tmp_path / "state") == tokenizer_json
    path.write_text("{not json")
    with pytest.raises(UserInputError, match="not a valid tokenizer.json"):
        prepare_tokenizer(config, tmp_path / "state")


def test_heldout_split_is_disjoint_and_deterministic():
    section = default_run_config().data
    dataset = data_lib.load_text_dataset(section)
    train = data_lib.split_texts(dataset, section, heldout=False)["text"]
    heldout = data_lib.split_texts(dataset, section, heldout=True)["text"]
    assert heldout and not set(train) & set(heldout)
    assert 0.005 < len(heldout) / (len(train) + len(heldout)) < 0.05


def test_streams_are_seeded_per_peer(tokenizer_json):
    config = default_run_config()

    def first_batches(seed):
        task = build_peer_task(config, tokenizer_json, micro_batch_size=4, data_seed=seed)
        stream = iter(task.stream)
        return [next(stream) for _ in range(3)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    batch = a[0]
    assert batch["input_ids"].shape == (4, config.data.seq_length)
    masked = (batch["labels"] != -100).float().mean().item()
    assert 0.05 < masked < 0.3


def test_model_init_is_identical_for_a_seed(tokenizer_json):
    config = default_run_config()
    tokenizer = to_hf_tokenizer(tokenizer_json, 128)
    a, b = build_model(config.model, tokenizer, 0), build_model(config.model, tokenizer, 0)
    c = build_model(config.model, tokenizer, 1)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.state_dict()["albert.embeddings.word_embeddings.weight"], c.state_dict()["albert.embeddings.word_embeddings.weight"])


def test_parameter_sketch_tells_how_far_apart_two_models_are(tokenizer_json):
    config = default_run_config()
    tokenizer = to_hf_tokenizer(tokenizer_json, 128)
    a, b = build_model(config.model, tokenizer, 0), build_model(config.model, tokenizer, 0)
    assert sketch_distance(parameter_sketch(a), parameter_sketch(b)) == 0.0
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        deltas = [torch.randn(p.shape, generator=generator) for p in b.parameters()]
        scale = 1e-3 * sum(float(p.square().sum()) for p in a.parameters()) ** 0.5 / sum(float(d.square().sum()) for d in deltas) ** 0.5
        for p, d in zip(b.parameters(), deltas):
            p.add_(d * scale)  # exactly 1e-3 apart (relative L2)
    distance = sketch_distance(parameter_sketch(b), parameter_sketch(a))
    assert 3e-4 < distance < 3e-3, distance  # an estimate from 8 random projections


@pytest.mark.parametrize("suffix, writer", [
    (".txt", lambda lines: "\n".join(lines)),
    (".jsonl", lambda lines: "\n".join(json.dumps({"text": line, "id": i}) for i, line in enumerate(lines))),
])
def test_local_sources(tmp_path, suffix, writer, tokenizer_json):
    lines = embedded_corpus_path().read_text().splitlines()[:300]
    path = tmp_path / f"corpus{suffix}"
    path.write_text(writer(lines))
    config = default_run_config(data={"source": str(path)})
    task = build_peer_task(config, tokenizer_json, micro_batch_size=2, data_seed=0)
    assert next(iter(task.stream))["input_ids"].shape == (2, 128)


def test_missing_source_and_column(tmp_path, tokenizer_json):
    with pytest.raises(UserInputError, match="data source not found"):
        data_lib.load_text_dataset(default_run_config(data={"source": str(tmp_path / "absent.txt")}).data)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"body": "some text"}) + "\n")
    with pytest.raises(UserInputError, match="has no column 'text'"):
        data_lib.load_text_dataset(default_run_config(data={"source": str(path)}).data)


def test_schedule_follows_the_global_step():
    section = default_run_config(optimizer={"warmup_steps": 4, "schedule": "linear"}).optimizer
    factors = [lr_factor(step, section, total_steps=20) for step in range(21)]
    assert factors[0] < factors[3] < factors[4] == 1.0
    assert factors[20] == 0.0 and all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_streamed_source(tmp_path, tokenizer_json):
    """The streaming path (as for a large hub dataset) on a local file: filter, tokenize, shuffle buffer."""
    path = tmp_path / "corpus.jsonl"
    lines = embedded_corpus_path().read_text().splitlines()[:400]
    path.write_text("\n".join(json.dumps({"text": line}) for line in lines))
    config = default_run_config(data={"source": str(path), "streaming": True})
    task = build_peer_task(config, tokenizer_json, micro_batch_size=2, data_seed=3)
    stream = iter(task.stream)
    first = [next(stream)["input_ids"] for _ in range(3)]
    assert all(batch.shape == (2, 128) for batch in first)
    again = iter(build_peer_task(config, tokenizer_json, micro_batch_size=2, data_seed=3).stream)
    assert torch.equal(next(again)["input_ids"], first[0])
