"""Real network partitions for fault tests: each host in its own network namespace, joined
to one bridge by a veth pair; cutting a host's veth isolates it both ways.

Names carry a per-run prefix (the test process's pid) so parallel runs never collide; the
subnet is a /24 under 10.77.0.0/16 that no route of this machine uses yet. Nothing is routed
beyond the bridge: no default route, no forwarding, so no packet leaves this machine.
`Net.close()` removes every namespace, veth and the bridge it created, even half built.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading

CLONE_NEWNET = 0x40000000


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {p.stderr.strip()}")
    return p


def _free_subnet(start: int) -> str:
    routes = ip("-4", "route", "show", "table", "all").stdout
    for i in range(250):
        k = (start + i) % 250 + 1
        net = f"10.77.{k}"
        if f"{net}.0/24" not in routes and f" {net}." not in routes:
            return net
    raise RuntimeError("no free 10.77.x.0/24 subnet for the test network")


class Net:
    """One bridge in the root namespace (it also carries the root namespace's own address,
    .254, where the registry listens) and one namespace per host (.1, .2, ...)."""

    def __init__(self, hosts: int):
        if os.geteuid() != 0:
            raise RuntimeError("network namespaces need root (CI runs the suite as root)")
        pid = os.getpid() % 100000
        self.tag = f"vbpt{pid}"
        self.bridge = f"{self.tag}br"
        self.net = _free_subnet(pid)
        self.root_addr = f"{self.net}.254"
        self.hosts = hosts
        self.namespaces: list[str] = []
        self.veths: list[str] = []
        self.bridge_made = False

    def ns(self, i: int) -> str:
        return f"{self.tag}-h{i + 1}"

    def addr(self, i: int) -> str:
        return f"{self.net}.{i + 1}"

    def veth(self, i: int) -> str:
        return f"{self.tag}v{i + 1}"

    def up(self) -> "Net":
        try:
            ip("link", "add", self.bridge, "type", "bridge")
            self.bridge_made = True
            ip("addr", "add", f"{self.root_addr}/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for i in range(self.hosts):
                ns, veth = self.ns(i), self.veth(i)
                ip("netns", "add", ns)
                self.namespaces.append(ns)
                ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
                self.veths.append(veth)
                ip("link", "set", f"{veth}p", "netns", ns)
                ip("link", "set", veth, "master", self.bridge)
                ip("link", "set", veth, "up")
                ip("-n", ns, "link", "set", "lo", "up")
                ip("-n", ns, "link", "set", f"{veth}p", "name", "eth0")
                ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def cut(self, i: int) -> None:
        """Isolate host i from everything (peers, registry, clients outside it), both ways."""
        ip("link", "set", self.veth(i), "down")

    def heal(self, i: int) -> None:
        ip("link", "set", self.veth(i), "up")

    def cut_peers(self, i: int, on: bool = True) -> None:
        """Cut host i from the other hosts only (`on=False`: heal): blackhole routes to
        their addresses inside its namespace, so what it sends them fails at once and
        their packets get no answer; the registry (root_addr) and its clients stay."""
        for j in range(self.hosts):
            if j != i:
                ip("-n", self.ns(i), "route", "add" if on else "del", "blackhole",
                   f"{self.addr(j)}/32")

    def close(self) -> None:
        for ns in self.namespaces:  # deleting a namespace deletes its end of the veth pair
            ip("netns", "del", ns, check=False)
        for veth in self.veths:
            ip("link", "del", veth, check=False)
        if self.bridge_made:
            ip("link", "del", self.bridge, check=False)
        self.namespaces, self.veths, self.bridge_made = [], [], False

    def connect(self, i: int, port: int, timeout: float = 30, to: str | None = None) -> socket.socket:
        """A TCP connection made from INSIDE host i's namespace to host i's address: a
        client on the same machine as the host, which a cut of the host's link leaves
        connected (like a hypervisor's NBD client next to its gateway). `to`: another
        address instead (the root namespace's, root_addr: a client on another machine)."""
        out: dict = {}

        def run() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(f"/run/netns/{self.ns(i)}", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:  # this thread only
                        raise OSError(ctypes.get_errno(), f"setns {self.ns(i)}")
                finally:
                    os.close(fd)
                out["sock"] = socket.create_connection((to or self.addr(i), port), timeout=timeout)
            except BaseException as e:  # handed to the caller
                out["error"] = e

        t = threading.Thread(target=run, name=f"setns-{self.ns(i)}")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        s = out["sock"]
        s.settimeout(None)
        return s
