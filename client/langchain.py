"""LangChain models over a bento-lmm server.

``BentoLMM`` (an ``LLM``) calls the native /generate and /generate_stream routes through
``client.Client``. ``ChatBentoLMM`` (a ``BaseChatModel``) calls /v1/chat/completions, so
multi-turn chats with images (LangChain image blocks or OpenAI ``image_url`` parts) map 1:1.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Iterator

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.block_translators.openai import convert_to_openai_image_block
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from client.client import AsyncClient, Client, ClientError, parse_sse, raise_for_status

logger = logging.getLogger(__name__)
DEFAULT_URL = "http://localhost:3000"
PROVIDER = "bento-lmm"


# -- LLM (native API) ----------------------------------------------------------------------
class BentoLMM(LLM):
    """Text completion with a bento-lmm server's native API (greedy by default)."""

    base_url: str = Field(DEFAULT_URL, description="The server, without /v1.")
    timeout: float = 120.0
    max_tokens: int | None = Field(None, description="None: the server's default.")
    temperature: float = Field(0.0, description="0 is greedy decoding.")
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    system_prompt: str | None = None
    stop: list[str] | None = None
    _info: dict[str, Any] | None = PrivateAttr(None)

    @property
    def _llm_type(self) -> str:
        return "bento-lmm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        if self._info is None:
            try:
                with Client(self.base_url, timeout=min(self.timeout, 5.0)) as client:
                    self._info = client.model_info()
            except (httpx.HTTPError, ClientError) as exc:
                logger.warning("could not read %s/model_info: %s", self.base_url, exc)
        info = self._info or {}
        tag = info.get("llm", {}).get("tag", "")
        return {"base_url": self.base_url, "model": info.get("served_model_name"),
                "model_tag": tag or None, "model_version": tag.partition(":")[2] or None,
                **self._params()}

    def _params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                  "repetition_penalty": self.repetition_penalty,
                  "system_prompt": self.system_prompt, "stop": stop or self.stop}
        params.update({k: v for k, v in kwargs.items() if k in params})
        return params

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        with Client(self.base_url, timeout=self.timeout) as client:
            return client.generate(prompt, **self._params(stop, **kwargs)).text

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None,
                     **kwargs: Any) -> str:
        async with AsyncClient(self.base_url, timeout=self.timeout) as client:
            return (await client.generate(prompt, **self._params(stop, **kwargs))).text

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        with Client(self.base_url, timeout=self.timeout) as client:
            for event in client.stream(prompt, **self._params(stop, **kwargs)):
                chunk = _generation_chunk(event)
                if run_manager and event.text:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async with AsyncClient(self.base_url, timeout=self.timeout) as client:
            async for event in client.stream(prompt, **self._params(stop, **kwargs)):
                chunk = _generation_chunk(event)
                if run_manager and event.text:
                    await run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk


def _generation_chunk(event: Any) -> GenerationChunk:
    info: dict[str, Any] = {}
    if event.finish_reason:
        info["finish_reason"] = event.finish_reason
    if event.usage:
        info["usage"] = event.usage
    return GenerationChunk(text=event.text, generation_info=info or None)


# -- chat model (OpenAI-compatible API) ----------------------------------------------------
def _part(block: Any) -> dict[str, Any]:
    """One OpenAI chat content part from a LangChain content block (text or image)."""
    if isinstance(block, str):
        return {"type": "text", "text": block}
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": block["text"]}
    if kind == "image_url":
        url = block["image_url"]
        return {"type": "image_url", "image_url": {"url": url} if isinstance(url, str) else url}
    if kind == "image":
        return convert_to_openai_image_block(block)
    raise ValueError(f"content block of type {kind!r} is not supported (text and images only)")


def to_openai_message(message: BaseMessage) -> dict[str, Any]:
    """An OpenAI chat message for a LangChain message (no tool messages: not supported)."""
    if isinstance(message, SystemMessage):
        return {"role": "system", "content": message.text}
    if isinstance(message, AIMessage):
        if message.tool_calls:
            raise ValueError("tool calls are not supported by bento-lmm")
        return {"role": "assistant", "content": message.text}
    if isinstance(message, HumanMessage):
        content = message.content
        if isinstance(content, str):
            return {"role": "user", "content": content}
        return {"role": "user", "content": [_part(block) for block in content]}
    if isinstance(message, ChatMessage) and message.role in ("system", "user", "assistant"):
        return {"role": message.role, "content": message.text}
    raise ValueError(f"{type(message).__name__} is not supported by bento-lmm (no tools)")


def _usage(body: dict[str, Any] | None) -> UsageMetadata | None:
    if not body:
        return None
    return UsageMetadata(input_tokens=body.get("prompt_tokens", 0),
                         output_tokens=body.get("completion_tokens", 0),
                         total_tokens=body.get("total_tokens", 0))


class ChatBentoLMM(BaseChatModel):
    """Chat (text + images) with a bento-lmm server through its /v1/chat/completions route."""

    model_config = ConfigDict(populate_by_name=True)

    base_url: str = Field(DEFAULT_URL, description="The server, without /v1.")
    model_name: str = Field("shapes-llava", alias="model",
                            description="The server's served_model_name.")
    temperature: float | None = Field(0.0, description="0 is greedy; None: server default.")
    max_tokens: int | None = Field(None, description="None: the server's default.")
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    timeout: float | None = 120.0
    max_retries: int = Field(2, description="Retries of failed connections.")
    api_key: SecretStr | None = Field(None, description="Sent as a bearer token if set.")
    streaming: bool = False
    _model_card: dict[str, Any] | None = PrivateAttr(None)

    @property
    def _llm_type(self) -> str:
        return "bento-lmm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        card = self._card()
        return {"base_url": self.base_url, "model": self.model_name,
                "model_tag": card.get("tag"), "model_version": card.get("version"),
                **self._sampling()}

    def _card(self) -> dict[str, Any]:
        """The served model's entry in /v1/models (store tag and version), read once."""
        if self._model_card is None:
            try:
                with self._client(timeout=5.0) as http:
                    response = http.get("/v1/models")
                    raise_for_status(response)
                cards = [m for m in response.json()["data"] if m["id"] == self.model_name]
                self._model_card = cards[0] if cards else {}
            except (httpx.HTTPError, ClientError, KeyError, ValueError) as exc:
                logger.warning("could not read %s/v1/models: %s", self.base_url, exc)
                return {}
        return self._model_card

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=PROVIDER, ls_model_type="chat",
                                 ls_model_name=kwargs.get("model") or self.model_name)
        temperature = kwargs.get("temperature", self.temperature)
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if temperature is not None:
            params["ls_temperature"] = temperature
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "repetition_penalty": self.repetition_penalty}

    def _headers(self) -> dict[str, str]:
        key = self.api_key.get_secret_value() if self.api_key else ""
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _client(self, timeout: float | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self._headers(),
                            timeout=timeout or self.timeout,
                            transport=httpx.HTTPTransport(retries=self.max_retries))

    def _aclient(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base_url, headers=self._headers(),
                                 timeout=self.timeout,
                                 transport=httpx.AsyncHTTPTransport(retries=self.max_retries))

    def _payload(self, messages: list[BaseMessage], stop: list[str] | None, stream: bool,
                 **kwargs: Any) -> dict[str, Any]:
        sampling = {**self._sampling(),
                    **{k: v for k, v in kwargs.items() if k in self._sampling()}}
        body: dict[str, Any] = {
            "model": kwargs.get("model") or self.model_name,
            "messages": [to_openai_message(m) for m in messages],
            **{k: v for k, v in sampling.items() if v is not None},
        }
        if stop or self.stop:
            body["stop"] = stop or self.stop
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    def _result(self, body: dict[str, Any]) -> ChatResult:
        choice = body["choices"][0]
        meta = {"model_name": body.get("model", self.model_name), "model_provider": PROVIDER,
                "finish_reason": choice.get("finish_reason"),
                "system_fingerprint": body.get("system_fingerprint")}
        message = AIMessage(content=choice["message"]["content"] or "", id=body.get("id"),
                            usage_metadata=_usage(body.get("usage")), response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(
            message=message, generation_info={"finish_reason": choice.get("finish_reason")})],
            llm_output={"model_name": meta["model_name"], "token_usage": body.get("usage")})

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None,
                  **kwargs: Any) -> ChatResult:
        with self._client() as http:
            response = http.post("/v1/chat/completions",
                                 json=self._payload(messages, stop, False, **kwargs))
        raise_for_status(response)
        return self._result(response.json())

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None,
                         **kwargs: Any) -> ChatResult:
        async with self._aclient() as http:
            response = await http.post("/v1/chat/completions",
                                       json=self._payload(messages, stop, False, **kwargs))
        raise_for_status(response)
        return self._result(response.json())

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        state = _StreamState(self.model_name)
        body = self._payload(messages, stop, True, **kwargs)
        with self._client() as http, http.stream("POST", "/v1/chat/completions",
                                                  json=body) as response:
            if not response.is_success:
                response.read()
                raise_for_status(response)
            for line in response.iter_lines():
                chunk = state.push(parse_sse(line))
                if chunk is not None:
                    if run_manager:
                        run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        yield state.last()

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        state = _StreamState(self.model_name)
        body = self._payload(messages, stop, True, **kwargs)
        async with self._aclient() as http, http.stream("POST", "/v1/chat/completions",
                                                         json=body) as response:
            if not response.is_success:
                await response.aread()
                raise_for_status(response)
            async for line in response.aiter_lines():
                chunk = state.push(parse_sse(line))
                if chunk is not None:
                    if run_manager:
                        await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                    yield chunk
        yield state.last()


class _StreamState:
    """Turns chat.completion.chunk payloads into message chunks; usage and metadata go last."""

    def __init__(self, model: str):
        self.model = model
        self.finish_reason: str | None = None
        self.usage: UsageMetadata | None = None
        self.id: str | None = None
        self.fingerprint: str | None = None

    def push(self, payload: Any) -> ChatGenerationChunk | None:
        if not isinstance(payload, dict):
            return None
        if "error" in payload:
            error = payload["error"]
            raise ClientError(error.get("message", str(error)), 0, error.get("param"))
        self.id = payload.get("id", self.id)
        self.model = payload.get("model", self.model)
        self.fingerprint = payload.get("system_fingerprint", self.fingerprint)
        self.usage = _usage(payload.get("usage")) or self.usage
        text = ""
        for choice in payload.get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if not text:
            return None
        return ChatGenerationChunk(message=AIMessageChunk(content=text, id=self.id))

    def last(self) -> ChatGenerationChunk:
        meta = {"model_name": self.model, "model_provider": PROVIDER,
                "finish_reason": self.finish_reason, "system_fingerprint": self.fingerprint}
        message = AIMessageChunk(content="", id=self.id, usage_metadata=self.usage,
                                 response_metadata=meta, chunk_position="last")
        return ChatGenerationChunk(message=message,
                                   generation_info={"finish_reason": self.finish_reason})
