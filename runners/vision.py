"""Vision-encoder runner: the LLM's vision part (tower + projector features), and CLIP image/text
embeddings.

Its own BentoML service (own processes, own GPU, own scaling); images from many concurrent
requests are encoded together:

- LLaVA-1.5 (every image the same shape): ``encode``, BentoML's adaptive batching over one
  ``[N, 3, H, W]`` array.
- Families whose images differ in shape (Qwen2.5-VL, LLaVA-NeXT, Gemma 3 with pan-and-scan):
  ``encode_images``, one ``ImageInput`` per image. BentoML's batching needs one same-shape
  array, so a small asyncio micro-batcher (``MicroBatcher``) takes every call waiting while the
  previous batch ran (up to ``max_batch_size`` images) and hands them to the family's
  ``VisionPart.encode`` at once, which runs same-group (or, for packed towers, all) inputs in
  one forward pass. No timer: a call that finds the part idle runs at once.
- Text-only LLMs: no vision part is loaded; CLIP still serves ``/embed``.
"""

from __future__ import annotations

from typing import Any

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
    from lmm.errors import BadRequest
    from lmm.microbatch import MicroBatcher


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
        import torch

        torch.set_num_threads(CONFIG.cpu_threads())
        from lmm.device import resolve_device_dtype
        from lmm.families import family_for

        self.family = family_for(self.llava.path)
        self.encoder = self.part = self.batcher = None
        if self.family.name == "llava":  # same-shape images: adaptive batching (encode)
            self.encoder = LlavaVisionEncoder(self.llava.path, CONFIG.vision_device(),
                                              CONFIG.dtype)
        elif self.family.takes_images:
            device, dtype = resolve_device_dtype(CONFIG.vision_device(), CONFIG.dtype)
            self.part = self.family.vision(self.llava.path, str(device), dtype)
            self.batcher = MicroBatcher(self.part.encode, _CAPS.max_batch_size,
                                        lambda n: self._record("encode", n))
        self.embedder = ClipEmbedder(self.clip.path, CONFIG.vision_device(), CONFIG.dtype)

    def _record(self, api: str, size: int) -> None:
        BATCH_SIZE.labels(api=api).observe(size)

    @bentoml.api(batchable=True, max_batch_size=_CAPS.max_batch_size,
                 max_latency_ms=_CAPS.max_latency_ms)
    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """Pixel values [N, 3, H, W] -> projected image features [N, tokens, hidden], in the
        model's dtype (bfloat16 as its bits in uint16: lmm.transfer)."""
        if self.encoder is None:
            raise BadRequest(f"the {self.family.name} family does not take stacked pixel "
                             "values; send images per image (encode_images)")
        self._record("encode", len(pixel_values))
        return self.encoder(pixel_values)

    @bentoml.api
    async def encode_images(self, images: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One image's processor outputs per item (``lmm.families.ImageInput.arrays``) -> one
        ``{"embeds": [tokens, hidden], **meta}`` per image, in order, in the model's dtype
        (bfloat16 as its bits in uint16: lmm.transfer); micro-batched across calls. The values
        are numpy arrays (typed Any: BentoML's pickled calls carry them as they are, its schema
        of nested arrays does not)."""
        from lmm.families import ImageFeatures, ImageInput, features_to_wire

        if self.batcher is None:
            if self.encoder is None:
                raise BadRequest(f"the {self.family.name} model takes no images")
            out = self.encoder(np.stack([im["pixel_values"] for im in images]))
            return features_to_wire([ImageFeatures(f) for f in out])
        inputs = [ImageInput({k: np.asarray(v) for k, v in im.items()}) for im in images]
        features = await self.batcher.encode(inputs)
        return features_to_wire(features)

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
