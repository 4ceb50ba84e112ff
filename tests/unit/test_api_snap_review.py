"""Review (rev-snap): control/api.py volume lifecycle against the in-process registry."""

from __future__ import annotations

import itertools

import pytest

from control import api
from vbp.errors import NotFound
from vbp.layout import MiB
from vbp.registry import open_registry

_n = itertools.count()


def test_a_snapshot_of_a_volume_made_again_meanwhile_never_reuses_a_generation(monkeypatch):
    """`vbp volume snapshot v s` reads v (lineage L1, its counter at 5) and draws head 6
    from L1's counter; meanwhile v is deleted and created again (lineage L2, head 1). The
    request lands in the new v, which gets head 6 from L1's counter. L2's counter later
    gives 6 again, to a clone of the new v: the clone and v write (L2, i, 6), each into
    the other (review rev-snap). The call now fails (NotFound: the volume it read is
    gone), and changes nothing in the new v."""
    reg = open_registry(f"memory://snaprev-{next(_n)}")
    old = api.create_volume(reg, "v", MiB, replicas=1)
    for i in range(4):
        api.snapshot(reg, "v", f"old{i}")
    assert api.get_volume(reg, "v").head == 5
    next_id = reg.next_id
    made: list = []

    def racing(counter, floor=0):
        n = next_id(counter, floor)
        if counter == api.gen_counter(old.lineage) and not made:
            api.delete_volume(reg, "v", force=True)
            made.append(api.create_volume(reg, "v", MiB, replicas=1))
        return n

    monkeypatch.setattr(reg, "next_id", racing)
    with pytest.raises(NotFound):
        api.snapshot(reg, "v", "s", timeout=5)
    monkeypatch.undo()
    assert api.get_volume(reg, "v") == made[0]  # (no pending change, no snapshot)


def test_a_snapshot_whose_volume_is_made_again_while_it_waits_leaves_the_new_one_alone(
        monkeypatch):
    """The request went in; v is deleted and made again before the call sees it
    completed, and the new v has a change pending under the same generation number (its
    own counter, another caller): the call neither completes nor cancels it (the poll,
    complete_unleased and the cancel check the volume), and fails with NotFound."""
    reg = open_registry(f"memory://snaprev-{next(_n)}")
    api.create_volume(reg, "v", MiB, replicas=1)
    get_volume = reg.get_volume
    made: list = []

    def racing(name):
        d = get_volume(name)
        if not made and d.get("pending"):
            made.append(None)  # (the calls below read the record too)
            api.delete_volume(reg, "v", force=True)
            made[0] = api.create_volume(reg, "v", MiB, replicas=1)
            reg.update_volume("v", lambda x: {**x, "pending": d["pending"],
                                              "pending_snap": "theirs",
                                              "pending_until": d["pending_until"]})
            return get_volume(name)
        return d

    monkeypatch.setattr(reg, "get_volume", racing)
    with pytest.raises(NotFound):
        api.snapshot(reg, "v", "s", timeout=5)
    monkeypatch.undo()
    now = api.get_volume(reg, "v")
    assert now.lineage == made[0].lineage and now.pending_snap == "theirs" and now.pending
    assert now.chain == made[0].chain
