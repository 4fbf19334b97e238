"""Device, precision and micro-batch choice (dedloc.task.device). The out-of-memory search runs against
a fake allocator, so it is covered on machines without a GPU; the GPU check itself is in docs/gpu.md."""

from __future__ import annotations

import json

import pytest
import torch

from dedloc.config import default_run_config
from dedloc.errors import UserInputError
from dedloc.task.build import build_peer_task, prepare_tokenizer
from dedloc.task.device import (
    ComputePlan,
    MicroBatchCache,
    choose_precision,
    find_micro_batch,
    is_out_of_memory,
    resolve_device,
    search_micro_batch,
)

pytestmark = pytest.mark.timeout(120)
NO_GPU = not torch.cuda.is_available()


class FakeAllocator:
    """Fits micro-batches up to ``capacity`` samples; a bigger one raises CUDA's out-of-memory error."""

    def __init__(self, capacity: int):
        self.capacity, self.tried, self.in_use, self.released = capacity, [], 0, 0

    def try_size(self, size: int) -> None:
        self.tried.append(size)
        self.in_use = size
        if size > self.capacity:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {size} samples")

    def release(self) -> None:
        self.in_use = 0
        self.released += 1


@pytest.mark.parametrize("capacity", [1, 2, 5, 37, 64, 255, 1000])
def test_the_search_finds_the_largest_size_that_fits(capacity):
    allocator = FakeAllocator(capacity)
    search = find_micro_batch(allocator.try_size, largest=256, release=allocator.release)
    assert search.size == min(capacity, 256)
    assert all(fitted == (size <= capacity) for size, fitted in search.tried.items())
    assert len(allocator.tried) == len(set(allocator.tried)) <= 2 * 8 + 1  # doubling, then bisection
    assert allocator.released == len(allocator.tried) and allocator.in_use == 0


def test_nothing_fits_and_other_errors_pass_through():
    with pytest.raises(MemoryError):
        find_micro_batch(FakeAllocator(0).try_size, largest=64)

    def broken(size: int) -> None:
        raise ValueError("a shape mismatch, not memory")

    with pytest.raises(ValueError):
        find_micro_batch(broken, largest=64)


def test_out_of_memory_errors_are_recognised():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("expected scalar type Float but found Half"))


@pytest.mark.skipif(not NO_GPU, reason="this machine has a CUDA GPU: the no-GPU answers do not apply")
def test_devices_without_a_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserInputError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(UserInputError, match="no CUDA GPU"):
        resolve_device("cuda:1")
    with pytest.raises(UserInputError, match="not a device"):
        resolve_device("gpu0")
    assert choose_precision(torch.device("cpu")) == "fp32"
    assert choose_precision(torch.device("cpu"), "fp32") == "fp32"
    with pytest.raises(UserInputError, match="needs a CUDA GPU"):
        choose_precision(torch.device("cpu"), "bf16")
    with pytest.raises(UserInputError):
        choose_precision(torch.device("cpu"), "int4")


def test_the_cache_keeps_sizes_and_survives_a_corrupt_file(tmp_path):
    cache = MicroBatchCache(tmp_path / "cache")
    key = MicroBatchCache.key("cuda:0 (Some GPU) 8589934592", '{"hidden_size": 256}', 128, "bf16")
    assert key != MicroBatchCache.key("cuda:0 (Some GPU) 8589934592", '{"hidden_size": 256}', 128, "fp16")
    assert cache.get(key) is None
    cache.put(key, 48)
    assert MicroBatchCache(tmp_path / "cache").get(key) == 48
    assert json.loads(cache.path.read_text())[key] == 48
    cache.path.write_text("{not json")
    assert cache.get(key) is None
    cache.put(key, 24)
    assert cache.get(key) == 24
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserInputError, match="cannot be created"):
        MicroBatchCache(tmp_path / "a-file" / "cache")


def _loss_and_model():
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer, model(torch.ones(2, 4)).square().mean()


def test_fp16_loss_scaling_steps_and_skips_overflowing_steps():
    plan = ComputePlan(torch.device("cpu"), "fp16", micro_batch_size=2)
    assert plan.scaler is not None and plan.peak_memory_mib() is None
    model, optimizer, loss = _loss_and_model()
    before = model.weight.detach().clone()
    assert plan.backward_and_step(loss, optimizer)
    assert not torch.equal(model.weight, before)

    model, optimizer, loss = _loss_and_model()
    before = model.weight.detach().clone()
    # gradients overflowed, as they can in fp16: the step is skipped, and the caller told so
    assert not plan.backward_and_step(loss * float("inf"), optimizer)
    assert torch.equal(model.weight, before), "a step on overflowed gradients was taken"


def test_fp32_plan_is_a_plain_backward_and_step():
    plan = ComputePlan(torch.device("cpu"), "fp32", micro_batch_size=2)
    assert plan.scaler is None
    model, optimizer, loss = _loss_and_model()
    before = model.weight.detach().clone()
    with plan.autocast():
        pass
    assert plan.backward_and_step(loss, optimizer) is True
    assert not torch.equal(model.weight, before)
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert plan.to_device(batch) is batch


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_fp32_gradients_that_are_not_finite_are_dropped(poison):
    """A NaN or infinite micro-batch never reaches the optimizer (which would send it to the swarm)."""
    plan = ComputePlan(torch.device("cpu"), "fp32", micro_batch_size=2)
    model, optimizer, loss = _loss_and_model()
    before = model.weight.detach().clone()
    assert plan.backward_and_step(loss * poison, optimizer) is False
    assert torch.equal(model.weight, before), "a step on non-finite gradients was taken"
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    # the next, finite micro-batch steps as usual
    assert plan.backward_and_step(model(torch.ones(2, 4)).square().mean(), optimizer) is True
    assert not torch.equal(model.weight, before) and torch.isfinite(model.weight).all()


class _OutOfMemoryAbove(torch.nn.Module):
    """The real model, failing like a full GPU when a batch is larger than ``capacity``."""

    def __init__(self, model: torch.nn.Module, capacity: int):
        super().__init__()
        self.model, self.capacity = model, capacity

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[0] > self.capacity:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(input_ids=input_ids, **kwargs)


def test_the_search_runs_real_forward_and_backward_passes(tmp_path):
    config = default_run_config(data={"seq_length": 32}, training={"micro_batch_size": 2})
    task = build_peer_task(config, prepare_tokenizer(config, tmp_path), 2, data_seed=1)
    sample = next(iter(task.stream))
    search = search_micro_batch(task.model, sample, torch.device("cpu"), "fp32", largest=4)
    assert search.size == 4 and search.tried == {1: True, 2: True, 4: True}
    assert all(p.grad is None for p in task.model.parameters()), "the search left gradients behind"
    search = search_micro_batch(_OutOfMemoryAbove(task.model, 5), sample, torch.device("cpu"), "fp32", largest=16)
    assert search.size == 5 and search.tried[8] is False
