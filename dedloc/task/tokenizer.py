"""The run's tokenizer: trained once with `tokenizers`, identical on every peer (checked by sha256).

The coordinator owns the tokenizer: it trains one on the run's training text when the run starts (or
loads the one the config names), keeps it in its state directory and publishes its JSON with the run
config. Peers rebuild it from that JSON and refuse it unless its sha256 matches the published one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dedloc.errors import UserInputError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ALBERT's special tokens on ``texts``."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])  # as ALBERT
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id(CLS), tokenizer.token_to_id(SEP)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1", special_tokens=[(CLS, cls_id), (SEP, sep_id)]
    )
    return tokenizer


def tokenizer_sha256(tokenizer_json: str) -> str:
    """Hash of a tokenizer's canonical JSON (key order and whitespace do not matter)."""
    canonical = json.dumps(json.loads(tokenizer_json), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def read_tokenizer_json(path: str | Path) -> str:
    """Read ``tokenizer.json`` from a file or a Hugging Face tokenizer directory; check it parses."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        text = file.read_text(encoding="utf-8")
        Tokenizer.from_str(text)
    except FileNotFoundError:
        raise UserInputError(f"tokenizer not found: {file}") from None
    except Exception as e:  # the tokenizers library raises plain Exceptions on bad JSON
        raise UserInputError(f"{file}: not a valid tokenizer.json ({e})") from None
    for token in SPECIAL_TOKENS:
        if Tokenizer.from_str(text).token_to_id(token) is None:
            raise UserInputError(f"{file}: the tokenizer lacks the special token {token}")
    return text


def to_hf_tokenizer(tokenizer_json: str, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap the tokenizer for transformers (collators, ``save_pretrained``, ``AutoTokenizer``)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        pad_token=PAD,
        unk_token=UNK,
        cls_token=CLS,
        sep_token=SEP,
        mask_token=MASK,
        model_max_length=model_max_length,
    )
