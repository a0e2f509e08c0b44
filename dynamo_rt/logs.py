"""Logging set-up for every process: one call in each process's entry function, never at import time.

``text``: ``2026-11-27T02:19:53.123Z INFO  frontend: message``; ``json``: one JSON object per line with
ts, level, logger, msg, and any ``extra`` fields, for log shippers.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

_STD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(level: str = "info", fmt: str = "text", role: str = "") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        f = logging.Formatter(f"%(asctime)s.%(msecs)03dZ %(levelname)-5s {role + ' ' if role else ''}"
                              "%(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")
        f.converter = time.gmtime
        handler.setFormatter(f)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper() if level.upper() in logging._nameToLevel else "INFO")
    # Chatty libraries stay at warning unless we debug.
    for name in ("nats", "grpc", "uvicorn.access", "httpx", "etcd3aio"):
        logging.getLogger(name).setLevel(logging.WARNING if level.lower() != "debug" else logging.DEBUG)
