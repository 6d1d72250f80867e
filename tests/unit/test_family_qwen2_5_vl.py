"""The Qwen2.5-VL family on the split path, run for real on a tiny random checkpoint: images of
different sizes (so different token counts) encoded in one VisionPart call, prompts with 0, 1
and 2 images prefilled together left-padded with M-RoPE positions and decoded with per-row
positions, and the same features through vLLM as image embeddings; greedy tokens equal the
whole model's generate() on both engines. Qwen2-VL takes the same code path."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.families import ImageFeatures, ImageInput
from lmm.families.qwen2_5_vl import PARTS, VLLM_ENGINE_ARGS, Qwen2_5_VLFamily, image_tokens
from models.families import qwen2_5_vl as build_qwen
from models.families.qwen2_5_vl import build_processor

pytestmark = pytest.mark.unit
STEPS = 8
# (width, height): 64 x 64 -> grid [1, 16, 16], 64 tokens; 96 x 48 -> [1, 12, 24], 72;
# 40 x 80 -> [1, 20, 10], 50.
SIZES = [(64, 64), (96, 48), (40, 80)]
PROMPTS = [  # (text, indices into SIZES)
    ("Describe the colour of the background please.", []),
    ("What shape is in this picture?", [0]),
    ("Which of the two images shows a circle on the left?", [1, 2]),
]


def make_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def messages(text: str, n_images: int) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


class Checkpoint:
    def __init__(self, path, qwen2_vl: bool):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.path = path
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        self.eos = set(self.model.generation_config.eos_token_id)
        self.family = Qwen2_5_VLFamily.from_pretrained(path)
        self.images = [make_image(size, seed) for seed, size in enumerate(SIZES)]
        self.inputs = []
        for text, which in PROMPTS:
            chat = self.processor.apply_chat_template(messages(text, len(which)), tokenize=False,
                                                      add_generation_prompt=True)
            images = [self.images[i] for i in which] or None
            self.inputs.append(self.processor(text=[chat], images=images, return_tensors="pt"))

    def until_eos(self, tokens: list[int]) -> list[int]:
        for i, t in enumerate(tokens):
            if t in self.eos:
                return tokens[: i + 1]
        return tokens

    @functools.cached_property
    def expected(self) -> list[list[int]]:
        return self.hf_generate()

    @functools.cached_property
    def vision(self):
        return self.family.vision(self.path, "cpu", torch.float32)

    @functools.cached_property
    def features(self) -> list[list[ImageFeatures]]:
        return encode_all(self)

    def language(self):
        return self.family.language(self.path, "cpu", torch.float32)

    def hf_generate(self) -> list[list[int]]:
        out = []
        with torch.inference_mode():
            for inputs in self.inputs:
                ids = self.model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
                out.append(self.until_eos(ids[0, inputs["input_ids"].shape[1]:].tolist()))
        return out

    def image_inputs(self) -> list[list[ImageInput]]:
        """Per prompt, its images as the API service would split the processor's outputs."""
        out = []
        for inputs, (_, which) in zip(self.inputs, PROMPTS):
            arrays = {k: v.numpy() for k, v in inputs.items() if k in ("pixel_values",
                                                                        "image_grid_thw")}
            out.append(self.family.image_inputs(arrays, len(which)))
        return out


@pytest.fixture(scope="module")
def qwen2_5_vl(tmp_path_factory):
    return Checkpoint(build_qwen.build(tmp_path_factory.mktemp("qwen2_5_vl"), seed=0), False)


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory):
    path = build_qwen.build(tmp_path_factory.mktemp("qwen2_vl"), seed=0, qwen2_vl=True)
    return Checkpoint(path, True)


@pytest.fixture(params=["qwen2_5_vl", "qwen2_vl"])
def ckpt(request):
    """Both architectures: Qwen2-VL runs through the same family code."""
    return request.getfixturevalue(request.param)


def encode_all(ckpt: Checkpoint) -> list[list[ImageFeatures]]:
    """Every image of every prompt in ONE VisionPart.encode call, handed back per prompt."""
    per_prompt = ckpt.image_inputs()
    features = ckpt.vision.encode([im for images in per_prompt for im in images])
    out, start = [], 0
    for images in per_prompt:
        out.append(features[start: start + len(images)])
        start += len(images)
    return out


def split_generate(lang, prompts: list[tuple[torch.Tensor, list[ImageFeatures]]], steps: int
                   ) -> list[list[int]]:
    """Greedy decoding as the transformers engine runs it: the prompts prefilled together,
    left-padded, with the family's positions and attention, then one token per row per step
    at position L + offset + t, through a DynamicCache."""
    from transformers import DynamicCache

    longest = max(len(ids) for ids, _ in prompts)
    rows = len(prompts)
    hidden = lang.embed.weight.shape[1]
    embeds = torch.zeros(rows, longest, hidden, dtype=lang.embed.weight.dtype)
    mask = torch.zeros(rows, longest, dtype=torch.long)
    ids = torch.zeros(rows, longest, dtype=torch.long)
    positions = None
    next_pos = []
    for row, (prompt, images) in enumerate(prompts):
        n = len(prompt)
        embeds[row, longest - n:] = lang.inputs_embeds(prompt, images)
        pos, offset = lang.positions(prompt, images)
        if positions is None:
            positions = torch.zeros(pos.shape[0], rows, longest, dtype=torch.long)
        positions[:, row, longest - n:] = pos
        mask[row, longest - n:] = 1
        ids[row, longest - n:] = prompt
        next_pos.append(n + offset)
    cache = DynamicCache(config=lang.text_config)
    with torch.inference_mode():
        out = lang.decoder(inputs_embeds=embeds, attention_mask=lang.attention(mask, ids),
                           position_ids=positions, past_key_values=cache, use_cache=True)
        tokens = [lang.lm_head(out.last_hidden_state[:, -1]).argmax(-1)]
        next_pos = torch.tensor(next_pos)
        for _ in range(steps - 1):
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=mask.dtype)], 1)
            step_pos = next_pos.view(1, rows, 1).expand(positions.shape[0], rows, 1)
            out = lang.decoder(inputs_embeds=lang.embed(tokens[-1][:, None]),
                               attention_mask=mask, position_ids=step_pos,
                               past_key_values=out.past_key_values, use_cache=True)
            tokens.append(lang.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
            next_pos = next_pos + 1
    return torch.stack(tokens, 1).tolist()


def test_build_is_the_real_layout(ckpt):
    config = ckpt.model.config
    tok = ckpt.processor.tokenizer
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    chat = ckpt.processor.apply_chat_template(messages("Hi", 1), tokenize=False,
                                              add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # the processor expands each image to its grid's tokens: 64, 72 and 50 here
    counts = [int((inp["input_ids"] == config.image_token_id).sum()) for inp in ckpt.inputs]
    assert counts == [0, 64, 72 + 50]
    names = {name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
             for name, _ in ckpt.model.named_parameters()}
    assert names == {"visual", "language_model", "lm_head"}
    assert {root for roots in PARTS.values() for root in roots} == {
        "model.visual", "model.language_model", "lm_head"}


def test_build_is_deterministic_for_a_seed(qwen2_5_vl, tmp_path):
    again = build_qwen.build(tmp_path / "again", seed=0)
    other = build_qwen.build(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "processor_config.json"):
        assert (again / name).read_bytes() == (qwen2_5_vl.path / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").stat().st_size < 4 * 2**20


def test_image_inputs_split_per_image(ckpt):
    per_prompt = ckpt.image_inputs()
    assert [len(images) for images in per_prompt] == [0, 1, 2]
    grids = [im.arrays["image_grid_thw"].tolist() for images in per_prompt for im in images]
    assert grids == [[1, 16, 16], [1, 12, 24], [1, 20, 10]]
    both = per_prompt[2]
    assert both[0].group() != both[1].group()
    np.testing.assert_array_equal(
        np.concatenate([im.arrays["pixel_values"] for im in both]),
        ckpt.inputs[2]["pixel_values"].numpy())
    with pytest.raises(ValueError, match="expected 3 images"):
        ckpt.family.image_inputs({k: v.numpy() for k, v in ckpt.inputs[2].items()}, 3)


def test_one_encode_call_equals_the_models_features(ckpt):
    features = ckpt.features
    assert [[f.embeds.shape for f in fs] for fs in features] == [[], [(64, 64)],
                                                                 [(72, 64), (50, 64)]]
    with torch.inference_mode():
        for fs, inputs in zip(features[1:], ckpt.inputs[1:]):
            whole = ckpt.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                return_dict=True).pooler_output
            for f, w in zip(fs, whole):
                np.testing.assert_allclose(f.embeds, w.numpy(), rtol=1e-5, atol=1e-5)
                assert image_tokens(f.meta["image_grid_thw"], 2) == w.shape[0]


def test_split_path_batched_equals_hf_generate(ckpt):
    expected = ckpt.expected
    lang = ckpt.language()
    prompts = [(inp["input_ids"][0], fs) for inp, fs in zip(ckpt.inputs, ckpt.features)]
    # M-RoPE: image prompts move the next position back (rope delta < 0); text-only: 0
    offsets = [lang.positions(ids, fs)[1] for ids, fs in prompts]
    assert offsets[0] == 0 and offsets[1] < 0 and offsets[2] < offsets[1]
    got = [ckpt.until_eos(row) for row in split_generate(lang, prompts, STEPS)]
    assert got == expected
    assert any(len(row) == STEPS for row in got)  # not all ended at once


def test_split_path_depends_on_mrope_positions_and_feature_rows(ckpt, monkeypatch):
    """The equality above is not luck: plain 1-D positions, or an image's rows out of order,
    give other tokens on this checkpoint."""
    expected = ckpt.expected
    lang = ckpt.language()
    prompts = [(inp["input_ids"][0], fs) for inp, fs in zip(ckpt.inputs, ckpt.features)]
    reversed_rows = [(ids, [ImageFeatures(f.embeds[::-1].copy(), f.meta) for f in fs])
                     for ids, fs in prompts]
    got = split_generate(lang, reversed_rows, STEPS)
    assert got[0] == expected[0] and got[1:] != expected[1:]
    monkeypatch.setattr(lang, "positions",
                        lambda ids, fs: (torch.arange(len(ids)).view(1, -1), 0))
    got = split_generate(lang, prompts, STEPS)
    assert got[0] == expected[0] and got[1:] != expected[1:]


def test_language_part_refuses_mismatched_features(ckpt):
    features = ckpt.features
    lang = ckpt.language()
    ids = ckpt.inputs[2]["input_ids"][0]
    with pytest.raises(ValueError, match="image tokens"):
        lang.inputs_embeds(ids, features[2][:1])
    swapped = [ImageFeatures(features[2][1].embeds, features[2][0].meta), features[2][1]]
    with pytest.raises(ValueError, match="feature rows"):
        lang.positions(ids, swapped)


def test_vllm_prompt_collapses_each_image_to_one_placeholder(ckpt):
    features = ckpt.features
    ids = ckpt.inputs[2]["input_ids"][0].tolist()
    prompt = ckpt.family.vllm_prompt(ids, features[2])
    image_id = ckpt.model.config.image_token_id
    assert prompt["prompt_token_ids"].count(image_id) == 2
    assert len(prompt["prompt_token_ids"]) == len(ids) - (72 + 50) + 2
    data = prompt["multi_modal_data"]["image"]
    assert tuple(data["image_embeds"].shape) == (72 + 50, 64)
    assert data["image_grid_thw"].tolist() == [[1, 12, 24], [1, 20, 10]]
    assert "multi_modal_data" not in ckpt.family.vllm_prompt(ckpt.inputs[0]["input_ids"][0]
                                                             .tolist(), [])
    with pytest.raises(ValueError, match="takes 72 prompt tokens"):
        ckpt.family.vllm_prompt(ids[: ids.index(image_id) + 10], features[2])


def vllm_parameters(model) -> tuple[int, int]:
    """In vLLM's worker: (vision tower parameters, all parameters)."""
    visual = sum(p.numel() for p in model.visual.parameters())
    return visual, sum(p.numel() for p in model.parameters())


def test_vllm_generates_from_the_features_as_image_embeds(qwen2_5_vl, monkeypatch):
    """vLLM 0.32's Qwen2.5-VL takes image_embeds [tokens, hidden] with image_grid_thw
    [images, 3] and one <|image_pad|> per image; image and video limits 0 load no tower (the
    tower serves both: with only image 0 vLLM loads it)."""
    from vllm import LLM, SamplingParams

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # for apply_model
    ckpt = qwen2_5_vl
    prompts = [ckpt.family.vllm_prompt(inp["input_ids"][0].tolist(), fs)
               for inp, fs in zip(ckpt.inputs, ckpt.features)]
    llm = LLM(model=str(ckpt.path), **VLLM_ENGINE_ARGS, dtype="float32", enforce_eager=True,
              max_model_len=512, max_num_seqs=4, seed=0)
    try:
        (visual, total), = llm.apply_model(vllm_parameters)
        assert visual == 0 and total > 0
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=STEPS))
        assert [list(o.outputs[0].token_ids) for o in outs] == ckpt.expected
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_real_processor_token_counts():
    """The real checkpoints' image sizes (patch 14, merge 2, 56*56 to 28*28*16384 pixels): an
    image's tokens are its pixels rounded to multiples of 28, over 28*28."""
    processor = build_processor(real_sizes=True).image_processor
    counts = {}
    for size in [(336, 336), (1024, 768), (64, 64)]:
        grid = processor(images=[Image.new("RGB", size)], return_tensors="np")["image_grid_thw"]
        counts[size] = image_tokens(grid[0], 2)
    assert counts == {(336, 336): 144, (1024, 768): 37 * 27, (64, 64): 4}
