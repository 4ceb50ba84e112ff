"""vbp.registry.etcd_backend's failover rules, over a fake etcd (httpx.MockTransport): which
answers send a request on to the next endpoint, and which end it as an unknown outcome.
The backend's behaviour against a real etcd is in tests/conformance/test_registry.py."""

from __future__ import annotations

import json

import httpx
import pytest

from vbp.errors import RegistryUnavailable
from vbp.registry.etcd_backend import EtcdKV
from vbp.registry.kv import Cmp, Put

OK_TXN = {"header": {"revision": "7"}, "succeeded": True}


def fake(first):
    """An EtcdKV over endpoints a and b: a answers `first` (status, body), b succeeds.
    Returns (kv, the endpoints each request went to)."""
    calls: list = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.host)
        if request.url.host == "a":
            status, body = first
            return httpx.Response(status, content=body if isinstance(body, bytes)
                                  else json.dumps(body).encode())
        return httpx.Response(200, json=OK_TXN if "txn" in request.url.path
                              else {"header": {"revision": "7"}})

    kv = EtcdKV("etcd://a:2379,b:2379", ["a:2379", "b:2379"])
    kv._client = httpx.Client(transport=httpx.MockTransport(handler))
    return kv, calls


def txn(kv):
    return kv.txn([Cmp(b"k", "mod", 0)], [Put(b"k", b"v")])


@pytest.mark.parametrize("first", [
    (503, {"code": 14, "message": "etcdserver: leader changed"}),
    (503, {"code": 14, "message": "etcdserver: request timed out"}),
    (502, b"<html>bad gateway</html>"),
])
def test_a_txn_that_may_have_been_proposed_is_not_sent_again(first):
    """The first endpoint's answer leaves open whether the txn went in: sent again to the
    second, it would be applied twice (a shrink cut twice, a volume created and then
    reported existing). It ends as an unknown outcome, on the first endpoint only."""
    kv, calls = fake(first)
    with pytest.raises(RegistryUnavailable, match="unknown outcome"):
        txn(kv)
    assert calls == ["a"]


def test_a_txn_refused_for_want_of_a_leader_goes_to_the_next_endpoint():
    kv, calls = fake((503, {"code": 14, "message": "etcdserver: no leader"}))
    assert txn(kv) == (True, 7)
    assert calls == ["a", "b"]


@pytest.mark.parametrize("first", [
    (503, {"code": 14, "message": "etcdserver: leader changed"}),
    (502, b"<html>bad gateway</html>"),
])
def test_a_read_goes_to_the_next_endpoint_whatever_the_first_said(first):
    kv, calls = fake(first)
    assert kv.get(b"k") == (None, 7)
    assert calls == ["a", "b"]
