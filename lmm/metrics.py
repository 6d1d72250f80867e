"""The serving metrics operators watch, on ``/metrics``, named after vLLM's own
(``vllm:time_to_first_token_seconds`` -> ``lmm_time_to_first_token_seconds``).

Two sides observe them. The API service sees each request whole, from the moment its handler
starts to its last byte (``ApiMetrics``, through one ``RequestObserver`` per request): latency,
time to first token and per output token, preprocessing and vision-runner time, images, token
counts, image-cache hits. The LLM runner's engine sees what only it can (``EngineMetrics``): how
long a sequence waited for a batch slot, the running and waiting sequences and the KV cache in
use. Every process of a server writes into BentoML's shared ``PROMETHEUS_MULTIPROC_DIR`` (see
``lmm.stats``), so ``/metrics`` of any service shows all of them.

Labels stay few: ``route`` (one value per API route, see ``ROUTES``) and, on the end-to-end
latency only, ``outcome``. A request counts there once it reached its handler, whatever became
of it: ``ok``; ``client_error`` or ``server_error`` by the status it got (for a stream that
failed after it started, the status its error event carries); ``cancelled`` when the client went
away first. The other request histograms count what happened: a request refused while decoding
its images has a preprocessing time and no time to first token.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import AsyncIterator, Iterator

# route label of each API route
ROUTES = ("generate", "generate_stream", "chat", "completions", "embed", "embeddings", "rank")
OUTCOMES = ("ok", "client_error", "server_error", "cancelled")

# vLLM's buckets (vllm.v1.metrics.buckets), with finer ones at the bottom where a small model
# on a fast device lands.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0,
                   20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0, 30.0, 60.0, 300.0)
IMAGE_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16, 32, 64, 128)


def token_buckets(max_model_len: int) -> list[float]:
    """1-2-5 steps up to ``max_model_len``, as vLLM's request-token histograms."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_model_len:
                return buckets
            buckets.append(float(value))
        exponent += 1


def _registry(registry):
    if registry is not None:
        return registry
    from prometheus_client import REGISTRY

    return REGISTRY


class ApiMetrics:
    """The API service's request metrics (one per process)."""

    def __init__(self, max_model_len: int = 2048, registry=None):
        from prometheus_client import Counter, Histogram

        r = _registry(registry)
        route = ["route"]

        def histogram(name, doc, buckets, labels=route):
            return Histogram(name, doc, labelnames=labels, buckets=buckets, registry=r)

        self.ttft = histogram(
            "lmm_time_to_first_token_seconds",
            "From the request reaching its handler to the first generated token of a sequence",
            TTFT_BUCKETS)
        self.tpot = histogram(
            "lmm_time_per_output_token_seconds",
            "Per sequence: time from its first to its last token / (completion tokens - 1)",
            TPOT_BUCKETS)
        self.e2e = histogram(
            "lmm_e2e_request_latency_seconds",
            "From the request reaching its handler to its last byte, by outcome",
            LATENCY_BUCKETS, ["route", "outcome"])
        self.preprocess = histogram(
            "lmm_request_preprocess_seconds",
            "Image decoding, chat template and processor (or CLIP tokenizer and processor)",
            STAGE_BUCKETS)
        self.encode = histogram(
            "lmm_request_encode_seconds",
            "Vision-runner calls of one request, as the API service waits for them",
            STAGE_BUCKETS)
        self.images = histogram("lmm_request_images", "Images per request", IMAGE_BUCKETS)
        tokens = token_buckets(max_model_len)
        self.prompt_tokens = histogram("lmm_request_prompt_tokens",
                                       "Prompt tokens per request", tokens)
        self.completion_tokens = histogram("lmm_request_completion_tokens",
                                           "Generated tokens per request (all its sequences)",
                                           tokens)
        self.prompt_total = Counter("lmm_prompt_tokens", "Prompt tokens processed",
                                    labelnames=route, registry=r)
        self.generation_total = Counter("lmm_generation_tokens", "Generated tokens",
                                        labelnames=route, registry=r)
        self.cache_hits = Counter("lmm_image_cache_hits",
                                  "Images whose features came from the API's feature cache",
                                  registry=r)
        self.cache_misses = Counter("lmm_image_cache_misses",
                                    "Images the feature cache sent to the vision runner",
                                    registry=r)

    def request(self, route: str) -> RequestObserver:
        if route not in ROUTES:
            raise ValueError(f"unknown route label {route!r}")
        return RequestObserver(self, route)


def outcome_of(exc: BaseException | None) -> str:
    """The ``outcome`` label of a request that ended with ``exc`` (None: it succeeded)."""
    import asyncio

    if exc is None:
        return "ok"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    from lmm.errors import error_response

    return "client_error" if error_response(exc)[0] < 500 else "server_error"


class RequestObserver:
    """One request's observations; ``NO_REQUEST`` observes nothing (calls outside a route)."""

    def __init__(self, metrics: ApiMetrics | None, route: str = ""):
        self.metrics = metrics
        self.route = route
        self.started = time.perf_counter()
        self._first_token: dict[int, float] = {}
        self._preprocess: float | None = None
        self._encode: float | None = None
        self._ended = False

    def _labels(self, metric):
        return metric.labels(route=self.route)

    # -- stages ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def preprocessing(self) -> Iterator[None]:
        """Time the block as preprocessing; a request's blocks add up, observed once when it
        ends (also when the block raised: a refused image was still decoded)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._preprocess = (self._preprocess or 0.0) + time.perf_counter() - started

    @contextlib.contextmanager
    def encoding(self) -> Iterator[None]:
        """Time the block as waiting for the vision runner (or the feature cache), added up
        and observed like ``preprocessing``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._encode = (self._encode or 0.0) + time.perf_counter() - started

    def images(self, n: int) -> None:
        """The request's images, once decoded."""
        if self.metrics is not None:
            self._labels(self.metrics.images).observe(n)

    # -- generation ------------------------------------------------------------------------
    def tokens(self, index: int) -> None:
        """Sequence ``index`` produced tokens now (the first call is its first token)."""
        if self.metrics is not None and index not in self._first_token:
            now = time.perf_counter()
            self._first_token[index] = now
            self._labels(self.metrics.ttft).observe(now - self.started)

    def sequence_finished(self, index: int, completion_tokens: int) -> None:
        """Sequence ``index`` ended normally with ``completion_tokens`` generated."""
        first = self._first_token.get(index)
        if self.metrics is not None and first is not None and completion_tokens > 1:
            per_token = (time.perf_counter() - first) / (completion_tokens - 1)
            self._labels(self.metrics.tpot).observe(per_token)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """The whole request's token counts, once it has generated everything."""
        if self.metrics is None:
            return
        m = self.metrics
        self._labels(m.prompt_tokens).observe(prompt_tokens)
        self._labels(m.completion_tokens).observe(completion_tokens)
        self._labels(m.prompt_total).inc(prompt_tokens)
        self._labels(m.generation_total).inc(completion_tokens)

    # -- the end ---------------------------------------------------------------------------
    def ended(self, exc: BaseException | None = None) -> None:
        """The request is over (``exc``: how it failed); only the first call counts."""
        if self._ended:
            return
        self._ended = True
        if self.metrics is None:
            return
        m = self.metrics
        m.e2e.labels(route=self.route, outcome=outcome_of(exc)).observe(
            time.perf_counter() - self.started)
        if self._preprocess is not None:
            self._labels(m.preprocess).observe(self._preprocess)
        if self._encode is not None:
            self._labels(m.encode).observe(self._encode)

    async def run(self, awaitable):
        """Await the route's work. An answer that streams (an async iterator, or a response
        with a ``body_iterator``) hands the end over to its stream, which the route wraps with
        ``stream``; any other answer ends the request here."""
        try:
            result = await awaitable
        except BaseException as exc:
            self.ended(exc)
            raise
        if not (hasattr(result, "__aiter__") or hasattr(result, "body_iterator")):
            self.ended()
        return result

    async def stream(self, items: AsyncIterator) -> AsyncIterator:
        """``items`` as they come; the request ends with the last one, the stream's failure or
        its closing before the end (the client went away: ``cancelled``)."""
        exc: BaseException | None = GeneratorExit()
        try:
            async for item in items:
                yield item
            exc = None
        except BaseException as failed:
            exc = failed
            raise
        finally:
            try:
                aclose = getattr(items, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self.ended(exc)


NO_REQUEST = RequestObserver(None)


@functools.cache
def api_metrics(max_model_len: int) -> ApiMetrics:
    """The process's ``ApiMetrics`` (a metric name registers once per process)."""
    return ApiMetrics(max_model_len)


class EngineMetrics:
    """What the LLM engine observes, per runner worker: queue time per sequence, and the
    running and waiting sequences and KV-cache use as gauges (summed over live workers; the
    KV cache: the fullest worker)."""

    def __init__(self, registry=None):
        from prometheus_client import Gauge, Histogram

        r = _registry(registry)
        self.queue_time = Histogram(
            "lmm_request_queue_time_seconds",
            "Time a sequence waited in the LLM engine before it was first scheduled",
            buckets=(0.0, *STAGE_BUCKETS), registry=r)
        self.running = Gauge("lmm_num_requests_running", "Sequences in the LLM engine's batch",
                             multiprocess_mode="livesum", registry=r)
        self.waiting = Gauge("lmm_num_requests_waiting",
                             "Sequences in the LLM engine waiting for a batch slot",
                             multiprocess_mode="livesum", registry=r)
        self.kv_cache = Gauge("lmm_kv_cache_usage_perc",
                              "KV-cache use, 0 to 1 (vLLM: its own figure; transformers: cached "
                              "positions over max_num_seqs * max_model_len)",
                              multiprocess_mode="livemax", registry=r)
        self._state: tuple | None = None

    def queued(self, seconds: float) -> None:
        self.queue_time.observe(max(0.0, seconds))

    def state(self, running: int, waiting: int, kv_cache_usage: float | None = None) -> None:
        """The engine's sequences now (written only when they change: every engine step
        calls this). ``kv_cache_usage`` None leaves that gauge as it is."""
        state = (running, waiting, kv_cache_usage)
        if state == self._state:
            return
        self._state = state
        self.running.set(running)
        self.waiting.set(waiting)
        if kv_cache_usage is not None:
            self.kv_cache.set(kv_cache_usage)
