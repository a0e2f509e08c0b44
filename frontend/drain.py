"""Graceful shutdown of the frontend process (:mod:`frontend.main`): on SIGTERM / SIGINT it drains.

:class:`Drain` wraps the ASGI app and counts the API requests in flight. :meth:`Drain.drain` stops admitting
(a new POST gets 503 with the OpenAI error body, so a load balancer or client retries elsewhere, while the
socket stays open: a refused connection would say nothing), then waits up to the drain timeout for the
requests in flight to finish. What still runs after that is cancelled by the HTTP server's shutdown, which
:class:`frontend.app.OpenAIResponse` turns into an error event and ``[DONE]`` on each stream.
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from dynamo_rt import errors
from frontend.app import error_response


class Drain:
    """ASGI wrapper: the count of API requests in flight, and 503 for new ones once draining."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.inflight = 0
        self.draining = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if self.draining:
            exc = errors.Unavailable("the frontend is shutting down and admits no new requests; retry")
            await error_response(exc)(scope, receive, send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1

    async def drain(self, timeout: float) -> int:
        """Stop admitting, wait up to ``timeout`` seconds for the requests in flight; how many still run."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight
