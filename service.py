"""bento-lmm API service (CPU): routes and orchestration only.

Pre-processing (images, chat template, tokenization) and post-processing (detokenization, stop
strings, usage) run here; the vision encoder and the LLM are separate runner services.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, AsyncGenerator

import bentoml
from annotated_types import Ge, Le

from lmm.config import load_config
from lmm.errors import BadRequest, error_response
from lmm.images import check_size, decode_base64, load_image
from lmm.openai_api import app as openai_app
from lmm.pipeline import Pipeline, sse, user_messages
from lmm.protocol import (
    Completion,
    EmbedInput,
    EmbedResponse,
    GenerateInput,
    GenerateResponse,
    ImageLimitsInfo,
    ModelCard,
    ModelInfo,
)
from lmm.upload_guard import UploadGuard
from runners.llm import LLM
from runners.vision import VisionEncoder

logger = logging.getLogger(__name__)
CONFIG = load_config()


class GenerateRequest(GenerateInput):
    """Generate text from a prompt and images."""

    max_tokens: Annotated[int, Ge(1), Le(CONFIG.max_tokens_limit)] = CONFIG.default_max_tokens
    n: Annotated[int, Ge(1), Le(CONFIG.max_n)] = 1


def _card(model, backend: str) -> ModelCard:
    return ModelCard(
        name=model.tag.name, tag=str(model.tag), backend=backend,
        architecture=str(model.info.metadata.get("architecture", "")),
        labels=dict(model.info.labels),
    )


@bentoml.service(
    name="lmm-api",
    workers=CONFIG.api.workers,
    resources=CONFIG.resources(CONFIG.api),
    traffic=CONFIG.traffic(CONFIG.api),
    labels={"project": "bento-lmm"},
)
@bentoml.asgi_app(openai_app, path="/v1")
class LMMService:
    vision = bentoml.depends(VisionEncoder)
    llm = bentoml.depends(LLM)
    llava = bentoml.models.BentoModel(CONFIG.llm_model)
    clip = bentoml.models.BentoModel(CONFIG.clip_model)

    def __init__(self) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(self.llava.path)
        self.clip_processor = AutoProcessor.from_pretrained(self.clip.path)
        self.pipeline = Pipeline(
            CONFIG, self.processor, self.clip_processor, self.vision.to_async, self.llm.to_async
        )
        self.image_tokens = self.pipeline.image_tokens()

    # -- request decoding ----------------------------------------------------------------
    def _images(self, uploads: list[Path], encoded: list[str], embed: bool = False):
        self.pipeline.check_image_count(len(uploads) + len(encoded), embed)
        limits = CONFIG.images
        images = []
        for path in uploads:
            check_size(path.stat().st_size, limits, "images")
            images.append(load_image(path.read_bytes(), limits, "images"))
        images += [load_image(decode_base64(v, limits), limits, "images_b64") for v in encoded]
        return images

    async def _prepare(self, request: GenerateRequest):
        images = await asyncio.to_thread(self._images, request.images, request.images_b64)
        messages = user_messages(request.prompt, len(images), request.system_prompt)
        return await asyncio.to_thread(self.pipeline.build_prompt, messages, images)

    # -- APIs ----------------------------------------------------------------------------
    @bentoml.api(route="/generate", input_spec=GenerateRequest)
    async def generate(self, **params) -> GenerateResponse:
        """Generate text from a prompt and 0..N images (upload files or send base64)."""
        request = GenerateRequest(**params)
        prompt = await self._prepare(request)
        texts, reasons, usage = await self.pipeline.complete(
            prompt, request.sampling(), request.stop, request.n
        )
        return GenerateResponse(
            model=CONFIG.served_model_name, text=texts[0], finish_reason=reasons[0], usage=usage,
            completions=[Completion(index=i, text=t, finish_reason=r)
                         for i, (t, r) in enumerate(zip(texts, reasons))],
        )

    @bentoml.api(route="/generate_stream", input_spec=GenerateRequest)
    async def generate_stream(self, **params) -> AsyncGenerator[str, None]:
        """Like /generate, as server-sent events: one `data:` event per text delta."""
        request = GenerateRequest(**params)
        prompt = await self._prepare(request)  # bad input fails here, before the 200
        stream = self.pipeline.stream(prompt, request.sampling(), request.stop, request.n)
        completion = [0] * request.n
        try:
            async for delta in stream:
                completion[delta.index] = delta.completion_tokens
                event = {"index": delta.index, "text": delta.text}
                if delta.finish_reason:
                    event["finish_reason"] = delta.finish_reason
                yield sse(event)
            prompt_tokens = len(prompt.token_ids)
            yield sse({"usage": {"prompt_tokens": prompt_tokens,
                                 "completion_tokens": sum(completion),
                                 "total_tokens": prompt_tokens + sum(completion)}})
        except Exception as exc:  # once streaming, an error can only be an event
            logger.exception("stream failed")
            yield sse(error_response(exc)[1])
        yield sse("[DONE]")

    @bentoml.api(route="/embed", input_spec=EmbedInput)
    async def embed(self, **params) -> EmbedResponse:
        """Embed texts and/or images into one CLIP space (L2-normalized vectors)."""
        request = EmbedInput(**params)
        if not request.texts and not request.images and not request.images_b64:
            raise BadRequest("send at least one of texts, images or images_b64.", "texts")
        images = await asyncio.to_thread(
            self._images, request.images, request.images_b64, True
        )
        texts, vectors = await self.pipeline.embed(request.texts, images)
        dim = len((texts or vectors)[0])
        return EmbedResponse(model=self.clip.tag.name, dim=dim, text_embeddings=texts,
                             image_embeddings=vectors)

    @bentoml.api(route="/model_info")
    def model_info(self) -> ModelInfo:
        """Served models (store tags and labels), backends and request limits."""
        limits = CONFIG.images
        return ModelInfo(
            served_model_name=CONFIG.served_model_name,
            llm=_card(self.llava, CONFIG.llm.backend),
            vision=_card(self.llava, "transformers"),
            embedding=_card(self.clip, "transformers"),
            image_tokens=self.image_tokens,
            max_tokens_limit=CONFIG.max_tokens_limit,
            max_model_len=CONFIG.llm.max_model_len,
            images=ImageLimitsInfo(max_images=limits.max_images, max_bytes=limits.max_bytes,
                                   max_pixels=limits.max_pixels),
        )

    @bentoml.api(route="/runner_stats")
    async def runner_stats(self) -> dict:
        """Batch-size counters of the runner workers that answered (one per call)."""
        vision, llm = await asyncio.gather(self.vision.to_async.stats(), self.llm.to_async.stats())
        return {"vision": vision, "llm": llm}


# Bound the buffered body by what the largest valid request can carry (base64 inflates by 4/3).
LMMService.add_asgi_middleware(
    UploadGuard, fields=("images",),
    max_body=2 * CONFIG.images.max_bytes * max(CONFIG.images.max_images,
                                                CONFIG.images.max_embed_images) + (1 << 20),
)
