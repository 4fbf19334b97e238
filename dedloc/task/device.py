"""Where and how a peer computes: the device, the precision, and the largest micro-batch that fits.

A volunteer runs one command on whatever machine they have. :func:`resolve_device` picks CUDA, then
Apple MPS, then the CPU (``--device`` overrides); :func:`choose_precision` picks bf16 autocast where the
GPU supports it, fp16 with loss scaling on older GPUs, and fp32 elsewhere; :func:`find_micro_batch`
finds the largest micro-batch that fits by trying and catching out-of-memory errors, and
:class:`MicroBatchCache` remembers the answer per device and model, so a restart does not search again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from dedloc.errors import UserInputError

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(requested: str = "auto") -> torch.device:
    """The device named by ``--device``: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``
    or ``mps``. A named accelerator that this machine lacks is the user's error (exit 2)."""
    text = requested.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserInputError(f"--device {requested!r} is not a device: use {DEVICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(
                f"--device {requested}: no CUDA GPU is usable here (torch {torch.__version__}, built for "
                f"CUDA {torch.version.cuda or 'none'}); install a CUDA build of torch, or use --device cpu"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserInputError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise UserInputError(f"--device {requested}: Apple MPS is not available on this machine; use --device cpu")
        return device
    raise UserInputError(f"--device {requested!r} is not supported: use {DEVICES}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def describe_device(device: torch.device) -> str:
    """A short human name, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def choose_precision(device: torch.device, requested: str = "auto") -> Precision:
    """``auto``: bf16 on a CUDA GPU that supports it, fp16 on an older CUDA GPU, fp32 elsewhere (CPU
    autocast gains little for this model, and MPS autocast is not reliable in training)."""
    if requested not in PRECISIONS:
        raise UserInputError(f"--precision {requested!r}: use one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        if requested != "fp32" and device.type != "cuda":
            raise UserInputError(f"--precision {requested} needs a CUDA GPU (the peer computes on {device})")
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserInputError(f"--precision bf16: {describe_device(device)} does not support bf16; use fp16")
        return requested  # type: ignore[return-value]
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The forward pass's autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an accelerator running out of memory (CUDA's or MPS's)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


@dataclass(frozen=True)
class MicroBatchSearch:
    """The outcome of :func:`find_micro_batch`: the size chosen and every size tried (size → fitted)."""

    size: int
    tried: dict


def find_micro_batch(try_size: Callable[[int], None], largest: int, release: Callable[[], None] = lambda: None) -> MicroBatchSearch:
    """The largest micro-batch in 1 … ``largest`` for which ``try_size(size)`` (one forward and backward
    pass) runs without running out of memory: sizes double from 1 until one fails or ``largest`` is
    reached, then a binary search between the last that fitted and the first that failed.

    ``release`` frees what a failed try left allocated (e.g. ``torch.cuda.empty_cache``). Errors other
    than out-of-memory propagate. Raises :class:`MemoryError` when not even one sample fits.
    """
    if largest < 1:
        raise ValueError(f"largest must be at least 1 (got {largest})")
    tried: dict[int, bool] = {}

    def fits(size: int) -> bool:
        if size not in tried:
            try:
                try_size(size)
                tried[size] = True
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                tried[size] = False
            finally:
                release()
        return tried[size]

    good, bad = 0, None
    size = 1
    while True:
        if not fits(size):
            bad = size
            break
        good = size
        if size >= largest:
            break
        size = min(size * 2, largest)
    if good == 0:
        raise MemoryError("not even a micro-batch of one sample fits in the device's memory")
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return MicroBatchSearch(size=good, tried=dict(sorted(tried.items())))


def default_cache_dir() -> Path:
    """dedloc's per-user cache directory (``$XDG_CACHE_HOME/dedloc``, else ``~/.cache/dedloc``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dedloc"


class MicroBatchCache:
    """Micro-batch sizes found earlier, per device, model and precision, in one small JSON file.

    A cache that cannot be read (corrupt, or written by something else) is treated as empty; one that
    cannot be written is reported at once as the user's error, since a peer that cannot keep it would
    search again at every start."""

    FILE = "micro_batch.json"

    def __init__(self, directory: Path):
        self.path = Path(directory) / self.FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserInputError(f"cache directory {self.path.parent} cannot be created: {e.strerror or e}") from None
        if not os.access(self.path.parent, os.W_OK):
            raise UserInputError(f"cache directory {self.path.parent} is not writable")

    @staticmethod
    def key(device_name: str, model_description: str, seq_length: int, precision: str) -> str:
        digest = hashlib.sha256(f"{device_name}|{model_description}|{seq_length}|{precision}".encode()).hexdigest()
        return digest[:24]

    def _read(self) -> dict:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def get(self, key: str) -> Optional[int]:
        value = self._read().get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    def put(self, key: str, size: int) -> None:
        entries = self._read()
        entries[key] = int(size)
        handle, temporary = tempfile.mkstemp(prefix=".micro_batch-", dir=self.path.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as file:
                json.dump(entries, file, indent=1, sort_keys=True)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


@dataclass
class ComputePlan:
    """How one peer computes a micro-step: on ``device``, in ``precision``, ``micro_batch_size`` samples.

    fp16 scales the loss (``torch.amp.GradScaler``): gradients are unscaled before the optimizer
    accumulates them, and a micro-step whose gradients overflowed is skipped — its samples are not
    counted toward the swarm's batch.
    """

    device: torch.device
    precision: Precision
    micro_batch_size: int

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def to_device(self, batch: dict) -> dict:
        if self.device.type == "cpu":
            return batch
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """``loss.backward()`` then ``optimizer.step()``, with loss scaling in fp16. Returns False when the
        gradients came out NaN or infinite (an overflow, a bad batch): they are zeroed and the optimizer
        does not see them — sent to the swarm, they would be refused by every reducer and leave this
        peer stepping alone on them. In fp16 the loss scaler skips such a step itself (and lowers its
        scale); False is returned then too."""
        if self.scaler is None:
            loss.backward()
            if not gradients_finite(optimizer):
                optimizer.zero_grad(set_to_none=False)
                return False
            optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale  # the scaler lowers its scale exactly when it skipped the step

    def peak_memory_mib(self) -> Optional[float]:
        """Peak memory allocated on a CUDA device so far, MiB (None elsewhere)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**20


def _all_finite(tensors) -> bool:
    """Whether every value of ``tensors`` is finite: one device sync for all of them (a NaN or an
    infinity anywhere makes its tensor's sum non-finite)."""
    sums = [tensor.detach().float().sum() for tensor in tensors]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def gradients_finite(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient of ``optimizer``'s parameters is finite."""
    return _all_finite(param.grad for group in optimizer.param_groups for param in group["params"]
                       if param.grad is not None)


def parameters_finite(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite."""
    return _all_finite(model.parameters())


def search_micro_batch(model: torch.nn.Module, sample: dict, device: torch.device, precision: Precision,
                       largest: int, reserve_bytes: int = 0) -> MicroBatchSearch:
    """:func:`find_micro_batch` for ``model`` on a CUDA ``device``: each try runs a forward and backward
    pass on ``sample`` (a micro-batch from the peer's own stream) repeated to the size tried, with
    ``reserve_bytes`` held aside for what training adds later (optimizer statistics, gradient buffers)."""
    reserve = torch.empty(reserve_bytes // 4, dtype=torch.float32, device=device) if reserve_bytes else None

    def try_size(size: int) -> None:
        repeats = -(-size // next(iter(sample.values())).shape[0])
        batch = {key: value.repeat(repeats, *([1] * (value.dim() - 1)))[:size].to(device) for key, value in sample.items()}
        try:
            with autocast(device, precision):
                loss = model(**batch).loss
            loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            del batch

    def release() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()

    try:
        return find_micro_batch(try_size, largest, release)
    finally:
        del reserve
        release()
