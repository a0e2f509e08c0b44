"""Test-only kill switches of the reference engine: the worker process SIGKILLs itself at a precise point,
so a test (tests/reliability/test_replay.py) crashes it at chosen token positions instead of guessing with
timers.

Place: :class:`~workers.reference.engine.ReferenceEngine` reads them once from its environment and calls
:meth:`KillSwitch.tokens` from the step thread after each step's outputs are handed to the event loop, and
:meth:`KillSwitch.kv_load` on the loop as a decode request starts reading its prompt's KV from the prefill
worker. Unset (the default everywhere outside tests), both are one integer comparison.

  DYN_TEST_KILL_AFTER_TOKENS=N  die once this process has sampled N tokens (all requests together; a
                                prefill worker samples one per request)
  DYN_TEST_KILL_IN_KV_LOAD=N    die while the N-th KV read of this process is under way
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping

log = logging.getLogger(__name__)

KILL_AFTER_TOKENS_ENV = "DYN_TEST_KILL_AFTER_TOKENS"
KILL_IN_KV_LOAD_ENV = "DYN_TEST_KILL_IN_KV_LOAD"


class KillSwitch:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.after_tokens = int(env.get(KILL_AFTER_TOKENS_ENV) or 0)
        self.in_kv_load = int(env.get(KILL_IN_KV_LOAD_ENV) or 0)
        self.sampled = 0
        self.loads = 0

    def tokens(self, n: int) -> None:
        """``n`` more tokens were sampled (step thread)."""
        if self.after_tokens and n:
            self.sampled += n
            if self.sampled >= self.after_tokens:
                _die(f"{self.sampled} tokens sampled ({KILL_AFTER_TOKENS_ENV}={self.after_tokens})")

    def kv_load(self, loop: asyncio.AbstractEventLoop) -> None:
        """A KV read is about to start on ``loop``: on the chosen one, die as soon as it has been posted (the
        loader's first await), so the read is in flight when the process goes."""
        if self.in_kv_load:
            self.loads += 1
            if self.loads == self.in_kv_load:
                loop.call_soon(_die, f"KV read {self.loads} under way ({KILL_IN_KV_LOAD_ENV}={self.in_kv_load})")


def _die(why: str) -> None:
    log.warning("test kill switch: SIGKILL after %s", why)
    for h in logging.getLogger().handlers:
        h.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def from_env() -> KillSwitch:
    return KillSwitch(os.environ)
