"""``dedloc coordinator``: the run's anchor.

It owns a persistent identity in its state directory (its libp2p peer id is in the join address and
signs the run config), bootstraps the DHT, publishes the run manifest and status, prints the join
command, logs one line per global step, keeps a history, writes checkpoints every N steps and ends the
run at its last step (final checkpoint, then "finished" for the peers).

Files in the state directory: ``identity.key``, ``tokenizer.json``, ``coordinator.json`` (join
addresses, written once the node is up), ``history.jsonl`` (one line per global step),
``checkpoints/``, ``cache/``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema

from dedloc.config import default_run_config, load_run_config
from dedloc.errors import UserInputError
from dedloc.lifecycle import GracefulExit
from dedloc.logs import setup_logging
from dedloc.swarm.addresses import listen_maddr
from dedloc.swarm.identity import Identity
from dedloc.swarm.node import NetworkOptions, start_dht, visible_maddrs
from dedloc.swarm.records import RunManifest, RunStatus, metrics_validator, publish_manifest, publish_status
from dedloc.task.build import prepare_tokenizer

from .checkpointer import Checkpointer
from .tracker import SwarmTracker

logger = logging.getLogger(__name__)

REPUBLISH_PERIOD = 60.0
PEERS_LEAVE_GRACE = 30.0


@dataclass
class CoordinatorOptions:
    config: Optional[Path]
    """Run configuration file; None for the embedded default run."""
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    announce_maddrs: Sequence[str] = ()
    nat_traversal: bool = False
    max_steps: Optional[int] = None
    """End the run after this global step (default: the config's total_steps)."""
    join_file: Optional[Path] = None
    """Also write the join information here (e.g. a volume shared with peers in docker compose)."""
    log_level: str = "info"


def _lock_workdir(workdir: Path):
    """Hold an exclusive lock on the state directory for the life of the process."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        handle = open(workdir / "coordinator.lock", "a+")
    except OSError as e:
        raise UserInputError(f"cannot use state directory {workdir}: {e.strerror or e}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserInputError(f"another coordinator is running with state directory {workdir}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_coordinator(options: CoordinatorOptions, stop: Optional[GracefulExit] = None) -> int:
    stop = stop or GracefulExit.install("coordinator")
    config = load_run_config(options.config) if options.config is not None else default_run_config()
    if options.max_steps is not None and options.max_steps <= 0:
        raise UserInputError(f"--max-steps must be positive (got {options.max_steps})")
    stop_at = min(options.max_steps or config.training.total_steps, config.training.total_steps)
    host_maddr = listen_maddr(options.host, options.port)
    workdir = options.workdir.expanduser().resolve()
    lock = _lock_workdir(workdir)
    identity = Identity.load_or_create(workdir / "identity.key")
    identity.bind_to_process()
    setup_logging(options.log_level, "coordinator", identity.peer_id.to_base58())

    tokenizer_json = prepare_tokenizer(config, workdir, cache_dir=workdir / "cache")
    manifest = RunManifest.create(config, tokenizer_json)
    validators = [
        RSASignatureValidator(),
        metrics_validator(config.run_id),
        SchemaValidator(TrainingProgressSchema, prefix=config.run_id),
    ]
    network = NetworkOptions(
        host_maddrs=[host_maddr], announce_maddrs=options.announce_maddrs, nat_traversal=options.nat_traversal
    )
    dht = start_dht(identity, network, validators=validators, stop=stop.requested)
    checkpointer = None
    try:
        status = RunStatus(config.run_id, manifest.config_sha256, stop_at=stop_at, finished=False)
        publish_manifest(dht, identity.public_key, identity.peer_id, manifest)
        publish_status(dht, identity.public_key, identity.peer_id, status)
        join = visible_maddrs(dht)
        join_info = dict(
            peer_id=identity.peer_id.to_base58(),
            join=join,
            run_id=config.run_id,
            config_sha256=manifest.config_sha256,
            tokenizer_sha256=manifest.tokenizer_sha256,
            pid=os.getpid(),
        )
        _write_json_atomic(workdir / "coordinator.json", join_info)
        if options.join_file is not None:
            try:
                options.join_file.parent.mkdir(parents=True, exist_ok=True)
                _write_json_atomic(options.join_file, join_info)
            except OSError as e:
                raise UserInputError(f"cannot write --join-file {options.join_file}: {e.strerror or e}") from None
        logger.info(
            f"run '{config.run_id}' is up (config {manifest.config_sha256[:12]}, tokenizer "
            f"{manifest.tokenizer_sha256[:12]}, ends at step {stop_at}); volunteers join with:"
        )
        print(f"dedloc peer --join {' '.join(join)}", flush=True)

        checkpointer = Checkpointer(dht, manifest, workdir / "checkpoints")
        tracker = SwarmTracker(dht, config.run_id, last_step=stop_at)
        every = config.checkpoint.every_steps
        next_checkpoint = every
        last_publish = time.monotonic()
        with open(workdir / "history.jsonl", "a", encoding="utf-8") as history:
            while not stop.is_set():
                _record_steps(tracker, history)
                if tracker.global_step >= stop_at:
                    break
                if tracker.global_step >= next_checkpoint:
                    if checkpointer.start(tracker.global_step, stop=stop.requested):
                        next_checkpoint = (tracker.global_step // every + 1) * every
                if time.monotonic() - last_publish > REPUBLISH_PERIOD:
                    publish_manifest(dht, identity.public_key, identity.peer_id, manifest)
                    publish_status(dht, identity.public_key, identity.peer_id, status)
                    last_publish = time.monotonic()
                stop.wait(1.0)
            if stop.is_set():
                logger.info(f"stopped ({stop.reason}) at global step {tracker.global_step}")
                return 130
            return _finish_run(dht, identity, checkpointer, tracker, history, status, stop_at, stop)
    finally:
        if checkpointer is not None:
            checkpointer.shutdown(timeout=0 if stop.is_set() else 10)
        dht.shutdown()
        lock.close()


def _record_steps(tracker: SwarmTracker, history) -> None:
    """Log every newly finished global step and append it to ``history.jsonl``."""
    for record in tracker.poll():
        logger.info(record.log_line())
        history.write(json.dumps(record.to_json()) + "\n")
        history.flush()


def _checkpoint_budget(checkpointer: Checkpointer) -> float:
    """How long a running checkpoint may take: its downloads, plus time to write."""
    return 3 * (checkpointer.config.averaging.load_state_timeout + 2.0) + 60.0


def _finish_run(
    dht, identity, checkpointer: Checkpointer, tracker: SwarmTracker, history, status: RunStatus, stop_at: int, stop
) -> int:
    """Final checkpoint, then announce the end and give the peers time to leave."""
    logger.info(f"the run reached step {tracker.global_step}: writing the final checkpoint")
    deadline = time.monotonic() + 30.0
    while tracker.logged_until < stop_at and time.monotonic() < deadline and not stop.is_set():
        _record_steps(tracker, history)  # the last steps, as the remaining peers report them
        stop.wait(0.5)
    budget = time.monotonic() + _checkpoint_budget(checkpointer)
    while checkpointer.busy and time.monotonic() < budget and not stop.is_set():
        checkpointer.wait(timeout=1.0)  # a periodic checkpoint still running
    saved = checkpointer.save(stop_at, attempts=5, stop=stop.requested)
    if saved is None and checkpointer.latest is None:
        logger.error("the run ended without a checkpoint: no peer served its state")
    final = saved or checkpointer.latest
    finished = RunStatus(
        status.run_id,
        status.config_sha256,
        stop_at=stop_at,
        finished=True,
        final_step=tracker.global_step,
        checkpoint_step=final.step if final else None,
    )
    publish_status(dht, identity.public_key, identity.peer_id, finished)
    logger.info(f"run finished at step {tracker.global_step}; final checkpoint: {final.path if final else 'none'}")
    deadline = time.monotonic() + PEERS_LEAVE_GRACE
    while time.monotonic() < deadline and not stop.is_set():
        tracker.poll()
        if not tracker.alive:
            break
        stop.wait(1.0)
    return 0
