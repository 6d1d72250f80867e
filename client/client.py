"""Sync and async Python clients of the native bento-lmm API (/generate, /embed, ...).

Images may be paths, bytes or PIL images; they travel as multipart file uploads. Any non-2xx
answer, and an error event inside a stream, raises ``ClientError`` with the server's message.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence, Union

import httpx

try:  # PIL is optional for the client
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

ImageInput = Union[str, os.PathLike, bytes, "_PILImage.Image"]
DEFAULT_TIMEOUT = 120.0


class ClientError(Exception):
    """The server refused or failed a request (``status_code`` 0: an error inside a stream)."""

    def __init__(self, message: str, status_code: int = 0, param: str | None = None):
        super().__init__(f"{status_code}: {message}" if status_code else message)
        self.message = message
        self.status_code = status_code
        self.param = param


@dataclass
class GenerateResult:
    """What /generate returned: the first completion, every completion and token usage."""

    text: str
    finish_reason: str | None
    texts: list[str]
    finish_reasons: list[str | None]
    usage: dict[str, int]
    model: str

    @classmethod
    def from_json(cls, body: dict) -> GenerateResult:
        completions = body.get("completions") or [
            {"text": body["text"], "finish_reason": body.get("finish_reason")}]
        return cls(text=body["text"], finish_reason=body.get("finish_reason"),
                   texts=[c["text"] for c in completions],
                   finish_reasons=[c.get("finish_reason") for c in completions],
                   usage=dict(body.get("usage") or {}), model=body.get("model", ""))


@dataclass
class StreamEvent:
    """One /generate_stream event: a text delta, a finish reason, or the final usage."""

    text: str = ""
    index: int = 0
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)


@dataclass
class EmbedResult:
    model: str
    dim: int
    text_embeddings: list[list[float]]
    image_embeddings: list[list[float]]


def _image_file(image: ImageInput, i: int) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) of one image for a multipart upload."""
    if _PILImage is not None and isinstance(image, _PILImage.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return f"image{i}.png", buffer.getvalue(), "image/png"
    if isinstance(image, (bytes, bytearray)):
        data, name = bytes(image), f"image{i}"
    elif isinstance(image, (str, os.PathLike)):
        path = Path(image)
        data, name = path.read_bytes(), path.name
    else:
        raise TypeError(f"image {i}: expected a path, bytes or a PIL image, got {type(image)}")
    kind = ("image/png" if data.startswith(b"\x89PNG") else
            "image/jpeg" if data.startswith(b"\xff\xd8") else "application/octet-stream")
    return name, data, kind


def _request(fields: dict[str, Any], images: Sequence[ImageInput] | None) -> dict[str, Any]:
    """httpx keyword arguments: JSON, or multipart (JSON-encoded fields) when there are images."""
    if not images:
        return {"json": fields}
    # BentoML's multipart parser json-decodes each field; encoding them keeps "42" a string.
    data = {k: json.dumps(v) for k, v in fields.items()}
    return {"data": data, "files": [("images", _image_file(im, i)) for i, im in enumerate(images)]}


def _generate_fields(prompt: str, max_tokens: int | None, temperature: float | None,
                     top_k: int | None, top_p: float | None, repetition_penalty: float | None,
                     do_sample: bool | None, num_return_sequences: int, stop: str | list | None,
                     seed: int | None, system_prompt: str | None) -> dict[str, Any]:
    if do_sample is False:
        temperature = 0.0
    elif do_sample and not temperature:
        temperature = 1.0
    fields: dict[str, Any] = {"prompt": prompt, "n": num_return_sequences}
    optional = {"max_tokens": max_tokens, "temperature": temperature, "top_k": top_k,
                "top_p": top_p, "repetition_penalty": repetition_penalty, "seed": seed,
                "system_prompt": system_prompt,
                "stop": [stop] if isinstance(stop, str) else stop}
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields


def error_message(body: Any) -> tuple[str, str | None]:
    """The message (and param) of a BentoML or OpenAI-style error body."""
    if isinstance(body, list) and body and isinstance(body[0], dict):
        body = body[0]
    if isinstance(body, dict):
        error = body.get("error", body.get("detail"))
        if isinstance(error, dict):
            return str(error.get("message", error)), error.get("param")
        detail = body.get("detail")
        if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
            locs = [".".join(map(str, d.get("loc", []))) for d in detail]
            issues = "; ".join(f"{loc}: {d.get('msg')}" for loc, d in zip(locs, detail))
            return issues, locs[0] or None
        if error is not None:
            return str(error), None
    return str(body), None


def raise_for_status(response: httpx.Response) -> None:
    """ClientError carrying the server's message for any non-2xx response (body read)."""
    if response.is_success:
        return
    try:
        message, param = error_message(response.json())
    except ValueError:
        message, param = response.text or response.reason_phrase, None
    raise ClientError(message, response.status_code, param)


def parse_sse(line: str) -> Any:
    """The JSON payload of one ``data:`` line; None for other lines; "[DONE]" as is."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return data if data == "[DONE]" else json.loads(data)


def _event(payload: dict) -> StreamEvent:
    if "error" in payload:
        message, param = error_message(payload)
        raise ClientError(message, 0, param)
    if "usage" in payload:
        return StreamEvent(usage=dict(payload["usage"]))
    return StreamEvent(text=payload.get("text", ""), index=payload.get("index", 0),
                       finish_reason=payload.get("finish_reason"))


def _one_sequence(params: dict[str, Any]) -> None:
    if params.get("num_return_sequences", 1) != 1:
        raise ValueError("generate_stream streams one sequence; use stream() for several")


def _embed_result(body: dict) -> EmbedResult:
    return EmbedResult(model=body["model"], dim=body["dim"],
                       text_embeddings=body["text_embeddings"],
                       image_embeddings=body["image_embeddings"])


def _embed_fields(texts: Sequence[str] | None, images: Sequence[ImageInput] | None) -> dict:
    if not texts and not images:
        raise ValueError("embed() needs texts and/or images")
    return {"texts": list(texts or [])}


class Client:
    """Blocking client: ``Client(url).generate("What shape is this?", images=[img])``."""

    def __init__(self, url: str = "http://localhost:3000", timeout: float = DEFAULT_TIMEOUT):
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, **kwargs: Any) -> Any:
        response = self._http.post(path, **kwargs)
        raise_for_status(response)
        return response.json()

    def generate(self, prompt: str, images: Sequence[ImageInput] | None = None,
                 max_tokens: int | None = None, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, do_sample: bool | None = None,
                 num_return_sequences: int = 1, stop: str | list[str] | None = None,
                 seed: int | None = None, system_prompt: str | None = None) -> GenerateResult:
        """Generate text for a prompt and 0..N images (server defaults for unset parameters)."""
        fields = _generate_fields(prompt, max_tokens, temperature, top_k, top_p,
                                  repetition_penalty, do_sample, num_return_sequences, stop,
                                  seed, system_prompt)
        return GenerateResult.from_json(self._post("/generate", **_request(fields, images)))

    def stream(self, prompt: str, images: Sequence[ImageInput] | None = None,
               **params: Any) -> Iterator[StreamEvent]:
        """Every /generate_stream event (deltas, finish reasons, then usage)."""
        fields = _generate_fields(prompt, **{**_STREAM_DEFAULTS, **params})
        with self._http.stream("POST", "/generate_stream", **_request(fields, images)) as resp:
            if not resp.is_success:
                resp.read()
                raise_for_status(resp)
            for line in resp.iter_lines():
                payload = parse_sse(line)
                if payload == "[DONE]":
                    return
                if payload is not None:
                    yield _event(payload)

    def generate_stream(self, prompt: str, images: Sequence[ImageInput] | None = None,
                        **params: Any) -> Iterator[str]:
        """Text deltas of one completion as they are generated (same parameters as generate)."""
        _one_sequence(params)
        for event in self.stream(prompt, images, **params):
            if event.text:
                yield event.text

    def embed(self, texts: Sequence[str] | None = None,
              images: Sequence[ImageInput] | None = None) -> EmbedResult:
        """CLIP embeddings (L2-normalized) of texts and/or images."""
        fields = _embed_fields(texts, images)
        return _embed_result(self._post("/embed", **_request(fields, images)))

    def model_info(self) -> dict[str, Any]:
        """Served models (store tags), limits and backends."""
        return self._post("/model_info", json={})

    def health(self) -> bool:
        """Whether the server answers /readyz with 200."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False


class AsyncClient:
    """Asyncio client with the same methods as ``Client`` (streams are async iterators)."""

    def __init__(self, url: str = "http://localhost:3000", timeout: float = DEFAULT_TIMEOUT):
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, **kwargs: Any) -> Any:
        response = await self._http.post(path, **kwargs)
        raise_for_status(response)
        return response.json()

    async def generate(self, prompt: str, images: Sequence[ImageInput] | None = None,
                       max_tokens: int | None = None, temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None,
                       repetition_penalty: float | None = None, do_sample: bool | None = None,
                       num_return_sequences: int = 1, stop: str | list[str] | None = None,
                       seed: int | None = None, system_prompt: str | None = None
                       ) -> GenerateResult:
        """Generate text for a prompt and 0..N images."""
        fields = _generate_fields(prompt, max_tokens, temperature, top_k, top_p,
                                  repetition_penalty, do_sample, num_return_sequences, stop,
                                  seed, system_prompt)
        body = await self._post("/generate", **_request(fields, images))
        return GenerateResult.from_json(body)

    async def stream(self, prompt: str, images: Sequence[ImageInput] | None = None,
                     **params: Any) -> AsyncIterator[StreamEvent]:
        """Every /generate_stream event (deltas, finish reasons, then usage)."""
        fields = _generate_fields(prompt, **{**_STREAM_DEFAULTS, **params})
        async with self._http.stream("POST", "/generate_stream",
                                     **_request(fields, images)) as resp:
            if not resp.is_success:
                await resp.aread()
                raise_for_status(resp)
            async for line in resp.aiter_lines():
                payload = parse_sse(line)
                if payload == "[DONE]":
                    return
                if payload is not None:
                    yield _event(payload)

    async def generate_stream(self, prompt: str, images: Sequence[ImageInput] | None = None,
                              **params: Any) -> AsyncIterator[str]:
        """Text deltas of one completion as they are generated."""
        _one_sequence(params)
        async for event in self.stream(prompt, images, **params):
            if event.text:
                yield event.text

    async def embed(self, texts: Sequence[str] | None = None,
                    images: Sequence[ImageInput] | None = None) -> EmbedResult:
        """CLIP embeddings (L2-normalized) of texts and/or images."""
        fields = _embed_fields(texts, images)
        return _embed_result(await self._post("/embed", **_request(fields, images)))

    async def model_info(self) -> dict[str, Any]:
        """Served models (store tags), limits and backends."""
        return await self._post("/model_info", json={})

    async def health(self) -> bool:
        """Whether the server answers /readyz with 200."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.HTTPError:
            return False


_STREAM_DEFAULTS: dict[str, Any] = dict(
    max_tokens=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None,
    do_sample=None, num_return_sequences=1, stop=None, seed=None, system_prompt=None)
