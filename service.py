"""bento-lmm API service (CPU): routes and orchestration only.

Pre-processing (images, chat template, tokenization) and post-processing (detokenization, stop
strings, usage) run here; the vision encoder and the LLM are separate runner services.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Annotated, AsyncGenerator

import bentoml
from annotated_types import Ge, Le
from starlette.responses import StreamingResponse

from lmm import backpressure, faults, metrics, patches, request_id
from lmm.adapters import ImageDecoder, ServedModel, image_refs, primed, sse_stream
from lmm.auth import ApiKeyAuth, KeyStore
from lmm.config import load_config
from lmm.deadlines import CancelOnDisconnect, Deadline
from lmm.docs_page import DocsPage
from lmm.errors import BadRequest, ErrorShape, json_error
from lmm.lora import declare_adapter_models, stored_adapters
from lmm.metrics import RequestObserver
from lmm.openai_api import app as openai_app
from lmm.pipeline import Pipeline, collect, user_messages
from lmm.protocol import (
    Completion,
    EmbedInput,
    EmbedResponse,
    GenerateInput,
    GenerateResponse,
    ImageLimitsInfo,
    ModelInfo,
    RankedCandidate,
    RankInput,
    RankResponse,
    Usage,
)
from lmm.serving import OpenAIServing
from lmm.upload_guard import UploadGuard
from runners.llm import LLM
from runners.vision import VisionEncoder


def _check_models() -> None:
    """The configured models are of architectures this build serves (lmm.architectures), or
    ``bentoml serve`` / ``build`` stop here with a message naming the supported ones."""
    from bentoml.exceptions import InvalidArgument

    from lmm.architectures import UnsupportedModel, check_models

    llava, clip = LLM.inner.llava.stored, VisionEncoder.inner.clip.stored
    if llava is None or clip is None:  # not in this store: BentoML says so where it needs them
        return
    try:
        check_models(llava.path, CONFIG.llm_model, clip.path, CONFIG.clip_model)
    except UnsupportedModel as exc:
        raise InvalidArgument(str(exc)) from None


logger = logging.getLogger(__name__)
CONFIG = load_config()
_check_models()
request_id.install_log_records()  # every worker (API and runners) imports this module
patches.install()  # BentoML's traffic timeout left each request's context alive for 300 s


class GenerateRequest(GenerateInput):
    """Generate text from a prompt and images."""

    max_tokens: Annotated[int, Ge(1), Le(CONFIG.max_tokens_limit)] = CONFIG.default_max_tokens
    n: Annotated[int, Ge(1), Le(CONFIG.max_n)] = 1


def shaped_errors(handler):
    """A native route's failures as the one error body (``lmm.errors``), status kept."""

    @functools.wraps(handler)
    async def wrapper(self, **params):
        try:
            return await handler(self, **params)
        except Exception as exc:
            return json_error(exc)

    return wrapper


@bentoml.service(
    name="lmm-api",
    workers=CONFIG.api.workers,
    resources=CONFIG.resources(CONFIG.api),
    traffic={"timeout": CONFIG.api.timeout},  # max_concurrency: lmm.backpressure, below
    labels={"project": "bento-lmm"},
    **CONFIG.tracing.service_config(),
)
@bentoml.asgi_app(openai_app, path="/v1")
@declare_adapter_models(CONFIG)  # the served LoRA adapters (their store entries: /v1/models)
class LMMService:
    vision = bentoml.depends(VisionEncoder)
    llm = bentoml.depends(LLM)
    llava = bentoml.models.BentoModel(CONFIG.llm_model)
    clip = bentoml.models.BentoModel(CONFIG.clip_model)

    def __init__(self) -> None:
        from transformers import AutoProcessor, AutoTokenizer

        from lmm.families import family_for

        self.metrics = metrics.api_metrics(CONFIG.llm.max_model_len)
        self.family = family_for(self.llava.path)
        # The family's processor builds prompts; a text-only model's tokenizer (its template).
        processor = (AutoProcessor if self.family.takes_images
                     else AutoTokenizer).from_pretrained(self.llava.path)
        self.pipeline = Pipeline(
            CONFIG, processor, AutoProcessor.from_pretrained(self.clip.path),
            self.vision.to_async, self.llm.to_async, self.metrics, family=self.family,
        )
        self.images = ImageDecoder(CONFIG.images)
        self.chat_model = ServedModel.from_store(self.llava, CONFIG.served_model_name, "chat",
                                                 CONFIG.llm.backend)
        self.embedding_model = ServedModel.from_store(self.clip, self.clip.tag.name,
                                                      "embedding", "transformers")
        self.adapters = [
            ServedModel.from_store(model, name, "chat", CONFIG.llm.backend,
                                   parent=CONFIG.served_model_name)
            for name, model in stored_adapters(self).items()]
        self.image_tokens = self.pipeline.image_tokens()
        self.serving = OpenAIServing(self.pipeline, self.chat_model, self.embedding_model,
                                     self.images, self.metrics, adapters=self.adapters)
        openai_app.state.serving = self.serving

    def _observe(self, route: str) -> RequestObserver:
        """One request's metrics (lmm.metrics), from the moment its handler starts."""
        return self.metrics.request(route)

    async def _prepare(self, request: GenerateRequest, model: ServedModel, deadline: Deadline,
                       observer: RequestObserver):
        refs = image_refs(request.images, request.images_b64)
        with observer.preprocessing():
            images = await self.images.decode(refs, CONFIG.images.max_images)
            messages = user_messages(request.prompt, len(images), request.system_prompt)
            prompt = await asyncio.to_thread(self.pipeline.build_prompt, messages, images)
        observer.images(len(images))
        params = request.sampling().model_copy(update={"adapter": model.adapter})
        return observer.stream(deadline.bound(self.pipeline.stream(
            prompt, params, request.stop, request.n, observer=observer)))

    def _model(self, request: GenerateRequest) -> ServedModel:
        """The chat model (the LLM or one of its adapters) ``model`` names; 404 if none."""
        return self.chat_model if request.model is None else self.serving.model(request.model)

    @bentoml.on_startup
    async def _drain_on_sigterm(self) -> None:
        backpressure.drain_on_sigterm(CONFIG.api.shutdown_grace_s)

    async def __is_ready__(self) -> bool:
        """/readyz: 503 while a runner is down or restarting (each checked within 2 s)."""
        ready = await asyncio.gather(*(faults.ready(runner, 2.0)
                                       for runner in (self.vision, self.llm)))
        return all(ready)

    async def _embed(self, request: EmbedInput, refs, observer: RequestObserver):
        with observer.preprocessing():
            images = await self.images.decode(refs, CONFIG.images.max_embed_images)
        observer.images(len(images))
        return await self.pipeline.embed(request.texts, images, observer=observer)

    async def _rank(self, query: str | None, texts: list[str], refs, observer: RequestObserver):
        with observer.preprocessing():
            images = await self.images.decode(refs, CONFIG.images.max_embed_images)
        observer.images(len(images))
        return await self.pipeline.rank(query if query is not None else images.pop(0), texts,
                                        images, observer=observer)

    async def _complete(self, request: GenerateRequest, model: ServedModel, deadline: Deadline,
                        observer: RequestObserver):
        return await collect(await self._prepare(request, model, deadline, observer), request.n)

    async def _started(self, request: GenerateRequest, model: ServedModel, deadline: Deadline,
                       observer: RequestObserver):
        return await primed(await self._prepare(request, model, deadline, observer))

    # -- APIs ----------------------------------------------------------------------------
    @bentoml.api(route="/generate", input_spec=GenerateRequest)
    @shaped_errors
    async def generate(self, **params) -> GenerateResponse:
        """Generate text from a prompt and 0..N images (upload files or send base64)."""
        observer = self._observe("generate")
        return await observer.run(self._generate(params, observer))

    async def _generate(self, params: dict, observer: RequestObserver) -> GenerateResponse:
        request = GenerateRequest(**params)
        model = self._model(request)  # before any work: an unknown model is a 404
        deadline = Deadline.start(request.timeout, CONFIG.api.timeout)
        texts, reasons, usage = await deadline.run(
            self._complete(request, model, deadline, observer))
        return GenerateResponse(
            model=model.id, text=texts[0], finish_reason=reasons[0], usage=usage,
            completions=[Completion(index=i, text=t, finish_reason=r)
                         for i, (t, r) in enumerate(zip(texts, reasons))],
        )

    @bentoml.api(route="/generate_stream", input_spec=GenerateRequest)
    @shaped_errors
    async def generate_stream(self, **params) -> AsyncGenerator[str, None]:
        """Like /generate, as server-sent events: `{"index", "text"}` per text delta
        (`finish_reason` on each completion's last), then `{"usage"}` and `[DONE]`."""
        observer = self._observe("generate_stream")
        return await observer.run(self._generate_stream(params, observer))

    async def _generate_stream(self, params: dict, observer: RequestObserver):
        request = GenerateRequest(**params)
        model = self._model(request)  # before any work: an unknown model is a 404
        deadline = Deadline.start(request.timeout, CONFIG.api.timeout)
        # What fails before the first token is an HTTP status; then an event.
        run = await deadline.run(self._started(request, model, deadline, observer))
        return StreamingResponse(sse_stream(_native_events(run)), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @bentoml.api(route="/embed", input_spec=EmbedInput)
    @shaped_errors
    async def embed(self, **params) -> EmbedResponse:
        """Embed texts and/or images into one CLIP space (L2-normalized vectors)."""
        observer = self._observe("embed")
        return await observer.run(self._embed_route(params, observer))

    async def _embed_route(self, params: dict, observer: RequestObserver) -> EmbedResponse:
        request = EmbedInput(**params)
        if not request.texts and not request.images and not request.images_b64:
            raise BadRequest("send at least one of texts, images or images_b64.", "texts")
        refs = image_refs(request.images, request.images_b64)
        result = await Deadline.start(None, CONFIG.api.timeout).run(
            self._embed(request, refs, observer))
        dim = len((result.texts or result.images)[0])
        return EmbedResponse(model=self.embedding_model.name, dim=dim,
                             text_embeddings=result.texts, image_embeddings=result.images)

    @bentoml.api(route="/rank", input_spec=RankInput)
    @shaped_errors
    async def rank(self, **params) -> RankResponse:
        """Order candidate texts and/or images by CLIP similarity to one query (a text or an
        image), best first, with their cosine scores."""
        observer = self._observe("rank")
        return await observer.run(self._rank_route(params, observer))

    async def _rank_route(self, params: dict, observer: RequestObserver) -> RankResponse:
        request = RankInput(**params)
        query_refs = image_refs(request.query_image, [request.query_image_b64] * bool(
            request.query_image_b64), "query_image", "query_image_b64")
        if (request.query is not None) + len(query_refs) != 1:
            raise BadRequest("send exactly one query: query (a text), query_image (a file) or "
                             "query_image_b64.", "query")
        refs = image_refs(request.candidate_images, request.candidate_images_b64,
                          "candidate_images", "candidate_images_b64")
        ranked = await Deadline.start(None, CONFIG.api.timeout).run(
            self._rank(request.query, request.candidates, query_refs + refs, observer))
        return RankResponse(
            model=self.embedding_model.name, query="image" if query_refs else "text",
            results=[RankedCandidate(kind=r.kind, index=r.index, text=r.text, score=r.score)
                     for r in ranked])

    @bentoml.api(route="/model_info")
    def model_info(self) -> ModelInfo:
        """Served models (store tags and labels), backends and request limits."""
        limits = CONFIG.images
        return ModelInfo(
            served_model_name=CONFIG.served_model_name,
            llm=self.chat_model.native(),
            vision=self.chat_model.native(backend="transformers"),
            embedding=self.embedding_model.native(),
            adapters=[adapter.native_adapter() for adapter in self.adapters],
            image_tokens=self.image_tokens,
            max_tokens_limit=CONFIG.max_tokens_limit,
            max_model_len=CONFIG.llm.max_model_len,
            max_num_seqs=CONFIG.llm.max_num_seqs,
            images=ImageLimitsInfo(max_images=limits.max_images,
                                   max_embed_images=limits.max_embed_images,
                                   max_bytes=limits.max_bytes, max_pixels=limits.max_pixels),
        )

    @bentoml.api(route="/runner_stats")
    async def runner_stats(self) -> dict:
        """Batch sizes every worker of each runner has run, and the LLM's running sequences."""
        vision, llm = await asyncio.gather(self.vision.to_async.stats(), self.llm.to_async.stats())
        return {"vision": vision, "llm": llm}


async def _native_events(run):
    """/generate_stream's events of one pipeline run."""
    async for item in run:
        if isinstance(item, Usage):
            yield {"usage": item.model_dump()}
            continue
        event = {"index": item.index, "text": item.text}
        if item.finish_reason:
            event["finish_reason"] = item.finish_reason
        yield event


DOCS = """Serve a multimodal LLM: image + text in, text out; CLIP image and text embeddings.

- **Native API** (below, *Service APIs*): `/generate` and `/generate_stream` take a prompt and
  image files (or base64 in `images_b64`); `/embed` and `/rank` use the CLIP model.
- **OpenAI-compatible API** under `/v1`: chat completions with `image_url` parts, completions,
  embeddings and models; any OpenAI SDK works with `base_url=<this server>/v1`.
- Every error is `{"error": {"message", "type", "param", "code"}}`.
- With an API key configured, press *Authorize* and enter it: every request then carries
  `Authorization: Bearer <key>` (as curl, the SDKs and the client send it).
"""
TAGS = [
    {"name": "Service APIs", "description": "The native API: generate, stream, embed, rank."},
    {"name": "Infrastructure", "description": "Health probes and Prometheus metrics."},
    {"name": "OpenAI: chat", "description": "POST /v1/chat/completions, text and image parts."},
    {"name": "OpenAI: completions", "description": "POST /v1/completions (one prompt)."},
    {"name": "OpenAI: embeddings", "description": "POST /v1/embeddings: texts and images."},
    {"name": "OpenAI: models",
     "description": "The served chat models (the LLM and its LoRA adapters) and the embedding "
     "model."},
]

# Outermost first: the request id (on every answer, 401s included); no key, no work (not even
# buffering an upload); every error body in the one shape; the concurrency bound and draining;
# the docs page; cancelling on disconnect; the upload guard, which bounds the buffered body by
# what the largest valid request can carry (base64 inflates by 4/3).
LMMService.add_asgi_middleware(request_id.RequestId)
LMMService.add_asgi_middleware(ApiKeyAuth,
                               keys=KeyStore.from_environment(CONFIG.auth.api_keys_file),
                               protect_metrics=CONFIG.auth.protect_metrics)
LMMService.add_asgi_middleware(ErrorShape)
LMMService.add_asgi_middleware(backpressure.ConcurrencyLimit, limit=CONFIG.api.max_concurrency)
LMMService.add_asgi_middleware(DocsPage, title="bento-lmm", description=DOCS, tags=TAGS)
LMMService.add_asgi_middleware(CancelOnDisconnect)
LMMService.add_asgi_middleware(
    UploadGuard, fields=("images", "query_image", "candidate_images"),
    max_body=2 * CONFIG.images.max_bytes * max(CONFIG.images.max_images,
                                                CONFIG.images.max_embed_images) + (1 << 20),
)
