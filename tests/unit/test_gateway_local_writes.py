"""The gateway's write path for a chunk written on this host only (replicas=1): the
checks it makes inline, without the calls of the general path, still refuse what that
path refuses, and every write is covered by the next flush."""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing

from blockd.qos import VolumeQos
from control import api
from replicator.gateway import ClusterView, VolumeGateway
from replicator.replica import Replica
from replicator.transport import MemoryNetwork
from vbp.chunkstore import ChunkStore
from vbp.cluster import ClusterMap, HostRecord
from vbp.errors import Fenced, LeaseExpired, ReadOnly, StaleEpoch
from vbp.layout import MiB, ChunkKey
from vbp.registry import open_registry
from vbp.volume import VolumeRecord, view_of

pytestmark = pytest.mark.timeout(60)
_REGS = itertools.count()
DATA = b"\x07" * 4096


def one_host(tmp_path, *, epoch: int = 1, snapshot: bool = False):
    """A replicas=1 volume on a real ChunkStore, and its gateway on that host."""
    reg = open_registry(f"memory://local-writes-{next(_REGS)}")
    store = ChunkStore(tmp_path / "store", 64 * MiB)
    replica = Replica(store, "h1", lambda: epoch)
    cluster = ClusterView(ClusterMap(1, (HostRecord("h1", "h1:1", "h1:2", pod="p1", peer_rev=6),)))
    api.create_volume(reg, "v", 8 * MiB, replicas=1, chunk_size="1M")
    rec = VolumeRecord.from_dict(reg.get_volume("v"))
    gw = VolumeGateway(view_of(rec, None), host_id="h1", replica=replica, cluster=cluster,
                       pool=MemoryNetwork().pool("t", "h1"), token=1)
    return store, replica, gw


def test_local_writes_are_refused_as_the_general_path_refuses_them(tmp_path):
    async def main():
        store, replica, gw = one_host(tmp_path)
        with store:
            assert gw.write(0, DATA, False) is None  # the local path: answered at once
            gw.read_only = True
            with pytest.raises(ReadOnly):
                gw.write(4096, DATA, False)
            gw.read_only = False
            gw.lease_deadline = trio.current_time() - 1
            with pytest.raises(LeaseExpired):
                gw.write(4096, DATA, False)
            gw.lease_deadline = trio.current_time() + 60
            gw._fence(Fenced("a newer gateway took the lease"))
            with pytest.raises(Fenced):
                gw.write(4096, DATA, False)
            assert store.read(ChunkKey(gw.lineage, 0, gw.gen), 4096, 4096) == bytes(4096)

    trio.run(main)


def test_a_local_write_from_an_older_epoch_is_refused(tmp_path):
    async def main():
        store, replica, gw = one_host(tmp_path, epoch=2)  # the replica has seen epoch 2
        with store:
            with pytest.raises(StaleEpoch):
                gw.write(0, DATA, False)
            assert store.resolve(gw.lineage, 0, gw.chain) is None

    trio.run(main)


def test_every_local_write_is_covered_by_the_next_flush(tmp_path):
    async def main():
        store, replica, gw = one_host(tmp_path)
        with store:
            for index in (0, 3, 0, 5):
                gw.write(index * MiB + 8192, DATA, False)
            assert gw._unflushed == {"h1": {0, 3, 5}}
            keys = [ChunkKey(gw.lineage, i, gw.gen) for i in (0, 3, 5)]
            assert all(store._chunks[k].touched for k in keys)
            done = gw.flush()
            if done is not None:
                await done
            assert not gw._unflushed.get("h1")
            assert not any(store._chunks[k].touched for k in keys)  # each one synced

    trio.run(main)


def test_a_zero_length_write_makes_no_chunk(tmp_path):
    """A zero-length WRITE (the NBD codec lets one through at the very end of the
    volume, offset == size) writes nothing: no chunk past the volume's last, and none
    for a hole or copied up either. It is still refused where any write would be."""
    async def main():
        store, replica, gw = one_host(tmp_path)
        with store:
            for offset in (8 * MiB, 0, 3 * MiB + 4096):
                assert gw.write(offset, b"", False) is None
                assert gw.write(offset, memoryview(b""), True) is None
            assert list(store.keys()) == []
            gw.read_only = True
            with pytest.raises(ReadOnly):
                gw.write(8 * MiB, b"", False)

    trio.run(main)


@pytest.mark.parametrize("throttled", [False, True])
@pytest.mark.parametrize("op", ["write", "trim"])
def test_a_local_copy_refusing_an_older_token_fences_the_gateway(tmp_path, op, throttled):
    """replicas=1: the local copy has seen a newer gateway's token. Its refusal fences
    this gateway (and drops its clients) as a peer's refusal would, rather than only
    failing the request: with the registry unreachable, no renewal would ever tell. The
    same for a request that waited for its turn under the volume's IOPS limit."""
    async def main():
        store, replica, gw = one_host(tmp_path)
        with store:
            assert gw.write(0, DATA, False) is None
            if throttled:
                gw.qos = VolumeQos(1, 0, clock=trio.current_time)  # the burst: 1 request
                assert gw.write(0, DATA, False) is None
            replica.learn_tokens({gw.view.volume.name: gw.token + 1})
            with pytest.raises(Fenced):
                result = gw.write(4096, DATA, False) if op == "write" else gw.trim(0, 4096, False)
                assert throttled and hasattr(result, "__await__")
                await result
            assert gw.fenced and gw.dropped.is_set()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("op", ["write", "trim", "write_zeroes"])
def test_a_zero_length_request_writes_nothing_and_takes_no_lease(tmp_path, op):
    """A zero-length WRITE, TRIM or WRITE_ZEROES (NBD lets one through, at the very end
    of the volume too) changes nothing: answered at once, on a gateway holding no lease
    as well. Taking the lease for it, a reader host's client waited a lease period for
    the holder elsewhere and got an error, or moved the lease here, for nothing."""
    async def main():
        store, replica, gw = one_host(tmp_path)
        gw.token = 0  # a reader: the lease is held elsewhere, or by nobody
        asked = []

        async def take_lease():
            asked.append(1)
            await trio.sleep(60)  # (the holder elsewhere keeps it)
            raise Fenced("v is served by another host")

        gw.take_lease = take_lease
        with store:
            for offset in (8 * MiB, 0, 3 * MiB + 4096):
                if op == "write":
                    result = gw.write(offset, b"", False)
                elif op == "trim":
                    result = gw.trim(offset, 0, False)
                else:
                    result = gw.write_zeroes(offset, 0, False, True, False)
                if result is not None:
                    result = await result
                assert result is None
            assert not asked and list(store.keys()) == []
            gw.read_only = True
            with pytest.raises(ReadOnly):
                gw.trim(8 * MiB, 0, False)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
