"""The SLA planner: sizes the prefill and decode pools from the observed load and the TTFT / ITL targets.

- :mod:`planner.runner`: the ``dynamo-rt planner`` process, the observe -> decide -> apply loop.
- :mod:`planner.core`: :class:`Planner`, observations in, target replicas out (limits, stabilization,
  scale to zero, latency corrections).
- :mod:`planner.sla`: the replica formulas (queueing for prefill, the ITL cap for decode).
- :mod:`planner.profile`: the engine's per-replica performance profile; :mod:`planner.profiler` measures
  one (``dynamo-rt profile``).
- :mod:`planner.predictors`: the next interval's load from the last ones.
- :mod:`planner.metrics`: observations from the frontends' Prometheus metrics.
- Connectors that apply decisions: :mod:`planner.connectors` (``local``, ``dry-run``) and :mod:`planner.rbg`
  (Kubernetes RoleBasedGroups over :mod:`planner.kube`, with the RBG names of :mod:`deploy.rbg`).
"""

from planner.core import Decision, Observation, Planner, PlannerConfig, PoolLimits
from planner.predictors import make_predictor
from planner.profile import Profile
from planner.runner import PlannerLoop, add_arguments, build_parser, main, parse_args, run, serve
from planner.sla import PoolPlan, decode_replicas, prefill_replicas

__all__ = [
    "Decision",
    "Observation",
    "Planner",
    "PlannerConfig",
    "PlannerLoop",
    "PoolLimits",
    "PoolPlan",
    "Profile",
    "add_arguments",
    "build_parser",
    "decode_replicas",
    "main",
    "make_predictor",
    "parse_args",
    "prefill_replicas",
    "run",
    "serve",
]
