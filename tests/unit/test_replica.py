"""The replica role over the real peer transport: what it answers to requests a gateway
should never send (replicator/replica.py)."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio

from replicator import messages as m
from replicator.replica import Replica
from replicator.transport import PeerPool, serve_peers
from vbp.chunkstore import ChunkStore
from vbp.errors import InvalidArgument

pytestmark = pytest.mark.timeout(30)

CLUSTER = "replica"
CHUNK = 1 << 20


@asynccontextmanager
async def replica_server(tmp_path):
    """A Replica on a real chunk store behind serve_peers; yields (replica, pool, address)."""
    store = ChunkStore(tmp_path / "chunks", 64 << 20)
    replica = Replica(store, "h2", lambda: 1)
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: serve_peers(
                replica.handle, "127.0.0.1", 0, cluster=CLUSTER, host_id="h2",
                task_status=task_status))
            async with PeerPool(CLUSTER, "h1", request_timeout=5) as pool:
                yield replica, pool, f"127.0.0.1:{port}"
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def zero(index: int, offset: int, length: int, chunk_size: int = CHUNK) -> m.ZeroChunk:
    return m.ZeroChunk("v", "lin", index, 1, (1,), offset, length, chunk_size, 0, False, 1, 1)


@pytest.mark.parametrize("index, offset, length, chunk_size", [
    (1, CHUNK - 4096, 8192, CHUNK),  # past the chunk's end
    (1, -4096, 4096, CHUNK),  # before its start
    (1, 0, -1, CHUNK),  # a negative length
    (1, 0, 4096, 12345),  # no chunk size at all
    (-1, 0, 4096, CHUNK),  # no chunk index
])
async def test_a_zero_out_of_range_is_refused_whether_or_not_the_chunk_is_here(
        tmp_path, index, offset, length, chunk_size):
    """Chunk 0 is on the replica, chunk 1 is not: a zeroing no chunk could take is
    refused (InvalidArgument) either way, not acknowledged where nothing is allocated
    yet: two copies of one chunk must not answer one request differently."""
    async with replica_server(tmp_path) as (replica, pool, address):
        w = m.WriteChunk("v", "lin", 0, 1, (1,), 0, b"x" * 4096, CHUNK, 0, False, 1, 1)
        assert type(await pool.call(address, w)) is m.Ok
        for i in (0, 1) if index == 1 else (index,):  # (chunk 0 held, 1 not)
            with pytest.raises(InvalidArgument):
                await pool.call(address, zero(i, offset, length, chunk_size))
        # nothing was noted for it either: no takeover is sent after a chunk not written
        assert replica.recently_written("lin", 1) == [0]
        assert await pool.call(address, zero(1, 0, 4096)) == m.Ok(0)  # a good one still is
