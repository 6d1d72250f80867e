"""The unmodified openai SDK against the real server's /v1 routes, and image URL safety on a
second server with URLs enabled (loopback and link-local must still be refused)."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import httpx
import numpy as np
import openai
import pytest
import yaml

from models.shapes.data import make_samples
from tests.conftest import ROOT, serve

pytestmark = pytest.mark.integration

MODEL = "shapes-llava"


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


@pytest.fixture(scope="module")
def oai(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def samples():
    return make_samples(4, 7)


@pytest.fixture(scope="module")
def info(url) -> dict:
    return httpx.post(url + "/model_info", json={}, timeout=30).json()


def test_models_list(oai, info):
    models = {m.id: m for m in oai.models.list().data}
    card = models[info["served_model_name"]]
    assert card.owned_by and card.created > 0
    assert card.model_extra["tag"] == info["llm"]["tag"]
    assert card.model_extra["version"] == info["llm"]["tag"].split(":")[1]
    assert oai.models.retrieve(MODEL).id == MODEL


def test_chat_with_one_image_matches_the_native_api(oai, url, samples):
    sample = samples[0]
    response = oai.chat.completions.create(
        model=MODEL, messages=user(image_part(sample.image), {"type": "text",
                                                              "text": sample.question}),
        max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == MODEL
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    native = httpx.post(url + "/generate", json={
        "prompt": sample.question, "images_b64": [data_url(sample.image)], "max_tokens": 8,
        "temperature": 0}, timeout=120).json()
    assert choice.message.content == native["text"]
    assert response.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert response.usage.completion_tokens == native["usage"]["completion_tokens"]


def test_chat_with_two_images(oai, samples, info):
    question = {"type": "text", "text": "Describe the image."}
    one = oai.chat.completions.create(model=MODEL, max_tokens=4, temperature=0,
                                      messages=user(image_part(samples[0].image), question))
    two = oai.chat.completions.create(
        model=MODEL, max_tokens=4, temperature=0,
        messages=user(image_part(samples[0].image), image_part(samples[1].image), question))
    assert two.usage.prompt_tokens - one.usage.prompt_tokens == info["image_tokens"]
    assert isinstance(two.choices[0].message.content, str)


def test_stream_equals_the_non_streamed_answer(oai, samples):
    messages = user(image_part(samples[2].image), {"type": "text", "text": "Where is it?"})
    whole = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                        temperature=0)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks
              if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_n_completions(oai):
    response = oai.chat.completions.create(model=MODEL, n=2, max_tokens=6, seed=5,
                                           messages=[{"role": "user", "content": "Hello"}])
    assert [c.index for c in response.choices] == [0, 1]
    assert all(isinstance(c.message.content, str) for c in response.choices)
    assert response.usage.completion_tokens > 0


def test_stop(oai, samples):
    messages = user(image_part(samples[3].image), {"type": "text", "text": "Describe the image."})
    text = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                       temperature=0).choices[0].message.content
    assert len(text.strip()) >= 3, f"the trained model describes with a phrase, got {text!r}"
    stop = text.strip()[len(text.strip()) // 2:][:3]
    cut = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                      temperature=0, stop=stop).choices[0]
    assert cut.message.content == text[: text.index(stop)]
    assert cut.finish_reason == "stop"


def test_seed_reproducibility(oai):
    def sample(seed: int) -> str:
        # The trained model answers its questions with near certainty; past its end-of-sequence
        # (ignore_eos, an extension) the distribution is wide, so seeds must show there.
        return oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me about zebras and tea."}],
            max_tokens=16, temperature=1.0, seed=seed, extra_body={"ignore_eos": True},
        ).choices[0].message.content

    assert sample(11) == sample(11)
    assert len({sample(seed) for seed in range(20, 24)}) > 1


def test_text_completions(oai, url):
    response = oai.completions.create(model=MODEL, prompt="What shape is this?", max_tokens=6,
                                      temperature=0)
    native = httpx.post(url + "/generate", json={"prompt": "What shape is this?",
                                                 "max_tokens": 6}, timeout=120).json()
    assert response.choices[0].text == native["text"]
    streamed = oai.completions.create(model=MODEL, prompt="What shape is this?", max_tokens=6,
                                      temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == native["text"]


def test_embeddings(oai, url, samples):
    texts = ["a red circle on the left", "a blue square"]
    result = oai.embeddings.create(model=MODEL, input=texts)  # the SDK asks for base64
    assert [d.index for d in result.data] == [0, 1]
    vectors = np.array([d.embedding for d in result.data])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    native = httpx.post(url + "/embed", json={"texts": texts}, timeout=60).json()
    assert np.allclose(vectors, native["text_embeddings"], atol=1e-5)
    mixed = oai.embeddings.create(model=MODEL, encoding_format="float",
                                  input=[texts[0], data_url(samples[0].image)])
    assert len(mixed.data) == 2 and len(mixed.data[1].embedding) == vectors.shape[1]
    assert result.usage.prompt_tokens > 0


TINY = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("params, error", [
    ({"max_tokens": 0}, openai.BadRequestError),
    ({"max_tokens": 100_000}, openai.BadRequestError),
    ({"frequency_penalty": 1.0}, openai.BadRequestError),
    ({"presence_penalty": 0.5}, openai.BadRequestError),
    ({"logprobs": True}, openai.BadRequestError),
    ({"response_format": {"type": "json_object"}}, openai.BadRequestError),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
     openai.BadRequestError),
    ({"n": 100}, openai.BadRequestError),
    ({"model": "gpt-4o"}, openai.NotFoundError),
    ({"messages": user({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})},
     openai.BadRequestError),
    ({"messages": user({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}})},
     openai.BadRequestError),
    ({"messages": []}, openai.BadRequestError),
])
def test_bad_requests_are_4xx(oai, params, error):
    body = {"model": MODEL, "messages": [TINY], **params}
    with pytest.raises(error) as info:
        oai.chat.completions.create(**body)
    assert 400 <= info.value.status_code < 500
    assert info.value.body["message"] and info.value.body["type"]


def test_too_many_images_and_oversized_prompt(oai, samples, info):
    limit = info["images"]["max_images"]
    parts = [image_part(samples[0].image)] * (limit + 1)
    with pytest.raises(openai.BadRequestError, match="at most"):
        oai.chat.completions.create(model=MODEL, messages=user(*parts), max_tokens=2)
    prompt = oai.chat.completions.create(model=MODEL, messages=user(*parts[:limit]),
                                         max_tokens=1).usage.prompt_tokens
    max_tokens = min(info["max_tokens_limit"], info["max_model_len"])
    assert prompt + max_tokens > info["max_model_len"], "configs/test.yaml must let this overflow"
    with pytest.raises(openai.BadRequestError, match="context"):
        oai.chat.completions.create(model=MODEL, messages=user(*parts[:limit]),
                                    max_tokens=max_tokens, stream=True)


# -- image URL safety (a second server, URLs enabled) --------------------------------------
class _Images(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).hits += 1
        buffer = io.BytesIO()
        make_samples(1, 1)[0].image.save(buffer, format="PNG")
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(buffer.getvalue())

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_server():
    """A real image on 127.0.0.1: what an SSRF would reach if the guard let it through."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def url_server(bentoml_home, tmp_path_factory):
    """The test config with http(s) image URLs allowed from loopback-ish and example names."""
    cfg = yaml.safe_load((ROOT / "configs" / "test.yaml").read_text())
    cfg["images"]["allowed_url_domains"] = ["localhost", "127.0.0.1", "169.254.169.254",
                                            "example.com"]
    path = tmp_path_factory.mktemp("cfg") / "test-urls.yaml"
    path.write_text(yaml.safe_dump(cfg))
    srv = serve(bentoml_home, tmp_path_factory.mktemp("logs-urls"), str(path))
    try:
        srv.wait_ready()
        yield srv.url
    finally:
        srv.stop()


@pytest.mark.parametrize("target, text", [
    ("http://127.0.0.1:{port}/a.png", "non-public"),
    ("http://localhost:{port}/a.png", "non-public"),
    ("http://169.254.169.254/latest/meta-data/", "non-public"),
    ("http://[::1]:{port}/a.png", "allow-list"),
    ("http://evil.test/a.png", "allow-list"),
    ("http://example.com.evil.test/a.png", "allow-list"),
    ("http://user:pw@example.com/a.png", "credentials"),
    ("gopher://example.com/a.png", "data:"),
])
def test_image_urls_to_internal_or_unlisted_hosts_are_refused(url_server, image_server,
                                                              target, text):
    client = openai.OpenAI(base_url=url_server + "/v1", api_key="unused", max_retries=0)
    hits = _Images.hits
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=user(
            {"type": "image_url", "image_url": {"url": target.format(port=image_server)}},
            {"type": "text", "text": "What shape is this?"}))
    assert text in info.value.body["message"]
    assert info.value.body["param"] == "messages.0.content.0.image_url"
    assert _Images.hits == hits  # nothing reached the local image server


def test_image_urls_are_disabled_by_default(oai, image_server):
    with pytest.raises(openai.BadRequestError, match="disabled"):
        oai.chat.completions.create(model=MODEL, max_tokens=2, messages=user(
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{image_server}/a.png"}},
            {"type": "text", "text": "What shape is this?"}))
