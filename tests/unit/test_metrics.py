"""Serving metrics (lmm.metrics) in a registry of their own: what one request observes, how it
ends (ok, client or server error, cancelled), the pipeline's observations with runners of the
real interface, and what the transformers engine reports (queue time, running, waiting, KV)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from lmm.config import LMMConfig
from lmm.errors import BadRequest, EngineFault
from lmm.metrics import ApiMetrics, EngineMetrics, token_buckets
from lmm.pipeline import Pipeline, user_messages
from lmm.protocol import SamplingParams
from tests.unit.test_pipeline import FakeLLM, FakeVision

pytestmark = pytest.mark.unit


@pytest.fixture
def registry():
    return CollectorRegistry()


def value(registry, name: str, **labels) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_token_buckets_are_vllms_1_2_5_steps():
    assert token_buckets(512) == [1, 2, 5, 10, 20, 50, 100, 200, 500]


def test_outcomes(registry):
    metrics = ApiMetrics(registry=registry)

    async def fails(exc):
        raise exc

    async def answers():
        return {"text": "a"}

    async def streams(n, exc=None):
        for i in range(n):
            yield i
        if exc is not None:
            raise exc

    async def scenario():
        await metrics.request("embed").run(answers())
        for exc in (BadRequest("no"), EngineFault("boom"), asyncio.CancelledError()):
            with pytest.raises(type(exc)):
                await metrics.request("generate").run(fails(exc))
        # a route that answers with a stream ends when the stream does: its last item, its
        # failure, or its closing before the end
        observer = metrics.request("chat")
        stream = await observer.run(_returns(observer.stream(streams(3))))
        assert value(registry, "lmm_e2e_request_latency_seconds_count", route="chat",
                     outcome="ok") == 0
        assert [i async for i in stream] == [0, 1, 2]
        failing = metrics.request("chat").stream(streams(1, EngineFault("late")))
        with pytest.raises(EngineFault):
            [i async for i in failing]
        closed = metrics.request("chat").stream(streams(5))
        await anext(closed)
        await closed.aclose()

    asyncio.run(scenario())
    count = "lmm_e2e_request_latency_seconds_count"
    assert value(registry, count, route="embed", outcome="ok") == 1
    for outcome in ("client_error", "server_error", "cancelled"):
        assert value(registry, count, route="generate", outcome=outcome) == 1
    for outcome in ("ok", "server_error", "cancelled"):
        assert value(registry, count, route="chat", outcome=outcome) == 1
    with pytest.raises(ValueError):
        metrics.request("nope")


async def _returns(result):
    return result


@pytest.fixture(scope="module")
def processor(llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_dir)


def test_a_generation_request_observes_every_stage_once(processor, registry):
    metrics = ApiMetrics(max_model_len=512, registry=registry)
    ids = processor.tokenizer.encode("a red circle on the left", add_special_tokens=False)
    llm, vision = FakeLLM(ids), FakeVision(64)
    pipe = Pipeline(LMMConfig(), processor, None, vision, llm, metrics)
    images = [Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (32, 32))]

    async def request(n: int):
        observer = metrics.request("generate")
        with observer.preprocessing():
            prompt = pipe.build_prompt(user_messages("Describe.", 2), images)
        observer.images(2)

        async def body():
            used = None
            async for item in observer.stream(pipe.stream(prompt, SamplingParams(), (), n,
                                                          observer)):
                used = item if not hasattr(item, "index") else used
            return used

        return await observer.run(body())

    used = [asyncio.run(request(1)), asyncio.run(request(2))]
    route = {"route": "generate"}
    for name in ("lmm_e2e_request_latency_seconds", "lmm_request_preprocess_seconds",
                 "lmm_request_encode_seconds", "lmm_request_images",
                 "lmm_request_prompt_tokens", "lmm_request_completion_tokens"):
        labels = {**route, "outcome": "ok"} if "e2e" in name else route
        assert value(registry, name + "_count", **labels) == 2, name
    # per sequence: 1 + 2 completions
    assert value(registry, "lmm_time_to_first_token_seconds_count", **route) == 3
    assert value(registry, "lmm_time_per_output_token_seconds_count", **route) == 3
    assert value(registry, "lmm_request_images_sum", **route) == 4
    assert value(registry, "lmm_prompt_tokens_total", **route) == sum(u.prompt_tokens for u in used)
    assert value(registry, "lmm_generation_tokens_total", **route) == sum(
        u.completion_tokens for u in used) == 3 * len(ids)
    # the two images differ, the second request repeats them: 2 misses, then 2 hits
    assert value(registry, "lmm_image_cache_misses_total") == 2
    assert value(registry, "lmm_image_cache_hits_total") == 2
    assert vision.calls == [(2, 3, 32, 32)]


# -- the transformers engine ---------------------------------------------------------------
class Recording(EngineMetrics):
    """The real metrics, plus the sequence of states the engine reported."""

    def __init__(self, registry):
        super().__init__(registry)
        self.seen: list[tuple] = []

    def state(self, running, waiting, kv_cache_usage=None):
        self.seen.append((running, waiting, kv_cache_usage))
        super().state(running, waiting, kv_cache_usage)


def test_the_engine_reports_queue_time_and_its_sequences(llava_dir, registry):
    from runners.engines.transformers_engine import TransformersEngine

    metrics = Recording(registry)
    engine = TransformersEngine(str(llava_dir), "cpu", "float32", max_num_seqs=2,
                                max_model_len=64, metrics=metrics)

    async def scenario():
        await engine.start()
        try:
            params = SamplingParams(max_tokens=6, ignore_eos=True)

            async def one(i):
                return [o async for o in engine.generate(f"r{i}", [1, 5, 6, 7], None, params)]

            return await asyncio.gather(*(one(i) for i in range(5)))
        finally:
            await engine.shutdown()

    outputs = asyncio.run(scenario())
    assert all(out[-1].completion_tokens == 6 for out in outputs)
    assert value(registry, "lmm_request_queue_time_seconds_count") == 5
    seen = metrics.seen
    assert max(running for running, _, _ in seen) == 2  # never more than max_num_seqs
    assert max(waiting for _, waiting, _ in seen) >= 1  # 5 sequences for 2 slots
    kv = [usage for running, _, usage in seen if running]
    # rows x positions held (at least the 4 prompt tokens per row) over 2 x 64
    assert kv and all(4 / 128 <= usage <= 1 for usage in kv)
    assert seen[-1] == (0, 0, 0.0)
    assert value(registry, "lmm_num_requests_running") == 0
    assert value(registry, "lmm_num_requests_waiting") == 0
    assert np.isclose(value(registry, "lmm_kv_cache_usage_perc"), 0.0)
