"""Structured logs: one line per event, key=value (default) or JSON.

A line logged on behalf of a client request carries its id (`rid=`, vbp.reqid): the one
set for the logging task, or one given explicitly with `extra={"rid": ...}`."""

from __future__ import annotations

import json
import logging
import sys
import time

from vbp import reqid


# Characters a kv line shows escaped: the C0 and C1 controls and DEL, and the line and
# paragraph separators. A value logged may come from outside (a volume name or request id in
# a peer's message, an error a peer or the registry sent): a newline in it would end the
# event early and start a line that reads as another one.
_ESCAPES = {c: ascii(chr(c))[1:-1] for c in (*range(0x20), *range(0x7f, 0xa0), 0x2028, 0x2029)}


def _one_line(text: str) -> str:
    return text.translate(_ESCAPES) if not text.isprintable() else text


def _rid(record: logging.LogRecord) -> str:
    return getattr(record, "rid", None) or reqid.get()


class KVFormatter(logging.Formatter):
    def __init__(self, host_id: str):
        super().__init__()
        self.host_id = host_id

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        rid = _rid(record)
        line = (f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"host={self.host_id} logger={record.name} "
                f"{f'rid={_one_line(rid)} ' if rid else ''}{_one_line(record.getMessage())}")
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class JSONFormatter(KVFormatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "host": self.host_id,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = _rid(record)
        if rid:
            out["rid"] = rid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(host_id: str, level: str = "info", fmt: str = "kv") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(host_id) if fmt == "json" else KVFormatter(host_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # the etcd registry's HTTP client logs every request at info: a line per heartbeat
    # would bury the events an operator needs (its failures reach us as exceptions)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
