"""A peer's upload bandwidth, measured against the coordinator when it joins.

The share of each all-reduce a peer reduces follows the upload bandwidth it announces
(:func:`dedloc.swarm.reduction.reduction_shares`). A volunteer rarely knows that figure, so unless one
is given (``--upload-mbps``), the peer measures it: it streams data to the coordinator's libp2p
handler :data:`PROBE_HANDLER` for a few seconds, and the coordinator, which times the arrivals,
answers with the rate (Mbit/s). The measured figure is the path from the volunteer to the
coordinator, so it is the volunteer's uplink as long as the coordinator's downlink is faster (an
organiser's server usually is); a run whose coordinator sits on a slower line than its volunteers
measures that line for everyone, and the shares stay equal.

Protocol: the peer sends ``ExpertRequest`` messages whose ``metadata`` is :data:`CHUNK_BYTES` of
filler, keeping at most :data:`WINDOW_BYTES` unacknowledged; the coordinator acknowledges every chunk
with a msgpack map ``{"received": bytes, "done": bool, "mbps": float | None}`` in an ``ExpertResponse``
and says ``done`` after :data:`PROBE_SECONDS` or :data:`MAX_PROBE_BYTES`; it then reads the rest of
the stream without answering. A refusal is one map ``{"error": "busy" | "refused", "message": str}``:
``busy`` while another peer's probe runs (one at a time, so probes do not share the coordinator's
downlink), ``refused`` for a peer the run does not admit or one that probed less than
:data:`COOLDOWN` seconds ago. Nothing received is unpickled.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
import time
from functools import partial
from typing import AsyncIterator, Callable, Optional

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto.runtime_pb2 import ExpertRequest, ExpertResponse
from hivemind.utils import MSGPackSerializer

from dedloc.swarm.access import drain_stream

logger = logging.getLogger(__name__)

PROBE_HANDLER = "dedloc.UploadProbe"
CHUNK_BYTES = 64 * 1024
WINDOW_BYTES = 4 * 1024 * 1024
"""Bytes the peer keeps in flight: enough for ~300 Mbit/s at 100 ms round trip."""
PROBE_SECONDS = 3.0
"""How long the coordinator times arrivals (from the first chunk)."""
MAX_PROBE_BYTES = 32 * 1024 * 1024
"""A probe ends after this many bytes even before :data:`PROBE_SECONDS` (a fast link is measured in less)."""
COOLDOWN = 60.0
PROBE_TIMEOUT = 30.0
"""The most seconds one probe takes, from the peer's side."""


def _answer(**fields) -> ExpertResponse:
    return ExpertResponse(metadata=MSGPackSerializer.dumps(fields))


class ProbeDesk:
    """The coordinator's side: times the arrivals of one probe at a time. ``admitted(peer_id)`` says
    whether a peer may probe (in a run with an allowlist: it holds an access token)."""

    def __init__(self, admitted: Callable[[PeerID], bool] = lambda peer_id: True):
        self.admitted = admitted
        self._lock = asyncio.Lock()
        self._last_probe: dict[PeerID, float] = {}

    async def handle(self, requests: AsyncIterator[ExpertRequest], context: P2PContext) -> AsyncIterator[ExpertResponse]:
        peer = context.remote_id
        refusal = None
        if not self.admitted(peer):
            refusal = _answer(error="refused", message="this peer is not admitted to the run")
        elif time.monotonic() - self._last_probe.get(peer, -math.inf) < COOLDOWN:
            refusal = _answer(error="refused", message=f"at most one upload probe per {COOLDOWN:.0f} s")
        elif self._lock.locked():
            refusal = _answer(error="busy", message="another peer's upload probe is running")
        if refusal is not None:
            # the peer sends a window's worth before it waits for an answer: closing the stream on it
            # would show it a reset connection instead of the reason
            await drain_stream(requests, 5.0, WINDOW_BYTES // CHUNK_BYTES)
            yield refusal
            return
        async with self._lock:
            now = time.monotonic()  # (probes older than the cool-down no longer matter)
            self._last_probe = {other: at for other, at in self._last_probe.items() if now - at < COOLDOWN}
            self._last_probe[peer] = now
            first_at = first_bytes = None
            received, done, deadline = 0, False, time.monotonic() + PROBE_TIMEOUT
            incoming = requests.__aiter__()
            while True:
                try:  # a peer that stalls mid-probe does not keep the others waiting
                    request = await asyncio.wait_for(incoming.__anext__(), max(0.0, deadline - time.monotonic()))
                except (StopAsyncIteration, asyncio.TimeoutError):
                    break
                received += len(request.metadata)
                now = time.monotonic()
                if done:
                    continue  # the peer stops within a window: read it without answering
                if first_at is None:
                    first_at, first_bytes = now, received  # timed from the first arrival, without its bytes
                elapsed = now - first_at
                mbps = (received - first_bytes) * 8 / elapsed / 1e6 if elapsed > 0 else None
                done = elapsed >= PROBE_SECONDS or received >= MAX_PROBE_BYTES
                yield _answer(received=received, done=done, mbps=mbps)
            if done and mbps is not None:
                logger.debug(f"upload probe of peer {peer.to_base58()}: {mbps:.1f} Mbit/s ({received} bytes)")


async def serve_upload_probe(p2p: P2P, desk: ProbeDesk) -> None:
    """Register the coordinator's probe handler on ``p2p`` (run in the process that owns it)."""
    await p2p.add_protobuf_handler(PROBE_HANDLER, desk.handle, ExpertRequest, stream_input=True, stream_output=True)


class ProbeRefused(RuntimeError):
    """The coordinator did not measure this peer: :attr:`kind` ``busy`` (try again later) or ``refused``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


async def probe_upload(p2p: P2P, coordinator_id: PeerID) -> float:
    """Measure this node's upload to ``coordinator_id`` (Mbit/s); :class:`ProbeRefused` when the
    coordinator does not take the probe, ``asyncio.TimeoutError`` after :data:`PROBE_TIMEOUT`, and
    ``ValueError`` for an answer that makes no sense."""
    filler = bytes(CHUNK_BYTES)
    sent, acknowledged, done = 0, 0, False
    room = asyncio.Event()

    async def chunks() -> AsyncIterator[ExpertRequest]:
        nonlocal sent
        while not done:
            while sent - acknowledged >= WINDOW_BYTES and not done:
                room.clear()
                await room.wait()
            if done:
                return
            sent += CHUNK_BYTES
            yield ExpertRequest(metadata=filler)

    async def measure() -> float:
        nonlocal acknowledged, done
        mbps = None
        try:
            async for response in await p2p.iterate_protobuf_handler(coordinator_id, PROBE_HANDLER, chunks(), ExpertResponse):
                fields = MSGPackSerializer.loads(response.metadata) if len(response.metadata) < 4096 else None
                if not isinstance(fields, dict):
                    raise ValueError("a malformed answer")
                if "error" in fields:
                    raise ProbeRefused(str(fields["error"]), str(fields.get("message", ""))[:200])
                received, mbps = fields.get("received"), fields.get("mbps")
                if not isinstance(received, int) or not 0 <= received <= sent:
                    raise ValueError("an acknowledgement of bytes never sent")
                acknowledged = received
                if fields.get("done"):
                    break
                room.set()
        finally:
            done = True
            room.set()
        if not isinstance(mbps, (int, float)) or not math.isfinite(mbps) or mbps <= 0:
            raise ValueError(f"no usable rate in the answer ({mbps!r})")
        return float(mbps)

    return await asyncio.wait_for(measure(), PROBE_TIMEOUT)


async def _probe_in_dht(dht, node, coordinator_id: str) -> dict:
    """Runs inside the DHT process: one probe over its libp2p node. Returns ``{"mbps": float}`` or
    ``{"error": kind, "message": str}`` (raised, hivemind would log a traceback for an expected refusal)."""
    try:
        return dict(mbps=await probe_upload(node.p2p, PeerID.from_base58(coordinator_id)))
    except ProbeRefused as e:
        return dict(error=e.kind, message=str(e))
    except Exception as e:
        return dict(error="failed", message=f"{type(e).__name__}: {e}".strip())


class UploadMeasurement(threading.Thread):
    """Measures this peer's upload in the background (retrying while the coordinator is busy with other
    peers' probes, for at most ``patience`` seconds) and hands the figure to every callback given to
    :meth:`then` — at once if it is already known. ``mbps`` stays None when no figure could be had."""

    def __init__(self, dht, coordinator_id: PeerID, patience: float = 300.0):
        super().__init__(name="upload-measurement", daemon=True)
        self.dht, self.coordinator_id, self.patience = dht, coordinator_id, patience
        self.mbps: Optional[float] = None
        self._callbacks: list[Callable[[float], None]] = []
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def then(self, callback: Callable[[float], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)
            known = self.mbps
        if known is not None:
            callback(known)

    def run(self) -> None:
        give_up_at = time.monotonic() + self.patience
        while not self._halt.is_set():
            try:
                result = self.dht.run_coroutine(
                    partial(_probe_in_dht, coordinator_id=self.coordinator_id.to_base58()), return_future=True,
                ).result(PROBE_TIMEOUT + 10.0)
            except Exception as e:  # the DHT is shutting down
                result = dict(error="failed", message=f"{type(e).__name__}: {e}".strip())
            if "error" in result:
                if result["error"] == "busy" and time.monotonic() < give_up_at:
                    self._halt.wait(random.uniform(2.0, 8.0))
                    continue
                if not self._halt.is_set():
                    logger.info(f"upload not measured ({result['message']}): this peer announces none, and counts "
                                "as a typical home uplink in the all-reduce")
                return
            mbps = result["mbps"]
            with self._lock:
                self.mbps = mbps
                callbacks = list(self._callbacks)
            logger.info(f"upload measured: {mbps:.1f} Mbit/s to the coordinator; the share of each all-reduce this "
                        "peer reduces follows it (--upload-mbps sets it instead)")
            for callback in callbacks:
                callback(mbps)
            return

    def stop(self) -> None:
        self._halt.set()

