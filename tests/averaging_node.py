"""One member of a two-peer all-reduce for the timeout tests: ``NODE HOST MBPS VALUE SIZE SENDER_TIMEOUT
[MADDR]`` averages a vector of SIZE numbers, all VALUE, announcing an upload of MBPS, with the given
sender timeout (reducer timeout: twice that); the first member (no MADDR) prints its DHT's multiaddr
first. Prints the vector's min and max after the round (or ``failed ...``), then runs until stdin closes."""

import logging
import sys

import hivemind
import torch

from dedloc.swarm.optimizer import ReducerShares
from dedloc.swarm.reduction import CheckedReduction


class Averager(CheckedReduction, ReducerShares, hivemind.averaging.DecentralizedAverager):
    """dedloc's reduction path on a plain vector."""


def main(host: str, mbps: str, value: str, size: str, sender_timeout: str, maddr: str = "") -> None:
    # a failed exchange with a groupmate is logged at debug level only: stderr, shown when a test fails
    logging.getLogger("hivemind.averaging.allreduce").setLevel(logging.DEBUG)
    dht = hivemind.DHT(host_maddrs=[f"/ip4/{host}/tcp/0"], initial_peers=[maddr] if maddr else [],
                       nat_port_map=False, auto_nat=False, start=True)
    if not maddr:
        print(dht.get_visible_maddrs()[0], flush=True)
    averager = Averager([torch.full((int(size),), float(value))], dht=dht, prefix="timeouts", target_group_size=2,
                        min_matchmaking_time=2.0, request_timeout=1.0, bandwidth=float(mbps),
                        sender_timeout=float(sender_timeout), reducer_timeout=2 * float(sender_timeout),
                        allreduce_timeout=150.0, start=True)
    try:
        try:
            averager.step(timeout=150.0)
            with averager.get_tensors() as (tensor,):
                print(f"{tensor.min().item()} {tensor.max().item()}", flush=True)
        except Exception as e:
            print(f"failed {e!r}", flush=True)
        # a member whose round ended may still be sending its last results to the other: both stay
        # until the test has both results (it closes stdin)
        sys.stdin.read()
    finally:
        averager.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
