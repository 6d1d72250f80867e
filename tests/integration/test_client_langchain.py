"""Our Python client, our LangChain wrappers and langchain-openai's ChatOpenAI against the real
server; greedy outputs must agree across every path (they share one Pipeline)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_openai import ChatOpenAI

from client import AsyncClient, Client, ClientError, EmbedResult, RankResult, api
from client.langchain import BentoLMM, ChatBentoLMM
from models.shapes.data import make_samples
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

MODEL = "shapes-llava"
TOKENS = 8
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def sample():
    return make_samples(1, 3)[0]


@pytest.fixture(scope="module")
def png(sample) -> bytes:
    return png_bytes(sample.image)


@pytest.fixture(scope="module")
def client(url):
    with Client(url, timeout=120) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- request building and answer parsing (no server) ----------------------------------------
def test_generate_request_fields():
    call = api.generate("hi", None, {"do_sample": False, "stop": "x", "max_tokens": None})
    assert call.path == "/generate"
    assert call.kwargs == {"json": {"prompt": "hi", "n": 1, "temperature": 0.0, "stop": ["x"]}}
    sampled = api.generate("hi", [b"\x89PNG..."], {"do_sample": True, "seed": 3})
    assert sampled.kwargs["data"] == {"prompt": '"hi"', "n": "1", "temperature": "1.0",
                                      "seed": "3"}
    assert sampled.kwargs["files"] == [("images", ("image0", b"\x89PNG...", "image/png"))]
    with pytest.raises(TypeError, match="max_token"):
        api.generate("hi", None, {"max_token": 3})
    with pytest.raises(ValueError, match="one sequence"):
        api.stream("hi", None, {"num_return_sequences": 2}, one_sequence=True)


def test_error_bodies_have_one_shape():
    body = {"error": {"message": "max_tokens must be >= 1", "type": "invalid_request_error",
                      "param": "max_tokens", "code": None}}
    with pytest.raises(ClientError) as info:
        api.check(httpx.Response(400, json=body))
    error = info.value
    assert (error.status_code, error.message, error.type, error.param, error.code) == (
        400, "max_tokens must be >= 1", "invalid_request_error", "max_tokens", None)
    assert str(error) == "400: max_tokens must be >= 1"
    with pytest.raises(ClientError) as info:  # not JSON (a proxy's page): shown as text
        api.check(httpx.Response(502, text="<html>bad gateway</html>"))
    assert info.value.message == "<html>bad gateway</html>" and info.value.type is None
    with pytest.raises(ClientError, match="runner died") as info:  # inside a stream
        api.StreamEvent.from_json({"error": {**body["error"], "message": "runner died",
                                             "type": "server_error"}})
    assert info.value.status_code == 0 and info.value.type == "server_error"
    assert api.sse("data: [DONE]") == api.DONE and api.sse(": ping") is None


def test_embed_requests_are_split_in_order():
    calls = api.embed([f"t{i}" for i in range(5)], [b"a", b"b"], batch_size=2)
    assert calls[0].kwargs["data"] == {"texts": '["t0", "t1"]'}  # multipart: with images
    assert [name for _, (name, _, _) in calls[0].kwargs["files"]] == ["image0", "image1"]
    assert [c.kwargs for c in calls[1:]] == [{"json": {"texts": ["t2", "t3"]}},
                                             {"json": {"texts": ["t4"]}}]
    assert api.embed_batch_size({"images": {"max_embed_images": 7}}) == 7
    assert api.embed_batch_size({"images": {}}) == api.EMBED_BATCH_FALLBACK
    with pytest.raises(ValueError):
        api.embed([], None, batch_size=2)


def test_rank_request_and_indices(png):
    candidates = ["a red circle", png, "a blue square", Path(EXAMPLES / "red-circle-left.png")]
    call = api.rank("a red circle", candidates)
    assert call.path == "/rank"
    body = call.kwargs["json"]
    assert body["query"] == "a red circle"
    assert body["candidates"] == ["a red circle", "a blue square"]
    assert [base64.b64decode(x) for x in body["candidate_images_b64"]] == [
        png, (EXAMPLES / "red-circle-left.png").read_bytes()]
    answer = {"model": "clip", "query": "text", "results": [
        {"kind": "image", "index": 1, "text": None, "score": 0.9},
        {"kind": "text", "index": 0, "text": "a red circle", "score": 0.8},
        {"kind": "image", "index": 0, "text": None, "score": 0.3},
        {"kind": "text", "index": 1, "text": "a blue square", "score": 0.1}]}
    assert call.parse(answer) == [RankResult(3, "image", 0.9), RankResult(0, "text", 0.8,
                                                                           "a red circle"),
                                  RankResult(1, "image", 0.3),
                                  RankResult(2, "text", 0.1, "a blue square")]
    image_query = api.rank(png, ["x"]).kwargs["json"]
    assert base64.b64decode(image_query["query_image_b64"]) == png
    assert "candidate_images_b64" not in image_query


class FakeEmbedServer:
    """Answers /model_info (max_embed_images 3) and /embed (text "i" -> [i]), later batches
    faster than earlier ones, counting the requests in flight."""

    def __init__(self):
        self.in_flight = self.most = 0
        self.lock = threading.Lock()

    def _answer(self, request: httpx.Request) -> tuple[httpx.Response | None, float]:
        if request.url.path == "/model_info":
            return httpx.Response(200, json={"images": {"max_embed_images": 3}}), 0
        texts = json.loads(request.content)["texts"]
        body = {"model": "m", "dim": 1, "text_embeddings": [[float(t)] for t in texts],
                "image_embeddings": []}
        return httpx.Response(200, json=body), 0.1 / (1 + int(texts[0]))

    def _enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)

    def _leave(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def sync(self, request: httpx.Request) -> httpx.Response:
        response, delay = self._answer(request)
        self._enter()
        time.sleep(delay)
        self._leave()
        return response

    async def asynchronous(self, request: httpx.Request) -> httpx.Response:
        response, delay = self._answer(request)
        self._enter()
        await asyncio.sleep(delay)
        self._leave()
        return response


async def test_bulk_embed_runs_concurrently_and_keeps_order(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the built-in bar
    texts = [str(i) for i in range(20)]
    expected = [[float(i)] for i in range(20)]
    fake = FakeEmbedServer()
    with Client("http://fake") as client:
        client._http = httpx.Client(base_url="http://fake", transport=httpx.MockTransport(
            fake.sync))
        result = client.embed(texts, concurrency=4, progress=True)
    assert isinstance(result, EmbedResult) and result.text_embeddings == expected
    assert 1 < fake.most <= 4
    assert capsys.readouterr().err.rstrip().endswith("] 20/20")
    fake = FakeEmbedServer()
    async with AsyncClient("http://fake") as aclient:
        aclient._http = httpx.AsyncClient(base_url="http://fake",
                                          transport=httpx.MockTransport(fake.asynchronous))
        result = await aclient.embed(texts, batch_size=2, concurrency=3)
    assert result.text_embeddings == expected and 1 < fake.most <= 3


# -- Client / AsyncClient ------------------------------------------------------------------
def test_client_basics(client):
    assert client.health()
    info = client.model_info()
    assert info["served_model_name"] == MODEL and ":" in info["llm"]["tag"]
    assert not Client("http://127.0.0.1:9", timeout=2).health()


def test_images_as_path_bytes_or_pil_give_the_same_answer(client, sample, png, tmp_path):
    path = tmp_path / "shape.png"
    path.write_bytes(png)
    answers = {client.generate(sample.question, images=[image], max_tokens=TOKENS,
                               do_sample=False).text
               for image in (sample.image, png, path, str(path))}
    assert len(answers) == 1


def test_generate_options(client, sample):
    result = client.generate("Hello", max_tokens=4, num_return_sequences=2, seed=3,
                             do_sample=True, top_k=5, top_p=0.9, repetition_penalty=1.1,
                             stop=["zzz"], system_prompt="Be brief.")
    assert len(result.texts) == 2 and result.text == result.texts[0]
    assert result.model == MODEL and result.usage["completion_tokens"] > 0
    greedy = client.generate("Hello", max_tokens=4, do_sample=False)
    assert greedy.text == client.generate("Hello", max_tokens=4, temperature=0).text


def test_stream_equals_generate(client, sample):
    whole = client.generate(sample.question, images=[sample.image], max_tokens=TOKENS,
                            do_sample=False).text
    assert "".join(client.generate_stream(sample.question, images=[sample.image],
                                          max_tokens=TOKENS, do_sample=False)) == whole
    events = list(client.stream(sample.question, images=[sample.image], max_tokens=TOKENS))
    assert events[-1].usage["completion_tokens"] > 0


def test_embed(client, sample):
    result = client.embed(texts=["a red circle"], images=[sample.image])
    assert len(result.text_embeddings) == 1 and len(result.image_embeddings) == 1
    assert len(result.text_embeddings[0]) == result.dim
    assert len(client.embed(texts=["a", "b"]).text_embeddings) == 2


@pytest.fixture(scope="module")
def many_pngs() -> list[bytes]:
    return [png_bytes(s.image) for s in make_samples(500, 11)]


def test_bulk_embed_equals_one_by_one(client, many_pngs, capsys):
    bulk = client.embed(images=many_pngs, progress=True)
    assert "500" in capsys.readouterr().err  # the progress bar's total
    single = [client.embed(images=[png]).image_embeddings[0] for png in many_pngs]
    assert len(bulk.image_embeddings) == len(many_pngs)
    assert np.allclose(bulk.image_embeddings, single, atol=1e-5)
    texts = [f"a shape number {i}" for i in range(70)]
    mixed = client.embed(texts=texts, images=many_pngs[:70], batch_size=16, concurrency=2)
    assert np.allclose(mixed.image_embeddings, single[:70], atol=1e-5)
    assert np.allclose(mixed.text_embeddings, client.embed(texts=texts).text_embeddings,
                       atol=1e-5)


async def test_async_bulk_embed_equals_one_by_one(url, client, many_pngs):
    pngs = many_pngs[:60]
    single = [client.embed(images=[png]).image_embeddings[0] for png in pngs]
    async with AsyncClient(url, timeout=120) as aclient:
        default = await aclient.embed(images=pngs)
        small = await aclient.embed(images=pngs, batch_size=7, concurrency=3)
    assert np.allclose(default.image_embeddings, single, atol=1e-5)
    assert np.allclose(small.image_embeddings, single, atol=1e-5)


def test_rank(url, client):
    red, blue = EXAMPLES / "red-circle-left.png", EXAMPLES / "blue-triangle-top.png"
    candidates = ["a blue triangle at the top", red, "a red circle on the left",
                  blue.read_bytes()]
    ranked = client.rank("a red circle on the left", candidates)
    assert sorted(r.index for r in ranked) == [0, 1, 2, 3]
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    assert ranked[0].index == 2 and ranked[0].kind == "text" and ranked[0].score > 0.99
    assert all(r.text == candidates[r.index] for r in ranked if r.kind == "text")
    images = [r.index for r in ranked if r.kind == "image"]
    assert images == [1, 3]  # the red circle before the blue triangle
    by_image = client.rank(blue, ["a red circle on the left", "a blue triangle at the top"])
    assert [r.index for r in by_image] == [1, 0]


def test_client_errors_carry_the_server_message(client):
    with pytest.raises(ClientError) as info:
        client.generate("x", max_tokens=0)
    assert info.value.status_code == 400 and "max_tokens" in info.value.message
    assert info.value.type == "invalid_request_error" and info.value.param == "max_tokens"
    with pytest.raises(ClientError, match="not a readable image"):
        client.generate("x", images=[b"definitely not an image"])
    with pytest.raises(ClientError, match="max_tokens"):
        list(client.generate_stream("x", max_tokens=10_000))


async def test_async_client(url, sample):
    async with AsyncClient(url, timeout=120) as client:
        assert await client.health()
        whole = await client.generate(sample.question, images=[sample.image],
                                      max_tokens=TOKENS, do_sample=False)
        parts = [t async for t in client.generate_stream(
            sample.question, images=[sample.image], max_tokens=TOKENS, do_sample=False)]
        assert "".join(parts) == whole.text
        assert (await client.embed(texts=["x"])).dim > 0
        ranked = await client.rank("a red circle", ["a red circle", "a blue square"])
        assert [r.index for r in ranked] == [0, 1]
        assert (await client.model_info())["served_model_name"] == MODEL
        with pytest.raises(ClientError):
            await client.generate("x", max_tokens=0)


# -- BentoLMM in a chain -------------------------------------------------------------------
async def test_llm_chain_equals_client_generate(url, client):
    llm = BentoLMM(base_url=url, max_tokens=TOKENS)
    chain = PromptTemplate.from_template("What {thing} is this?") | llm | StrOutputParser()
    inputs = [{"thing": "shape"}, {"thing": "color"}]
    expected = [client.generate(f"What {i['thing']} is this?", max_tokens=TOKENS,
                                do_sample=False).text for i in inputs]
    assert chain.invoke(inputs[0]) == expected[0]
    assert await chain.ainvoke(inputs[1]) == expected[1]
    assert "".join(chain.stream(inputs[0])) == expected[0]
    assert "".join([c async for c in chain.astream(inputs[1])]) == expected[1]
    assert chain.batch(inputs) == expected
    assert await chain.abatch(inputs) == expected


def test_llm_identifies_the_model(url, client):
    params = BentoLMM(base_url=url)._identifying_params
    tag = client.model_info()["llm"]["tag"]
    assert params["model"] == MODEL and params["model_tag"] == tag
    assert params["model_version"] == tag.split(":")[1]


# -- ChatBentoLMM and ChatOpenAI -----------------------------------------------------------
def conversation(png: bytes, image_block: dict) -> list:
    return [SystemMessage("Answer briefly."),
            HumanMessage(content=[image_block, {"type": "text", "text": "What shape is this?"}]),
            AIMessage("a circle"),
            HumanMessage(content=[{"type": "text", "text": "What color is it?"}])]


@pytest.fixture(scope="module")
def openai_answer(url, png) -> str:
    """The greedy answer to the conversation, straight from the openai SDK."""
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}}
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [image, {"type": "text",
                                                     "text": "What shape is this?"}]},
                {"role": "assistant", "content": "a circle"},
                {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]}]
    return sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=TOKENS,
                                       temperature=0).choices[0].message.content


@pytest.mark.parametrize("form", ["image_url", "v1-base64", "v0-base64"])
def test_chat_model_image_blocks(url, png, openai_answer, form):
    block = {
        "image_url": {"type": "image_url",
                      "image_url": {"url": "data:image/png;base64," + b64(png)}},
        "v1-base64": {"type": "image", "base64": b64(png), "mime_type": "image/png"},
        "v0-base64": {"type": "image", "source_type": "base64", "data": b64(png),
                      "mime_type": "image/png"},
    }[form]
    chat = ChatBentoLMM(base_url=url, max_tokens=TOKENS)
    message = chat.invoke(conversation(png, block))
    assert message.content == openai_answer
    assert message.usage_metadata["input_tokens"] > 0
    assert message.response_metadata["model_name"] == MODEL


async def test_chat_model_stream_async_and_batch(url, png, openai_answer):
    chat = ChatBentoLMM(base_url=url, max_tokens=TOKENS)
    messages = conversation(png, {"type": "image", "base64": b64(png), "mime_type": "image/png"})
    chunks = list(chat.stream(messages))
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.content == openai_answer
    assert chunks[-1].chunk_position == "last" and full.usage_metadata["output_tokens"] > 0
    assert (await chat.ainvoke(messages)).content == openai_answer
    parts = [c.content async for c in chat.astream(messages)]
    assert "".join(parts) == openai_answer
    assert [m.content for m in chat.batch([messages, messages])] == [openai_answer] * 2


def test_chat_model_identifies_the_model(url):
    params = ChatBentoLMM(base_url=url)._identifying_params
    tag = httpx.post(url + "/model_info", json={}, timeout=30).json()["llm"]["tag"]
    assert params["model"] == MODEL and params["model_tag"] == tag
    assert params["model_version"] == tag.split(":")[1]


def test_chat_model_errors(url):
    """The openai SDK's errors, as with any OpenAI-compatible provider's chat model."""
    with pytest.raises(openai.NotFoundError, match="does not exist") as info:
        ChatBentoLMM(base_url=url, model="nope").invoke("hi")
    assert info.value.code == "model_not_found" and info.value.type == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="input_audio"):
        ChatBentoLMM(base_url=url).invoke([HumanMessage(content=[
            {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])])


def test_chat_model_sends_the_api_key(url, monkeypatch):
    seen = []
    hook = {"request": [lambda request: seen.append(request.headers["authorization"])
                        if request.url.path.endswith("/chat/completions") else None]}
    chat = ChatBentoLMM(base_url=url, max_tokens=2, api_key="k1",
                        http_client=httpx.Client(event_hooks=hook))
    chat.invoke("hi")
    monkeypatch.setenv("LMM_API_KEY", "k2")
    ChatBentoLMM(base_url=url + "/v1", max_tokens=2,
                 http_client=httpx.Client(event_hooks=hook)).invoke("hi")
    assert seen == ["Bearer k1", "Bearer k2"]


def test_langchain_openai_chat(url, png, openai_answer):
    chat = ChatOpenAI(base_url=url + "/v1", api_key="unused", model=MODEL, temperature=0,
                      max_tokens=TOKENS, max_retries=0)
    messages = conversation(png, {"type": "image", "base64": b64(png), "mime_type": "image/png"})
    assert chat.invoke(messages).content == openai_answer
    streamed = "".join(chunk.content for chunk in chat.stream(messages))
    assert streamed == openai_answer
