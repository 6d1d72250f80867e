"""A tiny random-weight Qwen2.5-VL (or Qwen2-VL) checkpoint, built offline.

Config, processor, tokenizer and chat template are the real ones' classes and layout at small
sizes: a byte-level BPE trained here on a few KB of text with Qwen's special tokens added after
it (so their ids are small, and the config's ``image_token_id`` etc. point at them), the real
``Qwen2VLImageProcessor`` with patch 4 (an image of H x W pixels gives (H/8) * (W/8) image
tokens), and the real checkpoint's chat template.

    python -m models.families.qwen2_5_vl OUT_DIR [--seed N] [--qwen2-vl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Qwen's special tokens in the real tokenizer's order (ids 151643.. there, VOCAB.. here).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
BPE_VOCAB = 400  # byte-level BPE size before the special tokens
VOCAB_SIZE = 432  # the embedding rows: the tokenizer's 414, rounded up as real checkpoints do

# The pre-tokenizer split of Qwen2's tokenizer.json.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-VL / Qwen2.5-VL Instruct's chat_template, as the checkpoints ship it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Image processor sizes: the real checkpoints' are patch 14, merge 2, temporal 2,
# min_pixels 56*56, max_pixels 28*28*16384 (REAL_IMAGE_PROCESSOR); here patch 4 keeps images cheap.
PATCH = 4
MERGE = 2
TINY_IMAGE_PROCESSOR = dict(
    patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
    size={"shortest_edge": 16 * 16, "longest_edge": 128 * 128},
)
REAL_IMAGE_PROCESSOR = dict(
    patch_size=14, merge_size=2, temporal_patch_size=2,
    size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384},
)

_WORDS = (
    "the a an image picture photo shows what is in this of on left right top bottom colour red "
    "green blue yellow circle square triangle cross shape small large there are two one three "
    "describe please answer question where which how many and with near far background you "
    "assistant user system helpful I can see it looks like text model vision language token"
).split()


def _training_text() -> list[str]:
    """A few KB of deterministic sentences over a small vocabulary, digits and punctuation."""
    lines = []
    for i in range(160):
        words = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(6 + i % 5)]
        lines.append(" ".join(words).capitalize() + ("?" if i % 3 else ".") + f" {i % 10}\n")
    return lines


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def build_processor(tokenizer=None, real_sizes: bool = False, qwen2_vl: bool = False):
    """The family's processor; ``real_sizes`` gives the real checkpoints' image sizes."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    sizes = REAL_IMAGE_PROCESSOR if real_sizes else TINY_IMAGE_PROCESSOR
    cls = Qwen2VLProcessor if qwen2_vl else Qwen2_5_VLProcessor
    return cls(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, qwen2_vl: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        rms_norm_eps=1e-6, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        # head size 32: mrope_section halves of it per (t, h, w), as [16, 24, 24] of 128
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": [4, 6, 6]},
        # weights large enough that M-RoPE positions and image rows sway the greedy tokens
        initializer_range=0.2,
    )
    if qwen2_vl:
        vision = dict(depth=2, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=2,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
        cls = Qwen2VLConfig
    else:
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                      out_hidden_size=64, patch_size=PATCH, spatial_merge_size=MERGE,
                      temporal_patch_size=2, window_size=4 * PATCH, fullatt_block_indexes=[1],
                      tokens_per_second=2)
        cls = Qwen2_5_VLConfig
    return cls(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build(out_dir: Path, seed: int = 0, qwen2_vl: bool = False) -> Path:
    """Write a tiny random Qwen2.5-VL (``qwen2_vl``: Qwen2-VL) checkpoint into ``out_dir``."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, qwen2_vl=qwen2_vl)
    config = build_config(tokenizer, qwen2_vl)
    cls = Qwen2VLForConditionalGeneration if qwen2_vl else Qwen2_5_VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        pad_token_id=config.text_config.pad_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"),
                      tokenizer.convert_tokens_to_ids("<|endoftext|>")],
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--qwen2-vl", action="store_true", help="Qwen2-VL instead of Qwen2.5-VL")
    args = parser.parse_args(argv)
    out = build(args.out_dir, args.seed, args.qwen2_vl)
    print(json.dumps({"out_dir": str(out)}))


if __name__ == "__main__":
    main()
