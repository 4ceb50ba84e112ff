"""The files under a ChunkStore: data file + mmap'd checksum sidecar per chunk size, the
in-memory chunk record, LMDB key encoding and transactions. See vbp/chunkstore.py for the
theory of operation; nothing here decides durability order, it only performs it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import weakref
from pathlib import Path

import lmdb
import msgpack

from vbp.chunkstore_common import PAGE_SHIFT
from vbp.errors import LocalFault, NoSpace
from vbp.layout import ChunkKey

READY, PENDING = 0, 1
KEY_TAIL = struct.Struct(">QQ")
SLOT = struct.Struct(">IQ")
MAP_SIZE = 1 << 30
NOSPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
COPY_STEP = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int
_PUNCH = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
_mincore = getattr(_libc, "mincore", None)
if _mincore is not None:
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _mincore.restype = ctypes.c_int
_RESIDENT = bytes(i & 1 for i in range(256))  # (mincore: only the low bit is defined)


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


def map_address(mm) -> int:
    """The address of a (read-only) mmap: ctypes' from_buffer wants a writable one."""
    view = _PyBuffer()
    if ctypes.pythonapi.PyObject_GetBuffer(ctypes.py_object(mm), ctypes.byref(view), 0):
        raise OSError(errno.EINVAL, "no buffer")
    try:
        return view.buf
    finally:
        ctypes.pythonapi.PyBuffer_Release(ctypes.byref(view))


def punch(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros, freeing its blocks when the fs can."""
    if _fallocate is not None and _fallocate(fd, _PUNCH, offset, length) == 0:
        return
    zeros = bytes(min(length, COPY_STEP))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, zeros[: end - offset], offset)


def reserve(fd: int, length: int) -> bool:
    """Disk blocks for the first `length` bytes of the file, past its end too, its size
    unchanged (FALLOC_FL_KEEP_SIZE): writes there later need no free block. False if the
    filesystem cannot keep blocks that way (nothing kept); OSError(ENOSPC) if the disk
    has not that many free."""
    if _fallocate is None:
        return False
    if _fallocate(fd, 0x01, 0, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def pwrite_all(fd: int, buf, pos: int) -> None:
    """All of `buf` at `pos`: a short pwrite is followed by one for the rest; one that
    writes nothing is EIO (as pagesums.put's), where looping would never end."""
    n = os.pwrite(fd, buf, pos)
    if n != len(buf):
        mv = memoryview(buf)
        while n < len(mv):
            done = os.pwrite(fd, mv[n:], pos + n)
            if not done:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            n += done


# Large writes go to the data file in pieces of at most this many bytes. The page cache
# gives a write a folio as large as the write (ext4 does large folios since Linux 6.16),
# and a folio is the unit of dirtying and writeback: a later 4 KiB write into a folio
# dirties, and a flush writes, all of it. So the pieces set what a small overwrite costs,
# in CPU and in bytes written back, against the syscalls a large write takes. Measured
# one after the other on one blockd, replicas=1, fio nbd engine, the volume first filled
# by fio in 1 MiB requests (4K randwrite QD32 IOPS, 1M seqwrite QD8 MiB/s):
#   piece   4K randwrite     1M seqwrite
#   128K    63.5k-64.6k      2,266-2,471
#    64K    74.5k            2,166
#    32K    76.2k-82.7k      2,033-2,228
#    16K    83.1k-83.7k      1,902-1,965
# and with the references in one run (`python -m bench --workloads randwrite-4k-qd32,
# seqwrite-1m-qd8 --targets nbdkit,vbp-r1`): 4K randwrite 0.85x nbdkit at 128K, 0.95-1.0x
# at 32K, 1.04x at 16K; 1M seqwrite 0.60x, 0.56x, 0.50x. 32K is the knee: most of the
# small-write gain for 5-10% of sequential write speed. (The pieces of one write, and then
# its checksums, are one call of the C extension, vbp.pagesums.put: the loop in Python cost
# a 1 MiB write about 25 us more.)
# The pieces matter only where the page cache has no folio yet: an overwrite of pages
# that are cached keeps their folios, whatever the size of the pwrite. So put asks the
# kernel first (cachestat, Linux 6.5) and writes a range whose every page is cached in
# one pwrite; that saves the 1 MiB overwrite its 31 other calls. Its pwrite took 138 us
# of CPU against 184 in pieces (perf, the volume first filled through nbdcopy). Whole
# runs move less, the machine being busy with the client and the writeback too:
# `python -m bench --workloads seqwrite-1m-qd8 --targets vbp-r1 --against 8d5ea9e` (the
# code before), replicas=1: 1.08x the MiB/s at 0.88x the server's CPU in five rounds,
# 1.01x at 0.97x in four, 0.97x at 1.02x in six (ahead in 3); replicas=3, where each of
# the three copies saves its calls: 1.06x, 1.06x, and 1.23x at 0.84x ahead in 6 of 6.
# (A page evicted between the question and the pwrite gets a folio as large as the
# write: a cost for later small writes there, never a fault.)
WRITE_PIECE = 32 * 1024


def sync_paths(paths) -> None:
    """fdatasync each file of `paths` through a descriptor of its own, opened here and
    closed again: ChunkStore.sync_ahead's half of a flush, for a worker thread (the call
    releases the GIL). Errors are left to the flush that follows, which syncs the same
    files through the store's own descriptors: Linux reports a writeback error to every
    open file description that was open when it happened (errseq), so that flush meets
    it even if this call met it first. A file gone meanwhile (the store closed) is no
    error either."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def pread_full(fd: int, n: int, pos: int) -> bytes:
    buf = os.pread(fd, n, pos)
    return buf if len(buf) == n else buf.ljust(n, b"\0")  # past EOF after a lost ftruncate


def pread_path(path: str, n: int, pos: int) -> bytes:
    """pread_full of the file at `path`, through a descriptor of its own, opened here and
    closed again: for a worker thread (as sync_paths), which a store closing meanwhile
    cannot leave reading a descriptor number reused for another file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return pread_full(fd, n, pos)
    finally:
        os.close(fd)


def boot_id() -> str:
    """This boot of the kernel: a page cache that survived a process crash belongs to the
    same one ("" if unknown, which counts as another boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def enc_key(key) -> bytes:
    return key[0].encode() + b"\0" + KEY_TAIL.pack(key[1], key[2])


def dec_key(raw: bytes) -> ChunkKey:
    index, gen = KEY_TAIL.unpack(raw[-16:])
    return ChunkKey(raw[:-17].decode(), index, gen)


def sync_dir(path: Path) -> None:
    """Make the names in directory `path` durable (new files, renames)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def size_name(cs: int) -> str:
    if cs % (1 << 20) == 0:
        return f"{cs >> 20}M"
    return f"{cs >> 10}K"


# The data file grows (sparse) by this many slots at a time, so the read-only map of it
# (Space.data_view) is made again once per DATA_GROW new slots, not per slot.
DATA_GROW = 16


class Space:
    """The data file and the checksum sidecar of one chunk size."""

    __slots__ = ("cs", "ppc", "fd", "sfd", "mm", "sums", "nslots", "mapped", "free", "limbo",
                 "failed", "dmm", "dview", "daddr", "vec", "retired", "ranges", "paths",
                 "unwiped")

    def __init__(self, root: Path, cs: int, nslots: int):
        self.cs = cs
        self.ppc = cs >> PAGE_SHIFT
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        data, sums = root / f"data-{size_name(cs)}.bin", root / f"sums-{size_name(cs)}.bin"
        self.paths = (os.path.abspath(data), os.path.abspath(sums))  # (sync_paths, in a thread)
        created = not (data.exists() and sums.exists())
        self.fd = self.sfd = -1
        self.mm = self.sums = None
        self.dmm = self.dview = None  # read-only map of the data file, made by data_view
        self.daddr = 0  # its address (cached)
        self.vec = ctypes.create_string_buffer(self.ppc + 2)  # (cached: mincore's answer)
        self.retired: list = []  # older data maps a view still pointed into when replaced
        self.ranges: weakref.WeakSet = weakref.WeakSet()  # FileRanges out: limbo stays limbo
        self.mapped = 0
        self.nslots = 0
        self.free: list[int] = []  # a heap: reuse low slots first
        self.limbo: list[int] = []
        self.unwiped: list[int] = []  # slots of limbo not wiped yet (wipe_deferred)
        self.failed: OSError | None = None
        try:
            self.fd = os.open(data, flags, 0o600)
            self.sfd = os.open(sums, flags, 0o600)
            if created:
                sync_dir(root)  # else fdatasync of the files may not survive a power loss
            self.ensure(nslots)
        except BaseException:
            self.close()
            raise
        self.nslots = nslots

    def ensure(self, nslots: int) -> None:
        """Files large enough for `nslots` slots. OSError(ENOSPC) if the sidecar can't grow."""
        if nslots > self.mapped or self.mm is None:
            want = max(nslots, 2 * self.mapped, 16)
            try:
                os.posix_fallocate(self.sfd, 0, want * self.ppc * 8)
            except OSError as e:
                if e.errno not in NOSPACE_ERRNOS or want <= max(nslots, 1):
                    raise
                want = max(nslots, 1)  # (a length of 0 is EINVAL, not the ENOSPC it is)
                os.posix_fallocate(self.sfd, 0, want * self.ppc * 8)
            self._unmap()
            self.mm = mmap.mmap(self.sfd, want * self.ppc * 8)
            self.sums = memoryview(self.mm).cast("Q")
            self.mapped = want
        if os.fstat(self.fd).st_size < nslots * self.cs:
            os.ftruncate(self.fd, -(-nslots // DATA_GROW) * DATA_GROW * self.cs)

    def data_view(self, end: int) -> memoryview | None:
        """A read-only view of the data file's first `end` bytes or more (None if the file
        is shorter), through a shared map, for checking pages in place before the NBD
        server sends them from it (ChunkStore.read_ref, FileRange.send). The file never
        shrinks while the store is open, so the map never reaches past its end; a media
        error under it is a SIGBUS (so only pages cached() are read through it), as for
        the sums sidecar and the LMDB index, which are maps too."""
        if self.dview is not None and end <= len(self.dview):
            return self.dview
        size = os.fstat(self.fd).st_size
        if size < end:
            return None
        self._unmap_data()
        self.dmm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.dview = memoryview(self.dmm)
        self.daddr = map_address(self.dmm) if _mincore is not None else 0
        return self.dview

    def cached(self, start: int, end: int) -> bool:
        """Every page of the data file's [start, end) (mapped by data_view) is in the page
        cache, read whole (mincore): reading them through the map reads nothing from the
        disk, so meets no I/O error, which in a map is a SIGBUS, the end of the process.
        (A page evicted between this and the read still can; a send from the map meets
        EFAULT instead, in the kernel.)"""
        if not self.daddr:
            return False
        a = start - start % mmap.PAGESIZE
        n = -(-(end - a) // mmap.PAGESIZE)
        if _mincore(self.daddr + a, end - a, self.vec) != 0:
            return False
        return b"\0" not in ctypes.string_at(self.vec, n).translate(_RESIDENT)

    def _unmap_data(self) -> None:
        if self.dview is None:
            return
        try:
            self.dview.release()
            self.dmm.close()
        except BufferError:  # a view into it is still alive: closed with the space
            self.retired.append((self.dmm, self.dview))
        self.dmm = self.dview = None
        self.daddr = 0

    # A failed fsync may have dropped dirty pages while a later one "succeeds" (Linux marks
    # them clean): after one failure this space refuses to claim durability ever again.

    def sync(self) -> None:
        self._guard(os.fdatasync, self.fd)
        self._guard(self.mm.flush)

    def sync_data(self) -> None:
        self._guard(os.fdatasync, self.fd)

    def sync_sums(self, slot: int) -> None:
        start = slot * self.ppc * 8
        aligned = start - start % mmap.PAGESIZE
        self._guard(self.mm.flush, aligned, start + self.ppc * 8 - aligned)

    def _guard(self, fn, *args) -> None:
        if self.failed is not None:
            raise LocalFault(f"an earlier sync of the {self.cs}-byte chunk files failed "
                             f"({self.failed}): reopen the store and resync it")
        try:
            fn(*args)
        except OSError as e:
            self.failed = e
            raise LocalFault(f"sync of the {self.cs}-byte chunk files failed: {e}; "
                             "writes since the last flush may be lost") from e

    def wipe(self, slot: int) -> None:
        punch(self.fd, slot * self.cs, self.cs)
        a = slot * self.ppc * 8
        self.mm[a: a + self.ppc * 8] = bytes(self.ppc * 8)

    def wipe_deferred(self) -> None:
        """Wipe the slots of limbo waiting for it (ChunkStore._wipe_deferred), unless
        FileRanges are out. An OSError leaves the slot it met, and those after, waiting."""
        while self.unwiped and not self.ranges:
            self.wipe(self.unwiped[-1])
            self.unwiped.pop()

    def _unmap(self) -> None:
        if self.sums is not None:
            self.sums.release()
            self.mm.close()
            self.sums = self.mm = None

    def close(self) -> None:
        self._unmap()
        self._unmap_data()
        self.retired.clear()  # whatever still points into them keeps them alive
        for fd in (self.fd, self.sfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.sfd = -1  # FileRanges still out fail with EBADF, never read another file


class Chunk:
    __slots__ = ("key", "space", "cs", "slot", "version", "saved", "state", "dirty", "touched",
                 "fresh", "dbase", "sbase")

    def __init__(self, key: ChunkKey, space: Space, slot: int, version: int, state: int):
        self.key = key
        self.space = space
        self.cs = space.cs
        self.slot = slot
        self.version = version
        self.saved = version  # the version in the index (a commit putting record() sets it)
        self.state = state
        self.dirty = False  # marked dirty in the index (ChunkStore._dirty holds it)
        self.touched = False  # written since the last flush (implies dirty)
        self.fresh = False  # a copy-up whose copied bytes may not be durable yet (implies dirty)
        self.dbase = slot * space.cs
        self.sbase = slot * space.ppc

    def record(self) -> bytes:
        return msgpack.packb([self.slot, self.cs, self.version, self.state])


class Txn:
    """An LMDB write transaction whose "disk full" failures become NoSpace."""

    __slots__ = ("env", "txn")

    def __init__(self, env):
        self.env = env

    def __enter__(self):
        try:
            self.txn = self.env.begin(write=True)
        except lmdb.Error as e:
            raise _nospace(e) from e
        return self.txn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.txn.abort()
            if isinstance(exc, lmdb.Error) and isinstance(_nospace(exc), NoSpace):
                raise _nospace(exc) from exc
            return False
        try:
            self.txn.commit()
        except lmdb.Error as e:
            raise _nospace(e, self.env.path()) from e
        return False


# LMDB's write of its pages cut short (the disk filled up in the middle of it) is an EIO;
# with less than this free on the index's filesystem it is taken for the full disk it is
FULL_BELOW = 1 << 20


def _nospace(e: lmdb.Error, path: str | None = None) -> Exception:
    """NoSpace for the index running out of room (its map or the disk), else `e` itself.
    `path`: the index's directory, for telling LMDB's EIO of a short write on a full disk."""
    if isinstance(e, lmdb.MapFullError):
        return NoSpace(f"the chunk index is full: {e}")
    text = str(e)
    if "No space" in text or "ENOSPC" in text or "Disk quota" in text:
        return NoSpace(f"the disk is full writing the chunk index: {e}")
    if path is not None and "Input/output error" in text:
        try:
            st = os.statvfs(path)
        except OSError:
            return e
        if st.f_bavail * st.f_frsize < FULL_BELOW:
            return NoSpace(f"the disk is full writing the chunk index: {e} "
                           f"({st.f_bavail * st.f_frsize} bytes free)")
    return e
