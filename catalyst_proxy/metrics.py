"""Every Prometheus metric the gateway exports, defined once.

Each app owns a ``Metrics`` with its own registry (tests build many apps in one
process). Labels only ever hold bounded values: route *templates* from the
table (never raw paths or voucher codes), methods, status codes, and the fixed
reason/kind/result vocabularies below.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric

# prometheus-client adds a `*_created` series per counter and histogram child: nobody graphs
# them, and they double the series count.
disable_created_metrics()  # type: ignore[no-untyped-call]

# 1 ms to 3 s (the default upstream budget), then the long tail.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0,
)  # fmt: skip

UPSTREAM_FAILURE_KINDS = (
    "unreachable", "timeout", "bad_response", "aborted", "overloaded", "breaker_open",
)  # fmt: skip
AUTH_FAILURE_REASONS = (
    "missing", "ambiguous", "malformed", "invalid", "expired", "not_yet_valid",
    "bad_claims", "unknown_key", "bad_signature", "bad_cookie_signature", "keys_unavailable",
)  # fmt: skip
JWKS_RESULTS = ("ok", "empty", "error", "timeout", "invalid")
BREAKER_STATES = ("closed", "open", "half-open")
IDEMPOTENCY_OUTCOMES = ("new", "replayed", "in-use", "reused", "unknown", "store-error")
STORE_ERROR_ACTIONS = ("allowed", "refused")

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Tally:
    """A counter by (at most) one label, kept as plain ints and read at scrape time.

    For the counters bumped on the keyed path (idempotency outcomes, evictions):
    a prometheus-client child takes a lock and three calls per increment (~1 µs a
    request, measured); here it is one dict update. The event loop is the only
    writer, and scrapes run on it too."""

    def __init__(
        self,
        name: str,
        documentation: str,
        registry: CollectorRegistry,
        label: str | None = None,
        values: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = (label,) if label else ()
        self._label = label
        self.counts: dict[str, int] = dict.fromkeys(values if label else ("",), 0)
        registry.register(self)

    def add(self, value: str = "", amount: int = 1) -> None:
        self.counts[value] += amount

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for value, count in self.counts.items():
            family.add_metric([value] if self._label else [], count)
        yield family

    def _family(self) -> CounterMetricFamily:
        labels = [self._label] if self._label else None
        return CounterMetricFamily(self.name, self.documentation, labels=labels)


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
            "Time from the start of the upstream exchange to the upstream's response headers, "
            "for requests that got a connection (not one refused by the breaker, an overload "
            "or a failed connect).",
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
            "JWKS fetches, by result: ok, empty (a JWKS with no usable signing key: every key "
            "withdrawn), error, timeout, invalid.",
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
        self.upstream_connections = Gauge(
            "catalyst_proxy_upstream_connections",
            "Connections to the SME gateway open right now (idle or busy).",
            registry=r,
        )
        self.upstream_waiting = Gauge(
            "catalyst_proxy_upstream_waiting",
            "Requests waiting for a free upstream connection right now.",
            registry=r,
        )
        self.breaker_state = Gauge(
            "catalyst_proxy_breaker_state",
            "1 for the upstream breaker's current state (closed, open, half-open), 0 for others.",
            ("state",),
            registry=r,
        )
        self.breaker_transitions = Counter(
            "catalyst_proxy_breaker_transitions",
            "Upstream breaker state changes, by the state entered.",
            ("to",),
            registry=r,
        )
        self.rate_limited = Counter(
            "catalyst_proxy_rate_limited",
            "Requests refused with 429 rate-limited, by route template.",
            ("route",),
            registry=r,
        )
        self.rate_limit_store_errors = Counter(
            "catalyst_proxy_rate_limit_store_errors",
            "Rate-limit checks the shared store could not answer, by what was done.",
            ("action",),
            registry=r,
        )
        self.idempotency = Tally(
            "catalyst_proxy_idempotency",
            "Idempotency outcomes: each keyed request's lookup (new, replayed, in-use, reused, "
            "unknown, store-error), and once more when a new one's outcome then turns unknown "
            "or its record meets a store error (so the sum may exceed the keyed requests).",
            r,
            "outcome",
            IDEMPOTENCY_OUTCOMES,
        )
        self.idempotency_evictions = Tally(
            "catalyst_proxy_idempotency_evictions",
            "Idempotency records the memory store dropped, oldest first, to stay in bounds "
            "(a retry under such a key is forwarded again).",
            r,
        )
        self.idempotency_answers_dropped = Tally(
            "catalyst_proxy_idempotency_answers_dropped",
            "Recorded answers the memory store dropped, oldest first, to keep its answers in "
            "bounds; their records stay (a retry gets 409 idempotency-replay-unavailable, "
            "never a second purchase).",
            r,
        )
        # Bound children by label values. Route and method are checked against the
        # route table before they get here, and statuses are three digits: bounded.
        self._bound: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._bound_upstream: dict[str, Any] = {}
        # Pre-create the fixed-vocabulary children so they read 0 instead of being absent.
        for kind in UPSTREAM_FAILURE_KINDS:
            self.upstream_failures.labels(kind)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for result in JWKS_RESULTS:
            self.jwks_refreshes.labels(result)
        for state in BREAKER_STATES:
            self.breaker_transitions.labels(state)
            self.breaker_state.labels(state).set(1 if state == "closed" else 0)
        for action in STORE_ERROR_ACTIONS:
            self.rate_limit_store_errors.labels(action)
        self.failures = {
            kind: self.upstream_failures.labels(kind) for kind in UPSTREAM_FAILURE_KINDS
        }

    def request_done(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request. Label children are bound once per combination
        (the profile showed ``labels()`` lookups at ~1 µs each on every request)."""
        if method not in KNOWN_METHODS:
            method = "other"  # a client may send any token as a method: keep labels bounded
        key = (route, method, status)
        children = self._bound.get(key)
        if children is None:
            children = self._bound[key] = (
                self.requests.labels(route, method, str(status)),
                self.request_duration.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def upstream_done(self, route: str, seconds: float) -> None:
        child = self._bound_upstream.get(route)
        if child is None:
            child = self._bound_upstream[route] = self.upstream_duration.labels(route)
        child.observe(seconds)

    def watch_pool(self, open_connections: Any, waiting: Any) -> None:
        """Read the pool's gauges at scrape time (no cost per request)."""
        self.upstream_connections.set_function(open_connections)
        self.upstream_waiting.set_function(waiting)

    def breaker_moved(self, state: str, _failures: int = 0) -> None:
        for name in BREAKER_STATES:
            self.breaker_state.labels(name).set(1 if name == state else 0)
        self.breaker_transitions.labels(state).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
