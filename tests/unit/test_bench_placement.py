"""The bench's vectorized placement is the same function as vbp.placement, chunk for chunk."""

from __future__ import annotations

import numpy as np  # in the test extra: this test never skips
from hypothesis import given, settings
from hypothesis import strategies as st

import bench.placement as bp
from tests.unit.test_placement import chunks, cluster_maps, replicas
from vbp.cluster import ClusterMap
from vbp.placement import Placement


@settings(max_examples=150, deadline=None)
@given(cluster_maps(max_zones=5, max_pods=3, max_hosts=5), replicas, chunks, st.randoms(use_true_random=False),
       st.data())
def test_vectorized_equals_scalar(cmap, n, keys, rnd, data):
    # the key matrix covers every host in any column order; the placed map is any subset
    # of them (the bench's scenarios: hosts removed, added, down or draining)
    hosts = list(cmap.hosts)
    rnd.shuffle(hosts)
    matrix = bp.HostKeys(hosts)
    sub = ClusterMap(cmap.epoch, tuple(h for h in cmap.hosts if data.draw(st.booleans()) or len(cmap.hosts) < 3))
    names = list(matrix.column)
    got = bp.VectorPlacement(sub, matrix).place(matrix(bp.chunk_lanes(keys)), n)
    assert got.shape == (len(keys), n)
    p = Placement(sub)
    for row, (lin, idx) in zip(got, keys):
        assert tuple(names[x] for x in row if x >= 0) == p.place(lin, idx, n)


def test_vectorized_on_the_bench_map():
    cmap = bp.build_map(4, 3, 5, seed=2)
    matrix = bp.HostKeys(list(cmap.hosts))
    for n in (1, 3, 4, 6):
        assert bp.check_vector_against_scalar(cmap, matrix, n, sample=300) == 0


def test_host_keys_equal_score_key():
    from vbp.placement import chunk_key, host_weight, node_seed, score_key

    cmap = bp.build_map(2, 2, 3, seed=3)
    matrix = bp.HostKeys(list(cmap.hosts))
    items = [("l", i) for i in range(200)]
    k = matrix(bp.chunk_lanes(items))
    assert np.isinf(k[:, -1]).all()
    for row, (lin, idx) in zip(k, items):
        ck = chunk_key(lin, idx)
        want = [score_key(ck, node_seed("host", h.id), host_weight(h)) for h in cmap.hosts]
        assert np.allclose(row[:-1], want, rtol=1e-15, atol=0)
