"""Prometheus metrics, one registry per server. Prefix `agentprm_`, base units, explicit buckets.

Shared by the engine (queue, batches, tokens) and the HTTP layer (requests, latency); neither side
imports the other to reach them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the API layer)

# Geometric buckets for durations (1 ms .. ~33 s), powers of two for sizes.
DURATION_BUCKETS = tuple(0.001 * 2**i for i in range(16))
SIZE_BUCKETS = tuple(float(2**i) for i in range(11))
TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 19))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self.requests = Counter("agentprm_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.request_duration = Histogram("agentprm_request_duration_seconds", "HTTP request latency",
                                          ["route"], buckets=DURATION_BUCKETS, registry=r)
        self.errors = Counter("agentprm_errors", "Error responses by status code", ["code"], registry=r)
        self.queue_depth = Gauge("agentprm_queue_depth", "Score jobs waiting for a batch", registry=r)
        self.queue_tokens = Gauge("agentprm_queue_tokens", "Tokens of the jobs waiting for a batch", registry=r)
        self.batch_size = Histogram("agentprm_batch_size", "Jobs per batch", buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("agentprm_batch_tokens", "Padded tokens per batch", buckets=TOKEN_BUCKETS,
                                      registry=r)
        self.batch_duration = Histogram("agentprm_batch_duration_seconds", "Model time per batch",
                                        buckets=DURATION_BUCKETS, registry=r)
        self.prompt_tokens = Counter("agentprm_prompt_tokens", "Tokens of all scored sequences", registry=r)
        self.tokens_computed = Counter("agentprm_tokens_computed", "Tokens run through the model", registry=r)
        self.tokens_cached = Counter("agentprm_tokens_cached", "Tokens served from a shared or cached prefix",
                                     registry=r)
        self.steps_scored = Counter("agentprm_steps_scored", "Steps (readouts) scored", registry=r)
        self.cache_hits = Counter("agentprm_prefix_cache_hits", "Sequences that found a cached prefix", registry=r)
        self.cache_misses = Counter("agentprm_prefix_cache_misses", "Sequences that found no cached prefix",
                                    registry=r)
        self.cache_evictions = Counter("agentprm_prefix_cache_evictions", "Cache blocks evicted (LRU)", registry=r)
        self.cache_bytes = Gauge("agentprm_prefix_cache_bytes", "Bytes of KV held by the prefix cache", registry=r)
        self.cache_blocks = Gauge("agentprm_prefix_cache_blocks", "Blocks held by the prefix cache", registry=r)
        self.model_dtype = Gauge("agentprm_model_dtype", "1 for the dtype the backbone computes in (the value "
                                 "head is float32)", ["dtype"], registry=r)
        self.ready = Gauge("agentprm_ready", "1 when the model is loaded and the engine is serving", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
