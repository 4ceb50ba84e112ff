"""Registry review cases: compare-and-set transactions that must cover what they judged."""

from __future__ import annotations

import itertools

import pytest

from control import api
from vbp.errors import InUse
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
