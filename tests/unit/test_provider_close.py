"""The volume provider (blockd.service.VolumeProvider) when a volume's last connection
closes: with a task-less write still under way, the lease is kept until that write ends,
and what it could not record reaches the registry before the lease is given back; with
writes answered and not yet durable on the other copies, they are flushed there, and a
FLUSH on a connection made since covers them (proto.md)."""

from __future__ import annotations

import itertools
import math
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
import trio

from blockd.service import AsyncRegistry, VolumeProvider
from control import api
from replicator import messages as m
from replicator.gateway import ClusterView
from replicator.replica import Replica
from replicator.transport import PeerPool, serve_peers
from vbp.chunkstore_memory import MemoryChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.errors import LocalFault, VbpError
from vbp.later import Later
from vbp.layout import ChunkKey
from vbp.registry import open_registry

pytestmark = pytest.mark.timeout(60)
CLUSTER = "close"
_REGS = itertools.count()


@asynccontextmanager
async def three_hosts(handlers=None):
    """A VolumeProvider on h1 over a volume v (replicas 3, min_size 2) whose other copies
    are h2 and h3 behind real peer servers; `handlers`: {host: handle(msg, peer)} in place
    of a replica's own. Yields (registry, replicas, provider)."""
    reg = open_registry(f"memory://close-{next(_REGS)}")
    replicas = {h: Replica(MemoryChunkStore(None, 1 << 30), h, lambda: 1) for h in ("h1", "h2", "h3")}
    handlers = {h: replicas[h].handle for h in ("h2", "h3")} | (handlers or {})
    async with trio.open_nursery() as nursery:
        ports = {}
        for h, handler in handlers.items():
            ports[h] = await nursery.start(lambda task_status, h=h, handler=handler: serve_peers(
                handler, "127.0.0.1", 0, cluster=CLUSTER, host_id=h, task_status=task_status))
        hosts = tuple(HostRecord(h, f"127.0.0.1:{ports.get(h, 1)}", f"127.0.0.1:{ports.get(h, 1)}",
                                 pod=f"p{h}", peer_rev=m.PEER_REV) for h in ("h1", "h2", "h3"))
        cluster = ClusterView(ClusterMap(1, hosts))
        api.create_volume(reg, "v", "8M", replicas=3, min_size=2, chunk_size="1M")
        async with PeerPool(CLUSTER, "h1", request_timeout=2) as pool:
            async def nothing(*args):
                return {} if args else None  # (stale_map: no records)

            service = SimpleNamespace(
                registry=AsyncRegistry(reg), replica=replicas["h1"], cluster=cluster, pool=pool,
                cfg=SimpleNamespace(host_id="h1", lease_ttl=10.0, peer_timeout=2.0,
                                   heartbeat_ttl=6.0),
                refresh_map=nothing, metrics=None, stale_map=nothing,
                store=replicas["h1"].store, nursery=nursery, publish_stats=nothing,
                published_at=math.inf)
            yield reg, replicas, VolumeProvider(service)
        nursery.cancel_scope.cancel()


async def lease_given_back(reg) -> None:
    with trio.fail_after(10):
        while (lease := reg.get_lease("v")) is not None and lease.holder:
            await trio.sleep(0.05)


def unsynced(replicas) -> dict[str, bool]:
    return {h: bool(r.store._dirty) for h, r in replicas.items()}


async def flushed(gw) -> None:
    res = gw.flush()
    if res is not None:
        await res


async def test_the_lease_waits_for_writes_under_way_and_takes_their_failures_along():
    """h3 does not answer a write within the request timeout; the client's connection is
    gone (its tasks cancelled, the write's rest refused) and the volume's last connection
    closes meanwhile. The lease is given back only after the write ended, with h3
    recorded stale: the copies that disagree are on record for the next holder."""
    slow = False
    replicas = {}

    def h3_handle(msg, peer=None):
        if slow and type(msg) is m.WriteChunk:
            async def late():
                await trio.sleep(10)  # past the request timeout (2 s)
                return m.Ok(0)
            return late()
        return replicas["h3"].handle(msg, peer)

    async with three_hosts({"h3": h3_handle}) as (reg, found, provider):
        replicas.update(found)
        gw = await provider.open_export("v")
        await gw.write(0, b"\x01" * 4096, False)  # takes the lease, connects
        assert reg.get_lease("v").holder == "h1"
        slow = True
        later = gw.write(0, b"\x03" * 4096, False)
        assert type(later) is Later
        later.bind(lambda value, exc: None, lambda rest: False)  # the connection is gone
        gw.close()  # its last connection closes
        await trio.sleep(0.5)
        assert gw.inflight == 1
        assert reg.get_lease("v").holder == "h1"  # kept while the write is under way
        await lease_given_back(reg)
        assert [(r.index, r.host_id) for r in reg.list_stale(gw.lineage)] == [(0, "h3")]
        assert gw.unrecorded == []
        store = replicas["h3"].store
        key = ChunkKey(gw.lineage, 0, store.resolve(gw.lineage, 0, gw.chain_for(0)))
        assert bytes(store.read(key, 0, 4)) == b"\x01" * 4  # the copy that missed it


async def test_a_flush_after_a_reconnect_covers_writes_answered_before_it():
    """A client writes (answered), its connection drops, it reconnects (qemu's
    reconnect-delay, nbdcopy reopening) and sends NBD_CMD_FLUSH. proto.md: "All write
    commands ... that the server completes (i.e. replies to) prior to processing a
    NBD_CMD_FLUSH MUST be written to non-volatile storage prior to replying to that
    NBD_CMD_FLUSH". The new gateway knows nothing of the old one's writes: the close
    flushes every copy before the lease goes. (Found by a review.)"""
    async with three_hosts() as (reg, replicas, provider):
        gw = await provider.open_export("v")
        await gw.write(0, b"\x01" * 4096, False)  # answered: on every copy
        assert unsynced(replicas) == {"h1": True, "h2": True, "h3": True}
        gw.close()  # the connection drops: the volume's last
        await lease_given_back(reg)
        assert unsynced(replicas) == {"h1": False, "h2": False, "h3": False}
        again = await provider.open_export("v")  # the client reconnects
        with trio.fail_after(10):
            await flushed(again)


def _slow_flushes(replicas, host, release):
    """A handler for `host` whose Flush waits for `release`."""
    def handle(msg, peer=None):
        if type(msg) is m.Flush:
            async def slow():
                await release.wait()
                return await _result(replicas[host].handle(msg, peer))
            return slow()
        return replicas[host].handle(msg, peer)
    return handle


async def answered_only_after(gw, replicas, release) -> None:
    """gw's FLUSH is not answered while h2 has not synced (its Flush held back until
    `release`), and is once it did."""
    done = trio.Event()

    async def flush():
        await flushed(gw)
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flush)
        await trio.sleep(0.5)
        assert not done.is_set() and unsynced(replicas)["h2"], (
            "FLUSH answered while a write answered before it is not synced on h2")
        release.set()
        with trio.fail_after(10):
            await done.wait()
    assert unsynced(replicas) == {"h1": False, "h2": False, "h3": False}


@asynccontextmanager
async def closed_while_h2_syncs():
    """Three hosts; v written through h1 and its last connection closed, the close flush
    under way: h2's Flush waits for `release`. (provider, replicas, release)."""
    replicas = {}
    release = trio.Event()
    async with three_hosts({"h2": _slow_flushes(replicas, "h2", release)}) as (reg, found,
                                                                               provider):
        replicas.update(found)
        gw = await provider.open_export("v")
        await gw.write(0, b"\x01" * 4096, False)
        gw.close()  # its close flush waits for h2
        yield provider, replicas, release


async def test_a_flush_on_a_connection_made_during_the_close_flush_waits_for_it():
    """The client reconnects at once, while the close's flush is still under way (h2 is
    slow to sync): the new connection's FLUSH is answered only once h2 synced."""
    async with closed_while_h2_syncs() as (provider, replicas, release):
        again = await provider.open_export("v")
        await answered_only_after(again, replicas, release)


def refusing_flushes(replicas, failing: list[bool]):
    """Handlers for h2 and h3 (three_hosts) that fail every Flush while failing[0]."""
    def refusing(h):
        def handle(msg, peer=None):
            if failing[0] and type(msg) is m.Flush:
                raise LocalFault(f"{h} cannot sync")
            return replicas[h].handle(msg, peer)
        return handle

    return {"h2": refusing("h2"), "h3": refusing("h3")}


@asynccontextmanager
async def close_flush_failed():
    """Three hosts; v written through h1, and its last connection closed while h2 and h3
    could not sync (the written chunk durable on h1 alone, below min_size); they sync
    again from then on. (registry, provider)."""
    replicas = {}
    failing = [True]
    async with three_hosts(refusing_flushes(replicas, failing)) as (reg, found, provider):
        replicas.update(found)
        gw = await provider.open_export("v")
        await gw.write(0, b"\x01" * 4096, False)
        gw.close()
        await lease_given_back(reg)
        failing[0] = False
        yield reg, provider


async def first_flush_fails_once(gw) -> None:
    """The failed close flush is this gateway's first FLUSH's answer, and only its."""
    with trio.fail_after(10), pytest.raises(VbpError, match="last connection here closed"):
        await flushed(gw)
    with trio.fail_after(10):
        await flushed(gw)


async def test_a_close_flush_that_failed_fails_the_next_flush_once():
    """h2 and h3 cannot sync when the last connection closes: the written chunk is durable
    on h1 alone, below min_size. No client is left to tell; the first FLUSH of a
    connection made since fails (as fsync reports a failed writeback), the next succeeds."""
    async with close_flush_failed() as (reg, provider):
        await first_flush_fails_once(await provider.open_export("v"))


async def _result(value):
    return await value if hasattr(value, "__await__") else value


async def test_a_close_flush_that_failed_is_not_reported_to_a_clone_made_again_under_its_name():
    """Clone c of v@s is written through h1 and its last connection closes while h2 and
    h3 cannot sync: its close flush fails. c is deleted and cloned again from v@s (the
    same lineage: a clone keeps its parent's) and a VM opens the new c. Its first FLUSH
    covers nothing the deleted c answered: it must succeed, not report that volume's
    failed writeback (a new VM's disk failing its first flush)."""
    replicas = {}
    failing = [False]
    async with three_hosts(refusing_flushes(replicas, failing)) as (reg, found, provider):
        replicas.update(found)
        api.snapshot(reg, "v", "s")
        api.clone(reg, "v@s", "c")
        failing[0] = True
        gw = await provider.open_export("c")
        await gw.write(0, b"\x01" * 4096, False)
        gw.close()
        with trio.fail_after(10):
            while (lease := reg.get_lease("c")) is not None and lease.holder:
                await trio.sleep(0.05)
        assert provider.close_flushes["c"][1].error is not None  # (the failure, kept)
        failing[0] = False
        api.delete_volume(reg, "c", force=True)
        api.clone(reg, "v@s", "c")
        again = await provider.open_export("c")
        with trio.fail_after(10):
            await flushed(again)
        again.close()


# --- what a gateway owes the flushes after it (found by a review) ------------------------


async def test_a_connection_that_never_flushes_passes_the_close_flush_on():
    """A probe (nbdinfo, qemu-img info) opens and closes the volume while the close flush
    of the connection before it is under way: the gateway it opened took that flush over,
    never flushed, and owed nothing at its close, so the flush was dropped and the
    next connection's FLUSH was answered while h2 had not synced."""
    async with closed_while_h2_syncs() as (provider, replicas, release):
        probe = await provider.open_export("v")
        probe.close()
        await answered_only_after(await provider.open_export("v"), replicas, release)


async def test_a_flush_whose_client_went_away_leaves_the_close_flush_to_the_next():
    """The first FLUSH after a reconnect takes the close flush to wait for, and its client
    goes away before it ends: the next FLUSH (on another connection of the same gateway,
    multi-conn) must still wait for it; it was answered at once."""
    async with closed_while_h2_syncs() as (provider, replicas, release):
        first = await provider.open_export("v")
        second = await provider.open_export("v")
        assert first is second
        with trio.move_on_after(0.3):  # (its client goes away)
            await flushed(first)
        await answered_only_after(second, replicas, release)


async def test_a_failed_close_flush_is_told_after_a_connection_that_never_flushed():
    """The close flush failed (below min_size); a probe opens and closes the volume with no
    FLUSH. The next connection's first FLUSH must fail with it, as it does without the
    probe; the probe's gateway dropped it."""
    async with close_flush_failed() as (reg, provider):
        probe = await provider.open_export("v")
        probe.close()
        await lease_given_back(reg)
        await first_flush_fails_once(await provider.open_export("v"))


async def test_a_failure_no_client_was_told_outlives_the_gateway():
    """A flush for a host asking for the lease (flush_unasked) fails below min_size and
    keeps its failure for the next client FLUSH; a later one succeeds, so nothing is left
    unflushed. The last connection then closes with no FLUSH: the failure goes to the
    next connection's first FLUSH, as a close flush's would (it was dropped)."""
    replicas = {}
    failing = [True]
    async with three_hosts(refusing_flushes(replicas, failing)) as (reg, found, provider):
        replicas.update(found)
        gw = await provider.open_export("v")
        await gw.write(0, b"\x01" * 4096, False)
        with trio.fail_after(10), pytest.raises(VbpError):
            await gw.flush_unasked()
        failing[0] = False
        with trio.fail_after(10):
            await gw.flush_unasked()
        gw.close()
        await lease_given_back(reg)
        await first_flush_fails_once(await provider.open_export("v"))


async def test_a_writer_is_unpublished_as_a_reader_once_it_holds_the_lease_and_at_its_close():
    """What a host publishes of an export (Blockd.stats: its entries as a reader, and
    every export open) follows a writer: opened, it is a reader; its first write takes
    the lease and it is one no more; closed, it is open no more. Each publication comes
    with the change: the entry as a reader stayed until the next heartbeat (2 s), and a
    delete in between saw a user in a volume whose client had gone."""
    async with three_hosts() as (reg, _, provider):
        published = []

        async def publish_stats():
            published.append((sorted(e["export"] for e in provider.published()),
                              sorted(provider.gateways)))
        provider.service.publish_stats = publish_stats
        gw = await provider.open_export("v")
        assert published[-1] == (["v"], ["v"])
        await gw.write(0, b"\x01" * 4096, False)  # takes the lease
        await trio.sleep(0.1)
        assert published[-1] == ([], ["v"])
        gw.close()
        await lease_given_back(reg)
        await trio.sleep(0.1)
        assert published[-1] == ([], [])
