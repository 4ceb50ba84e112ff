"""The volume provider (blockd.service.VolumeProvider) when a client opens an export that
another client has open: it joins that export's gateway only if the export is still the
one the gateway serves (open_export, _check_same)."""

from __future__ import annotations

import contextlib
import itertools
import math
from types import SimpleNamespace

import pytest
import trio

from blockd.service import AsyncRegistry, VolumeProvider
from control import api
from nbd_frontend.server import _resolve
from replicator import messages as m
from replicator.gateway import ClusterView
from replicator.replica import Replica
from replicator.transport import PeerPool
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.errors import NotFound
from vbp.cluster import ClusterMap, HostRecord
from vbp.registry import open_registry

pytestmark = pytest.mark.timeout(60)
CLUSTER = "open"
_REGS = itertools.count()


def _provider(reg, pool, nursery) -> VolumeProvider:
    """The provider of a one-host blockd on `reg` with a memory store, no record sync."""
    replica = Replica(MemoryChunkStore(None, 1 << 30), "h1", lambda: 1)
    host = HostRecord("h1", "127.0.0.1:1", "127.0.0.1:1", peer_rev=m.PEER_REV)

    async def stale_map(lineage):
        return {}

    async def noop():
        pass

    service = SimpleNamespace(
        registry=AsyncRegistry(reg), replica=replica,
        cluster=ClusterView(ClusterMap(1, (host,))), pool=pool,
        cfg=SimpleNamespace(host_id="h1", lease_ttl=10.0, peer_timeout=2.0,
                           heartbeat_ttl=6.0),
        refresh_map=noop, metrics=None, stale_map=stale_map, store=replica.store,
        nursery=nursery, publish_stats=noop, published_at=math.inf)
    return VolumeProvider(service)


async def _write_head(provider, reg, byte: bytes) -> None:
    """Write the head's first page through a connection of its own, then close it and
    wait until its lease is given back (a snapshot is then completed by the caller)."""
    head = await provider.open_export("v")
    await _resolve(head.write(0, byte * 4096, False))
    await _resolve(head.flush())
    head.close()
    with trio.fail_after(10):
        while (lease := reg.get_lease("v")) is not None and lease.holder:
            await trio.sleep(0.05)


@contextlib.asynccontextmanager
async def _one_host():
    """(registry, provider) of one host with volume v (2M, 1M chunks) whose first page
    holds b"A", snapshot s1 of it taken."""
    reg = open_registry(f"memory://open-{next(_REGS)}")
    async with trio.open_nursery() as nursery:
        api.create_volume(reg, "v", "2M", replicas=1, min_size=1, chunk_size="1M")
        async with PeerPool(CLUSTER, "h1", request_timeout=2) as pool:
            provider = _provider(reg, pool, nursery)
            await _write_head(provider, reg, b"A")
            api.snapshot(reg, "v", "s1")
            yield reg, provider
        nursery.cancel_scope.cancel()


async def test_a_snapshot_made_again_under_its_name_is_not_served_by_the_old_gateway():
    """NAME@SNAP deleted (forced, a client still reading it) and taken again under its
    name is another snapshot, of other bytes: a client opening it before the record sync
    noticed the delete reads the new snapshot, never the deleted one's bytes."""
    async with _one_host() as (reg, provider):
        old = await provider.open_export("v@s1")
        assert await _resolve(old.read(0, 4096)) == b"A" * 4096
        await _write_head(provider, reg, b"B")
        # no record sync runs here: as if all this came within one of its periods
        api.delete_volume(reg, "v@s1", force=True)
        api.snapshot(reg, "v", "s1")
        new = await provider.open_export("v@s1")
        assert await _resolve(new.read(0, 4096)) == b"B" * 4096, \
            "the snapshot made again reads the deleted one's bytes"


async def test_info_of_an_open_export_deleted_since_answers_what_an_open_would():
    """NBD_OPT_INFO (export_info) of an export with a gateway open here answers that
    gateway's facts, but only while it is still the export GO would join (_check_same):
    a snapshot deleted (forced, a client still reading it) is unknown, and a volume
    deleted and created again under its name tells the new volume's size, as an open
    does, not the deleted one's, before the record sync noticed."""
    async with _one_host() as (reg, provider):
        snap = await provider.open_export("v@s1")
        head = await provider.open_export("v")
        assert (await provider.export_info("v@s1")).size == 2 * 1024 * 1024
        # no record sync runs here: as if all this came within one of its periods
        api.delete_volume(reg, "v@s1", force=True)
        with pytest.raises(NotFound):
            await provider.export_info("v@s1")
        with pytest.raises(NotFound):
            await provider.open_export("v@s1")
        head.close()
        with trio.fail_after(10):
            while (lease := reg.get_lease("v")) is not None and lease.holder:
                await trio.sleep(0.05)
        head = await provider.open_export("v")  # a client keeps the old volume's gateway
        api.delete_volume(reg, "v", force=True)
        api.create_volume(reg, "v", "4M", replicas=1, min_size=1, chunk_size="1M")
        info = await provider.export_info("v")
        opened = await provider.open_export("v")
        assert opened.size == 4 * 1024 * 1024
        assert info.size == opened.size, "INFO told the deleted volume's size"
        snap.close()
        opened.close()


async def test_the_list_and_info_describe_an_export_alike():
    """proto.md, NBD_INFO_DESCRIPTION: "This information type represents the same
    optional description that may appear after the name portion of an NBD_REP_SERVER in
    response to NBD_OPT_LIST." The list said "vbp volume, 2097152 bytes, 1 replicas" and
    "read-only snapshot of v" where NBD_OPT_INFO and NBD_OPT_GO said "vbp volume v" and
    "vbp volume v (snapshot)": `nbdinfo --list` and `nbdinfo URI` showed one export two
    descriptions."""
    async with _one_host() as (reg, provider):
        listed = dict(await provider.list_exports())
        assert set(listed) == {"v", "v@s1"}
        for name in listed:
            info = await provider.export_info(name)
            opened = await provider.open_export(name)
            try:
                assert listed[name] == info.description == opened.description, name
                assert listed[name] == ("vbp volume v, 2 MiB, 1 replicas" if name == "v" else
                                        "vbp snapshot of volume v, read-only, 2 MiB, 1 replicas")
            finally:
                opened.close()
