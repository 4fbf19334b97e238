"""``dedloc status``: where a run stands, from any machine that can reach its swarm.

Joins the DHT as a client (no incoming connections, nothing trained, nothing published), reads what
the coordinator signed — the run status and its summary (step, loss, held-out loss, throughput, peers,
top contributors) — and the peers' own metrics records, prints them and leaves.

When the coordinator's summary is missing (it has not published one yet), the figures come from the
peers' records alone and the output says so.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from hivemind.dht.crypto import RSASignatureValidator
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dedloc.errors import SwarmUnreachableError
from dedloc.lifecycle import GracefulExit, poll_until
from dedloc.logs import short_id
from dedloc.swarm.join_url import expand_join
from dedloc.swarm.access import SwarmAuthorizer, ask_the_desk
from dedloc.swarm.addresses import parse_join_addresses
from dedloc.swarm.identity import Identity
from dedloc.swarm.node import NetworkOptions, start_dht
from dedloc.swarm.records import (
    ONLINE_WINDOW,
    ManifestHeader,
    fetch_manifest_header,
    fetch_metrics,
    fetch_status,
    fetch_summary,
)

logger = logging.getLogger(__name__)



@dataclass
class StatusOptions:
    join: Sequence[str]
    as_json: bool = False
    timeout: float = 20.0
    """Give up (exit 3) when the swarm or the coordinator's records cannot be reached within this."""
    invite: Optional[str] = None
    """A volunteer's invite, for a run with an allowlist (its DHT answers members only)."""


def read_swarm_status(options: StatusOptions, stop: GracefulExit) -> dict:
    """Join as a client, collect the run's figures, leave. Raises :class:`SwarmUnreachableError`.

    ``options.join`` may name the coordinator's dashboard (``http://HOST:PORT``) instead of a multiaddr:
    its ``/api/join`` gives the addresses (within ``options.timeout``; see :func:`expand_join`)."""
    join = parse_join_addresses(expand_join(options.join, options.timeout, stop))
    deadline = time.monotonic() + options.timeout
    identity = Identity.create_ephemeral()
    identity.bind_to_process()
    dht = None
    try:
        # an open run answers anyone; a run with an allowlist only members (AccessRefused says why not)
        # without an invite the desk gets a third of this (10 s by default, as for a peer): on a busy
        # machine a shorter wait took a closed run for an open one, and the answer was "cannot reach"
        grant = ask_the_desk(identity, join.as_strings, join.coordinator_id, options.invite,
                             timeout=max(3.0, options.timeout * 1.5))
        dht = start_dht(
            identity, NetworkOptions(client_mode=True), initial_peers=join.as_strings,
            validators=[RSASignatureValidator()], startup_timeout=max(1.0, options.timeout - 5.0), stop=stop.requested,
            authorizer=SwarmAuthorizer(grant.authority, grant.token) if grant and grant.token else None,
        )
        manifest: ManifestHeader = poll_until(
            lambda: fetch_manifest_header(dht, join.coordinator_id, timeout=max(0.5, deadline - time.monotonic())),
            max(0.0, deadline - time.monotonic()),
            stop,
            lambda: SwarmUnreachableError(
                f"reached the swarm, but no run published by coordinator {join.coordinator_id.to_base58()} "
                f"appeared within {options.timeout:.0f} s: is the address that of a running dedloc coordinator?"
            ),
        )
        remaining = lambda: max(0.5, min(5.0, deadline - time.monotonic()))  # noqa: E731
        status = fetch_status(dht, join.coordinator_id, timeout=remaining())
        summary = fetch_summary(dht, join.coordinator_id, timeout=remaining())
        metrics, _ = fetch_metrics(dht, manifest.swarm_prefix, timeout=remaining())
    finally:
        if dht is not None:
            dht.shutdown()
        identity.discard()
    now = time.time()
    online = sorted(
        (m for m in metrics.values() if now - m.time < ONLINE_WINDOW), key=lambda m: m.samples, reverse=True
    )
    config = manifest.config
    result = dict(
        run_id=config.run_id,
        coordinator=join.coordinator_id.to_base58(),
        config_sha256=manifest.config_sha256,
        tokenizer_sha256=manifest.tokenizer_sha256,
        stop_at=status.stop_at if status and status.stop_at is not None else config.training.total_steps,
        finished=bool(status and status.finished),
        checkpoint_step=status.checkpoint_step if status else None,
        source="coordinator" if summary is not None else "peers",
        peers_online=[
            dict(peer=short_id(m.peer_id), volunteer=m.volunteer, device=m.device, step=m.step,
                 samples_per_second=m.samples_per_second, samples=m.samples, last_seen=m.time)
            for m in online
        ],
    )
    if summary is not None:
        result.update(
            step=summary.step, loss=summary.loss, heldout_loss=summary.heldout_loss, heldout_step=summary.heldout_step,
            samples_per_second=summary.samples_per_second, peers=summary.peers, samples=summary.samples,
            summary_age=max(0.0, now - summary.updated_at), top_contributors=[c.model_dump() for c in summary.top],
        )
    else:
        newest = max((m.step for m in online), default=0)
        losses = [m.loss for m in online if m.step == newest and m.loss is not None]
        result.update(
            step=newest, loss=sum(losses) / len(losses) if losses else None, heldout_loss=None, heldout_step=None,
            samples_per_second=sum(m.samples_per_second for m in online), peers=len(online),
            samples=sum(m.samples for m in online), summary_age=None,
            top_contributors=[dict(name=m.volunteer or short_id(m.peer_id), samples=m.samples) for m in online[:10]],
        )
    return result


def _plain(name: str) -> Text:
    """A name a peer published, shown literally: no rich markup, no terminal control characters."""
    return Text("".join(c if c.isprintable() else "?" for c in name))


def print_status(result: dict, console: Optional[Console] = None) -> None:
    console = console or Console()
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    heldout = "n/a" if result["heldout_loss"] is None else f"{result['heldout_loss']:.4f} (step {result['heldout_step']})"
    state = "finished" if result["finished"] else "training"
    table = Table(title=_plain(f"run {result['run_id']} — {state}"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("global step", f"{result['step']} / {result['stop_at']}")
    table.add_row("training loss", loss)
    table.add_row("held-out loss", heldout)
    table.add_row("samples/s", f"{result['samples_per_second']:.1f}")
    table.add_row("peers online", str(result["peers"]))
    table.add_row("samples trained", f"{result['samples']:,}")
    table.add_row("latest checkpoint", "none" if result["checkpoint_step"] is None else f"step {result['checkpoint_step']}")
    if result["summary_age"] is not None:
        table.add_row("as of", f"{result['summary_age']:.0f} s ago (the coordinator's summary)")
    if result["source"] != "coordinator":
        table.add_row("note", "the coordinator has not published its summary yet: figures from the peers' records")
    console.print(table)
    if result["top_contributors"]:
        top = Table(title="top contributors", title_justify="left")
        top.add_column("#", justify="right")
        top.add_column("volunteer")
        top.add_column("samples", justify="right")
        for rank, row in enumerate(result["top_contributors"], 1):
            top.add_row(str(rank), _plain(row["name"]), f"{row['samples']:,}")
        console.print(top)


def run_status(options: StatusOptions, stop: Optional[GracefulExit] = None) -> int:
    stop = stop or GracefulExit.install("status")
    result = read_swarm_status(options, stop)
    if options.as_json:
        print(json.dumps(result, indent=2))
    else:
        print_status(result)
    return 0
