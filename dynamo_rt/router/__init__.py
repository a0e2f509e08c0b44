"""Request routing: the KV block index (:mod:`.indexer`), the policies (:mod:`.policy`) and the event
consumer that feeds them (:mod:`.events`). Pure logic: the frontend wires NATS and discovery to it."""

from dynamo_rt.router.events import RouterEvents
from dynamo_rt.router.indexer import TIERS, ApproxIndexer, KvIndexer, PrefixIndex
from dynamo_rt.router.policy import ROUTER_MODES, RouteDecision, Router, RouterMetrics, RouterMode

__all__ = [
    "ROUTER_MODES",
    "TIERS",
    "ApproxIndexer",
    "KvIndexer",
    "PrefixIndex",
    "RouteDecision",
    "Router",
    "RouterEvents",
    "RouterMetrics",
    "RouterMode",
]
