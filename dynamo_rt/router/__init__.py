"""Request routing: the KV block index (:mod:`.indexer`), the policies (:mod:`.policy`), the router's book
of in-flight requests (:mod:`.active`), the event consumer that feeds the index (:mod:`.events`) and the
watch on workers whose events do not arrive (:mod:`.staleness`).
Pure logic: the frontend wires NATS and discovery to it."""

from dynamo_rt.router.active import ActiveRequests
from dynamo_rt.router.events import RouterEvents
from dynamo_rt.router.indexer import TIERS, ApproxIndexer, KvIndexer, PrefixIndex
from dynamo_rt.router.policy import ROUTER_MODES, RouteDecision, Router, RouterMetrics, RouterMode
from dynamo_rt.router.staleness import EventWatch

__all__ = [
    "ROUTER_MODES",
    "TIERS",
    "ActiveRequests",
    "ApproxIndexer",
    "EventWatch",
    "KvIndexer",
    "PrefixIndex",
    "RouteDecision",
    "Router",
    "RouterEvents",
    "RouterMetrics",
    "RouterMode",
]
