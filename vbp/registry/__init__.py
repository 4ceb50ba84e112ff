"""Cluster metadata behind one synchronous interface (DESIGN.md, Packages).

    open_registry("lmdb:///var/lib/vbp/registry")        embedded, one machine (default)
    open_registry("etcd://10.0.0.1:2379,10.0.0.2:2379")   etcd v3, many machines
    open_registry("memory://test")                        in-process, for tests/simulation

blockd calls the registry from worker threads (trio.to_thread); the CLI calls it directly.
See vbp.registry.base for the key layout, the epoch rule and the lease token rule.
"""

from __future__ import annotations

import re

from vbp.errors import BadValue
from vbp.registry.base import Lease, Registry, StaleRecord

__all__ = ["open_registry", "Registry", "Lease", "StaleRecord"]

_ENDPOINT_RE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")


def refuse_in_process(url: str) -> None:
    """memory:// lives and dies with one process: a blockd or a vbp command on it shares
    its pool with nobody (BadValue, an InvalidArgument)."""
    if isinstance(url, str) and url.startswith("memory://"):
        raise BadValue(f"registry {url!r} is in-process only (simulations and tests): "
                              "use lmdb://DIR or etcd://HOST:PORT[,HOST:PORT...]")


def open_registry(url: str) -> Registry:
    """Open the registry at `url`; BadValue (an InvalidArgument) if the URL is malformed."""
    if not isinstance(url, str) or "://" not in url:
        raise BadValue(
            f"not a registry URL: {url!r} (use lmdb://DIR or etcd://HOST:PORT[,HOST:PORT...])")
    scheme, rest = url.split("://", 1)
    if scheme == "lmdb":
        if not rest:
            raise BadValue(f"registry URL {url!r} names no directory (lmdb://DIR)")
        from vbp.registry.lmdb_backend import LmdbKV

        return Registry(LmdbKV(url, rest))
    if scheme == "etcd":
        endpoints = [e.strip() for e in rest.rstrip("/").split(",")]
        for ep in endpoints:
            m = _ENDPOINT_RE.match(ep)
            if not m or not 0 < int(m.group(2)) < 65536:
                raise BadValue(
                    f"registry URL {url!r}: {ep!r} is not HOST:PORT (etcd://HOST:PORT[,HOST:PORT...])")
        from vbp.registry.etcd_backend import EtcdKV

        return Registry(EtcdKV(url, endpoints))
    if scheme == "memory":
        from vbp.registry.memory_backend import MemoryKV

        return Registry(MemoryKV(url, rest))
    raise BadValue(f"unknown registry scheme {scheme!r} in {url!r} (lmdb://, etcd://)")
