"""Stored Responses (``POST /v1/responses`` with ``store``) in a NATS JetStream key-value bucket.

A stored response is what ``previous_response_id`` continues and ``GET /v1/responses/{id}`` returns. It lives in
JetStream, not in one frontend's memory, so a conversation continues on any frontend replica of the namespace;
the bucket's TTL (``--response-ttl``) expires old ones. One record per response id: the response object as it
was returned, plus the conversation up to and including its output as chat messages (the chat path's own shape,
so a continuation is a chat request with more messages). NATS exceptions are mapped to our errors here.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import nats.errors
import nats.js.errors
import orjson
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from dynamo_rt import errors
from dynamo_rt.transport import Transport

DEFAULT_TTL = 24 * 3600.0  # seconds a stored response can be continued or fetched


def bucket_name(namespace: str) -> str:
    """The bucket of a namespace: JetStream bucket names allow letters, digits, ``-`` and ``_`` only."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{namespace}-responses")


class ResponseStore:
    """Get / put / delete stored responses. The bucket is opened (or created) on first use."""

    def __init__(self, transport: Transport, namespace: str, ttl: float = DEFAULT_TTL) -> None:
        self.transport = transport
        self.bucket = bucket_name(namespace)
        self.ttl = ttl
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()

    async def _open(self) -> KeyValue:
        if self._kv is not None:
            return self._kv
        async with self._lock:
            if self._kv is None:
                js = self.transport.nc.jetstream()
                try:
                    # An existing bucket is used as it is: replicas started with another --response-ttl must
                    # not fail on a config mismatch (the first one to create it sets the TTL).
                    self._kv = await js.key_value(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    self._kv = await js.create_key_value(KeyValueConfig(
                        bucket=self.bucket, ttl=self.ttl, history=1,
                        description="dynamo-rt stored responses (POST /v1/responses)"))
            return self._kv

    async def put(self, response_id: str, record: dict[str, Any]) -> None:
        try:
            kv = await self._open()
            await kv.put(response_id, orjson.dumps(record))
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
            raise errors.Unavailable(f"storing response {response_id} failed: {type(exc).__name__} {exc}") \
                from None

    async def get(self, response_id: str) -> dict[str, Any] | None:
        """The record, or None when there is none (never stored, expired, deleted)."""
        try:
            kv = await self._open()
            entry = await kv.get(response_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except nats.js.errors.InvalidKeyError:  # an id we never issue: it names nothing
            return None
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
            raise errors.Unavailable(f"reading response {response_id} failed: {type(exc).__name__} {exc}") \
                from None
        if not entry.value:
            return None
        record: dict[str, Any] = orjson.loads(entry.value)
        return record

    async def delete(self, response_id: str) -> bool:
        """Remove a record; False when there was none."""
        if await self.get(response_id) is None:
            return False
        try:
            kv = await self._open()
            await kv.purge(response_id)
        except (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError) as exc:
            raise errors.Unavailable(f"deleting response {response_id} failed: {type(exc).__name__} {exc}") \
                from None
        return True
