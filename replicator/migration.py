"""Changes of data set: recovery after a host is lost, drain, and rebalance onto new hosts.
Here, the planning (plain functions of the map and the registry's records); the host's
part that runs it, replicator.mover.DataSetMover.

Theory of operation (DESIGN.md, Failures; Ceph's "up set" and "acting set" are the model).
- The data set is the list of hosts chunks are placed on (vbp.cluster.ClusterMap.data_set,
  kept in the registry with a generation). One host, the controller (the up host with the
  lowest id; every step is a compare-and-set, so two controllers are harmless), computes
  the wanted set from the map: up hosts, less draining ones, less hosts down for longer
  than down_out_interval -- unless leaving them out would put fewer hosts in the set than
  a volume has replicas, or a volume with one replica could have its only copy there.
- Down is not out (Ceph's mon_osd_down_out_interval, Longhorn's replica replenishment
  wait). A host is down once its alive key expires (heartbeat_ttl, seconds); a crash that
  systemd restarts, or a reboot, is back within a minute or two. Taking it out at once
  would start a change of data set for every chunk it holds (a stale record per chunk and
  target, whole chunks copied, writes to both placements), cancelled when it returns, its
  records then cleared one by one: with a million chunks on a host that saturates the
  registry, and slow stale marks fail guest writes. So a down host stays in the wanted
  set until the controller has seen it down for down_out_interval seconds (monotonic
  clock, counted from when this controller first saw it down: a new controller starts the
  count again, which only delays; up again resets it). Meanwhile its chunks run degraded
  and the writes it misses are recorded stale by the gateways, so once back it resyncs
  only those. A host the operator drains is out at once, down or not (a drain is an
  explicit request: the registry's stored state says so, the map shows a down host as
  down); 0 takes every down host out at once.
- When the wanted set differs, the registry records a change: the set being left (prev)
  and the target (data). Gateways then read from the placement over prev (complete
  copies), write to both placements, and count min_size over prev (replicator.gateway).
- Each host that holds chunks and is in prev scans its store once per change: for every
  chunk it holds under prev's placement, the targets that are not replicas yet are
  recorded stale in the registry; and so for every chunk it is recorded stale for, though
  it may hold nothing of it (it missed the chunk's first writes: their only copy may be
  on a host that is down and never scans), the target then marked never current.
  Gateways record such a target stale themselves before its first write during the
  change. A stale record is what the resync loop of that host works from
  (replicator.recovery): page-by-page copies from a current copy, safe against
  concurrent writes. So after every up holder has scanned, a chunk reaches a target
  either by resync or by being written there while recorded stale.
- The change completes (prev cleared) when every up host of prev has scanned this
  generation, no target holds a stale record for a chunk it joins, and no down host of
  prev that has not scanned holds, alone or with other such hosts, every complete copy of
  a chunk that moves (sole_holders: a replicas=1 volume, or all of a chunk's copies down):
  nothing else would record its target stale, and it would count as current with
  nothing. Such a chunk reads EIO until the host is back (or back on a new disk: blockd's
  backfill, which reports a replicas=1 volume's chunks lost). If the wanted set
  changes meanwhile (another host lost), the change restarts from the same prev.
- A nearly full host gets a lower placement weight (reweight, like Ceph's
  `reweight-by-utilization`): a factor below 1 on its capacity, kept in the data set
  record, so a reweight is a change of data set like any other (prev keeps the old
  factors; same scan, resync and completion) and moves only the chunks whose ranking the
  factor changes: chunks leave that host, and no other chunk moves (vbp.placement). See
  `wanted_weights` for the thresholds and the hysteresis.
- Placement weighs each host by the capacity, zone and pod recorded with the data set
  (ClusterMap.places), not by its live record: a host registered again with another
  --capacity, --zone or --pod (an operator grew its disk) would otherwise move chunks to
  hosts that hold nothing, with no scan and no stale record, and the collector would
  then free the only complete copies. The controller sees the live record differ
  (ClusterMap.drifted) and records a change of data set to the new inputs, prev keeping
  the old ones: the same scan, resync and completion as a change of hosts or weights. A
  record of older code has no inputs (its hosts were placed by their live records): the
  controller records the live ones as they are, which moves nothing.
- After the change, copies on hosts outside the new placement are garbage: a host frees
  one only when every host of the chunk's placement holds the chunk's generations with no
  stale record, and only after a grace period in which gateways still on the old map may
  read it (collect_misplaced).
- Pacing of reweights. The controller judges a settled data set by what each host will
  hold under it: its usage less its copies waiting to be freed. Each host measures those
  (`misplaced`, bytes) as soon as the data set settles and again at each collector pass,
  takes a freed copy off at once, and publishes them with `misplaced_gen`, the generation
  they were measured on. The controller takes the next step as soon as every data-set
  host with stats has published for the current generation (a second or two after the
  change completes) instead of waiting for the copies to be freed; stats measured on an
  older data set do not count, so a step never reads the usage from before the last one
  (which would take the factor on down: overshoot). Only when some host does not publish
  `misplaced` (an older blockd) does it wait `reweight_hold` seconds (grace, a collector
  pass and a heartbeat: the copies freed and the stats showing it). Hosts also publish
  their stats as soon as their usage moves by 1/32 of their capacity (blockd.service), not
  only with the heartbeat: a small host under a fast writer fills in seconds.
- No step is taken during a change, not even for a host past full_ratio: the placement
  being left is written until the change completes whatever the target's factors, so a
  step then would only restart the change (every holder scans again) and keep that host
  in the written placement longer.
"""

from __future__ import annotations

import functools
import logging
import math
from collections import Counter
from collections.abc import Collection

from replicator.view import ClusterView
from vbp.cluster import HOST_DOWN, HOST_UP, ClusterMap, weight_pairs
from vbp.placement import Placement
from vbp.volume import read_chunks

log = logging.getLogger("vbp.migration")

# default of blockd's down_out_interval: seconds a down host stays in the data set (its
# chunks degraded) before the controller takes it out; Ceph's and Longhorn's default too
DOWN_OUT_INTERVAL = 600.0
# a controller that has not looked at the map for this long (cut off from the registry,
# or another host controlled meanwhile) may have missed a down host's return: it counts
# again (which only delays)
DOWN_LOOK_GAP = 30.0


def _replaced(old: dict, new: dict) -> str:
    """The hosts whose placement inputs a change takes up, for the log."""
    moved = [f"{h}:{'/'.join(map(str, old[h]))}->{'/'.join(map(str, p))}"
             for h, p in sorted(new.items()) if h in old and old[h] != p]
    return f" placement={','.join(moved)}" if moved else ""


def wanted_data_set(cmap: ClusterMap, volumes: list[dict],
                    not_out: Collection[str] = ()) -> tuple[str, ...]:
    """The data set the pool should have under `cmap` (see the module docstring).
    `not_out`: down hosts that stay in it if they are in it now (down for less than the
    controller's down_out_interval: replicator.mover.DataSetMover.not_out)."""
    cur = {h for h in cmap.data_set if cmap.host(h) is not None}
    most = max((v["replicas"] for v in volumes), default=1)
    want = {h.id for h in cmap.hosts if h.state == HOST_UP}
    down = {h.id for h in cmap.hosts if h.state == HOST_DOWN} & cur
    if any(v["replicas"] == 1 for v in volumes):
        want |= down  # the only copy of a chunk may be there: wait for it to return
    if len(want) < most:
        want |= cur  # fewer hosts than replicas: keep every copy where it is
    # (after the count: a down host takes no copy, so it does not make up the numbers)
    want |= down & set(not_out)  # degraded meanwhile: its missed writes are recorded stale
    return tuple(sorted(want))


# Reweight (wanted_weights). A host is above its nearfull threshold (blockd config
# `nearfull_ratio`, published with its stats) when used / capacity exceeds it. Acting at
# nearfull rather than at full_ratio leaves the host room for what still reaches it while
# the change runs: gateways keep writing the placement being left until the change
# completes (no step can stop new chunks landing there sooner), and moved copies are
# freed only a grace period later. At full_ratio recovery already takes no new copy there
# and new chunks soon fail with ENOSPC (degraded writes).
NEARFULL_RATIO = 0.85  # default of blockd's nearfull_ratio
FULL_RATIO = 0.95  # default of blockd's full_ratio (a host that publishes none)
# a host above nearfull is lowered only if this much fuller than the pool on average
ABOVE_MEAN = 0.05
REWEIGHT_MARGIN = 0.10  # hysteresis: a factor goes up only if the host stays this far below nearfull
WEIGHT_STEP = 0.8  # a lowering takes at least this factor off; a raise gives at most 1/it back
WEIGHT_QUANTUM = 0.05  # factors are multiples of it: few distinct values, readable
WEIGHT_MIN = 0.05
WEIGHTS_REV = 4  # hosts of an older peer revision place chunks without weight factors
RAISE_SAMPLE = 20000  # chunks whose placement a raise is judged on, at most
# synthetic chunks (of a lineage no volume has) whose placement a lowering is judged on
# (_Projection): on 10 hosts a wanted_weights call takes about 40 ms with one host over,
# 0.2 s when it tries a plan for each of 9 (in a worker thread: _reweight)
PROJECT_SAMPLE = 4096
PROJECT_LINEAGE = "reweight-sample"
# A scan or a measure of this host's copies places each chunk it holds (ClusterView.replicas:
# some microseconds, its cache holding 65,536): it lets the other tasks run every LIST_STEP
# chunks, so that a host of a million chunks still answers its clients and peers meanwhile.
LIST_STEP = 256


def _quantize(f: float, up: bool) -> float:
    q = f / WEIGHT_QUANTUM
    q = math.ceil(q - 1e-9) if up else math.floor(q + 1e-9)
    return round(max(WEIGHT_MIN, min(1.0, q * WEIGHT_QUANTUM)), 2)


def pending_free(st: dict, mgen: int) -> int:
    """Bytes of a host's copies that the data set of generation `mgen` places elsewhere
    (freed by collect_misplaced after the grace), if its stats were measured on that data
    set; else 0 (not known: the host's usage is taken whole)."""
    if st.get("misplaced_gen") != mgen:
        return 0
    return int(st.get("misplaced") or 0)


def stats_current(cmap: ClusterMap, stats: dict[str, dict]) -> bool:
    """Whether every data-set host that publishes stats has measured its misplaced copies
    on this data set (so its usage, less them, is what it will hold under it)."""
    return all(stats[h].get("misplaced_gen") == cmap.mgen for h in cmap.data_set if h in stats)


def lineage_chunks(volumes: list[dict]) -> dict[str, tuple[int, int]]:
    """Lineage -> (copies its chunks keep, chunk indexes it spans: those of its largest
    volume), of the volume record dicts `volumes`."""
    chunks: dict[str, tuple[int, int]] = {}
    for v in volumes:
        n, c = chunks.get(v["lineage"], (0, 0))
        # (the chunks it reads: a head shrunk since a snapshot reads fewer than it)
        chunks[v["lineage"]] = (max(n, v["replicas"]), max(c, read_chunks(v)))
    return chunks


def placed_count(cmap: ClusterMap, volumes: list[dict], host: str, factors: dict[str, float]) -> int:
    """How many of the pool's chunks the data set of `cmap` with weight `factors` places on
    `host`: every chunk index of each lineage up to its largest volume, or, past
    RAISE_SAMPLE of them, an even stride through them."""

    view = ClusterView(ClusterMap(cmap.epoch, cmap.hosts, cmap.data_set, None, cmap.mgen,
                                  weight_pairs(factors, cmap.data_set), (), cmap.places))
    chunks = lineage_chunks(volumes)
    stride = max(1, -(-sum(c for _, c in chunks.values()) // RAISE_SAMPLE))
    return sum(host in view.replicas(lineage, i, n)
               for lineage, (n, c) in sorted(chunks.items()) for i in range(0, c, stride))


class _Projection:
    """What each host would hold under lowered factors, projected from the real placement
    (vbp.placement) of PROJECT_SAMPLE synthetic chunks of `most` copies: a host's usage
    times its count of those chunks under the plan over its count now (a host with none
    now: unchanged). Placement decides where a shed copy can go -- only to a domain that
    holds no other copy of the chunk, so with few zones a host's shed may reach one or
    two hosts only -- and no estimate by weight saw that. Lowering factors only takes the
    lowered hosts out of chunks and moves no other chunk (vbp.placement, Stability): a
    plan places again only the sample chunks a lowered host holds now. The placement
    under the current factors is sampled once, on the first plan."""

    def __init__(self, cmap: ClusterMap, cur: dict[str, float], most: int):
        self._hosts = ClusterMap(cmap.epoch, cmap.placed_hosts())
        self._cur = cur
        self._most = most

    @functools.cached_property
    def _now(self) -> tuple[list[tuple[str, ...]], Counter, dict[str, list[int]]]:
        now = Placement(self._hosts, self._cur)
        placed = [now.place(PROJECT_LINEAGE, i, self._most) for i in range(PROJECT_SAMPLE)]
        held: dict[str, list[int]] = {}
        for i, hosts in enumerate(placed):
            for h in hosts:
                held.setdefault(h, []).append(i)
        return placed, Counter(h for hosts in placed for h in hosts), held

    def after(self, usage: dict, lowered: dict[str, float]) -> dict[str, float]:
        """Host of `usage` -> bytes it would hold with the factors of `lowered` (each below
        its current one), once every moved copy is freed."""
        placed, now, held = self._now
        plan = Placement(self._hosts, {**self._cur, **lowered})
        count = Counter(now)
        for i in sorted({i for h in lowered for i in held.get(h, ())}):
            count.subtract(placed[i])
            count.update(plan.place(PROJECT_LINEAGE, i, self._most))
        return {x: used * count[x] / now[x] if now[x] else float(used) for x, (used, *_) in usage.items()}


def _lowerings(cur: dict[str, float], usage: dict, over: list[str], mean: float,
               projection: _Projection) -> dict[str, float]:
    """New factors for hosts of `over` (above nearfull, the fullest first), lowered
    together (wanted_weights): the fullest `n` of those fuller than the pool's `mean` by
    ABOVE_MEAN, for the largest `n` whose lowering, with what each host would hold after
    it projected from the placement (_Projection), leaves no host past its full ratio
    that was not, every lowered host less full, and what lands on the others within their
    room below nearfull."""
    if not over:
        return {}
    plan = {}
    for h in over:
        used, cap, nf, _ = usage[h]
        if used / cap <= mean + ABOVE_MEAN:
            continue  # about as full as the pool: its chunks would only fill the others
        f = cur.get(h, 1.0)
        # aimed no lower than the mean: below it, it only pushes others over
        aim = max(min(WEIGHT_STEP * used, (nf - REWEIGHT_MARGIN) * cap), mean * cap)
        new = _quantize(f * aim / used, up=False)
        if new < f:
            plan[h] = new
    hosts = list(plan)
    for n in range(len(hosts), 0, -1):
        lowered = {h: plan[h] for h in hosts[:n]}
        after = projection.after(usage, lowered)
        rest = [x for x in usage if x not in lowered]
        room = sum(max(0.0, usage[x][2] * usage[x][1] - usage[x][0]) for x in rest)
        if not rest or sum(after[x] - usage[x][0] for x in rest) > room:
            continue  # the others lack the room below their thresholds
        if any(after[x] >= usage[x][0] for x in lowered):
            continue  # refilled by the others' chunks, or its copies have nowhere to go
            # (every domain holds one): no better off, and they move
        fullest = max(usage[x][0] / usage[x][1] for x in lowered)
        if any(after[x] > used and (after[x] > full * cap or after[x] > nf * cap
                                    and after[x] / cap >= fullest)
               for x, (used, cap, nf, full) in usage.items()):
            continue  # a host pushed past its full ratio, or past nearfull to as full as
            # a host it relieves
        return lowered
    return {}


def wanted_weights(cmap: ClusterMap, stats: dict[str, dict], most: int,
                   growth: dict[str, float] | None = None,
                   owed: dict[str, int] | None = None) -> dict[str, float]:
    """The weight factors the data set should have, from the hosts' published usage: what
    each host holds less its copies the data set places elsewhere (`pending_free`), so
    copies a step moved off count as gone before they are freed.

    - The hosts of the data set above their nearfull threshold and fuller than the pool
      on average (used over capacity of the hosts with stats) by ABOVE_MEAN have their
      factors lowered by at least WEIGHT_STEP, to what would bring each REWEIGHT_MARGIN
      below its threshold if its share of chunks followed its weight -- but aiming no
      lower than the pool's mean: in a pool that full the margin cannot be had
      everywhere, and a host taken below the mean only puts others over (Ceph's
      reweight-by-utilization aims at the average too, and acts only on what is well
      above it). What a lowered host sheds lands on the hosts placement gives its
      copies to (only those of domains without a copy of the chunk: with few zones, one
      or two hosts), those near their thresholds too, so the lowerings are judged
      together on what each host would hold, projected from the placement of sample
      chunks (_lowerings, _Projection), the
      least full left out until: what lands on the hosts not lowered fits in their room
      below their thresholds (a pool that is full everywhere keeps its placement, and
      writes needing a new chunk get ENOSPC); every lowered host ends less full; and no
      host is pushed past its full_ratio, nor past its nearfull threshold to as full as
      the fullest host lowered. Lowering each host over on its own, against the total
      room, put a pool about 80% full into a cascade: each lowering pushed the next host
      over, nothing went back up (a raise needs a host well below nearfull), every
      factor ran down change after change, and hosts went past full on the way.
    - A lowered host goes up one step (1 / WEIGHT_STEP, at most to 1) only if at the new
      factor it would still be REWEIGHT_MARGIN below its threshold, reckoning that its
      usage grows with its weight -- or, if more, as its count of placed chunks grows
      (`growth[host]`, from placed_count, at the raise asked for): its expected share
      grows at most in proportion to its weight, but the chunks a step flips are few on a
      small pool and their count can grow faster. So a host that was lowered is not raised back
      into nearfull, and the factor does not flap. Its usage counts what it owes too
      (`owed[host]`: bytes of the copies recorded stale on it, which its resync may still
      allocate): a host that refused writes when it was full holds less than its share
      until those resync, and a raise judged on that would be taken back once they did.
      Nor is it raised if, so grown, it would be fuller than the pool on average: the
      lowering aims a host at that average, so a raise above it would only put the host
      back where it was lowered from as the pool fills (a writer filling the pool: 0.8,
      0.6, raised to 0.75, lowered to 0.6 again); Ceph's reweight-by-utilization too
      raises only what is below the average.
    - Hosts without stats (down) keep their factor. With no more hosts than a volume has
      replicas every host holds every chunk: weights would move nothing, so none change."""
    cur = {h: f for h, f in cmap.factors.items() if h in cmap.data_set}
    out = dict(cur)
    if len(cmap.data_set) <= most:
        return out
    usage = {}
    for h in cmap.data_set:
        st = stats.get(h) or {}
        cap, used = st.get("capacity") or 0, st.get("used")
        if cap > 0 and used is not None:
            used = max(0, used - pending_free(st, cmap.mgen))
            usage[h] = (used, cap, float(st.get("nearfull_ratio") or NEARFULL_RATIO),
                        float(st.get("full_ratio") or FULL_RATIO))
    over = sorted((h for h, (used, cap, nf, _) in usage.items() if used > nf * cap),
                  key=lambda h: -usage[h][0] / usage[h][1])
    # the pool's mean usage: used over capacity of the hosts with stats
    mean = sum(u[0] for u in usage.values()) / sum(u[1] for u in usage.values()) if usage else 0.0
    out.update(_lowerings(cur, usage, over, mean, _Projection(cmap, cur, most)))
    for h, f in cur.items():
        if h in usage and h not in over:
            used, cap, nf, _ = usage[h]
            new = _quantize(f / WEIGHT_STEP, up=True)
            grows = max(new / f, (growth or {}).get(h, 0.0))
            # below its threshold by the margin, and no fuller than the pool on average
            # (no more than: a pool empty everywhere gets its factors back)
            after = (used + (owed or {}).get(h, 0)) * grows
            if after < (nf - REWEIGHT_MARGIN) * cap and after <= mean * cap:
                out[h] = new
    return {h: f for h, f in out.items() if f < 1.0}


def owed_by_host(records, volumes: list[dict]) -> dict[str, int]:
    """Host -> bytes its stale copies may still allocate when they resync: a whole chunk per
    record naming it (an upper bound: a copy that is only behind holds its slot already)."""
    sizes = {v["lineage"]: v["chunk_size"] for v in volumes}
    out: dict[str, int] = {}
    for r in records:
        out[r.host_id] = out.get(r.host_id, 0) + sizes.get(r.lineage, 0)
    return out


def down_unscanned(cmap: ClusterMap, scanned: dict[str, int]) -> frozenset[str]:
    """Hosts of prev that are down and have not scanned this change."""
    return frozenset(h for h in cmap.prev or () if (rec := cmap.host(h)) is not None
                     and rec.state == HOST_DOWN and scanned.get(h) != cmap.mgen)


def sole_holders(cmap: ClusterMap, volumes: list[dict], down: frozenset[str]) -> list[str]:
    """The hosts of `down` (down_unscanned) that, alone or with others of `down`, are every
    complete copy of a chunk some target joins: no scan of an up host records that
    target stale, so only theirs (once back) can say the chunk has data. Every chunk
    index of each lineage up to its largest volume is placed, but only for lineages with
    no more replicas than `down` has hosts (one host down: replicas=1 volumes only), and
    placed whole only when its first replica is one of `down` (ClusterView.first_in: a few
    hashes a chunk, where a whole placement hashes every host of the pool)."""

    chunks = lineage_chunks(volumes)
    view = ClusterView(cmap)
    found: set[str] = set()
    for lineage, (n, c) in sorted(chunks.items()):
        if min(n, len(cmap.prev or ())) > len(down):
            continue  # (every chunk has a copy on a host outside `down`)
        for i in range(c):
            if not view.first_in(lineage, i, down):
                continue
            old = view.replicas(lineage, i, n)
            if down.issuperset(old) and view.joining(lineage, i, n):
                found.update(old)
                if found == down:
                    return sorted(found)
    return sorted(found)


def joining_holders(cmap: ClusterMap, records, n_of: dict[str, int],
                    min_of: dict[str, int]) -> dict[str, int]:
    """Joining targets of the change under way that alone hold every acknowledged write of
    some chunk (host -> how many such chunks): every complete copy of it is recorded
    stale, the one the election takes never current (replicator.loss.newest_lost: the
    last current copy went with a replaced disk), and the target has no record (it resynced from that copy
    and took every write since). A data set that leaves such a target out of the chunk's
    placement leaves the chunk unrecoverable while the target holds it, for
    `vbp volume accept-loss` to revert it to older bytes."""
    from replicator.loss import newest_lost, stale_by_chunk

    if cmap.prev is None:
        return {}
    view = ClusterView(cmap)
    out: dict[str, int] = {}
    for (lineage, index), stale in stale_by_chunk(records, cmap).items():
        n = n_of.get(lineage)
        if not n or not newest_lost(view.replicas(lineage, index, n), stale, min_of[lineage]):
            continue
        for h in view.joining(lineage, index, n):
            if h not in stale:
                out[h] = out.get(h, 0) + 1
    return out


def blocking(cmap: ClusterMap, records, n_of: dict[str, int], scanned: dict[str, int],
             chunk_sizes: dict[str, int] | None = None, waiting=()) -> dict:
    """What keeps the current change of data set from completing: hosts of prev that are
    up and have not scanned, the down ones of `waiting` (sole_holders: they alone may hold
    chunks that move; also listed as `down`), and stale records of joining
    targets (copies not made yet; `bytes` counts them whole, an upper bound: a resync
    copies only pages that differ)."""

    if cmap.prev is None:
        return {"unscanned": [], "chunks": 0, "bytes": 0, "by_host": {}, "down": []}
    view = ClusterView(cmap)
    unscanned = sorted({*waiting, *(h for h in cmap.prev if (rec := cmap.host(h)) is not None
                                    and rec.state != HOST_DOWN and scanned.get(h) != cmap.mgen)})
    moving = [r for r in records if r.lineage in n_of
              and r.host_id in view.joining(r.lineage, r.index, n_of[r.lineage])]
    sizes = chunk_sizes or {}
    by_host: dict[str, int] = {}
    for r in moving:
        by_host[r.host_id] = by_host.get(r.host_id, 0) + sizes.get(r.lineage, 0)
    return {"unscanned": unscanned, "chunks": len(moving), "bytes": sum(by_host.values()),
            "by_host": by_host, "down": sorted(waiting)}
