"""The transformers engine: split-path equivalence, continuous batching, per-request sampling."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from lmm.encoders import LlavaVisionEncoder
from lmm.pipeline import user_messages
from lmm.protocol import SamplingParams
from models.shapes.data import make_samples
from runners.engines.transformers_engine import TransformersEngine

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def hf(llava_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    return model, AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def encoder(llava_dir):
    return LlavaVisionEncoder(str(llava_dir), "cpu", "float32")


def prompt_for(processor, question: str, images: list):
    text = processor.apply_chat_template(user_messages(question, len(images)),
                                         add_generation_prompt=True, tokenize=False)
    return processor(text=text, images=images or None, return_tensors="pt",
                     add_special_tokens=False)


async def run_engine(llava_dir, jobs, max_num_seqs=16):
    """jobs: (prompt_ids, features, params, start_delay); returns the token ids of each."""
    engine = TransformersEngine(str(llava_dir), "cpu", "float32", max_num_seqs=max_num_seqs)
    await engine.start()

    async def one(ids, feats, params, delay):
        await asyncio.sleep(delay)
        out, finish = [], None
        async for o in engine.generate("t", ids, feats, params):
            out += o.token_ids
            finish = o.finish_reason
        return out, finish

    try:
        results = await asyncio.gather(*[one(*job) for job in jobs])
    finally:
        await engine.shutdown()
    return results, engine.stats()


def test_split_path_equals_whole_model_generate(hf, encoder, llava_dir):
    """Vision runner features + LLM runner tokens == HF generate() in one process, greedy,
    for requests with zero, one and two images decoded together in one batch."""
    model, processor = hf
    samples = make_samples(12, seed=99)
    cases = [(s.question, [s.image]) for s in samples[:8]]
    cases += [("Describe the image.", [samples[8].image, samples[9].image]),
              ("What shape is this?", [])]
    jobs, expected = [], []
    for question, images in cases:
        inputs = prompt_for(processor, question, images)
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected.append(ref[0, inputs["input_ids"].shape[1]:].tolist())
        feats = None
        if images:
            feats = encoder(inputs["pixel_values"].numpy())
            feats = feats.reshape(-1, feats.shape[-1])
        ids = inputs["input_ids"][0].tolist()
        jobs.append((ids, feats, SamplingParams(max_tokens=12), 0.002 * len(jobs)))
    results, stats = asyncio.run(run_engine(llava_dir, jobs))
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    for (tokens, finish), ref in zip(results, expected):
        ref_visible = [t for t in ref if t not in eos and t != model.generation_config.pad_token_id]
        assert tokens == ref_visible
        assert finish == ("stop" if any(t in eos for t in ref) else "length")
    assert max(stats) > 1, "the requests were never decoded together"


def test_each_sequence_keeps_its_own_sampling_params_inside_one_batch(hf, encoder, llava_dir):
    model, processor = hf
    sample = make_samples(1, seed=5)[0]
    inputs = prompt_for(processor, "Describe the image.", [sample.image])
    ids = inputs["input_ids"][0].tolist()
    feats = encoder(inputs["pixel_values"].numpy()).reshape(-1, model.config.text_config.hidden_size)
    # Seeds only show where the distribution is wide: past the end of an off-task answer.
    free = prompt_for(processor, "Tell me about zebras and tea.", [])["input_ids"][0].tolist()
    hot = dict(temperature=1.5, top_p=1.0, ignore_eos=True, max_tokens=16)
    eos = model.generation_config.eos_token_id
    jobs = [
        (free, None, SamplingParams(**hot, seed=1), 0),
        (free, None, SamplingParams(**hot, seed=1), 0.001),
        (free, None, SamplingParams(**hot, seed=2), 0),
        (free, None, SamplingParams(**hot, seed=3), 0),
        (ids, feats, SamplingParams(max_tokens=3, ignore_eos=True), 0),
        (ids, feats, SamplingParams(temperature=1.0, top_k=1, max_tokens=6, ignore_eos=True), 0),
        (ids, feats, SamplingParams(max_tokens=6, ignore_eos=True), 0),
        (ids, feats, SamplingParams(max_tokens=20, stop_token_ids=[], ignore_eos=False), 0),
    ]
    (a, b, c, d, short, topk1, greedy, natural), stats = asyncio.run(run_engine(llava_dir, jobs))
    assert a == b, "same seed, same tokens, whatever else is in the batch"
    assert len({tuple(a[0]), tuple(c[0]), tuple(d[0])}) > 1, "other seeds, other tokens"
    assert len(a[0]) == 16 and a[1] == "length"
    assert short == (greedy[0][:3], "length")
    assert topk1[0] == greedy[0], "top_k=1 sampling is greedy"
    assert natural[1] == "stop" and eos not in natural[0]
    # a stop token id ends the sequence where it first appears
    stop = greedy[0][2]
    (stopped, reason), = asyncio.run(run_engine(llava_dir, [
        (ids, feats, SamplingParams(max_tokens=6, ignore_eos=True, stop_token_ids=[stop]), 0)]))[0]
    assert (stopped, reason) == (greedy[0][: greedy[0].index(stop)], "stop")
    assert max(stats) >= 5


def test_closing_a_stream_frees_its_slot(llava_dir, hf):
    model, processor = hf
    ids = prompt_for(processor, "What shape is this?", [])["input_ids"][0].tolist()

    async def scenario():
        engine = TransformersEngine(str(llava_dir), "cpu", "float32", max_num_seqs=1)
        await engine.start()
        try:
            stream = engine.generate("a", ids, None, SamplingParams(max_tokens=2048 - len(ids),
                                                                  ignore_eos=True))
            await anext(stream)
            await stream.aclose()  # the client went away mid-generation
            out = [o async for o in engine.generate(
                "b", ids, None, SamplingParams(max_tokens=4, ignore_eos=True))]
            return out
        finally:
            await engine.shutdown()

    out = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert out[-1].finish_reason == "length" and out[-1].completion_tokens == 4


def test_engine_validates_what_it_is_given(llava_dir, hf):
    model, processor = hf
    engine = TransformersEngine(str(llava_dir), "cpu", "float32", max_model_len=100)
    engine.load()
    image_ids = [model.config.image_token_id] * 64
    with pytest.raises(ValueError, match="64 image tokens but 0"):
        engine.validate(image_ids, None, SamplingParams())
    with pytest.raises(ValueError, match="exceeds max_model_len 100"):
        engine.validate([1] * 90, None, SamplingParams(max_tokens=20))
    wrong = np.zeros((64, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="width 3"):
        engine.validate(image_ids, wrong, SamplingParams())
