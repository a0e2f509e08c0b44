"""cProfile inside the frontend under ``frontend_overhead.py``'s load, grouped into hops (a helper of that
bench's accounting, not a bench of its own). py-spy (``--profile``) counts a thread preempted on this 2-core
VM as busy, which inflates every socket write; cProfile counts calls exactly but adds its own cost per call
and measures wall time per function, so read the shares, not the microseconds.

1. ``python bench/_cprofile_hops.py sitecustomize DIR``: writes ``DIR/sitecustomize.py``, which profiles any
   ``python -m frontend`` started with ``DIR`` on ``PYTHONPATH`` and ``DYN_CPROFILE=PREFIX`` set, and dumps
   ``PREFIX.<pid>`` when it exits. For ``--ab-ref`` put a copy in ``bench/out/ab/<sha>/`` too (that stack's
   frontend runs with its tree as ``PYTHONPATH``).
2. ``DYN_CPROFILE=/tmp/cprof PYTHONPATH=DIR .venv/bin/python bench/frontend_overhead.py --ours-only
   [--ab-ref REF] --rounds 1 --requests 1500 --phases paced``
3. ``python bench/_cprofile_hops.py table /tmp/cprof.<pid> [...]``: the per-hop table (Markdown), one column
   per profile, self time per request (requests: the calls of ``Frontend.prepare``).
"""

from __future__ import annotations

import pstats
import sys
from collections.abc import Callable
from pathlib import Path

SITECUSTOMIZE = '''import os
if os.environ.get("DYN_CPROFILE") and b"-m\\x00frontend\\x00" in open("/proc/self/cmdline", "rb").read():
    import atexit
    import cProfile

    _profile = cProfile.Profile()
    _profile.enable()

    def _dump() -> None:
        _profile.disable()
        _profile.dump_stats(os.environ["DYN_CPROFILE"] + f".{os.getpid()}")

    atexit.register(_dump)
'''

Rule = Callable[[str, str], bool]
_CLIENT_WRITE = ("_write", "write", "write3", "_finish")
_TOKEN_FNS = ("on_tokens", "consume", "emit", "content", "_js", "js", "write3", "text_parts")
HOPS: list[tuple[str, str, Rule]] = [
    ("client socket writes (SSE)", "token", lambda f, fn: (f.endswith(("http1.py", "sse.py")) and fn in _CLIENT_WRITE)
     or ("uvicorn" in f and fn in ("send", "_get_default_headers"))),
    ("detokenization", "token", lambda f, fn: f.endswith("detok.py") or "DecodeStream" in fn
     or fn in ("<method 'decode' of 'bytes' objects>", "<method 'isdisjoint' of 'frozenset' objects>")),
    ("token path: frames -> chunks", "token", lambda f, fn: (f.endswith(("serving.py", "sse.py")) and fn in _TOKEN_FNS)
     or (f.endswith("stream.py") and fn in ("_deliver", "_push")) or "msgpack.Decoder" in fn
     or (f.endswith("transport.py") and fn in ("_on_batch", "process_msg")) or fn == "<orjson.dumps>"
     or fn.startswith("<built-in method time.") or (f.endswith("protocol.py") and fn == "decode_frame")),
    ("NATS receive (nats-py parser, stream reader)", "token", lambda f, fn: "nats/protocol" in f
     or ("asyncio/streams.py" in f and fn in ("read", "feed_data", "data_received", "_wakeup_waiter"))
     or ("nats/aio/client" in f and fn == "_read_loop")),
    ("NATS publish (flusher, writelines)", "request", lambda f, fn: ("asyncio/streams.py" in f
     and fn in ("writelines", "drain")) or ("nats/aio" in f and fn in ("_flusher", "_flush_pending", "publish",
                                                                      "_send_command", "writelines"))),
    ("tokenizer", "request", lambda f, fn: "'encode" in fn and "tokenizers" in fn),
    ("chat template (jinja)", "request", lambda f, fn: "jinja2" in f or f == "<template>"
     or fn == "apply_chat_template"),
    ("HTTP server (accept, parse, dispatch)", "request", lambda f, fn: f.endswith("http1.py") or "uvicorn" in f
     or "starlette" in f or "httptools" in fn or "h11" in f),
    ("metrics (prometheus_client)", "request", lambda f, fn: "prometheus_client" in f or f.endswith("metrics.py")),
    ("request setup, routing, response", "request", lambda f, fn: f.endswith((
        "app.py", "serving.py", "drain.py", "openai_protocol.py", "preprocess.py", "policy.py", "models.py", "pins.py",
        "chat_output.py", "indexer.py", "stream.py", "transport.py", "tenants.py")) or "msgspec" in fn),
]
_STARTUP = ("frontend_services", "<built-in method builtins.exec>", "<built-in method builtins.compile>",
            "<built-in method marshal.loads>")  # the idle loop (its time is the wait) and imports


def hops(path: str) -> tuple[int, dict[tuple[str, str], float]]:
    stats = pstats.Stats(path).stats  # type: ignore[attr-defined]
    requests = sum(v[0] for k, v in stats.items() if k[2] == "prepare" and k[0].endswith("app.py"))
    out: dict[tuple[str, str], float] = {}
    for (f, _line, fn), v in stats.items():
        if fn in _STARTUP:
            continue
        key = next(((kind, name) for name, kind, rule in HOPS if rule(f, fn)),
                   ("other", "other Python (asyncio, builtins)"))
        out[key] = out.get(key, 0.0) + v[2]
    return requests, out


def table(paths: list[str]) -> str:
    cols = [hops(p) for p in paths]
    keys = sorted({k for _, h in cols for k in h},
                  key=lambda k: (["token", "request", "other"].index(k[0]), -cols[-1][1].get(k, 0.0)))
    totals = [sum(h.values()) * 1e6 / max(1, n) for n, h in cols]
    lines = ["| hop | path | " + " | ".join(f"{Path(p).name} us/req (share)" for p in paths) + " |",
             "|---|---|" + "---|" * len(paths)]
    for k in keys:
        cells = [f"{h.get(k, 0.0) * 1e6 / max(1, n):.0f} ({100 * h.get(k, 0.0) * 1e6 / max(1, n) / t:.0f}%)"
                 for (n, h), t in zip(cols, totals, strict=True)]
        lines.append(f"| {k[1]} | {k[0]} | " + " | ".join(cells) + " |")
    lines.append("| total self time | | " + " | ".join(f"{t:.0f}" for t in totals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sitecustomize":
        (Path(sys.argv[2]) / "sitecustomize.py").write_text(SITECUSTOMIZE)
    elif len(sys.argv) > 2 and sys.argv[1] == "table":
        print(table(sys.argv[2:]))
    else:
        sys.exit(__doc__)
