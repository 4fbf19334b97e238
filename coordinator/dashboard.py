"""The coordinator's dashboard: a web page, its JSON API and Prometheus ``/metrics``. Read-only.

Routes (GET and HEAD only; anything else is answered 405, unknown paths 404, both as JSON):

- ``/`` — the page; ``/static/…`` — its script and style, and plotly.js from the installed ``plotly``
  package, so it works offline and loads nothing from a CDN;
- ``/api/status``, ``/api/history?since=STEP``, ``/api/peers``, ``/api/leaderboard`` — JSON, schema
  in ``docs/dashboard.md``;
- ``/api/join`` — the coordinator's join multiaddrs, peer id and run id (``dedloc peer --join
  http://HOST:PORT`` reads them); 503 until the coordinator has published them (:meth:`Dashboard.publish_join`);
- ``/metrics`` — the same figures for Prometheus, written by ``prometheus_client``.

It serves only what the swarm publishes anyway plus the coordinator's own figures. The only addresses
are the coordinator's own join multiaddrs at ``/api/join`` — what every volunteer is given anyway; no
peer's address, no keys, no paths outside the state directory. The server runs in daemon threads; a
failing request is logged and answered 500 without a traceback, and never reaches the coordinator.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import socket
import socketserver
import threading
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Optional
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dedloc.errors import UserInputError

from .run_view import RunView

logger = logging.getLogger(__name__)

STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
PLOTLY_PATH = "/static/plotly.min.js"


@lru_cache(maxsize=None)
def _static(name: str) -> bytes:
    return resources.files("dedloc.coordinator").joinpath("static", name).read_bytes()


@lru_cache(maxsize=1)
def _plotly() -> tuple[bytes, bytes]:
    """plotly.js as the installed plotly package ships it: (plain, gzip)."""
    from plotly.offline import get_plotlyjs

    plain = get_plotlyjs().encode()
    return plain, gzip.compress(plain, 6)


class _MetricsCollector:
    """Turns the run view into Prometheus metrics at scrape time."""

    def __init__(self, view: RunView):
        self.view = view

    def collect(self):
        status = self.view.status()

        def gauge(name: str, doc: str, value) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], math.nan if value is None else float(value))
            return family

        yield gauge("dedloc_global_step", "Global step the swarm has reached", status["step"])
        yield gauge("dedloc_stop_step", "Global step at which the run ends", status["stop_at"])
        yield gauge("dedloc_run_finished", "1 once the run has ended", int(status["finished"]))
        yield gauge("dedloc_loss", "Training loss peers reported for the newest step", status["loss"])
        yield gauge("dedloc_heldout_loss", "Held-out loss of the newest evaluated checkpoint", status["heldout_loss"])
        yield gauge("dedloc_samples_per_second", "Swarm throughput (samples/s)", status["samples_per_second"])
        yield gauge("dedloc_peers", "Peers online", status["peers"])
        yield gauge("dedloc_samples_accumulated", "Samples accumulated toward the next global step", status["samples_accumulated"])
        yield gauge("dedloc_target_batch_size", "Samples in one global step", status["target_batch_size"])
        yield gauge("dedloc_eta_next_step_seconds", "Estimated seconds to the next global step", status["eta_next_step"])
        checkpoint = status["checkpoint"]
        yield gauge("dedloc_checkpoint_step", "Global step of the newest checkpoint", checkpoint and checkpoint["step"])
        total = CounterMetricFamily("dedloc_samples", "Samples contributed by all peers over the run")
        total.add_metric([], float(status["samples"]))
        yield total
        contributions = CounterMetricFamily(
            "dedloc_volunteer_samples", "Samples contributed per volunteer over the run", labels=["volunteer"]
        )
        for row in self.view.leaderboard():
            contributions.add_metric([row["name"]], float(row["samples"]))
        yield contributions


class _DashboardServer(ThreadingHTTPServer):
    def server_bind(self) -> None:
        # HTTPServer looks its host's name up (socket.getfqdn) only to fill server_name, which nothing
        # here reads; on a machine without name resolution that lookup stalls the start by 10 s
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    server_version = "dedloc-dashboard"
    view: RunView
    registry: CollectorRegistry
    dashboard: "Dashboard"

    def log_message(self, format: str, *args) -> None:
        logger.debug("dashboard: " + format, *args)

    def _send(self, status: int, body: bytes, content_type: str, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data) -> None:
        body = json.dumps(data, allow_nan=False, default=str).encode()
        self._send(status, body, "application/json", {"Cache-Control": "no-store"})

    def do_GET(self) -> None:
        try:
            self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as e:
            logger.warning(f"dashboard request {self.path!r} failed: {e!r}")
            try:
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, dict(error="internal error"))
            except OSError:
                pass

    do_HEAD = do_GET

    def _not_allowed(self) -> None:
        self._json(HTTPStatus.METHOD_NOT_ALLOWED, dict(error="the dashboard is read-only", method=self.command))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def _route(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        if path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            self._send(HTTPStatus.OK, _static(name), content_type, {"Cache-Control": "no-cache"})
        elif path == PLOTLY_PATH:
            plain, packed = _plotly()
            headers = {"Cache-Control": "max-age=86400"}
            if "gzip" in self.headers.get("Accept-Encoding", ""):
                self._send(HTTPStatus.OK, packed, "text/javascript; charset=utf-8", dict(headers, **{"Content-Encoding": "gzip"}))
            else:
                self._send(HTTPStatus.OK, plain, "text/javascript; charset=utf-8", headers)
        elif path == "/api/status":
            self._json(HTTPStatus.OK, _finite(self.view.status()))
        elif path == "/api/history":
            try:
                since = int(parse_qs(url.query).get("since", ["0"])[0])
            except ValueError:
                self._json(HTTPStatus.BAD_REQUEST, dict(error="since must be an integer step"))
                return
            self._json(HTTPStatus.OK, _finite(self.view.history(since=since)))
        elif path == "/api/peers":
            self._json(HTTPStatus.OK, _finite(dict(peers=self.view.peers())))
        elif path == "/api/leaderboard":
            self._json(HTTPStatus.OK, _finite(dict(leaderboard=self.view.leaderboard())))
        elif path == "/api/join":
            answer = self.dashboard.join_answer
            if answer is None:
                self._json(HTTPStatus.SERVICE_UNAVAILABLE,
                           dict(error="the coordinator has not published its join addresses yet; ask again shortly"))
            else:
                self._json(HTTPStatus.OK, answer)
        elif path == "/metrics":
            self._send(HTTPStatus.OK, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        else:
            self._json(HTTPStatus.NOT_FOUND, dict(error="not found", path=path[:200]))


def _finite(data):
    """JSON has no NaN or infinity: such figures are shown as unknown (null)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_finite(v) for v in data]
    return data


class Dashboard:
    """The HTTP server; :meth:`start` binds and returns the page's URL, :meth:`stop` closes it."""

    def __init__(self, view: RunView, host: str = "127.0.0.1", port: int = 0):
        self.view, self.host, self.port = view, host, port
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self.join_answer: Optional[dict] = None
        """What ``/api/join`` answers; None (503) until :meth:`publish_join`."""

    def publish_join(self, info: dict) -> None:
        """Serve the join information at ``/api/join``: ``info`` is the dict the coordinator writes to
        ``coordinator.json`` and ``--join-file`` (``peer_id``, ``join``, ``run_id``, hashes). The answer
        leaves out its process id and dashboard URL and names the peer id ``coordinator``."""
        self.join_answer = dict(
            join=list(info["join"]), coordinator=info["peer_id"], run_id=info["run_id"],
            config_sha256=info.get("config_sha256"), tokenizer_sha256=info.get("tokenizer_sha256"),
        )

    def start(self) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_MetricsCollector(self.view))
        handler = type("DashboardHandler", (_Handler,), dict(view=self.view, registry=registry, dashboard=self))
        server_class = _DashboardServer
        if ":" in self.host:
            server_class = type("DashboardServer6", (_DashboardServer,), dict(address_family=socket.AF_INET6))
        try:
            self._server = server_class((self.host, self.port), handler)
        except OSError as e:
            raise UserInputError(f"the dashboard cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
