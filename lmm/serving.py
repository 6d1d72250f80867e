"""The OpenAI-compatible API's serving code: requests in, response models or event streams out.

``lmm.openai_api`` is only the router over this. Supported: chat completions (text + image
parts, streaming, n, stop, seed), text completions, models and embeddings (texts, plus images as
an extension). Parameters that would change the result but are not implemented (penalties,
logprobs, tools, JSON formats) are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from typing import AsyncIterator, Sequence

import numpy as np

from lmm import openai_protocol as oai
from lmm.adapters import ChunkTemplate, ImageDecoder, ImageRef, ServedModel, primed, sse_stream
from lmm.deadlines import Deadline
from lmm.errors import BadRequest, ModelNotFound, Unsupported
from lmm.metrics import ApiMetrics, RequestObserver
from lmm.pipeline import Delta, Pipeline, collect, user_messages
from lmm.protocol import Usage

_IMAGE_DATA_URL = re.compile(r"^data:image/[\w.+-]+(;[^,;]+)*;base64,", re.I)


def to_hf_messages(messages: list[oai.ChatMessage]) -> tuple[list[dict], list[ImageRef]]:
    """HF multimodal messages for the chat template, and the images in order."""
    converted: list[dict] = []
    images: list[ImageRef] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.tool_calls:
            raise Unsupported("tool calls are not supported by this model.",
                              f"messages.{i}.tool_calls")
        content = "" if message.content is None else message.content
        parts: list[dict] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        else:
            for j, part in enumerate(content):
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text})
                    continue
                param = f"messages.{i}.content.{j}.image_url"
                if role != "user":
                    raise BadRequest("images are accepted in user messages only.", param)
                parts.append({"type": "image"})
                images.append(ImageRef(part.url, param, bare_base64=False))
        converted.append({"role": role, "content": parts})
    return converted, images


class OpenAIServing:
    """Chat, text completions, embeddings and models over one ``Pipeline``."""

    def __init__(self, pipeline: Pipeline, chat_model: ServedModel,
                 embedding_model: ServedModel, images: ImageDecoder | None = None,
                 metrics: ApiMetrics | None = None, adapters: Sequence[ServedModel] = ()):
        self.pipeline = pipeline
        self.config = pipeline.config
        self.chat_model = chat_model
        self.embedding_model = embedding_model
        self.adapters = list(adapters)  # LoRA adapters of the chat model, chat models too
        self.images = images or ImageDecoder(self.config.images)
        self.metrics = metrics

    def _observe(self, route: str) -> RequestObserver:
        """One request's metrics; none are recorded when the server was built without them."""
        return self.metrics.request(route) if self.metrics else RequestObserver(None, route)

    # -- models ------------------------------------------------------------------------
    def models(self) -> oai.ModelList:
        return oai.ModelList(data=[m.openai() for m in (self.chat_model, *self.adapters,
                                                        self.embedding_model)])

    def model(self, name: str, embedding: bool = False, chat: bool = True) -> ServedModel:
        """The served model called ``name`` (for the endpoint at hand: chat models, the LLM and
        its adapters; embedding models); 404 otherwise, naming the served ones."""
        served = ([self.chat_model, *self.adapters] if chat else [self.chat_model]) + (
            [self.embedding_model] if embedding else [])
        for model in served:
            if model.id == name:
                return model
        raise ModelNotFound(
            f"model {name!r} does not exist on this server; use "
            + " or ".join(repr(m.id) for m in served) + " (see GET /v1/models).", "model")

    # -- completions -------------------------------------------------------------------
    async def chat(self, request: oai.ChatCompletionRequest
                   ) -> oai.ChatCompletion | AsyncIterator[str]:
        return await self._within_deadline(request, self._chat, "chat")

    async def _within_deadline(self, request: oai.SamplingRequest, body, route: str):
        """``body(request, deadline, observer)`` bounded by the request's deadline (504 past
        it), observed as one request of ``route`` (lmm.metrics)."""
        observer = self._observe(route)

        async def bounded():
            deadline = Deadline.start(request.timeout, self.config.api.timeout)
            return await deadline.run(body(request, deadline, observer))

        return await observer.run(bounded())

    def sampling(self, request: oai.SamplingRequest):
        """The request's sampling, with the adapter its ``model`` names (404: no such model)."""
        adapter = self.model(request.model).adapter
        params, stop, n = request.sampling(self.config)
        return params.model_copy(update={"adapter": adapter}), stop, n

    async def _chat(self, request: oai.ChatCompletionRequest, deadline: Deadline,
                    observer: RequestObserver):
        params, stop, n = self.sampling(request)
        messages, refs = to_hf_messages(request.messages)
        with observer.preprocessing():
            images = await self.images.decode(refs, self.config.images.max_images)
            prompt = await asyncio.to_thread(self.pipeline.build_prompt, messages, images)
        observer.images(len(images))
        head = self._head("chatcmpl", request)
        run = observer.stream(deadline.bound(
            self.pipeline.stream(prompt, params, stop, n, observer=observer)))
        if request.stream:
            return sse_stream(_chat_chunks(await primed(run), head, n, request.include_usage))
        texts, reasons, used = await collect(run, n)
        return oai.ChatCompletion(**head, usage=used, choices=[
            oai.ChatChoice(index=i, message=oai.AssistantMessage(content=t), finish_reason=r)
            for i, (t, r) in enumerate(zip(texts, reasons))])

    async def completion(self, request: oai.CompletionRequest
                         ) -> oai.TextCompletion | AsyncIterator[str]:
        return await self._within_deadline(request, self._completion, "completions")

    async def _completion(self, request: oai.CompletionRequest, deadline: Deadline,
                          observer: RequestObserver):
        params, stop, n = self.sampling(request)
        with observer.preprocessing():
            prompt = await asyncio.to_thread(
                self.pipeline.build_prompt, user_messages(request.single_prompt(), 0), [])
        observer.images(0)
        head = self._head("cmpl", request)
        run = observer.stream(deadline.bound(
            self.pipeline.stream(prompt, params, stop, n, observer=observer)))
        if request.stream:
            return sse_stream(_text_chunks(await primed(run), head, request.include_usage))
        texts, reasons, used = await collect(run, n)
        return oai.TextCompletion(**head, usage=used, choices=[
            oai.CompletionChoice(index=i, text=t, finish_reason=r)
            for i, (t, r) in enumerate(zip(texts, reasons))])

    def _head(self, prefix: str, request: oai.SamplingRequest) -> dict:
        """The fields every completion object and chunk of one run share."""
        return dict(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()),
                    model=request.model, system_fingerprint=self.model(request.model).tag)

    # -- embeddings --------------------------------------------------------------------
    async def embeddings(self, request: oai.EmbeddingRequest) -> oai.EmbeddingResponse:
        observer = self._observe("embeddings")
        return await observer.run(Deadline.start(None, self.config.api.timeout).run(
            self._embeddings(request, observer)))

    async def _embeddings(self, request: oai.EmbeddingRequest,
                          observer: RequestObserver) -> oai.EmbeddingResponse:
        # The chat model's name embeds with CLIP too; an adapter's does not (CLIP has none).
        self.model(request.model, embedding=True, chat=False)
        items = [request.input] if isinstance(request.input, str) else request.input
        if not items:
            raise BadRequest("input is empty; send at least one text or image.", "input")
        texts: list[tuple[int, str]] = []
        refs: list[tuple[int, ImageRef]] = []
        for i, item in enumerate(items):
            if isinstance(item, oai.ImageInput):
                refs.append((i, ImageRef(item.image, f"input.{i}")))
            elif _IMAGE_DATA_URL.match(item):
                refs.append((i, ImageRef(item, f"input.{i}")))
            else:
                texts.append((i, item))
        with observer.preprocessing():
            images = await self.images.decode([r for _, r in refs],
                                              self.config.images.max_embed_images)
        observer.images(len(images))
        result = await self.pipeline.embed([t for _, t in texts], images, observer=observer)
        vectors = dict(zip([i for i, _ in texts], result.texts))
        vectors.update(zip([i for i, _ in refs], result.images))
        dim = len(next(iter(vectors.values())))
        if request.dimensions not in (None, dim):
            raise Unsupported(f"dimensions must be {dim} for this model.", "dimensions")
        data = [oai.Embedding(index=i, embedding=_encode(vectors[i], request.encoding_format))
                for i in range(len(items))]
        tokens = result.prompt_tokens
        used = oai.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
        return oai.EmbeddingResponse(data=data, model=self.embedding_model.id, usage=used)


async def _chat_chunks(run: AsyncIterator[Delta | Usage], head: dict, n: int,
                       include_usage: bool) -> AsyncIterator[oai.ChatCompletionChunk | str]:
    def chunk(index: int, delta: dict[str, str], reason: str | None = None):
        choice = oai.ChunkChoice(index=index, delta=delta, finish_reason=reason)
        return oai.ChatCompletionChunk(**head, choices=[choice])

    content: dict[int, ChunkTemplate] = {}  # per choice: the chunk of a content delta
    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    async for d in run:
        if isinstance(d, Usage):
            if include_usage:
                yield oai.ChatCompletionChunk(**head, choices=[], usage=d)
            continue
        if d.text:
            if d.index not in content:
                content[d.index] = ChunkTemplate(chunk(d.index, {"content": ChunkTemplate.SLOT}))
            yield content[d.index](d.text)
        if d.finish_reason:
            yield chunk(d.index, {}, d.finish_reason)


async def _text_chunks(run: AsyncIterator[Delta | Usage], head: dict,
                       include_usage: bool) -> AsyncIterator[oai.TextCompletion | str]:
    def chunk(index: int, text: str, reason: str | None = None):
        choice = oai.CompletionChoice(index=index, text=text, finish_reason=reason)
        return oai.TextCompletion(**head, choices=[choice])

    content: dict[int, ChunkTemplate] = {}  # per choice: the chunk of an unfinished delta
    async for d in run:
        if isinstance(d, Usage):
            if include_usage:
                yield oai.TextCompletion(**head, choices=[], usage=d)
            continue
        if d.finish_reason:
            yield chunk(d.index, d.text, d.finish_reason)
            continue
        if d.index not in content:
            content[d.index] = ChunkTemplate(chunk(d.index, ChunkTemplate.SLOT))
        yield content[d.index](d.text)


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
