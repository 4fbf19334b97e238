"""What a reducing peer accepts and how it combines parts: CenteredClip's arithmetic, and real
averagers on a local DHT whose rounds reject non-finite parts, bound claimed weights and clip outliers."""

from __future__ import annotations

import concurrent.futures
import types
from typing import Optional

import hivemind
import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dedloc.faults import ENV
from dedloc.swarm.identity import Identity, peer_id_of_public_key
from dedloc.swarm.optimizer import ReducerShares
from dedloc.swarm.reduction import CheckedReduction, centered_clip, robust_weights, round_step
from dedloc.swarm.step_groups import StepKeyedGroups, gathered_step, step_group_bits
from dedloc.swarm.weight_bound import (Progress, PublishedProgress, claim_bound, parse_progress,
                                      step_the_others_reached)
from helpers import local_dhts

pytestmark = pytest.mark.timeout(120)


def test_centered_clip_is_the_mean_of_agreeing_parts_and_ignores_a_far_outlier():
    torch.manual_seed(0)
    gradient = torch.randn(1000)
    honest = torch.stack([gradient + 0.1 * torch.randn(1000) for _ in range(3)])
    weights = torch.ones(4)
    for attack in (-1000 * gradient, 1000 * gradient.norm() * torch.nn.functional.normalize(torch.randn(1000), dim=0)):
        parts = torch.cat([honest, attack[None]])
        clipped, mean = centered_clip(parts, weights), parts.mean(dim=0)
        honest_mean = honest.mean(dim=0)
        assert (clipped - honest_mean).norm() < 0.5 * gradient.norm()  # the attacker moves it by ≤ τ/4
        assert (mean - honest_mean).norm() > 100 * gradient.norm()  # the plain mean is wrecked
    # parts that agree (all within τ of the center) give their weighted mean
    agreeing = torch.stack([gradient, gradient + 0.01, gradient - 0.01])
    w = torch.tensor([1.0, 2.0, 2.0])  # none above their median: not capped
    expected = (agreeing * (w / w.sum())[:, None]).sum(dim=0)
    assert torch.allclose(centered_clip(agreeing, w, tau=10.0), expected, atol=1e-5)


def test_of_two_parts_neither_moves_the_result_further_than_the_other():
    """No majority: each part is clipped to the smaller norm, so a sign flip × 1000 cancels the honest
    part (a step of zero) where the mean reverses it 500-fold."""
    torch.manual_seed(0)
    gradient = torch.randn(1000)
    for attack in (-1000 * gradient, 1000 * gradient.norm() * torch.nn.functional.normalize(torch.randn(1000), dim=0)):
        parts = torch.stack([gradient, attack])
        clipped = centered_clip(parts, torch.ones(2))
        assert clipped.norm() <= gradient.norm() * 1.0001
        assert parts.mean(dim=0).norm() > 400 * gradient.norm()
    assert float(centered_clip(torch.stack([gradient, -1000 * gradient]), torch.ones(2)).norm()) < 1e-3
    # two honest parts of similar size: close to their mean
    other = gradient + 0.05 * torch.randn(1000)
    both = torch.stack([gradient, other])
    assert (centered_clip(both, torch.ones(2)) - both.mean(dim=0)).norm() < 0.05 * gradient.norm()


def test_no_sender_outweighs_the_median_claim():
    assert robust_weights(torch.tensor([16.0, 16.0, 16.0, 1000.0])).tolist() == [16.0] * 4
    assert robust_weights(torch.tensor([16.0, 64.0])).tolist() == [16.0, 16.0]
    assert robust_weights(torch.tensor([0.0, 16.0, 32.0])).tolist() == [0.0, 16.0, 16.0]
    # an attacker far away claiming 10 × the others' weight still pulls by at most τ/4 (uncapped, it drags the center ~10 τ)
    torch.manual_seed(1)
    gradient = torch.randn(1000)
    honest = torch.stack([gradient + 0.1 * torch.randn(1000) for _ in range(3)])
    parts = torch.cat([honest, (-1000 * gradient)[None]])
    clipped = centered_clip(parts, torch.tensor([1.0, 1.0, 1.0, 10.0]))
    assert (clipped - honest.mean(dim=0)).norm() < 0.5 * gradient.norm()
    # a sender with nothing accumulated (weight 0) leaves the other's part as it is
    assert torch.equal(centered_clip(torch.stack([gradient, torch.zeros(1000)]), torch.tensor([1.0, 0.0])), gradient)


class _Averager(StepKeyedGroups, CheckedReduction, ReducerShares, hivemind.averaging.DecentralizedAverager):
    pass


def _average(values: list[float], weights: list[float], reduces: list[bool], steps: Optional[list] = None,
             dhts: Optional[list] = None, faults: Optional[list] = None, failing: tuple[int, ...] = (),
             timeout: float = 40.0, **reduction) -> list[torch.Tensor]:
    """One round of real averagers on a local DHT (``dhts``, shut down here; default: fresh ones), each
    holding a vector filled with its value (and gathering its entry of ``steps``, as the state averager
    gathers its step; and built with its entry of ``faults`` as ``DEDLOC_FAULTS``). Every member's
    round must succeed but those at the indices in ``failing``, whose rounds must fail."""
    steps = steps or [None] * len(values)
    faults = faults or [None] * len(values)
    dhts = dhts or local_dhts(len(values))
    averagers = []
    try:
        for dht, value, reducing, fault in zip(dhts, values, reduces, faults):
            with pytest.MonkeyPatch.context() as patch:
                if fault is None:
                    patch.delenv(ENV, raising=False)
                else:
                    patch.setenv(ENV, fault)  # read when the averager is built
                averager = _Averager([torch.full((4096,), value)], dht=dht, prefix="checked",
                                     target_group_size=len(values), min_matchmaking_time=2.0, request_timeout=1.0,
                                     start=False, **reduction)
            averager.announce(reduces=reducing)
            averager.run_in_background(await_ready=True)
            averagers.append(averager)
        def step(averager, weight, step):
            try:
                return averager.step(weight=weight, gather=step, timeout=timeout)
            except Exception:  # the round failed (hivemind raises what ended it)
                return None

        with concurrent.futures.ThreadPoolExecutor(len(averagers)) as pool:
            results = list(pool.map(lambda args: step(*args), zip(averagers, weights, steps)))
        failed = tuple(index for index, result in enumerate(results) if result is None)
        assert failed == tuple(failing), f"the rounds of members {failed} failed, expected {failing} to"
        tensors = []
        for averager in averagers:
            with averager.get_tensors() as (tensor,):
                tensors.append(tensor.clone())
        return tensors
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_a_non_finite_part_is_left_out_and_the_others_average():
    """A peer sending NaN is banned from the round by the reducers: the others get the mean of the
    finite parts (it reduces no share itself, as a peer with nothing to contribute would)."""
    tensors = _average([1.0, 3.0, float("nan")], weights=[1.0, 1.0, 1.0], reduces=[True, True, False])
    for tensor in tensors[:2]:
        assert torch.allclose(tensor, torch.full((4096,), 2.0)), tensor[:4]


def test_a_claimed_weight_is_bounded():
    bounded = _average([1.0, 3.0], weights=[1.0, 1000.0], reduces=[True, True], max_weight=1.0)
    assert all(torch.allclose(t, torch.full((4096,), 2.0)) for t in bounded)
    trusted = _average([1.0, 3.0], weights=[1.0, 1000.0], reduces=[True, True])
    assert all(float(t.mean()) > 2.99 for t in trusted)  # without the bound the claim wins


def test_a_claim_beyond_the_senders_published_progress_counts_as_its_bound():
    """Each member's DHT node and progress record carry its own identity (as a peer's do). Member 3
    published 32 samples and claims 3,200: it counts for its bound, 2 × 32 + two micro-batches of 16 =
    96, not for the target batch (256). Member 2 published nothing: the target batch alone bounds it
    (its honest claim of 32 stands)."""
    identities = [Identity.create_ephemeral() for _ in range(3)]
    try:
        local = dict(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
        dhts = []
        for identity in identities:
            initial = [str(a) for a in dhts[0].get_visible_maddrs()] if dhts else []
            dhts.append(hivemind.DHT(**local, initial_peers=initial, identity_path=str(identity.path),
                                     record_validators=[RSASignatureValidator(identity.private_key)]))
        assert [dht.peer_id for dht in dhts] == [identity.peer_id for identity in identities]
        for index in (0, 2):
            validator = RSASignatureValidator(identities[index].private_key)
            record = LocalTrainingProgress(peer_id=dhts[index].peer_id.to_bytes(), epoch=0, samples_accumulated=32,
                                           samples_per_second=0.0, time=get_dht_time(), client_mode=False)
            assert dhts[index].store("run_progress", subkey=validator.local_public_key, value=record.dict(),
                                     expiration_time=get_dht_time() + 120)
        bound = PublishedProgress("run_progress", micro_batch=16)
        tensors = _average([1.0, 3.0, 11.0], weights=[32.0, 32.0, 3200.0], reduces=[True] * 3, dhts=dhts,
                           max_weight=256.0, weight_bound=bound)
    finally:
        for identity in identities:
            identity.discard()
    expected = (32 * 1.0 + 32 * 3.0 + 96 * 11.0) / 160  # 7.4; bounded by the target batch alone: 9.2
    assert all(torch.allclose(t, torch.full((4096,), expected)) for t in tensors), [float(t.mean()) for t in tensors]


def test_a_bound_grows_with_the_published_throughput_and_skips_malformed_records():
    published = Progress(samples=32, samples_per_second=10.0, time=100.0)
    assert claim_bound(published, now=102.0, micro_batch=16) == pytest.approx(2 * (32 + 20) + 32)
    assert claim_bound(published, now=90.0, micro_batch=16) == pytest.approx(2 * 32 + 32)  # a clock ahead adds nothing
    owner = RSAPrivateKey()
    subkey = RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", owner.get_public_key().to_bytes())
    good = {"samples_accumulated": 8, "samples_per_second": 2.5, "time": 1.0}
    found = parse_progress({
        subkey: ValueWithExpiration(good, 0.0),
        b"no owner": ValueWithExpiration(good, 0.0),
        subkey + b"x": ValueWithExpiration({**good, "samples_accumulated": -1}, 0.0),
    })
    assert found == {peer_id_of_public_key(owner.get_public_key()): Progress(8, 2.5, 1.0)}
    for bad in ({**good, "samples_per_second": float("nan")}, {**good, "time": "now"}, {**good, "samples_accumulated": True}, None):
        assert parse_progress({subkey: ValueWithExpiration(bad, 0.0)}) == {}
    assert parse_progress(None) == {} and parse_progress([1, 2]) == {}
    # the step a record says its publisher is at (what an auxiliary helper follows), or -1
    for epoch, read in ((7, 7), (-3, -1), ("7", -1), (True, -1)):
        assert [p.epoch for p in parse_progress({subkey: ValueWithExpiration({**good, "epoch": epoch}, 0.0)}).values()] == [read]


def test_a_peer_is_left_behind_only_when_most_of_the_others_stepped_past():
    me, *others = [peer_id_of_public_key(RSAPrivateKey().get_public_key()) for _ in range(5)]

    def records(*epochs, age=1.0):
        found = {owner: Progress(16, 4.0, 100.0 - age, epoch) for owner, epoch in zip(others, epochs)}
        return {**found, me: Progress(16, 4.0, 100.0, 9)}  # this peer's own record never counts

    def reached(found):
        return step_the_others_reached(found, me, now=100.0, window=25.0)

    assert reached(records(3, 3, 3, 3)) == 3
    assert reached(records(4, 3, 3, 3)) == 3  # one far-ahead record does not speak for the swarm
    assert reached(records(99, 99, 3, 3)) == 3  # half is not most
    assert reached(records(99, 99, 99, 3)) == 99
    assert reached(records(5, 4, 4, 2)) == 4
    assert reached(records(7, 7, 7, 7, age=30.0)) is None  # records of peers gone quiet
    assert reached({me: Progress(16, 4.0, 100.0, 9)}) is None
    assert reached(records(-1, -1, 2, 2)) == 2  # records that do not say their step are not counted


def test_centered_clip_rounds_survive_an_outlier_that_wrecks_the_mean():
    values, reduces = [1.0, 1.1, 0.9, 1000.0], [True, True, True, False]
    clipped = _average(values, weights=[1.0] * 4, reduces=reduces, aggregation="centered_clip")
    assert all(abs(float(t.mean()) - 1.0) < 0.1 for t in clipped), [float(t.mean()) for t in clipped]
    mean = _average(values, weights=[1.0] * 4, reduces=reduces)
    # the mean wrecks the honest member that reduced it (its own answer is not checked); the others
    # refuse that answer, 250 × their own values, and keep their own
    wrecked = [float(t.max()) > 200 for t in mean[:3]]
    assert any(wrecked), [float(t.max()) for t in mean]
    assert all(torch.equal(t, torch.full((4096,), v)) for t, v, w in zip(mean, values, wrecked) if not w)


def test_the_step_of_a_round_is_the_one_most_senders_are_at():
    assert round_step([7, 7, 6]) == 7
    assert round_step([7, 7, 8]) == 7  # a member ahead of most is out of step too
    assert round_step([6, 7, 7, 8]) == 7
    assert round_step([7, 6]) == 7  # two members a step apart: the later step
    assert round_step([7, 7, 6, 6]) == 7
    assert round_step([9, 7]) is None  # further apart: no telling
    assert round_step([10**9, 7]) is None
    assert round_step([None, None]) is None  # plain averagers gather no step
    assert round_step([7, "8", None, 8.0, True]) == 7  # only ints are steps
    assert round_step([]) is None


def test_members_at_different_steps_never_meet():
    """Members at steps 8, 8 and 7 look for a group at once: the two at step 8 average (2.0), the one at
    step 7 finds nobody and keeps its own values (11.0). Under hivemind's one key all three met (5.0)."""
    values, reduces = [1.0, 3.0, 11.0], [True, True, True]
    tensors = _average(values, weights=[1.0] * 3, reduces=reduces, steps=[8, 8, 7], failing=(2,), timeout=12.0)
    means = [float(t.mean()) for t in tensors]
    assert means == pytest.approx([2.0, 2.0, 11.0]), means
    # members that gather no step (plain averagers) keep hivemind's key and meet as ever
    tensors = _average(values, weights=[1.0] * 3, reduces=reduces)
    assert [float(t.mean()) for t in tensors] == pytest.approx([5.0] * 3)


def test_the_group_key_holds_the_step_gathered():
    serializer = hivemind.utils.MSGPackSerializer
    control = types.SimpleNamespace()  # what gathered_step reads of hivemind's StepControl
    for step, bits in [(7, "111"), (0, "0"), (2**20 + 5, "101")]:
        control.data_for_gather = serializer.dumps([None, 0, serializer.dumps(step)])
        assert gathered_step(control, serializer) == step
        assert step_group_bits(step) == bits.rjust(20, "0")
    for junk in [None, "8", 8.0, True, -1, [8]]:
        control.data_for_gather = serializer.dumps([None, 0, serializer.dumps(junk)])
        assert gathered_step(control, serializer) is None, junk
    control.data_for_gather = b"not msgpack"
    assert gathered_step(control, serializer) is None


def test_senders_that_all_weigh_nothing_get_their_plain_mean():
    """Every sender tagging along with weight 0 (a paused peer, a peer before a download): the parts'
    plain mean, where hivemind's reducer would divide 0 by 0."""
    tensors = _average([1.0, 3.0], weights=[0.0, 0.0], reduces=[True, True])
    assert all(torch.allclose(t, torch.full((4096,), 2.0)) for t in tensors), [float(t.mean()) for t in tensors]


@pytest.mark.parametrize("lie", ["attack-reducer-nan", "attack-reducer-scale"])
def test_an_average_a_reducer_sends_back_with_nan_or_a_thousandfold_size_is_dropped(lie):
    """A member's reducer answers NaN, or 1000 × the true average (the attack benchmark's bad reducer,
    reducing the whole vector here): the others keep their own values instead; the liar itself, whose
    own answer is true, gets the mean. With the checks off (hivemind's runner) the lie reaches them."""
    values, reduces = [1.0, 3.0, 5.0], [False, False, True]
    tensors = _average(values, weights=[1.0] * 3, reduces=reduces, faults=[None, None, lie])
    for tensor, value in zip(tensors[:2], values):
        assert torch.equal(tensor, torch.full((4096,), value)), tensor[:4]
    assert torch.allclose(tensors[2], torch.full((4096,), 3.0)), tensors[2][:4]

    unchecked = _average(values, weights=[1.0] * 3, reduces=reduces, faults=["defences-off", "defences-off", lie])
    if lie == "attack-reducer-nan":
        assert all(bool(torch.isnan(tensor).all()) for tensor in unchecked[:2])
    else:
        assert all(torch.allclose(tensor, torch.full((4096,), 3000.0)) for tensor in unchecked[:2])


def test_an_honest_average_far_larger_than_a_members_own_values_is_taken():
    """Sizes are judged against the receiver's own values: 50 × its own (0.02 against a mean of 1.01)
    is within the bound, and a member holding only zeros cannot judge sizes at all."""
    tensors = _average([0.02, 2.0], weights=[1.0, 1.0], reduces=[False, True])
    assert all(torch.allclose(t, torch.full((4096,), 1.01)) for t in tensors), [float(t.mean()) for t in tensors]
    tensors = _average([0.0, 2.0], weights=[1.0, 1.0], reduces=[False, True])
    assert all(torch.allclose(t, torch.full((4096,), 1.0)) for t in tensors), [float(t.mean()) for t in tensors]
