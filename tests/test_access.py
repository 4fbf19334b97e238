"""A run with an allowlist: tokens, the coordinator's access desk, DHT and averaging checks, intruders."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hivemind.proto import dht_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dedloc.allowlist import add_volunteer, load_allowlist, revoke_volunteer
from dedloc.errors import UserInputError

from dedloc.swarm.access import (
    AccessRefused, SwarmAuthorizer, mint_token, parse_token, read_access_answer, token_holder, token_problem,
)
from dedloc.swarm.identity import Identity, peer_id_of_public_key
from dedloc.swarm.records import swarm_prefix
from dedloc.coordinator.admission import AccessDesk
from hivemind.utils import MSGPackSerializer
from helpers import join_addresses, read_history, small_run_config, wait_for

TESTS = Path(__file__).parent


def test_a_token_admits_only_what_the_coordinator_signed_until_it_expires():
    authority, member, intruder = RSAPrivateKey(), RSAPrivateKey(), RSAPrivateKey()
    token = mint_token(authority, "alice", member.get_public_key(), get_dht_time() + 60)
    assert token_problem(token, authority.get_public_key()) is None
    assert token_holder(token) == peer_id_of_public_key(member.get_public_key())

    forged = mint_token(intruder, "alice", intruder.get_public_key(), get_dht_time() + 60)
    assert "not signed by this run's coordinator" in token_problem(forged, authority.get_public_key())
    altered = parse_token(token.SerializeToString())
    altered.public_key = intruder.get_public_key().to_bytes()  # someone else's key under alice's signature
    assert "not signed" in token_problem(altered, authority.get_public_key())
    expired = mint_token(authority, "alice", member.get_public_key(), get_dht_time() - 5)
    assert "expired" in token_problem(expired, authority.get_public_key())
    assert "revoked" in token_problem(token, authority.get_public_key(), revoked=frozenset({"alice"}))
    assert parse_token(b"\xff" * 5000) is None and parse_token("text") is None


def test_dht_requests_with_a_stolen_replayed_or_forged_token_are_refused():
    authority, member, intruder = RSAPrivateKey(), RSAPrivateKey(), RSAPrivateKey()
    coordinator = SwarmAuthorizer(authority.get_public_key(), mint_lifetime=600, local_private_key=authority)
    token = mint_token(authority, "alice", member.get_public_key(), get_dht_time() + 600)

    async def signed_by(key: RSAPrivateKey, held_token, trusting: RSAPrivateKey = authority) -> dht_pb2.PingRequest:
        request = dht_pb2.PingRequest()
        client = SwarmAuthorizer(trusting.get_public_key(), token=held_token, local_private_key=key)
        await client.sign_request(request, None)
        return request

    async def scenario():
        honest = await signed_by(member, token)
        assert await coordinator.validate_request(honest)
        replayed = dht_pb2.PingRequest()
        replayed.CopyFrom(honest)
        replayed.auth.signature = honest.auth.signature
        assert not await coordinator.validate_request(replayed), "a replayed request was accepted"
        assert not await coordinator.validate_request(await signed_by(intruder, token)), "a stolen token was accepted"
        forged = mint_token(intruder, "alice", intruder.get_public_key(), get_dht_time() + 600)
        assert not await coordinator.validate_request(await signed_by(intruder, forged, trusting=intruder)), "a forged token was accepted"
        assert not await coordinator.validate_request(dht_pb2.PingRequest()), "a request without a token was accepted"
        coordinator.revoked = frozenset({"alice"})
        assert not await coordinator.validate_request(await signed_by(member, token)), "a revoked volunteer was accepted"

    asyncio.run(scenario())


def test_the_access_desk_admits_invited_volunteers_and_says_why_it_refuses(tmp_path):
    authority = RSAPrivateKey.process_wide()  # the desk signs with the process's identity, as in the coordinator
    allowlist = tmp_path / "allowlist.toml"
    invite = add_volunteer(allowlist, "alice")
    add_volunteer(allowlist, "bob", peer_id=peer_id_of_public_key(RSAPrivateKey().get_public_key()).to_base58())
    member = RSAPrivateKey()
    member_id = peer_id_of_public_key(member.get_public_key())
    desk = AccessDesk(allowlist, "run", lifetime=600)

    def ask(key=member, remote=member_id, **fields):
        request = {**dict(invite=invite, public_key=key.get_public_key().to_bytes(), time=get_dht_time()), **fields}
        return desk.answer(request, remote)

    assert not desk.admits(member_id)  # (the coordinator's other services, e.g. the upload probe)
    answer = ask()
    token = parse_token(answer["token"])
    assert token.username == "alice" and token_holder(token) == member_id
    assert desk.admits(member_id) and not desk.admits(peer_id_of_public_key(RSAPrivateKey().get_public_key()))
    assert token_problem(token, authority.get_public_key()) is None
    assert "not on the allowlist" in ask(invite="dedloc-invite-wrong")["message"]
    assert "not on the allowlist" in ask(invite=None)["message"] and "--invite" in ask(invite=None)["message"]
    # a caller asking for a token for a key its connection does not hold
    assert ask(key=RSAPrivateKey())["error"] == "malformed"
    skewed = ask(time=get_dht_time() + 95)
    assert skewed["error"] == "clock" and re.search(r"your clock is 9\d s ahead of the coordinator's", skewed["message"])
    # the peer side reports a skewed clock as such too, from the desk's time
    with pytest.raises(AccessRefused, match=r"your clock is \d+ s behind"):
        read_access_answer(MSGPackSerializer.dumps(dict(answer, time=get_dht_time() + 120)), peer_id_of_public_key(authority.get_public_key()))

    revoke_volunteer(allowlist, "alice")  # the desk notices the changed file on the next request
    assert not desk.admits(member_id)
    assert "revoked" in ask()["message"]
    assert AccessDesk(None, "run", 600).answer({}, member_id)["error"] == "open"
    assert AccessDesk(None, "run", 600).admits(member_id)


@pytest.mark.parametrize("text, problem", [
    ("[[volunteer]\nname = 'a'", "not valid TOML"),
    ("[[volunteer]]\nname = 'a'\ninvite_sha256 = '" + "0" * 64 + "'\ncolour = 'red'\n", "colour"),
    ("[[volunteer]]\nname = 'a'\n", "neither an invite_sha256 nor peer_ids"),
    ("[[volunteer]]\nname = 'a b'\npeer_ids = ['x']\n", "name"),
    ("[[volunteer]]\nname = 'a'\npeer_ids = ['QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N']\n" * 2, "repeated: a"),
])
def test_a_malformed_allowlist_is_refused_with_the_reason(tmp_path, text, problem):
    path = tmp_path / "allowlist.toml"
    path.write_text(text)
    with pytest.raises(UserInputError, match=re.escape(problem)):
        load_allowlist(path)


def test_allowlist_commands(tmp_path):
    path = tmp_path / "allow.toml"

    def dedloc(*args):
        return subprocess.run([sys.executable, "-m", "dedloc", "allowlist", *args, "--file", str(path)],
                              capture_output=True, text=True, timeout=60)

    added = dedloc("add", "alice")
    assert added.returncode == 0 and added.stdout.strip().splitlines()[-1].startswith("dedloc-invite-")
    assert dedloc("add", "alice").returncode == 2
    assert dedloc("revoke", "nobody").returncode == 2
    assert dedloc("revoke", "alice").returncode == 0
    assert "alice\tinvite\trevoked" in dedloc("list").stdout
    assert path.stat().st_mode & 0o077 == 0, "the allowlist is readable by others"
    for command in (["allowlist", "list", "--file"], ["coordinator", "--workdir", str(tmp_path / "c"), "--allowlist"]):
        missing = subprocess.run([sys.executable, "-m", "dedloc", *command, str(tmp_path / "none.toml")],
                                 capture_output=True, text=True, timeout=60)
        assert missing.returncode == 2 and "cannot read the allowlist" in missing.stderr, missing.stderr


def _intrude(coordinator_dir: Path, join: list[str], members: list) -> list[dict]:
    """Run the plain-hivemind intruder against the run and one of ``members`` (running peers); its JSON lines."""
    info = json.loads((coordinator_dir / "coordinator.json").read_text())
    prefix = swarm_prefix(info["run_id"], info["config_sha256"], info["tokenizer_sha256"])
    ids = {m[1] for member in members for m in [re.search(r"joined the swarm as (\S+);", member.log_path.read_text())] if m}

    def member_address():
        # the coordinator notes the addresses of whatever it is connected to, which may include a
        # refused volunteer that has gone since: only a running member's address will do
        known = json.loads((coordinator_dir / "network.json").read_text()).get("peers", [])
        return [maddr for maddr in known if maddr.rsplit("/p2p/", 1)[-1] in ids]

    member = wait_for(member_address, 60, "the coordinator to note a member's address")[0]
    done = subprocess.run([sys.executable, str(TESTS / "intruder.py"), prefix, join[0], member],
                          capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.mark.swarm
@pytest.mark.timeout(420)
def test_an_allowlisted_run_trains_keeps_intruders_out_and_revokes(tmp_path, procs):
    allowlist = tmp_path / "allowlist.toml"
    invite = add_volunteer(allowlist, "alice")
    bob_identity = tmp_path / "bob.key"  # bob is admitted by his identity, without an invite
    add_volunteer(allowlist, "bob", peer_id=Identity.load_or_create(bob_identity).peer_id.to_base58())
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 20})
    coordinator_dir = tmp_path / "coordinator"
    # tokens live 60 s: the run outlasts them, so members must renew theirs (at half-life) to finish it
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(coordinator_dir),
                               "--allowlist", str(allowlist), "--token-lifetime", "60", "--no-dashboard")
    join = join_addresses(coordinator_dir, coordinator)
    assert "this run is OPEN" not in coordinator.log_path.read_text()
    (tmp_path / "alice.invite").write_text(invite + "\n")
    alice = procs.dedloc("peer", "--join", *join, "--invite-file", str(tmp_path / "alice.invite"), "--workdir",
                         str(tmp_path / "a"), name="alice")
    bob = procs.dedloc("peer", "--join", *join, "--identity", str(bob_identity), "--workdir", str(tmp_path / "b"), name="bob")
    members = [coordinator, alice, bob]

    # volunteers without a (valid) invite are told so, with exit code 2
    for name, flags in (("uninvited", []), ("wrong-invite", ["--invite", "dedloc-invite-guessed"])):
        refused = procs.dedloc("peer", "--join", *join, *flags, "--workdir", str(tmp_path / name), name=name)
        wait_for(lambda: refused.poll() is not None, 90, f"the {name} peer to give up", watch=members)
        assert refused.poll() == 2, refused.log_tail(20)
        assert "not on the allowlist" in refused.log_tail(5)

    wait_for(lambda: len(read_history(coordinator_dir)) >= 2, 240, "2 global steps", watch=members)
    attempts = _intrude(coordinator_dir, join, [alice, bob])
    assert len(attempts) == 5, attempts
    assert not [a for a in attempts if a["outcome"] == "succeeded"], attempts
    for attempt in attempts[2:]:  # the averaging RPCs answer with the reason
        assert attempt["outcome"] == "refused" and "not on the allowlist" in attempt["message"], attempt
    coordinator_log = coordinator.log_path.read_text()
    assert coordinator_log.count("refused a DHT request from a peer with no access token") == 1
    assert coordinator_log.count("with an access token not signed by this run's coordinator") == 1
    assert "refused access to peer" in coordinator_log  # the uninvited peers' requests for a token

    # revoking bob: he leaves with the reason (exit 2), alice and the run go on to the end
    revoke_volunteer(allowlist, "bob")
    wait_for(lambda: bob.poll() is not None, 90, "bob to leave after his revocation", watch=[coordinator, alice])
    assert bob.poll() == 2 and "revoked" in bob.log_tail(10), bob.log_tail(20)

    # `dedloc status` reads a closed run with an invite, and says why not without one
    def status(*flags):
        return subprocess.run([sys.executable, "-m", "dedloc", "status", "--join", *join, "--json", *flags],
                              capture_output=True, text=True, timeout=90)

    shown = status("--invite", invite)
    assert shown.returncode == 0 and json.loads(shown.stdout)["run_id"], shown.stderr[-2000:]
    refused = status()
    assert refused.returncode == 2 and "not on the allowlist" in refused.stderr, refused.stderr[-2000:]

    for child in (coordinator, alice):
        wait_for(lambda: child.poll() is not None, 300, f"{child.name} to finish", watch=[coordinator, alice])
        assert child.poll() == 0, child.log_tail(30)
    history = read_history(coordinator_dir)
    assert [record["step"] for record in history] == list(range(1, 21))
    assert "access token renewed" in alice.log_path.read_text()
    for child in (coordinator, alice, bob):
        assert "Traceback" not in child.log_path.read_text(), f"{child.name} logged a traceback"


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_the_same_intruder_gets_into_an_open_run(tmp_path, procs):
    """The control: without an allowlist the intruder above joins the DHT, writes records and downloads
    the model, so the refusals measured there are the allowlist's doing."""
    config = small_run_config(tmp_path / "run.toml", training={"total_steps": 30})
    coordinator_dir = tmp_path / "coordinator"
    coordinator = procs.dedloc("coordinator", "--config", str(config), "--workdir", str(coordinator_dir), "--no-dashboard")
    join = join_addresses(coordinator_dir, coordinator)
    assert "this run is OPEN" in coordinator.log_path.read_text()
    peers = [procs.dedloc("peer", "--join", *join, "--workdir", str(tmp_path / f"p{i}"), name=f"peer-{i}") for i in (1, 2)]
    wait_for(lambda: len(read_history(coordinator_dir)) >= 2, 240, "2 global steps", watch=[coordinator, *peers])
    attempts = {a["attempt"]: a for a in _intrude(coordinator_dir, join, peers)}
    assert attempts["no token: write a record"]["outcome"] == "succeeded", attempts
    assert attempts["no token: read the swarm's records"]["outcome"] == "succeeded", attempts
    assert attempts["download the state"]["outcome"] == "succeeded", attempts
