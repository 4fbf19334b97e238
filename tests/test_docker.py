"""The compose swarm is validated statically (no Docker engine here): schema, and commands the CLI accepts."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dedloc.cli import build_parser

DOCKER = Path(__file__).resolve().parent.parent / "docker"
COMPOSE = DOCKER / "docker-compose.yml"

pytestmark = pytest.mark.timeout(60)


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose (Debian package) is not installed")
def test_compose_file_is_valid():
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_compose_services_run_commands_the_cli_accepts():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"coordinator", "peer"} <= set(services)
    parser = build_parser()
    for name, service in services.items():
        args = parser.parse_args([str(part) for part in service["command"]])
        assert args.command == name
    coordinator = parser.parse_args(services["coordinator"]["command"])
    peer = parser.parse_args(services["peer"]["command"])
    assert str(peer.join_file) == str(coordinator.join_file), "peers must read the file the coordinator writes"
    # the join file lives on a volume both services mount; checkpoints on a named volume
    mounts = {name: {v.split(":")[1] for v in services[name]["volumes"]} for name in ("coordinator", "peer")}
    join_dir = str(Path(str(coordinator.join_file)).parent)
    assert join_dir in mounts["coordinator"] and join_dir in mounts["peer"]
    assert any(str(coordinator.workdir).startswith(m) for m in mounts["coordinator"] - {join_dir})
    assert set(compose["volumes"]) >= {"checkpoints", "join"}
    assert "deploy" not in services["peer"] or "replicas" not in services["peer"].get("deploy", {}), "scale with --scale"


def test_dockerfile_entrypoint_is_the_cli():
    text = (DOCKER / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["dedloc"]' in text
    assert "torch==2.13.0" in text and "download.pytorch.org/whl/cpu" in text
    assert "USER volunteer" in text
    # dependencies are installed before the sources are copied (layer caching)
    assert text.index("pip install .") < text.index("COPY dedloc ./dedloc")
