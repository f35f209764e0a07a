"""Two hosts on this machine for the multi-node tests: network namespaces joined by a veth pair.

Each host has its own network namespace (loopback and one address on its end of the veth, named `eth0` on
both), and the commands run on it get a UTS namespace of their own with the host's name, so Ray, SLURM and
Lightning see two machines, and a hosts file of their own (/etc/netns/<name>/hosts, as `ip netns exec` would
use it) in which both names resolve. The addresses are in 10.213.7.0/24, outside this machine's own
subnet; nothing is routed anywhere else, so all the traffic stays between the two hosts and their loopbacks.
`two_hosts()` tears everything down afterwards, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SUBNET_PREFIX = "10.213.7"
INTERFACE = "eth0"  # each host's end of the veth (e.g. GLOO_SOCKET_IFNAME)
NETNS_ETC = Path("/etc/netns")


@dataclass
class Host:
    name: str  # its hostname, and the name of its network namespace
    address: str  # its address on the veth

    def command(self, *argv: str) -> list[str]:
        """argv run on this host: in its network namespace, under its own hostname, with its own /etc/hosts.

        nsenter enters the network namespace only (`ip netns exec` would also mount a fresh /sys, without the
        cgroup file systems slurmd needs); the hosts file is bound over /etc/hosts in a mount namespace of its own.
        """
        return [
            "nsenter",
            f"--net=/run/netns/{self.name}",
            "unshare",
            "--mount",
            "--uts",
            "sh",
            "-c",
            f'mount --bind {NETNS_ETC / self.name / "hosts"} /etc/hosts && hostname {self.name} && exec "$@"',
            "sh",
            *argv,
        ]

    def run(self, *argv: str, timeout: float = 60.0, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout, **kwargs)

    def start(self, *argv: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(*argv), **kwargs)


@contextmanager
def two_hosts(prefix: str | None = None) -> Iterator[tuple[Host, Host]]:
    """Two hosts joined by a veth pair; the namespaces (and every process left in them) are removed afterwards."""
    prefix = prefix or f"rl{os.getpid() % 100000}"
    hosts = (Host(f"{prefix}a", f"{SUBNET_PREFIX}.1"), Host(f"{prefix}b", f"{SUBNET_PREFIX}.2"))
    try:
        for host in hosts:
            _ip("netns", "add", host.name)
            _ip("-n", host.name, "link", "set", "lo", "up")
        _ip("link", "add", f"{prefix}va", "type", "veth", "peer", "name", f"{prefix}vb")
        for host, link in zip(hosts, (f"{prefix}va", f"{prefix}vb")):
            _ip("link", "set", link, "netns", host.name)
            _ip("-n", host.name, "link", "set", link, "name", INTERFACE)
            _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
            _ip("-n", host.name, "link", "set", INTERFACE, "up")
        names = "127.0.0.1 localhost\n" + "".join(f"{host.address} {host.name}\n" for host in hosts)
        for host in hosts:
            (NETNS_ETC / host.name).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / host.name / "hosts").write_text(names)
        yield hosts
    finally:
        for host in hosts:
            kill_host_processes(host)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)  # the veth goes with it
            shutil.rmtree(NETNS_ETC / host.name, ignore_errors=True)


def kill_host_processes(host: Host) -> None:
    """Kill every process in the host's network namespace (a node lost)."""
    pids = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except ProcessLookupError:
            pass


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True)
