"""Mocker worker: a simulated engine (timing model + real KV block accounting) for router, planner and
load tests. :class:`MockerEngine` is the engine; :mod:`workers.mocker.flags` is its spec for the engine
registry (flags and factory)."""

from workers.mocker.engine import MockerEngine, RequestStats, TimingModel

__all__ = ["MockerEngine", "RequestStats", "TimingModel"]
