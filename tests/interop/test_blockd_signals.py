"""blockd run directly, as the systemd unit runs it: the signals an operator may send."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

PORTS = (24210, 24211)  # peer, NBD


def start_blockd(tmp_path) -> tuple[subprocess.Popen, object]:
    err = open(tmp_path / "stderr", "w+")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockd.main", "--host-id", "h1", "--data-dir",
         str(tmp_path / "data"), "--registry", f"lmdb://{tmp_path / 'registry'}",
         "--listen", f"127.0.0.1:{PORTS[0]}", "--nbd", f"127.0.0.1:{PORTS[1]}"],
        stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=ROOT)
    return proc, err


def wait_for(proc, err, text: str, timeout: float = 60.0) -> bool:
    """True once `text` is in blockd's stderr; False if blockd ended or time ran out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        err.seek(0)
        if text in err.read():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def test_sighup_does_not_stop_blockd_and_sigterm_still_stops_it_cleanly(tmp_path):
    """SIGHUP is the signal operators send to make a daemon reload its config (and the
    one a closing terminal sends). blockd has nothing to reload: it says so and serves
    on. Before, it died of it uncleanly, and systemd takes death by SIGHUP for a clean
    exit, so Restart=on-failure left the host down."""
    proc, err = start_blockd(tmp_path)
    try:
        assert wait_for(proc, err, "event=ready"), "blockd did not start"
        proc.send_signal(signal.SIGHUP)
        wait_for(proc, err, "signal=SIGHUP")
        assert proc.poll() is None, f"blockd ended on SIGHUP: {proc.returncode}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        err.seek(0)
        assert "event=stopped" in err.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()


def test_sigterm_during_the_start_stops_blockd_at_once(tmp_path):
    """A start may wait: here for the liveness of another blockd of the same host id (a
    disk replaced after a crash) to lapse, up to heartbeat_ttl + 1 s. SIGTERM then stops
    it at once, exit 0, saying so. Before, the signal was acted on only once the start
    ended (systemd's stop timed out behind a long start), and the start, failing, died
    of the re-raised signal without its error line."""
    from vbp.cluster import HostRecord
    from vbp.registry import open_registry

    with open_registry(f"lmdb://{tmp_path / 'registry'}") as reg:
        reg.register_host(HostRecord("h1", "127.0.0.9:1", "127.0.0.9:2", store_id="another"), 600)
    conf = tmp_path / "blockd.toml"
    conf.write_text("heartbeat_ttl = 60\n")
    err = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "blockd.main", "--host-id", "h1", "--data-dir",
         str(tmp_path / "data"), "--registry", f"lmdb://{tmp_path / 'registry'}",
         "--listen", "127.0.0.1:0", "--nbd", "127.0.0.1:0", "--log-level", "info",
         "--config", str(conf)],
        stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        time.sleep(3)  # (well into the wait: the store opened, the registry asked)
        assert proc.poll() is None, "blockd ended before the signal"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        err.seek(0)
        text = err.read()
        assert "event=signal signal=SIGTERM: stopping the start" in text, text
        assert "Traceback" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

