"""The API request path with the real processor and fake runners that have the real interface."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from lmm.config import LMMConfig
from lmm.errors import BadRequest, Overloaded
from lmm.pipeline import Delta, Pipeline, user_messages
from lmm.protocol import EngineOutput, SamplingParams

pytestmark = pytest.mark.unit


class FakeVision:
    def __init__(self, hidden: int):
        self.hidden, self.calls = hidden, []

    async def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        self.calls.append(pixel_values.shape)
        return np.ones((pixel_values.shape[0], 64, self.hidden), np.float32)


class FakeLLM:
    """Streams fixed token ids as JSON lines, split at awkward byte boundaries."""

    def __init__(self, token_ids: list[int], finish: str | None = "stop", read: int = 7):
        self.token_ids, self.finish, self.read = token_ids, finish, read
        self.calls: list[dict] = []
        self.closed = 0

    async def generate(self, prompt_token_ids, image_features, params):
        self.calls.append({"ids": prompt_token_ids, "features": image_features, "params": params})
        text = ""
        for i, t in enumerate(self.token_ids):
            last = i == len(self.token_ids) - 1
            text += EngineOutput(token_ids=[t], prompt_tokens=len(prompt_token_ids),
                                 completion_tokens=i + 1,
                                 finish_reason=self.finish if last else None).model_dump_json()
            text += "\n"
        try:
            for start in range(0, len(text), self.read):  # reads never align with lines
                await asyncio.sleep(0)
                yield text[start:start + self.read]
        finally:
            self.closed += 1


@pytest.fixture(scope="module")
def processor(llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_dir)


def make(processor, words: str, finish="stop", read=7, **config):
    ids = processor.tokenizer.encode(words, add_special_tokens=False)
    llm = FakeLLM(ids, finish, read)
    vision = FakeVision(64)
    return Pipeline(LMMConfig(**config), processor, None, vision, llm), llm, vision


def run(pipeline, prompt, params=SamplingParams(), stop=(), n=1):
    return asyncio.run(pipeline.complete(prompt, params, stop, n))


def test_prompt_has_the_image_tokens_and_pixels(processor):
    pipe, llm, vision = make(processor, "a red circle")
    # two different images (identical pixels would be encoded once: the feature cache)
    images = [Image.new("RGB", (48, 48), (200, 30, 30)), Image.new("RGB", (32, 32))]
    prompt = pipe.build_prompt(user_messages("Describe the image.", 2), images)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert prompt.token_ids.count(image_id) == 128
    assert prompt.pixel_values.shape == (2, 3, 32, 32)
    assert pipe.image_tokens() == 64
    texts, reasons, usage = run(pipe, prompt)
    assert texts == ["a red circle"] and reasons == ["stop"]
    assert vision.calls == [(2, 3, 32, 32)]
    assert llm.calls[0]["features"].shape == (2, 64, 64)  # one block per image, not flattened
    assert usage.prompt_tokens == len(prompt.token_ids) and usage.completion_tokens == 3


def test_stop_string_cuts_the_text_and_aborts_the_runner_stream(processor):
    pipe, llm, _ = make(processor, "a red circle on the left", finish="length")
    prompt = pipe.build_prompt(user_messages("x", 0), [])
    texts, reasons, _ = run(pipe, prompt, stop=["on the"])
    assert texts == ["a red circle "] and reasons == ["stop"]
    assert llm.closed == 1


def deltas(pipe, prompt, stop=()):
    async def go():
        return [d async for d in pipe.stream(prompt, SamplingParams(), stop)
                if isinstance(d, Delta)]
    return asyncio.run(go())


def test_lines_that_arrive_in_one_read_are_sent_on_as_one_delta(processor):
    """An API that lags behind the engine finds several tokens' lines in one read: they become
    one delta (one event for the client), with the same text as token by token."""
    words = "a red circle on the left"
    n_tokens = len(processor.tokenizer.encode(words, add_special_tokens=False))
    pipe, _, _ = make(processor, words, read=1 << 20)  # everything in one read
    prompt = pipe.build_prompt(user_messages("x", 0), [])
    (only,) = deltas(pipe, prompt)
    assert (only.text, only.finish_reason, only.completion_tokens) == (words, "stop", n_tokens)
    trickle, _, _ = make(processor, words, read=7)
    pieces = deltas(trickle, prompt)
    assert len(pieces) > 1 and "".join(d.text for d in pieces) == words


def test_a_stop_string_inside_one_read_cuts_there(processor):
    pipe, llm, _ = make(processor, "a red circle on the left", finish="length", read=1 << 20)
    prompt = pipe.build_prompt(user_messages("x", 0), [])
    (only,) = deltas(pipe, prompt, stop=["on the"])
    assert (only.text, only.finish_reason) == ("a red circle ", "stop")
    assert llm.closed == 1


def test_n_completions_get_distinct_seeds(processor):
    pipe, llm, _ = make(processor, "a circle")
    prompt = pipe.build_prompt(user_messages("x", 0), [])
    texts, reasons, usage = run(pipe, prompt, SamplingParams(seed=7, temperature=1.0), n=3)
    assert texts == ["a circle"] * 3 and usage.completion_tokens == 6
    assert sorted(c["params"].seed for c in llm.calls) == [7, 8, 9]


def test_limits_are_client_errors(processor):
    pipe, _, _ = make(processor, "a", llm=dict(max_model_len=80), images=dict(max_images=1))
    prompt = pipe.build_prompt(user_messages("x", 1), [Image.new("RGB", (32, 32))])
    with pytest.raises(BadRequest, match="context"):
        run(pipe, prompt, SamplingParams(max_tokens=64))
    with pytest.raises(BadRequest, match="at most 1"):
        pipe.build_prompt(user_messages("x", 2), [Image.new("RGB", (32, 32))] * 2)


def test_a_stream_that_ends_without_a_finish_reason_is_503(processor):
    pipe, _, _ = make(processor, "a red", finish=None)
    prompt = pipe.build_prompt(user_messages("x", 0), [])
    with pytest.raises(Overloaded):
        run(pipe, prompt)
