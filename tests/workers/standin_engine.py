"""Test helper: a stand-in engine registered the documented way (its module added to ``workers.registry.ENGINES``).

It is what a new engine folder's flags module holds: flags of its own (one of them named like another engine's,
with its own default and env twin), a build function, and some of the optional abilities of
``workers.common.engine`` (instance extras, its instance id, a tiered cache, a multi-node follower mode). Its
output is the prompt reversed, so a test can tell it answered.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import AsyncIterator
from typing import Any

from dynamo_rt.config import flag
from dynamo_rt.errors import ConfigError
from dynamo_rt.protocol import GenerateRequest
from workers.common.engine import EngineLoad, EngineOutput, KvEventSink, ModelInfo
from workers.registry import EngineSpec

MODULE = __name__


def add_flags(parser: argparse.ArgumentParser) -> None:
    flag(parser, "--greeting", env="DYN_STANDIN_GREETING", default="hello", help="what its instance record says")
    flag(parser, "--max-num-seqs", env="DYN_STANDIN_MAX_NUM_SEQS", type=int, default=3,
         help="most requests at once (named like the reference engine's flag, with its own default and twin)")
    flag(parser, "--copies", env="DYN_STANDIN_COPIES", type=int, default=1, help="engines in this process")


class StandinEngine:
    def __init__(self, info: ModelInfo, greeting: str, max_num_seqs: int) -> None:
        self.info = info
        self.greeting = greeting
        self.max_num_seqs = max_num_seqs
        self.instance_id = ""  # NamedInstance: set by the runtime
        self.started = False
        self._sink: KvEventSink | None = None

    @property
    def instance_extra(self) -> dict[str, Any]:
        return {"greeting": self.greeting}

    def cached_block_hashes_by_tier(self) -> dict[str, list[int]]:
        return {"host": [7, 8]}

    def run_headless(self) -> None:
        # What a follower node does instead of serving; the test reads this line.
        print(f"standin headless: {self.greeting}", file=sys.stdout, flush=True)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.started = False

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        yield EngineOutput(token_ids=list(reversed(request.token_ids)), finish_reason="stop",
                           prompt_tokens=len(request.token_ids))

    def load(self) -> EngineLoad:
        return EngineLoad(kv_blocks_total=self.max_num_seqs)

    def set_kv_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def cached_block_hashes(self) -> list[int]:
        return [1, 2, 3]

    async def release_pin(self, pin_id: str) -> bool:
        return False


def build(args: argparse.Namespace, info: ModelInfo) -> list[StandinEngine]:
    if args.copies < 1:
        raise ConfigError("--copies", f"must be at least 1, not {args.copies}")
    info = dataclasses.replace(info, block_size=8)
    return [StandinEngine(info, args.greeting, args.max_num_seqs) for _ in range(args.copies)]


SPEC = EngineSpec(name="standin", description="a test's stand-in engine (echoes the prompt reversed)",
                  add_flags=add_flags, build=build)
