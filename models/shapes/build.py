"""Fresh (untrained) tiny LLaVA and CLIP models with their tokenizers and processors.

Everything is constructed from code, so nothing needs a model hub. The objects are the stock
transformers classes, which makes the saved directories load exactly like hub checkpoints.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from models.shapes.data import COLORS, POSITIONS, QUESTIONS, SHAPES

IMAGE_SIZE = 32
PATCH_SIZE = 4
# CLS is dropped by vision_feature_select_strategy="default", leaving one token per patch.
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
LLAVA_TEXT_POSITIONS = 512
CLIP_TEXT_POSITIONS = 32

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
# Fixed order, so ids are stable: <pad>=0, <unk>=1, <s>=2, </s>=3, <image>=4. CLIP's text tower
# treats eos_token_id == 2 as "legacy argmax pooling"; keeping EOS at 3 pools at the real EOS.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)

# LLaVA-1.5 layout: "USER: <image> What shape is this? ASSISTANT: a circle</s>". Image parts
# may be {"type": "image"} (HF) or the OpenAI-style names. System messages are accepted and
# deliberately not rendered: the model was never trained on them and every word would be <unk>.
# BOS is not emitted here; the tokenizer adds it (training makes the model robust either way).
CHAT_TEMPLATE = (
    "{#- LLaVA-1.5 style. System messages are accepted but not rendered (the model was never "
    "trained on them). -#}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}"
    "{{- message['role'] | upper ~ ':' -}}"
    "{%- if message['content'] is string -%}"
    "{{- ' ' ~ message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] in ['image', 'image_url', 'input_image'] -%}"
    "{{- ' <image>' -}}"
    "{%- elif part['type'] == 'text' -%}"
    "{{- ' ' ~ part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{- '</s>' -}}{%- endif -%}"
    "{{- ' ' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def _words(texts: list[str]) -> list[str]:
    """Distinct lower-cased words and punctuation marks of `texts`, in first-seen order."""
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    seen: dict[str, None] = {}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def _answer_texts() -> list[str]:
    # Every answer is "a <shape>", a colour, a position, or a caption using the same words.
    return ["a", *SHAPES, *COLORS, *POSITIONS, "on the", "in the"]


def build_word_tokenizer(
    texts: list[str], *, max_length: int, append_eos: bool, padding_side: str = "right"
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of `texts`; unknown words become `<unk>`.

    Encoding prepends `<s>`, and also appends `</s>` when `append_eos` (CLIP pools there).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in _words(texts):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Lower-casing keeps "What"/"what" one token; punctuation is split off so "this?" works.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    # WordPiece's decoder joins words with spaces and re-attaches punctuation ("this?").
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}" if append_eos else f"{BOS} $A",
        special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=max_length,
        padding_side=padding_side,
    )


def build_llava_tokenizer() -> PreTrainedTokenizerFast:
    """LLaVA tokenizer: prepends `<s>`; the model ends its answers with `</s>`."""
    questions = [q for qs in QUESTIONS.values() for q in qs]
    texts = ["USER: ASSISTANT:", *questions, *_answer_texts()]
    # Left padding: batched generation continues every row from the right edge.
    tok = build_word_tokenizer(
        texts, max_length=LLAVA_TEXT_POSITIONS, append_eos=False, padding_side="left"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    """CLIP tokenizer: `<s> caption </s>`; the text tower pools at `</s>`."""
    return build_word_tokenizer(_answer_texts(), max_length=CLIP_TEXT_POSITIONS, append_eos=True)


def build_image_processor() -> CLIPImageProcessorPil:
    # The PIL backend needs no torchvision. Shortest edge + centre crop as in every CLIP
    # checkpoint; square inputs are therefore only resized.
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )


def _vision_config(**overrides: int) -> CLIPVisionConfig:
    kwargs = {
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "projection_dim": 64,
    }
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def build_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    tokenizer = build_llava_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LLAVA_TEXT_POSITIONS,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
    )
    config = LlavaConfig(
        vision_config=_vision_config(),
        text_config=text_config,
        image_token_index=ids[IMAGE],
        image_seq_length=NUM_IMAGE_TOKENS,
        # The last layer's patch tokens; the tower has exactly the layers that are used, so a
        # wrong feature layer cannot hide behind an untrained pass-through layer.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD], max_new_tokens=16
    )
    processor = LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, which "default" then drops again
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )
    return model, processor


def build_clip(seed: int = 0) -> tuple[CLIPModel, CLIPProcessor]:
    tokenizer = build_clip_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=CLIP_TEXT_POSITIONS,
        projection_dim=64,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=_vision_config().to_dict(),
        projection_dim=64,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPProcessor(image_processor=build_image_processor(), tokenizer=tokenizer)
    return model, processor


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
