"""Request and response models of the OpenAI-compatible API (``/v1``).

Requests ignore fields they do not know (clients send many); fields that would change the
result but are not supported are declared so the routes can refuse them with a clear 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from lmm.config import LMMConfig
from lmm.errors import BadRequest, Unsupported
from lmm.protocol import (
    MaxTokens,
    RepetitionPenalty,
    RequestTimeout,
    SamplingParams,
    Seed,
    Temperature,
    TopK,
    TopP,
    Usage,
)


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

    model: str = Field(description="The server's `served_model_name`, or one of its LoRA "
                       "adapters' names (see /v1/models).")
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = Field(None, description="Default 1.0; 0 means greedy.")
    top_p: TopP | None = None
    n: int | None = Field(None, ge=1, description="Completions to generate (default 1).")
    stop: str | list[str] | None = Field(None, description="Strings that end generation.")
    seed: Seed | None = None
    stream: bool | None = Field(False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options.")
    frequency_penalty: float | None = Field(None, description="Not supported: must be 0.")
    presence_penalty: float | None = Field(None, description="Not supported: must be 0.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported.")
    top_k: TopK | None = Field(None, description="Extension: keep the k most likely tokens.")
    repetition_penalty: RepetitionPenalty | None = Field(None, description="Extension.")
    ignore_eos: bool = Field(
        False, description="Extension (as in vLLM): keep generating past end-of-sequence."
    )
    timeout: RequestTimeout | None = None
    user: str | None = Field(None, description="Accepted and ignored.")

    def requested_max_tokens(self) -> tuple[str, int | None]:
        """The field that sets the token budget, and its value."""
        return "max_tokens", self.max_tokens

    def refuse_unsupported(self) -> None:
        """A 400 for fields that would change the result but are not implemented."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise Unsupported(f"{name} is not supported (send 0 or omit it); "
                                  "repetition_penalty is available as an extension.", name)
        if self.logit_bias:
            raise Unsupported("logit_bias is not supported.", "logit_bias")

    def sampling(self, config: LMMConfig) -> tuple[SamplingParams, list[str], int]:
        """SamplingParams, stop strings and n of this request, within the server's limits."""
        self.refuse_unsupported()
        name, max_tokens = self.requested_max_tokens()
        max_tokens = max_tokens or config.default_max_tokens
        if max_tokens > config.max_tokens_limit:
            raise BadRequest(f"{name} is {max_tokens}; at most {config.max_tokens_limit}.", name)
        n = self.n or 1
        if n > config.max_n:
            raise BadRequest(f"n is {n}; at most {config.max_n}.", "n")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 1.0,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )
        return params, [s for s in stop if s], n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: MaxTokens | None = Field(
        None, description="Tokens to generate at most (takes precedence over max_tokens)."
    )
    logprobs: bool | None = Field(None, description="Not supported.")
    top_logprobs: int | None = Field(None, description="Not supported.")
    tools: list[dict[str, Any]] | None = Field(None, description="Not supported.")
    tool_choice: Any = Field(None, description="Only `none` (or `auto`: no tools) is supported.")
    functions: list[dict[str, Any]] | None = Field(None, description="Not supported.")
    response_format: ResponseFormat | None = Field(None, description="Only `text`.")

    def requested_max_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens:
            return "max_completion_tokens", self.max_completion_tokens
        return super().requested_max_tokens()

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise Unsupported("logprobs are not supported.", "logprobs")
        if self.tools or self.functions:
            raise Unsupported("tools (function calling) are not supported by this model.",
                              "tools")
        if self.tool_choice not in (None, "none", "auto"):  # without tools, auto means none
            raise Unsupported("tool_choice is not supported (only 'none').", "tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise Unsupported(f"response_format {self.response_format.type!r} is not "
                              "supported; only 'text'.", "response_format")


class CompletionRequest(SamplingRequest):
    """POST /v1/completions; the prompt is one user turn through the model's chat template."""

    prompt: str | list[str] = Field(description="One prompt (a string or a list of one).")
    echo: bool | None = Field(False, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, description="Not supported above 1.")
    logprobs: int | None = Field(None, description="Not supported.")

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name) not in (None, False):
                raise Unsupported(f"{name} is not supported.", name)
        if self.best_of not in (None, 1):
            raise Unsupported("best_of is not supported.", "best_of")

    def single_prompt(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise BadRequest("send exactly one prompt per request.", "prompt")
        return prompts[0]


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
    root: str | None = Field(None, description="Where the weights come from: their store tag.")
    parent: str | None = Field(
        None, description="A LoRA adapter's base model (its `id`); none for a base model.")
    architecture: str = Field("", description="Extension: config.json's architecture.")
    family: str = Field("", description="Extension: the model family serving it (chat).")


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
