"""Vision-encoder runner: LLaVA tower + projector features, and CLIP image/text embeddings.

Its own BentoML service (own processes, own GPU, own scaling) with adaptive batching, so images
from many concurrent requests are encoded together.
"""

from __future__ import annotations

import bentoml
import numpy as np

from lmm import stats
from lmm.config import RUNNER_CONNECTION, load_config
from lmm.protocol import RunnerStats

CONFIG = load_config()
_CAPS = CONFIG.vision.batching
# Per process (each worker), written to BentoML's shared metrics folder: /runner_stats and
# /metrics sum them over every worker. Sizes are images or texts, one bucket per size up to the cap.
BATCH_SIZE = stats.vision_batch_size(_CAPS.max_batch_size)

with bentoml.importing():
    from lmm.encoders import ClipEmbedder, LlavaVisionEncoder


@bentoml.service(
    name="lmm-vision",
    workers=CONFIG.vision.workers,
    resources=CONFIG.resources(CONFIG.vision),
    traffic=CONFIG.traffic(CONFIG.vision),
    runner_connection=RUNNER_CONNECTION,
    **CONFIG.tracing.service_config(),
)
class VisionEncoder:
    llava = bentoml.models.BentoModel(CONFIG.llm_model)
    clip = bentoml.models.BentoModel(CONFIG.clip_model)

    def __init__(self) -> None:
        if CONFIG.torch_threads:
            import torch

            torch.set_num_threads(CONFIG.torch_threads)
        self.encoder = LlavaVisionEncoder(self.llava.path, CONFIG.vision_device(), CONFIG.dtype)
        self.embedder = ClipEmbedder(self.clip.path, CONFIG.vision_device(), CONFIG.dtype)

    def _record(self, api: str, size: int) -> None:
        BATCH_SIZE.labels(api=api).observe(size)

    @bentoml.api(batchable=True, max_batch_size=_CAPS.max_batch_size,
                 max_latency_ms=_CAPS.max_latency_ms)
    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """Pixel values [N, 3, H, W] -> projected image features [N, tokens, hidden], in the
        model's dtype (bfloat16 as its bits in uint16: lmm.transfer)."""
        self._record("encode", len(pixel_values))
        return self.encoder(pixel_values)

    @bentoml.api(batchable=True, max_batch_size=_CAPS.max_batch_size,
                 max_latency_ms=_CAPS.max_latency_ms)
    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """CLIP pixel values [N, 3, H, W] -> normalized image embeddings [N, dim]."""
        self._record("embed_images", len(pixel_values))
        return self.embedder.embed_images(pixel_values)

    @bentoml.api(batchable=True, max_batch_size=_CAPS.max_batch_size,
                 max_latency_ms=_CAPS.max_latency_ms)
    def embed_texts(self, input_ids: list[list[int]]) -> list[list[float]]:
        """CLIP token ids, one list per text -> normalized text embeddings."""
        self._record("embed_texts", len(input_ids))
        return self.embedder.embed_texts(input_ids).tolist()

    @bentoml.api
    def stats(self) -> RunnerStats:
        """Batch sizes every worker of this runner has run, all APIs together (images or texts)."""
        return stats.runner_stats(stats.VISION)
