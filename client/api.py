"""What each native route takes and returns: request building and response parsing, no I/O.

``Client`` and ``AsyncClient`` (``client.client``) only send the ``Call`` built here and hand the
JSON answer to its ``parse``, so the two clients cannot drift apart.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypedDict, TypeVar, Union

import httpx

try:  # PIL is optional: without it, images are paths or bytes
    from PIL import Image as _PILImage
except ImportError:  # pragma: no cover
    _PILImage = None

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ImageInput = Union[str, os.PathLike, bytes, "PILImage"]
DEFAULT_URL = "http://localhost:3000"
DEFAULT_TIMEOUT = 120.0
API_KEY_ENV = "LMM_API_KEY"
EMBED_BATCH_FALLBACK = 32  # when /model_info does not say images.max_embed_images
DONE = "[DONE]"
T = TypeVar("T")


# -- results -------------------------------------------------------------------------------
class ClientError(Exception):
    """The server refused or failed a request (``status_code`` 0: an error inside a stream).

    ``message``, ``type``, ``param`` and ``code`` are those of the server's error body,
    ``{"error": {"message", "type", "param", "code"}}``.
    """

    def __init__(self, message: str, status_code: int = 0, *, type: str | None = None,
                 param: str | None = None, code: str | None = None):
        super().__init__(f"{status_code}: {message}" if status_code else message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    @classmethod
    def from_body(cls, body: Any, status_code: int = 0, text: str = "") -> ClientError:
        """The error a body of the one error shape carries; anything else is shown as text."""
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return cls(text or json.dumps(body), status_code)
        return cls(error["message"], status_code, type=error.get("type"),
                   param=error.get("param"), code=error.get("code"))


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

    @classmethod
    def from_json(cls, payload: dict) -> StreamEvent:
        if "error" in payload:
            raise ClientError.from_body(payload)
        if "usage" in payload:
            return cls(usage=dict(payload["usage"]))
        return cls(text=payload.get("text", ""), index=payload.get("index", 0),
                   finish_reason=payload.get("finish_reason"))


@dataclass
class EmbedResult:
    """CLIP vectors (L2-normalized), one per text and one per image, in input order."""

    model: str
    dim: int
    text_embeddings: list[list[float]]
    image_embeddings: list[list[float]]

    @classmethod
    def from_json(cls, body: dict) -> EmbedResult:
        return cls(model=body["model"], dim=body["dim"], text_embeddings=body["text_embeddings"],
                   image_embeddings=body["image_embeddings"])

    @classmethod
    def concat(cls, parts: Sequence[EmbedResult]) -> EmbedResult:
        return cls(model=parts[0].model, dim=parts[0].dim,
                   text_embeddings=[v for p in parts for v in p.text_embeddings],
                   image_embeddings=[v for p in parts for v in p.image_embeddings])

    @property
    def count(self) -> int:
        return len(self.text_embeddings) + len(self.image_embeddings)


@dataclass
class RankResult:
    """One ranked candidate: its position in the ``candidates`` passed, kind and score."""

    index: int
    kind: str  # "text" or "image"
    score: float  # cosine similarity to the query
    text: str | None = None


# -- requests ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Call(Generic[T]):
    """One POST: its route, the httpx keyword arguments, and how to read the JSON answer."""

    path: str
    kwargs: dict[str, Any]
    parse: Callable[[Any], T]


class GenerateParams(TypedDict, total=False):
    """Parameters of generate and stream; unset (or None) ones take the server's defaults."""

    max_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    do_sample: bool | None  # False: greedy (temperature 0); True: temperature 1 unless set
    num_return_sequences: int
    stop: str | list[str] | None
    seed: int | None
    system_prompt: str | None


def http_options(url: str, timeout: float, api_key: str | None) -> dict[str, Any]:
    """httpx client options; the API key (argument, else $LMM_API_KEY) as a bearer token."""
    key = api_key or os.environ.get(API_KEY_ENV)
    return {"base_url": url.rstrip("/"), "timeout": timeout,
            "headers": {"Authorization": f"Bearer {key}"} if key else {}}


def check(response: httpx.Response) -> None:
    """Raise ``ClientError`` for a non-2xx response (its body read)."""
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    raise ClientError.from_body(body, response.status_code,
                                response.text or response.reason_phrase)


def sse(line: str) -> Any:
    """The JSON payload of one ``data:`` line; None for other lines; ``DONE`` at the end."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return DONE if data == DONE else json.loads(data)


def image_bytes(image: ImageInput, i: int = 0) -> tuple[str, bytes, str]:
    """(filename, bytes, content type) of one image given as a path, bytes or PIL image."""
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


def _b64(image: ImageInput, i: int = 0) -> str:
    return base64.b64encode(image_bytes(image, i)[1]).decode()


def _body(fields: dict[str, Any], images: Sequence[ImageInput] | None) -> dict[str, Any]:
    """JSON, or multipart (JSON-encoded fields, images as files) when there are images."""
    if not images:
        return {"json": fields}
    # BentoML's multipart parser json-decodes each field; encoding them keeps "42" a string.
    data = {k: json.dumps(v) for k, v in fields.items()}
    return {"data": data, "files": [("images", image_bytes(im, i)) for i, im in enumerate(images)]}


def _generate_fields(prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(GenerateParams.__annotations__)
    if unknown:
        raise TypeError(f"unknown generate parameter(s): {', '.join(sorted(unknown))}")
    params = {k: v for k, v in params.items() if v is not None}
    do_sample = params.pop("do_sample", None)
    if do_sample is False:
        params["temperature"] = 0.0
    elif do_sample and not params.get("temperature"):
        params["temperature"] = 1.0
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    return {"prompt": prompt, "n": params.pop("num_return_sequences", 1), **params}


def generate(prompt: str, images: Sequence[ImageInput] | None,
             params: GenerateParams) -> Call[GenerateResult]:
    return Call("/generate", _body(_generate_fields(prompt, dict(params)), images),
                GenerateResult.from_json)


def stream(prompt: str, images: Sequence[ImageInput] | None, params: GenerateParams,
           one_sequence: bool = False) -> Call[StreamEvent]:
    """/generate_stream; ``parse`` reads one event (and raises on an error event)."""
    if one_sequence and params.get("num_return_sequences", 1) != 1:
        raise ValueError("generate_stream streams one sequence; use stream() for several")
    return Call("/generate_stream", _body(_generate_fields(prompt, dict(params)), images),
                StreamEvent.from_json)


def model_info() -> Call[dict]:
    return Call("/model_info", {"json": {}}, dict)


def embed_batch_size(info: dict) -> int:
    """Items per /embed request: the server's images.max_embed_images."""
    return int((info.get("images") or {}).get("max_embed_images") or EMBED_BATCH_FALLBACK)


def embed(texts: Sequence[str] | None, images: Sequence[ImageInput] | None,
          batch_size: int) -> list[Call[EmbedResult]]:
    """/embed requests of at most ``batch_size`` texts and ``batch_size`` images each, in order
    (``EmbedResult.concat`` of their answers is the answer for all)."""
    texts, images = list(texts or []), list(images or [])
    if not texts and not images:
        raise ValueError("embed() needs texts and/or images")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    calls = []
    for start in range(0, max(len(texts), len(images)), batch_size):
        part = slice(start, start + batch_size)
        calls.append(Call("/embed", _body({"texts": texts[part]}, images[part]),
                          EmbedResult.from_json))
    return calls


def rank(query: str | ImageInput, candidates: Sequence[str | ImageInput]) -> Call[list[RankResult]]:
    """/rank: a str is text, anything else an image (a path as ``pathlib.Path``)."""
    if not candidates:
        raise ValueError("rank() needs at least one candidate")
    body: dict[str, Any] = ({"query": query} if isinstance(query, str)
                            else {"query_image_b64": _b64(query)})
    texts = [i for i, c in enumerate(candidates) if isinstance(c, str)]
    pictures = [i for i, c in enumerate(candidates) if not isinstance(c, str)]
    if texts:
        body["candidates"] = [candidates[i] for i in texts]
    if pictures:
        body["candidate_images_b64"] = [_b64(candidates[i], i) for i in pictures]

    def parse(answer: dict) -> list[RankResult]:
        where = {"text": texts, "image": pictures}
        return [RankResult(index=where[r["kind"]][r["index"]], kind=r["kind"],
                           score=r["score"], text=r.get("text"))
                for r in answer["results"]]

    return Call("/rank", {"json": body}, parse)
