"""LLaVA-NeXT on the split path, run for real on a tiny random checkpoint: every image of every
prompt encoded in one VisionPart.encode call, then the prompts prefilled together left-padded
and decoded with per-row positions (as the transformers engine does), and the same features
given to vLLM as image embeddings: greedy tokens equal the whole model's generate()."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.families.llava_next import PARTS, LlavaNextFamily, num_crops
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


def test_split_path_equals_generate(ckpt, hf, family, requests, expected):
    vision = family.vision(ckpt, "cpu", torch.float32)
    all_inputs = [im for _, _, inputs in requests for im in inputs]
    calls = []
    tower = vision.model.model.vision_tower
    handle = tower.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        features = vision.encode(all_inputs)
    finally:
        handle.remove()
    assert calls == [5 + 3 + 4]  # one tower pass over every crop of every image
    tokens = [f.embeds.shape[0] for f in features]
    assert len(set(tokens)) == 3  # 64x64, 96x48 and 40x100 give different counts
    # Each image's rows are exactly its placeholders in the prompt the processor made.
    assert [tokens[0], tokens[1] + tokens[2]] == [
        ids.count(family.image_token_id) for _, ids, _ in requests[1:]]
    language = family.language(ckpt, "cpu", torch.float32)
    assert language.model.model.vision_tower is None
    split, k = [], 0
    for _, _, inputs in requests:
        split.append(features[k:k + len(inputs)])
        k += len(inputs)
    got = greedy(language, [ids for _, ids, _ in requests], split, STEPS)
    eos = language.text_config.eos_token_id
    assert [_until_eos(g, eos) for g in got] == expected
    # The features matter: with the image's rows zeroed the prompt continues otherwise.
    from lmm.families import ImageFeatures

    blank = [ImageFeatures(np.zeros_like(features[0].embeds))]
    assert _until_eos(greedy(language, [requests[1][1]], [blank], STEPS)[0], eos) != expected[1]
