"""Peer authentication between real blockd processes: hosts given the pool's peer secret
(peer_secret_file) replicate to each other, and a client without it is served nothing,
its forged fencing token included (replicator.transport, peer authentication)."""

from __future__ import annotations

import json
import os
import socket

from replicator import messages as m
from replicator.codec import NEED_DATA, PeerCodec
from tests.conftest import SandboxHandle, run_vbp
from tests.faults.test_replication_faults import connect
from vbp.registry import open_registry


def _wire(codec: PeerCodec, request_id: int, msg) -> bytes:
    frame = codec.encode(request_id, msg)
    return frame if isinstance(frame, (bytes, bytearray)) else b"".join(frame)


def _stranger(port: int, hello: m.Hello, *then) -> list:
    """What a host answers a client that sends `hello` and the frames of `then` at once."""
    codec = PeerCodec()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(_wire(codec, i, x) for i, x in enumerate((hello, *then))))
        got = []
        while True:
            event = codec.next_event()
            if event is NEED_DATA:
                data = s.recv(65536)
                codec.receive_data(data)
                if not data:
                    break
                continue
            if type(event) is not tuple:
                break
            got.append(event[1])
        return got


def test_hosts_with_the_secret_replicate_and_a_stranger_is_refused(tmp_path):
    secret = tmp_path / "peer.secret"
    secret.write_bytes(os.urandom(32).hex().encode() + b"\n")
    secret.chmod(0o600)
    sb = SandboxHandle(tmp_path / "sb", 2)
    p = run_vbp("sandbox", "up", "--hosts", 2, "--dir", sb.dir, "--base-port", sb.base_port,
                "--json", "--set", f"peer_secret_file={secret}", check=False)
    assert p.returncode == 0, p.stderr
    sb.info = json.loads(p.stdout)
    try:
        # replicas=2, min_size=2: a write is acknowledged once both hosts have it, which
        # takes the peer link between them, authenticated
        sb.vbp("volume", "create", "v", "--size", "64M", "--replicas", "2", "--min-size", "2")
        h = connect(sb.uri("v", 0))
        h.pwrite(b"authenticated" * 315, 0)
        h.flush()
        h.shutdown()
        h = connect(sb.uri("v", 1))
        assert h.pread(13, 0) == b"authenticated"
        h.shutdown()
        with open_registry(sb.registry) as reg:
            assert reg.list_stale() == []
            lineage = reg.get_volume("v")["lineage"]
            token = reg.lease_tokens().get("v", 0)
        # a stranger naming the cluster: refused, whatever it sends behind its Hello
        port = sb.info["hosts"][1]["peer_port"]
        forged = m.WriteChunk("v", lineage, 0, 1, (1,), 0, b"x" * 4096, 4 << 20, 0, False,
                              1 << 30, 2**63 - 1)
        got = _stranger(port, m.Hello("vbp", "stranger", m.PROTO_VERSION), forged)
        assert [type(x) for x in got] == [m.Error] and got[0].code == m.AUTH, got
        got = _stranger(port, m.Hello("vbp", "stranger", m.PROTO_VERSION, "00" * 16), forged)
        assert [type(x) for x in got] == [m.HelloOk, m.Error] and got[1].code == m.AUTH, got
        assert "refusing peer connection from 127.0.0.1 (host stranger says)" in sb.log(1)
        # nothing of it was taken: the volume's holder still writes, with its own token
        h = connect(sb.uri("v", 0))
        h.pwrite(b"still" * 819, 4096)
        h.flush()
        assert h.pread(5, 4096) == b"still"
        h.shutdown()
        with open_registry(sb.registry) as reg:
            assert reg.list_stale() == [] and reg.lease_tokens().get("v", 0) >= token
        assert "fenced" not in sb.log(0).lower() and "fenced" not in sb.log(1).lower()
    finally:
        sb.down()
