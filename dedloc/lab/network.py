"""Separate hosts on one machine: a Linux network namespace per host, each joined to a bridge by a
veth pair, with its own address and its uplink and downlink shaped by ``tc`` (tbf).

Bandwidth is all that is shaped: ``netem`` (latency, loss) is not available on the machines this runs
on, so links have loopback-like latency. Only addresses inside the namespaces created here are used
(a private /24 under 10.213.0.0/16 that no interface on the machine already uses).

Contract: :class:`Network` needs root (``ip netns``); without it, creating one raises
:class:`LabUnavailable` with the reason, and :class:`LoopbackNetwork` stands in: the same hosts, all on
127.0.0.1, with links that are neither shaped nor cut. It removes every namespace, link and process it created on
:meth:`Network.close` (also as a context manager and at interpreter exit); namespaces and links left
behind by a process that was killed outright are removed by the next :class:`Network` created on the
machine (their names carry the creating process's pid).
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Optional

import psutil

logger = logging.getLogger(__name__)

NAMESPACE_PREFIX = "dedloc-lab-"
LINK_PREFIX = "dl"  # interface names are at most 15 characters: dl<pid>b, dl<pid>h<i>, dl<pid>h<i>n
SUBNETS = ipaddress.ip_network("10.213.0.0/16")


class LabUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no ``ip``, no kernel support)."""


def _ip(*args: str, namespace: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
    command = ["ip", *args] if namespace is None else ["ip", "netns", "exec", namespace, "ip", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result


def _tc(*args: str, namespace: Optional[str] = None) -> None:
    command = ["tc", *args] if namespace is None else ["ip", "netns", "exec", namespace, "tc", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")


def remove_stale() -> None:
    """Remove namespaces and links a :class:`Network` of a process that no longer exists left behind."""
    listed = _ip("netns", "list", check=False).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        found = re.fullmatch(rf"{NAMESPACE_PREFIX}(\d+)-.+", name)
        if found and not psutil.pid_exists(int(found.group(1))):
            _kill_namespace_processes(name)
            _ip("netns", "delete", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        found = re.match(rf"\d+: ({LINK_PREFIX}(\d+)[bh]\w*)[@:]", line)
        if found and not psutil.pid_exists(int(found.group(2))):
            _ip("link", "delete", found.group(1), check=False)


def _kill_namespace_processes(namespace: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@dataclass
class Host:
    """One machine of the lab: its namespace, its address, and the root-side end of its link."""

    name: str
    namespace: str
    address: str
    link: str
    """Root-side veth (its egress is the host's downlink)."""
    inner_link: str
    """Namespace-side veth (its egress is the host's uplink)."""
    up_mbit: Optional[float] = None
    down_mbit: Optional[float] = None

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


class Network:
    def __init__(self):
        if os.geteuid() != 0:
            raise LabUnavailable("network namespaces need root")
        if shutil.which("ip") is None or shutil.which("tc") is None:
            raise LabUnavailable("the `ip` and `tc` commands (iproute2) are not installed")
        remove_stale()
        self.pid = os.getpid()
        self.hosts: dict[str, Host] = {}
        self.bridge = f"{LINK_PREFIX}{self.pid}b"
        self.subnet = self._free_subnet()
        self._addresses = iter(self.subnet.hosts())
        self.gateway = str(next(self._addresses))
        self._closed = False
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
        except RuntimeError as e:
            raise LabUnavailable(f"cannot create a bridge: {e}") from None
        atexit.register(self.close)
        _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @staticmethod
    def _free_subnet() -> ipaddress.IPv4Network:
        used = set()
        for line in _ip("-4", "-o", "addr", "show", check=False).stdout.splitlines():
            found = re.search(r"inet (\S+)", line)
            if found:
                used.add(ipaddress.ip_interface(found.group(1)).network)
        for subnet in SUBNETS.subnets(new_prefix=24):
            if not any(subnet.overlaps(other) for other in used):
                return subnet
        raise LabUnavailable(f"no free /24 left in {SUBNETS}")

    def add_host(self, name: str, up_mbit: Optional[float] = None, down_mbit: Optional[float] = None) -> Host:
        """A new namespace with its own address on the bridge; links shaped when rates are given."""
        if not re.fullmatch(r"[a-z0-9-]{1,20}", name) or name in self.hosts:
            raise ValueError(f"bad or duplicate host name {name!r}")
        index = len(self.hosts)
        host = Host(
            name=name,
            namespace=f"{NAMESPACE_PREFIX}{self.pid}-{name}",
            address=str(next(self._addresses)),
            link=f"{LINK_PREFIX}{self.pid}h{index}",
            inner_link=f"{LINK_PREFIX}{self.pid}h{index}n",
        )
        _ip("netns", "add", host.namespace)
        self.hosts[name] = host
        _ip("link", "add", host.link, "type", "veth", "peer", "name", host.inner_link)
        _ip("link", "set", host.inner_link, "netns", host.namespace)
        _ip("link", "set", host.link, "master", self.bridge)
        _ip("link", "set", host.link, "up")
        _ip("link", "set", "lo", "up", namespace=host.namespace)
        _ip("addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", host.inner_link, namespace=host.namespace)
        _ip("link", "set", host.inner_link, "up", namespace=host.namespace)
        _ip("route", "add", "default", "via", self.gateway, namespace=host.namespace)
        if up_mbit or down_mbit:
            self.shape(host, up_mbit, down_mbit)
        return host

    def shape(self, host: Host, up_mbit: Optional[float], down_mbit: Optional[float]) -> None:
        """Limit the host's uplink and downlink (Mbit/s; None: unlimited) with a token bucket."""
        for device, rate, namespace in ((host.inner_link, up_mbit, host.namespace), (host.link, down_mbit, None)):
            subprocess.run(
                (["ip", "netns", "exec", namespace] if namespace else []) + ["tc", "qdisc", "del", "dev", device, "root"],
                capture_output=True, timeout=30,
            )
            if rate:
                burst = max(int(rate * 1e6 / 8 / 250), 16 * 1024)  # ~4 ms of traffic, at least 16 kB
                _tc("qdisc", "add", "dev", device, "root", "tbf", "rate", f"{rate}mbit", "burst", str(burst),
                    "latency", "200ms", namespace=namespace)
        host.up_mbit, host.down_mbit = up_mbit, down_mbit

    def refuse_incoming(self, host: Host) -> None:
        """Make ``host`` drop every incoming TCP connection attempt (SYN) while its own outgoing
        connections work: a home router without port forwarding, or a firewall."""
        if shutil.which("iptables") is None:
            raise LabUnavailable("the `iptables` command is not installed")
        subprocess.run(host.command(["iptables", "-A", "INPUT", "-p", "tcp", "--syn", "-j", "DROP"]),
                       check=True, capture_output=True, timeout=30)

    def cut(self, host: Host) -> None:
        """Take the host's link down: its packets are dropped, as when a home router goes away."""
        _ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        _ip("link", "set", host.link, "up")

    def close(self) -> None:
        """Kill every process in the lab's namespaces and remove the namespaces, links and bridge."""
        if self._closed or os.getpid() != self.pid:
            return
        self._closed = True
        for host in self.hosts.values():
            _kill_namespace_processes(host.namespace)
            _ip("link", "delete", host.link, check=False)
            _ip("netns", "delete", host.namespace, check=False)
        _ip("link", "delete", self.bridge, check=False)
        atexit.unregister(self.close)

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LoopbackHost(Host):
    def command(self, argv: list[str]) -> list[str]:
        return list(argv)


class LoopbackNetwork:
    """The lab where namespaces cannot be made: every host is this machine's loopback (127.0.0.1) and
    commands run as they are. Rates are recorded but not enforced; :meth:`cut` and :meth:`restore`
    (and :meth:`refuse_incoming`) raise :class:`LabUnavailable`, so scenarios that cut links skip with the reason. Processes are
    the lab swarm's to stop; there is nothing else to remove."""

    def __init__(self):
        self.hosts: dict[str, Host] = {}

    def add_host(self, name: str, up_mbit: Optional[float] = None, down_mbit: Optional[float] = None) -> Host:
        if not re.fullmatch(r"[a-z0-9-]{1,20}", name) or name in self.hosts:
            raise ValueError(f"bad or duplicate host name {name!r}")
        host = LoopbackHost(name=name, namespace="", address="127.0.0.1", link="", inner_link="",
                            up_mbit=up_mbit, down_mbit=down_mbit)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        raise LabUnavailable("cutting a host's link needs network namespaces (root)")

    def restore(self, host: Host) -> None:
        raise LabUnavailable("restoring a host's link needs network namespaces (root)")

    def refuse_incoming(self, host: Host) -> None:
        raise LabUnavailable("a host that refuses incoming connections needs network namespaces (root)")

    def close(self) -> None:
        pass

    def __enter__(self) -> "LoopbackNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
