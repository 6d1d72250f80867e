"""The API service's request path, independent of BentoML: preprocess -> encode -> generate ->
detokenize. The runners come in as arguments (BentoML clients in the service, fakes in tests).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal, Protocol, Sequence

import numpy as np
from PIL import Image

from lmm import faults
from lmm.config import LMMConfig
from lmm.errors import BadRequest, EngineFault, Overloaded
from lmm.families import (
    ImageFeatures,
    ImageInput,
    features_from_wire,
    features_to_wire,
)
from lmm.feature_cache import FeatureCache
from lmm.metrics import NO_REQUEST, ApiMetrics, RequestObserver
from lmm.postprocess import IncrementalDetokenizer, StopStrings
from lmm.protocol import EngineOutput, FinishReason, SamplingParams, Usage

logger = logging.getLogger(__name__)


class VisionClient(Protocol):
    async def encode(self, pixel_values: np.ndarray) -> np.ndarray: ...
    async def encode_images(self, images: list[dict[str, np.ndarray]]
                            ) -> list[dict[str, np.ndarray]]: ...
    async def embed_images(self, pixel_values: np.ndarray) -> np.ndarray: ...
    async def embed_texts(self, input_ids: list[list[int]]) -> list[list[float]]: ...


class LLMClient(Protocol):
    def generate(
        self, prompt_token_ids: list[int], image_features: np.ndarray, params: SamplingParams
    ) -> AsyncIterator[str]: ...


@dataclass
class Prompt:
    token_ids: list[int]
    pixel_values: np.ndarray | None  # [n_images, 3, H, W]: a family of same-size images
    images: list[ImageInput] | None = None  # per image: the other families


@dataclass
class Embeddings:
    texts: list[list[float]] = field(default_factory=list)
    images: list[list[float]] = field(default_factory=list)
    prompt_tokens: int = 0  # CLIP tokens of the texts


@dataclass
class Ranked:
    kind: Literal["text", "image"]
    index: int  # position in its own candidate list
    score: float  # cosine similarity to the query
    text: str | None = None


@dataclass
class Delta:
    """A piece of one completion's text; ``finish_reason`` set on that completion's last one."""

    index: int
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def user_messages(prompt: str, n_images: int, system_prompt: str | None = None) -> list[dict]:
    """The chat for a plain prompt: images first, then the text, as LLaVA was trained."""
    messages: list[dict] = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    content: list[dict] = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": prompt})
    messages.append({"role": "user", "content": content})
    return messages


async def _batches(chunks: AsyncIterator[str | bytes]) -> AsyncIterator[list[str]]:
    """Re-frame a byte stream into the JSON lines the LLM runner wrote, each read's complete
    lines together. A read takes everything that has arrived, so when the API lags behind the
    engine the tokens that queued up meanwhile are handled, and sent on, as one piece."""
    buffer = ""
    async for chunk in chunks:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        *lines, buffer = buffer.split("\n")
        lines = [line for line in lines if line.strip()]
        if lines:
            yield lines
    if buffer.strip():
        yield [buffer]


class Pipeline:
    def __init__(self, config: LMMConfig, processor: Any, clip_processor: Any,
                 vision: VisionClient, llm: LLMClient, metrics: ApiMetrics | None = None,
                 family: Any = None):
        """``family``: the LLM's ``lmm.families`` family (None: LLaVA-1.5's stacked path);
        ``processor`` its AutoProcessor, or for a text-only model its tokenizer."""
        self.config = config
        self.processor = processor
        self.family = family
        self.takes_images = family is None or family.takes_images
        self.stacked = family is None or family.stacked
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.clip_processor = clip_processor
        self.vision = vision
        self.llm = llm
        size = config.images.feature_cache_bytes

        def cache() -> FeatureCache | None:
            return FeatureCache(size, on_hits=metrics and metrics.cache_hits.inc,
                                on_misses=metrics and metrics.cache_misses.inc) if size else None

        self.cache = cache()  # the LLM's image features
        self.embed_cache = cache()  # CLIP image embeddings (another model: another LRU)

    # -- pre-processing ------------------------------------------------------------------
    def check_image_count(self, n: int, embed: bool = False) -> None:
        limit = self.config.images.max_embed_images if embed else self.config.images.max_images
        if n > limit:
            raise BadRequest(f"{n} images sent; at most {limit} per request.", "images")

    def build_prompt(self, messages: list[dict], images: Sequence[Image.Image]) -> Prompt:
        """Chat template + processor: token ids with image tokens expanded, and pixel values."""
        self.check_image_count(len(images))
        if images and not self.takes_images:
            raise BadRequest(f"{len(images)} image(s) sent, but this model takes no images (a "
                             "text-only LLM): send the request without images.", "images")
        if not self.takes_images:  # a tokenizer's template: content as plain text
            messages = [{**m, "content": _plain(m["content"])} for m in messages]
        try:
            text = self.processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # a template raising on the conversation: the client's shape
            raise BadRequest(f"messages do not fit the model's chat template: {exc}", "messages")
        if not self.takes_images:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return Prompt([int(t) for t in ids], None)
        inputs = self.processor(
            text=text, images=list(images) or None, return_tensors="np", add_special_tokens=False
        )
        ids = [int(t) for t in inputs["input_ids"][0]]
        if self.stacked:
            pixels = inputs.get("pixel_values") if images else None
            return Prompt(ids, None if pixels is None else np.asarray(pixels, dtype=np.float32))
        arrays = {k: np.asarray(v) for k, v in inputs.items()
                  if k not in ("input_ids", "attention_mask", "token_type_ids",
                               "mm_token_type_ids")}
        return Prompt(ids, None, self.family.image_inputs(arrays, len(images)) if images else [])

    def image_tokens(self) -> int:
        """Prompt tokens one image expands to (measured, so it holds for any processor; a
        32 px image: families of dynamic resolution give others more; 0: no images)."""
        if not self.takes_images:
            return 0
        image = Image.new("RGB", (32, 32))
        with_image = self.build_prompt(user_messages("x", 1), [image]).token_ids
        without = self.build_prompt(user_messages("x", 0), []).token_ids
        return len(with_image) - len(without)

    def check_budget(self, prompt: Prompt, params: SamplingParams) -> None:
        limit = self.config.llm.max_model_len
        if len(prompt.token_ids) + params.max_tokens > limit:
            raise BadRequest(
                f"prompt is {len(prompt.token_ids)} tokens and max_tokens is {params.max_tokens}: "
                f"together over the model's {limit}-token context; shorten the prompt, send "
                "fewer images or lower max_tokens.",
                "max_tokens",
            )

    # -- generation ----------------------------------------------------------------------
    async def encode(self, prompt: Prompt, observer: RequestObserver = NO_REQUEST
                     ) -> np.ndarray | list[ImageFeatures]:
        """[n_images, tokens, hidden] features, one block per image (empty without images), in
        the dtype the vision runner sent them (``lmm.transfer``); images already in the feature
        cache are not sent to the runner. Families of images of many sizes: one
        ``ImageFeatures`` per image instead."""
        if prompt.images is not None:
            return await self._encode_images(prompt.images, observer)
        if prompt.pixel_values is None:
            return np.zeros((0, 0, 0), dtype=np.float32)

        async def call(pixel_values: np.ndarray) -> np.ndarray:
            features = await faults.call("vision", self.vision,
                                         lambda: self.vision.encode(pixel_values))
            return np.asarray(features)

        with observer.encoding():
            if self.cache is None:
                return await call(prompt.pixel_values)
            return await self.cache.features(prompt.pixel_values, call)

    async def _encode_images(self, images: list[ImageInput], observer: RequestObserver
                             ) -> list[ImageFeatures]:
        if not images:
            return []

        async def call(todo: list[ImageInput]) -> list[ImageFeatures]:
            sent = [im.arrays for im in todo]
            out = await faults.call("vision", self.vision,
                                    lambda: self.vision.encode_images(sent))
            return features_from_wire(out)

        with observer.encoding():
            if self.cache is None:
                return await call(images)
            return await self.cache.features_per_image(images, call)

    async def _open(self, prompt: Prompt, features, params: SamplingParams):
        """The runner's stream of JSON-line batches and its first batch (tried once more, after
        the runner is back, if it was unavailable: nothing has been sent to the client yet)."""
        async def start():
            if isinstance(features, list):  # per image, with their meta (lmm.families)
                call = self.llm.generate(
                    prompt_token_ids=prompt.token_ids,
                    image_features=np.zeros((0, 0, 0), np.float32), params=params,
                    images=features_to_wire(features))
            else:
                call = self.llm.generate(
                    prompt_token_ids=prompt.token_ids, image_features=features, params=params)
            stream = faults.RunnerStream(call)
            batches = _batches(stream.stream)
            try:
                first = await anext(batches, None)
                stream.started()
                return stream, batches, first
            except BaseException:
                await batches.aclose()
                await stream.aclose()
                raise

        return await faults.call("LLM", self.llm, start)

    async def _one(self, index: int, prompt: Prompt, features: np.ndarray,
                   params: SamplingParams, stop: Sequence[str],
                   observer: RequestObserver = NO_REQUEST) -> AsyncIterator[Delta]:
        """One sequence's deltas: one per batch of runner lines (see ``_batches``)."""
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStrings(stop)
        stream, batches, batch = await self._open(prompt, features, params)
        try:
            while batch is not None:
                text, out = "", None
                for line in batch:
                    out = EngineOutput.model_validate_json(line)
                    if out.error:
                        if text:  # what came before the fault in this batch is still sent
                            yield Delta(index, text, None, out.prompt_tokens,
                                        out.completion_tokens)
                        raise EngineFault(out.error)
                    if out.completion_tokens:
                        observer.tokens(index)
                    text += stops.push(detok.push(out.token_ids))
                    if out.finish_reason is not None:
                        text += stops.push(detok.flush()) + stops.flush()
                    if stops.stopped or out.finish_reason is not None:
                        break
                if stops.stopped:
                    observer.sequence_finished(index, out.completion_tokens)
                    yield Delta(index, text, "stop", out.prompt_tokens, out.completion_tokens)
                    return  # closing the stream aborts the sequence in the runner
                if out.finish_reason is not None:
                    observer.sequence_finished(index, out.completion_tokens)
                if text or out.finish_reason is not None:
                    yield Delta(index, text, out.finish_reason, out.prompt_tokens,
                                out.completion_tokens)
                if out.finish_reason is not None:
                    return
                try:
                    batch = await anext(batches, None)
                except Exception as exc:  # tokens were sent: never replayed
                    raise faults.from_runner(exc, "LLM") from None
        finally:
            await batches.aclose()
            await stream.aclose()  # aborts the sequence in the runner
        raise Overloaded("the LLM runner ended the stream early; retry the request.")

    async def stream(self, prompt: Prompt, params: SamplingParams, stop: Sequence[str] = (),
                     n: int = 1, observer: RequestObserver = NO_REQUEST
                     ) -> AsyncIterator[Delta | Usage]:
        """Deltas of ``n`` completions, interleaved as they are produced; the last item is the
        run's ``Usage``."""
        completion = [0] * n
        async for delta in self._deltas(prompt, params, stop, n, observer):
            completion[delta.index] = delta.completion_tokens
            yield delta
        observer.usage(len(prompt.token_ids), sum(completion))
        yield usage(len(prompt.token_ids), sum(completion))

    async def _deltas(self, prompt: Prompt, params: SamplingParams, stop: Sequence[str],
                      n: int, observer: RequestObserver) -> AsyncIterator[Delta]:
        self.check_budget(prompt, params)
        features = await self.encode(prompt, observer)
        if n == 1:
            async for delta in self._one(0, prompt, features, params, stop, observer):
                yield delta
            return
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue()

        async def pump(i: int) -> None:
            seed = None if params.seed is None else params.seed + i
            try:
                own = params.model_copy(update={"seed": seed})
                async for d in self._one(i, prompt, features, own, stop, observer):
                    await queue.put(d)
            except BaseException as exc:  # surfaced to the consumer below
                await queue.put(exc)
            else:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(i)) for i in range(n)]
        try:
            done = 0
            while done < n:
                item = await queue.get()
                if item is None:
                    done += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()

    async def complete(self, prompt: Prompt, params: SamplingParams, stop: Sequence[str] = (),
                       n: int = 1) -> tuple[list[str], list[FinishReason | None], Usage]:
        return await collect(self.stream(prompt, params, stop, n), n)

    # -- embeddings ----------------------------------------------------------------------
    async def embed(self, texts: Sequence[str], images: Sequence[Image.Image],
                    observer: RequestObserver = NO_REQUEST) -> Embeddings:
        """L2-normalized CLIP vectors of texts and images, in input order."""
        self.check_image_count(len(images), embed=True)
        result = Embeddings()
        if texts:
            with observer.preprocessing():
                tok = self.clip_processor.tokenizer
                limit = getattr(tok, "model_max_length", 77)
                ids = tok(list(texts), truncation=True,
                          max_length=min(limit, 10_000))["input_ids"]
                rows = [list(map(int, row)) for row in ids]
            result.prompt_tokens = sum(map(len, rows))
            with observer.encoding():
                result.texts = await self._in_batches(self.vision.embed_texts, rows)
        if images:
            with observer.preprocessing():
                pixels = await asyncio.to_thread(
                    self.clip_processor.image_processor, list(images), return_tensors="np")
            pixel_values = np.asarray(pixels["pixel_values"], np.float32)

            async def call(todo: np.ndarray) -> np.ndarray:
                return np.stack(await self._in_batches(self.vision.embed_images, todo))

            with observer.encoding():
                vectors = (await call(pixel_values) if self.embed_cache is None
                           else await self.embed_cache.features(pixel_values, call))
            result.images = vectors.tolist()  # the runner's float32 values, exactly
        return result

    async def rank(self, query: str | Image.Image, texts: Sequence[str],
                   images: Sequence[Image.Image],
                   observer: RequestObserver = NO_REQUEST) -> list[Ranked]:
        """Candidates (texts, then images) by cosine similarity to the query, best first."""
        if not texts and not images:
            raise BadRequest("send at least one candidate text or image.", "candidates")
        text_query = isinstance(query, str)
        vectors = await self.embed([query, *texts] if text_query else texts,
                                   images if text_query else [query, *images], observer)
        q = np.asarray((vectors.texts if text_query else vectors.images).pop(0))
        ranked = [Ranked("text", i, float(np.dot(q, v)), text)
                  for i, (text, v) in enumerate(zip(texts, vectors.texts))]
        ranked += [Ranked("image", i, float(np.dot(q, v))) for i, v in enumerate(vectors.images)]
        return sorted(ranked, key=lambda r: -r.score)

    async def _in_batches(self, call, items) -> list:
        """One request may hold more items than the runner's max_batch_size: split it. The
        runner's rows, in order, as it returned them."""
        size = self.config.vision.batching.max_batch_size
        parts = await asyncio.gather(*[
            faults.call("vision", self.vision, functools.partial(call, items[i : i + size]))
            for i in range(0, len(items), size)])
        return [row for part in parts for row in part]


def _plain(content) -> str:
    """A message's content as the text a text-only model's chat template takes."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


async def collect(run: AsyncIterator[Delta | Usage], n: int
                  ) -> tuple[list[str], list[FinishReason | None], Usage]:
    """Texts, finish reasons and usage of a whole ``Pipeline.stream`` run."""
    texts, reasons, used = [""] * n, [None] * n, Usage()
    async for d in run:
        if isinstance(d, Usage):
            used = d
        else:
            texts[d.index] += d.text
            reasons[d.index] = d.finish_reason or reasons[d.index]
    return texts, reasons, used
