"""LangChain models over a bento-lmm server.

``ChatBentoLMM`` is langchain-openai's ``BaseChatOpenAI`` pointed at the server's
OpenAI-compatible ``/v1`` API, the way OpenAI-compatible providers ship their chat models
(``ChatDeepSeek``, ``ChatXAI``): messages, image blocks, streaming, usage and errors (the
``openai`` SDK's) are langchain-openai's. ``BentoLMM`` (an ``LLM``) is text completion over the
native /generate and /generate_stream routes, through ``client.Client``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LangSmithParams
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import ChatGenerationChunk, ChatResult, GenerationChunk
from langchain_core.utils import secret_from_env
from langchain_openai.chat_models.base import BaseChatOpenAI
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr, model_validator
from typing_extensions import Self

from client.api import API_KEY_ENV, DEFAULT_TIMEOUT, DEFAULT_URL, ClientError, StreamEvent
from client.client import AsyncClient, Client

logger = logging.getLogger(__name__)
PROVIDER = "bento-lmm"
NO_KEY = "EMPTY"  # the server needs no key unless it is configured with one
EXTENSIONS = ("top_k", "repetition_penalty", "ignore_eos")  # the server's, beyond OpenAI's


# -- chat model (OpenAI-compatible API) ----------------------------------------------------
class ChatBentoLMM(BaseChatOpenAI):
    """Chat (text + images) with a bento-lmm server through its /v1/chat/completions route.

    ``ChatBentoLMM(base_url="http://localhost:3000", model="shapes-llava")``; greedy
    (``temperature=0``) unless told otherwise. The API key is ``api_key``, else
    ``$LMM_API_KEY``, else a placeholder.
    """

    model_config = ConfigDict(populate_by_name=True)

    model_name: str = Field(default="shapes-llava", alias="model")
    """The server's served_model_name."""
    openai_api_base: str | None = Field(default=DEFAULT_URL, alias="base_url")
    """The server's root URL (``/v1`` is appended if missing)."""
    openai_api_key: SecretStr | None = Field(
        alias="api_key", default_factory=secret_from_env(API_KEY_ENV, default=NO_KEY))
    """Sent as ``Authorization: Bearer``."""
    temperature: float | None = 0.0
    top_k: int | None = None
    """Extension of the OpenAI API: sample from the k most likely tokens."""
    repetition_penalty: float | None = None
    """Extension of the OpenAI API: > 1 discourages repeating tokens."""
    stream_usage: bool | None = True
    use_responses_api: bool | None = False  # the server has no /v1/responses
    _model_card: dict[str, Any] | None = PrivateAttr(None)

    @property
    def _llm_type(self) -> str:
        return "bento-lmm-chat"

    @property
    def lc_secrets(self) -> dict[str, str]:
        return {"openai_api_key": API_KEY_ENV}

    @model_validator(mode="after")
    def validate_environment(self) -> Self:
        """openai SDK clients of this instance for the server's /v1 (not BaseChatOpenAI's
        process-wide cached ones, whose async connections outlive an event loop)."""
        if self.n is not None and (self.n < 1 or (self.n > 1 and self.streaming)):
            raise ValueError("n must be at least 1, and 1 when streaming")
        root = (self.openai_api_base or DEFAULT_URL).rstrip("/")
        self.openai_api_base = root if root.endswith("/v1") else root + "/v1"
        key = self.openai_api_key.get_secret_value() if self.openai_api_key else ""
        params: dict[str, Any] = {
            "api_key": key or NO_KEY, "base_url": self.openai_api_base,
            "timeout": self.request_timeout, "default_headers": self.default_headers,
            "default_query": self.default_query,
        }
        if self.max_retries is not None:
            params["max_retries"] = self.max_retries
        if not self.client:
            self.root_client = openai.OpenAI(**params, http_client=self.http_client)
            self.client = self.root_client.chat.completions
        if not self.async_client:
            self.root_async_client = openai.AsyncOpenAI(**params,
                                                        http_client=self.http_async_client)
            self.async_client = self.root_async_client.chat.completions
        return self

    @property
    def _default_params(self) -> dict[str, Any]:
        extensions = {"top_k": self.top_k, "repetition_penalty": self.repetition_penalty}
        return {**super()._default_params,
                **{k: v for k, v in extensions.items() if v is not None}}

    def _get_request_payload(self, input_: Any, *, stop: list[str] | None = None,
                             **kwargs: Any) -> dict:
        """The payload, with the server's extensions (set here or per call) in extra_body:
        the openai SDK takes only OpenAI's parameters."""
        payload = super()._get_request_payload(input_, stop=stop, **kwargs)
        extensions = {k: payload.pop(k) for k in EXTENSIONS if k in payload}
        if extensions:
            payload["extra_body"] = {**extensions, **(payload.get("extra_body") or {})}
        return payload

    @property
    def _identifying_params(self) -> dict[str, Any]:
        card = self._card()
        return {**super()._identifying_params, "base_url": self.openai_api_base,
                "model": self.model_name, "model_tag": card.get("tag"),
                "model_version": card.get("version")}

    def _card(self) -> dict[str, Any]:
        """The served model's entry in /v1/models (store tag and version), read once."""
        if self._model_card is None and self.root_client is not None:
            try:
                models = self.root_client.with_options(timeout=5.0, max_retries=0).models
                card = next((m for m in models.list() if m.id == self.model_name), None)
            except openai.OpenAIError as exc:
                logger.warning("could not read %s/models: %s", self.openai_api_base, exc)
                return {}
            self._model_card = card.model_dump() if card is not None else {}
        return self._model_card or {}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = PROVIDER
        return params

    def _create_chat_result(self, response: Any,
                            generation_info: dict | None = None) -> ChatResult:
        result = super()._create_chat_result(response, generation_info)
        for generation in result.generations:
            generation.message.response_metadata["model_provider"] = PROVIDER
        if result.llm_output:
            result.llm_output["model_provider"] = PROVIDER
        return result

    def _convert_chunk_to_generation_chunk(self, chunk: dict, default_chunk_class: type,
                                           base_generation_info: dict | None
                                           ) -> ChatGenerationChunk | None:
        generation = super()._convert_chunk_to_generation_chunk(
            chunk, default_chunk_class, base_generation_info)
        if generation is not None and generation.message.response_metadata:
            generation.message.response_metadata["model_provider"] = PROVIDER
        return generation


# -- LLM (native API) ----------------------------------------------------------------------
class BentoLMM(LLM):
    """Text completion with a bento-lmm server's native API (greedy by default)."""

    base_url: str = Field(DEFAULT_URL, description="The server, without /v1.")
    api_key: SecretStr | None = Field(default_factory=secret_from_env(API_KEY_ENV, default=None))
    timeout: float = DEFAULT_TIMEOUT
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
    def lc_secrets(self) -> dict[str, str]:
        return {"api_key": API_KEY_ENV}

    @property
    def _identifying_params(self) -> dict[str, Any]:
        if self._info is None:
            try:
                with self._client(timeout=min(self.timeout, 5.0)) as client:
                    self._info = client.model_info()
            except (ClientError, httpx.HTTPError) as exc:
                logger.warning("could not read %s/model_info: %s", self.base_url, exc)
        info = self._info or {}
        tag = info.get("llm", {}).get("tag", "")
        return {"base_url": self.base_url, "model": info.get("served_model_name"),
                "model_tag": tag or None, "model_version": tag.partition(":")[2] or None,
                **self._params()}

    def _client(self, cls: type = Client, timeout: float | None = None) -> Any:
        key = self.api_key.get_secret_value() if self.api_key else None
        return cls(self.base_url, timeout=timeout or self.timeout, api_key=key)

    def _params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        params = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                  "repetition_penalty": self.repetition_penalty,
                  "system_prompt": self.system_prompt, "stop": stop or self.stop}
        params.update({k: v for k, v in kwargs.items() if k in params})
        return params

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        with self._client() as client:
            return client.generate(prompt, **self._params(stop, **kwargs)).text

    async def _acall(self, prompt: str, stop: list[str] | None = None,
                     run_manager: AsyncCallbackManagerForLLMRun | None = None,
                     **kwargs: Any) -> str:
        async with self._client(AsyncClient) as client:
            return (await client.generate(prompt, **self._params(stop, **kwargs))).text

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None,
                **kwargs: Any) -> Iterator[GenerationChunk]:
        with self._client() as client:
            for event in client.stream(prompt, **self._params(stop, **kwargs)):
                chunk = _generation_chunk(event)
                if run_manager and event.text:
                    run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        async with self._client(AsyncClient) as client:
            async for event in client.stream(prompt, **self._params(stop, **kwargs)):
                chunk = _generation_chunk(event)
                if run_manager and event.text:
                    await run_manager.on_llm_new_token(event.text, chunk=chunk)
                yield chunk


def _generation_chunk(event: StreamEvent) -> GenerationChunk:
    info: dict[str, Any] = {}
    if event.finish_reason:
        info["finish_reason"] = event.finish_reason
    if event.usage:
        info["usage"] = event.usage
    return GenerationChunk(text=event.text, generation_info=info or None)
