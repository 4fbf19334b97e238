"""`--join http://HOST:PORT`: the coordinator's dashboard serves its join addresses at /api/join, and a
peer (or `dedloc status`) fetches them. Real HTTP servers on 127.0.0.1, port 0."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from coordinator.dashboard import Dashboard
from coordinator.history_store import HistoryStore
from coordinator.run_view import RunView
from dedloc.config import default_run_config
from dedloc.errors import EXIT_UNREACHABLE, EXIT_USER_ERROR, SwarmUnreachableError, UserInputError
from dedloc.lifecycle import GracefulExit
from dedloc.swarm.join_url import MAX_JOIN_ANSWER, expand_join, fetch_join_addresses, join_endpoint
from dedloc.swarm.addresses import parse_join_addresses
from dedloc.swarm.records import RunManifest

pytestmark = pytest.mark.timeout(30)

PEER_ID = "QmTgbGgCzEpnNPfoxYVq8oDUPKP3ZTDTZUUHER1vJwWN9i"
JOIN = [f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}", f"/dns4/coordinator/tcp/31337/p2p/{PEER_ID}"]
EXTRA = "/ip4/192.0.2.1/tcp/4000/p2p/QmXcD9uZcp8wJVGTLLAm9VNrUM6YsVKhLo8kyu6NRaEjgu"


@pytest.fixture
def dashboard(tmp_path):
    store = HistoryStore.open(tmp_path / "history.db")
    manifest = RunManifest.create(default_run_config(), '{"model": "a tokenizer"}')
    dashboard = Dashboard(RunView(manifest, store, tmp_path, stop_at=10))
    dashboard.start()
    try:
        yield dashboard
    finally:
        dashboard.stop()
        store.close()


def join_info(run_id: str = "run-1") -> dict:
    """What the coordinator writes to coordinator.json / --join-file (see Coordinator.announce_join)."""
    return dict(peer_id=PEER_ID, join=JOIN, run_id=run_id, config_sha256="c" * 64, tokenizer_sha256="t" * 64,
                dashboard="http://127.0.0.1:1/", pid=4242)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


class Scripted:
    """An HTTP server on 127.0.0.1:0 that gives the scripted answers (status, body) in turn (the last
    one from then on) and counts the requests; ``on_request(n)`` runs before the n-th answer."""

    def __init__(self, answers: list[tuple[int, bytes]], on_request=None):
        self.answers, self.on_request, self.paths = answers, on_request, []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                scripted.paths.append(self.path)
                if scripted.on_request is not None:
                    scripted.on_request(len(scripted.paths))
                status, body = scripted.answers[min(len(scripted.paths), len(scripted.answers)) - 1]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers = []

    def start(answers, on_request=None) -> Scripted:
        servers.append(Scripted(answers, on_request))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def good(join=JOIN) -> bytes:
    return json.dumps(dict(join=join, coordinator=PEER_ID, run_id="run-1")).encode()


def test_dashboard_serves_join_addresses_once_published(dashboard):
    url = dashboard.url + "api/join"
    status, body = get(url)
    assert status == 503 and "not published" in body["error"]
    dashboard.publish_join(join_info())
    status, body = get(url)
    assert status == 200
    assert body == dict(join=JOIN, coordinator=PEER_ID, run_id="run-1", config_sha256="c" * 64,
                        tokenizer_sha256="t" * 64)  # no process id, no dashboard URL
    # HEAD answers too (read-only routes), and the other routes are untouched
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200 and response.read() == b""
    assert get(dashboard.url + "api/status")[0] == 200


def test_a_peer_joins_through_the_dashboard(dashboard):
    stop = GracefulExit("test")
    dashboard.publish_join(join_info())
    for url in (dashboard.url, dashboard.url.rstrip("/"), dashboard.url + "api/join"):
        expanded = expand_join([url, EXTRA], timeout=5, stop=stop)
        assert expanded == [*JOIN, EXTRA]  # the coordinator's addresses first: the first names the coordinator
        join = parse_join_addresses(expanded)
        assert join.coordinator_id.to_base58() == PEER_ID


def test_retries_while_the_coordinator_is_starting(scripted):
    server = scripted([(503, b'{"error": "not yet"}'), (503, b'{"error": "not yet"}'), (200, good())])
    assert fetch_join_addresses(server.url, timeout=20, stop=GracefulExit("test"), poll=0.05) == JOIN
    assert server.paths == ["/api/join"] * 3


def test_a_path_prefix_is_kept(scripted):
    server = scripted([(200, good())])
    assert join_endpoint(server.url + "/dedloc/?x=1#y") == server.url + "/dedloc/api/join"
    assert expand_join([server.url + "/dedloc/"], timeout=5, stop=GracefulExit("test")) == JOIN
    assert server.paths == ["/dedloc/api/join"]


@pytest.mark.parametrize("status,body", [
    (200, b"<html>not json</html>"),
    (200, b'{"step": 3, "loss": 1.5}'),                        # /api/status, not /api/join
    (200, json.dumps(dict(join=[], coordinator=PEER_ID)).encode()),
    (200, json.dumps(dict(join=[1, 2], coordinator=PEER_ID)).encode()),
    (200, json.dumps(dict(join="/ip4/1.2.3.4/tcp/1", coordinator=PEER_ID)).encode()),
    (200, json.dumps(dict(join=JOIN)).encode()),               # no coordinator
    (200, good(join=["/ip4/1.2.3.4/tcp/1/p2p/" + PEER_ID + " " * MAX_JOIN_ANSWER])),
    (404, b'{"error": "not found"}'),                          # a dashboard without /api/join, or not a dashboard
])
def test_not_a_join_answer_is_a_user_error(scripted, status, body):
    server = scripted([(status, body)])
    started = time.monotonic()
    with pytest.raises(UserInputError) as error:
        expand_join([server.url], timeout=20, stop=GracefulExit("test"))
    assert time.monotonic() - started < 10  # no retry: asking again would not change the answer
    assert f"{server.url}/api/join" in str(error.value) and error.value.exit_code == EXIT_USER_ERROR
    assert len(server.paths) == 1


def test_nothing_listening_is_unreachable():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(SwarmUnreachableError) as error:
        expand_join([f"http://127.0.0.1:{port}"], timeout=1.0, stop=GracefulExit("test"))
    assert 0.9 <= time.monotonic() - started < 10
    assert f"http://127.0.0.1:{port}/api/join" in str(error.value) and error.value.exit_code == EXIT_UNREACHABLE


def test_a_stop_request_interrupts_the_wait(scripted):
    stop = GracefulExit("test")
    server = scripted([(503, b'{"error": "not yet"}')], on_request=lambda n: stop.request("test"))
    with pytest.raises(KeyboardInterrupt):
        fetch_join_addresses(server.url, timeout=25, stop=stop)
    assert len(server.paths) == 1


def test_multiaddrs_pass_through_unchanged():
    stop = GracefulExit("test")
    stop.request("test")  # nothing is fetched, so nothing waits
    values = [JOIN[0], f"{JOIN[1]},{EXTRA}"]
    assert expand_join(values, timeout=0, stop=stop) == values


@pytest.mark.parametrize("url", ["http://", "https://:8080", "http://coordinator:notaport", "http://coordinator:99999",
                                 "http://coordinator:0", "http://a..b:8080", "http://user:pw@coordinator:8080"])
def test_a_malformed_url_is_a_user_error(url):
    with pytest.raises(UserInputError, match="join URL"):
        expand_join([url], timeout=5, stop=GracefulExit("test"))
