"""Prometheus metrics for the server (`GET /metrics`), through prometheus_client.

Each server gets its own registry, so several servers (or tests) in one process
do not share counts. Names follow Prometheus conventions (`_total` counters,
`_seconds` histograms) under a `weightsmith_` prefix.

Not here: when the numbers change (the scheduler calls the `Observer` methods;
the app counts requests by status).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from weightsmith.serve.scheduler import Observer

#: Latency buckets in seconds: from a fast GPU token (~5 ms) to a long CPU prefill.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics(Observer):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "weightsmith_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "weightsmith_prompt_tokens", "prompt tokens of admitted requests", registry=r
        )
        self.cached_tokens = Counter(
            "weightsmith_prompt_cached_tokens",
            "prompt tokens copied from a running or kept row's cache instead of prefilled",
            registry=r,
        )
        self.generation_tokens = Counter("weightsmith_generation_tokens", "tokens generated", registry=r)
        self.embedding_tokens = Counter(
            "weightsmith_embedding_tokens", "tokens embedded (/v1/embeddings)", registry=r
        )
        self.sequences_finished = Counter(
            "weightsmith_sequences_finished",
            "sequences (choices) that left the batch, by reason: stop, length, cancelled, error",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("weightsmith_queue_depth", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("weightsmith_running_sequences", "sequences in the running batch", registry=r)
        self.ttft = Histogram(
            "weightsmith_time_to_first_token_seconds",
            "from a request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "weightsmith_inter_token_latency_seconds",
            "between consecutive tokens of one sequence",
            buckets=ITL_BUCKETS,
            registry=r,
        )

    def request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()

    def queue(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, prompt: int = 0, generated: int = 0, cached: int = 0) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if cached:
            self.cached_tokens.inc(cached)
        if generated:
            self.generation_tokens.inc(generated)

    def embedded(self, tokens: int) -> None:
        self.embedding_tokens.inc(tokens)

    def finished(self, reason: str) -> None:
        self.sequences_finished.labels(reason).inc()

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
