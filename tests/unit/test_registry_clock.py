"""TTL keys of the local registries (LMDB, memory) run on the machine's boot clock
(vbp.registry.local): a step of the wall clock neither expires a live key nor keeps a
dead one, and a key of another boot, or of the wall-clock format before, has run out."""

from __future__ import annotations

import time
import uuid

import msgpack
import pytest

from vbp.cluster import HostRecord
from vbp.registry import local, open_registry
from vbp.registry.kv import Put

WALL = time.time


@pytest.fixture(params=["memory", "lmdb"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://clock-{uuid.uuid4().hex}"
    return f"lmdb://{tmp_path / 'registry'}"


@pytest.fixture
def reg(url):
    r = open_registry(url)
    yield r
    r.close()


@pytest.fixture
def boot_clock(monkeypatch):
    """The boot clock, moved by hand: `boot_clock.ahead` seconds past the real one."""

    class Clock:
        ahead = 0.0

        def __call__(self):
            return time.clock_gettime(time.CLOCK_BOOTTIME) + self.ahead

    c = Clock()
    monkeypatch.setattr(local, "clock", c, raising=False)
    return c


def raw_entry(kv, key: bytes) -> bytes | None:
    """The entry stored at `key`, as it is (expired or not)."""
    if hasattr(kv, "_env"):
        with kv._env.begin() as t:
            return t.get(key)
    return kv._store.data.get(key)


def put_raw(kv, key: bytes, entry: list) -> None:
    """Store `entry` as it is, past the KV's encoding (a store written by other code)."""
    raw = msgpack.packb(entry, use_bin_type=True)
    if hasattr(kv, "_env"):
        with kv._env.begin(write=True) as t:
            t.put(key, raw)
    else:
        kv._store.data[key] = raw


@pytest.mark.parametrize("step", [7.0, 86400.0, -7.0, -86400.0])
def test_a_wall_clock_step_moves_no_ttl_key(reg, boot_clock, monkeypatch, step):
    kv = reg.kv
    kv.txn([], [Put(b"vbp/t/alive", b"1", 5.0)])
    monkeypatch.setattr(time, "time", lambda: WALL() + step)
    assert kv.get(b"vbp/t/alive")[0] is not None
    assert [it.key for it in kv.range(b"vbp/t/")[0]] == [b"vbp/t/alive"]
    assert kv.keep_alive(b"vbp/t/alive", 5.0)
    boot_clock.ahead = 4.0
    assert kv.get(b"vbp/t/alive")[0] is not None  # kept alive: 5 s from the refresh
    boot_clock.ahead = 6.0
    assert kv.get(b"vbp/t/alive")[0] is None  # run out on the boot clock, step or not
    assert kv.range(b"vbp/t/")[0] == []
    assert not kv.keep_alive(b"vbp/t/alive", 5.0)


@pytest.mark.parametrize("step", [7.0, -30.0])
def test_a_wall_clock_step_publishes_no_live_host_down(reg, boot_clock, monkeypatch, step):
    """The fault the boot clock removes: with the wall clock, a forward step of 7 s
    published live hosts down until their next heartbeat, and a backward step kept a
    dead host up for as long as the step."""
    for i in (1, 2):
        reg.register_host(HostRecord(f"h{i}", f"127.0.0.1:{7000 + i}", f"127.0.0.1:{8000 + i}"),
                          5.0)
    epoch = reg.cluster_map().epoch
    monkeypatch.setattr(time, "time", lambda: WALL() + step)
    m = reg.cluster_map()
    assert [m.host(h).state for h in ("h1", "h2")] == ["up", "up"] and m.epoch == epoch
    boot_clock.ahead = 3.0
    reg.heartbeat("h1", 5.0)
    boot_clock.ahead = 5.5  # h2's last beat was 5.5 s ago, h1's 2.5
    m = reg.cluster_map()
    assert m.host("h1").state == "up" and m.host("h2").state == "down"


def test_ttl_keys_of_another_boot_have_run_out(reg, monkeypatch):
    kv = reg.kv
    kv.txn([], [Put(b"vbp/t/alive", b"1", 3600.0), Put(b"vbp/t/forever", b"2")])
    before = kv.get(b"vbp/t/alive")[0]
    monkeypatch.setattr(local, "_boot", "another-boot", raising=False)
    assert kv.get(b"vbp/t/alive")[0] is None
    assert [it.key for it in kv.range(b"vbp/t/")[0]] == [b"vbp/t/forever"]
    assert not kv.keep_alive(b"vbp/t/alive", 30.0)
    ok, rev = kv.txn([], [Put(b"vbp/t/alive", b"3", 30.0)])
    item = kv.get(b"vbp/t/alive")[0]
    assert item.value == b"3" and item.create_rev == rev > before.create_rev  # a new key
    assert kv.keep_alive(b"vbp/t/alive", 30.0)


def test_a_reboot_takes_every_ttl_key_of_the_boot_before(reg, boot_clock, monkeypatch):
    """The boot clock starts again at a boot: the first write of the next boot removes
    the TTL keys of the one before, so that an expiry far ahead on the old clock is not
    read as far ahead on the new one (a dead host up for hours)."""
    kv = reg.kv
    # (the boot before ran for two hours; the new boot's clock, just started, reads less
    # than that expiry. Moved forward, not back: a boot clock is never negative, and a
    # machine booted minutes ago has little to go back by)
    boot_clock.ahead = 7200.0
    kv.txn([], [Put(b"vbp/t/alive", b"1", 3600.0), Put(b"vbp/t/forever", b"2")])
    monkeypatch.setattr(local, "_boot", "next-boot", raising=False)
    boot_clock.ahead = 0.0
    assert kv.get(b"vbp/t/alive")[0] is None  # (not yet removed: read as run out)
    kv.txn([], [Put(b"vbp/t/other", b"3", 60.0)])  # the first write of this boot
    assert kv.get(b"vbp/t/alive")[0] is None
    assert [it.key for it in kv.range(b"vbp/t/")[0]] == [b"vbp/t/forever", b"vbp/t/other"]
    assert raw_entry(kv, b"vbp/t/alive") is None and raw_entry(kv, b"vbp/t/forever")


def test_an_entry_of_the_code_before_is_judged_by_the_wall_clock(reg):
    """An entry written before the boot clock ([value, create_rev, mod_rev, expires],
    the expiry on the wall clock) is judged by the wall clock, so that a process of that
    code sharing the store is seen alive for as long as it beats; keep_alive refuses it
    (the caller puts it again, on the boot clock)."""
    kv = reg.kv
    put_raw(kv, b"vbp/t/old-alive", [b"1", 1, 1, WALL() + 3600])
    put_raw(kv, b"vbp/t/old-gone", [b"1", 1, 1, WALL() - 1])
    put_raw(kv, b"vbp/t/old-forever", [b"2", 1, 1, 0])
    assert kv.get(b"vbp/t/old-alive")[0].value == b"1"
    assert kv.get(b"vbp/t/old-gone")[0] is None
    assert [it.key for it in kv.range(b"vbp/t/")[0]] == [b"vbp/t/old-alive", b"vbp/t/old-forever"]
    assert not kv.keep_alive(b"vbp/t/old-alive", 30.0)
    ok, _ = kv.txn([], [Put(b"vbp/t/old-alive", b"3", 30.0)])
    assert ok and kv.get(b"vbp/t/old-alive")[0].value == b"3"
    assert kv.keep_alive(b"vbp/t/old-alive", 30.0)


def test_the_code_before_reads_an_entry_of_this_code_as_run_out_without_error(reg):
    """What the code before the boot clock does with an entry (vbp.registry.local before
    it): unpack four fields, and take a key whose expiry is not ahead of the wall clock
    as absent. An entry of this code must unpack so (a fifth field raised ValueError
    there, and an old blockd died of it), and a TTL entry reads as run out."""

    def old_decode(raw):
        value, create_rev, mod_rev, expires = msgpack.unpackb(raw, raw=False)
        return None if expires and expires <= WALL() else value

    kv = reg.kv
    kv.txn([], [Put(b"vbp/t/alive", b"1", 3600.0), Put(b"vbp/t/forever", b"2")])
    assert old_decode(raw_entry(kv, b"vbp/t/alive")) is None
    assert old_decode(raw_entry(kv, b"vbp/t/forever")) == b"2"


def test_the_boot_id_is_the_kernels():
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert local.boot_id() == f.read().strip()
    assert local.now(lambda key: local.boot_id().encode()).this_boot
    assert abs(local.clock() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 1.0


def test_an_entry_with_the_boot_id_as_a_fifth_field_reads_as_run_out(reg):
    """For a few minutes this code wrote a TTL entry with a fifth field, the boot id, and
    its boot-clock expiry as a positive number: such an entry reads as run out (judged by
    the wall clock, far ahead of it) and is put again, never an error. (Found by a
    review: the four-field unpacking raised ValueError on every read of the map.)"""
    kv = reg.kv
    put_raw(kv, b"vbp/t/five", [b"1", 1, 1, local.clock() + 3600, local.boot_id()])
    assert kv.get(b"vbp/t/five")[0] is None and kv.range(b"vbp/t/")[0] == []
    assert not kv.keep_alive(b"vbp/t/five", 30.0)
    ok, _ = kv.txn([], [Put(b"vbp/t/five", b"2", 30.0)])
    assert ok and kv.get(b"vbp/t/five")[0].value == b"2"


def test_the_hosts_of_the_code_before_are_named(reg):
    """A host whose liveness key the code before keeps (an expiry on the wall clock) is
    named, while it is live: it reads the newer hosts' keys as run out and publishes them
    down, and blockd logs it (Blockd._warn_old_hosts)."""
    from vbp.registry.base import P_ALIVE

    reg.register_host(HostRecord("h1", "127.0.0.1:7001", "127.0.0.1:8001"), 30.0)
    put_raw(reg.kv, P_ALIVE + b"h8", [b"1", 1, 1, WALL() + 30])
    put_raw(reg.kv, P_ALIVE + b"h9", [b"1", 1, 1, WALL() - 1])  # (run out)
    assert reg.hosts_on_the_wall_clock() == ["h8"]
    assert reg.host_alive("h8") and not reg.host_alive("h9")
