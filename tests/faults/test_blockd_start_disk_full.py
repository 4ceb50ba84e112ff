"""blockd started on a disk with no room for its chunk index: one line saying so and a
non-zero status, not a traceback, and nothing left behind that stops the next start once
there is room. Root only (a tiny tmpfs, mounted in a private mount namespace)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root and unshare (a tmpfs mount)")

# blockd on a 20 KiB tmpfs (LMDB needs more for the index), then once more after the
# tmpfs grew, stopped by SIGTERM as soon as it is ready
SCRIPT = r"""
mnt="$1"; py="$2"; reg="$3"
mount -t tmpfs -o size=20k tmpfs "$mnt" || exit 90
args="--host-id h1 --data-dir $mnt/data --registry lmdb://$reg --listen 127.0.0.1:0 --nbd 127.0.0.1:0"
"$py" -m blockd.main $args --log-level error 2>"$mnt/../first.err"
echo "first=$?"
mount -o remount,size=64m "$mnt"
"$py" -m blockd.main $args --log-level info 2>"$mnt/../second.err" &
pid=$!
for i in $(seq 300); do grep -q event=ready "$mnt/../second.err" && break; sleep 0.1; done
kill -TERM $pid
wait $pid
echo "second=$?"
"""


def test_a_disk_too_full_for_the_index_is_one_line_and_the_next_start_works(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(["unshare", "-m", "sh", "-c", SCRIPT, "sh", str(mnt), sys.executable,
                          str(tmp_path / "reg")], capture_output=True, text=True, timeout=120,
                         env=env, cwd=ROOT)
    got = dict(line.split("=", 1) for line in out.stdout.split())
    first = (tmp_path / "first.err").read_text()
    assert got.get("first") == "1", (out.stdout, out.stderr, first[-3000:])
    assert "Traceback" not in first, first[-3000:]
    lines = first.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"blockd: chunk store {mnt}/data/chunks"), first
    second = (tmp_path / "second.err").read_text()
    assert got.get("second") == "0" and "event=ready" in second, (out.stdout, second[-3000:])
    assert "Traceback" not in second, second[-3000:]
