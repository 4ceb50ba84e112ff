"""Fixtures for the conformance suites: a real etcd on loopback.

`etcd_server` is one etcd for the whole session (free loopback ports, a temp data dir,
short heartbeat/election so etcd's minimum lease TTL is 1 s). `EtcdProcess` is also usable
directly by tests that need their own etcd to stop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.etcd import ETCD, EtcdProcess, free_port  # noqa: F401 (used by the registry tests)


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    if not Path(ETCD).exists():
        pytest.fail("etcd is not installed (Debian package etcd-server; make test installs it)")
    e = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data").start()
    yield e
    e.stop()


@pytest.fixture
def etcd_factory(tmp_path):
    """Start private etcd instances that a test may stop; all stopped at teardown."""
    started: list[EtcdProcess] = []

    def make() -> EtcdProcess:
        e = EtcdProcess(tmp_path / f"etcd{len(started)}").start()
        started.append(e)
        return e

    yield make
    for e in started:
        e.stop()
