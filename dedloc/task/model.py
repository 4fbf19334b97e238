"""The model: an ALBERT-style masked language model built from a transformers config, random init."""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import AlbertConfig, AlbertForMaskedLM, PreTrainedTokenizerFast

from dedloc.config import ModelSection


def albert_config(model: ModelSection, tokenizer: PreTrainedTokenizerFast) -> AlbertConfig:
    """The transformers config for ``model`` with the tokenizer's vocabulary and special-token ids."""
    return AlbertConfig(
        vocab_size=len(tokenizer),
        embedding_size=model.embedding_size,
        hidden_size=model.hidden_size,
        num_hidden_layers=model.num_hidden_layers,
        num_attention_heads=model.num_attention_heads,
        intermediate_size=model.intermediate_size,
        max_position_embeddings=model.max_position_embeddings,
        hidden_dropout_prob=model.dropout,
        attention_probs_dropout_prob=model.dropout,
        classifier_dropout_prob=model.dropout,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )


def build_model(model: ModelSection, tokenizer: PreTrainedTokenizerFast, seed: int) -> AlbertForMaskedLM:
    """A freshly initialised model. The same ``seed`` gives bit-identical weights on every peer
    (initialisation runs on the CPU), so a swarm starts from one state even before anyone downloads it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AlbertForMaskedLM(albert_config(model, tokenizer))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


SKETCH_DIRECTIONS = 8
SKETCH_SEED = 20240901
_SKETCH_CHUNK = 1 << 20


def parameter_sketch(module: torch.nn.Module) -> tuple[float, ...]:
    """The parameters' L2 norm, then their projections on :data:`SKETCH_DIRECTIONS` fixed random
    directions (standard normal, seeded): :func:`sketch_distance` of two sketches estimates the relative
    L2 distance of the two parameter sets, without sending the parameters. Same architecture required."""
    generator = torch.Generator().manual_seed(SKETCH_SEED)
    norm_sq, projections = 0.0, torch.zeros(SKETCH_DIRECTIONS, dtype=torch.float64)
    with torch.no_grad():
        for p in module.parameters():
            flat = p.detach().to(device="cpu", dtype=torch.float64).flatten()  # same sums on any device
            norm_sq += float(flat.square().sum())
            for start in range(0, flat.numel(), _SKETCH_CHUNK):
                chunk = flat[start:start + _SKETCH_CHUNK]
                directions = torch.randn(chunk.numel(), SKETCH_DIRECTIONS, generator=generator, dtype=torch.float64)
                projections += chunk @ directions
    return (norm_sq ** 0.5, *(float(x) for x in projections))


def sketch_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """About ‖θa − θb‖ / ‖θb‖ for the sketches of two parameter sets (each projection of the difference
    is normal with the difference's norm as its deviation; their root mean square estimates it)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("sketches of different sizes")
    squares = [(x - y) ** 2 for x, y in zip(a[1:], b[1:])]
    return (sum(squares) / len(squares)) ** 0.5 / max(abs(b[0]), 1e-30)


def parameter_fingerprint(module: torch.nn.Module) -> float:
    """One number that summarises the parameters, for telling apart peers whose models differ.

    Peers holding the same parameters print the same value; averaging with lossy compression leaves
    differences in the last digits only. Weighting each tensor by its position keeps two tensors from
    cancelling each other's change.
    """
    with torch.no_grad():
        return float(sum((index + 1) * p.detach().double().sum() + p.detach().double().square().sum()
                         for index, p in enumerate(module.parameters())))
