"""langchain-tests' standard suites for ChatBentoLMM (unit: no server; integration: the shared
server). Declared: image inputs (base64), usage metadata; no tools, structured output, JSON
mode, image URLs (off by default on the server), PDF, audio or video."""

from __future__ import annotations

import io

import httpx
import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from client.langchain import ChatBentoLMM
from models.shapes.data import make_samples

pytestmark = pytest.mark.integration


class _Declared:
    @property
    def chat_model_class(self) -> type[ChatBentoLMM]:
        return ChatBentoLMM

    @property
    def has_tool_calling(self) -> bool:
        return False  # BaseChatOpenAI can bind tools; the server refuses them

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def supports_image_urls(self) -> bool:
        return False  # only with images.allowed_url_domains, never for the test's github URL

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one served model


class TestChatBentoLMMUnit(_Declared, ChatModelUnitTests):
    @property
    def chat_model_params(self) -> dict:
        return {"base_url": "http://127.0.0.1:9", "model": "shapes-llava"}


def _local_png() -> bytes:
    buffer = io.BytesIO()
    make_samples(1, 5)[0].image.save(buffer, format="PNG")
    return buffer.getvalue()


class TestChatBentoLMMIntegration(_Declared, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _server(self, url: str, monkeypatch) -> None:
        """The shared server; test_image_inputs' image download is answered locally."""
        self.url = url
        png = _local_png()
        monkeypatch.setattr("langchain_tests.integration_tests.chat_models.httpx.get",
                            lambda *args, **kwargs: httpx.Response(200, content=png))

    @property
    def chat_model_params(self) -> dict:
        return {"base_url": self.url, "model": "shapes-llava", "max_tokens": 12}
