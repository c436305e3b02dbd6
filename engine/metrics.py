"""The engine's metrics in Prometheus text format (prometheus-client), one registry per engine."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Request stages take tens of microseconds; buckets from 10 us to 100 ms.
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 1e-1)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram("recscore_stage_seconds", "Latency of one stage of a request",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("recscore_requests", "Requests served", ["kind"], registry=self.registry)
        self.batch_size = Histogram("recscore_batch_size", "Requests coalesced into one batched lookup",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.cache = Counter("recscore_user_cache", "User vector cache lookups by outcome", ["outcome"],
                             registry=self.registry)
        self.cache_hit_ratio = Gauge("recscore_user_cache_hit_ratio", "Share of user lookups served from the cache",
                                     registry=self.registry)
        self.cache_hit_ratio.set_function(self._hit_ratio)
        self._outcome = {True: self.cache.labels("hit"), False: self.cache.labels("miss")}
        self.hits = self.misses = 0
        self.stage = {name: self.stage_seconds.labels(name) for name in ("history", "score", "text", "select", "rerank", "total")}

    def cache_lookup(self, hit):
        self._outcome[hit].inc()
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def _hit_ratio(self):
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def text(self):
        return generate_latest(self.registry).decode()
