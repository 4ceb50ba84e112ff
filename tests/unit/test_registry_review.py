"""Registry review cases: compare-and-set transactions that must cover what they judged."""

from __future__ import annotations

import itertools

import pytest

from control import api
from vbp.errors import InUse, LeaseHeld
from vbp.registry import open_registry

_n = itertools.count()


def test_a_volume_leased_after_the_in_use_check_is_not_deleted_without_force():
    """`vbp volume delete` (no --force) refuses a volume whose write lease is live. The
    check reads the lease, then delete_volume's transaction compares the volume record
    only: a gateway that takes the lease in between (a client's first write) has its
    volume deleted under it, and the writes it acknowledged meanwhile are lost, with no
    InUse for the operator."""
    url = f"memory://regrev-{next(_n)}"
    reg, gateway = open_registry(url), open_registry(url)
    api.create_volume(reg, "v", "1M", replicas=1)
    delete = reg.delete_volume

    def a_gateway_takes_the_lease_first(name, *args, **kwargs):
        # between _refuse_in_use (no lease then) and the delete's transaction
        gateway.acquire_lease("v", "h1", 30.0)
        return delete(name, *args, **kwargs)

    reg.delete_volume = a_gateway_takes_the_lease_first
    with pytest.raises(InUse):
        api.delete_volume(reg, "v", wait=0.0)
    assert reg.get_volume("v")["name"] == "v"


@pytest.mark.parametrize("scheme", ["memory", "lmdb"])
def test_a_lease_record_is_decoded_once_per_read(scheme, tmp_path, monkeypatch):
    """Each read of a lease judges its record once decoded: Registry._held decoded it
    again after its callers had (_lease_of, _orphaned), two or three msgpack decodes of
    one record per lease read (get_lease: by every delete, GC pass and takeover)."""
    from vbp.registry import base

    url = f"memory://regrev-{next(_n)}" if scheme == "memory" else f"lmdb://{tmp_path}"
    reg = open_registry(url)
    try:
        api.create_volume(reg, "v", "1M", replicas=1)
        lease = reg.acquire_lease("v", "h1", 30.0)
        decoded = []
        unpack = base._unpack

        def counting(b):
            out = unpack(b)
            if isinstance(out, dict) and "holder" in out:  # (a lease record)
                decoded.append(out["holder"])
            return out
        monkeypatch.setattr(base, "_unpack", counting)

        def decodes(call) -> int:
            decoded.clear()
            call()
            return len(decoded)

        assert decodes(lambda: reg.get_lease("v")) == 1
        assert decodes(lambda: reg.orphaned_lease("v")) == 1
        api.delete_volume(reg, "v", force=True)
        assert decodes(lambda: reg.leases_of_deleted()) == 1

        def refused():
            with pytest.raises(LeaseHeld):
                reg.acquire_lease("v", "h2", 30.0)
        assert decodes(refused) == 1  # (h1's, held)
        reg.release_lease(lease)
        assert decodes(lambda: reg.acquire_lease("v", "h2", 30.0)) == 1  # (handed back)
        assert reg.get_lease("v").holder == "h2"
    finally:
        reg.close()
