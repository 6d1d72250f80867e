"""Sync and async Python clients of the native bento-lmm API (/generate, /embed, /rank, ...).

Images may be paths, bytes or PIL images; they travel as multipart file uploads (base64 in
/rank). Any non-2xx answer, and an error event inside a stream, raises ``ClientError`` with
the server's message. Requests are built and answers parsed in ``client.api``; the two
classes here only send them.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx

from client import api
from client.api import (
    DEFAULT_TIMEOUT,
    DEFAULT_URL,
    EmbedResult,
    GenerateResult,
    ImageInput,
    RankResult,
    StreamEvent,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from client.api import GenerateParams


class _Progress:
    """Items done out of a total on stderr: tqdm when installed, else one rewritten line."""

    def __init__(self, total: int, enabled: bool, label: str = "embed"):
        self.total, self.done, self.label, self.enabled = total, 0, label, enabled
        self._bar, self._lock = None, threading.Lock()
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self._draw()
            else:
                self._bar = tqdm(total=total, desc=label, unit="item", file=sys.stderr)

    def update(self, n: int) -> None:
        with self._lock:  # Client.embed's threads
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self.enabled:
                self._draw()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")

    def _draw(self) -> None:
        filled = 30 * self.done // max(self.total, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                         f"{self.done}/{self.total}")
        sys.stderr.flush()


class Client:
    """Blocking client: ``Client(url).generate("What shape is this?", images=[img])``.

    ``api_key`` (else ``$LMM_API_KEY``), if any, is sent as ``Authorization: Bearer``.
    """

    def __init__(self, url: str = DEFAULT_URL, timeout: float = DEFAULT_TIMEOUT,
                 api_key: str | None = None):
        self._http = httpx.Client(**api.http_options(url, timeout, api_key))
        self.url = str(self._http.base_url).rstrip("/")
        self._embed_batch: int | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: api.Call[api.T]) -> api.T:
        response = self._http.post(call.path, **call.kwargs)
        api.check(response)
        return call.parse(response.json())

    def _events(self, call: api.Call[StreamEvent]) -> Iterator[StreamEvent]:
        with self._http.stream("POST", call.path, **call.kwargs) as response:
            if not response.is_success:
                response.read()
            api.check(response)
            for line in response.iter_lines():
                payload = api.sse(line)
                if payload == api.DONE:
                    return
                if payload is not None:
                    yield call.parse(payload)

    def generate(self, prompt: str, images: Sequence[ImageInput] | None = None,
                 **params: Unpack[GenerateParams]) -> GenerateResult:
        """Generate text for a prompt and 0..N images (server defaults for unset parameters)."""
        return self._send(api.generate(prompt, images, params))

    def stream(self, prompt: str, images: Sequence[ImageInput] | None = None,
               **params: Unpack[GenerateParams]) -> Iterator[StreamEvent]:
        """Every /generate_stream event (deltas, finish reasons, then usage)."""
        return self._events(api.stream(prompt, images, params))

    def generate_stream(self, prompt: str, images: Sequence[ImageInput] | None = None,
                        **params: Unpack[GenerateParams]) -> Iterator[str]:
        """Text deltas of one completion as they are generated (same parameters as generate)."""
        call = api.stream(prompt, images, params, one_sequence=True)
        return (event.text for event in self._events(call) if event.text)

    def embed(self, texts: Sequence[str] | None = None,
              images: Sequence[ImageInput] | None = None, *, batch_size: int | None = None,
              concurrency: int = 4, progress: bool = False) -> EmbedResult:
        """CLIP embeddings (L2-normalized) of texts and/or images, in input order.

        Large inputs go as requests of ``batch_size`` items (default: the server's
        images.max_embed_images), up to ``concurrency`` at a time (threads).
        """
        if not texts and not images:
            raise ValueError("embed() needs texts and/or images")
        calls = api.embed(texts, images, batch_size or self._embed_batch_size())
        bar = _Progress(len(texts or ()) + len(images or ()), progress)

        def one(call: api.Call[EmbedResult]) -> EmbedResult:
            result = self._send(call)
            bar.update(result.count)
            return result

        pool = ThreadPoolExecutor(max(1, min(concurrency, len(calls))))
        try:
            return EmbedResult.concat(list(pool.map(one, calls)))
        finally:
            pool.shutdown(cancel_futures=True)
            bar.close()

    def _embed_batch_size(self) -> int:
        if self._embed_batch is None:
            self._embed_batch = api.embed_batch_size(self.model_info())
        return self._embed_batch

    def rank(self, query: str | ImageInput,
             candidates: Sequence[str | ImageInput]) -> list[RankResult]:
        """Candidates (texts and/or images) by descending similarity to the query (a text or
        an image); a str is always text, so pass image paths as ``pathlib.Path``."""
        return self._send(api.rank(query, candidates))

    def model_info(self) -> dict[str, Any]:
        """Served models (store tags), limits and backends."""
        return self._send(api.model_info())

    def health(self) -> bool:
        """Whether the server answers /readyz with 200."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False


class AsyncClient:
    """Asyncio client with the same methods as ``Client`` (streams are async iterators)."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = DEFAULT_TIMEOUT,
                 api_key: str | None = None):
        self._http = httpx.AsyncClient(**api.http_options(url, timeout, api_key))
        self.url = str(self._http.base_url).rstrip("/")
        self._embed_batch: int | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: api.Call[api.T]) -> api.T:
        response = await self._http.post(call.path, **call.kwargs)
        api.check(response)
        return call.parse(response.json())

    async def _events(self, call: api.Call[StreamEvent]) -> AsyncIterator[StreamEvent]:
        async with self._http.stream("POST", call.path, **call.kwargs) as response:
            if not response.is_success:
                await response.aread()
            api.check(response)
            async for line in response.aiter_lines():
                payload = api.sse(line)
                if payload == api.DONE:
                    return
                if payload is not None:
                    yield call.parse(payload)

    async def generate(self, prompt: str, images: Sequence[ImageInput] | None = None,
                       **params: Unpack[GenerateParams]) -> GenerateResult:
        """Generate text for a prompt and 0..N images."""
        return await self._send(api.generate(prompt, images, params))

    def stream(self, prompt: str, images: Sequence[ImageInput] | None = None,
               **params: Unpack[GenerateParams]) -> AsyncIterator[StreamEvent]:
        """Every /generate_stream event (deltas, finish reasons, then usage)."""
        return self._events(api.stream(prompt, images, params))

    async def generate_stream(self, prompt: str, images: Sequence[ImageInput] | None = None,
                              **params: Unpack[GenerateParams]) -> AsyncIterator[str]:
        """Text deltas of one completion as they are generated."""
        async for event in self._events(api.stream(prompt, images, params, one_sequence=True)):
            if event.text:
                yield event.text

    async def embed(self, texts: Sequence[str] | None = None,
                    images: Sequence[ImageInput] | None = None, *,
                    batch_size: int | None = None, concurrency: int = 4,
                    progress: bool = False) -> EmbedResult:
        """CLIP embeddings of texts and/or images, in input order; like ``Client.embed``, with
        up to ``concurrency`` requests in flight on the event loop."""
        if not texts and not images:
            raise ValueError("embed() needs texts and/or images")
        calls = api.embed(texts, images, batch_size or await self._embed_batch_size())
        bar = _Progress(len(texts or ()) + len(images or ()), progress)
        slots = asyncio.Semaphore(max(1, concurrency))

        async def one(call: api.Call[EmbedResult]) -> EmbedResult:
            async with slots:
                result = await self._send(call)
            bar.update(result.count)
            return result

        tasks = [asyncio.ensure_future(one(call)) for call in calls]
        try:
            return EmbedResult.concat(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            bar.close()

    async def _embed_batch_size(self) -> int:
        if self._embed_batch is None:
            self._embed_batch = api.embed_batch_size(await self.model_info())
        return self._embed_batch

    async def rank(self, query: str | ImageInput,
                   candidates: Sequence[str | ImageInput]) -> list[RankResult]:
        """Candidates by descending similarity to the query (see ``Client.rank``)."""
        return await self._send(api.rank(query, candidates))

    async def model_info(self) -> dict[str, Any]:
        """Served models (store tags), limits and backends."""
        return await self._send(api.model_info())

    async def health(self) -> bool:
        """Whether the server answers /readyz with 200."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False
