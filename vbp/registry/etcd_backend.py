"""The etcd backend: `etcd://HOST:PORT[,HOST:PORT...]`, for clusters of many machines.

Why HTTP/JSON and not an etcd client library: etcd v3 speaks gRPC, and no maintained
synchronous Python etcd3 client works with current protobuf releases (the `etcd3` package
is unmaintained and breaks on protobuf >= 4). etcd itself serves its v3 API through the
gRPC gateway as JSON over HTTP (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/lease/grant`,
`/v3/watch`; keys and values base64, 64-bit integers as strings), which needs only httpx,
already a dependency. It is the same API, version for version, as the gRPC one.

Failover: requests go to the last endpoint that answered; on a connection failure (or an
"unavailable" answer) the next endpoint is tried, and once all have failed the caller gets
RegistryUnavailable naming the URL and each endpoint's error. A write (txn) whose outcome is
unknown is never resent: the caller gets RegistryUnavailable saying so. Unknown means sent
with no etcd answer back, an answer that is not etcd's (a proxy's error page), or an
"unavailable" answer other than "no leader": etcd also answers "unavailable" for a leader
change or a timeout after the proposal went in, and a resent txn would then be applied a
second time (its compare fails on its own first copy, and a CAS loop applies its change
again to the changed record). Only "no leader" says the request was never proposed; the
same rule as etcd's own client for writes. Every request asks etcd to require a leader
(the gateway passes the header REQUIRE_LEADER on as gRPC metadata, what etcd's own client
sends for a context made with clientv3.WithRequireLeader): a member cut off from its
cluster then answers "no leader" at once, where it would hold the request until the
client's timeout, a txn's outcome then unknown.

TTL keys are attached to an etcd lease granted for ceil(ttl) seconds (etcd's unit), which
keep_alive renews with no change to the key (a heartbeat's liveness key: no event). etcd
raises a lease's TTL to a minimum, 1.5 election timeouts rounded up to a second (2 s with
its defaults, 8 s with --election-timeout=5000): ttl_floor() says what it is, so that what
waits for a key to lapse waits long enough. Expired keys are deleted by etcd's leader,
which shows up as an ordinary change to watchers.
"""

from __future__ import annotations

import base64
import json
import math
import time
from typing import Sequence

import httpx

from vbp.errors import RegistryUnavailable
from vbp.registry.kv import Cmp, Delete, Item, Op, Put, prefix_end

CONNECT_TIMEOUT = 1.0
REQUEST_TIMEOUT = 5.0
GRPC_UNAVAILABLE = 14
NO_LEADER = "etcdserver: no leader"  # the one "unavailable" that says: not proposed
# gRPC metadata "hasleader: true" (etcd's rpctypes.MetadataRequireLeaderKey): a member with
# no leader refuses at once with NO_LEADER, before proposing anything
REQUIRE_LEADER = {"Grpc-Metadata-hasleader": "true"}
LEASE_NOT_FOUND = "requested lease not found"  # a put on a lease that ran out: refused
# keys in one range request at most (a range reads them in pages: EtcdKV.range)
RANGE_PAGE = 5000


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str | None) -> bytes:
    return base64.b64decode(s) if s else b""


def _lease_ttl(ttl: float) -> int:
    """The TTL a lease for a key of `ttl` seconds is asked for: whole seconds, etcd's unit."""
    return max(1, math.ceil(ttl))


def _item(kv: dict) -> Item:
    return Item(_unb64(kv.get("key")), _unb64(kv.get("value")),
                int(kv.get("create_revision", 0)), int(kv.get("mod_revision", 0)))


class _Retry(Exception):
    pass


class EtcdKV:
    def __init__(self, url: str, endpoints: list[str]) -> None:
        self.url = url
        self.endpoints = endpoints
        self._cur = 0
        self._floor: int | None = None  # etcd's minimum lease TTL, once known (ttl_floor)
        # key -> (TTL asked, its lease, the monotonic time by which that lease has run out
        # unless kept alive again) as keep_alive last kept it alive: what a Put with
        # lease_of joins. Forgotten once that time is past (_forget_lapsed): the key was
        # taken over or released elsewhere, or is just no longer kept alive here; and at
        # once when the key is deleted or put on another lease here.
        self._kept: dict[bytes, tuple[int, str, float]] = {}
        self._client = httpx.Client(timeout=httpx.Timeout(REQUEST_TIMEOUT, connect=CONNECT_TIMEOUT),
                                    headers=REQUIRE_LEADER)

    # --- transport ------------------------------------------------------------------------

    def _call(self, path: str, body: dict, *, idempotent: bool = True) -> dict:
        errors = []
        n = len(self.endpoints)
        start = self._cur
        for i in range(n):
            idx = (start + i) % n
            ep = self.endpoints[idx]
            try:
                r = self._client.post(f"http://{ep}/v3/{path}", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as e:
                errors.append(f"{ep}: cannot connect ({type(e).__name__}: {e})")
                continue
            except httpx.HTTPError as e:
                if idempotent:
                    errors.append(f"{ep}: {type(e).__name__}: {e}")
                    continue
                raise RegistryUnavailable(
                    f"registry {self.url}: {path} to {ep} failed with an unknown outcome "
                    f"({type(e).__name__}: {e})") from None
            try:
                data = r.json()
            except (json.JSONDecodeError, ValueError):
                what = f"HTTP {r.status_code}, not an etcd answer: {r.text[:200]!r}"
                if idempotent:
                    errors.append(f"{ep}: {what}")
                    continue
                raise RegistryUnavailable(
                    f"registry {self.url}: {path} to {ep} failed with an unknown outcome ({what})")
            if r.status_code != 200 or "error" in data:
                code, msg = data.get("code"), data.get("message") or data.get("error") or r.text[:200]
                if isinstance(data.get("error"), dict):
                    # a streaming call's (lease/keepalive): {"error": {"grpc_code" (etcd
                    # 3.4, 3.5; "code" with 3.6's gateway), "message", ...}}
                    err = data["error"]
                    code = err.get("grpc_code", err.get("code"))
                    msg = err.get("message") or str(err)
                if code == GRPC_UNAVAILABLE:
                    if idempotent or NO_LEADER in str(msg):  # (never proposed: try elsewhere)
                        errors.append(f"{ep}: unavailable: {msg}")
                        continue
                    raise RegistryUnavailable(
                        f"registry {self.url}: {path} to {ep} failed with an unknown outcome "
                        f"(unavailable: {msg})")
                raise RegistryUnavailable(f"registry {self.url}: etcd {ep} refused {path}: {msg}")
            self._cur = idx
            return data
        raise RegistryUnavailable(
            f"registry {self.url} is unreachable: " + "; ".join(errors))

    # --- KV contract ----------------------------------------------------------------------

    def get(self, key: bytes) -> tuple[Item | None, int]:
        d = self._call("kv/range", {"key": _b64(key)})
        kvs = d.get("kvs") or []
        return (_item(kvs[0]) if kvs else None), int(d["header"]["revision"])

    def range(self, prefix: bytes) -> tuple[list[Item], int]:
        """In pages of RANGE_PAGE keys, each read at the revision of the first (one
        snapshot): etcd answers a range only once it has encoded all of it, and 700,000
        keys took longer than REQUEST_TIMEOUT, every listing then failing. A page's
        revision compacted meanwhile (a read slower than the compaction period) starts
        it again."""
        end = _b64(prefix_end(prefix))
        restarts = 0
        while True:
            out: list[Item] = []
            start, rev = prefix, 0
            try:
                while True:
                    body = {"key": _b64(start), "range_end": end, "limit": str(RANGE_PAGE)}
                    if rev:
                        body["revision"] = str(rev)
                    d = self._call("kv/range", body)
                    rev = rev or int(d["header"]["revision"])
                    kvs = d.get("kvs") or []
                    out.extend(_item(kv) for kv in kvs)
                    if not d.get("more") or not kvs:
                        return out, rev
                    start = out[-1].key + b"\x00"  # (the next key after the last one read)
            except RegistryUnavailable as e:
                restarts += 1
                if not rev or "compacted" not in str(e) or restarts > 2:
                    raise

    def _grant(self, ttl: float) -> str:
        # a grant resent after a lost answer only leaves an unused lease that expires
        asked = _lease_ttl(ttl)
        d = self._call("lease/grant", {"TTL": str(asked)})
        granted = int(d.get("TTL", asked))
        if granted > asked:  # (raised to etcd's minimum: that is its floor)
            self._floor = granted
        return d["ID"]

    def ttl_floor(self) -> float:
        """etcd's minimum lease TTL: learned from a grant it raised, else from a grant of
        one second made (and revoked) to ask."""
        if self._floor is None:
            d = self._call("lease/grant", {"TTL": "1"})
            floor = int(d.get("TTL", 1))
            try:
                self._call("lease/revoke", {"ID": d["ID"]})
            except RegistryUnavailable:
                pass  # (it lapses by itself)
            if self._floor is None:
                self._floor = floor if floor > 1 else 0
        return float(self._floor)

    def keep_alive(self, key: bytes, ttl: float) -> bool:
        """The lease of `key` kept alive (one LeaseKeepAlive through the gateway, after a
        read of the key that names its lease): no revision, no event, no raft proposal,
        where a put of the key was all three and an event to every watcher of its prefix.
        False when the key is absent, has no lease, or its lease is gone or of another
        TTL than a grant for `ttl` would be (a keep-alive renews the lease's own TTL)."""
        d = self._call("kv/range", {"key": _b64(key)})
        kvs = d.get("kvs") or []
        lease = kvs[0].get("lease") if kvs else None
        if not lease or lease == "0":
            return False
        r = self._call("lease/keepalive", {"ID": lease})
        granted = int((r.get("result") or r).get("TTL") or 0)
        asked = _lease_ttl(ttl)
        self._forget_lapsed()
        if granted > 0 and (granted == asked or granted == self._floor and asked < granted):
            # (etcd renewed it before its answer came: it runs out by then at the latest)
            self._kept[key] = (asked, lease, time.monotonic() + granted)
            return True
        self._kept.pop(key, None)
        return False

    def _forget_lapsed(self) -> None:
        """Forget the kept leases that have run out since they were last kept alive here:
        a key taken over by another client (a write lease's liveness key, once run out,
        granted to another host) or released by one is never kept alive here again, and
        its entry stayed for the life of the process. (Forgetting one is always safe: a
        put that would have joined it is put on a lease granted for it.)"""
        now = time.monotonic()
        for key in [k for k, (_, _, until) in self._kept.items() if until <= now]:
            del self._kept[key]

    def txn(self, compares: Sequence[Cmp], ops: Sequence[Op]) -> tuple[bool, int]:
        body_cmp = []
        for c in compares:
            if c.target == "mod":
                body_cmp.append({"key": _b64(c.key), "target": "MOD", "result": "EQUAL",
                                 "mod_revision": str(c.expected)})
            elif c.target == "exists":
                body_cmp.append({"key": _b64(c.key), "target": "CREATE", "result": "GREATER",
                                 "create_revision": "0"})
            elif c.target == "value":
                body_cmp.append({"key": _b64(c.key), "target": "VALUE", "result": "EQUAL",
                                 "value": _b64(c.expected)})
            else:
                raise ValueError(f"unknown compare target {c.target!r}")
        body_ops = []
        leases: dict[float, str] = {}
        joined = []  # (the kept keys whose leases puts join)
        for op in ops:
            if isinstance(op, Put):
                put = {"key": _b64(op.key), "value": _b64(op.value)}
                kept = self._kept.get(op.lease_of)
                if op.ttl is not None and kept is not None and kept[0] == _lease_ttl(op.ttl) \
                        and kept[2] > time.monotonic():
                    put["lease"] = kept[1]
                    joined.append(op.lease_of)
                else:
                    # (put on a lease of its own, or none: the lease kept for it, if any,
                    # is no longer the key's)
                    self._kept.pop(op.key, None)
                    if op.ttl is not None:
                        if op.ttl not in leases:
                            leases[op.ttl] = self._grant(op.ttl)
                        put["lease"] = leases[op.ttl]
                body_ops.append({"request_put": put})
            elif isinstance(op, Delete):
                body_ops.append({"request_delete_range": {"key": _b64(op.key)}})
                self._kept.pop(op.key, None)  # (a key deleted keeps no lease: not remembered)
            else:
                raise ValueError(f"unknown op {op!r}")
        try:
            d = self._call("kv/txn", {"compare": body_cmp, "success": body_ops}, idempotent=False)
        except RegistryUnavailable as e:
            if not joined or LEASE_NOT_FOUND not in str(e):
                raise
            # a kept lease ran out since (the host was away a while): refused whole,
            # nothing applied; again with leases of its own
            for key in joined:
                self._kept.pop(key, None)
            return self.txn(compares, ops)
        return bool(d.get("succeeded")), int(d["header"]["revision"])

    def _watch(self, prefix: bytes, after_rev: int, timeout: float):
        """The answers (`result`s) of one watch stream of the changes after after_rev, as
        they come, until a read timeout (`timeout` with nothing more) once the member
        confirmed the watch; a last None for a stream that ended, broke or was never
        confirmed (then the registry answered a read, maybe through another member: else
        RegistryUnavailable), or a compacted or cancelled watch: what came after is not
        known.

        The stream starts at after_rev itself, its events there dropped: etcd (3.4) drops
        a delete made at the very revision the history is compacted to, and a watch from
        that revision neither tells it nor is cancelled as compacted, so the change was
        lost; from the revision before, it is cancelled, and the caller reads again. And a
        member that takes the connection but never answers (stopped, say) was taken for
        one with nothing to tell, at every wait: the watch never went to another."""
        body = {"create_request": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                                   "start_revision": str(max(after_rev, 1))}}
        t = httpx.Timeout(CONNECT_TIMEOUT, read=max(timeout, 0.01))
        ep = self.endpoints[self._cur]
        confirmed = False
        try:
            with self._client.stream("POST", f"http://{ep}/v3/watch", json=body, timeout=t) as r:
                for line in r.iter_lines():
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    if result.get("compact_revision") or result.get("canceled"):
                        yield None
                        return
                    confirmed = True
                    events = result.get("events")
                    if events:
                        new = [e for e in events
                               if int(e.get("kv", {}).get("mod_revision", 0)) > after_rev]
                        if len(new) != len(events):
                            result = {**result, "events": new}
                    yield result
            yield None  # (the stream ended: nothing says what came after)
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            if confirmed and isinstance(e, httpx.ReadTimeout):
                return  # (nothing more within `timeout`)
            # read again through _call, which fails over or reports the outage
            self._call("kv/range", {"key": _b64(prefix), "limit": "1"})
            yield None

    def wait(self, prefix: bytes, after_rev: int, timeout: float,
             refreshes: bytes | None = None) -> bool:
        """One watch stream from after_rev + 1; returns at the first event or on timeout.
        Events that only refresh a key under `refreshes` (a put of a key that exists
        already, under a prefix whose keys hold nothing but a liveness mark) do not end
        the wait: every host's heartbeat is one, and each woke every host's map watcher
        into two reads of the cluster (N hosts: N² reads a heartbeat period). The wait
        may then outlast `timeout` by up to one read timeout (`timeout` itself)."""
        deadline = time.monotonic() + timeout
        for result in self._watch(prefix, after_rev, timeout):
            if result is None:
                return True
            events = result.get("events")
            if events and not (refreshes is not None
                               and all(_refresh(e, refreshes) for e in events)):
                return True
            if events and time.monotonic() >= deadline:
                return False  # (refreshes only)
        return False

    def changes(self, prefix: bytes, after_rev: int, timeout: float) -> tuple[list[bytes] | None, int]:
        """One watch stream from after_rev + 1, as wait(); at its first events, their keys
        and the revision of the last (etcd never splits one revision's events between two
        answers of a stream, and sends them in order: every change up to it is told)."""
        for result in self._watch(prefix, after_rev, timeout):
            if result is None:
                return None, -1
            events = result.get("events")
            if events:
                kvs = [e.get("kv", {}) for e in events]
                return ([base64.b64decode(kv.get("key", "")) for kv in kvs],
                        max(int(kv.get("mod_revision", 0)) for kv in kvs))
        return [], after_rev

    def compact(self, revision: int) -> None:
        """etcd keeps every value every key had since it was last compacted, and refuses
        all writes once its database reaches its quota (2 GiB by default; each heartbeat
        rewrites a host's keys, about 25 MB a day a host). A revision compacted already
        is no error. The space is reused, not given back to the file system: that takes
        `etcdctl defrag` (docs/operator-guide.md)."""
        try:
            self._call("kv/compaction", {"revision": str(revision)})
        except RegistryUnavailable as e:
            if "compacted" not in str(e):  # (etcd: "required revision has been compacted")
                raise

    def close(self) -> None:
        self._client.close()


def _refresh(event: dict, prefix: bytes) -> bool:
    """Whether a watch event is a put of a key under `prefix` that existed before it (its
    version past 1): a liveness mark made again (etcd leaves the type out for a put)."""
    if event.get("type", "PUT") != "PUT":
        return False
    kv = event.get("kv", {})
    return int(kv.get("version", 1)) > 1 and base64.b64decode(kv.get("key", "")).startswith(prefix)
