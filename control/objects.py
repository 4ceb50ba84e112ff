"""The JSON objects `vbp --json` prints for a host and for a volume: each built by one
function here, which every command that prints one calls, so that a script reads the same
keys with the same values whichever command it ran (docs/operator-guide.md, "JSON
output"). Keys are only ever added: a key some command printed before stays, also where
it differs from the common one (the sandbox's `nbd`, a URI; `host list`'s `nbd` and
`peer`, the record's HOST:PORT)."""

from __future__ import annotations

from vbp.cluster import authority


def data_role(cmap, host_id: str) -> str:
    """in: chunks are placed on it; joining/leaving: while the data set changes; out."""
    now = host_id in cmap.data_set
    before = now if cmap.prev is None else host_id in cmap.prev
    return {(True, True): "in", (True, False): "joining", (False, True): "leaving"}.get((now, before), "out")


def _port(hostport: str) -> int | None:
    try:
        return int(hostport.rpartition(":")[2])
    except ValueError:  # (a record written by hand)
        return None


def addresses(nbd: str, peer: str) -> dict:
    """A host's addresses from its record's HOST:PORT pair: as a URI and a reader take
    them (an IPv6 address in brackets), their ports, and the NBD URI of its exports."""
    return {"nbd_address": authority(nbd), "nbd_port": _port(nbd),
            "nbd_uri": f"nbd://{authority(nbd)}",
            "peer_address": authority(peer), "peer_port": _port(peer)}


def host_object(cmap, h) -> dict:
    """Host record `h` of cluster map `cmap`: the record's fields (`nbd` and `peer` as it
    holds them), its part in the data set (`data`), its placement weight factor
    (`reweight`) and its addresses."""
    return {**h.to_dict(), "data": data_role(cmap, h.id), "reweight": cmap.factors.get(h.id, 1.0),
            **addresses(h.nbd, h.peer)}


def sandbox_host_object(sh, cmap) -> dict:
    """A sandbox host (blockd.sandbox.SandboxHost): its host object when `cmap` (the
    sandbox's registry's map, or None when it could not be read) has its record, else its
    addresses as the sandbox gives them; with its process (`pid`, `alive`) and the keys
    the sandbox printed before (`nbd`: the NBD URI, `nbd_port`, `peer_port`)."""
    h = cmap.host(sh.id) if cmap is not None else None
    base = host_object(cmap, h) if h is not None else {
        "id": sh.id, **addresses(f"127.0.0.1:{sh.nbd_port}", f"127.0.0.1:{sh.peer_port}")}
    return {**base, "pid": sh.pid, "alive": sh.alive, "nbd": sh.nbd_uri,
            "nbd_port": sh.nbd_port, "peer_port": sh.peer_port}


def volume_object(v, accepted=()) -> dict:
    """Volume record `v` (vbp.volume.VolumeRecord) with its snapshots by name and the
    accepted losses of its lineage that reach it (vbp.volume.AcceptedLoss: control.api.
    accepted_losses)."""
    d = v.to_dict()
    d["snapshots"] = [s.name for s in v.snapshots]
    d["accepted_losses"] = [a.to_dict() for a in accepted]
    return d
