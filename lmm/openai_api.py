"""OpenAI-compatible routes (mounted at ``/v1``), on the same ``Pipeline`` as the native API.

Supported: chat completions (text + image parts, streaming, n, stop, seed), text completions,
models and embeddings (texts, plus images as an extension). Parameters that would change the
result but are not implemented (penalties, logprobs, tools, JSON formats) are refused with a
400 rather than silently ignored; unknown fields are ignored. Errors use OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException

from lmm.config import LMMConfig
from lmm.errors import BadRequest, NotFoundError, error_response
from lmm.fetch import ImageFetcher
from lmm.images import decode_base64, load_image
from lmm.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ImageInput,
    ModelCard,
    ModelList,
    SamplingRequest,
    TextCompletion,
)
from lmm.pipeline import Delta, Pipeline, Prompt, sse, usage, user_messages
from lmm.protocol import SamplingParams

logger = logging.getLogger(__name__)
_IMAGE_DATA_URL = re.compile(r"^data:image/[\w.+-]+(;[^,;]+)*;base64,", re.I)


class ModelNotFound(NotFoundError):
    code = "model_not_found"


class Unsupported(BadRequest):
    code = "unsupported_parameter"


@dataclass
class StoredModel:
    """A served model as /v1/models lists it."""

    id: str
    tag: str
    created: int
    kind: str


@dataclass
class Backend:
    """What the routes need: the pipeline (with its config), the models and an image fetcher."""

    pipeline: Pipeline
    chat_model: StoredModel
    embedding_model: StoredModel
    fetcher: ImageFetcher

    @property
    def config(self) -> LMMConfig:
        return self.pipeline.config

    @classmethod
    def create(cls, pipeline: Pipeline, chat_model: StoredModel,
               embedding_model: StoredModel) -> Backend:
        limits = pipeline.config.images
        fetcher = ImageFetcher(limits.allowed_url_domains, limits.max_bytes,
                               limits.fetch_timeout_s)
        return cls(pipeline, chat_model, embedding_model, fetcher)


_service_backend: Backend | None = None


def service_backend() -> Backend:
    """The Backend of the running BentoML service (``LMMService``), built once per worker."""
    global _service_backend
    if _service_backend is None:
        import bentoml

        service = bentoml.get_current_service()

        def stored(model: Any, name: str, kind: str) -> StoredModel:
            return StoredModel(name, str(model.tag), int(model.info.creation_time.timestamp()),
                               kind)

        config = service.pipeline.config
        _service_backend = Backend.create(
            service.pipeline, stored(service.llava, config.served_model_name, "chat"),
            stored(service.clip, service.clip.tag.name, "embedding"),
        )
    return _service_backend


# -- errors --------------------------------------------------------------------------------
def _json_error(exc: BaseException) -> JSONResponse:
    status, body = error_response(exc)
    return JSONResponse(body, status_code=status)


def _loc(loc: tuple) -> list[str]:
    """A pydantic error location without "body" and union member tags ("str", "list[str]")."""
    simple = {"str", "int", "float", "bool", "list", "dict", "none"}
    return [str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and ("[" in p or p in simple or p[:1].isupper()))]


def _validation_error(errors: list[dict]) -> BadRequest:
    locs = [_loc(tuple(e.get("loc", ()))) for e in errors] or [[]]
    common = os.path.commonprefix(locs)
    issues = dict.fromkeys(f"{'.'.join(loc) or 'body'}: {e.get('msg')}"
                           for loc, e in zip(locs, errors))
    return BadRequest("; ".join(list(issues)[:5]) or "invalid request",
                      ".".join(common) or "body")


# -- request -> pipeline inputs ------------------------------------------------------------
def to_hf_messages(messages: list[ChatMessage]) -> tuple[list[dict], list[tuple[str, str]]]:
    """HF multimodal messages for the chat template, and the image URLs in order (with param)."""
    converted: list[dict] = []
    images: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if message.tool_calls:
            raise Unsupported("tool calls are not supported by this model.",
                              f"messages.{i}.tool_calls")
        content = message.content
        if content is None:
            content = ""
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
                images.append((part.url, param))
        converted.append({"role": role, "content": parts})
    return converted, images


def check_model(name: str, backend: Backend, embedding: bool = False) -> None:
    """404 unless ``name`` is a model this server serves (for the endpoint at hand)."""
    served = [backend.chat_model.id] + ([backend.embedding_model.id] if embedding else [])
    if name not in served:
        raise ModelNotFound(
            f"model {name!r} does not exist on this server; use "
            + " or ".join(repr(s) for s in served) + " (see GET /v1/models).", "model")


def _refuse_unsupported(request: SamplingRequest) -> None:
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            raise Unsupported(f"{name} is not supported (send 0 or omit it); "
                              "repetition_penalty is available as an extension.", name)
    if request.logit_bias:
        raise Unsupported("logit_bias is not supported.", "logit_bias")


def _refuse_unsupported_chat(request: ChatCompletionRequest) -> None:
    _refuse_unsupported(request)
    if request.logprobs or request.top_logprobs:
        raise Unsupported("logprobs are not supported.", "logprobs")
    if request.tools or request.functions:
        raise Unsupported("tools (function calling) are not supported by this model.", "tools")
    if request.tool_choice not in (None, "none", "auto"):  # without tools, auto means none
        raise Unsupported("tool_choice is not supported (only 'none').", "tool_choice")
    if request.response_format is not None and request.response_format.type != "text":
        raise Unsupported(f"response_format {request.response_format.type!r} is not "
                          "supported; only 'text'.", "response_format")


def sampling(request: SamplingRequest, config: LMMConfig,
             max_tokens: int | None = None) -> tuple[SamplingParams, list[str], int]:
    """SamplingParams, stop strings and n of a request, within the server's limits."""
    name = "max_completion_tokens" if max_tokens else "max_tokens"
    max_tokens = max_tokens or request.max_tokens or config.default_max_tokens
    if max_tokens > config.max_tokens_limit:
        raise BadRequest(f"{name} is {max_tokens}; at most {config.max_tokens_limit}.", name)
    n = request.n or 1
    if n > config.max_n:
        raise BadRequest(f"n is {n}; at most {config.max_n}.", "n")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        top_k=request.top_k or 0,
        repetition_penalty=request.repetition_penalty or 1.0,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
    )
    return params, [s for s in stop if s], n


async def load_images(refs: list[tuple[str, str]], backend: Backend,
                      embed: bool = False) -> list[Image.Image]:
    """Decode data URLs and fetch allow-listed http(s) URLs, in order."""
    backend.pipeline.check_image_count(len(refs), embed)
    limits = backend.config.images

    async def one(url: str, param: str) -> Image.Image:
        url = url.strip()
        if url.lower().startswith(("http://", "https://")):
            data = await backend.fetcher.fetch(url, param)
        elif url.lower().startswith("data:"):
            data = await asyncio.to_thread(decode_base64, url, limits, param)
        else:
            raise BadRequest("image_url must be a data:image/...;base64,... URL"
                             + (" or an http(s) URL." if backend.fetcher.enabled else "."), param)
        return await asyncio.to_thread(load_image, data, limits, param)

    return list(await asyncio.gather(*(one(url, param) for url, param in refs)))


# -- streaming -----------------------------------------------------------------------------
async def _primed(stream: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """Start the stream now, so that errors before the first delta become an HTTP status."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[Delta]:
        try:
            if first is not None:
                yield first
                async for delta in stream:
                    yield delta
        finally:
            await stream.aclose()

    return rest()


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """After the first byte an error can only be an event: ``data: {"error": ...}``."""
    try:
        async for event in events:
            yield event
    except Exception as exc:
        logger.exception("stream failed")
        yield sse(error_response(exc)[1])
    yield sse("[DONE]")


def run_head(prefix: str, request: SamplingRequest, backend: Backend) -> dict:
    """The fields every completion object and chunk of one run share."""
    return dict(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()),
                model=request.model, system_fingerprint=backend.chat_model.tag)


async def stream_response(events: Callable[..., AsyncIterator[str]], head: dict,
                          request: SamplingRequest, backend: Backend, prompt: Prompt,
                          run: tuple[SamplingParams, list[str], int]) -> StreamingResponse:
    """SSE of one run: chat or text chunks, usage last when asked, errors as a final event."""
    params, stop, n = run
    deltas = await _primed(backend.pipeline.stream(prompt, params, stop, n))
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return _event_stream(_with_errors(events(deltas, head, prompt, n, include_usage)))


def _dump(model: Any) -> str:
    return sse(model.model_dump(mode="json"))


# -- the app -------------------------------------------------------------------------------
def create_app(get_backend: Callable[[], Backend] = service_backend) -> FastAPI:
    """The /v1 FastAPI app; ``get_backend`` is a FastAPI dependency (swap it in tests)."""
    app = FastAPI(title="bento-lmm OpenAI-compatible API", version="1",
                  description=__doc__, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _json_error(_validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        body = {"message": str(exc.detail), "type": kind, "param": None, "code": None}
        return JSONResponse({"error": body}, status_code=exc.status_code)

    @app.exception_handler(BentoMLException)  # LMMError and errors relayed from runners
    async def on_bentoml_error(_: Request, exc: BentoMLException) -> JSONResponse:
        if int(exc.error_code) >= 500:
            logger.error("request failed: %r", exc)
        return _json_error(exc)

    @app.exception_handler(Exception)
    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed", exc_info=exc)
        return _json_error(exc)

    @app.get("/models", response_model=ModelList)
    async def list_models(backend: Backend = Depends(get_backend)) -> ModelList:
        """The served chat model and the embedding model."""
        return ModelList(data=[_card(backend.chat_model), _card(backend.embedding_model)])

    @app.get("/models/{model_id}", response_model=ModelCard)
    async def get_model(model_id: str, backend: Backend = Depends(get_backend)) -> ModelCard:
        """One served model."""
        check_model(model_id, backend, embedding=True)
        model = backend.chat_model if model_id == backend.chat_model.id else backend.embedding_model
        return _card(model)

    @app.post("/chat/completions", response_model=ChatCompletion)
    async def chat_completions(request: ChatCompletionRequest,
                               backend: Backend = Depends(get_backend)) -> Any:
        """Chat with text and images; `stream: true` gives `chat.completion.chunk` events."""
        check_model(request.model, backend)
        _refuse_unsupported_chat(request)
        params, stop, n = sampling(request, backend.config, request.max_completion_tokens)
        messages, refs = to_hf_messages(request.messages)
        images = await load_images(refs, backend)
        prompt = await asyncio.to_thread(backend.pipeline.build_prompt, messages, images)
        head = run_head("chatcmpl", request, backend)
        if request.stream:
            return await stream_response(_chat_events, head, request, backend, prompt,
                                         (params, stop, n))
        texts, reasons, used = await backend.pipeline.complete(prompt, params, stop, n)
        choices = [ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r)
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return ChatCompletion(**head, choices=choices, usage=used)

    @app.post("/completions", response_model=TextCompletion)
    async def completions(request: CompletionRequest,
                          backend: Backend = Depends(get_backend)) -> Any:
        """Complete one prompt (sent as one user turn through the chat template, as /generate)."""
        check_model(request.model, backend)
        _refuse_unsupported(request)
        for name in ("echo", "suffix", "logprobs"):
            if getattr(request, name) not in (None, False):
                raise Unsupported(f"{name} is not supported.", name)
        if request.best_of not in (None, 1):
            raise Unsupported("best_of is not supported.", "best_of")
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if len(prompts) != 1:
            raise BadRequest("send exactly one prompt per request.", "prompt")
        params, stop, n = sampling(request, backend.config)
        prompt = await asyncio.to_thread(
            backend.pipeline.build_prompt, user_messages(prompts[0], 0), [])
        head = run_head("cmpl", request, backend)
        if request.stream:
            return await stream_response(_text_events, head, request, backend, prompt,
                                         (params, stop, n))
        texts, reasons, used = await backend.pipeline.complete(prompt, params, stop, n)
        choices = [CompletionChoice(index=i, text=t, finish_reason=r)
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return TextCompletion(**head, choices=choices, usage=used)

    @app.post("/embeddings", response_model=EmbeddingResponse)
    async def embeddings(request: EmbeddingRequest,
                         backend: Backend = Depends(get_backend)) -> EmbeddingResponse:
        """CLIP embeddings of texts and (extension) images, in input order."""
        check_model(request.model, backend, embedding=True)
        items = [request.input] if isinstance(request.input, str) else request.input
        if not items:
            raise BadRequest("input is empty; send at least one text or image.", "input")
        texts: list[tuple[int, str]] = []
        refs: list[tuple[int, str]] = []
        for i, item in enumerate(items):
            if isinstance(item, ImageInput):
                refs.append((i, item.image))
            elif _IMAGE_DATA_URL.match(item):
                refs.append((i, item))
            else:
                texts.append((i, item))
        images = await load_images([(_as_url(url), f"input.{i}") for i, url in refs], backend,
                                   embed=True)
        text_vectors, image_vectors = await backend.pipeline.embed([t for _, t in texts], images)
        vectors = dict(zip([i for i, _ in texts], text_vectors))
        vectors.update(zip([i for i, _ in refs], image_vectors))
        dim = len(next(iter(vectors.values())))
        if request.dimensions not in (None, dim):
            raise Unsupported(f"dimensions must be {dim} for this model.", "dimensions")
        tokens = await asyncio.to_thread(_count_tokens, backend.pipeline, [t for _, t in texts])
        data = [Embedding(index=i, embedding=_encode(vectors[i], request.encoding_format))
                for i in range(len(items))]
        return EmbeddingResponse(data=data, model=backend.embedding_model.id,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                   include_in_schema=False)
    async def unknown(path: str, request: Request) -> JSONResponse:
        """Anything else under /v1 (BentoML's mount would answer a plain-text 404)."""
        raise HTTPException(404, f"no route {request.method} /v1/{path}")

    return app


def _card(model: StoredModel) -> ModelCard:
    return ModelCard(id=model.id, created=model.created, tag=model.tag,
                     version=model.tag.partition(":")[2], kind=model.kind)


def _as_url(image: str) -> str:
    """An image given as bare base64 (embeddings extension) as a data URL."""
    image = image.strip()
    return image if image.lower().startswith(("data:", "http:", "https:")) else (
        "data:image/png;base64," + image)


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _count_tokens(pipeline: Pipeline, texts: list[str]) -> int:
    if not texts:
        return 0
    tok = pipeline.clip_processor.tokenizer
    limit = min(getattr(tok, "model_max_length", 77), 10_000)
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=limit)["input_ids"])


async def _chat_events(deltas: AsyncIterator[Delta], head: dict, prompt: Prompt, n: int,
                       include_usage: bool) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict[str, str], reason: str | None = None) -> str:
        choice = ChunkChoice(index=index, delta=delta, finish_reason=reason)
        return _dump(ChatCompletionChunk(**head, choices=[choice]))

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    completion = [0] * n
    async for d in deltas:
        completion[d.index] = d.completion_tokens
        if d.text:
            yield chunk(d.index, {"content": d.text})
        if d.finish_reason:
            yield chunk(d.index, {}, d.finish_reason)
    if include_usage:
        used = usage(len(prompt.token_ids), sum(completion))
        yield _dump(ChatCompletionChunk(**head, choices=[], usage=used))


async def _text_events(deltas: AsyncIterator[Delta], head: dict, prompt: Prompt, n: int,
                       include_usage: bool) -> AsyncIterator[str]:
    completion = [0] * n
    async for d in deltas:
        completion[d.index] = d.completion_tokens
        choice = CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason)
        yield _dump(TextCompletion(**head, choices=[choice]))
    if include_usage:
        used = usage(len(prompt.token_ids), sum(completion))
        yield _dump(TextCompletion(**head, choices=[], usage=used))


app = create_app()
