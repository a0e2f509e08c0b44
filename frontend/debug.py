"""Read-only debug routes of the frontend, on only with ``--debug-endpoints`` (they list cache contents).

``GET /debug/kv_index``: per model, the block hashes the KV router's index holds for each worker (primary
tier) and the workers waiting for a resync. bench/chaos.py compares it with what each engine holds (the
worker's own ``kv_blocks`` snapshot endpoint) to check that the index converges after faults.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from frontend.models import ModelManager


def kv_index(manager: ModelManager) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sm in list(manager.models.items()):
        ix = sm.indexer
        if ix is None:
            continue
        out[name] = {"workers": {w: sorted(ix.blocks(w)) for w in ix.workers()},
                     "pending_resyncs": ix.pending_resyncs()}
    return {"models": out}


class DebugRoutes:
    """ASGI wrapper answering the debug routes; everything else goes to ``app``."""

    def __init__(self, app: ASGIApp, manager: ModelManager) -> None:
        self.app, self.manager = app, manager

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/debug/kv_index":
            body = json.dumps(kv_index(self.manager)).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)
