"""``dedloc peer``: join a swarm with only its address, train, leave cleanly.

Order of things (and of shutdown, reversed): identity → DHT → verified run manifest → task (tokenizer,
seeded model, this peer's data stream) → hivemind optimizer → wait for the swarm → sync state →
train → (at the end) wait for the coordinator's final checkpoint → optional snapshot → goodbye.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from hivemind.dht.crypto import RSASignatureValidator

from dedloc.checkpoint import write_checkpoint
from dedloc.config import RunConfig
from dedloc.errors import UserInputError
from dedloc.faults import fault_pause
from dedloc.lifecycle import GracefulExit, PauseSwitch, raise_open_files_limit
from dedloc.logs import setup_logging
from dedloc.swarm.access import AccessGrant, AccessRefused, Admission, SwarmAuthorizer, ask_the_desk
from dedloc.swarm.addresses import parse_join_addresses
from dedloc.swarm.bandwidth import UploadMeasurement
from dedloc.swarm.identity import Identity
from dedloc.swarm.join_url import expand_join
from dedloc.swarm.node import NetworkOptions, start_dht
from dedloc.swarm.optimizer import build_optimizer
from dedloc.swarm.reachability import DialBackListener, announced_ports, listen_host_port, with_port
from dedloc.swarm.records import RunManifest, metrics_validator
from dedloc.task.build import PeerTask, build_peer_task, hf_tokenizer
from dedloc.task.cache_limit import prune_cache
from dedloc.task.data import peer_data_seed
from dedloc.task.gpu_busy import BusyGpuWatcher, other_gpu_processes
from dedloc.task.model import build_model, count_parameters
from dedloc.task.device import (
    ComputePlan,
    Precision,
    MicroBatchCache,
    choose_precision,
    default_cache_dir,
    describe_device,
    resolve_device,
    search_micro_batch,
)

from .access import AccessKeeper
from .auxiliary import AuxiliaryHelper
from .join import read_join_file, wait_for_manifest
from .progress_view import ProgressView
from .trainer import PeerTrainer

logger = logging.getLogger(__name__)


@dataclass
class PeerOptions:
    join: Sequence[str]
    join_file: Optional[Path] = None
    """Read the join addresses from this file (written by ``dedloc coordinator --join-file``)."""
    identity: Optional[Path] = None
    """Persistent identity file; without it the peer gets a fresh identity every start."""
    invite: Optional[str] = None
    """The volunteer's invite to a run with an allowlist."""
    invite_file: Optional[Path] = None
    workdir: Optional[Path] = None
    """Where caches (tokenized data) go; the Hugging Face cache when unset."""
    micro_batch_size: Optional[int] = None
    data: Optional[str] = None
    """Local override of the run's data source (same text, e.g. a local copy)."""
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: Sequence[str] = ()
    client_mode: bool = False
    nat_traversal: bool = False
    join_timeout: float = 30.0
    volunteer: Optional[str] = None
    snapshot_dir: Optional[Path] = None
    """Write this peer's final local state here (HF format) when it leaves."""
    threads: Optional[int] = None
    pause_when_busy: bool = False
    """Pause contributing while another program holds the (CUDA) GPU, resume once it is free."""
    device: str = "auto"
    """``auto`` (CUDA, then Apple MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    precision: str = "auto"
    """``auto`` (bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``."""
    cache_dir: Optional[Path] = None
    """Where the micro-batch size found for a GPU is kept (default: ``~/.cache/dedloc``)."""
    auxiliary: bool = False
    """Train nothing; help the swarm average (see :mod:`dedloc.peer.auxiliary`)."""
    upload_mbps: Optional[float] = None
    """This machine's upload bandwidth (Mbit/s): the share of each all-reduce it reduces follows it.
    None: measured against the coordinator (see :mod:`dedloc.swarm.bandwidth`)."""
    cache_limit_mb: Optional[int] = None
    """Disk the data cache may use; older runs' data is deleted beyond it (see :mod:`dedloc.task.cache_limit`)."""
    log_level: str = "info"
    extra_env: dict = field(default_factory=dict)


def check_writable_dir(path: Path, flag: str) -> None:
    """Fail at start, not after hours of training, when an output directory cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dedloc-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserInputError(f"{flag} {path} is not writable: {e.strerror or e}") from None


def read_invite(options: PeerOptions) -> Optional[str]:
    """The invite from ``--invite`` or ``--invite-file``; :class:`UserInputError` for an unreadable or empty one."""
    invite = options.invite
    if options.invite_file is not None:
        try:
            invite = options.invite_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserInputError(f"cannot read --invite-file {options.invite_file}: {getattr(e, 'strerror', None) or e}") from None
    if invite is None:
        return None
    invite = invite.strip()
    if not invite or len(invite) > 256 or not invite.isprintable():
        raise UserInputError("the invite is empty or malformed: paste it as the organiser sent it (dedloc-invite-…)")
    return invite


def run_peer(options: PeerOptions, stop: Optional[GracefulExit] = None) -> int:
    """Run a peer until the run ends or a stop is requested; returns the exit code (0 or 130)."""
    stop = stop or GracefulExit.install("peer")
    pause = PauseSwitch.install()  # before hivemind forks its processes: they inherit it, and ignore the signals
    raise_open_files_limit()
    if options.micro_batch_size is not None and options.micro_batch_size <= 0:
        raise UserInputError(f"--micro-batch must be positive (got {options.micro_batch_size})")
    if options.volunteer is not None and not (0 < len(options.volunteer) <= 64 and options.volunteer.isprintable()):
        raise UserInputError(
            f"--volunteer must be 1 to 64 printable characters (got {len(options.volunteer)}): it is shown on the "
            "run's leaderboard"
        )
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if options.auxiliary:
        check_auxiliary_options(options)
    device = resolve_device("cpu" if options.auxiliary else options.device)
    precision = choose_precision(device, options.precision)
    searching = device.type == "cuda" and options.micro_batch_size is None
    micro_batch_cache = MicroBatchCache(options.cache_dir or default_cache_dir()) if searching else None
    identity = Identity.load_or_create(options.identity) if options.identity else Identity.create_ephemeral()
    identity.bind_to_process()
    setup_logging(options.log_level, "peer", identity.peer_id.to_base58())
    join = parse_join_addresses(read_join_file(options.join_file, options.join_timeout, stop) if options.join_file
                                else expand_join(options.join, options.join_timeout, stop))
    if options.snapshot_dir is not None:
        check_writable_dir(options.snapshot_dir, "--snapshot-dir")
    invite = read_invite(options)
    cache_dir = None if options.auxiliary else data_cache_dir(options)
    fault_pause("pause-before-join")  # a late joiner, started and stopped ahead, joins at once when resumed
    started = time.monotonic()
    dht = keeper = upload = None
    try:
        # the coordinator's desk says whether the run is open, or gives this peer a token (for its invite or
        # its identity), or says why not: a run with an allowlist refuses DHT requests without a token
        # ...and, unless told to stay in client mode, dials this peer back on the port it is about to listen on
        # (not with --nat-traversal: the port mapping it asks the router for does not exist yet)
        host_maddrs, listener = list(options.host_maddrs), None
        listen_host, listen_port = listen_host_port(host_maddrs[0])
        if not options.client_mode and not options.nat_traversal:
            listener = DialBackListener(listen_host, listen_port)
            host_maddrs[0] = with_port(host_maddrs[0], listener.port)  # the port just checked (0: one picked now)
        if options.announce_maddrs and listen_port == 0:
            logger.warning("--announce names a forwarded port, but this peer listens on a port picked at random: "
                           "pass --port, the port the router forwards to")
        try:
            grant = ask_the_desk(
                identity, join.as_strings, join.coordinator_id, invite,
                dial_back=listener.request(announced_ports(options.announce_maddrs)) if listener else None,
            )
        finally:
            if listener is not None:
                listener.close()
        reachable = options.client_mode or reachable_by_others(grant if listener else None, options.announce_maddrs,
                                                               listen_host)
        network = NetworkOptions(
            host_maddrs=host_maddrs,
            # where the coordinator reached this peer is what the others can dial (p2pd would announce every
            # interface address: a private one behind a 1:1 NAT, say)
            announce_maddrs=options.announce_maddrs or announce_where_reached(grant if listener else None, listen_host),
            nat_traversal=options.nat_traversal,
            client_mode=options.client_mode or not reachable,
        )
        if options.auxiliary and network.client_mode:
            raise UserInputError("an auxiliary peer must accept incoming connections (the others send it their "
                                 "gradients), and the coordinator could not connect back to this one: listen where "
                                 "others can reach it (--host 0.0.0.0) and forward a port to it (--port, --announce HOST:PORT)")
        if grant is not None and grant.token is None and invite is not None:
            logger.warning("this run is open (the coordinator keeps no allowlist): the invite is not needed")
        dht_options = dict(
            initial_peers=join.as_strings, validators=[RSASignatureValidator()], stop=stop.requested,
            authorizer=SwarmAuthorizer(grant.authority, grant.token) if grant and grant.token else None,
        )
        try:
            dht = start_dht(identity, network, **dht_options)
        except UserInputError:
            if listen_port != 0 or host_maddrs == list(options.host_maddrs):
                raise
            # the port the dial-back picked was taken in the meantime: any free one, reachability unknown
            logger.warning(f"port {listener.port} was taken before this peer could listen on it: using another")
            network.host_maddrs = list(options.host_maddrs)
            network.announce_maddrs = list(options.announce_maddrs)
            dht = start_dht(identity, network, **dht_options)
        if grant is not None and grant.token is not None:
            Admission(grant.authority, join.coordinator_id).bind_to_process()
            keeper = AccessKeeper(dht, identity, join.coordinator_id, invite, grant.token,
                                  on_refused=lambda reason: stop.request("access revoked"))
            keeper.publish()
            keeper.start()
        if options.upload_mbps is None and not network.client_mode:
            # measured while the run, the model and the data are set up; announced once known
            upload = UploadMeasurement(dht, join.coordinator_id)
            upload.start()
        logger.info(f"joined the swarm as {identity.peer_id.to_base58()}; fetching the run from the coordinator")
        manifest = wait_for_manifest(dht, join.coordinator_id, options.join_timeout, stop)
        config = manifest.config
        micro_batch = options.micro_batch_size or config.training.micro_batch_size
        data = config.data if options.data is None else config.data.model_copy(update={"source": options.data})
        logger.info(
            f"run '{config.run_id}' (config {manifest.config_sha256[:12]}, tokenizer "
            f"{manifest.tokenizer_sha256[:12]}): target batch {config.training.target_batch_size}, "
            f"micro-batch {micro_batch}, total steps {config.training.total_steps}"
        )
        dht.add_validators([metrics_validator(manifest.swarm_prefix)])
        if options.auxiliary:
            code = run_auxiliary(dht, manifest, join.coordinator_id, stop, verbose=options.log_level == "debug",
                                 upload_mbps=options.upload_mbps, upload=upload)
            if keeper is not None and keeper.refused:
                raise AccessRefused(keeper.refused)
            return code
        task = build_peer_task(
            config,
            manifest.tokenizer_json,
            micro_batch,
            data_seed=peer_data_seed(config.training.seed, identity.peer_id.to_bytes()),
            data_override=data,
            cache_dir=cache_dir,
        )
        if options.cache_limit_mb is not None:
            limit_data_cache(cache_dir, options.cache_limit_mb, task)
        if stop.is_set():
            return 130
        compute = place_task(task, config, device, precision, micro_batch, micro_batch_cache, options.device)
        micro_batch = compute.micro_batch_size
        optimizer = build_optimizer(
            dht, config, manifest.swarm_prefix, task.model, micro_batch, verbose=options.log_level == "debug",
            upload_mbps=options.upload_mbps,
        )
        if upload is not None:
            upload.then(optimizer.set_upload_mbps)
        logger.info(
            f"ready to train after {time.monotonic() - started:.1f} s (process {os.getpid()}: `kill -USR1 {os.getpid()}` "
            f"pauses its contributions, `kill -USR2 {os.getpid()}` resumes them)"
        )
        trainer = PeerTrainer(
            dht, identity, manifest, join.coordinator_id, task, optimizer, micro_batch, stop,
            volunteer=options.volunteer, view=ProgressView(), compute=compute, pause=pause,
        )
        watcher = None
        if options.pause_when_busy:
            if compute.device.type == "cuda":
                watcher = BusyGpuWatcher(partial(other_gpu_processes, compute.device.index or 0), pause.busy)
                watcher.start()
            else:
                logger.warning(f"--pause-when-busy watches a CUDA GPU; this peer computes on {compute.device.type}: ignored")
        try:
            trainer.run()
        finally:
            if watcher is not None:
                watcher.stop()
            trainer.say_goodbye()
            optimizer.shutdown()
            peak = compute.peak_memory_mib()
            if peak is not None:
                logger.info(f"peak GPU memory: {peak:.0f} MiB")
            if options.snapshot_dir is not None:
                path = write_checkpoint(
                    options.snapshot_dir,
                    optimizer.local_epoch,
                    task.model,
                    task.tokenizer,
                    optimizer.opt,
                    trainer_state=dict(
                        run_id=config.run_id,
                        config_sha256=manifest.config_sha256,
                        tokenizer_sha256=manifest.tokenizer_sha256,
                        peer_id=identity.peer_id.to_base58(),
                        samples_contributed=trainer.samples_contributed,
                    ),
                )
                logger.info(f"wrote this peer's final state to {path}")
        if keeper is not None and keeper.refused:
            raise AccessRefused(keeper.refused)
        return 130 if stop.is_set() else 0
    finally:
        if keeper is not None:
            keeper.stop()
        if upload is not None:
            upload.stop()
        if dht is not None:
            dht.shutdown()
        identity.discard()


def data_cache_dir(options: PeerOptions) -> Path:
    """Where the run's data is kept tokenized: ``WORKDIR/cache``, else ``data`` in dedloc's cache directory."""
    path = options.workdir / "cache" if options.workdir else (options.cache_dir or default_cache_dir()) / "data"
    check_writable_dir(path, "--workdir" if options.workdir else "--cache-dir")
    return path


def limit_data_cache(cache_dir: Path, limit_mb: int, task: PeerTask) -> None:
    """Hold the data cache to ``limit_mb``, keeping the current run's data (see :func:`prune_cache`)."""
    in_use = [Path(f["filename"]).parent for f in getattr(task.stream.blocks, "cache_files", [])]
    result = prune_cache(cache_dir, limit_mb * 2**20, in_use)
    if result.kept_over_limit:
        logger.warning(f"the data cache {cache_dir} holds {result.used / 2**20:.0f} MB, over --cache-limit-mb {limit_mb}, "
                       f"with nothing older left to delete: this run's data ({result.in_use / 2**20:.0f} MB) is kept, "
                       "since the peer trains on it")


def check_auxiliary_options(options: PeerOptions) -> None:
    """An auxiliary peer trains nothing: options about training, or against being reached, are mistakes."""
    conflicts = [flag for flag, given in (
        ("--client-mode", options.client_mode), ("--snapshot-dir", options.snapshot_dir is not None),
        ("--micro-batch", options.micro_batch_size is not None), ("--data", options.data is not None),
        ("--pause-when-busy", options.pause_when_busy), ("--device", options.device not in ("auto", "cpu")),
        ("--precision", options.precision not in ("auto", "fp32")),
        ("--volunteer", options.volunteer is not None),  # (the leaderboard counts trained samples only)
    ) if given]
    if conflicts:
        raise UserInputError(f"--auxiliary peers train nothing and must be reachable: drop {', '.join(conflicts)}")


def run_auxiliary(dht, manifest: RunManifest, coordinator_id, stop: GracefulExit, verbose: bool = False,
                  upload_mbps: Optional[float] = None, upload: Optional[UploadMeasurement] = None) -> int:
    """Help the swarm average until the run ends or a stop is requested (see :mod:`.auxiliary`).
    ``upload``: this peer's upload measurement, announced once known."""
    config = manifest.config
    if config.mode == "diloco":
        raise UserInputError("auxiliary peers help with the gradient all-reduce of synchronous runs; this run "
                             "is in DiLoCo mode (it averages parameters once per outer step)")
    model = build_model(config.model, hf_tokenizer(config, manifest.tokenizer_json), seed=config.training.seed)
    optimizer = build_optimizer(dht, config, manifest.swarm_prefix, model, None, verbose=verbose, auxiliary=True,
                                upload_mbps=upload_mbps)
    if upload is not None:
        upload.then(optimizer.set_upload_mbps)
    try:
        AuxiliaryHelper(dht, coordinator_id, optimizer, stop, config.training.total_steps).run()
    finally:
        optimizer.shutdown()
    return 130 if stop.is_set() else 0


def announce_where_reached(grant: Optional[AccessGrant], listen_host: str) -> list[str]:
    """The addresses the coordinator reached this peer at, to announce instead of p2pd's interface
    addresses (a private one behind a 1:1 NAT, say) — unless they are loopback addresses while this
    peer listens beyond loopback (peer and coordinator on one machine: others may come from elsewhere)."""
    if grant is None or not grant.reachable:
        return []
    def loopback(maddr: str) -> bool:
        return ipaddress.ip_address(maddr.split("/")[2]).is_loopback
    if all(loopback(m) for m in grant.reachable) and not ipaddress.ip_address(listen_host).is_loopback:
        return []
    return list(grant.reachable)


def reachable_by_others(grant: Optional[AccessGrant], announce_maddrs: Sequence[str], listen_host: str) -> bool:
    """Whether this peer should accept incoming connections, from the coordinator's dial-back (see
    :mod:`dedloc.swarm.reachability`): yes where it reached the peer, and where it could not tell (a
    coordinator that did not answer the question, or none asked); no — client mode — where it tried and failed."""
    if grant is None or grant.reachable is None:
        if grant is not None:
            logger.warning("the coordinator did not say whether it can connect back to this peer (an older "
                           "dedloc?): accepting connections; behind NAT, pass --client-mode")
        return True
    if grant.reachable:
        logger.info(f"the coordinator connected back to this peer at {', '.join(grant.reachable)}: accepting connections")
        return True
    if ipaddress.ip_address(listen_host).is_loopback:
        advice = f"this peer listens on {listen_host} only: --host 0.0.0.0 lets others reach it where the network does"
    elif announce_maddrs:
        advice = f"check that {', '.join(announce_maddrs)} is forwarded to this machine's --port"
    else:
        advice = "a port forwarded on the router (--port and --announce HOST:PORT) would let it help more"
    logger.warning(
        "the coordinator could not connect back to this peer (behind NAT or a firewall, or listening on "
        f"loopback only): running in client mode, which opens every connection itself and still trains; {advice}"
    )
    return False


def place_task(task: PeerTask, config: RunConfig, device: torch.device, precision: Precision, micro_batch: int,
               cache: Optional[MicroBatchCache], requested_device: str) -> ComputePlan:
    """Move the model to ``device`` and settle the micro-batch: on a GPU, without ``--micro-batch`` (no
    ``cache`` then), the largest that fits up to the target batch, found by trying and kept in ``cache``.
    A GPU too small for one sample is the user's error with ``--device cuda``; with ``--device auto``
    the peer falls back to the CPU with a warning."""
    task.model.to(device)
    if cache is not None:
        key = MicroBatchCache.key(
            f"{describe_device(device)} {torch.cuda.get_device_properties(device).total_memory}",
            config.model.model_dump_json(), config.data.seq_length, precision,
        )
        found = cache.get(key)
        if found is not None:
            logger.info(f"micro-batch {found}, as found on this GPU before ({cache.path})")
        else:
            parameters = count_parameters(task.model)
            sample = next(iter(task.stream))
            started = time.monotonic()
            try:
                # held aside while trying: the optimizer's two moments and the gradient accumulators
                search = search_micro_batch(task.model, sample, device, precision,
                                            largest=config.training.target_batch_size, reserve_bytes=12 * parameters)
            except MemoryError:
                if requested_device != "auto":
                    raise UserInputError(f"{describe_device(device)} is too small for this model: not even one "
                                         "sample fits; use --device cpu") from None
                logger.warning(f"{describe_device(device)} is too small for this model (not even one sample "
                               "fits): computing on the CPU instead")
                task.model.to("cpu")
                torch.cuda.empty_cache()
                return ComputePlan(torch.device("cpu"), "fp32", micro_batch)
            found = search.size
            cache.put(key, found)
            logger.info(f"micro-batch {found}: the largest that fits (tried {search.tried} in "
                        f"{time.monotonic() - started:.1f} s; kept in {cache.path})")
        micro_batch = found
        task.stream.micro_batch_size = micro_batch
    logger.info(f"computing on {describe_device(device)} in {precision}, micro-batch {micro_batch}")
    return ComputePlan(device, precision, micro_batch)
