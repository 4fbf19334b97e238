"""Training data: text from a `datasets` source → fixed-length token blocks → masked-LM micro-batches.

Sources (``[data] source``): the embedded corpus, local files (text, JSON lines, CSV, Parquet, Arrow) or
a directory written by ``Dataset.save_to_disk``, or ``hub:NAME`` (optionally streamed) when the user
has internet. A fixed fraction of documents, chosen by a hash of their text, is held out of training
so every process agrees on the evaluation set without talking to each other.

Each peer reads its own shuffled stream: the order is seeded by the run seed and the peer's identity,
and reshuffled every pass over the data.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from dedloc.config import DataSection
from dedloc.errors import UserInputError
from dedloc.task.corpus import embedded_corpus_path

logger = logging.getLogger(__name__)

_FORMAT_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
HUB_PREFIX = "hub:"


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out set (a pure function of its text)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def describe_source(section: DataSection) -> str:
    return "the embedded corpus" if section.source == "embedded" else section.source


def _local_files(source: str, fmt: str) -> tuple[str, list[str]]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _FORMAT_BY_SUFFIX)
    elif any(ch in source for ch in "*?["):
        files = sorted(f for f in glob.glob(os.path.expanduser(source), recursive=True) if os.path.isfile(f))
    elif path.is_file():
        files = [str(path)]
    else:
        raise UserInputError(f"data source not found: {source}")
    if not files:
        raise UserInputError(f"data source {source} holds no readable files ({', '.join(_FORMAT_BY_SUFFIX)})")
    if fmt == "auto":
        kinds = {_FORMAT_BY_SUFFIX.get(Path(f).suffix.lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise UserInputError(
                f"cannot tell the format of data source {source} from its file names; set [data] format"
            )
        fmt = kinds.pop()
    return fmt, files


@contextlib.contextmanager
def _offline(datasets_module) -> Iterator[None]:
    """Keep ``datasets`` off the network while it loads local files: unless told it is offline, it
    first asks the hub about its packaged loaders, and where name resolution times out (a machine
    without DNS) that costs 10 s at every start."""
    import huggingface_hub.constants as hub_constants

    flags = [(datasets_module.config, "HF_HUB_OFFLINE"), (datasets_module.config, "HF_DATASETS_OFFLINE"),
             (hub_constants, "HF_HUB_OFFLINE")]
    saved = [(module, name, getattr(module, name)) for module, name in flags if hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def load_text_dataset(section: DataSection, cache_dir: str | Path | None = None):
    """Load the raw text dataset (a ``datasets.Dataset``, or an ``IterableDataset`` when streaming).

    Raises :class:`UserInputError` for a missing path, an unknown format or a missing text column.
    """
    import datasets

    cache_dir = str(cache_dir) if cache_dir is not None else None
    source = section.source
    try:
        if source == "embedded":
            with _offline(datasets):
                dataset = datasets.load_dataset(
                    "text", data_files=str(embedded_corpus_path()), split="train", cache_dir=cache_dir
                )
        elif source.startswith(HUB_PREFIX):
            dataset = datasets.load_dataset(
                source[len(HUB_PREFIX) :],
                section.hub_config,
                split=section.split,
                streaming=section.streaming,
                cache_dir=cache_dir,
            )
        elif Path(source).expanduser().is_dir() and (Path(source).expanduser() / "dataset_info.json").is_file():
            dataset = datasets.load_from_disk(str(Path(source).expanduser()))
        else:
            fmt, files = _local_files(source, section.format)
            with _offline(datasets):
                dataset = datasets.load_dataset(
                    fmt, data_files=files, split="train", cache_dir=cache_dir, streaming=section.streaming
                )
    except UserInputError:
        raise
    except Exception as e:  # datasets raises many kinds: missing files, bad formats, no network, no permission
        hint = " (a hub dataset needs internet access)" if source.startswith(HUB_PREFIX) else ""
        raise UserInputError(f"cannot load data source {source}: {type(e).__name__}: {e}{hint}") from None
    columns = dataset.column_names
    if columns is not None and section.text_field not in columns:
        raise UserInputError(
            f"data source {describe_source(section)} has no column '{section.text_field}' "
            f"(columns: {', '.join(columns)}); set [data] text_field"
        )
    return dataset


def split_texts(dataset, section: DataSection, heldout: bool):
    """Keep non-empty documents of the training split (``heldout=False``) or of the held-out split."""
    field, fraction = section.text_field, section.heldout_fraction

    def keep(example) -> bool:
        text = example[field]
        return isinstance(text, str) and bool(text.strip()) and is_heldout(text, fraction) == heldout

    return dataset.filter(keep)


def iter_texts(dataset, section: DataSection, limit_bytes: int | None = None) -> Iterator[str]:
    """Yield the texts of a dataset (e.g. to train a tokenizer), up to about ``limit_bytes``."""
    seen = 0
    for example in dataset:
        text = example[section.text_field]
        yield text
        seen += len(text)
        if limit_bytes is not None and seen >= limit_bytes:
            return


def _block_builder(tokenizer: PreTrainedTokenizerFast, section: DataSection, field: str):
    body = section.seq_length - 2  # room for [CLS] ... [SEP]
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id

    def build(batch):
        encoded = tokenizer(batch[field], add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for ids in encoded:
            stream.extend(ids)
            stream.append(sep_id)  # document boundary
        blocks = [[cls_id] + stream[i : i + body] + [sep_id] for i in range(0, len(stream) - body + 1, body)]
        return {"input_ids": blocks}

    return build


def tokenize_to_blocks(texts, tokenizer: PreTrainedTokenizerFast, section: DataSection):
    """Tokenize documents and cut the concatenated token stream into ``seq_length`` blocks."""
    texts = texts.select_columns([section.text_field])
    return texts.map(
        _block_builder(tokenizer, section, section.text_field),
        batched=True,
        batch_size=256,
        remove_columns=[section.text_field],
    )


@dataclass
class MicroBatchStream:
    """Endless shuffled micro-batches of masked-LM examples for one peer.

    ``seed`` fixes both the order of blocks and the masks; two streams with the same seed yield the
    same batches. A map-style dataset is reshuffled on every pass; a streamed one uses a shuffle buffer.
    """

    blocks: object
    tokenizer: PreTrainedTokenizerFast
    section: DataSection
    micro_batch_size: int
    seed: int

    def __post_init__(self) -> None:
        self.collator = DataCollatorForLanguageModeling(
            tokenizer=self.tokenizer, mlm=True, mlm_probability=self.section.mlm_probability,
            return_tensors="pt",
            seed=self.seed,
        )
        if hasattr(self.blocks, "__len__") and len(self.blocks) == 0:
            raise UserInputError(
                f"data source {describe_source(self.section)} is too small: not one block of "
                f"{self.section.seq_length} tokens"
            )

    def _examples(self) -> Iterator[list[int]]:
        epoch = 0
        while True:
            if hasattr(self.blocks, "__len__"):
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
                for index in order:
                    yield self.blocks[int(index)]["input_ids"]
            else:
                produced = False
                for example in self.blocks.shuffle(seed=self.seed + epoch, buffer_size=10_000):
                    produced = True
                    yield example["input_ids"]
                if not produced:
                    raise UserInputError(
                        f"data source {describe_source(self.section)} yielded no block of {self.section.seq_length} tokens"
                    )
            epoch += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batch: list[dict] = []
        for ids in self._examples():
            batch.append({"input_ids": ids})
            if len(batch) == self.micro_batch_size:
                yield self.collator(batch)
                batch = []


def peer_data_seed(run_seed: int, peer_id: bytes) -> int:
    """Seed of one peer's data order: differs between peers, stable for one identity."""
    digest = hashlib.blake2b(peer_id + run_seed.to_bytes(8, "big"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2
