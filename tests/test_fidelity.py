"""The DeDLOC claim, measured: the swarm trains what synchronous large-batch training would."""

from __future__ import annotations

import pytest

from bench.fidelity import FidelityResult, fidelity_config, measure, run_single

pytestmark = [pytest.mark.swarm]


def test_criterion_arithmetic():
    close = FidelityResult(steps=[2, 4], swarm=[8.0, 7.0], single={1: [8.0, 7.1], 2: [8.0, 7.2], 3: [8.0, 7.0]}, peers=2)
    assert close.holds and close.tolerance == pytest.approx(0.03 * 7.1)
    far = FidelityResult(steps=[2, 4], swarm=[8.0, 7.5], single={1: [8.0, 7.1], 2: [8.0, 7.1], 3: [8.0, 7.1]}, peers=2)
    assert not far.holds


@pytest.mark.timeout(900)
def test_swarm_matches_single_process_training(tmp_path):
    config = fidelity_config(steps=10)
    result = measure(config, peers=2, seeds=3, workdir=tmp_path)
    print(result.table())
    assert result.steps[-1] == 10 and len(result.steps) >= 4
    assert result.holds, result.table()
    assert result.swarm[-1] < result.swarm[0] - 0.3, "the swarm did not learn"

    # the comparison has teeth: the same swarm against a run that trains differently (a quarter of the
    # learning rate) is told apart
    slower = fidelity_config(steps=10).with_overrides(optimizer={"lr": 7.5e-4})
    tokenizer_json = (tmp_path / "swarm" / "coordinator" / "tokenizer.json").read_text()
    from dedloc.task.build import hf_tokenizer
    from dedloc.task.evaluation import heldout_set

    batches = heldout_set(slower, hf_tokenizer(slower, tokenizer_json))
    control = {seed: run_single(slower, tokenizer_json, seed, result.steps, batches) for seed in (1, 2)}
    mismatched = FidelityResult(steps=result.steps, swarm=result.swarm, single=control, peers=2)
    assert not mismatched.holds, mismatched.table()
