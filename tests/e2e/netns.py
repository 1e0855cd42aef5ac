"""Hosts for one test: network namespaces joined by veth pairs to a bridge of their own.

``Network`` makes a bridge (no address: the machine's own network never sees the hosts'
traffic) and, for each ``host(role, address)``, a namespace with its loopback and an ``eth0``
on the bridge. Names carry a random token, so runs side by side never clash. Processes started
on a host (``Host.popen``) run in its namespace under its own host name (a UTS namespace of
their own, so `mirror status` shows which host holds which partitions), each in a process group
of its own so that SIGKILL reaches all of it. ``Network.close`` kills every process it started
and whatever else is left in its namespaces, then removes the namespaces and the bridge; it is
safe to call twice and after a half-built network.

Needs root (``ip netns``); CI runs as root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

SUBNET = "10.77.0"  # on the test's own bridge only; nothing outside the namespaces has it


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30,
                          check=check)


class Host:
    """One namespace: ``name`` (also its host name), ``address`` on the bridge."""

    def __init__(self, network: Network, role: str, address: str) -> None:
        self.network = network
        self.role = role
        self.name = role
        self.address = address
        self.netns = f"mirror-{network.token}-{role}"
        self.processes: list[subprocess.Popen[bytes]] = []

    def wrap(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this host's namespace, under its host name."""
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *command]

    def popen(self, command: Sequence[str], *, env: Mapping[str, str], log: Path,
              cwd: Path | None = None, stdin: int | None = subprocess.DEVNULL,
              stdout: int | None = None) -> subprocess.Popen[bytes]:
        """Start ``command`` on this host, in a process group of its own; stderr (and stdout
        unless asked for) are appended to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.wrap(command), env=dict(env), cwd=cwd, stdin=stdin,
                                    stdout=out if stdout is None else stdout, stderr=out,
                                    start_new_session=True)
        self.processes.append(proc)
        return proc

    def run(self, command: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.wrap(command), capture_output=True, text=True,
                              timeout=timeout)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and its group, as when the host loses power; reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                self.kill(proc)
        # Anything else still in the namespace was started there by this test.
        pids = ip("netns", "pids", self.netns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", self.netns, check=False)


class Network:
    """A bridge and the namespaces on it (see the module doc)."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(3)
        self.bridge = f"mbr{self.token}"
        self.hosts: list[Host] = []
        self._bridge_made = False

    def up(self) -> Network:
        ip("link", "add", self.bridge, "type", "bridge")
        self._bridge_made = True
        ip("link", "set", self.bridge, "up")
        return self

    def host(self, role: str, last_octet: int) -> Host:
        """A new host ``role`` (at most 3 characters) at ``SUBNET.last_octet``."""
        assert len(role) <= 3
        host = Host(self, role, f"{SUBNET}.{last_octet}")
        self.hosts.append(host)
        outside, inside = f"mv{self.token}{role}", f"mp{self.token}{role}"
        ip("netns", "add", host.netns)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", outside, "master", self.bridge)
        ip("link", "set", outside, "up")
        ip("link", "set", inside, "netns", host.netns)
        inns = ("netns", "exec", host.netns, "ip")
        ip(*inns, "link", "set", inside, "name", "eth0")
        ip(*inns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip(*inns, "link", "set", "eth0", "up")
        ip(*inns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Kill every process, remove every namespace and the bridge. Safe twice."""
        for host in self.hosts:
            host.close()
        for host in self.hosts:  # the outside ends normally go with their namespace
            ip("link", "del", f"mv{self.token}{host.role}", check=False)
        self.hosts = []
        if self._bridge_made:
            ip("link", "del", self.bridge, check=False)
            self._bridge_made = False
