"""What the heartbeats of idle hosts cost a real etcd.

    python -m bench.registry_load [--hosts 20] [--period 0.5] [--seconds 10]

Starts a private etcd on loopback ports (the tests' EtcdProcess), registers `hosts` hosts
and runs their heartbeats from threads every `period` seconds, with stats as blockd sends
them, then reports over `seconds`:
- the events one watch of the cluster prefix is told a second: what each host's map
  watcher receives (N hosts: N times that for etcd to send);
- etcd's committed raft proposals a second (etcd_server_proposals_committed_total);
- the HTTP requests a heartbeat makes, by kind.
A benchmark reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.etcd import EtcdProcess
from vbp.cluster import HostRecord
from vbp.registry import open_registry
from vbp.registry.base import P_CLUSTER
from vbp.registry.kv import prefix_end


def _proposals(endpoint: str) -> float:
    text = httpx.get(f"http://{endpoint}/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("etcd_server_proposals_committed_total"))


def _watch(endpoint: str, counted: list, stop: threading.Event) -> None:
    """Count the events of one watch of the cluster prefix into counted[0]."""
    body = {"create_request": {"key": base64.b64encode(P_CLUSTER).decode(),
                               "range_end": base64.b64encode(prefix_end(P_CLUSTER)).decode()}}
    with httpx.stream("POST", f"http://{endpoint}/v3/watch", json=body, timeout=None) as r:
        for line in r.iter_lines():
            if stop.is_set():
                return
            counted[0] += len(json.loads(line).get("result", {}).get("events", []))


def measure(hosts: int, period: float, seconds: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="vbp-registry-load-") as tmp:
        etcd = EtcdProcess(Path(tmp) / "data", election_ms=1000).start()
        try:
            regs = [open_registry(etcd.url) for _ in range(hosts)]
            for i, reg in enumerate(regs):
                reg.register_host(HostRecord(id=f"h{i}", peer=f"127.0.0.1:{7000 + i}",
                                             nbd=f"127.0.0.1:{9000 + i}", capacity=1 << 30), 6)
            calls: collections.Counter = collections.Counter()
            real = regs[0].kv._call

            def counting(path, body, **kw):
                calls[path] += 1
                return real(path, body, **kw)

            regs[0].kv._call = counting
            stop = threading.Event()
            beats = [0]

            def beat(i: int) -> None:
                while not stop.is_set():
                    regs[i].heartbeat(f"h{i}", 6, {"used": int(time.time())})
                    if i == 0:
                        beats[0] += 1
                    time.sleep(period)

            events = [0]
            watcher = threading.Thread(target=_watch, args=(etcd.endpoint, events, stop),
                                       daemon=True)
            watcher.start()
            time.sleep(0.5)
            threads = [threading.Thread(target=beat, args=(i,)) for i in range(hosts)]
            p0, events[0] = _proposals(etcd.endpoint), 0
            for t in threads:
                t.start()
            time.sleep(seconds)
            p1, told = _proposals(etcd.endpoint), events[0]
            stop.set()
            for t in threads:
                t.join()
            for reg in regs:
                reg.close()
            return {"hosts": hosts, "period": period, "seconds": seconds,
                    "watch_events_per_s": told / seconds,
                    "raft_proposals_per_s": (p1 - p0) / seconds,
                    "requests_per_heartbeat": {k: v / max(1, beats[0]) for k, v in calls.items()}}
        finally:
            etcd.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=20)
    ap.add_argument("--period", type=float, default=0.5, help="seconds between heartbeats")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    r = measure(args.hosts, args.period, args.seconds)
    print(f"{r['hosts']} hosts, a heartbeat every {r['period']} s, over {r['seconds']} s: "
          f"{r['watch_events_per_s']:.1f} events/s on a watch of the cluster prefix, "
          f"{r['raft_proposals_per_s']:.1f} raft proposals/s; requests a heartbeat: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["requests_per_heartbeat"].items())))


if __name__ == "__main__":
    main()
