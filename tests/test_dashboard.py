"""The coordinator's dashboard, API, /metrics and `dedloc status`, against a real swarm on loopback:
a coordinator and two volunteer peers (real processes) training the real model."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ARTIFACTS, Processes, child_env
from helpers import join_addresses, small_run_config, wait_for

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]

VOLUNTEERS = ("alice", "bob")


class Swarm:
    def __init__(self, root: Path):
        self.root = root
        self.procs = Processes(root / "logs")
        self.coordinator_dir = root / "coordinator"
        self.config = small_run_config(
            root / "run.toml", training={"total_steps": 60}, checkpoint={"every_steps": 3, "heldout_sequences": 32}
        )
        self.coordinator = None
        self.peers = []
        self.join: list[str] = []

    def start_coordinator(self, name: str = "coordinator"):
        self.coordinator = self.procs.dedloc(
            "coordinator", "--config", str(self.config), "--workdir", str(self.coordinator_dir), name=name
        )
        self.join = join_addresses(self.coordinator_dir, self.coordinator)
        return self.coordinator

    @property
    def url(self) -> str:
        return json.loads((self.coordinator_dir / "coordinator.json").read_text())["dashboard"]

    @property
    def everyone(self):
        return [self.coordinator, *self.peers]


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    (root / "logs").mkdir()
    swarm = Swarm(root)
    try:
        swarm.start_coordinator()
        for index, name in enumerate(VOLUNTEERS, 1):
            swarm.peers.append(
                swarm.procs.dedloc(
                    "peer", "--join", *swarm.join, "--workdir", str(root / f"peer-{index}"), "--volunteer", name,
                    name=f"peer-{index}",
                )
            )
        yield swarm
    finally:
        swarm.procs.stop_all()


def test_status_against_a_dead_address():
    # a well-formed address where nothing listens: port 9 (discard) on loopback, a valid peer id
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmTgbGgCzEpnNPfoxYVq8oDUPKP3ZTDTZUUHER1vJwWN9i"
    started = time.monotonic()
    result = dedloc("status", "--join", dead, timeout=60)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started <= 30
    assert "Traceback" not in result.stderr and "cannot reach" in result.stderr


def test_status_with_a_malformed_address():
    result = dedloc("status", "--join", "not-an-address")
    assert result.returncode == 2 and "malformed address" in result.stderr and "Traceback" not in result.stderr


def get(url: str, method: str = "GET"):
    """(status, content type, body) of one request; HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers.get("Content-Type"), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type"), e.read()


def api(swarm: Swarm, path: str):
    status, content_type, body = get(swarm.url.rstrip("/") + path)
    assert status == 200 and content_type == "application/json", (path, status, body[:300])
    return json.loads(body)


def wait_for_figures(swarm: Swarm, steps: int = 3, heldout: int = 1):
    """Until the API shows ``steps`` steps with a loss, both peers, and ``heldout`` held-out points."""

    def ready():
        history = api(swarm, "/api/history")
        peers = api(swarm, "/api/peers")["peers"]
        with_loss = [r for r in history["steps"] if r["loss"] is not None]
        checkpoint = api(swarm, "/api/status")["checkpoint"]  # the live figures follow the store within a second
        return len(with_loss) >= steps and len(peers) == 2 and len(history["heldout"]) >= heldout and checkpoint

    wait_for(ready, 240, f"{steps} steps, 2 peers and {heldout} held-out point(s) in the API", watch=swarm.everyone)


def test_api_and_metrics(swarm):
    wait_for_figures(swarm)
    status = api(swarm, "/api/status")
    assert status["run_id"] == "dedloc-embedded" and status["stop_at"] == 60 and not status["finished"]
    assert status["step"] >= 3 and status["peers"] == 2
    assert status["samples"] >= 3 * 64 and status["samples_per_second"] > 0
    assert 0 < status["loss"] < 20 and 0 < status["heldout_loss"] < 20 and status["heldout_step"] % 3 == 0
    assert status["target_batch_size"] == 64 and 0 <= status["samples_accumulated"] <= 64
    assert status["checkpoint"]["step"] >= 3 and status["checkpoint"]["path"].startswith("checkpoints/")

    history = api(swarm, "/api/history")
    steps = [r["step"] for r in history["steps"]]
    assert steps == sorted(steps) and steps[0] == 1 and len(set(steps)) == len(steps)
    assert set(history["steps"][0]) >= {"step", "time", "loss", "samples_per_second", "peers", "samples"}
    assert api(swarm, f"/api/history?since={steps[-1]}")["steps"] == []

    peers = api(swarm, "/api/peers")["peers"]
    assert sorted(p["volunteer"] for p in peers) == sorted(VOLUNTEERS)
    for peer in peers:
        assert peer["samples"] > 0 and peer["device"] == "cpu" and peer["client_mode"] is False
        assert peer["short_id"] == peer["peer_id"][-6:]
    board = api(swarm, "/api/leaderboard")["leaderboard"]
    assert {row["name"] for row in board} == set(VOLUNTEERS)
    assert all(row["samples"] > 0 for row in board)

    # no addresses anywhere
    for path in ("/api/status", "/api/history", "/api/peers", "/api/leaderboard", "/metrics"):
        body = get(swarm.url.rstrip("/") + path)[2].decode()
        assert "127.0.0.1" not in body and "/ip4/" not in body, path

    text = get(swarm.url.rstrip("/") + "/metrics")[2].decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert samples[("dedloc_global_step", ())] >= status["step"]
    assert samples[("dedloc_peers", ())] == 2
    assert samples[("dedloc_target_batch_size", ())] == 64
    assert math.isfinite(samples[("dedloc_heldout_loss", ())])
    for name in VOLUNTEERS:
        assert samples[("dedloc_volunteer_samples_total", (("volunteer", name),))] > 0


def test_api_errors_are_json(swarm):
    base = swarm.url.rstrip("/")
    status, content_type, body = get(base + "/api/nothing-here")
    assert status == 404 and content_type == "application/json" and json.loads(body)["error"] == "not found"
    status, content_type, body = get(base + "/api/status", method="POST")
    assert status == 405 and content_type == "application/json" and "read-only" in json.loads(body)["error"]
    status, _, body = get(base + "/api/history?since=abc")
    assert status == 400 and "since" in json.loads(body)["error"]
    status, _, body = get(base + "/../../etc/passwd")
    assert status == 404 and b"root:" not in body
    status, content_type, body = get(base + "/static/plotly.min.js")
    assert status == 200 and "javascript" in content_type and len(body) > 100_000


def test_malformed_metrics_do_not_hurt(swarm):
    """A peer publishing garbage metrics (wrong types, negative counts, NaN loss, huge strings) is
    dropped with one warning; the coordinator and its API carry on."""
    script = Path(__file__).with_name("rogue_metrics.py")
    result = subprocess.run(
        [sys.executable, str(script), *swarm.join], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rogue = result.stdout.strip().splitlines()[-1]
    time.sleep(0)  # the coordinator polls every second: wait on its log below, not on a clock
    wait_for_figures(swarm, steps=4)
    assert swarm.coordinator.poll() is None
    peers = api(swarm, "/api/peers")["peers"]
    assert rogue not in {p["peer_id"] for p in peers} and len(peers) == 2
    log = swarm.coordinator.log_path.read_text()
    assert "Traceback" not in log
    assert log.count(f"malformed metrics published by peer {rogue}") <= 1


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_dashboard_in_a_real_browser(swarm, tmp_path):
    browser, driver_path = _chromium(), shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait_for_figures(swarm)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except WebDriverException as e:
        pytest.skip(f"Chromium cannot start here: {str(e).splitlines()[0]}")
    try:
        driver.get(swarm.url)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: int(d.find_element(By.ID, "loss-chart").get_attribute("data-points")) >= 3)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#peers-table tbody tr")) == 2)
        # plotly drew the loss curve (an SVG path per trace), not just the placeholder
        assert driver.find_elements(By.CSS_SELECTOR, "#loss-chart .main-svg .scatterlayer path.js-line")
        rows = driver.find_elements(By.CSS_SELECTOR, "#peers-table tbody tr")
        assert sorted(row.find_elements(By.TAG_NAME, "td")[1].text for row in rows) == sorted(VOLUNTEERS)
        assert driver.find_element(By.ID, "step").text.endswith("/ 60")
        assert driver.find_element(By.ID, "heldout").text != "–"
        board = driver.find_elements(By.CSS_SELECTOR, "#leaderboard-table tbody tr")
        assert len(board) == 2
        time.sleep(1.0)  # let plotly finish its transition before the screenshot (cosmetic only)
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


def dedloc(*args: str, timeout: float = 60):
    return subprocess.run(
        [sys.executable, "-m", "dedloc", *args], env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def test_status_command(swarm):
    wait_for_figures(swarm)

    def from_coordinator():
        result = dedloc("status", "--join", *swarm.join, "--json")
        assert result.returncode == 0, result.stderr
        figures = json.loads(result.stdout)
        return figures if figures["source"] == "coordinator" else None

    figures = wait_for(from_coordinator, 120, "the coordinator's summary", watch=swarm.everyone)
    assert figures["run_id"] == "dedloc-embedded" and figures["step"] >= 3 and figures["peers"] == 2
    assert figures["heldout_loss"] is not None and figures["loss"] is not None
    assert {c["name"] for c in figures["top_contributors"]} == set(VOLUNTEERS)
    assert len(figures["peers_online"]) == 2

    table = dedloc("status", "--join", *swarm.join)
    assert table.returncode == 0, table.stderr
    for text in ("global step", "held-out loss", "peers online", "top contributors", *VOLUNTEERS):
        assert text in table.stdout, text


def test_leaderboard_and_history_survive_a_coordinator_restart(swarm):
    wait_for_figures(swarm)
    board = {row["name"]: row["samples"] for row in api(swarm, "/api/leaderboard")["leaderboard"]}
    steps = api(swarm, "/api/history")["steps"]
    url = swarm.url
    os.killpg(swarm.coordinator.pid, signal.SIGKILL)
    swarm.coordinator.wait(timeout=30)
    swarm.start_coordinator(name="coordinator-restarted")
    info = swarm.coordinator_dir / "coordinator.json"
    wait_for(lambda: json.loads(info.read_text())["pid"] == swarm.coordinator.pid, 120,
             "the restarted coordinator's join information", watch=[swarm.coordinator])
    assert swarm.url == url, "the dashboard keeps its URL across restarts"
    wait_for(lambda: get(url + "api/status")[0] == 200, 60, "the dashboard after the restart", watch=[swarm.coordinator])
    after = {row["name"]: row["samples"] for row in api(swarm, "/api/leaderboard")["leaderboard"]}
    assert set(after) == set(board)
    assert all(after[name] >= board[name] for name in board), (board, after)
    history = api(swarm, "/api/history")["steps"]
    assert [r["step"] for r in history[: len(steps)]] == [r["step"] for r in steps]
    assert api(swarm, "/api/history")["heldout"], "the held-out points survive the restart"
