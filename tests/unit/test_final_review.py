"""Review (branch rev-final) of 287f4e4..789f5fe: strict xfails for defects found."""

from __future__ import annotations

import lmdb
import pytest

from vbp.chunkstore import ChunkStore
from vbp.layout import ChunkKey

CS = 64 * 1024


@pytest.mark.xfail(strict=True, raises=TypeError, reason=(
    "ChunkStore._load_collected catches ValueError/UnpackException only: a damaged "
    "'collected' entry that msgpack decodes to a map with an unhashable key raises "
    "TypeError and the store (blockd) no longer opens"))
@pytest.mark.parametrize("value", [b"\x81\x91\x01\x01", b"\x81\x80\x01"])
def test_a_collected_mark_with_an_unhashable_key_is_dropped_not_fatal(tmp_path, value):
    s = ChunkStore(tmp_path, 32 * CS)
    s.write(ChunkKey("live", 0, 1), 0, b"kept", chunk_size=CS)
    s.close()
    with lmdb.open(str(tmp_path / "index"), subdir=True, max_dbs=8) as env:
        with env.begin(write=True) as txn:
            txn.put(b"dead", value, db=env.open_db(b"collected", txn=txn))
    s = ChunkStore(tmp_path, 32 * CS)  # TypeError: unhashable type
    try:
        assert s.read(ChunkKey("live", 0, 1), 0, 4) == b"kept"
        assert "dead" not in s.collected_gens
    finally:
        s.close()
