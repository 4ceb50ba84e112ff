"""TLS on the NBD port (NBD_OPT_STARTTLS, proto.md "TLS support") with real clients: libnbd,
nbdinfo and qemu-img, against the NBD runner (`python -m nbd_frontend.server --tls ...`) and
against a blockd sandbox configured with the nbd_tls keys. Certificates from trustme: a CA,
the server's certificate for 127.0.0.1, a client certificate the CA signed and one another
CA signed."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest
import trustme

from nbd_frontend import proto
from tests.conftest import need
from tests.interop.test_qemu_attach import qemu_io

ROOT = Path(__file__).resolve().parents[2]
SIZE = 16 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """server.pem / server.key / ca.pem, and client directories in the layout libnbd and
    QEMU read (ca-cert.pem, client-cert.pem, client-key.pem): `good` signed by the CA,
    `rogue` by another CA that trusts the server's CA, `anon` with the CA only."""
    d = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    for name, issuer in (("good", ca), ("rogue", other), ("anon", None)):
        c = d / name
        c.mkdir()
        ca.cert_pem.write_to_path(str(c / "ca-cert.pem"))
        if issuer is not None:
            cert = issuer.issue_cert(f"{name}-client@example.org")
            cert.cert_chain_pems[0].write_to_path(str(c / "client-cert.pem"))
            cert.private_key_pem.write_to_path(str(c / "client-key.pem"))
    return d


class Runner:
    def __init__(self, proc, port, log: Path):
        self.proc, self.port, self.log = proc, port, log

    def log_text(self) -> str:
        return self.log.read_text()


def start_runner(pki, tmp_path, mode: str, verify: bool) -> Runner:
    log = tmp_path / f"runner-{mode}.log"
    args = [sys.executable, "-m", "nbd_frontend.server", "--listen", "127.0.0.1:0",
            "--memory", f"disk={SIZE}", "--tls", mode, "-v"]
    if mode != "off":
        args += ["--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    if verify:
        args += ["--tls-ca", str(pki / "ca.pem")]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    match = re.search(r"listening on [\d.]+:(\d+)", proc.stdout.readline())
    if not match:
        proc.kill()
        raise RuntimeError(f"runner did not start: {log.read_text()[-2000:]}")
    return Runner(proc, int(match.group(1)), log)


@pytest.fixture
def runner(pki, tmp_path, request):
    mode, verify = request.param
    r = start_runner(pki, tmp_path, mode, verify)
    try:
        yield r
    finally:
        alive = r.proc.poll() is None
        r.proc.terminate()
        r.proc.wait(timeout=10)
        assert alive, f"the NBD runner died: {r.log_text()[-2000:]}"


def client(port: int, certs: Path | None, tls=None, export: str = "disk"):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE if tls is None else tls)
    if certs is not None:
        h.set_tls_certificates(str(certs))
    h.add_meta_context("base:allocation")
    h.set_export_name(export)
    h.connect_tcp("127.0.0.1", str(port))
    return h


def round_trip(h) -> None:
    """A 1 MiB write, 64 reads in flight, a hole, all checked."""
    data = random.randbytes(1 << 20)
    h.pwrite(data, 1 << 20)
    bufs = [(off, nbd.Buffer(16384)) for off in range(1 << 20, 2 << 20, 16384)]
    for off, buf in bufs:
        h.aio_pread(buf, off)
    while h.aio_in_flight():
        h.poll(-1)
    assert b"".join(bytes(b.to_bytearray()) for _, b in bufs) == data
    assert h.pread(4096, 8 << 20) == bytes(4096)
    extents = []
    h.block_status(1 << 20, 8 << 20,
                   lambda ctx, off, entries, err: extents.append(entries) or 0)
    assert extents and extents[0][1] & proto.STATE_HOLE  # (8 MiB: never written)


REQUIRE_VERIFY = pytest.mark.parametrize("runner", [("require", True)], indirect=True)


@REQUIRE_VERIFY
def test_libnbd_over_tls_with_a_client_certificate(runner, pki):
    h = client(runner.port, pki / "good")
    assert h.get_tls_negotiated()
    assert h.can_meta_context("base:allocation")  # (negotiated again after the upgrade)
    round_trip(h)
    h.shutdown()
    assert "good-client@example.org" in runner.log_text()


@pytest.mark.parametrize("runner", [("on", False)], indirect=True)
def test_many_large_requests_in_flight_over_tls(runner, pki):
    """16 MiB in 1 MiB and 4 KiB writes, 64 in flight, then read back the same way: more
    than the socket holds at once, both ways (the TLS channel's partial sends)."""
    h = client(runner.port, pki / "anon")
    blocks = {}
    for i in range(16):
        blocks[i << 20] = random.randbytes(1 << 20)
    for off in random.sample(range(0, 16 << 20, 4096), 200):
        blocks.pop(off & ~((1 << 20) - 1), None)
        blocks[off] = random.randbytes(4096)
    for off, data in blocks.items():
        while h.aio_in_flight() >= 64:
            h.poll(-1)
        h.aio_pwrite(data, off)
    while h.aio_in_flight():
        h.poll(-1)
    bufs = {}
    for off, data in blocks.items():
        while h.aio_in_flight() >= 64:
            h.poll(-1)
        bufs[off] = nbd.Buffer(len(data))
        h.aio_pread(bufs[off], off)
    while h.aio_in_flight():
        h.poll(-1)
    assert all(bytes(bufs[off].to_bytearray()) == data for off, data in blocks.items())
    h.shutdown()


@REQUIRE_VERIFY
def test_a_plaintext_client_is_refused_and_the_server_goes_on(runner, pki):
    with pytest.raises(nbd.Error, match="requires TLS"):
        client(runner.port, None, tls=nbd.TLS_DISABLE)
    h = client(runner.port, pki / "good")
    round_trip(h)


@REQUIRE_VERIFY
@pytest.mark.parametrize("who", ["rogue", "anon"])
def test_a_client_certificate_the_ca_did_not_sign_is_refused(runner, pki, who):
    with pytest.raises(nbd.Error):
        client(runner.port, pki / who)
    h = client(runner.port, pki / "good")  # (the server still serves)
    round_trip(h)
    for _ in range(50):
        if "TLS handshake failed" in runner.log_text():
            break
        time.sleep(0.1)
    assert "TLS handshake failed" in runner.log_text()


@pytest.mark.parametrize("runner", [("on", False)], indirect=True)
def test_tls_on_serves_both_kinds_of_client(runner, pki):
    tls = client(runner.port, pki / "anon")
    assert tls.get_tls_negotiated()
    round_trip(tls)
    plain = client(runner.port, None, tls=nbd.TLS_DISABLE)
    assert not plain.get_tls_negotiated()
    round_trip(plain)
    # the same export through both: what one wrote, the other reads
    data = random.randbytes(65536)
    tls.pwrite(data, 12 << 20)
    assert plain.pread(65536, 12 << 20) == data


@REQUIRE_VERIFY
def test_nbdinfo_map_over_tls(runner, pki):
    h = client(runner.port, pki / "good")
    h.pwrite(b"\x01" * 65536, 0)
    h.shutdown()
    uri = f"nbds://127.0.0.1:{runner.port}/disk?tls-certificates={pki / 'good'}"
    out = subprocess.run([need("nbdinfo"), "--json", "--map", uri], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    extents = json.loads(out.stdout)
    assert extents[0]["offset"] == 0 and extents[0]["length"] >= 65536
    assert any(e["description"] == "hole,zero" for e in extents)


@REQUIRE_VERIFY
def test_qemu_img_convert_and_compare_over_tls(runner, pki, tmp_path):
    image = tmp_path / "src.raw"
    image.write_bytes(random.randbytes(SIZE))
    obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / 'good'}"
    target = f"driver=nbd,host=127.0.0.1,port={runner.port},export=disk,tls-creds=tls0"
    conv = subprocess.run([need("qemu-img"), "convert", "-n", "-f", "raw", "--object", obj,
                           "--target-image-opts", str(image), target],
                          capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stderr
    cmp = subprocess.run([need("qemu-img"), "compare", "--object", obj, "--image-opts",
                          f"driver=raw,file.filename={image}", target],
                         capture_output=True, text=True, timeout=120)
    assert cmp.returncode == 0 and "identical" in cmp.stdout, cmp.stdout + cmp.stderr


@REQUIRE_VERIFY
def test_garbage_instead_of_a_tls_hello_is_dropped(runner, pki):
    """STARTTLS acknowledged, then bytes that are not TLS: the connection ends, the server
    goes on."""
    with socket.create_connection(("127.0.0.1", runner.port), timeout=10) as s:
        greeting = s.recv(18, socket.MSG_WAITALL)
        assert greeting[:8] == b"NBDMAGIC"
        s.sendall(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE)
                  + struct.pack(">QII", proto.IHAVEOPT, proto.OPT_STARTTLS, 0))
        magic, option, rtype, length = struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))
        assert (magic, option, rtype, length) == (proto.REPLY_MAGIC, proto.OPT_STARTTLS,
                                                  proto.REP_ACK, 0)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        rest = b""
        while chunk := s.recv(4096):  # (a TLS alert, perhaps, then the end)
            rest += chunk
    round_trip(client(runner.port, pki / "good"))


@REQUIRE_VERIFY
def test_a_record_that_does_not_decrypt_ends_only_that_connection(runner, pki):
    """After the upgrade, bytes that are not a record of the session: a warning, that
    connection dropped, no traceback, the server goes on."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "good" / "client-cert.pem"), str(pki / "good" / "client-key.pem"))
    with socket.create_connection(("127.0.0.1", runner.port), timeout=10) as s:
        s.recv(18, socket.MSG_WAITALL)
        s.sendall(struct.pack(">I", proto.FLAG_C_FIXED_NEWSTYLE)
                  + struct.pack(">QII", proto.IHAVEOPT, proto.OPT_STARTTLS, 0))
        assert struct.unpack(">QIII", s.recv(20, socket.MSG_WAITALL))[2] == proto.REP_ACK
        tls = ctx.wrap_socket(s, server_hostname="127.0.0.1")
        raw = socket.socket(fileno=os.dup(tls.fileno()))  # (the same connection, unencrypted)
        with raw:
            raw.sendall(b"\x17\x03\x03\x00\x20" + bytes(32))  # application data, forged
            raw.settimeout(10)
            while raw.recv(4096):  # (an alert, then the end)
                pass
    round_trip(client(runner.port, pki / "good"))
    for _ in range(50):
        if "nbd TLS error, disconnecting" in runner.log_text():
            break
        time.sleep(0.1)
    log = runner.log_text()
    assert "nbd TLS error, disconnecting" in log and "Traceback" not in log, log[-2000:]


def test_the_runner_refuses_client_certificates_with_tls_optional(pki):
    p = subprocess.run([sys.executable, "-m", "nbd_frontend.server", "--listen", "127.0.0.1:0",
                        "--tls", "on", "--tls-cert", str(pki / "server.pem"), "--tls-key",
                        str(pki / "server.key"), "--tls-ca", str(pki / "ca.pem")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "only when TLS is required" in p.stderr, p.stderr


# --- blockd: the nbd_tls keys ----------------------------------------------------------------

def vbp(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "control.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def test_blockd_serves_a_volume_over_tls_from_its_config(pki, tmp_path):
    d = tmp_path / "sb"
    sets = ["--set", "nbd_tls=require", "--set", f"nbd_tls_cert={pki / 'server.pem'}",
            "--set", f"nbd_tls_key={pki / 'server.key'}", "--set", f"nbd_tls_ca={pki / 'ca.pem'}"]
    up = vbp("sandbox", "up", "--hosts", "1", "--dir", str(d), "--json", *sets)
    assert up.returncode == 0, up.stderr
    try:
        host = json.loads(up.stdout)["hosts"][0]
        env = {**os.environ, "VBP_REGISTRY": f"lmdb://{d}/registry"}
        made = vbp("volume", "create", "v", "--size", "64M", "--replicas", "1", env=env)
        assert made.returncode == 0, made.stderr
        with pytest.raises(nbd.Error, match="requires TLS"):
            client(host["nbd_port"], None, tls=nbd.TLS_DISABLE, export="v")
        h = client(host["nbd_port"], pki / "good", export="v")
        assert h.get_tls_negotiated()
        round_trip(h)
        big = random.randbytes(4 << 20)  # (large reads, which in the clear leave from the
        h.pwrite(big, 8 << 20)           # page cache without a copy, are encrypted here)
        assert h.pread(4 << 20, 8 << 20) == big
        h.flush()
        h.shutdown()
        qemu_writes_over_tls(pki, tmp_path, host["nbd_port"], "v")
        h = client(host["nbd_port"], pki / "good", export="v")
        assert h.pread(256 << 10, 4 << 20) == b"\x42" * (256 << 10)  # what QEMU wrote
        h.shutdown()
        import_and_export_over_tls(pki, tmp_path, env)
    finally:
        vbp("sandbox", "down", "--dir", str(d))


def import_and_export_over_tls(pki, tmp_path, env) -> None:
    """`vbp volume import` and `export` through hosts that require TLS: with
    --tls-certificates (or VBP_TLS_CERTIFICATES) the copy goes over TLS; without, the
    refusal says what to give."""
    image = tmp_path / "image.raw"
    data = random.randbytes(3 << 20)
    with open(image, "wb") as f:
        f.write(data)
        f.seek(40 << 20)  # (a hole, then data again)
        f.write(data[:4096])
    refused = vbp("volume", "import", str(image), "v", env=env)
    assert refused.returncode != 0
    assert "requires TLS" in refused.stderr and "--tls-certificates" in refused.stderr, \
        refused.stderr
    done = vbp("volume", "import", str(image), "v", "--tls-certificates", str(pki / "good"),
               "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["uri"].startswith("nbds://")
    out = tmp_path / "out.raw"
    done = vbp("volume", "export", "v", str(out), "--json",
               env={**env, "VBP_TLS_CERTIFICATES": str(pki / "good")})
    assert done.returncode == 0, done.stderr
    got = out.read_bytes()
    assert len(got) == 64 << 20
    assert got[:3 << 20] == data and got[40 << 20:(40 << 20) + 4096] == data[:4096]
    assert got[3 << 20:40 << 20].count(0) == (37 << 20)
    # a client certificate the hosts' CA did not sign: refused, and the message says
    # where to look
    rogue = vbp("volume", "export", "v", str(tmp_path / "rogue.raw"),
                "--tls-certificates", str(pki / "rogue"), env=env)
    assert rogue.returncode != 0 and "TLS handshake failed" in rogue.stderr, rogue.stderr
    assert not (tmp_path / "rogue.raw").exists()


@pytest.mark.parametrize("runner", [("off", False)], indirect=True)
def test_a_transfer_asking_tls_of_a_server_without_it_says_so(runner, pki):
    from control.nbd_client import TransferError, connect
    with pytest.raises(TransferError, match="does not offer TLS: leave out --tls-certificates"):
        connect(f"nbds://127.0.0.1:{runner.port}/disk", 10, pki / "good")


def test_tls_certificates_must_name_a_directory(tmp_path):
    p = vbp("volume", "export", "v", str(tmp_path / "o.raw"), "--tls-certificates",
            str(tmp_path / "missing"), env={**os.environ, "VBP_REGISTRY": "memory://"})
    assert p.returncode == 2 and "does not exist" in p.stderr, p.stderr


def qemu_writes_over_tls(pki, tmp_path, port: int, export: str) -> None:
    """QEMU attaches the export with -blockdev over TLS (the operator guide's command line)
    and writes and reads through its block layer."""
    out = qemu_io(
        ["-object", f"tls-creds-x509,id=tls0,endpoint=client,dir={pki / 'good'}",
         "-blockdev", f"driver=nbd,node-name=d0,server.type=inet,server.host=127.0.0.1,"
                      f"server.port={port},export={export},tls-creds=tls0",
         "-device", "virtio-blk-pci,drive=d0,share-rw=on"],  # (so qemu-io may write too)
        str(tmp_path / "qmp.sock"), ("write -P 0x42 4M 256k", "flush", "read -P 0x42 4M 256k"))
    assert "wrote 262144/262144 bytes at offset 4194304" in out, out
    assert "read 262144/262144 bytes at offset 4194304" in out, out
