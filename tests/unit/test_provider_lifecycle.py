"""The volume provider (blockd.service.VolumeProvider) over an export's life: opens and
closes of one export racing each other (an open waits on the registry while the last
connection of the export closes), and what every path leaves behind (refs, gateways,
the lease)."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from control import api
from nbd_frontend.server import _resolve
from replicator import messages as m
from replicator.transport import PeerPool
from tests.unit.test_provider_close import (close_flush_failed, first_flush_fails_once,
                                            lease_given_back, three_hosts)
from tests.unit.test_provider_open import _one_host
from vbp.errors import RegistryUnavailable
from vbp.registry import open_registry

pytestmark = pytest.mark.timeout(60)


class Gates:
    """The provider's registry with calls that can be held: `hold(name)` makes the next
    call of `name` wait (after `entered` is set) until `release` is set."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.held: dict[str, tuple[trio.Event, trio.Event]] = {}

    def hold(self, name: str) -> tuple[trio.Event, trio.Event]:
        self.held[name] = (trio.Event(), trio.Event())
        return self.held[name]

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        async def call(*args, **kwargs):
            gate = self.held.pop(name, None)
            if gate is not None:
                gate[0].set()
                await gate[1].wait()
            return await fn(*args, **kwargs)

        return call


def gated(provider) -> Gates:
    gates = Gates(provider.service.registry)
    provider.service.registry = gates
    return gates


@pytest.mark.parametrize("export", ["v", "v@s1"])
async def test_an_open_joining_an_export_whose_last_connection_closes_meanwhile(export):
    """A client opens an export while its one other client is connected: the open checks
    the record (_check_same, a registry call) and meanwhile that other client leaves, the
    export's last connection, which gives the gateway up. The open still gives its client
    a gateway that serves the export, with refs counted, and its close gives the lease
    back (a head's, taken by a write)."""
    async with _one_host() as (reg, provider):
        first = await provider.open_export(export)
        gates = gated(provider)
        entered, release = gates.hold("get_volume")
        async with trio.open_nursery() as nursery:
            got = []

            async def second():
                got.append(await provider.open_export(export))

            nursery.start_soon(second)
            await entered.wait()
            first.close()  # the last connection so far: the gateway is given up
            release.set()
        gw = got[0]
        assert provider.gateways.get(export) is gw and provider.refs.get(export) == 1
        if export == "v":
            await _resolve(gw.write(0, b"C" * 4096, False))
            assert await _resolve(gw.read(0, 4096)) == b"C" * 4096
        else:
            assert await _resolve(gw.read(0, 4096)) == b"A" * 4096
        gw.close()
        assert export not in provider.gateways and export not in provider.refs
        with trio.fail_after(10):
            while (lease := reg.get_lease("v")) is not None and lease.holder:
                await trio.sleep(0.05)


async def test_a_close_flush_that_failed_is_reported_after_an_open_that_failed():
    """The last connection's close flush fails (h2 and h3 cannot sync: the written chunk
    is on h1 alone, below min_size). The client reconnects, and that open fails (the
    registry does not answer its publication); it reconnects again: that connection's
    first FLUSH still fails, as it would have without the failed open between."""
    async with close_flush_failed() as (reg, provider):
        publish = provider.service.publish_stats

        async def unreachable():
            provider.service.publish_stats = publish  # (once)
            raise RegistryUnavailable("the registry does not answer")

        provider.service.publish_stats = unreachable
        with pytest.raises(RegistryUnavailable):
            await provider.open_export("v")
        assert "v" not in provider.gateways and "v" not in provider.refs
        again = await provider.open_export("v")
        await first_flush_fails_once(again)
        again.close()


async def _client(provider, nursery, name: str, leave: str, gates: Gates | None = None):
    """One NBD connection (handle_connection over a memory stream) asking for `name` with
    NBD_OPT_GO; `leave`: "mid-open" (the client goes while the open waits on the
    registry: `gates` holds its first get_volume), "after-go" (it goes without reading the
    answer), or "use" (it writes and reads a page of its own, then disconnects)."""
    import random
    import struct

    from nbd_frontend import proto, server
    from tests.unit.test_nbd_server import Client

    client_stream, server_stream = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def serve():
        try:
            await server.handle_connection(server_stream, provider)
        finally:
            done.set()

    nursery.start_soon(serve)
    c = Client(client_stream)
    await c.recv(18)
    await c.send(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE | proto.FLAG_C_NO_ZEROES))
    raw = name.encode()
    go = struct.pack(">QII", proto.IHAVEOPT, proto.OPT_GO, len(raw) + 6) + \
        struct.pack(">I", len(raw)) + raw + b"\0\0"
    if leave == "mid-open":
        entered, release = gates.hold("get_volume")
        await c.send(go)
        await entered.wait()
        await client_stream.aclose()
        release.set()
    elif leave == "after-go":
        await c.send(go)
        await trio.sleep(random.random() * 0.01)
        await client_stream.aclose()
    else:
        await c.send(go)
        reps = []
        while True:
            head = await c.recv(20)
            _, _, rtype, n = struct.unpack(">QIII", head)
            body = await c.recv(n) if n else b""
            reps.append(rtype)
            if rtype != proto.REP_INFO:
                break
        assert (reps[-1] == proto.REP_ACK) == (name in ("v", "v@s1")), (name, reps)
        if name == "v":
            page = random.randrange(16) * 4096
            assert await c.write(page, b"\x07" * 4096) == 0
            assert await c.read(page, 4096) == b"\x07" * 4096
        await client_stream.aclose()
    with trio.fail_after(30):
        await done.wait()


async def test_many_clients_come_and_go_and_leave_nothing_behind():
    """Hundreds of NBD connections to one volume and its snapshot, with names that do not
    exist among them: clients that leave while their open waits on the registry, that
    leave right after NBD_OPT_GO without reading its answer, and that write and read.
    Once all are gone the provider holds no gateway, no ref, no lease; the volume's lease
    is given back; and a new client gets a working gateway."""
    import random

    async with _one_host() as (reg, provider):
        gates = gated(provider)
        async with trio.open_nursery() as nursery:
            async def one(i):
                name = random.choice(["v", "v", "v", "v@s1", "nope", "v@nope"])
                await _client(provider, nursery, name, random.choice(["after-go", "use"]))
            async with trio.open_nursery() as clients:
                for i in range(300):
                    clients.start_soon(one, i)
                    if i % 50 == 0:
                        await trio.sleep(0)
            for name in ("v", "v@s1"):  # (one at a time: the gate holds the next call)
                await _client(provider, nursery, name, "mid-open", gates)
        assert provider.gateways == {} and provider.refs == {}
        assert provider.leases == {} and provider.close_flushes == {}
        await lease_given_back(reg)
        gw = await provider.open_export("v")
        await _resolve(gw.write(0, b"D" * 4096, False))
        assert await _resolve(gw.read(0, 4096)) == b"D" * 4096
        gw.close()
        await lease_given_back(reg)


class HeldInThread:
    """The provider's synchronous registry with calls of `name` held in their worker
    thread (entered, then waiting for `release`): a cancellation of the caller meanwhile
    lands once the call has been made, as it does in blockd (AsyncRegistry: a registry
    call is never abandoned)."""

    def __init__(self, inner, name: str) -> None:
        self.inner, self.name = inner, name
        self.entered, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        fn = getattr(self.inner, name)
        if name != self.name:
            return fn

        def call(*args, **kwargs):
            self.entered.set()
            self.release.wait(30)
            return fn(*args, **kwargs)

        return call


async def test_a_write_cancelled_while_its_lease_is_taken_does_not_keep_the_lease():
    """Two clients have v open on h1; one writes (the first write: it takes the lease)
    and its connection breaks while the lease is being granted, which cancels the write
    (nbd_frontend.server: a broken connection cancels its requests). The grant goes
    through in the registry, and the cancellation lands in the announcement of its token
    to the other hosts. The lease is given back: no write of ours carries it, and the
    other client, a reader, would otherwise keep it (renewed by renew_all) for as long as
    it stays, and a writer on another host would wait for it in vain."""
    async with three_hosts() as (reg, replicas, provider):
        writer = await provider.open_export("v")
        reader = await provider.open_export("v")
        held = HeldInThread(provider.service.registry.sync, "acquire_lease")
        provider.service.registry.sync = held
        async with trio.open_nursery() as nursery:
            async def write(task_status=trio.TASK_STATUS_IGNORED):
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    await _resolve(writer.write(0, b"W" * 4096, False))

            scope = await nursery.start(write)
            with trio.fail_after(10):
                while not held.entered.is_set():
                    await trio.sleep(0.01)
            scope.cancel()  # the writer's connection broke
            held.release.set()
        writer.close()
        assert reader.token == 0  # no write of ours carries a lease
        assert provider.leases == {}  # (what is there, renew_all renews)
        assert reg.get_lease("v") is None  # (long before the lease period of 10 s ends)
        reader.close()


async def test_a_gateway_of_a_deleted_volume_does_not_complete_the_snapshot_of_the_new_one():
    """h1 serves v to a writing VM (its lease held) and a snapshot of v is asked for:
    the record sync holds the writes and completes it under the lease. Meanwhile v is
    deleted (forced: the VM still runs), made again, and a snapshot of the new v is asked
    for: its first, with the head generation the deleted v's pending one had (each
    lineage counts its own). The old gateway completed that snapshot under its lease (a
    new volume's snapshot made while the deleted one's VM still wrote) and adopted the
    new record: every later record sync took it for the new volume's gateway, so it
    kept its lease (the new volume unwritable on any other host, and garbage collection
    held on every host for a deleted volume's lease), and a client opening v here
    joined it, reading and writing the deleted volume's chunks."""
    import time

    from tests.unit.test_provider_open import _provider
    from vbp.volume import VolumeRecord, request_snapshot

    reg = open_registry(f"memory://reuse-{time.monotonic_ns()}")
    api.create_volume(reg, "v", "2M", replicas=1, min_size=1, chunk_size="1M")
    async with trio.open_nursery() as nursery:
        async with PeerPool("reuse", "h1", request_timeout=2) as pool:
            provider = _provider(reg, pool, nursery)
            gw = await provider.open_export("v")
            await _resolve(gw.write(0, b"A" * 4096, False))  # (the lease taken)
            old = gw.view.volume

            def ask(snap: str, lineage: str) -> int:
                head = reg.next_id(api.gen_counter(lineage))
                reg.update_volume("v", lambda d: request_snapshot(
                    VolumeRecord.from_dict(d), snap, head, time.time() + 60).to_dict())
                return head

            head = ask("s", old.lineage)
            gates = gated(provider)
            entered, release = gates.hold("update_volume")  # (the completion's)
            async with trio.open_nursery() as syncing:
                syncing.start_soon(provider.sync_records)
                with trio.fail_after(10):
                    await entered.wait()
                api.delete_volume(reg, "v", force=True)
                new = api.create_volume(reg, "v", "2M", replicas=1, min_size=1, chunk_size="1M")
                assert ask("s2", new.lineage) == head
                release.set()
            await provider.sync_records()  # (a later pass does not notice it either)
            assert gw.fenced and gw.view.volume.lineage == old.lineage
            rec = api.get_volume(reg, "v")
            assert rec.pending == head and rec.snapshots == ()  # (its caller's, still)
            opened = await provider.open_export("v")
            assert opened is not gw and opened.lineage == new.lineage
            assert await _resolve(opened.write(0, b"B" * 4096, False)) is None
            opened.close()
            gw.close()
        nursery.cancel_scope.cancel()
