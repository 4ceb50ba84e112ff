"""One conformance suite for every registry backend: in-memory, LMDB and a real etcd."""

from __future__ import annotations

import base64
import dataclasses
import multiprocessing
import threading
import time
import uuid

import msgpack
import pytest

from vbp.cluster import HostRecord
from vbp.errors import (
    AlreadyExists,
    Fenced,
    InUse,
    InvalidArgument,
    LeaseHeld,
    NotFound,
    RegistryUnavailable,
)
from vbp.registry import Lease, StaleRecord, open_registry
from vbp.registry.base import K_DATASET, P_STALE, Registry
from vbp.registry.kv import Put

from .conftest import free_port

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["memory", "lmdb", "etcd"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if request.param == "lmdb":
        return f"lmdb://{tmp_path / 'registry'}"
    etcd = request.getfixturevalue("etcd_server")
    etcd.wipe()
    return etcd.url


@pytest.fixture
def reg(url):
    r = open_registry(url)
    yield r
    r.close()


def host(i: int, **kw) -> HostRecord:
    return HostRecord(id=f"h{i}", peer=f"127.0.0.1:{7000 + i}", nbd=f"127.0.0.1:{10800 + i}",
                      capacity=1 << 30, **kw)


def run_threads(n: int, fn) -> list:
    results: list = [None] * n
    errors: list = []

    def body(i):
        try:
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "nope", "lmdb://", "etcd://", "etcd://host", "etcd://h:99999",
                                 "ftp://x", "etcd://a:1,,b:2"])
def test_bad_url_is_invalid_argument(bad):
    with pytest.raises(InvalidArgument):
        open_registry(bad)


# --- volumes ------------------------------------------------------------------------------


def test_volume_crud(reg):
    assert reg.list_volumes() == []
    reg.create_volume("a", {"name": "a", "size": 1})
    reg.create_volume("b", {"name": "b", "size": 2, "blob": b"\x00\xff"})
    with pytest.raises(AlreadyExists):
        reg.create_volume("a", {"name": "a"})
    assert reg.get_volume("b") == {"name": "b", "size": 2, "blob": b"\x00\xff"}
    assert [v["name"] for v in reg.list_volumes()] == ["a", "b"]
    assert reg.update_volume("a", lambda r: {**r, "size": 5}) == {"name": "a", "size": 5}
    assert reg.get_volume("a")["size"] == 5
    reg.delete_volume("a")
    with pytest.raises(NotFound):
        reg.get_volume("a")
    with pytest.raises(NotFound):
        reg.delete_volume("a")
    with pytest.raises(NotFound):
        reg.update_volume("a", lambda r: r)
    reg.create_volume("a", {"name": "a", "size": 7})  # a deleted name can be reused
    assert reg.get_volume("a")["size"] == 7


def test_a_deleted_volume_leaves_its_generations_for_a_while(reg, monkeypatch):
    """delete_volume keeps the generations the record named (head chain, pending head,
    snapshots) under its lineage, in the delete's transaction, for GONE_KEEP: every
    host's GC marks those no reader holds (blockd.service.collect_garbage_once). Older
    entries are dropped when read; records without a lineage leave none."""
    from vbp.registry import base

    reg.create_volume("v", {"name": "v", "lineage": "L1", "chain": [1, 4], "pending": 6,
                            "shrink_head": 0,
                            "snapshots": [{"name": "s", "chain": [1, 2]}]})
    reg.create_volume("c", {"name": "c", "lineage": "L1", "chain": [1, 2, 5]})
    reg.create_volume("bare", {"name": "bare"})
    assert reg.deleted_gens() == {}
    now = time.time()
    monkeypatch.setattr(base.time, "time", lambda: now)
    reg.delete_volume("v")
    reg.delete_volume("bare")
    assert reg.deleted_gens() == {"L1": {1, 2, 4, 6}}
    now += base.GONE_KEEP / 2
    reg.delete_volume("c")
    assert reg.deleted_gens() == {"L1": {1, 2, 4, 5, 6}}
    now += base.GONE_KEEP / 2 + 1  # v's entry is older than GONE_KEEP now
    assert reg.deleted_gens() == {"L1": {1, 2, 5}}
    assert [it.key.rsplit(b"/", 1)[0] for it in reg.kv.range(base.P_GONE)[0]] == [
        base.P_GONE + b"L1/c"]
    # a name deleted again in the same lineage (a clone made under it meanwhile) keeps
    # the first delete's generations too (review)
    reg.create_volume("c", {"name": "c", "lineage": "L1", "chain": [1, 2, 7]})
    reg.delete_volume("c")
    assert reg.deleted_gens() == {"L1": {1, 2, 5, 7}}


def test_update_volume_fn_error_aborts(reg):
    reg.create_volume("v", {"n": 1})

    def boom(rec):
        rec["n"] = 99
        raise InvalidArgument("no")

    with pytest.raises(InvalidArgument):
        reg.update_volume("v", boom)
    assert reg.get_volume("v") == {"n": 1}


def test_update_volume_cas_under_concurrent_updaters(url, reg):
    reg.create_volume("v", {"n": 0, "by": []})
    per_thread = 15

    def worker(i):
        r = open_registry(url)
        try:
            for _ in range(per_thread):
                r.update_volume("v", lambda rec: {"n": rec["n"] + 1, "by": rec["by"] + [i]})
        finally:
            r.close()

    run_threads(6, worker)
    rec = reg.get_volume("v")
    assert rec["n"] == 6 * per_thread
    assert sorted(rec["by"]) == sorted(i for i in range(6) for _ in range(per_thread))


def test_next_id_monotonic_under_concurrency(url, reg):
    assert reg.next_id("vol") == 1
    assert reg.next_id("other") == 1

    def worker(i):
        r = open_registry(url) if i % 2 else reg  # shared and private handles
        try:
            return [r.next_id("vol") for _ in range(20)]
        finally:
            if i % 2:
                r.close()

    got = run_threads(6, worker)
    for seq in got:
        assert seq == sorted(seq) and len(set(seq)) == len(seq)
    flat = sorted(x for seq in got for x in seq)
    assert flat == list(range(2, 2 + 6 * 20))
    assert reg.next_id("vol") == 2 + 6 * 20


# --- leases ----------------------------------------------------------------------------------


def wait_run_out(reg, volume: str, timeout: float = 10.0) -> None:
    """Until the volume's lease has run out, by its liveness key's TTL on the store's clock
    (etcd keeps a key at least its minimum lease TTL, 1 s here, and expires a lease a
    little after it)."""
    deadline = time.monotonic() + timeout
    while reg.get_lease(volume) is not None:
        assert time.monotonic() < deadline, f"the lease of {volume} never ran out"
        time.sleep(0.05)


def test_lease_exclusive_and_reacquire(reg):
    assert reg.get_lease("v") is None
    a = reg.acquire_lease("v", "gw-a", 5)
    assert isinstance(a, Lease) and (a.volume, a.holder) == ("v", "gw-a")
    assert a.expires > time.time() + 4
    assert reg.get_lease("v") == a
    with pytest.raises(LeaseHeld, match="gw-a"):
        reg.acquire_lease("v", "gw-b", 5)
    a2 = reg.acquire_lease("v", "gw-a", 5)  # the same holder again: a valid, newer grant
    assert a2.holder == "gw-a" and a2.token > a.token
    assert reg.get_lease("v") == a2
    # leases of other volumes are independent
    other = reg.acquire_lease("w", "gw-b", 5)
    assert other.holder == "gw-b"


def test_lease_renew_release(reg):
    a = reg.acquire_lease("v", "gw-a", 2)
    r = reg.renew_lease(a, 10)
    assert r.token == a.token and r.expires > a.expires
    assert reg.get_lease("v").expires == r.expires
    reg.release_lease(r)
    assert reg.get_lease("v") is None
    with pytest.raises(Fenced, match="released"):
        reg.renew_lease(r, 5)
    reg.release_lease(r)  # releasing twice is harmless
    b = reg.acquire_lease("v", "gw-b", 5)
    assert b.token > a.token


def test_lease_takeover_after_expiry_fences_old_holder(reg):
    a = reg.acquire_lease("v", "gw-a", 1)
    wait_run_out(reg, "v")
    b = reg.acquire_lease("v", "gw-b", 5)
    assert b.token > a.token
    with pytest.raises(Fenced, match="gw-b"):
        reg.renew_lease(a, 5)
    reg.release_lease(a)  # a stale release does not drop the new holder's lease
    assert reg.get_lease("v") == b
    with pytest.raises(LeaseHeld):
        reg.acquire_lease("v", "gw-a", 5)


def test_a_volume_update_under_a_lease_holds_only_while_the_lease_does(reg):
    """update_volume(..., lease): the lease holder changes the record, also once its lease
    ran out if nobody took it over; after a takeover or a release the update is refused
    (Fenced) and the record stays as it was. A snapshot is completed so."""
    reg.create_volume("v", {"name": "v", "n": 0})
    bump = lambda d: {**d, "n": d["n"] + 1}  # noqa: E731
    a = reg.acquire_lease("v", "gw-a", 1)
    assert reg.update_volume("v", bump, a)["n"] == 1
    renewed = reg.renew_lease(a, 1)
    assert reg.update_volume("v", bump, renewed)["n"] == 2  # a renewal is the same lease
    wait_run_out(reg, "v")
    assert reg.update_volume("v", bump, a)["n"] == 3  # expired, not taken over: still ours
    b = reg.acquire_lease("v", "gw-b", 30)
    with pytest.raises(Fenced):
        reg.update_volume("v", bump, a)
    assert reg.get_volume("v")["n"] == 3
    assert reg.update_volume("v", bump, b)["n"] == 4
    reg.release_lease(b)
    with pytest.raises(Fenced):
        reg.update_volume("v", bump, b)
    assert reg.update_volume("v", bump)["n"] == 5  # no lease asked for: as before

    c = reg.acquire_lease("v", "gw-c", 30)

    def taken_over_meanwhile(d):  # between the lease's read and the record's write
        if not taken:
            taken.append(reg.release_lease(c))
            taken.append(reg.acquire_lease("v", "gw-d", 30))
        return bump(d)

    taken: list = []
    with pytest.raises(Fenced):
        reg.update_volume("v", taken_over_meanwhile, c)
    assert reg.get_volume("v")["n"] == 5 and taken  # the lease is compared in the write


def test_stale_marks_under_a_lease_hold_only_while_the_lease_does(reg):
    """mark_stale(..., lease=): a gateway's marks of its writes' failures land while its
    lease is the volume's (expired and not taken over too); after a takeover or a release
    they are refused (Fenced) and no record is made. A gateway that stalled past its lease
    must not record the new holder's copies stale."""
    stale = lambda: sorted(r.host_id for r in reg.list_stale("lin", 3))  # noqa: E731
    a = reg.acquire_lease("v", "gw-a", 1)
    reg.mark_stale("lin", 3, ["h1"], 10, lease=a)
    wait_run_out(reg, "v")
    reg.mark_stale("lin", 3, ["h2"], 11, lease=a)  # expired, not taken over: still ours
    assert stale() == ["h1", "h2"]
    b = reg.acquire_lease("v", "gw-b", 30)
    with pytest.raises(Fenced):
        reg.mark_stale("lin", 3, ["h3"], 12, lease=a)
    assert stale() == ["h1", "h2"]
    reg.mark_stale("lin", 3, ["h3"], 12, lease=b)
    reg.release_lease(b)
    with pytest.raises(Fenced):
        reg.mark_stale("lin", 3, ["h4"], 13, lease=b)
    reg.mark_stale("lin", 3, ["h4"], 13)  # no lease asked for: as before
    assert stale() == ["h1", "h2", "h3", "h4"]


def test_lease_renew_after_expiry_without_takeover(reg):
    a = reg.acquire_lease("v", "gw-a", 1)
    wait_run_out(reg, "v")
    r = reg.renew_lease(a, 5)
    assert r.token == a.token and reg.get_lease("v") == r


def test_lease_tokens_increase_under_contention(url, reg):
    def worker(i):
        r = open_registry(url)
        tokens = []
        try:
            for _ in range(10):
                try:
                    lease = r.acquire_lease("v", f"gw-{i}", 30)
                except LeaseHeld:
                    continue
                tokens.append(lease.token)
                r.release_lease(lease)
        finally:
            r.close()
        return tokens

    tokens = [t for seq in run_threads(4, worker) for t in seq]
    assert tokens and len(set(tokens)) == len(tokens)


WALL = time.time


@pytest.mark.parametrize("skew", ["reader ahead 7 s", "reader ahead a day", "holder behind 7 s"])
def test_a_wall_clock_step_or_skew_takes_no_live_lease_over(reg, monkeypatch, skew):
    """A lease's liveness is its liveness key's TTL, on the store's clock: a reader whose
    wall clock is ahead of the holder's (stepped forward by NTP, or another machine's)
    does not see the lease run out, take the volume over, nor count it orphaned. (Judged
    by the `expires` the holder wrote on its own clock, the lease was taken over.)"""
    step = {"reader ahead 7 s": 7.0, "reader ahead a day": 86400.0, "holder behind 7 s": -7.0}[skew]
    reg.create_volume("v", {"name": "v"})
    if step < 0:
        monkeypatch.setattr(time, "time", lambda: WALL() + step)
    a = reg.acquire_lease("v", "gw-a", 5.0)
    monkeypatch.setattr(time, "time", lambda: WALL() + max(step, 0.0))
    with pytest.raises(LeaseHeld, match="gw-a"):
        reg.acquire_lease("v", "gw-b", 5.0)
    assert reg.get_lease("v") == a
    assert not reg.lease_orphaned("v") and reg.orphaned_lease("v") is None
    reg.delete_volume("v")
    assert reg.leases_of_deleted() == [a]  # (GC holds off: its holder may serve it still)
    assert reg.renew_lease(a, 5.0).token == a.token


def test_a_wall_clock_step_forward_forgets_no_live_lease_of_a_deleted_volume(reg, monkeypatch):
    """The lease records of deleted volumes are forgotten by their recorded `expires`, a
    coarse cutoff (blockd: a compaction period), but never while their liveness key is
    there: its holder may serve the deleted chain still, and GC holds off for it only
    while the record lists it (leases_of_deleted)."""
    reg.create_volume("v", {"name": "v"})
    a = reg.acquire_lease("v", "gw-a", 30.0)
    reg.delete_volume("v")
    monkeypatch.setattr(time, "time", lambda: WALL() + 86400.0)
    assert reg.forget_leases_of_deleted(600.0) == 0
    assert reg.leases_of_deleted() == [a] and reg.lease_tokens() == {"v": a.token}
    reg.release_lease(a)
    assert reg.forget_leases_of_deleted(600.0) == 1 and reg.lease_tokens() == {}


def test_a_wall_clock_step_back_keeps_no_run_out_lease(reg, monkeypatch):
    """The other way: a reader whose wall clock went back (or is behind the holder's) sees
    a lease run out when its key's TTL has, not an hour later, and takes it over."""
    reg.create_volume("v", {"name": "v"})
    a = reg.acquire_lease("v", "gw-a", 0.05)  # (etcd keeps it 1 s at least)
    monkeypatch.setattr(time, "time", lambda: WALL() - 3600.0)
    wait_run_out(reg, "v")
    assert reg.lease_orphaned("v") and reg.orphaned_lease("v").token == a.token
    reg.delete_volume("v")
    assert reg.leases_of_deleted() == []
    b = reg.acquire_lease("v", "gw-b", 5.0)
    assert b.taken_over and b.token > a.token
    with pytest.raises(Fenced, match="gw-b"):
        reg.renew_lease(a, 5.0)


def _put_lease_record(reg, volume: str, record: dict, live_token: int | None = None) -> None:
    """Store a lease record as it is (and, with `live_token`, a liveness key naming it)."""
    from vbp.registry.base import P_LEASE, P_LEASE_LIVE

    ops = [Put(P_LEASE + volume.encode(), msgpack.packb(record, use_bin_type=True))]
    if live_token is not None:
        ops.append(Put(P_LEASE_LIVE + volume.encode(), msgpack.packb(live_token), 30.0))
    reg.kv.txn([], ops)


def test_a_lease_record_of_the_code_before_is_judged_by_its_expires(reg):
    """A record without `live_key` was written by the code before the liveness key, still
    running somewhere in a mixed-version pool: it keeps no liveness key, so its `expires`
    (that code's wall clock) says whether it is held, and its live lease is not taken over."""
    _put_lease_record(reg, "old", {"holder": "gw-old", "token": 5, "expires": WALL() + 30})
    _put_lease_record(reg, "gone", {"holder": "gw-old", "token": 6, "expires": WALL() - 1})
    assert (reg.get_lease("old").holder, reg.get_lease("old").token) == ("gw-old", 5)
    with pytest.raises(LeaseHeld, match="gw-old"):
        reg.acquire_lease("old", "gw-new", 5.0)
    assert not reg.lease_orphaned("old")
    assert [lease.volume for lease in reg.leases_of_deleted()] == ["old"]  # (no volume record)
    assert reg.get_lease("gone") is None and reg.orphaned_lease("gone").token == 6
    b = reg.acquire_lease("gone", "gw-new", 5.0)
    assert b.taken_over and b.token > 6 and reg.get_lease("gone") == b


def test_a_lease_is_held_only_by_a_liveness_key_of_its_own_grant(reg):
    """A record this code wrote (`live_key`) is held only while its liveness key is there
    naming its token, whatever its `expires` says: a key left by an earlier grant does
    not keep a later one."""
    ahead = {"holder": "gw-a", "token": 7, "expires": WALL() + 3600, "live_key": True}
    _put_lease_record(reg, "v", ahead)
    assert reg.get_lease("v") is None and reg.lease_orphaned("v")
    _put_lease_record(reg, "v", ahead, live_token=6)
    assert reg.get_lease("v") is None and reg.lease_orphaned("v")
    _put_lease_record(reg, "v", {**ahead, "expires": WALL() - 3600}, live_token=7)
    assert reg.get_lease("v").token == 7 and not reg.lease_orphaned("v")
    with pytest.raises(LeaseHeld):
        reg.acquire_lease("v", "gw-b", 5.0)


class _RenewedMeanwhile:
    """A KV whose first transaction is preceded by `renew()`: a renewal landing between a
    grant's reads and its write."""

    def __init__(self, kv, renew):
        self.kv, self.renew = kv, renew

    def __getattr__(self, name):
        return getattr(self.kv, name)

    def txn(self, compares, ops):
        if self.renew is not None:
            renew, self.renew = self.renew, None
            renew()
        return self.kv.txn(compares, ops)


def test_a_grant_racing_a_renewal_is_refused(reg):
    """gw-b reads gw-a's lease run out, and gw-a renews it before gw-b's write: the
    grant's compare (the record and its liveness key as read) refuses it, and judged
    again the lease is held."""
    a = reg.acquire_lease("v", "gw-a", 0.05)
    wait_run_out(reg, "v")
    renewed = []
    b_reg = Registry(_RenewedMeanwhile(reg.kv, lambda: renewed.append(reg.renew_lease(a, 30.0))))
    with pytest.raises(LeaseHeld, match="gw-a"):
        b_reg.acquire_lease("v", "gw-b", 30.0)
    assert renewed and reg.get_lease("v") == renewed[0]


# --- hosts and the cluster map -----------------------------------------------------------------


def test_register_and_map(reg):
    m0 = reg.cluster_map()
    assert m0.hosts == ()
    m1 = reg.register_host(host(1, zone="z1", pod="p1"), 30)
    assert m1.epoch > m0.epoch and [h.id for h in m1.hosts] == ["h1"]
    assert m1.host("h1").state == "up" and m1.host("h1").zone == "z1"
    m2 = reg.register_host(host(2), 30)
    assert m2.epoch > m1.epoch and [h.id for h in m2.hosts] == ["h1", "h2"]
    assert reg.cluster_map() == m2  # nothing changed: same epoch
    m3 = reg.register_host(host(2), 30)  # re-registration with identical data
    assert m3 == m2
    m4 = reg.register_host(HostRecord("h2", "127.0.0.1:9999", "127.0.0.1:9998"), 30)
    assert m4.epoch > m3.epoch and m4.host("h2").peer == "127.0.0.1:9999"
    with pytest.raises(NotFound):
        reg.heartbeat("nope", 10)
    with pytest.raises(InvalidArgument, match="is in the data set .chunks are placed on it.*drain it"):
        reg.remove_host("h1")  # no data set recorded: every host is in it
    m4 = reg.set_data_set(0, ["h2"], None)
    assert m4.data == ("h2",) and m4.prev is None and m4.mgen == 1
    m5 = reg.remove_host("h1")
    assert m5.epoch > m4.epoch and [h.id for h in m5.hosts] == ["h2"]
    with pytest.raises(NotFound):
        reg.remove_host("h1")


def test_remove_unless_alive_waits_for_the_hosts_liveness_to_lapse(reg):
    """`vbp host remove`: a host whose blockd runs is not forgotten (it would register
    again at its next heartbeat and take chunks), whatever its maintenance says; once
    its liveness lapsed it is. Without unless_alive the registry removes it all the same."""
    reg.register_host(host(1), 1)
    reg.register_host(host(2), 30)
    reg.register_host(host(3), 30)
    reg.set_data_set(0, ["h3"], None)
    reg.set_maintenance("h1", True)
    assert reg.host_alive("h1") and reg.host_alive("h2")
    for h in ("h1", "h2"):
        with pytest.raises(InUse, match=f"host {h} is up: stop its blockd first"):
            reg.remove_host(h, unless_alive=True)
    assert {x.id for x in reg.cluster_map().hosts} == {"h1", "h2", "h3"}
    deadline = time.monotonic() + 5  # (etcd deletes an expired key up to ~0.5 s late)
    while reg.host_alive("h1"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert [x.id for x in reg.remove_host("h1", unless_alive=True).hosts] == ["h2", "h3"]
    assert [x.id for x in reg.remove_host("h2").hosts] == ["h3"]


def test_heartbeat_carries_stats_and_needs_a_registered_host(reg):
    reg.register_host(host(1), 30)
    reg.heartbeat("h1", 30, {"used": 7})
    assert reg.host_stats() == {"h1": {"used": 7}}
    with pytest.raises(NotFound):
        reg.heartbeat("h9", 30, {"used": 1})
    assert "h9" not in reg.host_stats()  # the guarded txn wrote nothing
    assert [h.id for h in reg.cluster_map().hosts] == ["h1"]


def test_keep_alive_gives_a_key_more_time_with_no_new_revision(reg):
    """KV.keep_alive: a time-to-live key lives on past its first time while kept alive,
    its value and revisions and the store's revision unchanged (nothing for a watcher to
    be told); once no longer kept it lapses, and there is nothing left to keep. A key
    absent or without a time-to-live is not kept (False: put it again)."""
    kv = reg.kv
    ttl = max(1.0, kv.ttl_floor())
    kv.txn([], [Put(b"vbp/t/alive", b"1", ttl), Put(b"vbp/t/forever", b"2")])
    first, rev = kv.get(b"vbp/t/alive")
    assert not kv.keep_alive(b"vbp/t/forever", ttl) and not kv.keep_alive(b"vbp/t/none", ttl)
    deadline = time.monotonic() + 2.5 * ttl
    while time.monotonic() < deadline:
        assert kv.keep_alive(b"vbp/t/alive", ttl)
        time.sleep(ttl / 4)
    item, now_rev = kv.get(b"vbp/t/alive")
    assert item == first and now_rev == rev  # alive past its time, nothing written
    assert kv.changes(b"vbp/t/", rev, 0.2) == ([], rev)
    deadline = time.monotonic() + ttl + 10
    while kv.get(b"vbp/t/alive")[0] is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert kv.get(b"vbp/t/alive")[0] is None
    assert not kv.keep_alive(b"vbp/t/alive", ttl)


def test_host_ttl_expiry_marks_down_and_bumps_epoch(url, reg):
    reg.register_host(host(1), 1)
    m = reg.register_host(host(2), 60)
    assert m.host("h1").state == "up"
    # another reader agrees on the epoch
    other = open_registry(url)
    try:
        assert other.cluster_map().epoch == m.epoch
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            reg.heartbeat("h2", 60)
            m2 = reg.wait_map_change(m.epoch, 0.5)
            if m2.epoch > m.epoch:
                break
        assert m2.epoch > m.epoch
        assert m2.host("h1").state == "down" and m2.host("h2").state == "up"
        assert other.cluster_map() == m2
        # a heartbeat brings it back up, with a new epoch
        reg.heartbeat("h1", 30)
        m3 = reg.cluster_map()
        assert m3.epoch > m2.epoch and m3.host("h1").state == "up"
    finally:
        other.close()


def test_draining_and_maintenance(reg):
    reg.register_host(host(1), 1)
    m0 = reg.register_host(host(2), 30)
    m1 = reg.set_host_state("h2", "draining")
    assert m1.epoch > m0.epoch and m1.host("h2").state == "draining"
    m1b = reg.register_host(host(2), 30)  # a restarting host keeps its draining state
    assert m1b.host("h2").state == "draining" and m1b.epoch == m1.epoch
    with pytest.raises(InvalidArgument):
        reg.set_host_state("h2", "down")
    with pytest.raises(NotFound):
        reg.set_host_state("nope", "up")
    m2 = reg.set_maintenance("h1", True)
    assert m2.epoch > m1b.epoch and m2.host("h1").maintenance
    time.sleep(1.2)
    # in maintenance, an expired host is not reported down (no recovery storm)
    deadline = time.monotonic() + 1.5  # etcd deletes an expired key up to ~0.5 s late
    while time.monotonic() < deadline:
        m3 = reg.cluster_map()
        assert m3.host("h1").state == "up"
        time.sleep(0.3)
    m4 = reg.set_maintenance("h1", False)
    assert m4.host("h1").state == "down" and not m4.host("h1").maintenance
    assert m4.epoch > m3.epoch
    m5 = reg.set_host_state("h2", "up")
    assert m5.host("h2").state == "up" and m5.epoch > m4.epoch
    m6 = reg.register_host(host(1), 30)  # maintenance flag survives re-registration
    assert m6.host("h1").state == "up" and not m6.host("h1").maintenance


def test_draining_lists_drained_hosts_down_or_not(reg):
    """The map shows a drained host whose heartbeat stopped as down; the data-set controller
    still needs to know it was drained (it then takes it out at once)."""
    reg.register_host(host(1), 30)
    reg.register_host(host(2), 1)
    assert reg.draining() == frozenset()
    reg.set_host_state("h1", "draining")
    reg.set_host_state("h2", "draining")
    reg.set_host_state("h1", "up")
    assert reg.draining() == {"h2"}
    deadline = time.monotonic() + 5
    while reg.cluster_map().host("h2").state != "down":
        assert time.monotonic() < deadline, "h2 not down after its ttl"
        time.sleep(0.2)
    assert reg.draining() == {"h2"}


def test_wait_map_change(reg):
    m = reg.register_host(host(1), 30)
    t0 = time.monotonic()
    same = reg.wait_map_change(m.epoch, 0.3)
    assert same.epoch == m.epoch and time.monotonic() - t0 >= 0.29
    timer = threading.Timer(0.3, lambda: reg.set_host_state("h1", "draining"))
    timer.start()
    t0 = time.monotonic()
    changed = reg.wait_map_change(m.epoch, 10)
    timer.join()
    assert changed.epoch > m.epoch and changed.host("h1").state == "draining"
    assert time.monotonic() - t0 < 3


def test_volume_and_stale_changes_tell_what_changed_since_a_revision(reg, url):
    """What blockd's record watch and stale-map refresh ask instead of reading every open
    volume's records each period: the changes after a revision. etcd names the volumes
    (lineages) and tells every change exactly once over successive calls; LMDB and the
    memory store cannot tell which keys changed and say so (None). With no change, a
    call waits out its timeout and tells nothing."""
    reg.create_volume("a", {"x": 1})
    reg.create_volume("b", {"x": 1})
    rev = reg.revision()
    t0 = time.monotonic()
    assert reg.volume_changes(rev, 0.3) == (set(), rev)
    assert reg.stale_changes(rev, 0.3) == (set(), rev)
    assert time.monotonic() - t0 >= 0.55
    timer = threading.Timer(0.3, lambda: reg.update_volume("b", lambda d: {**d, "x": 2}))
    timer.start()
    t0 = time.monotonic()
    names, rev2 = reg.volume_changes(rev, 10)
    timer.join()
    assert time.monotonic() - t0 < 5 and rev2 > rev
    exact = url.startswith("etcd")
    assert names == ({"b"} if exact else None)
    reg.mark_stale("L1", 3, ["h1"], 5)
    reg.mark_stale("L2", 0, ["h1", "h2"], 5)
    reg.delete_volume("a")

    def all_told(call, since):
        """Every change after `since`, call after call (etcd may tell them in parts:
        none twice, none left out); None if the registry cannot tell."""
        told: set[str] = set()
        while True:
            got, rev = call(since, 0.5)
            if got is None:
                return None
            if not got:
                return told
            assert rev > since
            told |= got
            since = rev

    if exact:
        assert all_told(reg.stale_changes, rev2) == {"L1", "L2"}
        assert all_told(reg.volume_changes, rev) == {"a", "b"}
    else:
        assert all_told(reg.stale_changes, rev2) is None
        assert all_told(reg.volume_changes, rev) is None
    after = reg.revision()
    assert reg.volume_changes(after, 0.2) == (set(), after)


def test_epochs_strictly_increase_on_every_change(reg):
    seen = [reg.cluster_map()]
    ops = [
        lambda: reg.register_host(host(1), 30),
        lambda: reg.register_host(host(2, zone="z2"), 30),
        lambda: reg.set_host_state("h1", "draining"),
        lambda: reg.set_host_state("h1", "draining"),  # no change
        lambda: reg.set_maintenance("h2", True),
        lambda: reg.set_host_state("h1", "up"),
        lambda: reg.set_data_set(0, ["h1"], ["h1", "h2"]),
        lambda: reg.set_data_set(1, ["h1"], None),
        lambda: reg.remove_host("h2"),
    ]
    for op in ops:
        seen.append(op())
    for a, b in zip(seen, seen[1:]):
        if (a.hosts, a.data, a.prev) != (b.hosts, b.data, b.prev):
            assert b.epoch > a.epoch
        else:
            assert b.epoch == a.epoch


# --- stale records ----------------------------------------------------------------------------


def test_stale_records(reg):
    assert reg.list_stale() == []
    reg.mark_stale("lin", 3, ["h1", "h2"], 5)
    reg.mark_stale("lin", 10, ["h1"], 1)
    reg.mark_stale("lin/x", 3, ["h3"], 2)  # a lineage that extends another's name
    reg.mark_stale("li", 3, ["h3"], 2)
    assert reg.list_stale("lin") == [
        StaleRecord("lin", 3, "h1", 5), StaleRecord("lin", 3, "h2", 5), StaleRecord("lin", 10, "h1", 1)]
    assert len(reg.list_stale()) == 5
    reg.mark_stale("lin", 3, ["h1"], 7)  # a newer miss raises the version
    assert StaleRecord("lin", 3, "h1", 7) in reg.list_stale("lin")
    assert not reg.clear_stale("lin", 3, "h1", version=5)  # recovery copied v5, v7 is still missing
    # a mark from a host whose clock is behind still moves the record: a resync that read
    # 7 before it must not clear it
    reg.mark_stale("lin", 3, ["h1"], 6)
    assert StaleRecord("lin", 3, "h1", 8) in reg.list_stale("lin")
    assert not reg.clear_stale("lin", 3, "h1", version=7)
    assert reg.clear_stale("lin", 3, "h1", version=8)
    assert reg.clear_stale("lin", 3, "h2")
    assert not reg.clear_stale("lin", 3, "h9")  # absent: no-op
    assert reg.list_stale("lin") == [StaleRecord("lin", 10, "h1", 1)]
    assert reg.list_stale("lin/x") == [StaleRecord("lin/x", 3, "h3", 2)]


# --- unavailability ---------------------------------------------------------------------------


def test_etcd_closed_port_is_registry_unavailable():
    port = free_port()
    r = open_registry(f"etcd://127.0.0.1:{port}")
    with pytest.raises(RegistryUnavailable) as e:
        r.get_volume("v")
    msg = str(e.value)
    assert f"etcd://127.0.0.1:{port}" in msg and "connect" in msg
    assert e.value.__cause__ is None  # no raw httpx traceback chained
    assert e.value.__context__ is None or e.value.__suppress_context__
    r.close()


def test_etcd_failover_between_endpoints(etcd_server):
    etcd_server.wipe()
    dead = f"127.0.0.1:{free_port()}"
    r = open_registry(f"etcd://{dead},{etcd_server.endpoint}")
    try:
        r.create_volume("v", {"n": 1})
        assert r.get_volume("v") == {"n": 1}
        assert r.next_id("c") == 1
    finally:
        r.close()


def test_etcd_stopped_is_registry_unavailable(etcd_factory):
    e = etcd_factory()
    r = open_registry(e.url)
    try:
        r.create_volume("v", {"n": 1})
        e.stop()
        for call in (lambda: r.get_volume("v"), lambda: r.cluster_map(),
                     lambda: r.update_volume("v", lambda x: x), lambda: r.acquire_lease("v", "a", 5)):
            with pytest.raises(RegistryUnavailable, match=e.url.replace(".", r"\.")):
                call()
    finally:
        r.close()


def test_lmdb_unusable_dir_is_registry_unavailable(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a directory")
    with pytest.raises(RegistryUnavailable, match="lmdb://"):
        open_registry(f"lmdb://{f}/sub")
    with pytest.raises(RegistryUnavailable, match="does not exist"):
        open_registry(f"lmdb://{tmp_path}/missing/registry")
    assert not (tmp_path / "missing").exists()
    open_registry(f"lmdb://{tmp_path}/registry").close()  # the last component is created


# --- LMDB: several processes at once -------------------------------------------------------------


def _lmdb_writer(url: str, i: int, n: int) -> None:
    r = open_registry(url)
    for k in range(n):
        r.update_volume("v", lambda rec: {"n": rec["n"] + 1})
        r.next_id("ids")
        r.mark_stale("lin", k, [f"p{i}"], k)
        r.register_host(host(i), 30)
    r.close()


def test_lmdb_two_processes_write_at_once(tmp_path):
    url = f"lmdb://{tmp_path / 'registry'}"
    reg = open_registry(url)
    reg.create_volume("v", {"n": 0})
    ctx = multiprocessing.get_context("spawn")
    n = 150
    procs = [ctx.Process(target=_lmdb_writer, args=(url, i, n)) for i in range(2)]
    for p in procs:
        p.start()
    # this process writes at the same time too
    for _ in range(n):
        reg.update_volume("v", lambda rec: {"n": rec["n"] + 1})
        reg.next_id("ids")
    for p in procs:
        p.join(50)
        assert p.exitcode == 0
    assert reg.get_volume("v")["n"] == 3 * n
    assert reg.next_id("ids") == 3 * n + 1
    assert len(reg.list_stale("lin")) == 2 * n
    assert [h.id for h in reg.cluster_map().hosts] == ["h0", "h1"]
    reg.close()


def test_data_set_compare_and_set_and_remove_guard(reg):
    reg.register_host(host(1), 30)
    reg.register_host(host(2), 30)
    m = reg.cluster_map()
    assert m.data is None and m.data_set == ("h1", "h2") and not m.migrating
    m1 = reg.set_data_set(0, ["h2", "h1"], None)
    assert (m1.data, m1.prev, m1.mgen) == (("h1", "h2"), None, 1) and m1.epoch > m.epoch
    m2 = reg.set_data_set(1, ["h1"], ["h1", "h2"])  # h2 leaves
    assert m2.migrating and m2.data == ("h1",) and m2.prev == ("h1", "h2") and m2.epoch > m1.epoch
    assert reg.set_data_set(1, ["h2"], None) == m2  # lost race: the winner's set stays
    with pytest.raises(InvalidArgument, match="is in the data set"):
        reg.remove_host("h2")  # still in the set the change leaves
    reg.set_data_set(2, ["h1"], None)
    reg.mark_scanned("h1", 3)
    assert reg.scanned() == {"h1": 3}
    assert [h.id for h in reg.remove_host("h2").hosts] == ["h1"]


def test_data_set_weight_factors(reg):
    """Weight factors are part of the data set record: set with it by compare-and-set,
    kept for the set being left, canonical (factors of 1 and of hosts outside the set are
    left out), and a change of them alone is a new map."""
    for i in (1, 2, 3):
        reg.register_host(host(i), 30)
    m1 = reg.set_data_set(0, ["h1", "h2", "h3"], None)
    assert m1.weights == () and m1.factors == {}
    m2 = reg.set_data_set(1, ["h1", "h2", "h3"], ["h1", "h2", "h3"],
                          {"h3": 0.5, "h1": 1.0, "h9": 0.2}, {})
    assert m2.migrating and m2.weights == (("h3", 0.5),) and m2.prev_weights == ()
    assert m2.epoch > m1.epoch and reg.cluster_map() == m2
    m3 = reg.set_data_set(2, ["h1", "h2"], ["h1", "h2", "h3"], m2.factors, {"h2": 0.8})
    assert m3.weights == () and m3.prev_factors == {"h2": 0.8}  # h3 left: its factor with it
    m4 = reg.set_data_set(3, ["h1", "h2"], None, {"h2": 0.25})
    assert (m4.factors, m4.prev_weights) == ({"h2": 0.25}, ())
    assert reg.set_data_set(3, ["h1"], None) == m4  # lost race


def test_data_set_records_what_placement_weighs(reg):
    """The data set record keeps each host's capacity, zone and pod as placement weighs
    them: a host registered again with others changes its record (and the epoch), not
    what its chunks are placed by; a record of older code has none (hosts placed by their
    live records)."""
    for i in (1, 2, 3):
        reg.register_host(host(i), 30)
    m1 = reg.set_data_set(0, ["h1", "h2", "h3"], None)
    live = {h.id: (h.capacity, h.zone, h.pod) for h in m1.hosts}
    assert m1.places_recorded and m1.placed() == live and m1.drifted() == ()
    grown = dataclasses.replace(host(3), capacity=4 * host(3).capacity, zone="z9")
    m2 = reg.register_host(grown, 30)
    assert m2.epoch > m1.epoch and m2.mgen == m1.mgen and m2.host("h3").capacity == grown.capacity
    assert m2.placed() == live and m2.drifted() == ("h3",)
    assert {h.id: (h.capacity, h.zone) for h in m2.placed_hosts()}["h3"] == live["h3"][:2]
    # a change to the new inputs: prev keeps the old ones (explicit), the target takes the live
    m3 = reg.set_data_set(1, ["h1", "h2"], ["h1", "h2", "h3"], places=None, prev_places=live)
    assert m3.placed(leaving=True)["h3"] == live["h3"] and m3.placed()["h1"] == live["h1"]
    assert m3.places_recorded and reg.cluster_map() == m3
    m4 = reg.set_data_set(2, ["h1", "h2", "h3"], None, places={"h3": (7, "z7", "p7")})
    assert m4.placed()["h3"] == (7, "z7", "p7") and m4.placed()["h2"] == live["h2"]
    # a record written before the inputs were recorded
    reg.kv.txn([], [Put(K_DATASET, msgpack.packb({"hosts": ["h1", "h2", "h3"], "prev": None, "gen": 4}))])
    old = reg.cluster_map()
    assert old.places == () and not old.places_recorded and old.drifted() == ()
    assert old.placed()["h3"] == (grown.capacity, "z9", grown.pod)


def test_scrub_request_and_results(reg):
    assert reg.scrub_request() is None
    rid = reg.request_scrub(["h2", "h1"], volume="v")
    req = reg.scrub_request()
    assert (req["id"], req["volume"], req["hosts"]) == (rid, "v", ["h1", "h2"])
    reg.put_scrub_result(rid, "h1", {"state": "running", "chunks_done": 1})
    reg.put_scrub_result(rid, "h1", {"state": "done", "errors": {"checksum": 2}})
    reg.put_scrub_result(rid, "h2", {"state": "failed", "error": "x"})
    assert reg.scrub_results(rid) == {"h1": {"state": "done", "errors": {"checksum": 2}},
                                      "h2": {"state": "failed", "error": "x"}}
    rid2 = reg.request_scrub(["h1"])
    assert rid2 > rid and reg.scrub_results(rid) == {} and reg.scrub_request()["volume"] == ""


def test_lease_tokens_survive_release_and_expiry(reg):
    assert reg.lease_tokens() == {}
    a = reg.acquire_lease("v1", "h1", 30)
    b = reg.acquire_lease("v2", "h2", 0.01)
    reg.release_lease(a)
    wait_run_out(reg, "v2")
    c = reg.acquire_lease("v2", "h3", 30)  # takeover after expiry: a newer token
    assert reg.lease_tokens() == {"v1": a.token, "v2": c.token} and c.token > b.token


def test_a_lease_that_ran_out_unreleased_is_orphaned(reg):
    assert not reg.lease_orphaned("v")
    lease = reg.acquire_lease("v", "gw1", 30)
    assert not reg.lease_orphaned("v")  # held
    reg.release_lease(lease)
    assert not reg.lease_orphaned("v")  # released
    assert reg.orphaned_lease("v") is None
    ran_out = reg.acquire_lease("v", "gw1", 0.001)
    wait_run_out(reg, "v")
    assert reg.lease_orphaned("v")  # ran out: its holder stopped renewing
    assert (reg.orphaned_lease("v").holder, reg.orphaned_lease("v").token) == ("gw1", ran_out.token)
    taken = reg.acquire_lease("v", "gw2", 30)
    assert taken.taken_over
    assert not reg.lease_orphaned("v") and reg.orphaned_lease("v") is None
    reg.release_lease(taken, reconciled=False)  # handed back owing the reconcile
    assert (reg.orphaned_lease("v").holder, reg.orphaned_lease("v").token) == ("", taken.token)


def test_a_never_current_stale_record_keeps_its_flag_and_still_moves_up(reg):
    from vbp.registry.base import NEVER_CURRENT

    reg.mark_stale("lin", 1, ["h1"], NEVER_CURRENT | 100)
    reg.mark_stale("lin", 1, ["h1"], 50)  # a failure by a clock behind: one up, flag kept
    assert reg.list_stale("lin")[0].version == NEVER_CURRENT | 101
    reg.mark_stale("lin", 1, ["h1"], 200)  # a newer failure raises it, the flag stays
    assert reg.list_stale("lin")[0].version == NEVER_CURRENT | 200
    assert reg.clear_stale("lin", 1, "h1", NEVER_CURRENT | 101) is False  # re-marked meanwhile
    assert reg.clear_stale("lin", 1, "h1", NEVER_CURRENT | 200) is True


def test_a_lost_unsynced_flag_stays_with_the_never_current_one_until_the_record_goes(reg):
    from vbp.registry.base import LACKS_EARLIER, NEVER_CURRENT

    reg.mark_stale("lin", 1, ["h1"], 100)  # a gateway's failure
    reg.mark_stale("lin", 1, ["h1"], LACKS_EARLIER | 150)  # then its crash recovery, rebooted
    assert reg.list_stale("lin")[0].version == LACKS_EARLIER | 150
    reg.mark_stale("lin", 1, ["h1"], 120)  # a later failure by a clock behind: one up, kept
    assert reg.list_stale("lin")[0].version == LACKS_EARLIER | 151
    reg.mark_stale("lin", 1, ["h1"], NEVER_CURRENT | 200)  # both flags, one order
    assert reg.list_stale("lin")[0].version == LACKS_EARLIER | NEVER_CURRENT | 200
    assert reg.clear_stale("lin", 1, "h1", LACKS_EARLIER | NEVER_CURRENT | 200) is True
    reg.mark_stale("lin", 1, ["h1"], 300)  # a new record: no flag carried over
    assert reg.list_stale("lin")[0].version == 300


def test_a_mark_of_several_copies_moves_them_in_one_transaction(reg):
    """One failure's copies are marked together: a resync reading the records never sees
    one copy's mark without the others' (it could take a copy that missed the write as
    its source, copy its older bytes and clear). A mark that loses a race with another
    (a record moved between the read and the transaction) is made again on the new
    records, still in one piece."""
    reg.mark_stale("lin", 4, ["h2"], 50)
    kv = reg.kv
    real_txn = kv.txn
    txns: list = []
    raced: list = []

    def txn(compares, ops):
        if not raced:  # another gateway's mark of h2 lands first
            raced.append(True)
            reg.mark_stale("lin", 4, ["h2"], 60)
        ok, rev = real_txn(compares, ops)
        txns.append((ok, len(ops)))
        return ok, rev

    kv.txn = txn
    try:
        reg.mark_stale("lin", 4, ["h1", "h2", "h3", "h1"], 55)
    finally:
        kv.txn = real_txn
    versions = {r.host_id: r.version for r in reg.list_stale("lin", 4)}
    assert versions == {"h1": 55, "h2": 61, "h3": 55}
    # (the raced mark of h2 updates its record: one op; the three copies' marks create
    # two records, which puts the stale sequence too: set_data_set's stale_seq)
    assert txns[0] == (True, 1) and txns[1:] == [(False, 4), (True, 4)]


def test_a_volume_created_from_another_checks_it_in_the_same_transaction(reg):
    """create_from (a clone): the new record is made from the parent's as read, and the
    create fails over to a new read when the parent changed meanwhile."""
    reg.create_volume("p", {"name": "p", "snaps": ["s"]})

    def make(d):
        if "s" not in d["snaps"]:
            raise NotFound("snapshot s is gone")
        return {"name": "c", "from": d["snaps"]}

    assert reg.create_from("c", "p", make) == {"name": "c", "from": ["s"]}
    assert reg.get_volume("c") == {"name": "c", "from": ["s"]}
    with pytest.raises(AlreadyExists):
        reg.create_from("c", "p", make)
    with pytest.raises(NotFound):
        reg.create_from("d", "nope", make)
    seen: list = []

    def changed_meanwhile(d):
        if not seen:  # the parent changes between this read and the transaction
            reg.update_volume("p", lambda r: {**r, "snaps": []})
        seen.append(d["snaps"])
        return make(d)

    with pytest.raises(NotFound):
        reg.create_from("d", "p", changed_meanwhile)
    assert seen == [["s"], []]
    with pytest.raises(NotFound):
        reg.get_volume("d")


def _counters(reg) -> dict[str, int]:
    """The id counters stored: counter name -> last id handed out."""
    items, _ = reg.kv.range(b"vbp/ctr/")
    return {it.key[len(b"vbp/ctr/"):].decode(): msgpack.unpackb(it.value) for it in items}


def test_a_volume_and_its_counters_are_created_together_or_not_at_all(reg):
    """A new lineage's generation counter is created in the create's transaction: a
    create refused (the name taken, or the counter there already) leaves none behind and
    changes none. It was drawn (next_id) before the create, and stayed when that failed."""
    reg.create_volume("a", {"name": "a", "lineage": "L1"}, counters={"gen/L1": 1})
    assert _counters(reg) == {"gen/L1": 1}
    assert reg.next_id("gen/L1") == 2  # (the counter holds the last one handed out)
    with pytest.raises(AlreadyExists, match="volume a already exists"):
        reg.create_volume("a", {"name": "a", "lineage": "L2"}, counters={"gen/L2": 1})
    with pytest.raises(AlreadyExists, match="counter gen/L1"):
        reg.create_volume("b", {"name": "b", "lineage": "L1"}, counters={"gen/L1": 1})
    assert _counters(reg) == {"gen/L1": 2}
    assert reg.list_volumes() == [{"name": "a", "lineage": "L1"}]


def test_the_last_delete_of_a_lineage_removes_its_generation_counter(reg):
    """A lineage's generation counter goes with its last volume (a clone left keeps it).
    The counter of a lineage that never had a volume stays: the code before drew it
    before it created the record (a create that failed then left it; one under way is
    about to have its volume). Other counters stay. The counters here are drawn with
    next_id, as the code before did."""
    for name, lineage in (("p", "L1"), ("c", "L1"), ("x", "L2")):
        reg.next_id(f"gen/{lineage}")
        reg.create_volume(name, {"name": name, "lineage": lineage})
    reg.next_id("gen/L9")  # (its volume's create failed, or is under way)
    reg.next_id("scrub")
    reg.next_id("gen")  # (not a lineage's: no `gen/`)
    assert set(_counters(reg)) == {"gen/L1", "gen/L2", "gen/L9", "scrub", "gen"}
    reg.delete_volume("p")
    assert _counters(reg) == {"gen/L1": 2, "gen/L2": 1, "gen/L9": 1, "scrub": 1, "gen": 1}
    reg.delete_volume("c")
    assert _counters(reg) == {"gen/L2": 1, "gen/L9": 1, "scrub": 1, "gen": 1}
    reg.delete_volume("x")
    assert _counters(reg) == {"gen/L9": 1, "scrub": 1, "gen": 1}


class _AfterRange:
    """A KV that calls `after(prefix)` after each range it answers (a registry call's
    reads with other calls between them)."""

    def __init__(self, kv, after):
        self.kv, self.after = kv, after
        self.url = kv.url

    def range(self, prefix):
        out = self.kv.range(prefix)
        self.after(prefix)
        return out

    def __getattr__(self, name):
        return getattr(self.kv, name)


def test_a_delete_keeps_the_counter_of_a_volume_created_while_it_sweeps(reg):
    """The sweep after a delete reads the counters, then the volumes: a volume created
    between or after the reads has its record in the second, or its counter was not in
    the first (made with the record). Read the other way round, the counter of one
    created between them was found with no volume and removed, and its lineage handed
    out its generations again. Here a volume is created after every read."""
    reg.create_volume("old", {"name": "old", "lineage": "L0"}, counters={"gen/L0": 1})
    made: list = []

    def create(prefix):
        lineage = f"N{len(made)}"
        made.append(prefix)
        reg.create_volume(lineage, {"name": lineage, "lineage": lineage}, counters={f"gen/{lineage}": 1})

    Registry(_AfterRange(reg.kv, create)).delete_volume("old")
    assert len(made) >= 2 and b"vbp/vol/" in made  # (a create after each read of the sweep)
    assert _counters(reg) == {f"gen/N{i}": 1 for i in range(len(made))}  # L0's gone


def test_a_delete_keeps_a_counter_drawn_from_while_it_sweeps(reg):
    """A counter drawn from between the sweep's reads (a clone or a snapshot that read
    the lineage's volume before the delete, refused at its commit) is kept: its removal
    compares the revision read. The next delete removes it."""
    reg.create_volume("old", {"name": "old", "lineage": "L0"}, counters={"gen/L0": 1})
    reg.create_volume("other", {"name": "other", "lineage": "L1"}, counters={"gen/L1": 1})
    drawn: list = []

    def draw(prefix):
        if prefix == b"vbp/vol/" and not drawn:
            drawn.append(reg.next_id("gen/L0"))

    Registry(_AfterRange(reg.kv, draw)).delete_volume("old")
    assert drawn == [2] and _counters(reg) == {"gen/L0": 2, "gen/L1": 1}
    reg.delete_volume("other")
    assert _counters(reg) == {}


def test_a_lease_handed_back_without_its_takeovers_reconcile_is_still_a_takeover(reg):
    """`vbp volume snapshot` takes an orphaned lease to complete a snapshot and hands it
    back without comparing the copies (it is no gateway): the next grant is a takeover
    still, so the gateway that gets it reconciles. A lease handed back as usual is not."""
    held = reg.acquire_lease("v", "gw1", 0.01)
    wait_run_out(reg, "v")
    assert reg.lease_orphaned("v")
    control = reg.acquire_lease("v", "control", 30)
    assert control.taken_over
    reg.release_lease(control, reconciled=False)
    assert reg.lease_orphaned("v") and reg.get_lease("v") is None
    gw2 = reg.acquire_lease("v", "gw2", 30)
    assert gw2.taken_over and gw2.token > control.token > held.token
    assert not reg.lease_orphaned("v")
    reg.release_lease(gw2)
    assert not reg.lease_orphaned("v")
    assert not reg.acquire_lease("v", "gw3", 30).taken_over


def test_history_is_compacted_and_current_values_stay(reg, url):
    """compact_history drops what etcd keeps of older values (etcd refuses every write
    once its database is full, and each heartbeat rewrites a host's keys); the current
    values stay, and compacting to a revision compacted already is no error. The other
    backends keep no history: a no-op."""
    reg.create_volume("v", {"name": "v", "n": 1})
    reg.update_volume("v", lambda d: {**d, "n": 2})
    rev = reg.revision()
    reg.update_volume("v", lambda d: {**d, "n": 3})
    reg.compact_history(rev)
    reg.compact_history(rev)
    assert reg.get_volume("v") == {"name": "v", "n": 3}
    if url.startswith("etcd"):
        key = base64.b64encode(b"vbp/vol/v").decode()
        with pytest.raises(RegistryUnavailable, match="compacted"):
            reg.kv._call("kv/range", {"key": key, "revision": str(rev - 1)})
        reg.kv._call("kv/range", {"key": key, "revision": str(rev)})


def test_a_change_at_the_revision_history_is_compacted_to_is_still_told(reg, url):
    """A watcher that read revision K-1 is told of a change at K even once the history
    was compacted to K: etcd (3.4) drops a delete made at the revision compacted to, and
    a watch from K neither told it nor was cancelled as compacted (the stale record's
    clearing, a host's alive key going: missed until the next full read). Told, or
    answered "read everything again" (None, True). A quiet wait still says nothing."""
    reg.mark_stale("lin", 0, ["h1"], 5)
    before = reg.revision()
    if url.startswith("etcd"):  # (the local stores' wait always asks for a read)
        assert reg.kv.wait(P_STALE, before, 0.3) is False
    assert reg.stale_changes(before, 0.3) == (set(), before)
    assert reg.clear_stale("lin", 0, "h1")  # the delete, at K
    k = reg.revision()
    reg.compact_history(k)
    if url.startswith("etcd"):
        time.sleep(0.5)  # (etcd drops the old revisions in the background)
    told, _rev = reg.stale_changes(before, 1.0)
    assert told is None or "lin" in told, told
    assert reg.kv.wait(P_STALE, before, 1.0) is True


def test_a_scrub_request_clears_the_results_of_a_large_pool(reg):
    """A request drops the earlier request's results, one per host: with 130 hosts that
    is more operations than etcd takes in one transaction (128), and every request after
    was refused for good."""
    hosts = [f"h{i}" for i in range(130)]
    first = reg.request_scrub(hosts)
    for h in hosts:
        reg.put_scrub_result(first, h, {"state": "done"})
    assert len(reg.scrub_results(first)) == 130
    second = reg.request_scrub(hosts)
    assert reg.scrub_request()["id"] == second > first
    assert reg.scrub_results(first) == {} and reg.scrub_results(second) == {}


class _Beating:
    """Two registries on a wiped etcd with hosts h1 (liveness for 30 s) and h2 (for
    `h2_ttl`): `reg`, whose cluster reads (kv.range) are counted in `reads`, and another
    that renews both hosts' liveness every `every` seconds until `stop()`."""

    def __init__(self, etcd_server, every: float, h2_ttl: float = 30) -> None:
        etcd_server.wipe()
        self.reg = open_registry(etcd_server.url)
        self.beats = open_registry(etcd_server.url)
        self.reg.register_host(host(1), 30)
        self.map = self.reg.register_host(host(2), h2_ttl)
        self.reads: list = []
        real_range = self.reg.kv.range

        def counting_range(prefix):
            self.reads.append(prefix)
            return real_range(prefix)

        self.reg.kv.range = counting_range
        self._stop = threading.Event()

        def heartbeat():
            while not self._stop.is_set():
                self.beats.heartbeat("h1", 30)
                self.beats.heartbeat("h2", h2_ttl)
                time.sleep(every)

        self._thread = threading.Thread(target=heartbeat)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def close(self) -> None:
        self.stop()
        self.reg.close()
        self.beats.close()


def test_a_map_watcher_on_etcd_reads_the_cluster_only_when_it_changed(etcd_server):
    """blockd's map watcher read every host's record and liveness key once a second on
    every host, changed or not: N hosts, N² records a second (1,000 hosts: 2 million).
    etcd tells every change that matters by an event (a record written, a liveness key
    expired: a delete), so a watcher reads the cluster once, then only for such an event.
    (LMDB and the memory store tell no expiry: they read again every second, as before.)"""
    b = _Beating(etcd_server, every=0.05, h2_ttl=2)
    try:
        m = b.map
        assert b.reg.wait_map_change(m.epoch, 3.5).epoch == m.epoch
        assert len(b.reads) == 1, b.reads
        b.stop()
        got = b.reg.wait_map_change(m.epoch, 30.0)  # h2 stops: its liveness key expires
        assert got.epoch > m.epoch and got.host("h2").state == "down"
    finally:
        b.close()


def test_heartbeats_of_live_hosts_do_not_wake_a_map_watcher_on_etcd(etcd_server):
    """Every host's heartbeat refreshes its liveness key under the cluster prefix; each
    woke every host's map watcher into two reads of the cluster (N hosts: N² reads a
    period). A refresh changes no map: the watcher reads again only for a real change,
    which still ends the wait at once."""
    b = _Beating(etcd_server, every=0.02)
    later = None
    try:
        m = b.map
        assert b.reg.wait_map_change(m.epoch, 2.0).epoch == m.epoch
        assert 1 <= len(b.reads) <= 6, len(b.reads)  # not one per heartbeat
        # a real change ends the wait before its timeout
        later = threading.Timer(0.3, lambda: b.beats.register_host(host(3), 30))
        later.start()
        got = b.reg.wait_map_change(m.epoch, 30.0)
        assert got.epoch > m.epoch and got.host("h3") is not None
    finally:
        if later is not None:  # (its register_host reads the map after its write: the
            later.join()  # wait above can end first, and a close then failed that read)
        b.close()


def test_heartbeats_keep_the_liveness_key_alive_with_no_event_on_etcd(etcd_server):
    """A heartbeat wrote the host's liveness key: on etcd an event to every watcher of the
    cluster prefix, every host's map watcher (N hosts: N² a period, each filtered out by
    the watcher itself), and a lease granted each time. Its lease is kept alive now:
    heartbeats past the key's first time-to-live leave it as written at registration,
    and a watch of the liveness keys is told nothing. Stats are still published; a key
    that lapsed is written again by the next heartbeat, an event (the host is back)."""
    etcd_server.wipe()
    reg = open_registry(etcd_server.url)
    try:
        ttl = max(2.0, reg.kv.ttl_floor())
        reg.register_host(host(1), ttl)
        first, rev = reg.kv.get(b"vbp/cluster/alive/h1")
        deadline = time.monotonic() + 2 * ttl
        n = 0
        while time.monotonic() < deadline:
            n += 1
            reg.heartbeat("h1", ttl, {"used": n})
            time.sleep(ttl / 4)
        assert reg.kv.get(b"vbp/cluster/alive/h1")[0] == first
        assert reg.kv.changes(b"vbp/cluster/alive/", rev, 0.5) == ([], rev)
        assert reg.cluster_map().host("h1").state == "up"
        assert reg.host_stats()["h1"] == {"used": n}
        reg.kv.txn([], [Put(b"vbp/cluster/alive/h1", b"1")])  # (now without a lease)
        _, before = reg.kv.get(b"vbp/cluster/alive/h1")
        reg.heartbeat("h1", ttl)  # nothing to keep alive: written again, with a lease
        again, _ = reg.kv.get(b"vbp/cluster/alive/h1")
        assert again.mod_rev > before
        assert reg.kv.keep_alive(b"vbp/cluster/alive/h1", ttl)
    finally:
        reg.close()


def test_stats_join_the_kept_lease_and_a_lease_gone_is_granted_again_on_etcd(etcd_server):
    """The stats a heartbeat publishes join the lease its liveness key is kept alive on
    (a grant of its own each time, and its expiry, were two raft proposals a host and
    heartbeat). Should that lease be gone by then (revoked here, or run out while the
    host was away), etcd refuses the put whole, and the heartbeat is written again on a
    lease granted for it: the host stays up with its stats."""
    etcd_server.wipe()
    reg = open_registry(etcd_server.url)
    try:
        ttl = max(2.0, reg.kv.ttl_floor())
        reg.register_host(host(1), ttl)
        reg.heartbeat("h1", ttl, {"used": 1})
        lease = base64.b64encode(b"vbp/cluster/alive/h1").decode()
        alive = reg.kv._call("kv/range", {"key": lease})["kvs"][0]["lease"]
        stats = reg.kv._call("kv/range", {"key": base64.b64encode(b"vbp/stats/h1").decode()})
        assert stats["kvs"][0]["lease"] == alive  # (joined: no grant of its own)
        reg.kv._call("lease/revoke", {"ID": alive})  # (its keys go with it)
        assert reg.kv.get(b"vbp/cluster/alive/h1")[0] is None
        reg.heartbeat("h1", ttl, {"used": 2})
        assert reg.cluster_map().host("h1").state == "up"
        assert reg.host_stats()["h1"] == {"used": 2}
        now = reg.kv._call("kv/range", {"key": lease})["kvs"][0]["lease"]
        assert now != alive
    finally:
        reg.close()


def test_a_renewal_keeps_the_lease_of_its_liveness_key_alive_on_etcd(etcd_server, monkeypatch):
    """A lease renewal grants no etcd lease while its liveness key lives: it keeps the
    key's lease alive and puts the key again on it (a grant each renewal, and the lease it
    replaced expiring later, were two raft proposals more an open volume and renewal). A
    key run out, or revoked here, is put on a lease granted for it; a release forgets the
    key's lease."""
    from vbp.registry.base import P_LEASE_LIVE

    etcd_server.wipe()
    reg = open_registry(etcd_server.url)
    try:
        key = base64.b64encode(P_LEASE_LIVE + b"v").decode()
        lease_of_key = lambda: reg.kv._call("kv/range", {"key": key})["kvs"][0]["lease"]  # noqa: E731
        a = reg.acquire_lease("v", "gw-a", 30.0)
        granted = lease_of_key()
        grants = []
        real = reg.kv._grant
        monkeypatch.setattr(reg.kv, "_grant", lambda ttl: grants.append(ttl) or real(ttl))
        for _ in range(3):
            a = reg.renew_lease(a, 30.0)
        assert grants == [] and lease_of_key() == granted and reg.get_lease("v") == a
        reg.kv._call("lease/revoke", {"ID": granted})  # (the key goes with it)
        assert reg.get_lease("v") is None
        a = reg.renew_lease(a, 30.0)
        assert grants == [30.0] and lease_of_key() != granted and reg.get_lease("v") == a
        reg.release_lease(a)
        assert reg.get_lease("v") is None and P_LEASE_LIVE + b"v" not in reg.kv._kept
    finally:
        reg.close()


@pytest.mark.parametrize("how", ["taken-over", "released-elsewhere"])
def test_a_kept_lease_is_forgotten_once_its_key_is_no_longer_ours_on_etcd(etcd_server, how):
    """EtcdKV remembers the lease of each key it keeps alive (_kept), for the puts that
    join it. A write lease's liveness key, kept alive by gw-a's renewals, then taken over
    by gw-b after it ran out (a migration, a failover), or released by another client: it
    is no longer gw-a's, and gw-a never touches it again (its renewal is Fenced first).
    Its entry stayed for the life of the process, one more for each such volume. It goes
    once the lease it names has run out unrenewed, at the next keep-alive of any key (the
    heartbeat's); a key put again on a lease of its own, or deleted, here goes at once."""
    from vbp.registry.base import P_LEASE_LIVE

    etcd_server.wipe()
    a, b = open_registry(etcd_server.url), open_registry(etcd_server.url)
    lkey = P_LEASE_LIVE + b"v"
    try:
        ttl = max(1.0, a.kv.ttl_floor())
        a.register_host(host(1), 30.0)
        a.heartbeat("h1", 30.0, {"used": 1})
        lease = a.renew_lease(a.acquire_lease("v", "gw-a", ttl), ttl)
        assert lkey in a.kv._kept  # (kept alive: its lease remembered)
        if how == "taken-over":
            deadline = time.monotonic() + ttl + 5
            while a.get_lease("v") is not None:  # (run out unrenewed)
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert b.acquire_lease("v", "gw-b", 30.0).taken_over
        else:
            b.release_lease(lease)
            time.sleep(ttl + 0.5)  # (what gw-a kept alive runs out meanwhile)
        a.heartbeat("h1", 30.0, {"used": 2})
        assert lkey not in a.kv._kept
        assert set(a.kv._kept) == {b"vbp/cluster/alive/h1"}
        # a key put again here on a lease of its own: the one kept is forgotten at once
        a.kv._kept[lkey] = (30, "1234", time.monotonic() + 30)
        a.kv.txn([], [Put(lkey, b"x", 30.0)])
        assert lkey not in a.kv._kept
    finally:
        a.close()
        b.close()


def test_a_stale_record_is_cleared_only_while_what_was_judged_is_unchanged(reg):
    """clear_stale_unless_changed (vbp volume accept-loss): one transaction removes the
    record and rewrites the lineage's loss record (vbp/loss/<lineage>); a record of the
    chunk moved, a record made for a copy judged without one, the volume's record, the
    loss record or the data set changed since the read make it decide again. Another
    volume of the lineage (a clone) changing does not: the transaction compares a
    bounded set of keys, however many volumes the lineage has."""
    from vbp.registry.base import LossVerdict

    reg.create_volume("v", {"name": "v", "lineage": "lin", "n": 0})
    reg.create_volume("c", {"name": "c", "lineage": "lin", "n": 0})
    reg.mark_stale("lin", 2, ["h1"], 5)
    reg.mark_stale("lin", 2, ["h2"], 6)
    reg.mark_stale("lin", 3, ["h2"], 6)
    assert reg.get_losses("lin") is None and reg.list_losses() == {}
    seen: list = []
    meanwhile = [lambda: reg.mark_stale("lin", 2, ["h1"], 9),
                 lambda: reg.mark_stale("lin", 2, ["h3"], 7),  # judged, had no record
                 lambda: reg.update_volume("v", lambda d: {**d, "n": 1}),
                 lambda: reg.set_data_set(reg.cluster_map().mgen, ["h1", "h2"], None),
                 lambda: reg.update_volume("c", lambda d: {**d, "n": 1})]  # not compared

    def decide(records, cmap, vol, losses):
        seen.append((sorted((r.host_id, r.version) for r in records), vol["n"], losses))
        if meanwhile:
            meanwhile.pop(0)()
        return LossVerdict("h2", {"losses": [len(seen)]}, "done", judged=("h1", "h2", "h3", "h4"))

    assert reg.clear_stale_unless_changed("lin", 2, "v", decide) == "done"
    # one decision more per change that matters; the clone's changed under the last
    assert len(seen) == 5 and seen[-1] == ([("h1", 9), ("h2", 6), ("h3", 7)], 1, None)
    assert [(r.index, r.host_id) for r in reg.list_stale("lin")] == [(2, "h1"), (2, "h3"), (3, "h2")]
    assert reg.get_losses("lin") == {"losses": [5]} and reg.list_losses() == {"lin": {"losses": [5]}}
    assert reg.get_volume("v")["n"] == 1 and reg.get_volume("c")["n"] == 1

    # the loss record changed meanwhile (another accept-loss of the lineage): again
    reg.mark_stale("lin", 3, ["h1"], 6)
    calls: list = []

    def decide2(records, cmap, vol, losses):
        calls.append(losses)
        if len(calls) == 1:
            reg.clear_stale_unless_changed("lin", 2, "v", lambda *a: LossVerdict(
                "h1", {"losses": ["other"]}, "other"))
        return LossVerdict("h2", {"losses": (losses or {}).get("losses", []) + ["mine"]}, "ok")

    assert reg.clear_stale_unless_changed("lin", 3, "v", decide2) == "ok"
    assert calls == [{"losses": [5]}, {"losses": ["other"]}]
    assert reg.get_losses("lin") == {"losses": ["other", "mine"]}
    assert [(r.index, r.host_id) for r in reg.list_stale("lin")] == [(2, "h3"), (3, "h1")]

    seen_vol: list = []
    assert reg.clear_stale_unless_changed("lin", 2, "gone", lambda r, m, v, l: seen_vol.append(v)) is None
    assert seen_vol == [None]
    with pytest.raises(InvalidArgument):  # the record to remove must be there
        reg.clear_stale_unless_changed("lin", 2, "v", lambda *_: LossVerdict("h2", {}, "x"))
    assert [(r.index, r.host_id) for r in reg.list_stale("lin")] == [(2, "h3"), (3, "h1")]
    assert reg.get_losses("lin") == {"losses": ["other", "mine"]}


def test_leases_of_deleted_volumes(reg):
    """A live lease whose volume's record is gone, or whose record was made again under
    the name after the grant, is listed (GC holds off while its holder may still serve
    the deleted chain); a lease of the record there, or released, is not."""
    reg.create_volume("a", {"name": "a"})
    reg.create_volume("b", {"name": "b"})
    reg.create_volume("c", {"name": "c"})
    la = reg.acquire_lease("a", "h1", 30.0)
    lb = reg.acquire_lease("b", "h1", 30.0)
    lc = reg.acquire_lease("c", "h1", 30.0)
    assert reg.leases_of_deleted() == []
    reg.delete_volume("a")
    reg.delete_volume("b")
    reg.create_volume("b", {"name": "b"})  # another volume under the name
    reg.release_lease(lc)
    reg.delete_volume("c")
    assert sorted(lease.volume for lease in reg.leases_of_deleted()) == ["a", "b"]
    reg.release_lease(la)
    reg.release_lease(lb)
    assert reg.acquire_lease("b", "h2", 30.0).token > lb.token
    assert reg.leases_of_deleted() == []


def test_the_lease_records_of_deleted_volumes_are_forgotten(reg):
    """A deleted volume's lease record goes once handed back, or run out longer ago than
    asked; a live one, or one whose volume is there, stays; a new volume of the name gets
    a greater token all the same."""
    for n in "abcd":
        reg.create_volume(n, {"name": n})
    la = reg.acquire_lease("a", "h1", 30.0)
    reg.release_lease(la)  # handed back
    reg.acquire_lease("b", "h1", 0.05)  # runs out
    reg.acquire_lease("c", "h1", 30.0)  # held on
    reg.release_lease(reg.acquire_lease("d", "h1", 30.0))  # its volume stays
    for n in "abc":
        reg.delete_volume(n)
    wait_run_out(reg, "b")
    assert reg.forget_leases_of_deleted(60.0) == 1  # a; b ran out a moment ago
    assert set(reg.lease_tokens()) == {"b", "c", "d"}
    assert reg.forget_leases_of_deleted(0.0) == 1  # b
    assert set(reg.lease_tokens()) == {"c", "d"}
    reg.create_volume("a", {"name": "a"})
    assert reg.acquire_lease("a", "h2", 30.0).token > la.token


def _rolling_record(name: str, taken: int, kept: int) -> dict:
    """The record of a volume that took `taken` snapshots and kept the last `kept` (hourly
    snapshots kept a week: 168). Each snapshot carries the chain it froze, and the chain
    gains a generation at every snapshot ever taken: the record grows with taken * kept."""
    from vbp.volume import Snapshot, new_volume

    rec = new_volume(name, 1 << 30, head=taken + 1, now=1.7e9)
    snaps = tuple(Snapshot(f"s{i}", i, tuple(range(1, i + 1)), 1.7e9 + i, 1 << 30)
                  for i in range(taken - kept + 1, taken + 1))
    return dataclasses.replace(rec, chain=tuple(range(1, taken + 2)), snapshots=snaps).to_dict()


def test_a_volume_record_too_large_for_the_registry_is_refused_naming_it(reg):
    """Deleting old snapshots does not stop a volume's record from growing: hourly
    snapshots kept a week pass etcd's 1.5 MiB request limit after about 3,100 taken.
    etcd then refused every update that grew it as "registry unavailable" (request is too
    large), and a snapshot got as far as a pending head, leaving its completion (by a
    gateway, writes held meanwhile) to fail again and again until the request timed out;
    the other backends stored it, to be refused once the pool moved to etcd. A record is
    refused before it is written, with the limit and the record named, and it stays
    usable: a snapshot deleted makes room."""
    from control import api

    d = _rolling_record("v", 3280, 168)  # 1,566,782 bytes: etcd takes it, not one snapshot more
    assert 1_560_000 < len(msgpack.packb(d, use_bin_type=True)) < 1_572_864 - 4_000
    reg.kv.txn([], [Put(b"vbp/vol/v", msgpack.packb(d, use_bin_type=True)),  # grown so far
                    Put(f"vbp/ctr/gen/{d['lineage']}".encode(), msgpack.packb(d["head"]))])
    with pytest.raises(InvalidArgument, match=r"volume v .*limit of \d+ bytes"):
        api.snapshot(reg, "v", "next", timeout=5)
    assert reg.get_volume("v") == d  # nothing pending: no gateway holds writes for it
    with pytest.raises(InvalidArgument, match=r"volume v .*limit of \d+ bytes"):
        reg.update_volume("v", lambda r: {**r, "note": b"x" * 100_000})
    api.delete_volume(reg, "v@s3113", wait=0)  # a record over the limit may still shrink
    assert len(reg.get_volume("v")["snapshots"]) == 167
    with pytest.raises(InvalidArgument, match=r"volume w .*limit of \d+ bytes"):
        reg.create_volume("w", {**d, "name": "w", "note": b"x" * 100_000})
    with pytest.raises(NotFound):
        reg.get_volume("w")


def test_stats_too_large_for_the_registry_do_not_take_the_host_down(reg):
    """A host's stats list every open export it must keep readable, each with its chain
    of generations: 520 snapshot exports of volumes 1,000 snapshots old are 1.6 MB, over
    etcd's 1.5 MiB request limit. The heartbeat carries the stats in the transaction that
    refreshes the host's liveness, so etcd refused both, and the host was reported down
    while it served. The liveness is refreshed all the same; the stats are refused with
    the limit named (the exports they would publish stop serving before the last
    published ones lapse)."""
    entry = {"export": "vol@snap", "lineage": "0123456789abcdef", "chain": list(range(1000, 2000)),
             "cuts": [], "size": 1 << 30, "chunk_size": 4 << 20}
    big = {"used": 1, "exports": [entry] * 520}
    assert len(msgpack.packb(big, use_bin_type=True)) > 1_572_864
    reg.register_host(host(1), 2)
    reg.heartbeat("h1", 2, {"used": 0})
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        with pytest.raises(InvalidArgument, match=r"stats of host h1 .*limit of \d+ bytes"):
            reg.heartbeat("h1", 2, big)
        time.sleep(0.3)
    assert reg.cluster_map().host("h1").state == "up"
    assert "h1" not in reg.host_stats()  # the last ones lapsed (not kept alive with it)
    with pytest.raises(InvalidArgument, match=r"stats of host h1 .*limit of \d+ bytes"):
        reg.publish_stats("h1", big, 2)
    assert reg.host_stats().get("h1", {}).get("used") != 1


def test_a_delete_removes_at_most_sweep_max_leftover_counters(reg, monkeypatch):
    """The counters the code before left behind (it deleted the lineages' volumes and
    kept their counters) go over the deletes that follow, at most SWEEP_MAX each: the
    first delete after an upgrade is not one transaction per counter ever leaked."""
    from vbp.registry import base

    monkeypatch.setattr(base, "SWEEP_MAX", 3)
    sweep = base.Registry._forget_lineages
    monkeypatch.setattr(base.Registry, "_forget_lineages", lambda self: None)  # (as before)
    for i in range(5):
        reg.next_id(f"gen/leaked{i}")
        reg.create_volume(f"old{i}", {"name": f"old{i}", "lineage": f"leaked{i}"})
        reg.delete_volume(f"old{i}")
    monkeypatch.setattr(base.Registry, "_forget_lineages", sweep)
    assert len(reg.kv.range(base.P_CTR_GEN)[0]) == 5
    for name in ("a", "b"):
        reg.create_volume(name, {"name": name, "lineage": f"L{name}"})
    reg.delete_volume("a")
    assert len(reg.kv.range(base.P_CTR_GEN)[0]) == 2
    reg.delete_volume("b")
    assert reg.kv.range(base.P_CTR_GEN)[0] == []
