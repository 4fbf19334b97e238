"""A libp2p node for the upload-probe tests: ``serve HOST`` serves the coordinator's probe handler
(prints its multiaddr, then runs until stdin closes); ``probe MADDR`` measures its upload to that node
and prints the Mbit/s (or ``refused KIND``)."""

import asyncio
import sys

from hivemind.p2p import P2P, PeerID

from dedloc.swarm.bandwidth import ProbeDesk, ProbeRefused, probe_upload, serve_upload_probe

OPTIONS = dict(nat_port_map=False, auto_nat=False, use_relay=False)


async def serve(host: str) -> None:
    p2p = await P2P.create(host_maddrs=[f"/ip4/{host}/tcp/0"], **OPTIONS)
    await serve_upload_probe(p2p, ProbeDesk())
    print(f"{(await p2p.get_visible_maddrs())[0]}/p2p/{p2p.peer_id.to_base58()}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await p2p.shutdown()


async def probe(maddr: str) -> None:
    p2p = await P2P.create(initial_peers=[maddr], **OPTIONS)
    try:
        print(await probe_upload(p2p, PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])), flush=True)
    except ProbeRefused as e:
        print(f"refused {e.kind}", flush=True)
    finally:
        await p2p.shutdown()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[2]) if sys.argv[1] == "serve" else probe(sys.argv[2]))
