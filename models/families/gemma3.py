"""A tiny random-weight Gemma 3 checkpoint (``Gemma3ForConditionalGeneration``), built offline.

Everything the real checkpoint has, at toy sizes: a SigLIP tower (64 px, patch 8: 8x8 patches)
whose output the ``Gemma3MultiModalProjector`` average-pools to 16 tokens per image, a Gemma 3
text model with one sliding-window and one global layer, Gemma's special tokens
(``<start_of_image>``, ``<image_soft_token>``, ``<end_of_image>``, ``<start_of_turn>``, ...)
in a BPE tokenizer trained here on a few KB of text (Gemma's layout: spaces as ``▁``, byte
fallback, the newline runs ``\\n`` .. ``\\n\\n\\n\\n`` as single tokens), the real chat template
and a ``Gemma3Processor`` with ``Gemma3ImageProcessor``. ``python -m models.families.gemma3 DIR``
writes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Gemma's special tokens at small ids (the real checkpoint: pad 0, eos 1, bos 2, unk 3,
# <start_of_turn> 105, <end_of_turn> 106, <start_of_image> 255999, <end_of_image> 256000,
# <image_soft_token> 262144).
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
           "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
PAD, EOS, BOS, UNK, SOT, EOT, BOI, EOI, IMAGE = range(len(SPECIAL))
# Single tokens in Gemma's vocab (vLLM's Gemma 3 processor looks them up).
NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]

IMAGE_SIZE = 64
PATCH = 8
MM_TOKENS = 16  # 8x8 patches average-pooled 2x2 -> 4x4
SLIDING_WINDOW = 48  # smaller than a two-image prompt, so the sliding layer's window matters
# The real checkpoints tie lm_head to the embedding; tied at this size, random weights make greedy
# decoding repeat the prompt's last token, so a test could not tell a wrong merge or mask apart.
TIE = False

# The real checkpoint's chat template (google/gemma-3-*-it), verbatim.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate "
    "user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

_WORDS = ("the a an image picture photo shows what is in this of on left right top bottom red "
          "green blue yellow circle square triangle cross describe colour shape where here are "
          "some crops to help you see better original and it there model user answer question "
          "small large").split()


def _corpus() -> list[str]:
    """A few KB of deterministic text over a small vocabulary, with the processor's own phrases."""
    import random

    rng = random.Random(1234)
    lines = ["Here is the original image and here are some crops to help you see better"]
    for _ in range(400):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 10)))
        lines.append(words + rng.choice(".?!,"))
    return lines


def build_tokenizer():
    """Gemma-layout BPE: ``▁`` for spaces, byte fallback, newline runs and specials as tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(
        vocab_size=len(SPECIAL) + len(NEWLINES) + len(byte_tokens) + 200,
        special_tokens=SPECIAL + NEWLINES + byte_tokens, show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Newline runs are ordinary (not special) tokens in Gemma's vocab: keep them in the text.
    tok.add_tokens([AddedToken(n, normalized=False, special=False) for n in NEWLINES])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    vocab = tok.get_vocab()
    assert [vocab[s] for s in SPECIAL] == list(range(len(SPECIAL))), "special ids moved"
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", add_bos_token=True, add_eos_token=False,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>",
                              "start_of_turn_token": "<start_of_turn>",
                              "end_of_turn_token": "<end_of_turn>"},
        model_max_length=2048,
    )


def build_processor(tokenizer=None, *, real_sizes: bool = False):
    """``Gemma3Processor``: the tiny model's sizes, or with ``real_sizes`` the real checkpoint's
    (896 px, 256 tokens per image, pan-and-scan crops of at least 256 px)."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    size = 896 if real_sizes else IMAGE_SIZE
    image_processor = Gemma3ImageProcessor(
        size={"height": size, "width": size}, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], do_convert_rgb=True, do_pan_and_scan=False,
        pan_and_scan_min_crop_size=256 if real_sizes else 2 * IMAGE_SIZE // 4,
        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2,
    )
    return Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(),
        chat_template=CHAT_TEMPLATE, image_seq_length=256 if real_sizes else MM_TOKENS,
    )


def build_config(vocab_size: int, *, real_geometry: bool = False):
    """The tiny model's config; with ``real_geometry`` its vision side has the real checkpoint's
    geometry (896 px, patch 14, 256 tokens per image) at the same tiny widths."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512, pad_token_id=PAD, eos_token_id=[EOS, EOT], bos_token_id=BOS,
        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=TIE,
    )
    vision = SiglipVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        image_size=896 if real_geometry else IMAGE_SIZE, patch_size=14 if real_geometry else PATCH,
        vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(),
        mm_tokens_per_image=256 if real_geometry else MM_TOKENS,
        boi_token_index=BOI, eoi_token_index=EOI, image_token_index=IMAGE,
        tie_word_embeddings=TIE,
    )
    config.architectures = ["Gemma3ForConditionalGeneration"]
    return config


def build(out_dir: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint, processor and tokenizer to ``out_dir``; same seed, same files."""
    import torch
    from transformers import Gemma3ForConditionalGeneration, GenerationConfig

    from models.shapes.train import to_llava_hf_layout

    out_dir = Path(out_dir)
    processor = build_processor()
    config = build_config(len(processor.tokenizer))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # A zero-initialised projection would give every image the same (zero) features.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.3)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS, eos_token_id=[EOS, EOT], pad_token_id=PAD, do_sample=False
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    # The real checkpoints (and vLLM's loader) name the tower vision_tower.vision_model.*.
    to_llava_hf_layout(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
