"""The volume provider (blockd.service.VolumeProvider) over an export's life: opens and
closes of one export racing each other (an open waits on the registry while the last
connection of the export closes), and what every path leaves behind (refs, gateways,
the lease)."""

from __future__ import annotations

import pytest
import trio

from nbd_frontend.server import _resolve
from tests.unit.test_provider_open import _one_host

pytestmark = pytest.mark.timeout(60)


class Gates:
    """The provider's registry with calls that can be held: `hold(name)` makes the next
    call of `name` wait (after `entered` is set) until `release` is set."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.held: dict[str, tuple[trio.Event, trio.Event]] = {}

    def hold(self, name: str) -> tuple[trio.Event, trio.Event]:
        self.held[name] = (trio.Event(), trio.Event())
        return self.held[name]

    def __getattr__(self, name):
        fn = getattr(self.inner, name)

        async def call(*args, **kwargs):
            gate = self.held.pop(name, None)
            if gate is not None:
                gate[0].set()
                await gate[1].wait()
            return await fn(*args, **kwargs)

        return call


def gated(provider) -> Gates:
    gates = Gates(provider.service.registry)
    provider.service.registry = gates
    return gates


@pytest.mark.parametrize("export", ["v", "v@s1"])
async def test_an_open_joining_an_export_whose_last_connection_closes_meanwhile(export):
    """A client opens an export while its one other client is connected: the open checks
    the record (_check_same, a registry call) and meanwhile that other client leaves, the
    export's last connection, which gives the gateway up. The open still gives its client
    a gateway that serves the export, with refs counted, and its close gives the lease
    back (a head's, taken by a write)."""
    async with _one_host() as (reg, provider):
        first = await provider.open_export(export)
        gates = gated(provider)
        entered, release = gates.hold("get_volume")
        async with trio.open_nursery() as nursery:
            got = []

            async def second():
                got.append(await provider.open_export(export))

            nursery.start_soon(second)
            await entered.wait()
            first.close()  # the last connection so far: the gateway is given up
            release.set()
        gw = got[0]
        assert provider.gateways.get(export) is gw and provider.refs.get(export) == 1
        if export == "v":
            await _resolve(gw.write(0, b"C" * 4096, False))
            assert await _resolve(gw.read(0, 4096)) == b"C" * 4096
        else:
            assert await _resolve(gw.read(0, 4096)) == b"A" * 4096
        gw.close()
        assert export not in provider.gateways and export not in provider.refs
        with trio.fail_after(10):
            while (lease := reg.get_lease("v")) is not None and lease.holder:
                await trio.sleep(0.05)
