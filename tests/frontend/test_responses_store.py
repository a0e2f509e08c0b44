"""The stored-responses bucket (frontend/response_store.py) on a real JetStream nats-server: records round-trip,
a missing or deleted id reads as None, the bucket's TTL expires records, and a replica started with another
TTL opens the existing bucket instead of failing on a config mismatch."""

from __future__ import annotations

import asyncio

from dynamo_rt.transport import Transport
from frontend.response_store import ResponseStore, bucket_name
from tests.conftest import arun


def test_bucket_name_is_valid_for_jetstream() -> None:
    assert bucket_name("dynamo") == "dynamo-responses"
    assert bucket_name("team.a/b") == "team_a_b-responses"


def test_put_get_delete_and_ttl(nats_server: object) -> None:
    async def main() -> None:
        t1, t2 = Transport(nats_server.url), Transport(nats_server.url)  # type: ignore[attr-defined]
        await t1.connect()
        await t2.connect()
        try:
            a = ResponseStore(t1, "store-test", ttl=2.0)
            b = ResponseStore(t2, "store-test", ttl=3600.0)  # another TTL: opens a's bucket as it is
            rec = {"response": {"id": "resp_1", "output": []}, "messages": [{"role": "user", "content": "hi"}]}
            await a.put("resp_1", rec)
            assert await b.get("resp_1") == rec
            assert await b.get("resp_missing") is None
            assert await b.get("not a valid key!") is None
            assert await b.delete("resp_1") is True
            assert await a.get("resp_1") is None
            assert await a.delete("resp_1") is False
            await b.put("resp_2", rec)
            assert await a.get("resp_2") == rec
            # The bucket's TTL (the first store's, 2 s) expires it: generous polling, JetStream expires lazily.
            for _ in range(100):
                if await a.get("resp_2") is None:
                    break
                await asyncio.sleep(0.2)
            assert await a.get("resp_2") is None
        finally:
            await t1.close()
            await t2.close()

    arun(main(), timeout=60)
