"""Assembling the task from a run config: the coordinator's tokenizer, and a peer's model and data.

The coordinator calls :func:`prepare_tokenizer` once per run (the result is cached in its state
directory, so a restarted coordinator keeps the same tokenizer and hash). Peers call
:func:`build_peer_task` with the tokenizer they received.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from transformers import AlbertForMaskedLM, PreTrainedTokenizerFast

from dedloc.config import DataSection, RunConfig
from dedloc.task import data as data_lib
from dedloc.task.model import build_model
from dedloc.task.tokenizer import read_tokenizer_json, to_hf_tokenizer, tokenizer_sha256, train_tokenizer

logger = logging.getLogger(__name__)

TOKENIZER_TRAINING_BYTES = 64 * 1024 * 1024  # enough text for a BPE vocabulary; bounds time on big sources


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare_tokenizer(config: RunConfig, state_dir: Path, cache_dir: Optional[Path] = None) -> str:
    """The run's tokenizer JSON: the configured file, else the one trained earlier for this run,
    else a new one trained on the run's training split (then saved to ``state_dir``)."""
    if config.tokenizer.path is not None:
        return read_tokenizer_json(config.tokenizer.path)
    cached = state_dir / "tokenizer.json"
    recipe_file = state_dir / "tokenizer.recipe.json"
    recipe = {"data": config.data.model_dump(mode="json"), "tokenizer": config.tokenizer.model_dump(mode="json")}
    if cached.is_file() and recipe_file.is_file():
        try:
            if json.loads(recipe_file.read_text(encoding="utf-8")) == recipe:
                return read_tokenizer_json(cached)
        except ValueError:
            pass
        logger.warning(f"{cached} was trained for another data or tokenizer config: training a new one")
    logger.info(f"training a {config.tokenizer.vocab_size}-token BPE tokenizer on {data_lib.describe_source(config.data)}")
    texts = data_lib.split_texts(data_lib.load_text_dataset(config.data, cache_dir), config.data, heldout=False)
    tokenizer = train_tokenizer(
        data_lib.iter_texts(texts, config.data, limit_bytes=TOKENIZER_TRAINING_BYTES),
        vocab_size=config.tokenizer.vocab_size,
        min_frequency=config.tokenizer.min_frequency,
    )
    text = tokenizer.to_str()
    state_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(cached, text)
    _atomic_write_text(recipe_file, json.dumps(recipe, sort_keys=True))
    logger.info(f"tokenizer ready: {tokenizer.get_vocab_size()} tokens, sha256 {tokenizer_sha256(text)[:12]}")
    return text


def hf_tokenizer(config: RunConfig, tokenizer_json: str) -> PreTrainedTokenizerFast:
    return to_hf_tokenizer(tokenizer_json, model_max_length=config.model.max_position_embeddings)


@dataclass
class PeerTask:
    """Everything a peer trains with."""

    tokenizer: PreTrainedTokenizerFast
    model: AlbertForMaskedLM
    stream: data_lib.MicroBatchStream


def build_peer_task(
    config: RunConfig,
    tokenizer_json: str,
    micro_batch_size: int,
    data_seed: int,
    data_override: Optional[DataSection] = None,
    cache_dir: Optional[Path] = None,
) -> PeerTask:
    """Model (seeded, identical on every peer), tokenizer and this peer's shuffled micro-batch stream."""
    data = data_override or config.data
    tokenizer = hf_tokenizer(config, tokenizer_json)
    texts = data_lib.split_texts(data_lib.load_text_dataset(data, cache_dir), data, heldout=False)
    blocks = data_lib.tokenize_to_blocks(texts, tokenizer, data)
    stream = data_lib.MicroBatchStream(blocks, tokenizer, data, micro_batch_size, seed=data_seed)
    model = build_model(config.model, tokenizer, seed=config.training.seed)
    return PeerTask(tokenizer=tokenizer, model=model, stream=stream)
