"""A peer reads the swarm's progress records when it asks to, not only at hivemind's next scheduled
read (up to 10 s away before anyone has trained): at the start of a run, the peers see one another
and take their first step together sooner."""

from __future__ import annotations

from functools import partial

import hivemind
import pytest
import torch
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dedloc.swarm.optimizer import ReportingGradientAverager, SwarmOptimizer
from helpers import wait_for

pytestmark = pytest.mark.timeout(120)

BATCH = 10**6  # a step so far away that hivemind's tracker reads the records at its longest period


def _records(dht: hivemind.DHT, key: str) -> dict:
    found = dht.get(key, latest=True)
    return found.value if found is not None and isinstance(found.value, dict) else {}


def test_a_refresh_shows_a_newly_announced_peer_before_the_next_scheduled_read():
    local = dict(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, auto_nat=False)
    dht = hivemind.DHT(**local)
    other_dhts = [hivemind.DHT(**local, initial_peers=[str(a) for a in dht.get_visible_maddrs()]) for _ in range(2)]
    others, opt = [], None
    try:
        # each with its own key: a record is stored under its signer's public key
        others = [ProgressTracker(d, prefix="start", target_batch_size=BATCH, private_key=RSAPrivateKey(), start=True)
                  for d in other_dhts]
        opt = SwarmOptimizer(
            dht=dht, run_id="start", target_batch_size=BATCH, batch_size_per_step=4,
            params=torch.nn.Linear(4, 1).parameters(), optimizer=partial(torch.optim.SGD, lr=0.1),
            matchmaking_time=1.0, averaging_timeout=4.0, grad_averager_factory=ReportingGradientAverager,
        )
        others[0].report_local_progress(local_epoch=0, samples_accumulated=4)
        wait_for(lambda: len(_records(dht, opt.tracker.training_progress_key)) == 1, 30, "the first record stored")
        opt.refresh_swarm_progress()
        wait_for(lambda: opt.tracker.global_progress.num_peers == 1, 30, "the first peer's record")
        scheduled = opt.tracker.global_progress.next_fetch_time  # the read after the one that saw it
        assert scheduled - get_dht_time() > 5.0, "hivemind's tracker reads often here: the test shows nothing"

        others[1].report_local_progress(local_epoch=0, samples_accumulated=4)
        wait_for(lambda: len(_records(dht, opt.tracker.training_progress_key)) == 2, 30, "the second record stored")
        opt.refresh_swarm_progress()
        wait_for(lambda: opt.tracker.global_progress.num_peers == 2, 30, "the second peer's record")
        assert get_dht_time() < scheduled, "the newcomer showed only at the tracker's scheduled read"
    finally:
        if opt is not None:
            opt.shutdown()
        for tracker in others:
            tracker.shutdown()
        for d in (*other_dhts, dht):
            d.shutdown()
