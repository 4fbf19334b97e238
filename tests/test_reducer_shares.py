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

from dedloc.swarm.optimizer import ReducerShares, _with_reducers
from dedloc.swarm.reduction import reduction_shares

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


def test_shares_follow_the_announced_upload_within_bounds():
    node, client, aux = AveragingMode.NODE, AveragingMode.CLIENT, AveragingMode.AUX
    # a capped peer reduces less; one announcing nothing counts as a home uplink
    assert reduction_shares(1000, [(5.0, node), (None, node), (None, node)]) == (111, 445, 444)
    assert reduction_shares(1000, [(None, node), (None, node)]) == (500, 500)
    # a claim far above the others' counts as 4 x their median, never the whole vector
    # (hivemind's linear program gives a member only twice as fast everything)
    assert reduction_shares(1000, [(1e9, node), (None, node), (None, node)]) == (668, 166, 166)
    assert load_balance_peers(1000, [40.0, 20.0, 20.0]) == (1000, 0, 0)
    # newcomers (0), client-mode members and nonsense reduce nothing; an auxiliary helper reduces
    assert reduction_shares(1000, [(None, aux), (0.0, node), (7.0, client)]) == (1000, 0, 0)
    assert reduction_shares(100, [(float("nan"), node), (-3.0, node), (None, node)]) == (0, 0, 100)
    # nobody reducing: every member not in client mode takes an equal share
    assert reduction_shares(1000, [(0.0, node), (0.0, node), (None, client)]) == (500, 500, 0)
    # every member computes the same split from the same announcements, and all of it is assigned
    shares = reduction_shares(107952, [(3.3, node), (12.5, node), (None, aux), (0.0, node)])
    assert sum(shares) == 107952 and shares == reduction_shares(107952, [(3.3, node), (12.5, node), (None, aux), (0.0, node)])


def test_a_peer_keeps_its_upload_cap_between_rounds_it_sits_out():
    class Member(ReducerShares):
        bandwidth = 7.5  # as given to the averager (hivemind's ``bandwidth``)

    member = Member()
    member.announce(reduces=False)
    assert member.bandwidth == 0.0
    member.announce(reduces=True)
    assert member.bandwidth == 7.5


def test_a_measured_upload_is_announced_from_the_next_round_on():
    class Member(ReducerShares):
        bandwidth = None  # none given: hivemind's "as the group's others"

    member = Member()
    member.announce(reduces=True)
    assert member.bandwidth is None
    member.set_upload_mbps(18.7)  # the measurement arrives while the peer trains
    member.announce(reduces=False)
    assert member.bandwidth == 0.0  # a round it sits out still announces no share
    member.announce(reduces=True)
    assert member.bandwidth == 18.7
