"""The /v1 app without a server: message conversion, parameter mapping and errors, driven by
FastAPI's TestClient over a fake pipeline with the real interface."""

from __future__ import annotations

import base64
import io
import json
from types import SimpleNamespace
from typing import AsyncIterator, Sequence

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lmm.adapters import ServedModel
from lmm.config import ImageLimits, LMMConfig
from lmm.errors import BadRequest
from lmm.openai_api import create_app
from lmm.pipeline import Delta, Embeddings, Pipeline, Prompt, usage
from lmm.protocol import SamplingParams, Usage
from lmm.serving import OpenAIServing
from tests.helpers import assert_error

pytestmark = pytest.mark.unit

MODEL = "shapes-llava"
WORDS = ["a", " red", " circle", " on", " the", " left"]


class FakePipeline(Pipeline):
    """Records what the routes pass in; streams canned words (one per token)."""

    def __init__(self, config: LMMConfig):
        self.config = config
        tokenizer = lambda texts, **_: {"input_ids": [t.split() for t in texts]}  # noqa: E731
        self.clip_processor = SimpleNamespace(tokenizer=tokenizer)
        self.prompts: list[tuple[list[dict], list[Image.Image]]] = []
        self.calls: list[tuple[SamplingParams, list[str], int]] = []
        self.fail: str | None = None  # "before" or "after" the first delta

    def build_prompt(self, messages: list[dict], images: Sequence[Image.Image]) -> Prompt:
        self.check_image_count(len(images))
        self.prompts.append((messages, list(images)))
        return Prompt(token_ids=[1] * (3 + 10 * len(images)), pixel_values=None)

    async def stream(self, prompt: Prompt, params: SamplingParams, stop: Sequence[str] = (),
                     n: int = 1, observer=None) -> AsyncIterator[Delta | Usage]:
        self.check_budget(prompt, params)
        self.calls.append((params, list(stop), n))
        if self.fail == "before":
            raise BadRequest("the runner refused this", "max_tokens")
        words = WORDS[: params.max_tokens]
        for i in range(n):
            for k, word in enumerate(words):
                if self.fail == "after" and k == 1:
                    raise RuntimeError("secret internal detail")
                reason = None
                if k == len(words) - 1:
                    reason = "length" if params.max_tokens < len(WORDS) else "stop"
                yield Delta(i, word, reason, len(prompt.token_ids), k + 1)
        yield usage(len(prompt.token_ids), n * len(words))

    async def embed(self, texts: Sequence[str], images: Sequence[Image.Image],
                    observer=None) -> Embeddings:
        self.check_image_count(len(images), embed=True)
        tokens = sum(len(t.split()) for t in texts)
        return Embeddings([[1.0, 0.0, 0.0]] * len(texts), [[0.0, 1.0, 0.0]] * len(images), tokens)


def config(**images) -> LMMConfig:
    return LMMConfig(served_model_name=MODEL, default_max_tokens=16, max_tokens_limit=64, max_n=4,
                     images=ImageLimits(max_images=3, max_embed_images=5, max_bytes=100_000,
                                       **images))


@pytest.fixture
def pipeline() -> FakePipeline:
    return FakePipeline(config())


@pytest.fixture
def client(pipeline) -> TestClient:
    serving = OpenAIServing(
        pipeline,
        ServedModel(MODEL, "lmm-shapes-llava", "lmm-shapes-llava:abc123", 1, "chat", "vllm"),
        ServedModel("lmm-shapes-clip", "lmm-shapes-clip", "lmm-shapes-clip:def456", 1,
                    "embedding", "transformers"))
    return TestClient(create_app(serving), raise_server_exceptions=False)


def data_url(color: str = "red", size: int = 8) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(client: TestClient, messages: list | str, **params):
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return client.post("/chat/completions", json={"model": MODEL, "messages": messages, **params})


def events(response) -> list:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


# -- message conversion --------------------------------------------------------------------
def test_string_content_becomes_one_text_part(client, pipeline):
    response = chat(client, "What shape is this?")
    assert response.status_code == 200, response.text
    messages, images = pipeline.prompts[-1]
    assert messages == [{"role": "user", "content": [{"type": "text",
                                                      "text": "What shape is this?"}]}]
    assert images == []
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "".join(WORDS)}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


def test_parts_with_several_images_keep_their_order(client, pipeline):
    content = [{"type": "image_url", "image_url": {"url": data_url("red", 8)}},
               {"type": "text", "text": "Compare"},
               {"type": "image_url", "image_url": data_url("blue", 9)}]  # a bare string too
    response = chat(client, [{"role": "user", "content": content}])
    assert response.status_code == 200, response.text
    messages, images = pipeline.prompts[-1]
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Compare"},
                                      {"type": "image"}]
    assert [im.size for im in images] == [(8, 8), (9, 9)]
    assert images[0].getpixel((0, 0)) == (255, 0, 0)
    assert images[1].getpixel((0, 0)) == (0, 0, 255)


def test_images_across_messages_and_system_roles(client, pipeline):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Shapes only."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("red")}},
                                     {"type": "text", "text": "What shape is this?"}]},
        {"role": "assistant", "content": "a circle"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("lime")}},
                                     {"type": "text", "text": "And this?"}]},
    ]
    assert chat(client, messages).status_code == 200
    converted, images = pipeline.prompts[-1]
    assert [m["role"] for m in converted] == ["system", "system", "user", "assistant", "user"]
    assert converted[0]["content"] == [{"type": "text", "text": "Be brief."}]
    assert converted[3]["content"] == [{"type": "text", "text": "a circle"}]
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 255, 0)]


def test_image_outside_a_user_message_is_refused(client):
    content = [{"type": "image_url", "image_url": {"url": data_url()}}]
    assert_error(chat(client, [{"role": "system", "content": content}]), 400,
                 "messages.0.content.0.image_url", "user messages")


def test_too_many_images(client):
    content = [{"type": "image_url", "image_url": {"url": data_url()}}] * 4
    assert_error(chat(client, [{"role": "user", "content": content}]), 400, "images", "at most 3")


@pytest.mark.parametrize("url, text", [
    ("data:image/png;base64,!!!", "base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "not a readable"),
    ("http://example.com/cat.png", "disabled"),
    ("ftp://example.com/cat.png", "data:image"),
    ("file:///etc/passwd", "data:image"),
])
def test_bad_images_are_400(client, url, text):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "x"}]
    assert_error(chat(client, [{"role": "user", "content": content}]), 400,
                 "messages.0.content.0.image_url", text)


def test_image_over_the_byte_limit_is_413(client):
    big = "data:image/png;base64," + base64.b64encode(b"\0" * 200_000).decode()
    content = [{"type": "image_url", "image_url": {"url": big}}]
    assert_error(chat(client, [{"role": "user", "content": content}]), 413)


# -- parameters ----------------------------------------------------------------------------
def test_parameter_mapping(client, pipeline):
    response = chat(client, "hi", max_tokens=5, max_completion_tokens=3, stop="zz", seed=7,
                    temperature=0.5, top_p=0.9, top_k=4, repetition_penalty=1.2, n=2)
    assert response.status_code == 200, response.text
    params, stop, n = pipeline.calls[-1]
    assert (params.max_tokens, params.temperature, params.top_p) == (3, 0.5, 0.9)
    assert (params.top_k, params.repetition_penalty, params.seed) == (4, 1.2, 7)
    assert stop == ["zz"] and n == 2
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in choices)


def test_defaults_and_stop_list(client, pipeline):
    assert chat(client, "hi", stop=["a", "b"]).status_code == 200
    params, stop, n = pipeline.calls[-1]
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (16, 1.0, 1.0, 0)
    assert (params.repetition_penalty, params.seed, stop, n) == (1.0, None, ["a", "b"], 1)


def test_unknown_fields_are_ignored(client):
    response = chat(client, "hi", store=False, metadata={"a": "b"}, parallel_tool_calls=False,
                    user="u", service_tier="auto", frequency_penalty=0, presence_penalty=0.0,
                    response_format={"type": "text"}, tool_choice="auto", logprobs=False)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("params, param", [
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"presence_penalty": -0.5}, "presence_penalty"),
    ({"logprobs": True}, "logprobs"),
    ({"logit_bias": {"42": 3}}, "logit_bias"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
])
def test_unsupported_parameters_are_a_clear_400(client, params, param):
    error = assert_error(chat(client, "hi", **params), 400, param, "not supported")
    assert error["code"] == "unsupported_parameter"


@pytest.mark.parametrize("params, param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"max_completion_tokens": 65, "max_tokens": 1}, "max_completion_tokens"),
    ({"n": 5}, "n"),
    ({"n": 0}, "n"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": 3}, "stop"),
])
def test_out_of_range_parameters(client, params, param):
    assert_error(chat(client, "hi", **params), 400, param)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages.0.content"),
])
def test_invalid_bodies_are_400_with_the_param(client, body, param):
    error = assert_error(client.post("/chat/completions", json=body), 400)
    assert error["param"].startswith(param)


def test_invalid_json_is_400(client):
    response = client.post("/chat/completions", content=b"{nope",
                           headers={"content-type": "application/json"})
    assert_error(response, 400)


def test_tool_calls_in_history_are_refused(client):
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    assert_error(chat(client, messages), 400, "messages.0.tool_calls", "not supported")


def test_unknown_model_is_404(client):
    response = client.post("/chat/completions",
                           json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    error = assert_error(response, 404, "model", "gpt-4o")
    assert error["code"] == "model_not_found" and error["type"] == "not_found_error"


def test_unknown_route_is_an_openai_404(client):
    assert_error(client.get("/nope"), 404)


def test_pipeline_errors_keep_their_status(client, pipeline):
    pipeline.fail = "before"
    assert_error(chat(client, "hi"), 400, "max_tokens", "runner refused")


def test_unexpected_errors_are_500_without_internals(client, pipeline):
    pipeline.fail = "after"
    error = assert_error(chat(client, "hi"), 500)
    assert "secret" not in error["message"] and error["type"] == "server_error"


# -- streaming -----------------------------------------------------------------------------
def test_stream_chunks(client):
    response = chat(client, "hi", stream=True, max_tokens=3,
                    stream_options={"include_usage": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    got = events(response)
    assert got[-1] == "[DONE]"
    chunks = got[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "".join(WORDS[:3])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_stream_without_usage_and_with_n(client):
    chunks = events(chat(client, "hi", stream=True, n=2))[:-1]
    assert all(c["usage"] is None for c in chunks)
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == "".join(WORDS)
        assert mine[-1]["finish_reason"] == "stop"


def test_stream_error_before_the_first_chunk_is_a_status(client, pipeline):
    pipeline.fail = "before"
    assert_error(chat(client, "hi", stream=True), 400, "max_tokens")


def test_stream_error_after_the_first_chunk_is_an_event(client, pipeline):
    pipeline.fail = "after"
    response = chat(client, "hi", stream=True)
    assert response.status_code == 200
    got = events(response)
    assert got[-1] == "[DONE]"
    error = got[-2]["error"]
    assert error["type"] == "server_error" and "secret" not in error["message"]


# -- completions, models, embeddings -------------------------------------------------------
def test_completions(client, pipeline):
    for prompt in ("Describe the image.", ["Describe the image."]):
        response = client.post("/completions", json={"model": MODEL, "prompt": prompt,
                                                     "max_tokens": 2, "stop": "x"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == "".join(WORDS[:2])
        messages, _ = pipeline.prompts[-1]
        assert messages == [{"role": "user", "content": [{"type": "text",
                                                          "text": "Describe the image."}]}]
        assert pipeline.calls[-1][1] == ["x"]


def test_completions_stream(client):
    response = client.post("/completions", json={
        "model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}})
    got = events(response)
    assert got[-1] == "[DONE]" and got[-2]["usage"]["completion_tokens"] == len(WORDS)
    assert "".join(c["choices"][0]["text"] for c in got[:-2]) == "".join(WORDS)


@pytest.mark.parametrize("extra, param", [
    ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": [1, 2]}, "prompt"),
    ({"echo": True}, "echo"), ({"suffix": "x"}, "suffix"), ({"best_of": 2}, "best_of"),
    ({"logprobs": 1}, "logprobs"),
])
def test_completions_refusals(client, extra, param):
    body = {"model": MODEL, "prompt": "hi", **extra}
    error = assert_error(client.post("/completions", json=body), 400)
    assert error["param"].startswith(param)


def test_models(client):
    body = client.get("/models").json()
    assert body["object"] == "list"
    first = body["data"][0]
    assert first["id"] == MODEL and first["object"] == "model" and first["owned_by"]
    assert first["tag"] == "lmm-shapes-llava:abc123" and first["version"] == "abc123"
    assert client.get(f"/models/{MODEL}").json()["id"] == MODEL
    assert_error(client.get("/models/other"), 404, "model")


def test_embeddings_texts_and_images_in_order(client):
    body = {"model": MODEL, "input": ["a red circle", data_url(), {"image": data_url("blue")},
                                      "data:text/plain;base64,aGk="]}
    response = client.post("/embeddings", json=body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["object"] == "list" and out["model"] == "lmm-shapes-clip"
    assert [d["index"] for d in out["data"]] == [0, 1, 2, 3]
    assert [d["embedding"] for d in out["data"]] == [[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert out["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


def test_embeddings_single_string_and_base64(client):
    body = {"model": "lmm-shapes-clip", "input": "a circle", "encoding_format": "base64"}
    out = client.post("/embeddings", json=body).json()
    vector = np.frombuffer(base64.b64decode(out["data"][0]["embedding"]), dtype="<f4")
    assert vector.tolist() == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("body, status, param", [
    ({"input": []}, 400, "input"),
    ({"input": "x", "dimensions": 7}, 400, "dimensions"),
    ({"input": [{"image": "data:image/png;base64,AAAA"}]}, 400, "input.0"),
    ({"input": "x", "model": "other"}, 404, "model"),
])
def test_embeddings_errors(client, body, status, param):
    assert_error(client.post("/embeddings", json={"model": MODEL, **body}), status, param)


def test_embeddings_have_their_own_image_limit(client):
    images = [{"image": data_url()}] * 5  # over max_images (3), within max_embed_images (5)
    assert client.post("/embeddings", json={"model": MODEL, "input": images}).status_code == 200
    response = client.post("/embeddings", json={"model": MODEL, "input": images + images[:1]})
    assert_error(response, 400, "images", "at most 5")


ADAPTER = "shapes-terse"


@pytest.fixture
def adapter_client(pipeline) -> TestClient:
    base = ServedModel(MODEL, "lmm-shapes-llava", "lmm-shapes-llava:abc123", 1, "chat", "vllm")
    adapter = ServedModel(ADAPTER, "lmm-shapes-llava-terse", "lmm-shapes-llava-terse:fed987", 2,
                          "chat", "vllm", parent=MODEL)
    clip = ServedModel("lmm-shapes-clip", "lmm-shapes-clip", "lmm-shapes-clip:def456", 1,
                       "embedding", "transformers")
    return TestClient(create_app(OpenAIServing(pipeline, base, clip, adapters=[adapter])),
                      raise_server_exceptions=False)


def test_adapters_are_models_with_their_base_as_parent(adapter_client):
    models = {m["id"]: m for m in adapter_client.get("/models").json()["data"]}
    assert list(models) == [MODEL, ADAPTER, "lmm-shapes-clip"]
    assert models[ADAPTER]["parent"] == MODEL and models[MODEL]["parent"] is None
    assert models[ADAPTER]["root"] == models[ADAPTER]["tag"] == "lmm-shapes-llava-terse:fed987"
    assert models[ADAPTER]["kind"] == "chat"
    assert adapter_client.get(f"/models/{ADAPTER}").json()["parent"] == MODEL


def test_model_chooses_the_adapter_per_request(adapter_client, pipeline):
    """`model` travels to the LLM as the adapter to generate with (none for the base)."""
    for model, adapter in ((ADAPTER, ADAPTER), (MODEL, None), (ADAPTER, ADAPTER)):
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        body = adapter_client.post("/chat/completions", json=chat).json()
        assert body["model"] == model
        assert pipeline.calls[-1][0].adapter == adapter
    adapter_client.post("/completions", json={"model": ADAPTER, "prompt": "hi"})
    assert pipeline.calls[-1][0].adapter == ADAPTER
    error = assert_error(adapter_client.post("/chat/completions", json={
        "model": "nope", "messages": [{"role": "user", "content": "hi"}]}), 404, "model")
    assert MODEL in error["message"] and ADAPTER in error["message"]
    # CLIP has no adapters: an adapter's name does not embed
    assert_error(adapter_client.post("/embeddings", json={"model": ADAPTER, "input": "x"}),
                 404, "model")
