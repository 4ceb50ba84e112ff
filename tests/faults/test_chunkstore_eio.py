"""A disk that fails reads with EIO, for real: ext4 on a loop device whose backing file is
then cut short (losetup -c), so the blocks of the chunk's data lie past the device's end.
Root only (loop devices, mounts in a private mount namespace).

An unreadable page is a damaged page: reads raise ChecksumError (the gateway then reads
a good replica and writes its bytes back), verify() lists it (scrub repairs it), and the
process stays up: a large read checked in place through the data file's map must not
touch a page the kernel would have to read from the disk (a SIGBUS).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "chunkstore_eio_worker.py"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("losetup") or not shutil.which("mkfs.ext4")
    or not shutil.which("filefrag") or not shutil.which("fallocate")
    or not os.path.exists("/dev/loop-control"),
    reason="needs root, loop devices, mkfs.ext4, filefrag and fallocate")

SCRIPT = r"""
set -e
img="$1"; mnt="$2"; py="$3"; worker="$4"
truncate -s 64M "$img"
mkfs.ext4 -q -F -b 4096 -O ^has_journal "$img"
dev=$(losetup -f --show "$img")
trap 'umount "$mnt" 2>/dev/null; losetup -d "$dev"' EXIT
mount -o noatime "$dev" "$mnt"
mkdir "$mnt/store"
"$py" -c "from vbp.chunkstore import ChunkStore; ChunkStore('$mnt/store', 1 << 22).close()"
# the index's pages to come get their blocks now, before the filler and the data file
# (kept size: LMDB sees the same file); grown later, they could land past the data's
fallocate -n -l 4M "$mnt/store/index/data.mdb"
dd if=/dev/zero of="$mnt/filler" bs=1M count=24 conv=fsync status=none
"$py" "$worker" fill "$mnt/store"
first=$(filefrag -v -b4096 "$mnt/store/data-1M.bin" | awk '$1 ~ /^[0-9]+:$/ {sub(/\.\./, "", $4); print $4; exit}')
for f in "$mnt"/store/index/data.mdb "$mnt"/store/sums-1M.bin; do
  last=$(filefrag -v -b4096 "$f" | awk '$1 ~ /^[0-9]+:$/ {sub(/:/, "", $5); e=$5} END {print e}')
  [ "$last" -lt "$first" ] || { echo "layout: $f ends at $last, data starts at $first"; exit 3; }
done
truncate -s $((first * 4096)) "$img"
losetup -c "$dev"
"$py" "$worker" read "$mnt/store"
"""


def test_an_unreadable_page_is_a_checksum_error_and_the_process_stays_up(tmp_path):
    img, mnt = tmp_path / "disk.img", tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    out = subprocess.run(["unshare", "-m", "sh", "-c", SCRIPT, "sh", str(img), str(mnt),
                          sys.executable, str(WORKER)],
                         capture_output=True, timeout=120, env=env)
    text = out.stdout.decode()
    assert out.returncode == 0, (out.returncode, text, out.stderr.decode()[-3000:])
    got = dict(line.split(" ", 1) for line in text.splitlines())
    assert got == {"read_page": "ChecksumError", "read_range": "ChecksumError",
                   "read_ref": "ChecksumError", "verify": f"bad={(1 << 20) // 4096}",
                   "checksum_errors": str(3 + (1 << 20) // 4096)}, text
