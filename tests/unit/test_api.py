"""control/api.py against the in-process registry."""

from __future__ import annotations

import itertools
import time

import msgpack
import pytest

from control import api
from vbp.errors import AlreadyExists, Fenced, InvalidArgument, NotFound, RegistryUnavailable
from vbp.layout import MiB
from vbp.registry import open_registry
from vbp.registry.base import P_LEASE
from vbp.registry.kv import Put
from vbp.volume import VolumeRecord, complete_snapshot, new_volume, request_snapshot

_n = itertools.count()


def expire(reg, volume: str) -> None:
    """What a lease whose TTL ran out looks like (the registry keeps the record)."""
    key = P_LEASE + volume.encode()
    d = msgpack.unpackb(reg.kv.get(key)[0].value, raw=False)
    d["expires"] = 0.0
    reg.kv.txn([], [Put(key, msgpack.packb(d, use_bin_type=True))])


def leased_volume_with_pending_snapshot():
    """Volume v, its lease held by h1, a snapshot `s` requested: (registry, lease, head)."""
    reg = open_registry(f"memory://api-{next(_n)}")
    rec = new_volume("v", MiB, replicas=1, lineage="l0", head=reg.next_id(api.gen_counter("l0")), now=0.0)
    reg.create_volume("v", rec.to_dict())
    held = reg.acquire_lease("v", "h1", 60.0)
    head = reg.next_id(api.gen_counter("l0"))
    reg.update_volume("v", lambda d: request_snapshot(VolumeRecord.from_dict(d), "s", head).to_dict())
    return reg, held, head


def test_a_snapshot_completed_without_a_live_lease_fences_the_holder_whose_lease_expired():
    """Sim seed 10: the control plane completed a pending snapshot while the holder's
    lease had expired; the holder, back in touch with the registry, could renew it (nobody
    had taken it over) and write the generation that had just become the snapshot."""
    reg, held, head = leased_volume_with_pending_snapshot()
    expire(reg, "v")
    done = api.complete_unleased(reg, "v", head)
    assert done is not None and done.head == head and [s.name for s in done.snapshots] == ["s"]
    with pytest.raises(Fenced):
        reg.renew_lease(held, 60.0)
    assert reg.acquire_lease("v", "h2", 60.0).token > held.token  # the volume stays usable


def test_a_snapshot_is_not_completed_here_while_a_gateway_holds_the_lease():
    reg, held, head = leased_volume_with_pending_snapshot()
    assert api.complete_unleased(reg, "v", head) is None
    assert reg.renew_lease(held, 60.0).token == held.token


def test_a_clone_whose_snapshot_is_deleted_while_it_is_made_is_not_created():
    """clone() reads the parent, then creates the clone. A delete of the snapshot (and a
    garbage collection) landing in between left a clone naming freed generations, which
    read as zeros. The create now checks the parent's record in the same transaction:
    asked again, the snapshot is gone and the clone is refused."""
    reg = open_registry(f"memory://api-{next(_n)}")
    api.create_volume(reg, "v", MiB, replicas=1)
    reg.update_volume("v", lambda d: request_snapshot(
        VolumeRecord.from_dict(d), "s", reg.next_id(api.gen_counter(d["lineage"]))).to_dict())
    reg.update_volume("v", lambda d: complete_snapshot(VolumeRecord.from_dict(d)).to_dict())
    assert [s.name for s in api.get_volume(reg, "v").snapshots] == ["s"]
    kv = reg.kv
    txn = kv.txn
    raced: list = []

    def delete_first(compares, ops):
        if not raced and any(getattr(op, "key", b"").endswith(b"c") for op in ops):
            raced.append(True)  # `vbp volume delete v@s` lands between read and create
            reg.update_volume("v", lambda d: {**d, "snapshots": []})
        return txn(compares, ops)

    kv.txn = delete_first
    try:
        with pytest.raises(NotFound):
            api.clone(reg, "v@s", "c")
    finally:
        kv.txn = txn
    assert raced
    assert [d["name"] for d in reg.list_volumes()] == ["v"]
    # with the snapshot in place, the clone is made, and a name taken is refused
    reg.update_volume("v", lambda d: request_snapshot(
        VolumeRecord.from_dict(d), "s", reg.next_id(api.gen_counter(d["lineage"]))).to_dict())
    reg.update_volume("v", lambda d: complete_snapshot(VolumeRecord.from_dict(d)).to_dict())
    c = api.clone(reg, "v@s", "c")
    assert c.parent == "v@s" and api.get_volume(reg, "c") == c
    with pytest.raises(AlreadyExists):
        api.clone(reg, "v@s", "c")


def test_a_snapshot_whose_requester_gave_up_keeps_nothing_out():
    """`vbp volume snapshot` killed before it could cancel its pending snapshot (no
    gateway to complete it): once past its time, a new snapshot replaces it and a
    shrink goes ahead, where both were refused for ever ("in progress")."""
    reg = open_registry(f"memory://api-{next(_n)}")
    api.create_volume(reg, "v", 4 * MiB, replicas=1, chunk_size=MiB)

    def ask(name, until):
        head = reg.next_id(api.gen_counter(api.get_volume(reg, "v").lineage))
        reg.update_volume("v", lambda d: request_snapshot(
            VolumeRecord.from_dict(d), name, head, until).to_dict())

    ask("killed", time.time() + 60)  # its requester still has time: in progress
    with pytest.raises(InvalidArgument, match="in progress"):
        api.snapshot(reg, "v", "s", timeout=0.2)
    with pytest.raises(InvalidArgument, match="in progress"):
        api.resize(reg, "v", 2 * MiB, force=True)
    reg.update_volume("v", lambda d: {**d, "pending_until": time.time() - 1})  # gave up
    rec = api.snapshot(reg, "v", "s", timeout=5)
    assert [s.name for s in rec.snapshots] == ["s"] and not rec.pending
    ask("killed2", time.time() - 1)
    rec = api.resize(reg, "v", 2 * MiB, force=True)
    assert rec.size == 2 * MiB and not rec.pending and [s.name for s in rec.snapshots] == ["s"]


def test_limits_past_64_bits_are_refused_before_the_record_is_touched():
    reg = open_registry(f"memory://api-{next(_n)}")
    reg.create_volume("v", new_volume("v", MiB, replicas=1, lineage="l0", head=1, now=0.0).to_dict())
    for kw in ({"iops": 2**63}, {"iops": -1}, {"bps": "99999999999999999999999P"}, {"bps": 2**64}):
        with pytest.raises(InvalidArgument):
            api.set_limits(reg, "v", **kw)
    v = api.set_limits(reg, "v", iops=2**63 - 1, bps=2**63 - 1)
    assert (v.qos_iops, v.qos_bps) == (2**63 - 1, 2**63 - 1)
    assert api.get_volume(reg, "v").qos_bps == 2**63 - 1


def test_a_snapshot_request_whose_answer_is_lost_is_cancelled():
    """The registry commits the snapshot's request and the answer is lost (etcd: an
    unknown outcome): the call fails, and cancels its request rather than leave it
    pending (every later snapshot refused until it is abandoned, or a gateway completing
    a snapshot the user was told failed)."""
    reg = open_registry(f"memory://api-{next(_n)}")
    api.create_volume(reg, "v", MiB, replicas=1)
    update = reg.update_volume
    lost: list = []

    def answer_lost(name, fn, lease=None):
        out = update(name, fn, lease)
        if not lost:
            lost.append(True)
            raise RegistryUnavailable("kv/txn failed with an unknown outcome")
        return out

    reg.update_volume = answer_lost
    with pytest.raises(RegistryUnavailable):
        api.snapshot(reg, "v", "s", timeout=1)
    assert lost and not api.get_volume(reg, "v").pending
    assert [s.name for s in api.snapshot(reg, "v", "s", timeout=5).snapshots] == ["s"]


def test_a_volume_has_at_most_max_snapshots():
    """A record keeps each snapshot's chain: past a few hundred it grows too large to
    read five times a second, and at about 1,100 etcd refuses it (the completion then
    failed until its gateway was fenced). The snapshot past the cap is refused, clearly;
    deleting one makes room."""
    from vbp.volume import MAX_SNAPSHOTS, delete_snapshot, take_snapshot

    reg = open_registry(f"memory://api-{next(_n)}")
    rec = api.create_volume(reg, "v", MiB, replicas=1)
    heads = [reg.next_id(api.gen_counter(rec.lineage)) for _ in range(MAX_SNAPSHOTS)]

    def fill(d):
        r = VolumeRecord.from_dict(d)
        for i, head in enumerate(heads):
            r = take_snapshot(r, f"s{i}", head)
        return r.to_dict()

    reg.update_volume("v", fill)
    with pytest.raises(InvalidArgument, match="snapshots, the most"):
        api.snapshot(reg, "v", "one-more", timeout=5)
    assert not api.get_volume(reg, "v").pending
    reg.update_volume("v", lambda d: delete_snapshot(VolumeRecord.from_dict(d), "s0").to_dict())
    api.snapshot(reg, "v", "one-more", timeout=5)


@pytest.mark.parametrize("lost", ["grant", "release"])
def test_a_control_lease_whose_answer_is_lost_is_given_back(lost):
    """Completing a snapshot with no gateway, the control plane takes the volume's lease
    and gives it back. An answer lost (etcd: an unknown outcome) on the grant, or on the
    give-back, left the lease held for its 30 s: the volume's writers waited, then failed.
    Now a lost grant is looked for under the call's own holder name and given back, and
    a lost give-back is made again. Either way no lease is left held, and the next
    gateway still reconciles (a takeover)."""
    reg, held, head = leased_volume_with_pending_snapshot()
    expire(reg, "v")
    calls: list = []
    name = "acquire_lease" if lost == "grant" else "release_lease"
    real = getattr(reg, name)

    def answer_lost(*args, **kw):
        out = real(*args, **kw)
        if not calls:
            calls.append(args)
            raise RegistryUnavailable("kv/txn failed with an unknown outcome")
        return out

    setattr(reg, name, answer_lost)
    if lost == "grant":
        with pytest.raises(RegistryUnavailable):
            api.complete_unleased(reg, "v", head)
    else:
        assert api.complete_unleased(reg, "v", head) is not None
    assert calls and reg.get_lease("v") is None
    assert reg.lease_orphaned("v")
    assert reg.acquire_lease("v", "h2", 60.0).taken_over
