"""The SLA planner: sizes the prefill and decode pools from the observed load and the TTFT / ITL targets.

``dynamo-rt planner`` runs :mod:`planner.runner`; the arithmetic is in
:mod:`planner.core`, the observations come from :mod:`planner.metrics`, and the
connectors that apply decisions are in :mod:`planner.connectors` (``local``, ``dry-run``) and
:mod:`planner.rbg` (Kubernetes RoleBasedGroups, over :mod:`planner.kube`).
"""

from planner.core import (
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
from planner.runner import PlannerLoop, add_arguments, build_parser, main, parse_args, run, serve

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
