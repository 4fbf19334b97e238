"""``dedloc coordinator``: the run's anchor.

It owns a persistent identity and port in its state directory (see :mod:`.state_dir`), so the join
command it prints stays valid across restarts; bootstraps the DHT; publishes the signed run manifest,
status and summary; logs one line per global step and keeps the history (``history.jsonl`` and the
dashboard's store); writes checkpoints every N steps and evaluates each on the held-out set; serves
the dashboard; and ends the run at its last step (final checkpoint, then "finished" for the peers).

On a restart it resumes from its newest valid checkpoint: tracking continues from the recorded history,
and the checkpoint is served to peers, so if every peer had left, the first to join continues from it
(weights, optimizer state, global step) rather than from scratch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import SchemaValidator
from hivemind.optim.progress_tracker import TrainingProgressSchema

from dedloc.checkpoint import latest_valid_checkpoint, list_checkpoints
from dedloc.config import RunConfig, default_run_config, load_run_config
from dedloc.errors import SwarmUnreachableError, UserInputError
from dedloc.lifecycle import GracefulExit, raise_open_files_limit
from dedloc.logs import setup_logging
from dedloc.allowlist import load_allowlist
from dedloc.swarm.access import DEFAULT_TOKEN_LIFETIME, Admission, SwarmAuthorizer, publish_revoked, set_revoked
from dedloc.swarm.addresses import listen_maddr
from dedloc.swarm.identity import Identity
from dedloc.swarm.node import NetworkOptions, connected_peer_maddrs, start_dht, tcp_port, visible_maddrs
from dedloc.swarm.records import (
    RunManifest,
    RunStatus,
    metrics_validator,
    publish_manifest,
    publish_status,
    publish_summary,
)
from dedloc.task.build import prepare_tokenizer

from .admission import AccessDesk, serve_access
from .checkpointer import Checkpointer
from .dashboard import Dashboard
from .history_store import HistoryStore
from .run_view import RunView
from .state_dir import StateDir, write_json_atomic
from .tracker import SwarmTracker, fetch_next_step

logger = logging.getLogger(__name__)

REPUBLISH_PERIOD = 60.0
SUMMARY_PERIOD = 10.0
NEXT_STEP_PERIOD = 2.0
KNOWN_PEERS_PERIOD = 10.0
PEERS_LEAVE_GRACE = 30.0
LAST_STEPS_GRACE = 30.0
END_AT_FILE = "END_AT"  # in the state directory: the organiser's request to end the run early
END_MARGIN = 3  # steps: an end moved past the peers leaves them time to hear of it (a step takes seconds)


@dataclass
class CoordinatorOptions:
    config: Optional[Path]
    """Run configuration file; None for the embedded default run."""
    workdir: Path
    host: str = "127.0.0.1"
    port: int = 0
    """0: the port remembered from the first start, or any free port on the first start."""
    announce_maddrs: Sequence[str] = ()
    nat_traversal: bool = False
    max_steps: Optional[int] = None
    """End the run after this global step (default: the config's total_steps)."""
    join_file: Optional[Path] = None
    """Also write the join information here (e.g. a volume shared with peers in docker compose)."""
    allowlist: Optional[Path] = None
    """Admit only the volunteers listed here (re-read when it changes); None: the run is open."""
    token_lifetime: float = DEFAULT_TOKEN_LIFETIME
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 0
    """0: the port remembered from the first start, or any free port on the first start."""
    log_level: str = "info"


def run_coordinator(options: CoordinatorOptions, stop: Optional[GracefulExit] = None) -> int:
    """Run the coordinator until the run ends (0) or a stop is requested (130)."""
    stop = stop or GracefulExit.install("coordinator")
    raise_open_files_limit()
    config = load_run_config(options.config) if options.config is not None else default_run_config()
    if options.allowlist is not None:
        load_allowlist(options.allowlist)  # unreadable or malformed: refuse to start (exit 2)
    if options.max_steps is not None and options.max_steps <= 0:
        raise UserInputError(f"--max-steps must be positive (got {options.max_steps})")
    state = StateDir(options.workdir.expanduser().resolve())
    state.lock()
    try:
        return Coordinator(options, config, state, stop).run()
    finally:
        state.unlock()


class Coordinator:
    def __init__(self, options: CoordinatorOptions, config: RunConfig, state: StateDir, stop: GracefulExit):
        self.options, self.config, self.state, self.stop = options, config, state, stop
        self.stop_at = min(options.max_steps or config.training.total_steps, config.training.total_steps)
        self.identity = Identity.load_or_create(state.identity)
        self.identity.bind_to_process()
        setup_logging(options.log_level, "coordinator", self.identity.peer_id.to_base58())
        self.manifest = RunManifest.create(config, prepare_tokenizer(config, state.path, cache_dir=state.path / "cache"))
        self.resumed = latest_valid_checkpoint(state.checkpoints)
        if self.resumed is None and list_checkpoints(state.checkpoints):
            raise UserInputError(
                f"none of the checkpoints in {state.checkpoints} verifies (see the warnings above); "
                "move them away to start the run from scratch"
            )
        self.desk = AccessDesk(options.allowlist, config.run_id, options.token_lifetime)
        self.revoked: Optional[list[str]] = None
        self.dht: Optional[hivemind.DHT] = None
        self.checkpointer: Optional[Checkpointer] = None
        self.store = HistoryStore.open(state.path / "history.db", jsonl=state.history)
        self.view = RunView(self.manifest, self.store, state.path, self.stop_at)
        self.dashboard: Optional[Dashboard] = None
        self._bad_end_request: Optional[str] = None
        self.status = RunStatus(
            config.run_id, self.manifest.config_sha256, self.manifest.tokenizer_sha256, stop_at=self.stop_at,
            finished=False, checkpoint_step=self.resumed.step if self.resumed else None,
        )

    # ----------------------------------------------------------------------------------------------
    def start_node(self) -> hivemind.DHT:
        """Start the DHT on the configured port, else the one remembered from the first start; rejoin the
        peers seen last time if any is still there."""
        port = self.options.port or self.state.remembered_port() or 0
        network = NetworkOptions(
            host_maddrs=[listen_maddr(self.options.host, port)],
            announce_maddrs=self.options.announce_maddrs,
            nat_traversal=self.options.nat_traversal,
        )
        prefix = self.manifest.swarm_prefix
        validators = [
            RSASignatureValidator(),
            metrics_validator(prefix),
            SchemaValidator(TrainingProgressSchema, prefix=prefix),
        ]
        authorizer = None
        if self.options.allowlist is not None:
            authorizer = SwarmAuthorizer(self.identity.public_key, mint_lifetime=self.options.token_lifetime)
        known = self.state.known_peers()
        if known:
            try:
                return start_dht(self.identity, network, known, validators, startup_timeout=10.0, stop=self.stop.requested,
                                 authorizer=authorizer)
            except SwarmUnreachableError:
                logger.info("none of the peers seen before is reachable; starting a fresh swarm")
        try:
            return start_dht(self.identity, network, validators=validators, stop=self.stop.requested, authorizer=authorizer)
        except Exception as e:
            if port and not self.options.port:
                raise UserInputError(
                    f"cannot listen on port {port}, remembered from this coordinator's first start so that its "
                    f"join address stays valid ({e}); free the port or pass --port"
                ) from None
            raise

    def publish(self) -> None:
        # the status first: it is small and may carry news (a new end); the manifest is unchanged
        publish_status(self.dht, self.identity.public_key, self.identity.peer_id, self.status)
        publish_manifest(self.dht, self.identity.public_key, self.identity.peer_id, self.manifest)
        if self.revoked is not None:
            publish_revoked(self.dht, self.identity.public_key, self.identity.peer_id, self.revoked)

    def follow_allowlist(self) -> None:
        """Apply a changed allowlist's revocations: this node's DHT stops accepting the revoked volunteers'
        tokens, and every averager learns their names (the desk re-reads the file on its own)."""
        allowlist = self.desk.allowlist()
        if allowlist is None or allowlist.revoked_names == self.revoked:
            return
        self.revoked = allowlist.revoked_names
        set_revoked(self.dht, self.revoked)
        publish_revoked(self.dht, self.identity.public_key, self.identity.peer_id, self.revoked)
        if self.revoked:
            logger.info(f"revoked volunteers: {', '.join(self.revoked)}")

    def open_access_desk(self) -> None:
        serve_access(self.dht, self.desk)
        if self.options.allowlist is None:
            logger.warning(
                "this run is OPEN: anyone who learns its join address can train, average and download the model. "
                "To admit invited volunteers only, start the coordinator with --allowlist FILE (see `dedloc allowlist`)"
            )
        else:
            Admission(self.identity.public_key, self.identity.peer_id).bind_to_process()
            self.follow_allowlist()

    def start_dashboard(self) -> Optional[str]:
        """Serve the dashboard on the configured port, else the one remembered from the first start
        (or any free one if that is taken now)."""
        if not self.options.dashboard:
            return None
        port = self.options.dashboard_port or self.state.remembered_port("dashboard_port") or 0
        self.dashboard = Dashboard(self.view, self.options.dashboard_host, port)
        try:
            url = self.dashboard.start()
        except UserInputError:
            if self.options.dashboard_port or not port:
                raise
            logger.warning(f"the dashboard's port {port} from the first start is taken now; using a free port")
            self.dashboard = Dashboard(self.view, self.options.dashboard_host, 0)
            url = self.dashboard.start()
        self.state.remember(dashboard_port=self.dashboard.port)
        return url

    def announce_join(self, dashboard_url: Optional[str]) -> list[str]:
        join = visible_maddrs(self.dht)
        self.state.remember(port=tcp_port(join))
        info = dict(
            peer_id=self.identity.peer_id.to_base58(),
            join=join,
            run_id=self.config.run_id,
            config_sha256=self.manifest.config_sha256,
            tokenizer_sha256=self.manifest.tokenizer_sha256,
            dashboard=dashboard_url,
            pid=os.getpid(),
        )
        write_json_atomic(self.state.path / "coordinator.json", info)
        if self.options.join_file is not None:
            try:
                self.options.join_file.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(self.options.join_file, info)
            except OSError as e:
                raise UserInputError(f"cannot write --join-file {self.options.join_file}: {e.strerror or e}") from None
        if self.dashboard is not None:  # `dedloc peer --join http://<dashboard>` reads it from /api/join
            self.dashboard.publish_join(info)
        logger.info(
            f"run '{self.config.run_id}' is up (config {self.manifest.config_sha256[:12]}, tokenizer "
            f"{self.manifest.tokenizer_sha256[:12]}, ends at step {self.stop_at}); volunteers join with:"
        )
        invite = " --invite <the volunteer's invite>" if self.options.allowlist is not None else ""
        print(f"dedloc peer --join {' '.join(join)}{invite}", flush=True)
        if dashboard_url:
            print(f"dashboard: {dashboard_url}", flush=True)
        return join

    def record_steps(self, tracker: SwarmTracker, history, final: bool = False) -> None:
        """Log every newly finished global step, append it to ``history.jsonl`` and the store, and
        update the live figures and per-peer contributions (``final``: see :meth:`SwarmTracker.poll`)."""
        for record in tracker.poll(final=final):
            logger.info(record.log_line())
            history.write(json.dumps(record.to_json()) + "\n")
            history.flush()
            self.store.add_step(record.to_json())
            self.view.update(loss=record.loss)
        self.store.update_contributions(tracker.alive, time.time())
        self.view.update(
            step=tracker.global_step,
            peers=len(tracker.alive),
            samples_per_second=sum(m.samples_per_second for m in tracker.alive.values()),
            samples=max(self.view.live.samples, tracker.total_samples, sum(p["samples"] for p in self.store.peers())),
        )

    def note_checkpoint(self) -> None:
        latest = self.checkpointer.latest
        if latest is not None and latest.step != self.view.live.checkpoint_step:
            self.view.update(checkpoint_step=latest.step, checkpoint_time=latest.saved_at, checkpoint_path=latest.path)
        if latest is not None and latest.step != self.status.checkpoint_step:
            self.status = dataclasses.replace(self.status, checkpoint_step=latest.step)
            publish_status(self.dht, self.identity.public_key, self.identity.peer_id, self.status)

    def publish_summary(self) -> None:
        try:
            publish_summary(self.dht, self.identity.public_key, self.identity.peer_id, self.view.summary(), timeout=5.0)
        except Exception as e:  # the summary is informative: never let it stop the run
            logger.debug(f"cannot publish the run summary: {e!r}")

    # ----------------------------------------------------------------------------------------------
    def run(self) -> int:
        self.dht = self.start_node()
        try:
            self.open_access_desk()
            self.checkpointer = Checkpointer(
                self.dht, self.manifest, self.state.checkpoints, on_heldout=self.store.add_heldout,
                cache_dir=self.state.path / "cache",
            )
            if self.resumed is not None:
                started = time.monotonic()
                self.checkpointer.resume(self.resumed)
                logger.info(
                    f"resumed from checkpoint step={self.resumed.step} ({self.resumed.path}) in "
                    f"{time.monotonic() - started:.1f} s; serving it to peers that join"
                )
                self.note_checkpoint()
                self.checkpointer.evaluate_saved(
                    list_checkpoints(self.state.checkpoints), self.store.heldout_steps(), stop=self.stop.requested
                )
            self.publish()
            dashboard_url = self.start_dashboard()
            self.announce_join(dashboard_url)
            start_step = max(self.state.last_recorded_step(), self.resumed.step if self.resumed else 0)
            tracker = SwarmTracker(self.dht, self.manifest.swarm_prefix, last_step=self.stop_at, start_step=start_step)
            with open(self.state.history, "a", encoding="utf-8") as history:
                if tracker.global_step < self.stop_at:
                    self.track(tracker, history)
                if self.stop.is_set():
                    logger.info(f"stopped ({self.stop.reason}) at global step {tracker.global_step}")
                    return 130
                return self.finish(tracker, history)
        finally:
            if self.checkpointer is not None:
                self.checkpointer.shutdown(timeout=0 if self.stop.is_set() else 10)
            if self.dashboard is not None:
                self.dashboard.stop()
            self.dht.shutdown()
            self.store.close()

    def track(self, tracker: SwarmTracker, history) -> None:
        """Follow the swarm until the run's last step (or a stop), checkpointing every N steps."""
        every = self.config.checkpoint.every_steps
        next_checkpoint = (tracker.global_step // every + 1) * every
        last_publish = last_peers = last_summary = last_next_step = time.monotonic()
        while not self.stop.is_set():
            self.record_steps(tracker, history)
            self.check_end_request(tracker)
            self.follow_allowlist()
            if tracker.global_step >= self.stop_at:
                return
            if time.monotonic() - last_next_step > NEXT_STEP_PERIOD:
                target = self.config.training.target_batch_size
                next_step = fetch_next_step(self.dht, self.manifest.swarm_prefix, target)
                self.view.update(samples_accumulated=next_step.samples_accumulated, eta_next_step=next_step.eta)
                last_next_step = time.monotonic()
            if time.monotonic() - last_summary > SUMMARY_PERIOD:
                self.publish_summary()
                last_summary = time.monotonic()
            if tracker.global_step >= next_checkpoint and self.checkpointer.start(tracker.global_step, self.stop.requested):
                next_checkpoint = (tracker.global_step // every + 1) * every
            self.note_checkpoint()
            if time.monotonic() - last_publish > REPUBLISH_PERIOD:
                self.publish()
                last_publish = time.monotonic()
            if time.monotonic() - last_peers > KNOWN_PEERS_PERIOD:
                peers = connected_peer_maddrs(self.dht)  # to find the swarm again after a restart
                if peers:
                    self.state.remember(peers=peers)
                last_peers = time.monotonic()
            self.stop.wait(1.0)

    def check_end_request(self, tracker: SwarmTracker) -> None:
        """End the run early if the organiser wrote a step into ``END_AT`` in the state directory.

        The run ends at that step, or — if some live peer is already there or close (the coordinator's
        own view may lag the peers by a few steps) — ``END_MARGIN`` steps past the furthest one, so
        that the peers hear of the end before they get there; a request beyond the current end is
        ignored. Peers learn the new end from the published status and finish with
        a final state-averaging round, as at the planned end. The file stays, so a restarted
        coordinator keeps to it.
        """
        path = self.state.path / END_AT_FILE
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return
        except OSError as e:
            text = f"<unreadable: {e}>"
        try:
            wanted = int(text)
        except ValueError:
            if text != self._bad_end_request:
                logger.warning(f"{path} should hold a step number (got {text[:40]!r}); ignoring it")
                self._bad_end_request = text
            return
        end = max(wanted, tracker.global_step + END_MARGIN, tracker.highest_claim + END_MARGIN)
        if end >= self.stop_at:
            return
        logger.info(f"ending the run at step {end}, as {path} asks (it was to end at step {self.stop_at})")
        self.stop_at = tracker.last_step = self.view.stop_at = end
        self.status = dataclasses.replace(self.status, stop_at=end)
        publish_status(self.dht, self.identity.public_key, self.identity.peer_id, self.status)

    def finish(self, tracker: SwarmTracker, history) -> int:
        """Final checkpoint, then announce the end and give the peers time to leave."""
        stop_at, checkpointer = self.stop_at, self.checkpointer
        logger.info(f"the run reached step {tracker.global_step}: writing the final checkpoint")
        deadline = time.monotonic() + LAST_STEPS_GRACE
        while tracker.logged_until < stop_at and time.monotonic() < deadline and not self.stop.is_set():
            self.record_steps(tracker, history)  # the last steps, as the remaining peers report them
            self.stop.wait(0.5)
        if tracker.logged_until < stop_at:
            self.record_steps(tracker, history, final=True)  # a straggler is still short of the end: log without it
        budget = time.monotonic() + 3 * (self.config.averaging.load_state_timeout + 2.0) + 60.0
        while checkpointer.busy and time.monotonic() < budget and not self.stop.is_set():
            checkpointer.wait(timeout=1.0)  # a periodic checkpoint still running
        latest = checkpointer.latest
        saved = latest if latest is not None and latest.step >= stop_at else None
        if saved is None:
            saved = checkpointer.save(stop_at, attempts=5, stop=self.stop.requested)
        if saved is None and checkpointer.latest is None:
            logger.error("the run ended without a checkpoint: no peer served its state")
        final = saved or checkpointer.latest
        # a peer whose final round went astray (split groups, a round left half-done unnoticed) compares
        # its parameters with this sketch and downloads the final checkpoint's state
        sketch = checkpointer.offer_as_final() if saved is not None else None
        # peers that stepped past the end before they heard of it may have given a later final state
        final_step = max(tracker.global_step, saved.step if saved else 0)
        self.status = dataclasses.replace(
            self.status, finished=True, final_step=final_step, checkpoint_step=final.step if final else None,
            final_sketch=sketch,
        )
        publish_status(self.dht, self.identity.public_key, self.identity.peer_id, self.status)
        self.note_checkpoint()
        self.view.update(finished=True, step=final_step, samples_accumulated=0, eta_next_step=None)
        self.publish_summary()
        logger.info(f"run finished at step {final_step}; final checkpoint: {final.path if final else 'none'}")
        deadline = time.monotonic() + PEERS_LEAVE_GRACE
        while time.monotonic() < deadline and not self.stop.is_set():
            tracker.poll()
            if not tracker.alive:
                break
            self.stop.wait(1.0)
        return 0
