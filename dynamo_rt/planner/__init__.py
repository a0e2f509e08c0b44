"""The SLA planner: sizes the prefill and decode pools from the observed load and the TTFT / ITL targets.

``dynamo-rt planner`` runs :mod:`dynamo_rt.planner.runner`; the arithmetic is in
:mod:`dynamo_rt.planner.core`, the observations come from :mod:`dynamo_rt.planner.metrics`, and the
connectors that apply decisions are in :mod:`dynamo_rt.planner.connectors` (``local``, ``dry-run``) and
:mod:`dynamo_rt.planner.rbg` (Kubernetes RoleBasedGroups, over :mod:`dynamo_rt.planner.kube`).
"""

from dynamo_rt.planner.core import (
    Decision,
    Observation,
    Planner,
    PlannerConfig,
    PoolLimits,
    PoolPlan,
    Profile,
    decode_replicas,
    make_predictor,
    prefill_replicas,
)
from dynamo_rt.planner.runner import PlannerLoop, add_arguments, build_parser, main, parse_args, run, serve

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
