"""The compose swarm is validated statically (no Docker engine here): schema, and commands the CLI accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from dedloc.cli import build_parser
from dedloc.swarm.join_url import is_join_url, join_endpoint

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "docker-compose.yml"

pytestmark = pytest.mark.timeout(60)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) is not installed")
def test_compose_file_is_valid():
    for profile in ([], ["--profile", "gpu"]):  # the CPU swarm, and with the GPU peer service
        result = subprocess.run(["docker-compose", "-f", str(COMPOSE), *profile, "config", "-q"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (profile, result.stderr)


def test_compose_services_run_commands_the_cli_accepts():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"coordinator", "peer"} <= set(services)
    parser = build_parser()
    for name, service in services.items():
        args = parser.parse_args([str(part) for part in service["command"]])
        assert args.command == name.split("-")[0]  # peer-gpu runs `dedloc peer`
    coordinator = parser.parse_args(services["coordinator"]["command"])
    # peers find the coordinator through its dashboard's /api/join, by service name and dashboard port
    for name in ("peer", "peer-gpu"):
        peer = parser.parse_args(services[name]["command"])
        assert peer.join_file is None and len(peer.join) == 1 and is_join_url(peer.join[0]), name
        endpoint = urlsplit(join_endpoint(peer.join[0]))  # what the peer asks: accepted, not a UserInputError
        assert endpoint.scheme == "http" and endpoint.hostname == "coordinator", (name, peer.join)
        assert endpoint.port == coordinator.dashboard_port and endpoint.path == "/api/join", (name, peer.join)
    assert coordinator.dashboard and coordinator.dashboard_host == "0.0.0.0"
    # the coordinator's state (identity, checkpoints) on a named volume
    mounts = {v.split(":")[1] for v in services["coordinator"]["volumes"]}
    assert any(str(coordinator.workdir).startswith(m) for m in mounts)
    assert "state" in compose["volumes"]
    assert "deploy" not in services["peer"] or "replicas" not in services["peer"].get("deploy", {}), "scale with --scale"


def test_compose_dashboard_healthcheck_and_gpu_profile_fit_together():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    parser = build_parser()
    coordinator = parser.parse_args(services["coordinator"]["command"])
    # the dashboard listens on every interface, on the port the compose file publishes and checks
    assert coordinator.dashboard_host == "0.0.0.0" and coordinator.dashboard
    port = coordinator.dashboard_port
    assert f"{port}:{port}" in services["coordinator"]["ports"]
    assert f"127.0.0.1:{port}/api/status" in " ".join(services["coordinator"]["healthcheck"]["test"])
    assert str(port) in (DOCKER / "Dockerfile").read_text().split("EXPOSE", 1)[1].split()[0]
    for name in ("peer", "peer-gpu"):  # peers start once the coordinator is healthy
        assert services[name]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    # the GPU peer: only with --profile gpu, a CUDA build of the same Dockerfile, one GPU reserved
    gpu = services["peer-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["dockerfile"] == "docker/Dockerfile"
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu") and gpu["image"] != services["peer"]["image"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    args = parser.parse_args(gpu["command"])
    assert args.device == "cuda" and str(args.cache_dir) == "/cache"
    # every volume is mounted on a directory the image creates for its user (or a named volume
    # would be root's, and the peer could not write its cache)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    owned = dockerfile.split("chown volunteer", 1)[1].splitlines()[0].split()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            target = volume.split(":")[1]
            assert target in owned, f"{name} mounts {target}, which the image does not create for its user"


def test_dockerfile_entrypoint_is_the_cli():
    text = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dedloc"]' in text
    # torch from PyTorch's index for the build's variant: the CPU one unless a CUDA build is asked for
    assert "torch==2.13.0" in text and "ARG TORCH_VARIANT=cpu" in text
    assert 'download.pytorch.org/whl/${TORCH_VARIANT}' in text
    assert "USER volunteer" in text
    # dependencies are installed before the sources are copied (layer caching)
    assert text.index("pip install .") < text.index("COPY dedloc ./dedloc")
