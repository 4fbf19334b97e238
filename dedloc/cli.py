"""``dedloc`` — the command line: parse, build, run. Everything heavy lives in importable modules.

Exit codes: 0 ok; 2 the user's input is wrong; 3 the swarm or coordinator cannot be reached;
1 unexpected failure (traceback only with ``--debug``); 130 interrupted.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional, Sequence

from dedloc import __version__
from dedloc.errors import EXIT_INTERRUPTED, EXIT_UNEXPECTED, DedlocError
from dedloc.logs import LEVELS

logger = logging.getLogger("dedloc")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _upload_mbps(text: str) -> float:
    value = _positive_float(text)
    if not 0.1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"expected an upload bandwidth in Mbit/s between 0.1 and 100000, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is in 0..65535, got {value}")
    return value


def _add_dashboard_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dashboard-host", default="127.0.0.1", metavar="HOST",
        help="address the dashboard listens on (default: 127.0.0.1; 0.0.0.0 exposes it, read-only)",
    )
    parser.add_argument(
        "--dashboard-port", type=_port, default=0, metavar="PORT",
        help="dashboard port (default: the one chosen on the first start, else any free port)",
    )
    parser.add_argument("--no-dashboard", dest="dashboard", action="store_false", help="do not serve the dashboard")


def build_parser() -> argparse.ArgumentParser:
    # accepted before or after the subcommand; SUPPRESS keeps a subcommand's parser from resetting a
    # value given before it (defaults are applied in parse_args below)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", choices=LEVELS, default=argparse.SUPPRESS, help="logging verbosity (default: info)")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of unexpected errors")

    parser = argparse.ArgumentParser(
        prog="dedloc",
        description="Pretrain one model together on volunteers' GPUs over the internet.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"dedloc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    coordinator = sub.add_parser(
        "coordinator", parents=[common], help="run the coordinator of a training run",
        description="Bootstrap a swarm, publish the run config, track progress and checkpoint the model.",
    )
    coordinator.add_argument("--config", type=Path, help="run configuration (TOML; default: the embedded default run)")
    coordinator.add_argument(
        "--workdir", type=Path, default=Path("dedloc-coordinator"),
        help="state directory: identity, tokenizer, checkpoints, history (default: ./dedloc-coordinator)",
    )
    coordinator.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    coordinator.add_argument("--port", type=_port, default=0, help="TCP port to listen on (default: any free port)")
    coordinator.add_argument(
        "--announce-maddr", dest="announce_maddrs", action="append", default=[], metavar="MULTIADDR",
        help="address peers should dial, e.g. /ip4/203.0.113.7/tcp/31337 (repeatable)",
    )
    coordinator.add_argument(
        "--nat-traversal", action="store_true",
        help="let libp2p map ports (UPnP/NAT-PMP) and probe reachability; off by default",
    )
    coordinator.add_argument("--max-steps", type=_positive_int, help="end the run after this global step")
    coordinator.add_argument(
        "--join-file", type=Path, metavar="PATH",
        help="also write the join addresses (JSON) to PATH, for scripts and docker compose",
    )
    coordinator.add_argument(
        "--allowlist", type=Path, metavar="FILE",
        help="admit only the volunteers in FILE (see `dedloc allowlist`); re-read when it changes. Without it the run is open",
    )
    coordinator.add_argument(
        "--token-lifetime", type=_positive_float, default=1800.0, metavar="SECONDS",
        help="lifetime of the access tokens issued to volunteers (renewed at half-life; default: 1800)",
    )
    _add_dashboard_flags(coordinator)

    allowlist = sub.add_parser(
        "allowlist", parents=[common], help="add, revoke or list the volunteers admitted to a run",
        description="Edit the allowlist file that `dedloc coordinator --allowlist FILE` reads (it notices changes at once).",
    )
    allowlist.add_argument("action", choices=("add", "revoke", "list"))
    allowlist.add_argument("name", nargs="?", help="the volunteer's name (add, revoke)")
    allowlist.add_argument("--file", type=Path, required=True, help="the allowlist file (created by the first add)")
    allowlist.add_argument("--peer-id", help="(add) admit this identity instead of issuing an invite")

    peer = sub.add_parser(
        "peer", parents=[common], help="join a training run as a volunteer",
        description="Join a swarm with the coordinator's address and train with it.",
    )
    where = peer.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--join", nargs="+", action="extend", metavar="MULTIADDR",
        help="the coordinator's address as it printed it (…/p2p/<peer id>; several allowed), or its dashboard's "
             "http://HOST:PORT on a private network (docker compose)",
    )
    where.add_argument(
        "--join-file", type=Path, metavar="PATH",
        help="read the join addresses from a file written by `dedloc coordinator --join-file` (waits for it)",
    )
    peer.add_argument("--identity", type=Path, help="persistent identity file (created if missing)")
    invite = peer.add_mutually_exclusive_group()
    invite.add_argument("--invite", help="your invite to a run with an allowlist (from its organiser)")
    invite.add_argument("--invite-file", type=Path, metavar="PATH", help="read the invite from a file")
    peer.add_argument("--workdir", type=Path, help="directory for this peer's caches")
    peer.add_argument(
        "--micro-batch", type=_positive_int, dest="micro_batch_size",
        help="samples per forward pass (default: on a GPU the largest that fits, found at the first start; else the run's)",
    )
    peer.add_argument(
        "--device", default="auto",
        help="where to compute: auto (CUDA, then Apple MPS, then CPU; the default), cpu, cuda, cuda:N or mps",
    )
    peer.add_argument(
        "--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
        help="auto (the default): bf16 on GPUs that support it, fp16 with loss scaling on older GPUs, fp32 on CPU",
    )
    peer.add_argument("--cache-dir", type=Path,
                      help="dedloc's cache: the micro-batch found for a GPU, and the run's data unless --workdir "
                           "is given (default: ~/.cache/dedloc)")
    peer.add_argument("--cache-limit-mb", type=_positive_int, metavar="MB",
                      help="disk the data cache may use: older runs' data is deleted beyond it (default: no limit)")
    peer.add_argument("--data", help="local copy of the run's data source (overrides the run's)")
    peer.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    peer.add_argument("--port", type=_port, default=0, help="TCP port to listen on (default: any free port)")
    peer.add_argument(
        "--announce", action="append", default=[], metavar="HOST:PORT",
        help="the public address of a port forwarded to this peer's --port (repeatable)",
    )
    peer.add_argument("--announce-maddr", dest="announce_maddrs", action="append", default=[], metavar="MULTIADDR",
                      help="the same as a multiaddr, e.g. /ip4/203.0.113.7/tcp/31337")
    peer.add_argument(
        "--client-mode", action="store_true",
        help="accept no incoming connections (default: chosen at start, by whether the coordinator can connect back)",
    )
    peer.add_argument("--nat-traversal", action="store_true", help="let libp2p map ports and probe reachability")
    peer.add_argument(
        "--auxiliary", action="store_true",
        help="train nothing: help the swarm average (a CPU machine with a good uplink that others can reach)",
    )
    peer.add_argument("--volunteer", help="your name on the run's leaderboard")
    peer.add_argument("--snapshot-dir", type=Path, help="write this peer's final model here when it leaves")
    peer.add_argument("--threads", type=_positive_int, help="CPU threads for training")
    peer.add_argument(
        "--upload-mbps", type=_upload_mbps, metavar="MBIT_PER_S",
        help="this machine's upload bandwidth (0.1-100000): the share of each all-reduce it reduces (and uploads) "
             "follows it, within 4x of its group's median (default: measured against the coordinator at join)",
    )
    peer.add_argument("--pause-when-busy", action="store_true",
                      help="pause contributing while another program uses the GPU heavily (≥ 512 MiB), resume once it "
                           "has been free for 30 s; SIGUSR1/SIGUSR2 pause and resume by hand")

    swarm = sub.add_parser(
        "swarm", parents=[common], help="run a whole local swarm (coordinator + peers) on loopback",
        description="Start a coordinator and N peers as processes on this machine, train, stop by itself.",
    )
    swarm.add_argument("--peers", type=_positive_int, default=2, help="number of peers (default: 2)")
    swarm.add_argument("--max-steps", type=_positive_int, help="stop after this global step (default: the run's total)")
    swarm.add_argument("--workdir", type=Path, help="directory for checkpoints, logs, summary.json (default: a new one)")
    swarm.add_argument("--config", type=Path, help="run configuration (default: the embedded default run)")
    swarm.add_argument("--timeout", type=_positive_float, default=1800.0, help="give up after this many seconds (default: 1800)")
    _add_dashboard_flags(swarm)

    status = sub.add_parser(
        "status", parents=[common], help="show where a run stands (step, loss, peers, top contributors)",
        description="Join a swarm as a client, print the run's figures as the coordinator publishes them, and exit.",
    )
    status.add_argument("--join", nargs="+", action="extend", required=True, metavar="MULTIADDR",
                        help="the coordinator's address (…/p2p/<peer id>, or http://HOST:PORT), as for `dedloc peer`")
    status.add_argument("--json", dest="as_json", action="store_true", help="print JSON (for scripts)")
    status.add_argument("--invite", help="your invite, for a run with an allowlist")
    status.add_argument("--timeout", type=_positive_float, default=20.0,
                        help="give up after this many seconds (default: 20; exit code 3)")
    export = sub.add_parser(
        "export", parents=[common], help="write a checkpoint as a plain Hugging Face model directory",
        description="Verify a checkpoint and write model + tokenizer + model card to OUT_DIR "
        "(ready for from_pretrained or push_to_hub).",
    )
    export.add_argument("checkpoint", type=Path, help="a checkpoint, a checkpoints directory or a coordinator state directory")
    export.add_argument("out_dir", type=Path, help="new (or empty) output directory")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.log_level = getattr(args, "log_level", "info")
    args.debug = getattr(args, "debug", False)
    return args


def _run(args: argparse.Namespace) -> int:
    from dedloc.lifecycle import adopt_workdir

    # before anything heavy is imported: the first call re-executes this process
    workdir = args.workdir if args.command in ("coordinator", "peer") else None
    leftovers = adopt_workdir(workdir) if workdir is not None else []

    from dedloc.logs import setup_logging
    from dedloc.swarm.addresses import announce_maddr, listen_maddr

    setup_logging(args.log_level, args.command)
    if leftovers:
        logger.warning(f"stopped {len(leftovers)} process(es) a crashed dedloc daemon on {workdir} had left: {leftovers}")
    if args.command == "coordinator":
        from dedloc.coordinator.daemon import CoordinatorOptions, run_coordinator

        return run_coordinator(
            CoordinatorOptions(
                config=args.config,
                workdir=args.workdir,
                host=args.host,
                port=args.port,
                announce_maddrs=args.announce_maddrs,
                nat_traversal=args.nat_traversal,
                max_steps=args.max_steps,
                join_file=args.join_file,
                allowlist=args.allowlist,
                token_lifetime=args.token_lifetime,
                dashboard=args.dashboard,
                dashboard_host=args.dashboard_host,
                dashboard_port=args.dashboard_port,
                log_level=args.log_level,
            )
        )
    if args.command == "peer":
        from dedloc.peer.daemon import PeerOptions, run_peer

        return run_peer(
            PeerOptions(
                join=args.join or [],
                join_file=args.join_file,
                identity=args.identity,
                invite=args.invite,
                invite_file=args.invite_file,
                workdir=args.workdir,
                micro_batch_size=args.micro_batch_size,
                data=args.data,
                host_maddrs=[listen_maddr(args.host, args.port)],
                announce_maddrs=[*args.announce_maddrs, *map(announce_maddr, args.announce)],
                client_mode=args.client_mode,
                nat_traversal=args.nat_traversal,
                volunteer=args.volunteer,
                snapshot_dir=args.snapshot_dir,
                threads=args.threads,
                pause_when_busy=args.pause_when_busy,
                device=args.device,
                precision=args.precision,
                cache_dir=args.cache_dir,
                auxiliary=args.auxiliary,
                upload_mbps=args.upload_mbps,
                cache_limit_mb=args.cache_limit_mb,
                log_level=args.log_level,
            )
        )
    if args.command == "swarm":
        from dedloc.local_swarm import SwarmOptions, run_local_swarm

        return run_local_swarm(
            SwarmOptions(
                peers=args.peers,
                max_steps=args.max_steps,
                workdir=args.workdir,
                config=args.config,
                timeout=args.timeout,
                dashboard=args.dashboard,
                dashboard_host=args.dashboard_host,
                dashboard_port=args.dashboard_port,
                log_level=args.log_level,
            )
        )
    if args.command == "status":
        from dedloc.status import StatusOptions, run_status

        return run_status(StatusOptions(join=args.join, as_json=args.as_json, timeout=args.timeout, invite=args.invite))
    if args.command == "allowlist":
        return _edit_allowlist(args)
    if args.command == "export":
        from dedloc.export import export_checkpoint

        info = export_checkpoint(args.checkpoint, args.out_dir)
        print(f"exported step {info.step} of run '{info.trainer_state.get('run_id', '?')}' ({info.path}) to {args.out_dir}")
        return 0
    raise AssertionError(args.command)


def _edit_allowlist(args: argparse.Namespace) -> int:
    from dedloc.allowlist import add_volunteer, load_allowlist, revoke_volunteer
    from dedloc.errors import UserInputError

    if args.action != "list" and not args.name:
        raise UserInputError(f"`dedloc allowlist {args.action}` needs the volunteer's name")
    if args.peer_id and args.action != "add":
        raise UserInputError("--peer-id goes with `add` only")
    if args.action == "add":
        invite = add_volunteer(args.file, args.name, peer_id=args.peer_id)
        if invite is None:
            print(f"added {args.name} (identity {args.peer_id}) to {args.file}")
        else:
            print(f"added {args.name} to {args.file}; send them this invite (it is not stored, only its hash):")
            print(invite, flush=True)
        return 0
    if args.action == "revoke":
        revoke_volunteer(args.file, args.name)
        print(f"revoked {args.name}: their peers are refused from the next averaging round, and their tokens are not renewed")
        return 0
    for volunteer in load_allowlist(args.file).volunteer:
        how = "invite" if volunteer.invite_sha256 else "identity " + ", ".join(volunteer.peer_ids)
        print(f"{volunteer.name}\t{how}\t{'revoked' if volunteer.revoked else 'admitted'}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    # a native crash (e.g. in torch or hivemind's threads) prints every thread's Python stack to stderr
    # before the process dies, so the log says where it happened
    faulthandler.enable()
    args = parse_args(argv)
    try:
        code = _run(args)
    except DedlocError as e:
        if args.debug:
            traceback.print_exc()
        print(f"dedloc {args.command}: error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print(f"dedloc {args.command}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader of our output went away (e.g. `dedloc status --json | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        print(
            f"dedloc {args.command}: unexpected error: {type(e).__name__}: {e} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        code = EXIT_UNEXPECTED
    _exit(code)


def _exit(code: int, grace: float = 10.0) -> None:
    """Exit with ``code``, even when a library left a non-daemon thread running (e.g. hivemind's
    progress tracker of an optimizer whose construction failed): never hang after the work is over."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
