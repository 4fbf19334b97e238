"""Who reduces a share of an all-reduce: a peer announcing bandwidth 0 (a newcomer, a peer with nothing
to contribute) gets none, and a group in which every member announced 0 still averages."""

from __future__ import annotations

import concurrent.futures

import hivemind
import pytest
import torch
from hivemind.averaging.allreduce import AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.utils.serializer import MSGPackSerializer

from dedloc.swarm.optimizer import DEFAULT_UPLOAD_MBPS, ReducerShares, _with_reducers

pytestmark = pytest.mark.timeout(120)


def _group(*announced) -> GroupInfo:
    gathered = tuple(MSGPackSerializer.dumps([bandwidth, mode.value, MSGPackSerializer.dumps(None)])
                     for bandwidth, mode in announced)
    return GroupInfo(group_id=b"g", peer_ids=tuple(range(len(announced))), gathered=gathered)


def _shares(group: GroupInfo, size: int = 1000) -> tuple:
    """The part sizes hivemind's load balancing gives each member of ``group`` (as its averager does)."""
    announced = [MSGPackSerializer.loads(entry) for entry in group.gathered]
    bandwidths = [b if AveragingMode(m) != AveragingMode.CLIENT else 0.0 for b, m, _ in announced]
    return load_balance_peers(size, bandwidths)


def test_a_peer_announcing_zero_reduces_nothing_and_the_others_split_its_share():
    group = _group((0.0, AveragingMode.NODE), (None, AveragingMode.NODE), (None, AveragingMode.NODE))
    assert _with_reducers(group, MSGPackSerializer) is group
    assert _shares(group) == (0, 500, 500)


def test_a_group_where_everyone_announced_zero_shares_equally():
    group = _group((0.0, AveragingMode.NODE), (0.0, AveragingMode.NODE), (None, AveragingMode.CLIENT))
    with pytest.raises(AssertionError):
        _shares(group)  # hivemind's own load balancing refuses such a group
    rewritten = _with_reducers(group, MSGPackSerializer)
    assert rewritten.group_id == group.group_id and rewritten.peer_ids == group.peer_ids
    assert _shares(rewritten) == (500, 500, 0)  # the client-mode member still reduces nothing


class _Averager(ReducerShares, hivemind.averaging.DecentralizedAverager):
    pass


def test_averagers_that_all_announce_zero_still_average():
    """Two real averagers on a local DHT, each announcing that it reduces nothing: without the rewrite
    their round fails in load balancing; with it, both end with the mean."""
    local = dict(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
    first = hivemind.DHT(**local)
    second = hivemind.DHT(**local, initial_peers=[str(a) for a in first.get_visible_maddrs()])
    averagers = []
    try:
        for dht, value in ((first, 1.0), (second, 3.0)):
            averager = _Averager([torch.full((64,), value)], dht=dht, prefix="zero_shares", target_group_size=2,
                                 min_matchmaking_time=2.0, request_timeout=1.0, start=True)
            averager.announce(reduces=False)
            averagers.append(averager)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda a: a.step(timeout=30), averagers))
        assert all(result is not None for result in results), "the averaging round failed"
        for averager in averagers:
            with averager.get_tensors() as (tensor,):
                assert torch.allclose(tensor, torch.full((64,), 2.0))
    finally:
        for averager in averagers:
            averager.shutdown()
        first.shutdown()
        second.shutdown()


def test_a_peer_with_a_lower_upload_cap_reduces_a_smaller_share():
    capped = _group((5.0, AveragingMode.NODE), (None, AveragingMode.NODE), (None, AveragingMode.NODE))
    resolved = _with_reducers(capped, MSGPackSerializer)
    # the others count as a home uplink (DEFAULT_UPLOAD_MBPS), not as the mean of the caps announced
    assert [MSGPackSerializer.loads(e)[0] for e in resolved.gathered] == [5.0, DEFAULT_UPLOAD_MBPS, DEFAULT_UPLOAD_MBPS]
    shares = _shares(resolved)
    assert shares[0] < shares[1] == shares[2] and sum(shares) == 1000
    # hivemind alone would give the capped peer an equal share (None is the mean of the announced: 5)
    assert _shares(capped) == (334, 333, 333)
    # a faster uplink announced gives the larger share; a newcomer (0) still reduces nothing
    server = _with_reducers(_group((30.0, AveragingMode.NODE), (None, AveragingMode.NODE), (0.0, AveragingMode.NODE)),
                            MSGPackSerializer)
    big, small, none = _shares(server)
    assert big > small > 0 and none == 0
    # an auxiliary helper announcing nothing reduces a share next to a newcomer
    aux = _group((None, AveragingMode.AUX), (0.0, AveragingMode.NODE))
    assert _with_reducers(aux, MSGPackSerializer) is aux and _shares(aux) == (1000, 0)


def test_a_peer_keeps_its_upload_cap_between_rounds_it_sits_out():
    class Member(ReducerShares):
        bandwidth = 7.5  # as given to the averager (hivemind's ``bandwidth``)

    member = Member()
    member.announce(reduces=False)
    assert member.bandwidth == 0.0
    member.announce(reduces=True)
    assert member.bandwidth == 7.5
