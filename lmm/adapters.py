"""What both APIs (native and OpenAI-compatible) share around the pipeline: one image decoder
for every image source, one record per served model with a native and an OpenAI view, and one
server-sent-event framing with its error tail.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Sequence

from PIL import Image
from pydantic import BaseModel

from lmm import openai_protocol as oai
from lmm import protocol
from lmm.config import ImageLimits
from lmm.errors import BadRequest, error_response
from lmm.fetch import ImageFetcher
from lmm.images import check_size, decode_base64, load_image

logger = logging.getLogger(__name__)


# -- images --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRef:
    """One image as a request carries it: an uploaded file, or text that is base64, a
    ``data:image/...;base64,`` URL or an http(s) URL; ``param`` names it in errors."""

    source: Path | str
    param: str
    bare_base64: bool = True  # False where only URLs are valid (OpenAI's image_url)


class ImageDecoder:
    """Decodes every image source, in order, with the configured limits (400/413 otherwise)."""

    def __init__(self, limits: ImageLimits, fetcher: ImageFetcher | None = None):
        self.limits = limits
        self.fetcher = fetcher or ImageFetcher(limits.allowed_url_domains, limits.max_bytes,
                                               limits.fetch_timeout_s)

    async def decode(self, refs: Sequence[ImageRef], max_images: int,
                     param: str = "images") -> list[Image.Image]:
        if len(refs) > max_images:
            raise BadRequest(f"{len(refs)} images sent; at most {max_images} per request.", param)
        return list(await asyncio.gather(*(self._one(ref) for ref in refs)))

    async def _one(self, ref: ImageRef) -> Image.Image:
        return await asyncio.to_thread(load_image, await self._bytes(ref), self.limits, ref.param)

    async def _bytes(self, ref: ImageRef) -> bytes:
        if isinstance(ref.source, Path):
            check_size(ref.source.stat().st_size, self.limits, ref.param)
            return await asyncio.to_thread(ref.source.read_bytes)
        text = ref.source.strip()
        lower = text[:8].lower()
        if lower.startswith(("http://", "https://")):
            return await self.fetcher.fetch(text, ref.param)
        if not ref.bare_base64 and not lower.startswith("data:"):
            raise BadRequest("image_url must be a data:image/...;base64,... URL"
                             + (" or an http(s) URL." if self.fetcher.enabled else "."),
                             ref.param)
        return await asyncio.to_thread(decode_base64, text, self.limits, ref.param)


def image_refs(uploads: Sequence[Path], encoded: Sequence[str], upload_param: str = "images",
               encoded_param: str = "images_b64") -> list[ImageRef]:
    """Uploads first, then the text-encoded images: the order the prompt takes them in."""
    return ([ImageRef(p, upload_param) for p in uploads]
            + [ImageRef(s, encoded_param) for s in encoded])


# -- served models -------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedModel:
    """One model this server serves, as read from the model store."""

    id: str  # the name clients pass as `model`
    name: str  # its model-store name
    tag: str
    created: int
    kind: Literal["chat", "embedding"]
    backend: str
    architecture: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    family: str = ""  # lmm.families: which family serves it ("" for the embedding model)
    parent: str | None = None  # a LoRA adapter: the served name of the model it adapts

    @classmethod
    def from_store(cls, model: Any, id: str, kind: Literal["chat", "embedding"],
                   backend: str, parent: str | None = None) -> ServedModel:
        """From a ``bentoml.Model`` (or anything with its ``tag`` and ``info``)."""
        return cls(id=id, name=model.tag.name, tag=str(model.tag),
                   created=int(model.info.creation_time.timestamp()), kind=kind,
                   backend=backend, labels=dict(model.info.labels),
                   architecture=str(model.info.metadata.get("architecture", "")), parent=parent,
                   family=_family(str(model.info.metadata.get("architecture", "")), kind))

    @property
    def adapter(self) -> str | None:
        """The LoRA adapter the LLM generates with for this model (None: the base model)."""
        return self.id if self.parent is not None else None

    def native(self, backend: str | None = None) -> protocol.ModelCard:
        return protocol.ModelCard(name=self.name, tag=self.tag, backend=backend or self.backend,
                                  architecture=self.architecture, family=self.family,
                                  labels=self.labels)

    def native_adapter(self) -> protocol.AdapterCard:
        return protocol.AdapterCard(served_name=self.id, parent=self.parent or "",
                                    **self.native().model_dump())

    def openai(self) -> oai.ModelCard:
        # As vLLM lists models: root is where the weights come from (here their store tag),
        # parent the base model an adapter adapts (none for a base model).
        return oai.ModelCard(id=self.id, created=self.created, tag=self.tag,
                             version=self.tag.partition(":")[2], kind=self.kind,
                             root=self.tag, parent=self.parent,
                             architecture=self.architecture, family=self.family)


def _family(architecture: str, kind: str) -> str:
    from lmm.families import entry_for

    entry = entry_for(architecture) if kind == "chat" else None
    return entry.name if entry else ""


# -- server-sent events --------------------------------------------------------------------
def sse(payload: dict | str | BaseModel) -> str:
    """One server-sent event."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json", exclude_none=False)
    data = payload if isinstance(payload, str) else _json(payload)
    return f"data: {data}\n\n"


class ChunkTemplate:
    """One stream chunk's JSON with a slot for its text, rendered once by the chunk's model. A
    token's chunk is then the two halves around ``json.dumps(text)``, instead of a model built,
    dumped and encoded for every token; the bytes are the same (tests/unit/test_adapters.py)."""

    SLOT = "\x00text\x00"  # a text no tokenizer produces

    def __init__(self, model: BaseModel):
        rendered = _json(model.model_dump(mode="json", exclude_none=False))
        self.before, slot, self.after = rendered.partition(json.dumps(self.SLOT))
        if not slot:
            raise ValueError("the model holds no ChunkTemplate.SLOT")

    def __call__(self, text: str) -> str:
        return self.before + json.dumps(text) + self.after


def _json(payload) -> str:
    return json.dumps(payload, separators=(",", ":"))


async def sse_stream(events: AsyncIterator[dict | BaseModel]) -> AsyncIterator[str]:
    """Frame events as SSE; once bytes are sent an error can only be a last event in the one
    error shape (``data: {"error": {...}}``); ``[DONE]`` ends every stream."""
    try:
        async for event in events:
            yield sse(event)
    except Exception as exc:
        logger.exception("stream failed")
        yield sse(error_response(exc)[1])
    yield sse("[DONE]")


async def primed(stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Start a stream now, so that what fails before its first item fails the request (an HTTP
    status) rather than the stream (an event after a 200)."""
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        return _empty()
    except BaseException:
        await stream.aclose()
        raise

    async def rest() -> AsyncIterator[Any]:
        try:
            yield first
            async for item in stream:
                yield item
        finally:
            await stream.aclose()

    return rest()


async def _empty() -> AsyncIterator[Any]:
    return
    yield
