"""A tiny random-weight LLaVA-NeXT checkpoint (llava-v1.6-vicuna layout), built offline.

The stock classes throughout (``LlavaNextForConditionalGeneration``, ``LlavaNextProcessor``
with ``LlavaNextImageProcessor``), so the directory loads like a hub checkpoint in transformers
and in vLLM. Sizes are the real checkpoint's scaled down by 336 / 32: a 32-px CLIP tile of
8-px patches (16 patches + CLS), grid pinpoints scaled the same, a 2-layer Llama (head size 32)
and a byte-level BPE tokenizer with Llama's special tokens and LLaVA's ``<image>``.

    python -m models.families.llava_next OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

# The real checkpoint (llava-hf/llava-v1.6-vicuna-7b-hf): 336-px tiles, 14-px patches.
REAL_TILE = 336
REAL_PATCH = 14
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

TILE = 32
PATCH = 8
PINPOINTS = [[h * TILE // REAL_TILE, w * TILE // REAL_TILE] for h, w in REAL_PINPOINTS]
TEXT_POSITIONS = 2048

UNK, BOS, EOS, IMAGE, PAD = "<unk>", "<s>", "</s>", "<image>", "<pad>"

# chat_template.json of llava-hf/llava-v1.6-vicuna-7b-hf (and llava-1.5-7b-hf):
# "USER: <image>\nWhat is this? ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# A few KB of text for the BPE merges; what it says does not matter, only that it is fixed.
_CORPUS = """\
USER: What is shown in this image? ASSISTANT: The image shows a red circle on the left side.
USER: Describe the picture in detail. ASSISTANT: A small blue square sits near the top of a
grey background, and a green triangle is drawn at the bottom right corner of the frame.
USER: How many objects are there? ASSISTANT: There are two objects: a yellow cross and a
purple circle. USER: What colour is the shape? ASSISTANT: The shape is orange.
The quick brown fox jumps over the lazy dog. A large language model reads the prompt, looks at
the image features placed where the image tokens were, and writes an answer one token at a time.
Vision encoders split a high resolution picture into tiles; each tile becomes a grid of patches,
and every patch becomes one feature vector after the projector. A newline vector ends each row.
Serving systems batch requests together, pad them on the left, and keep a cache of keys and
values so that each new token costs only one step of the decoder. Numbers: 0 1 2 3 4 5 6 7 8 9.
"""


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=[UNK, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer)
    # Llama's ids: <unk>=0, <s>=1, </s>=2; Llama prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        model_max_length=TEXT_POSITIONS, padding_side="left",
    )
    # As in the real checkpoint, <image> then <pad> come right after the base vocabulary.
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    fast.add_special_tokens({"pad_token": PAD})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor(tile: int = TILE, pinpoints=None):
    """LLaVA-NeXT's image processor; ``build_image_processor(REAL_TILE, REAL_PINPOINTS)`` has
    the real checkpoint's settings."""
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints or PINPOINTS,
    )


def build_processor(tokenizer=None, tile: int = TILE, patch: int = PATCH, pinpoints=None):
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(
        image_processor=build_image_processor(tile, pinpoints),
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, seed: int = 0, tile: int = TILE, patch: int = PATCH, pinpoints=None):
    """The random-weight model; ``tile``, ``patch`` and ``pinpoints`` as in build_processor."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
    )

    vocab = len(tokenizer)  # every id decodes (the real one pads to 32064)
    vision = CLIPVisionConfig(
        image_size=tile, patch_size=patch, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=TEXT_POSITIONS, bos_token_id=1, eos_token_id=2,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config = LlavaNextConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_grid_pinpoints=pinpoints or PINPOINTS,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    # Random init is small; wider weights make greedy tokens depend on the image features,
    # so a misplaced feature row changes the output.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    return model


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write the checkpoint, tokenizer and processor into ``out_dir``; returns it."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out_dir)
    build_processor(tokenizer).save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
