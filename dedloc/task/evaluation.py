"""Held-out evaluation: the run's held-out documents as masked-LM batches with fixed masks.

Every model evaluated on the same :class:`HeldoutSet` sees exactly the same tokens masked, so the
figures compare across checkpoints, peers and processes. The held-out documents never reach training
(see :func:`dedloc.task.data.is_heldout`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers import DataCollatorForLanguageModeling

from dedloc.config import RunConfig
from dedloc.task import data as data_lib

EVAL_MASK_SEED = 1234


@dataclass
class HeldoutSet:
    batches: list[dict[str, torch.Tensor]]

    @property
    def sequences(self) -> int:
        return sum(len(b["input_ids"]) for b in self.batches)


def heldout_set(
    config: RunConfig, tokenizer, batch_size: int = 16, max_sequences: Optional[int] = None, cache_dir=None
) -> HeldoutSet:
    """The first ``max_sequences`` held-out blocks (all when None) with fixed masks; raises
    ``ValueError`` when the held-out split is empty."""
    texts = data_lib.split_texts(data_lib.load_text_dataset(config.data, cache_dir), config.data, heldout=True)
    blocks = data_lib.tokenize_to_blocks(texts, tokenizer, config.data)
    collator = DataCollatorForLanguageModeling(
        tokenizer=tokenizer, mlm=True, mlm_probability=config.data.mlm_probability, return_tensors="pt",
        seed=EVAL_MASK_SEED,
    )
    examples = [{"input_ids": ids} for ids in blocks["input_ids"][: max_sequences]]
    if not examples:
        raise ValueError("the held-out split is empty; raise [data] heldout_fraction")
    return HeldoutSet([collator(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)])


@torch.no_grad()
def evaluate(model, heldout: HeldoutSet) -> float:
    """Mean masked-LM loss per masked token over the held-out set (the model is left in eval mode)."""
    model.eval()
    total, count = 0.0, 0
    for batch in heldout.batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum")
        total += float(loss)
        count += int((labels != -100).sum())
    return total / max(count, 1)
