"""Every Prometheus metric the gateway exports, defined once.

Each app owns a ``Metrics`` with its own registry (tests build many apps in one
process). Labels only ever hold bounded values: route *templates* from the
table (never raw paths or voucher codes), methods, status codes, and the fixed
reason/kind/result vocabularies below.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import generate_latest

# 1 ms to 3 s (the default upstream budget), then the long tail.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip

UPSTREAM_FAILURE_KINDS = ("unreachable", "timeout", "bad_response", "aborted")
AUTH_FAILURE_REASONS = (
    "missing", "ambiguous", "malformed", "invalid", "expired", "not_yet_valid",
    "bad_claims", "unknown_key", "bad_signature", "bad_cookie_signature", "keys_unavailable",
)  # fmt: skip
JWKS_RESULTS = ("ok", "error", "timeout", "invalid")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_* (CPU, RSS, open fds, start time) of this process: one series per worker.
        ProcessCollector(registry=r)
        self.requests = Counter(
            "catalyst_proxy_requests",
            "Requests answered, by route template, method and status.",
            ("route", "method", "status"),
            registry=r,
        )
        self.request_duration = Histogram(
            "catalyst_proxy_request_duration_seconds",
            "Time from request received to response finished.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_duration = Histogram(
            "catalyst_proxy_upstream_duration_seconds",
            "Time from the start of the upstream exchange to the upstream's response headers.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_failures = Counter(
            "catalyst_proxy_upstream_failures",
            "Upstream exchanges that failed, by kind.",
            ("kind",),
            registry=r,
        )
        self.auth_failures = Counter(
            "catalyst_proxy_auth_failures",
            "Operator sessions refused, by reason.",
            ("reason",),
            registry=r,
        )
        self.jwks_refreshes = Counter(
            "catalyst_proxy_jwks_refreshes",
            "JWKS fetches, by result.",
            ("result",),
            registry=r,
        )
        self.bridge_unwired = Counter(
            "catalyst_proxy_bridge_unwired",
            "Requests refused because no bridge secret is configured.",
            registry=r,
        )
        self.in_flight = Gauge(
            "catalyst_proxy_requests_in_flight",
            "Requests being handled right now.",
            registry=r,
        )
        self.keys_available = Gauge(
            "catalyst_proxy_operator_keys_available",
            "1 when at least one operator verification key is usable, else 0.",
            registry=r,
        )
        # Pre-create the fixed-vocabulary children so they read 0 instead of being absent.
        for kind in UPSTREAM_FAILURE_KINDS:
            self.upstream_failures.labels(kind)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for result in JWKS_RESULTS:
            self.jwks_refreshes.labels(result)

    def render(self) -> bytes:
        return generate_latest(self.registry)
