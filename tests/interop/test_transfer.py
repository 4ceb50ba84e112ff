"""`vbp volume import` / `export` (control.transfer) against a real 3-host sandbox: holes stay
holes both ways, the round trip is byte-identical, a used volume is overwritten exactly,
snapshots export, a volume fragmented page by page copies both ways, and every misuse is one
clear VbpError. Against nbdkit (its filters make the servers blockd should never be, on
purpose): a server that stops answering fails the transfer after its timeout, one slow but
steady does not; a fragmented map costs bounded memory and few requests; a failed or
interrupted export leaves no partial file and the file it was to replace whole."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import nbd  # python3-libnbd: make test installs it
import pytest

from control import transfer
from control.transfer import (TransferError, TransferStats, export_volume, import_file,
                              volume_uri)
from tests.conftest import ROOT, nbdkit_unix, need, run_vbp, stop_process
from tests.interop.fragment import fragment
from vbp.errors import AlreadyExists, InvalidArgument, NotFound

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20
PAGE = 4096
FILE_SIZE = 64 * MiB + 1000  # not a multiple of 512 on purpose


def make_sparse(path, size: int, seed: int) -> list[tuple[int, int]]:
    """A sparse file of `size` bytes with a few random data extents (one holding an
    all-zero MiB, one at the very end); returns the written (start, end) ranges."""
    rng = random.Random(seed)
    written = []
    with open(path, "wb") as f:
        f.truncate(size)
        for slot in range(5):  # one extent in each 12 MiB slot, so they never touch
            start = slot * 12 * MiB + rng.randrange(0, 8 * MiB) // PAGE * PAGE + rng.randrange(PAGE)
            n = rng.randrange(100 * 1024, 3 * MiB)
            f.seek(start)
            f.write(rng.randbytes(n))
            written.append((start, start + n))
        f.seek(written[1][0] + 64 * 1024)  # zeroes written as data inside an extent
        f.write(bytes(MiB))
        f.seek(size - 300)
        f.write(rng.randbytes(300))
        written.append((size - 300, size))
    return written


def nbd_map(uri: str) -> list[dict]:
    p = subprocess.run([need("nbdinfo"), "--map", "--json", uri], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def zero_at(extents: list[dict], a: int, b: int) -> bool:
    """Whether the map says [a, b) reads as zero (state bit 2)."""
    return all(e["type"] & 2 for e in extents
               if e["offset"] < b and e["offset"] + e["length"] > a)


def read_volume(uri: str) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    out = bytearray()
    for off in range(0, size, 32 * MiB):
        out += h.pread(min(32 * MiB, size - off), off)
    h.shutdown()
    return bytes(out)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "sparse.img"
    written = make_sparse(path, FILE_SIZE, seed=5)
    assert allocated(path) < 16 * MiB  # the file system kept our holes
    return path, written


@pytest.fixture(scope="module")
def imported(sandbox, image):
    """The sparse image imported into a fresh replicas=3 volume `imp` through host 1."""
    path, written = image
    sandbox.vbp("volume", "create", "imp", "--size", "128M", "--replicas", "3")
    calls = []
    stats = import_file(path, sandbox.uri("imp", 0), progress=lambda d, t: calls.append((d, t)))
    return stats, calls


def test_import_keeps_holes(sandbox, image, imported):
    path, written = image
    stats, calls = imported
    assert isinstance(stats, TransferStats)
    assert stats.bytes_total == FILE_SIZE
    assert stats.bytes_data + stats.bytes_zero + stats.bytes_holes == FILE_SIZE
    data = sum(e - s for s, e in written)
    assert stats.bytes_data < data  # the zero MiB inside an extent was not sent as data
    assert stats.bytes_zero == 0  # a new volume is all holes: no zero requests needed
    assert stats.bytes_tail_zeroed == 0
    # progress: monotonic, ends at the total
    assert calls and calls[-1] == (FILE_SIZE, FILE_SIZE)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))

    # the map, seen through another host: data where the file has data, zero elsewhere
    extents = nbd_map(sandbox.uri("imp", 1))
    total_data = sum(e["length"] for e in extents if not e["type"] & 2)
    assert total_data <= data + len(written) * 2 * PAGE
    for (s, e), (s2, _) in zip(written, written[1:] + [(FILE_SIZE + PAGE, 0)]):
        assert not zero_at(extents, s, min(e, s + 16))
        gap_a, gap_b = -(-e // PAGE) * PAGE, min(s2, FILE_SIZE) // PAGE * PAGE
        if gap_b > gap_a:
            assert zero_at(extents, gap_a, gap_b), (gap_a, gap_b)
    zs = written[1][0] + 64 * 1024
    assert zero_at(extents, -(-zs // (64 * 1024)) * 64 * 1024, zs + MiB - 64 * 1024)
    assert zero_at(extents, 70 * MiB, 128 * MiB)


def test_export_round_trip_is_identical_and_sparse(sandbox, image, imported, tmp_path):
    path, written = image
    out = tmp_path / "out.img"
    calls = []
    stats = export_volume(sandbox.uri("imp", 2), out, progress=lambda d, t: calls.append((d, t)))
    assert out.stat().st_size == 128 * MiB
    assert stats.bytes_total == 128 * MiB and calls[-1] == (128 * MiB, 128 * MiB)
    assert stats.bytes_data + stats.bytes_holes == 128 * MiB
    got, want = out.read_bytes(), path.read_bytes()
    assert got[:FILE_SIZE] == want
    assert got[FILE_SIZE:] == bytes(128 * MiB - FILE_SIZE)
    assert allocated(out) <= allocated(path) + 4 * PAGE
    assert allocated(out) < 16 * MiB

    # an existing output is refused, and kept; overwrite replaces it
    with pytest.raises(AlreadyExists, match="exists"):
        export_volume(sandbox.uri("imp", 0), out)
    assert out.stat().st_size == 128 * MiB
    out.write_bytes(b"junk" * 1000)
    export_volume(sandbox.uri("imp", 0), out, overwrite=True)
    assert out.read_bytes()[:FILE_SIZE] == want and allocated(out) < 16 * MiB


def test_import_over_data_zeroes_holes_and_tail(sandbox, image, tmp_path):
    path, _ = image
    sandbox.vbp("volume", "create", "used", "--size", "96M", "--replicas", "1")
    uri = sandbox.uri("used", 0)
    h = nbd.NBD()
    h.connect_uri(uri)
    junk = random.Random(9).randbytes(4 * MiB)
    for off in range(0, 96 * MiB, 4 * MiB):
        h.pwrite(junk, off)
    h.shutdown()

    stats = import_file(path, uri)
    assert stats.bytes_zero > 50 * MiB  # the file's holes, zeroed
    assert stats.bytes_tail_zeroed == 96 * MiB - FILE_SIZE
    content = read_volume(sandbox.uri("used", 1))
    assert content[:FILE_SIZE] == path.read_bytes()
    assert content[FILE_SIZE:] == bytes(96 * MiB - FILE_SIZE)
    extents = nbd_map(uri)
    assert zero_at(extents, 70 * MiB, 96 * MiB)  # zeroed, not written: holes again
    assert sum(e["length"] for e in extents if not e["type"] & 2) < 16 * MiB


def test_import_from_standard_input_round_trips_and_keeps_holes(sandbox, image, tmp_path):
    """`xz -dc disk.raw.xz | vbp volume import - NAME`, as `rbd import -`: `-` was taken
    for a file of that name ("-: no such file or directory", exit 3), and export refuses
    `-` as bad usage. Read from the pipe as it comes: the volume, used before, reads as
    the stream followed by zeroes; the stream's zero runs are not written; a stream
    larger than the volume fails saying so and leaves the volume marked incomplete;
    ./- still names a file."""
    path, written = image
    sandbox.vbp("volume", "create", "piped", "--size", "96M", "--replicas", "1")
    h = nbd.NBD()
    h.connect_uri(sandbox.uri("piped", 0))
    for off in range(0, 96 * MiB, 8 * MiB):
        h.pwrite(b"\xff" * MiB, off)
    h.flush()
    h.shutdown()

    def piped(src, name, *args, cwd=ROOT):
        producer = subprocess.Popen(["cat", str(src)], stdout=subprocess.PIPE)
        try:
            return subprocess.run([sys.executable, "-m", "control.cli", "--registry",
                                   sandbox.registry, "volume", "import", *args, "-", name],
                                  stdin=producer.stdout, capture_output=True, text=True,
                                  cwd=cwd, timeout=120,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        finally:
            producer.stdout.close()
            producer.wait()

    p = piped(path, "piped", "--json")
    assert p.returncode == 0, p.stderr
    stats = json.loads(p.stdout)
    assert stats["file"] == "standard input" and stats["bytes_total"] == FILE_SIZE
    assert stats["bytes_data"] < sum(e - s for s, e in written)  # (its zero MiB: not sent)
    content = read_volume(sandbox.uri("piped", 1))
    assert content[:FILE_SIZE] == path.read_bytes()
    assert content[FILE_SIZE:] == bytes(96 * MiB - FILE_SIZE)
    extents = nbd_map(sandbox.uri("piped", 0))
    assert sum(e["length"] for e in extents if not e["type"] & 2) < 16 * MiB
    assert zero_at(extents, 70 * MiB, 96 * MiB)

    big = tmp_path / "big.raw"
    big.write_bytes(b"\x01" * (97 * MiB))
    p = piped(big, "piped")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "standard input is larger than the volume" in p.stderr, p.stderr
    assert "warning: volume piped: the import of standard input" in \
        sandbox.vbp("volume", "show", "piped").stdout

    work = tmp_path / "work"
    work.mkdir()
    (work / "-").write_bytes(b"a file named -")
    p = subprocess.run([sys.executable, "-m", "control.cli", "--registry", sandbox.registry,
                        "volume", "import", "./-", "piped"], capture_output=True, text=True,
                       cwd=work, timeout=120, stdin=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert read_volume(sandbox.uri("piped", 0))[:20] == b"a file named -" + bytes(6)
    assert "warning" not in sandbox.vbp("volume", "show", "piped").stdout


def test_export_snapshot(sandbox, image, imported, tmp_path):
    path, _ = image
    sandbox.vbp("volume", "snapshot", "imp", "s1")
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB + 5)
        f.write(random.Random(77).randbytes(MiB))
    import_file(other, sandbox.uri("imp", 0))  # the volume moves on; the snapshot does not

    from vbp.registry import open_registry

    reg = open_registry(sandbox.registry)
    uri = volume_uri(reg, "imp@s1")
    assert uri.endswith("/imp@s1") and uri.startswith("nbd://127.0.0.1:")
    out = tmp_path / "snap.img"
    export_volume(uri, out)
    assert out.read_bytes()[:FILE_SIZE] == path.read_bytes()
    assert allocated(out) < 16 * MiB
    with pytest.raises(InvalidArgument, match="read-only"):
        import_file(other, uri)

    head = tmp_path / "head.img"
    export_volume(volume_uri(reg, "imp", host="host3"), head)
    assert head.read_bytes()[:8 * MiB] == other.read_bytes()
    assert head.read_bytes()[8 * MiB:] == bytes(120 * MiB)


def test_errors(sandbox, image, tmp_path):
    path, _ = image
    sandbox.vbp("volume", "create", "tiny", "--size", "16M", "--replicas", "1")
    with pytest.raises(InvalidArgument, match=r"larger than the volume \(16777216 bytes\)"):
        import_file(path, sandbox.uri("tiny", 0))
    with pytest.raises(NotFound, match="no such file"):
        import_file(tmp_path / "missing.img", sandbox.uri("tiny", 0))
    with pytest.raises(InvalidArgument, match="is a directory"):
        import_file(tmp_path, sandbox.uri("tiny", 0))
    with pytest.raises(NotFound, match="no such volume"):
        import_file(path, sandbox.uri("nosuch", 0))
    with pytest.raises(NotFound, match="no such volume"):
        export_volume(sandbox.uri("nosuch", 0), tmp_path / "x.img")
    assert not (tmp_path / "x.img").exists()
    # (the file is to be made: what lacks is its directory, named)
    with pytest.raises(NotFound, match=f"cannot create .*: no such directory {tmp_path}/nodir$"):
        export_volume(sandbox.uri("tiny", 0), tmp_path / "nodir" / "x.img")
    # a directory where no file can be made (/proc): not "no such file", which it is not
    with pytest.raises(TransferError, match=r"cannot create /proc/version: a new file in /proc: "):
        export_volume(sandbox.uri("tiny", 0), "/proc/version", overwrite=True)
    with pytest.raises(AlreadyExists, match=r"exists \(--force replaces it\)"):
        export_volume(sandbox.uri("tiny", 0), path)
    with pytest.raises(TransferError, match="connection refused"):
        export_volume("nbd://127.0.0.1:1/tiny", tmp_path / "y.img")
    assert not (tmp_path / "y.img").exists()

    from vbp.registry import open_registry

    reg = open_registry(sandbox.registry)
    with pytest.raises(NotFound):
        volume_uri(reg, "nosuch")
    with pytest.raises(NotFound, match="no snapshot"):
        volume_uri(reg, "tiny@nope")
    with pytest.raises(NotFound, match="no host"):
        volume_uri(reg, "tiny", host="host9")


def test_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    """A FIFO is no image (neither a regular file nor a block device): refused at once, not
    after an open() that waits for a writer who may never come (`vbp volume import` hung)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []

    def run():
        try:
            import_file(fifo, "nbd://127.0.0.1:1/never")
        except Exception as e:
            got.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # (a writer comes and goes: the open returns, the thread ends)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("import_file waited in open() for a writer of the named pipe")
    assert len(got) == 1 and isinstance(got[0], InvalidArgument), got
    assert "not a regular file or block device" in str(got[0])


def test_the_cli_refuses_a_named_pipe_without_waiting_for_a_writer(sandbox, tmp_path):
    """The same through `vbp volume import`: its look at the image's first bytes (is it
    a qcow2?) opened the FIFO first, and waited there for good."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    sandbox.vbp("volume", "create", "fifo-target", "--size", "4M", "--replicas", "1")
    p = sandbox.vbp("volume", "import", fifo, "fifo-target", check=False, timeout=30)
    assert p.returncode == 1, p.stderr
    assert "not a regular file or block device" in p.stderr and p.stderr.count("\n") == 1
    assert transfer.image_format(fifo) is None


# --- a server that stops answering ----------------------------------------------------------


nbdkit = nbdkit_unix  # (tests.conftest)


def test_export_from_a_server_that_stops_answering_fails_after_the_timeout(tmp_path):
    """The server takes the READs and never answers (a blockd SIGSTOPped or hung after the
    handshake): the export fails after its timeout and leaves no file."""
    out = tmp_path / "out.img"
    with nbdkit(tmp_path, "--filter=delay", "pattern", "size=8M", "delay-read=3600") as uri:
        t0 = time.monotonic()
        with pytest.raises(TransferError, match=r"no reply from .*nbdkit\.sock in 1 s"):
            export_volume(uri, out, timeout=1)
        assert time.monotonic() - t0 < 10
    assert not out.exists()


def test_import_into_a_server_that_stops_answering_fails_after_the_timeout(tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(random.Random(3).randbytes(4 * MiB))
    with nbdkit(tmp_path, "--filter=delay", "memory", "8M", "delay-write=3600") as uri:
        t0 = time.monotonic()
        with pytest.raises(TransferError, match=r"no reply from .* in 1\.5 s"):
            import_file(src, uri, timeout=1.5)
        assert time.monotonic() - t0 < 10


def test_a_server_that_never_answers_the_handshake_fails_after_the_timeout(tmp_path):
    """A stopped blockd's kernel still accepts the TCP connection; no handshake follows."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(TransferError, match=rf"no reply from 127\.0\.0\.1:{port} in 1 s"):
            export_volume(f"nbd://127.0.0.1:{port}/vol", tmp_path / "x.img", timeout=1)
        assert time.monotonic() - t0 < 10
    assert not (tmp_path / "x.img").exists()


def test_a_slow_but_steady_server_is_no_timeout(tmp_path):
    """One request at a time, 0.2 s each: the last of 16 in flight waits 3.2 s, beyond the
    1 s timeout, but a reply comes every 0.2 s (a volume under QoS limits)."""
    out = tmp_path / "out.img"
    with nbdkit(tmp_path, "--filter=noparallel", "--filter=delay", "pattern", "size=40M",
                "delay-read=200ms") as uri:
        stats = export_volume(uri, out, timeout=1)
    assert stats.bytes_data == 40 * MiB
    data = out.read_bytes()
    for off in (0, 8, 17 * MiB, 40 * MiB - 8):  # pattern: each 8 bytes hold their offset
        assert int.from_bytes(data[off:off + 8], "big") == off


# --- durability ----------------------------------------------------------------------------


def test_the_import_flushes_only_once_every_write_is_answered(tmp_path):
    """proto.md: a FLUSH makes durable the writes answered before it, not those still in
    flight with it (blockd's gateway: "every write answered before this call"). So the
    import's flush goes out once every write and zero it sent is answered: sent with them,
    it may cover none of them, and a crash right after an import reported as done loses its
    last 32 MiB. The log filter shows the order the server saw (writes take 100 ms)."""
    disk, src, log = tmp_path / "disk.img", tmp_path / "src.img", tmp_path / "nbdkit.log"
    disk.write_bytes(b"")
    os.truncate(disk, 16 * MiB)
    rng = random.Random(8)
    src.write_bytes(rng.randbytes(3 * MiB) + bytes(2 * MiB) + rng.randbytes(3 * MiB + 5))
    with nbdkit(tmp_path, "--filter=log", "--filter=delay", "file", str(disk),
                f"logfile={log}", "delay-write=100ms", "delay-zero=100ms") as uri:
        stats = import_file(src, uri)
    assert stats.bytes_data == 6 * MiB + 5
    assert disk.read_bytes()[:8 * MiB + 5] == src.read_bytes()
    sent, answered, flushes = set(), set(), []
    for line in log.read_text().splitlines():
        m = re.search(r"connection=\d+ (\.\.\.)?(Write|Zero|Flush) id=(\d+)", line)
        if m is None:
            continue
        reply, kind, rid = bool(m.group(1)), m.group(2), int(m.group(3))
        if kind == "Flush" and not reply:
            flushes.append(sent - answered)
        elif kind != "Flush":
            (answered if reply else sent).add(rid)
    assert sent and sent == answered
    assert flushes and flushes[-1] == set(), \
        f"the flush went out with {len(flushes[-1])} of {len(sent)} writes unanswered"


def test_cli_export_through_a_stopped_host_fails_after_timeout(sandbox, imported, tmp_path):
    out = tmp_path / "out.img"
    pid = sandbox.pids()[1]
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        p = sandbox.vbp("volume", "export", "imp", out, "--host", "host2", "--timeout", "1.5",
                        check=False, timeout=60)
        took = time.monotonic() - t0
    finally:
        os.kill(pid, signal.SIGCONT)
    assert p.returncode == 1, p.stderr
    assert "no reply from 127.0.0.1:" in p.stderr and "in 1.5 s" in p.stderr, p.stderr
    assert took < 20
    assert not out.exists()


# --- a volume fragmented page by page (tests/interop/fragment.py) -----------------------------


def test_fragmented_volume_round_trip(sandbox, tmp_path, monkeypatch):
    """A blockd volume fragmented page by page, its map read in 1 MiB windows (so windows
    and reads end inside runs of extents): the export is byte-identical and as sparse as
    the volume; importing a sparse file over it leaves exactly the file and zeroes."""
    monkeypatch.setattr(transfer, "WINDOW", MiB)
    sandbox.vbp("volume", "create", "frag", "--size", "12M", "--replicas", "1")
    uri = sandbox.uri("frag", 0)
    fragment(uri, 12 * MiB, seed=11)
    assert len(nbd_map(uri)) >= 12 * MiB // PAGE - 1  # one extent per page

    out = tmp_path / "frag.img"
    stats = export_volume(uri, out)
    assert out.read_bytes() == read_volume(uri)
    assert stats.bytes_data == 6 * MiB and stats.bytes_holes == 6 * MiB
    # the holes read along were not written (the file system's extent tree of 1,536
    # fragments takes a few blocks of its own)
    assert allocated(out) < 6 * MiB + 64 * PAGE

    src = tmp_path / "src.img"
    with open(src, "wb") as f:  # data at odd places, holes, shorter than the volume
        f.truncate(7 * MiB + 5)
        for off in (3 * PAGE + 17, 2 * MiB - 100, 5 * MiB + 3 * PAGE):
            f.seek(off)
            f.write(random.Random(off).randbytes(70_000))
        f.seek(7 * MiB)
        f.write(b"tail!")
    calls = []
    stats = import_file(src, uri, progress=lambda d, t: calls.append((d, t)))
    assert read_volume(uri) == src.read_bytes() + bytes(12 * MiB - (7 * MiB + 5))
    tail = 12 * MiB - (7 * MiB + 5)
    assert abs(stats.bytes_tail_zeroed - tail / 2) <= PAGE  # the tail's data pages only
    total = 7 * MiB + 5 + stats.bytes_tail_zeroed
    assert calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


def extent_list(path, size: int, data: int, every: int) -> None:
    """An extentlist filter file: `data` bytes of data every `every` bytes, holes between."""
    with open(path, "w") as f:
        f.writelines(f"{off} {data}\n" for off in range(0, size, every))


def nbdkit_reads(statsfile) -> int:
    return int(re.search(r"^read: (\d+) ops", statsfile.read_text(), re.M).group(1))


def test_export_of_a_fragmented_map_holds_a_window_and_reads_blocks(tmp_path):
    """1 GiB whose map alternates 4 KiB of data and 4 KiB of hole (262,144 extents): the
    export reads it in 2 MiB requests, not one per page, and its Python objects peak at a
    window's map and the buffers in flight (before: the whole map, ~45 MiB here and ~45 GiB
    for 1 TiB, and every buffer ever read, 1 GiB)."""
    size = 1 << 30
    extent_list(tmp_path / "extents", size, PAGE, 2 * PAGE)
    out, statsfile = tmp_path / "out.img", tmp_path / "stats"
    with nbdkit(tmp_path, "-r", "--filter=stats", "--filter=extentlist", "null", f"size={size}",
                f"extentlist={tmp_path / 'extents'}", f"statsfile={statsfile}") as uri:
        tracemalloc.start()
        try:
            stats = export_volume(uri, out)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert stats.bytes_total == size and stats.bytes_holes == size  # null reads zeroes
    assert out.stat().st_size == size and allocated(out) == 0
    # the buffers of the requests in flight (16 x 2 MiB) and one window's map (~5 MiB)
    assert peak < 48 * MiB, f"peak {peak / MiB:.0f} MiB of Python objects"
    assert nbdkit_reads(statsfile) == size // transfer.BLOCK


def test_export_reads_the_gaps_along_but_writes_only_the_data_extents(tmp_path):
    """The map says data every 16 KiB (4 KiB each) over bytes that are all non-zero: the
    reads take the 12 KiB gaps along, and the output still holds only the map's data, the
    gaps read as zero and stay holes (a server's map is what the volume holds)."""
    size = 8 * MiB
    extent_list(tmp_path / "extents", size, PAGE, 4 * PAGE)
    out, statsfile = tmp_path / "out.img", tmp_path / "stats"
    with nbdkit(tmp_path, "-r", "--filter=stats", "--filter=extentlist", "pattern", f"size={size}",
                f"extentlist={tmp_path / 'extents'}", f"statsfile={statsfile}") as uri:
        stats = export_volume(uri, out)
    assert nbdkit_reads(statsfile) == size // transfer.BLOCK
    assert stats.bytes_data == size // 4 and stats.bytes_holes == size * 3 // 4
    data = out.read_bytes()
    for off in range(0, size, 4 * PAGE):
        assert int.from_bytes(data[off + 8:off + 16], "big") == off + 8
        assert data[off + PAGE:off + 4 * PAGE] == bytes(3 * PAGE)
    assert allocated(out) < size // 4 + 64 * PAGE


def test_memory_stays_bounded_by_the_requests_in_flight(tmp_path):
    """96 MiB of data in and out (libnbd 1.14's Python binding keeps every buffer given to
    aio_pread/aio_pwrite alive: a buffer per request held the whole image)."""
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    src.write_bytes(random.Random(4).randbytes(96 * MiB))
    with nbdkit(tmp_path, "memory", "100M") as uri:
        tracemalloc.start()
        try:
            import_file(src, uri)
            _, peak_in = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            export_volume(uri, out)
            _, peak_out = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak_in < 48 * MiB and peak_out < 48 * MiB, (peak_in / MiB, peak_out / MiB)
    with open(src, "rb") as a, open(out, "rb") as b:
        assert b.read(96 * MiB) == a.read() and b.read() == bytes(4 * MiB)


# --- an export that fails leaves what was there -------------------------------------------


def under_way(p: subprocess.Popen, log: Path, command: str) -> None:
    """Wait until the transfer of process `p` is under way: nbdkit's log filter (`log`)
    has a request of `command` ("Read", "Write"), which the delay filter sits on."""
    for _ in range(200):
        if (log.exists() and f" {command} " in log.read_text()) or p.poll() is not None:
            break
        time.sleep(0.05)
    assert p.poll() is None and f" {command} " in log.read_text()


def names(directory) -> set[str]:
    return {p.name for p in directory.iterdir() if not p.name.startswith("nbdkit")}


def test_a_failed_forced_export_leaves_the_old_file_whole(tmp_path):
    out = tmp_path / "out.img"
    out.write_bytes(b"yesterday's backup" * 1000)
    with nbdkit(tmp_path, "--filter=error", "pattern", "size=8M", "error-pread=EIO",
                "error-pread-rate=100%") as uri:
        with pytest.raises(TransferError, match="Input/output error"):
            export_volume(uri, out, overwrite=True)
        with pytest.raises(TransferError):
            export_volume(uri, tmp_path / "new.img")
    assert out.read_bytes() == b"yesterday's backup" * 1000
    assert names(tmp_path) == {"out.img"}  # no partial new.img, no temporary file


@contextmanager
def export_held(tmp_path, out: Path, overwrite: bool):
    """A process running export_volume of an nbdkit pattern volume into `out`, yielded
    once its copy is under way, which the server then holds: its reads never answered.
    Killed on the way out."""
    log = tmp_path / "nbdkit.log"
    with nbdkit(tmp_path, "--filter=log", "--filter=delay", "pattern", "size=8M",
                "delay-read=3600", f"logfile={log}") as uri:
        code = ("from control.transfer import export_volume; "
                f"export_volume({uri!r}, {str(out)!r}, overwrite={overwrite})")
        p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.PIPE,
                             text=True)
        try:
            under_way(p, log, "Read")
            yield p
        finally:
            p.kill()
            p.wait()


def test_ctrl_c_during_a_forced_export_leaves_the_old_file_whole(tmp_path):
    """vbp's export interrupted while the server sits on its reads: the temporary file
    goes, the file it was to replace stays."""
    out = tmp_path / "out.img"
    out.write_bytes(b"yesterday's backup" * 1000)
    with export_held(tmp_path, out, overwrite=True) as p:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=10)
    assert p.returncode != 0 and "KeyboardInterrupt" in err, err
    assert out.read_bytes() == b"yesterday's backup" * 1000
    assert names(tmp_path) == {"out.img"}


@pytest.mark.parametrize("force", [False, True], ids=["new", "forced"])
def test_an_export_killed_outright_leaves_nothing_behind(tmp_path, force):
    """`kill -9` of an export (or a crash, a power cut) runs no cleanup: its temporary file
    was `.FILE.XXXXXXXX.part`, left behind with what it had copied, one more for each such
    run. It has no name now (O_TMPFILE), so it goes with the process. While the copy is
    under way the process holds it open, unnamed, in FILE's directory."""
    out = tmp_path / "out.img"
    if force:
        out.write_bytes(b"yesterday's backup" * 1000)
    with export_held(tmp_path, out, overwrite=force) as p:
        held = [os.readlink(f) for f in Path(f"/proc/{p.pid}/fd").iterdir()]
        assert [f for f in held if f.startswith(f"{tmp_path}/#")], held  # (unnamed)
        p.kill()
        p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL
    assert names(tmp_path) == ({"out.img"} if force else set())
    if force:
        assert out.read_bytes() == b"yesterday's backup" * 1000


@pytest.mark.parametrize("force", [False, True], ids=["new", "forced"])
@pytest.mark.parametrize("why", ["no-tmpfile", "no-proc"])
def test_where_files_cannot_be_unnamed_the_export_goes_through_a_part_file(tmp_path,
                                                                          monkeypatch, force,
                                                                          why):
    """A file system without O_TMPFILE (an older NFS, FUSE, vfat) refuses it with
    EOPNOTSUPP; without /proc (some containers) an unnamed file could not be linked in.
    The copy then goes to `.FILE.XXXXXXXX.part`, renamed or linked into place once
    complete, and the result is the same. (Every file system here has O_TMPFILE, and
    /proc is there: stand-ins for os.open and os.path.isdir say otherwise.)"""
    real_open, real_isdir, made = os.open, os.path.isdir, []

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            assert why == "no-tmpfile"  # (never tried without /proc)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        made.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(transfer.os, "open", no_tmpfile)
    if why == "no-proc":
        monkeypatch.setattr(transfer.os.path, "isdir",
                            lambda p: False if p == "/proc/self/fd" else real_isdir(p))
    out = tmp_path / "out.img"
    if force:
        out.write_bytes(b"old")
    with nbdkit(tmp_path, "pattern", "size=1M") as uri:
        export_volume(uri, out, overwrite=force)
    assert [os.path.basename(f) for f in made if f.endswith(".part")] != []
    assert int.from_bytes(out.read_bytes()[4096:4104], "big") == 4096
    assert names(tmp_path) == {"out.img"}


def test_a_forced_export_replaces_through_a_link_and_keeps_the_mode(tmp_path):
    real, link = tmp_path / "real.img", tmp_path / "link.img"
    real.write_bytes(b"old" * 100)
    real.chmod(0o640)
    link.symlink_to(real)
    with nbdkit(tmp_path, "pattern", "size=1M") as uri:
        export_volume(uri, link, overwrite=True)
    assert link.is_symlink() and real.stat().st_size == MiB
    assert int.from_bytes(real.read_bytes()[4096:4104], "big") == 4096
    assert real.stat().st_mode & 0o777 == 0o640
    assert names(tmp_path) == {"real.img", "link.img"}


# --- a host on IPv6 -----------------------------------------------------------------------


def test_import_and_export_through_a_host_listening_on_ipv6(tmp_path):
    """A blockd whose --nbd is `[::1]:PORT` publishes `::1:PORT`: the URI the CLI makes of
    it brackets the address (before: `nbd://::1:PORT/v6`, which no client parses)."""
    reg = f"lmdb://{tmp_path / 'registry'}"
    blockd = subprocess.Popen(
        [sys.executable, "-m", "blockd.main", "--host-id", "h1", "--data-dir", str(tmp_path / "data"),
         "--registry", reg, "--listen", "[::1]:0", "--nbd", "[::1]:0", "--capacity", "1G",
         "--log-level", "error"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            p = run_vbp("--registry", reg, "host", "list", "--json", check=False)
            if p.returncode == 0 and [h["state"] for h in json.loads(p.stdout)["hosts"]] == ["up"]:
                break
            assert blockd.poll() is None, blockd.stderr.read()
            time.sleep(0.1)
        nbd_addr = json.loads(p.stdout)["hosts"][0]["nbd"]
        assert nbd_addr.startswith("::1:")

        from vbp.registry import open_registry

        run_vbp("--registry", reg, "volume", "create", "v6", "--size", "8M", "--replicas", "1",
                "--min-size", "1")
        assert volume_uri(open_registry(reg), "v6") == f"nbd://[::1]:{nbd_addr[4:]}/v6"
        src, out = tmp_path / "src.img", tmp_path / "out.img"
        src.write_bytes(random.Random(6).randbytes(MiB + 5))
        run_vbp("--registry", reg, "volume", "import", src, "v6")
        run_vbp("--registry", reg, "volume", "export", "v6", out)
        assert out.read_bytes() == src.read_bytes() + bytes(7 * MiB - 5)
    finally:
        stop_process(blockd, 20)


# --- what an export is asked to write -------------------------------------------------------


def test_an_export_to_a_device_is_refused_as_such_with_or_without_force(tmp_path):
    """/dev/null exists, and is no regular file: the refusal must say so at once, not send
    the operator to --force, which is refused in turn ("not a regular file")."""
    for overwrite in (False, True):
        with pytest.raises(InvalidArgument, match="not a regular file"):
            export_volume("nbd://127.0.0.1:1/never", "/dev/null", overwrite=overwrite)


def test_an_export_to_a_pipe_writes_in_volume_order_whatever_order_the_replies_come(tmp_path):
    """Several reads are in flight and a server may answer them in any order: this one
    answers the first block last, half a second after the others (each block a letter).
    The pipe gets them in order, and the slots (BLOCK each) held stay bounded by the
    requests in flight, not by the reads answered while the first one waits."""
    from control import nbd_client

    pread = ('[ $4 -eq 0 ] && sleep 0.5; head -c $3 /dev/zero | '
             'tr "\\0" "\\\\$(printf %03o $(( $4 / 2097152 % 26 + 65 )))"')
    r, w = os.pipe()
    got = bytearray()

    def drain():
        while chunk := os.read(r, MiB):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    nbd_client._free_slots.clear()
    try:
        with nbdkit(tmp_path, "eval", "get_size=echo 64M", "thread_model=echo parallel",
                    f"pread={pread}") as uri:
            stats = transfer.export_stream(uri, w)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert stats.bytes_total == stats.bytes_data == 64 * MiB
    assert bytes(got) == b"".join(bytes([65 + i % 26]) * (2 * MiB) for i in range(32))
    assert len(nbd_client._free_slots) <= nbd_client.DEPTH


def test_an_export_to_a_name_of_255_bytes_works(tmp_path):
    """The copy is written to `.NAME.XXXXXXXX.part` beside FILE: for a NAME near the file
    system's limit (255 bytes) that name is too long, and a file name that is fine
    failed with "File name too long"."""
    out = tmp_path / ("x" * 250 + ".raw")
    with nbdkit(tmp_path, "pattern", "size=1M") as uri:
        export_volume(uri, out)
    assert int.from_bytes(out.read_bytes()[4096:4104], "big") == 4096
    assert names(tmp_path) == {out.name}


# --- the CLI stopped by a signal --------------------------------------------------------------


@contextmanager
def pool_on_nbdkit(tmp_path, *args):
    """A registry whose one host serves NBD with nbdkit (`args`: its filters, plugin and
    parameters, on a TCP port) and holds a volume `v` of 8 MiB; yields the registry URL.
    (nbdkit serves any export name: `vbp volume export v` reads what it serves.)"""
    from control import api
    from tests.conftest import free_port_range
    from vbp.cluster import HostRecord
    from vbp.registry import open_registry

    # nbdkit writes its pid file once it listens; on a port taken meanwhile (the port
    # was free a moment before: another test's server) it exits, and a connection made
    # to wait for it would have reached that other server instead: another port then
    pidfile = tmp_path / "nbdkit.pid"
    for _ in range(5):
        port = free_port_range(1)
        p = subprocess.Popen([need("nbdkit"), "-f", "-P", str(pidfile), "-i", "127.0.0.1",
                              "-p", str(port), *args], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not pidfile.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if pidfile.exists():
            break
        stop_process(p)
    else:
        raise AssertionError(f"nbdkit did not listen: {p.stderr.read()}")
    try:
        url = f"lmdb://{tmp_path / 'registry'}"
        reg = open_registry(url)
        reg.register_host(HostRecord("h1", "127.0.0.1:1", f"127.0.0.1:{port}",
                                     capacity=1 << 30), 600)
        api.create_volume(reg, "v", "8M", replicas=1)
        reg.close()
        yield url
    finally:
        stop_process(p)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_cli_export_stopped_by_a_signal_leaves_no_temporary_file(tmp_path, sig):
    """`timeout 1h vbp volume export ...`, a backup job's unit stopped, the terminal of the
    session closed: the export ends as after a Ctrl-C, its temporary file (a sparse file
    the size of the volume, with what was copied) removed and the old FILE whole. Killed
    by the signal, it left `.FILE.XXXXXXXX.part` behind, one more for every stopped run."""
    out_dir = tmp_path / "backups"
    out_dir.mkdir()
    out = out_dir / "v.raw"
    out.write_bytes(b"yesterday's backup" * 1000)
    log = tmp_path / "nbdkit.log"
    with pool_on_nbdkit(tmp_path, "--filter=log", "--filter=delay", "pattern", "size=8M",
                        "delay-read=3600", f"logfile={log}") as url:
        p = subprocess.Popen([sys.executable, "-m", "control.cli", "--registry", url, "volume",
                              "export", "v", str(out), "--force"], cwd=ROOT,
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            under_way(p, log, "Read")
            assert [x.name for x in out_dir.iterdir()] == ["v.raw"]  # (the copy is unnamed)
            p.send_signal(sig)
            _, err = p.communicate(timeout=10)
        finally:
            p.kill()
            p.wait()
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err == f"vbp: error: interrupted: {out} was not written (the file there is as it was)\n"
    assert out.read_bytes() == b"yesterday's backup" * 1000
    assert [x.name for x in out_dir.iterdir()] == ["v.raw"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_cli_import_says_the_volume_is_partly_overwritten(tmp_path, sig):
    """An import stopped half-way leaves the volume with some of the image over its old
    contents. It said only click's "Aborted!" (a SIGTERM: the same), which an operator
    could take for "nothing happened"."""
    image = tmp_path / "img.raw"
    image.write_bytes(b"new image" * (8 * MiB // 9) + b"x" * (8 * MiB % 9))
    log = tmp_path / "nbdkit.log"
    with pool_on_nbdkit(tmp_path, "--filter=log", "--filter=delay", "memory", "size=8M",
                        "delay-write=3600", f"logfile={log}") as url:
        p = subprocess.Popen([sys.executable, "-m", "control.cli", "--registry", url, "volume",
                              "import", str(image), "v"], cwd=ROOT,
                             stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            under_way(p, log, "Write")
            p.send_signal(sig)
            _, err = p.communicate(timeout=10)
        finally:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert err == (f"vbp: error: interrupted: volume v may hold part of {image} over what "
                   f"it held before; import again to complete it\n"), err


def test_a_failed_cli_import_leaves_the_volume_marked_incomplete_until_one_completes(tmp_path):
    """A host that fails the writes (or dies) half-way: the import failed with the reason
    alone, and the volume, neither its old disk nor the image, looked like any other in
    `vbp volume show` (a VM could be booted from it). The error says what the volume
    holds, and its record says so until an import completes; an import refused before
    it writes (the image larger than the volume) leaves no such mark."""
    image = tmp_path / "img.raw"
    image.write_bytes(random.Random(21).randbytes(4 * MiB))
    failing = tmp_path / "fail-writes"
    failing.touch()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with pool_on_nbdkit(tmp_path, "--filter=error", "memory", "size=8M", "error-pwrite=EIO",
                        "error-pwrite-rate=1", f"error-file={failing}") as url:
        def vbp(*args):
            return subprocess.run([sys.executable, "-m", "control.cli", "--registry", url, *args],
                                  cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
                                  stdin=subprocess.DEVNULL)

        def mark():
            return json.loads(vbp("--json", "volume", "show", "v").stdout)["import_from"]

        big = tmp_path / "big.raw"
        big.write_bytes(bytes(9 * MiB))
        p = vbp("volume", "import", str(big), "v")
        assert p.returncode == 1 and "larger than the volume" in p.stderr, p.stderr
        assert mark() == "" and "warning" not in vbp("volume", "show", "v").stdout

        p = vbp("volume", "import", str(image), "v")
        assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
        assert "Input/output error" in p.stderr and p.stderr.count("\n") == 1, p.stderr
        assert f"volume v may hold part of {image} over what it held before" in p.stderr
        assert mark() == str(image)
        shown = vbp("volume", "show", "v").stdout
        assert f"the import of {image} begun" in shown and "has not completed" in shown, shown
        assert "warning: volume v: the import of" in vbp("volume", "list").stdout

        failing.unlink()  # the host is well again: the next import completes, and says so
        p = vbp("volume", "import", str(image), "v")
        assert p.returncode == 0, p.stderr
        assert mark() == "" and "warning" not in vbp("volume", "show", "v").stdout
        assert "warning" not in vbp("volume", "list").stdout


def test_an_unreadable_image_and_an_unwritable_directory_are_one_line_errors(tmp_path):
    """What a user who is not root meets: an image file they may not read, a directory
    they may not write in. Everything here runs as root, which passes permission checks
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH): the commands run without those two (setpriv
    takes them out of the bounding set, so the exec'd vbp does not have them), where a
    file of mode 000 cannot be read even by root."""
    setpriv = need("setpriv")
    image = tmp_path / "secret.img"
    image.write_bytes(b"x" * 65536)
    image.chmod(0)
    out = tmp_path / "backups"
    out.mkdir()
    out.chmod(0o555)
    with pool_on_nbdkit(tmp_path, "memory", "size=8M") as url:
        def vbp(*args):
            return subprocess.run([setpriv, "--bounding-set=-dac_override,-dac_read_search",
                                   str(Path(sys.executable).parent / "vbp"), "--registry",
                                   url, "volume", *args], capture_output=True, text=True,
                                  timeout=60)

        r = vbp("import", str(image), "v")
        assert (r.returncode, r.stdout) == (2, ""), r.stderr
        assert r.stderr == (f"vbp: error: Invalid value for 'FILE': File '{image}' is not "
                            f"readable (see 'vbp volume import --help')\n")
        r = vbp("export", "v", str(out / "v.raw"))
        assert (r.returncode, r.stdout) == (1, ""), r.stderr
        assert r.stderr == (f"vbp: error: cannot create {out / 'v.raw'}: a new file in {out}: "
                            f"Permission denied\n")
    assert list(out.iterdir()) == []


def test_a_pseudo_file_that_says_it_is_empty_is_refused(tmp_path):
    """A /proc file is a regular file of size 0 that reads its contents: imported as
    0 bytes, the volume was written full of zeroes. Refused before any connection."""
    proc = Path("/proc/self/status")
    assert proc.stat().st_size == 0 and proc.read_bytes()
    with pytest.raises(InvalidArgument, match="says it is empty but reads data"):
        import_file(proc, "nbd://127.0.0.1:1/never")
    empty = tmp_path / "empty.raw"  # (a file that is empty: the volume reads as zeroes)
    empty.touch()
    with pytest.raises(TransferError):  # (no server there: past the file's checks)
        import_file(empty, "nbd://127.0.0.1:1/never", timeout=2)


def test_an_export_to_dash_writes_standard_output_not_a_file_named_dash(tmp_path):
    """`rbd export NAME -` writes to standard output, and so do many tools: `vbp volume
    export v - | gzip > v.gz` made a file named `-` the volume's size (and v.gz of
    nothing), later refused `-` altogether. Now the image goes to standard output, the
    summary to standard error; a terminal there is bad usage; ./- names a file."""
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with pool_on_nbdkit(tmp_path, "pattern", "size=8M") as url:
        cmd = [sys.executable, "-m", "control.cli", "--registry", url, "volume", "export", "v"]
        p = subprocess.run([*cmd, "-"], cwd=work, capture_output=True, timeout=60, env=env)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout) == 8 * MiB and list(work.iterdir()) == []
        assert all(int.from_bytes(p.stdout[o:o + 8], "big") == o for o in range(0, 8 * MiB, 8))
        assert p.stderr.decode().startswith("exported v to standard output: 8 MiB")
        p2 = subprocess.run([*cmd, "./-"], cwd=work, capture_output=True, timeout=60, env=env)
        assert p2.returncode == 0, p2.stderr
        assert (work / "-").read_bytes() == p.stdout

        leader, follower = os.openpty()
        try:
            p = subprocess.run([*cmd, "-"], cwd=work, stdout=follower, stderr=subprocess.PIPE,
                               text=True, timeout=60, env=env)
        finally:
            os.close(leader)
            os.close(follower)
        assert p.returncode == 2 and "standard output, which is a terminal" in p.stderr, p.stderr


def test_export_to_standard_output_is_the_volume_in_order(sandbox, image, tmp_path):
    """Through a pipe the image cannot be sparse: the stream is the volume byte for
    byte, holes as zeroes, a stretch fragmented page by page included, and the summary
    (--json's object) goes to standard error."""
    path, _ = image
    sandbox.vbp("volume", "create", "streamed", "--size", "80M", "--replicas", "1")
    uri = sandbox.uri("streamed", 0)
    import_file(path, uri)
    h = nbd.NBD()
    h.connect_uri(uri)
    rng = random.Random(31)
    pages = {}
    for page in range(70 * MiB // PAGE, 72 * MiB // PAGE, 2):  # every other page: data
        pages[page] = rng.randbytes(PAGE)
        h.pwrite(pages[page], page * PAGE)
    h.flush()
    h.shutdown()
    want = bytearray(path.read_bytes() + bytes(80 * MiB - FILE_SIZE))
    for page, data in pages.items():
        want[page * PAGE:(page + 1) * PAGE] = data

    out = tmp_path / "stream.raw"
    with open(out, "wb") as f:
        p = subprocess.run([sys.executable, "-m", "control.cli", "--registry", sandbox.registry,
                            "--json", "volume", "export", "streamed", "-"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=False, timeout=120, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        f.write(p.stdout)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stderr)["bytes_total"] == 80 * MiB
    assert out.read_bytes() == bytes(want)


def test_an_empty_file_argument_is_refused_as_bad_usage(tmp_path):
    """FILE given as "" (a shell variable not set): import read it as the current
    directory (".: is a directory"), export as no file (": no such file or directory").
    Both are bad usage, said so, and nothing is read or written."""
    work = tmp_path / "work"
    work.mkdir()
    with pool_on_nbdkit(tmp_path, "pattern", "size=8M") as url:
        for args in (["import", "", "v"], ["export", "v", ""]):
            p = subprocess.run([sys.executable, "-m", "control.cli", "--registry", url,
                                "volume", *args], cwd=work, capture_output=True, text=True,
                               timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert p.returncode == 2 and "'FILE': empty" in p.stderr, (args, p.stderr)
            assert list(work.iterdir()) == []


# --- a volume in use ------------------------------------------------------------------------


def test_an_import_into_a_volume_a_client_has_open_is_refused_unless_forced(sandbox, tmp_path):
    """A VM has volume `busy` open and writes it through host 1. `vbp volume delete busy`
    refuses (exit 6: in use); `vbp volume import` went ahead, through host 1 replacing
    the disk under the running VM without a word (through another host it failed after
    a lease period with "Input/output error"). Refused like the delete, --force
    overrides; once the client is gone it imports."""
    from control.cli import EXIT_IN_USE

    sandbox.vbp("volume", "create", "busy", "--size", "8M", "--replicas", "1")
    src = tmp_path / "new.img"
    src.write_bytes(random.Random(12).randbytes(MiB))
    mine = random.Random(13).randbytes(64 * 1024)
    h = nbd.NBD()
    h.connect_uri(sandbox.uri("busy", 0))
    try:
        h.pwrite(mine, 0)
        h.flush()
        p = sandbox.vbp("volume", "import", src, "busy", check=False)
        assert p.returncode == EXIT_IN_USE, (p.returncode, p.stdout, p.stderr)
        assert "open by NBD clients" in p.stderr and "--force" in p.stderr, p.stderr
        assert p.stderr.count("\n") == 1, p.stderr
        assert h.pread(len(mine), 0) == mine  # the VM's disk is untouched
        sandbox.vbp("volume", "import", src, "busy", "--force")
        assert h.pread(MiB, 0) == src.read_bytes()
    finally:
        h.shutdown()
    sandbox.vbp("volume", "import", src, "busy")  # the client gone: no refusal
    assert read_volume(sandbox.uri("busy", 1))[:MiB] == src.read_bytes()


@pytest.mark.parametrize("fmt,name", [("qcow2", "qcow2"), ("qed", "qed"), ("vmdk", "vmdk"),
                                      ("vhdx", "vhdx"), ("vpc", "vpc (vhd)"), ("vdi", "vdi"),
                                      ("raw", None)])
def test_image_format_names_the_container_qemu_img_made(tmp_path, fmt, name):
    need("qemu-img")
    path = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "8M"], check=True)
    if fmt == "raw":
        path.write_bytes(random.Random(3).randbytes(MiB))
    assert transfer.image_format(path) == name
    assert transfer.image_format(tmp_path / "missing") is None


def test_importing_a_qcow2_image_warns_that_its_bytes_go_as_they_are(sandbox, tmp_path):
    """`vbp volume import` copies raw bytes (as `rbd import` does): a qcow2 file given to
    it fills the volume with the container, not the disk. The import goes on (a raw disk
    may start with those bytes) and says so, with the conversion to run."""
    need("qemu-img")
    src = tmp_path / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "8M"], check=True)
    sandbox.vbp("volume", "create", "qc", "--size", "8M", "--replicas", "1")
    p = sandbox.vbp("volume", "import", src, "qc")
    assert f"{src} starts with a qcow2 header" in p.stderr and "qemu-img convert -O raw" in p.stderr
    assert read_volume(sandbox.uri("qc", 0))[:4] == b"QFI\xfb"
    raw = tmp_path / "vm.raw"
    raw.write_bytes(b"\x01" * MiB)
    assert "warning" not in sandbox.vbp("volume", "import", raw, "qc").stderr
