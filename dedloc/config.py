"""Run configuration: one TOML file describes a run.

Every section is a small typed model with a docstring under each field; unknown keys and bad values
are rejected at load time with an error that names the file and the key. The coordinator loads the
file and publishes the validated configuration to the swarm (see :mod:`dedloc.swarm.records`); a peer
needs only the join address and receives the same object.

Contract: :func:`load_run_config` either returns a fully validated :class:`RunConfig` or raises
:class:`~dedloc.errors.UserInputError` with a message fit to print.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dedloc.errors import UserInputError

Compression = Literal["none", "fp16", "scaled_fp16", "uint8"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, strict=False)


class ModelSection(_Section):
    """An ALBERT-style masked language model built from a transformers ``AlbertConfig`` (random init)."""

    architecture: Literal["albert"] = "albert"
    """Model family; ALBERT shares its layers, which keeps the parameters a swarm averages small."""
    embedding_size: int = Field(64, gt=0)
    """Width of the factorised token embeddings."""
    hidden_size: int = Field(128, gt=0)
    """Width of the transformer layers."""
    num_hidden_layers: int = Field(2, gt=0)
    """How many times the shared layer is applied."""
    num_attention_heads: int = Field(2, gt=0)
    """Attention heads; must divide ``hidden_size``."""
    intermediate_size: int = Field(512, gt=0)
    """Width of the feed-forward block."""
    max_position_embeddings: int = Field(128, gt=0)
    """Longest sequence the model accepts; at least ``data.seq_length``."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout for hidden states and attention probabilities."""

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelSection":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        return self


class TokenizerSection(_Section):
    """The tokenizer every peer uses; its sha256 travels with the published run config."""

    path: Optional[str] = None
    """A ``tokenizer.json`` file or a Hugging Face tokenizer directory on the coordinator's machine.
    When unset, the coordinator trains a BPE tokenizer on the run's training data when the run starts."""
    vocab_size: int = Field(4000, ge=64, le=1_000_000)
    """Vocabulary size of a tokenizer the coordinator trains."""
    min_frequency: int = Field(2, ge=1)
    """A pair must occur this often to be merged when training the tokenizer."""


class DataSection(_Section):
    """Where the training text comes from and how it becomes masked-LM examples."""

    source: str = "embedded"
    """``"embedded"`` (the corpus shipped with dedloc), a local file, directory or glob (text, JSON lines,
    CSV, Parquet or Arrow), or ``"hub:NAME"`` for a Hugging Face hub dataset (needs internet)."""
    format: Literal["auto", "text", "json", "csv", "parquet", "arrow"] = "auto"
    """File format of a local source; ``auto`` goes by the file extension."""
    text_field: str = "text"
    """Column that holds the text (JSON, CSV, Parquet, Arrow, hub datasets)."""
    hub_config: Optional[str] = None
    """Configuration name of a hub dataset, if it has several."""
    split: str = "train"
    """Split of a hub dataset to train on."""
    streaming: bool = False
    """Read the source as a stream (no full download or cache: for large hub datasets or files)."""
    seq_length: int = Field(128, ge=8, le=8192)
    """Tokens per training example."""
    mlm_probability: float = Field(0.15, gt=0.0, lt=1.0)
    """Fraction of tokens masked for the masked-language-model objective."""
    heldout_fraction: float = Field(0.02, ge=0.0, lt=0.5)
    """Fraction of documents kept out of training (chosen by a hash of the text) for evaluation."""

    @field_validator("source")
    @classmethod
    def _source_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


class TrainingSection(_Section):
    """How much the swarm trains and how samples are counted."""

    target_batch_size: int = Field(64, gt=0)
    """Samples the whole swarm accumulates per global step (the large batch of one optimizer step)."""
    micro_batch_size: int = Field(8, gt=0)
    """Samples per forward/backward pass on one peer; a peer may override it (``--micro-batch``)."""
    total_steps: int = Field(1000, gt=0)
    """Global steps in the run; the learning-rate schedule spans them."""
    seed: int = Field(0, ge=0)
    """Seed of the initial weights (identical on every peer) and base of each peer's data-order seed."""
    min_peers: int = Field(1, gt=0)
    """A peer waits until this many peers are online before it contributes its first samples."""
    wait_for_peers_timeout: float = Field(60.0, gt=0)
    """Seconds a peer waits for ``min_peers``; after that it trains with whoever is there."""


class OptimizerSection(_Section):
    """The optimizer every peer applies to the averaged gradients, and its schedule."""

    name: Literal["adamw"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(5, ge=0)
    """Global steps of linear warm-up from 0 to ``lr``."""
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Shape of the decay after warm-up, reaching 0 at ``training.total_steps``
    (``constant`` keeps ``lr``). It follows the global step, so it is right after any restart."""
    clip_grad_norm: float = Field(1.0, ge=0)
    """Clip the averaged gradient to this norm before the step; 0 disables clipping."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError("both betas must be in [0, 1)")
        return value


class AveragingSection(_Section):
    """How peers find each other and average (hivemind's matchmaking and all-reduce)."""

    matchmaking_time: float = Field(2.0, gt=0)
    """Seconds peers spend forming a group before each averaging round."""
    averaging_timeout: float = Field(30.0, gt=0)
    """Seconds after which an averaging round is abandoned. A floor: a peer whose uplink, or a groupmate's,
    needs longer for the round's volume allows its rounds more, up to 10 × this (:mod:`dedloc.swarm.timeouts`)."""
    load_state_timeout: float = Field(120.0, gt=0)
    """Seconds a newcomer may take to download the current state."""
    sender_timeout: float = Field(5.0, gt=0)
    """Seconds a groupmate may stay silent in an all-reduce before the round goes on without its part
    (results it owes the others may take twice this). A loaded peer can miss a tight bound: the
    members then end the round with different values for its part. A floor: a round whose slowest
    member's announced uplink needs longer for a chunk waits longer, up to 10 × this."""
    download_chunk_timeout: float = Field(10.0, gt=0)
    """Seconds a state download waits for the next piece from one donor before it moves on to the next."""
    average_state_every: int = Field(1, gt=0)
    """Average parameters and optimizer statistics every this many global steps (keeps peers identical).
    DiLoCo mode averages the parameters at every global step whatever this says: its outer step is
    taken on that average."""
    delayed_updates: bool = False
    """Synchronous mode, experimental: average each step's gradients and take its optimizer step in the
    background while the peers compute the next step's (hivemind's ``delay_grad_averaging`` and
    ``delay_optimizer_step``: one step of staleness). A peer shows the swarm its old step until its
    gradient round has ended, so a peer that notices the step a moment later still joins the round."""
    average_optimizer_state: bool = False
    """Also average the optimizer's statistics (Adam's moments and step count) with the parameters, so
    that a newcomer's older moments, or those of a peer that missed a round, are brought level too.
    State averaging then carries three times the numbers (see docs/reliability.md for what it gave)."""
    grad_compression: Compression = "fp16"
    """Compression of gradients on the wire."""
    powersgd_rank: Optional[int] = Field(None, gt=0)
    """Synchronous mode: send each gradient matrix as PowerSGD's two rank-r factors (hivemind's
    ``PowerSGDGradientAverager``, with error feedback: what a round's factors miss is sent in later
    rounds) — an m × n matrix travels as (m + n) × r numbers, in two all-reduces per round. Unset: whole
    gradients (``grad_compression`` applies to the factors as well)."""
    state_compression: Compression = "none"
    """Compression of parameters in state averaging (``none`` keeps peers bit-identical)."""
    target_group_size: Optional[int] = Field(None, gt=1)
    """Largest group in one all-reduce; unset for the whole swarm."""
    aggregation: Literal["mean", "centered_clip"] = "mean"
    """How a peer combines the gradient parts its groupmates send it: their mean weighted by samples,
    or CenteredClip, which bounds how far any one sender can move the result (robust to a minority of
    peers sending poisoned gradients, at the cost of some bias when honest gradients disagree). Parts
    that are not finite or have the wrong shape are refused either way, and no peer's claimed weight
    counts for more than the target batch (with CenteredClip, for more than the median claim)."""
    centered_clip_tau: Optional[float] = Field(None, gt=0)
    """CenteredClip's radius (L2 norm per part); unset: the median distance of the parts from their
    coordinate-wise median, so that it follows the gradients' scale."""


class CheckpointSection(_Section):
    """How the coordinator keeps the shared model."""

    every_steps: int = Field(10, gt=0)
    """Write a checkpoint every this many global steps (and at the end of the run)."""
    keep_last: int = Field(3, gt=0)
    """Checkpoints kept on disk; older ones are removed after a newer one is complete."""
    heldout_sequences: int = Field(256, ge=0)
    """Held-out sequences the coordinator evaluates every checkpoint on (0: no held-out evaluation)."""


class DilocoSection(_Section):
    """The outer optimizer of DiLoCo mode (``mode = "diloco"``)."""

    outer_lr: float = Field(0.7, gt=0)
    """Learning rate of the outer step, applied to the swarm's averaged pseudo-gradient (the distance the
    peers' parameters moved since the last outer step)."""
    outer_momentum: float = Field(0.5, ge=0, lt=1)
    """Momentum of the outer step (0: none). DiLoCo's 0.9 overshoots when the outer step lands one round
    late (``overlap``): in the fidelity run (docs/fidelity.md) 0.9 ended 0.25–0.77 above 0.5 overlapped,
    and 0.5 overlapped matched both momenta waiting for the round."""
    nesterov: bool = True
    """Nesterov momentum (DiLoCo's choice); needs ``outer_momentum`` > 0."""
    overlap: bool = True
    """Average the parameters in the background while the next local steps run (the outer step lands
    when the round ends, on top of the local steps taken meanwhile, one round late); false: every peer
    waits for the round to end before its next local step. Overlapped it gained 4–8 % samples/s with
    rounds of 128 local steps (docs/performance.md); keep ``outer_momentum`` at 0.5 or below with it."""
    sender_timeout: float = Field(15.0, gt=0)
    """``averaging.sender_timeout`` for the parameter rounds of DiLoCo mode: they are large and rare, and
    with ``overlap`` nobody waits for them, so a groupmate slow to deliver its part on a home uplink is
    waited for longer rather than left out (which leaves the members with different parameters)."""

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> "DilocoSection":
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("nesterov needs outer_momentum > 0")
        return self


class RunConfig(_Section):
    """One training run. Load it with :func:`load_run_config`; the TOML layout mirrors the fields."""

    run_id: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    """Name of the run (letters, digits, ``-`` and ``_``); peers of different runs on one DHT never mix."""
    mode: Literal["synchronous", "diloco"] = "synchronous"
    """``synchronous``: the swarm averages gradients once it has the target batch and every peer takes the
    same optimizer step (large-batch training). ``diloco``: every peer steps its own optimizer on every
    micro-batch (``optimizer`` is the inner optimizer); once the swarm has computed the target batch, peers
    average their parameters and take DiLoCo's outer step (section ``diloco``) — one all-reduce per
    ``training.target_batch_size`` samples, so set it several times larger than in synchronous mode."""
    model: ModelSection = ModelSection()
    tokenizer: TokenizerSection = TokenizerSection()
    data: DataSection = DataSection()
    training: TrainingSection = TrainingSection()
    optimizer: OptimizerSection = OptimizerSection()
    averaging: AveragingSection = AveragingSection()
    checkpoint: CheckpointSection = CheckpointSection()
    diloco: DilocoSection = DilocoSection()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.data.seq_length > self.model.max_position_embeddings:
            raise ValueError(
                f"data.seq_length ({self.data.seq_length}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )
        if self.mode == "diloco" and self.averaging.aggregation != "mean":
            raise ValueError(
                f"averaging.aggregation = {self.averaging.aggregation!r} combines gradients in synchronous mode; "
                "DiLoCo mode averages parameters with the plain mean (set aggregation = \"mean\")"
            )
        if self.mode == "diloco" and self.averaging.powersgd_rank is not None:
            raise ValueError(
                "averaging.powersgd_rank compresses gradients in synchronous mode; DiLoCo mode averages "
                "parameters (unset powersgd_rank)"
            )
        if self.training.micro_batch_size > self.training.target_batch_size:
            raise ValueError(
                f"training.micro_batch_size ({self.training.micro_batch_size}) exceeds "
                f"training.target_batch_size ({self.training.target_batch_size})"
            )
        return self

    def to_json_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what is published and hashed)."""
        return self.model_dump(mode="json")

    def sha256(self) -> str:
        """Hash of the canonical JSON form: peers compare it to see they train the same run."""
        canonical = json.dumps(self.to_json_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_toml(self) -> str:
        """This config as a TOML file that :func:`load_run_config` reads back to an equal config."""
        return dump_toml(self.to_json_dict())

    def with_overrides(self, **sections: Any) -> "RunConfig":
        """Return a validated copy with some fields replaced: ``training={"seed": 1}`` updates a section,
        ``run_id="x"`` a top-level field."""
        data = self.to_json_dict()
        for name, value in sections.items():
            if name not in data:
                raise KeyError(name)
            if isinstance(data[name], dict):
                data[name].update(value)
            else:
                data[name] = value
        return parse_run_config(data, origin="overrides")


def _format_location(loc: tuple) -> str:
    parts = [str(p) for p in loc if not isinstance(p, int)]
    if not parts:
        return "(top level)"
    if len(parts) == 1:
        return f"key '{parts[0]}'"
    return f"key '{parts[-1]}' in [{'.'.join(parts[:-1])}]"


def format_validation_error(error: ValidationError, origin: str) -> str:
    """One line per problem, each naming the file and the key."""
    lines = []
    for item in error.errors():
        where = _format_location(item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown {where}")
        elif item["type"] == "missing":
            lines.append(f"{origin}: missing required {where}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            shown = "" if isinstance(value, dict) else f" (got {value!r})"
            lines.append(f"{origin}: {where}: {message}{shown}")
    return "\n".join(lines)


def parse_run_config(data: Any, origin: str) -> RunConfig:
    """Validate an already-parsed mapping; ``origin`` names where it came from in error messages."""
    if not isinstance(data, dict):
        raise UserInputError(f"{origin}: a run configuration must be a table of keys")
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        raise UserInputError(format_validation_error(e, origin)) from None
    _reject_non_finite(config.to_json_dict(), origin)
    return config


def _reject_non_finite(data: Any, origin: str, path: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            _reject_non_finite(value, origin, f"{path}.{key}" if path else key)
    elif isinstance(data, list):
        for value in data:
            _reject_non_finite(value, origin, path)
    elif isinstance(data, float) and not math.isfinite(data):
        raise UserInputError(f"{origin}: key '{path}': must be a finite number (got {data})")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dump_toml(data: dict[str, Any]) -> str:
    """Write a two-level mapping (top-level keys, then one table per section); None values are left out."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, dict) and value is not None]
    for section, table in data.items():
        if isinstance(table, dict):
            lines.append(f"\n[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items() if value is not None)
    return "\n".join(lines) + "\n"


def load_run_config(path: str | Path) -> RunConfig:
    """Read and validate a run configuration file (see :class:`RunConfig`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserInputError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserInputError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserInputError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"{path}: malformed TOML: {e}") from None
    return parse_run_config(data, origin=str(path))


def default_run_config(**overrides: Any) -> RunConfig:
    """The embedded default run (see ``dedloc/task/embedded/default-run.toml``)."""
    from dedloc.task.corpus import EMBEDDED_DIR

    config = load_run_config(EMBEDDED_DIR / "default-run.toml")
    return config.with_overrides(**overrides) if overrides else config
