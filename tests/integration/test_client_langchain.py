"""Our Python client, our LangChain wrappers and langchain-openai's ChatOpenAI against the real
server; greedy outputs must agree across every path (they share one Pipeline)."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_openai import ChatOpenAI

from client import AsyncClient, Client, ClientError
from client.langchain import BentoLMM, ChatBentoLMM
from models.shapes.data import make_samples

pytestmark = pytest.mark.integration

MODEL = "shapes-llava"
TOKENS = 8


@pytest.fixture(scope="module")
def sample():
    return make_samples(1, 3)[0]


@pytest.fixture(scope="module")
def png(sample) -> bytes:
    buffer = io.BytesIO()
    sample.image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(url):
    with Client(url, timeout=120) as c:
        yield c


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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


def test_client_errors_carry_the_server_message(client):
    with pytest.raises(ClientError) as info:
        client.generate("x", max_tokens=0)
    assert info.value.status_code == 400 and "max_tokens" in info.value.message
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
    with pytest.raises(ClientError, match="does not exist"):
        ChatBentoLMM(base_url=url, model="nope").invoke("hi")
    with pytest.raises(ValueError, match="not supported"):
        ChatBentoLMM(base_url=url).invoke([HumanMessage(content=[
            {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"}])])


def test_langchain_openai_chat(url, png, openai_answer):
    chat = ChatOpenAI(base_url=url + "/v1", api_key="unused", model=MODEL, temperature=0,
                      max_tokens=TOKENS, max_retries=0)
    messages = conversation(png, {"type": "image", "base64": b64(png), "mime_type": "image/png"})
    assert chat.invoke(messages).content == openai_answer
    streamed = "".join(chunk.content for chunk in chat.stream(messages))
    assert streamed == openai_answer
