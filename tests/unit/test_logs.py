"""blockd.logs: one structured line per event, with the request id when there is one."""

from __future__ import annotations

import json
import logging

import pytest
import trio

from blockd.logs import JSONFormatter, KVFormatter
from vbp import reqid


def record(msg: str = "volume=v chunk=%d event=replica_failed", *args, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("vbp.gateway", logging.WARNING, __file__, 1, msg, args or (3,), None)
    rec.__dict__.update(extra)
    return rec


def test_kv_line_without_a_request_has_no_rid():
    line = KVFormatter("h1").format(record())
    assert "rid=" not in line
    assert line.endswith(" level=warning host=h1 logger=vbp.gateway "
                         "volume=v chunk=3 event=replica_failed")


def test_kv_and_json_lines_carry_the_current_request_id():
    token = reqid.current.set("h1-00abcd-7")
    try:
        kv = KVFormatter("h1").format(record())
        js = json.loads(JSONFormatter("h1").format(record()))
    finally:
        reqid.current.reset(token)
    assert " logger=vbp.gateway rid=h1-00abcd-7 volume=v chunk=3" in kv
    assert js["rid"] == "h1-00abcd-7" and js["msg"] == "volume=v chunk=3 event=replica_failed"
    assert "rid" not in json.loads(JSONFormatter("h1").format(record()))


def test_a_frontend_request_id_is_formatted_when_a_line_is_logged():
    """The NBD frontend sets (RequestIds, counter), not the string (vbp.reqid)."""
    ids = reqid.RequestIds("h1", boot=0xABCD)
    ids.next_ref()
    token = reqid.current.set(ids.next_ref())
    try:
        kv = KVFormatter("h1").format(record())
        assert reqid.get() == "h1-00abcd-2"
        ids.next_ref()  # the frontend moved on: this request keeps its id
        assert reqid.get() == "h1-00abcd-2"
    finally:
        reqid.current.reset(token)
    assert " rid=h1-00abcd-2 volume=v" in kv
    assert reqid.get() == "" and ids.text(ids.next_ref()[1]) == "h1-00abcd-4"


def test_an_explicit_request_id_wins():
    token = reqid.current.set("h1-00abcd-7")
    try:
        line = KVFormatter("h2").format(record(rid="h3-000001-1"))
    finally:
        reqid.current.reset(token)
    assert " rid=h3-000001-1 " in line and "h1-00abcd-7" not in line


def test_request_ids_are_short_and_distinct():
    ids = reqid.RequestIds("h1", boot=0x3FA9C2)
    assert [ids.text(ids.next_ref()[1]) for _ in range(3)] == ["h1-3fa9c2-1", "h1-3fa9c2-2",
                                                              "h1-3fa9c2-3"]
    # a restarted host draws another boot tag: its ids do not repeat the old ones
    assert reqid.RequestIds("h1").prefix.startswith("h1-")
    assert len({reqid.RequestIds("h1").prefix for _ in range(20)}) > 1


async def test_the_request_id_follows_into_child_tasks_only():
    seen = {}

    async def replica_task(name):
        await trio.sleep(0)
        seen[name] = reqid.current.get()

    async with trio.open_nursery() as nursery:
        token = reqid.current.set("h1-000001-9")
        try:
            nursery.start_soon(replica_task, "child")
        finally:
            reqid.current.reset(token)
        nursery.start_soon(replica_task, "other")
    assert seen == {"child": "h1-000001-9", "other": ""}


# What a log line repeats may come from outside: a volume name or request id in a peer's
# message (replicator.replica's "event=refused" line), an error message a peer or the
# registry sent, an export name. Whatever it holds, one event is one line: a newline in
# it must not end the line early and start one that reads as another event.
UNTRUSTED = ["v\nts=2026-01-01T00:00:00.000Z level=error host=h9 event=forged",
             "a\rb", "tab\there", "nul\0", "esc\x1b[31m", "del\x7f", "nel\x85", "ls\u2028ps\u2029",
             "vt\x0bff\x0cfs\x1c", 'quote" and \\ back', "bad \udcff utf-8"]


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_one_event_is_one_line_whatever_the_values_hold(fmt):
    formatter = KVFormatter("h1") if fmt == "kv" else JSONFormatter("h1")
    for value in UNTRUSTED:
        rec = record("volume=%s chunk=%s op=write event=refused gateway=%s error=%s: %s",
                     value, 3, "h2", "NotFound", f"volume {value} not found")
        line = formatter.format(rec)
        assert len(line.splitlines()) == 1, (value, line)
        assert not any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 for c in line), (value, line)
        line.encode("utf-8", "backslashreplace")  # (what stderr writes)
        if fmt == "json":
            assert json.loads(line)["msg"] == rec.getMessage()
        else:
            assert line.startswith("ts=") and " event=refused " in line
