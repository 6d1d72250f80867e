"""Request and response models of the OpenAI-compatible API (``/v1``).

Requests ignore fields they do not know (clients send many); fields that would change the
result but are not supported are declared so the routes can refuse them with a clear 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lmm.protocol import Usage


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# -- chat messages -------------------------------------------------------------------------
class TextPart(_Request):
    type: Literal["text"] = Field(description="A piece of text.")
    text: str = Field(description="The text.")


class ImageURL(_Request):
    url: str = Field(
        description="`data:image/...;base64,...`, or an http(s) URL on the server's allow-list."
    )
    detail: str | None = Field(None, description="Accepted and ignored.")


class ImagePart(_Request):
    type: Literal["image_url"] = Field(description="An image.")
    image_url: ImageURL | str = Field(description="The image URL (an object, or a bare string).")

    @property
    def url(self) -> str:
        """The URL, whichever form it was sent in."""
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who wrote the message; `developer` is treated as `system`."
    )
    content: str | list[ContentPart] | None = Field(
        None, description="Text, or a list of `text` and `image_url` parts (user messages)."
    )
    name: str | None = Field(None, description="Accepted and ignored.")
    tool_calls: list[dict[str, Any]] | None = Field(None, description="Not supported.")


class StreamOptions(_Request):
    include_usage: bool = Field(
        False, description="Send a last chunk with `usage` and no choices before `[DONE]`."
    )


class ResponseFormat(_Request):
    type: str = Field("text", description="Only `text` is supported.")


# -- requests ------------------------------------------------------------------------------
class SamplingRequest(_Request):
    """Fields shared by chat and text completions."""

    model: str = Field(description="Must be the server's `served_model_name` (see /v1/models).")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Default 1.0; 0 means greedy decoding."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    n: int | None = Field(None, ge=1, description="Completions to generate (default 1).")
    stop: str | list[str] | None = Field(None, description="Strings that end generation.")
    seed: int | None = Field(None, description="Makes sampling reproducible.")
    stream: bool | None = Field(False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    frequency_penalty: float | None = Field(None, description="Not supported: must be 0.")
    presence_penalty: float | None = Field(None, description="Not supported: must be 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported.")
    top_k: int | None = Field(
        None, ge=0, description="Extension: keep the k most likely tokens; 0 disables."
    )
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="Extension: HF-style repetition penalty; 1 disables."
    )
    ignore_eos: bool = Field(
        False, description="Extension (as in vLLM): keep generating past end-of-sequence."
    )
    user: str | None = Field(None, description="Accepted and ignored.")


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most (takes precedence over max_tokens)."
    )
    logprobs: bool | None = Field(None, description="Not supported.")
    top_logprobs: int | None = Field(None, description="Not supported.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported.")
    tool_choice: Any = Field(None, description="Only `none` (or `auto`: no tools) is supported.")
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported.")
    response_format: ResponseFormat | None = Field(None, description="Only `text`.")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions; the prompt is one user turn through the model's chat template."""

    prompt: str | list[str] = Field(description="One prompt (a string or a list of one).")
    echo: bool | None = Field(False, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, description="Not supported above 1.")
    logprobs: int | None = Field(None, description="Not supported.")


class ImageInput(_Request):
    image: str = Field(description="Extension: an image as a data URL (or base64) to embed.")


class EmbeddingRequest(_Request):
    """POST /v1/embeddings; images are an extension (data URL strings or `{"image": ...}`)."""

    model: str = Field(description="The served model name or the embedding model's name.")
    input: str | list[str | ImageInput] = Field(
        description="Text(s) to embed; an item `data:image/...;base64,...` or "
        '`{"image": "<data URL>"}` is embedded as an image into the same space.'
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: little-endian float32 bytes, base64 encoded."
    )
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's dimension.")
    user: str | None = Field(None, description="Accepted and ignored.")


# -- responses -----------------------------------------------------------------------------
class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="The generated text.")


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None = Field(description="`stop`, `length` or `abort`.")
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time.")
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = Field(None, description="The model's store tag.")


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, str] = Field(description="`role` (first chunk) and/or `content`.")
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, description="Only on the last chunk, with include_usage.")
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class TextCompletion(BaseModel):
    """A text completion, or one chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str = Field(description="The name clients pass as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="When the model entered the store (Unix time).")
    owned_by: str = "bento-lmm"
    tag: str = Field(description="Extension: the BentoML model-store tag (name:version).")
    version: str = Field(description="Extension: the store version of the weights.")
    kind: Literal["chat", "embedding"] = Field(description="Extension: what it serves.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of float32 bytes.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
