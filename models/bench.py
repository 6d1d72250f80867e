"""A bench-size LLaVA: random weights at a size where batching, not Python, decides the speed.

The shapes LLaVA has 170 k parameters, so a served request spends its time in HTTP and Python.
This model has the shapes model's tokenizer and chat template, but a Llama of about 100 M
parameters (hidden 768, 12 heads of 64, 12 layers) and a CLIP ViT-B/16 vision tower at 224 px
(196 patch tokens + CLS), joined by llava-1.5's two-layer projector. Its weights are a seeded
random initialization, saved as float32 safetensors in the llava-hf layout, so both engines
(transformers and vLLM) load it like a hub checkpoint. It answers with arbitrary tokens:
benchmarks ask for fixed lengths with ``ignore_eos``.

Beside it, a bench-size CLIP (``build_bench_clip``): the same random ViT tower as the CLIP image
tower, a small text tower with the shapes CLIP tokenizer, so that ``/embed`` and the CLIP feature
cache are measured on an image tower that costs what a real one costs (the shapes CLIP's 64-px
tower costs less than the request's HTTP handling).

Every size is a parameter (``BenchSize``), so tests build a reduced variant through the same
code. Attention heads are always 64 wide (vLLM's CPU attention kernels need head size 64).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HEAD_DIM = 64
STORE_NAME = "lmm-bench-llava"
CLIP_STORE_NAME = "lmm-bench-clip"
CLIP_TEXT = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
             "num_hidden_layers": 4}  # a small text tower: the image tower is what is measured
CLIP_PROJECTION = 512


@dataclass(frozen=True)
class BenchSize:
    """Sizes of the bench LLaVA; the defaults are the bench model itself."""

    hidden: int = 768  # Llama hidden size; heads = hidden // 64
    layers: int = 12
    intermediate: int = 2560  # Llama MLP width: 12 layers x 8.26 M + embeddings = 99 M
    vision_hidden: int = 768  # CLIP ViT-B/16: 768 wide, 12 heads of 64, 12 layers, MLP 3072
    vision_layers: int = 12
    vision_intermediate: int = 3072
    image_size: int = 224
    patch_size: int = 16
    max_positions: int = 2048  # RoPE table; configs/default.yaml's max_model_len

    def __post_init__(self) -> None:
        for name in ("hidden", "vision_hidden"):
            if getattr(self, name) % HEAD_DIM:
                raise ValueError(f"{name} must be a multiple of {HEAD_DIM} (the head size)")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.max_positions < self.image_tokens + 1:
            raise ValueError("max_positions leaves no room beside one image's tokens")

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM

    @property
    def vision_heads(self) -> int:
        return self.vision_hidden // HEAD_DIM

    @property
    def image_tokens(self) -> int:
        """Prompt tokens per image: one per patch (CLS is dropped, llava-1.5's "default")."""
        return (self.image_size // self.patch_size) ** 2


def bench_config(size: BenchSize = BenchSize()):
    """The LlavaConfig of ``size``, with the shapes tokenizer's vocabulary and special ids."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from models.shapes.build import BOS, EOS, IMAGE, PAD, build_llava_tokenizer

    tokenizer = build_llava_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, IMAGE)}
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=size.max_positions,
        pad_token_id=ids[PAD],
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
    )
    vision_config = CLIPVisionConfig(
        image_size=size.image_size,
        patch_size=size.patch_size,
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_attention_heads=size.vision_heads,
        num_hidden_layers=size.vision_layers,
        projection_dim=size.vision_hidden,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=ids[IMAGE],
        image_seq_length=size.image_tokens,
        # The last layer's patch tokens: the tower holds exactly the layers that run, so every
        # one of its layers costs what it would in a real model of this size.
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )


def parameter_counts(config) -> dict[str, int]:
    """Parameters per part of a LLaVA built from ``config``, counted on the meta device (no
    memory is allocated, so the full size is counted as cheaply as a reduced one)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    parts = {
        "language_model": count(model.model.language_model) + count(model.lm_head),
        "vision_tower": count(model.model.vision_tower),
        "projector": count(model.model.multi_modal_projector),
    }
    return {**parts, "total": count(model)}


def build_bench_llava(size: BenchSize = BenchSize(), seed: int = 0):
    """A randomly initialized LLaVA of ``size`` (seeded) and its LlavaProcessor."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        GenerationConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from models.shapes.build import CHAT_TEMPLATE, IMAGE, build_llava_tokenizer

    config = bench_config(size)
    tokenizer = build_llava_tokenizer()
    tokenizer.model_max_length = size.max_positions
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id, max_new_tokens=16,
    )
    processor = LlavaProcessor(
        # PIL backend (no torchvision); shortest edge + centre crop, as in every CLIP checkpoint.
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size.image_size},
            crop_size={"height": size.image_size, "width": size.image_size},
        ),
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLS, which "default" drops again
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )
    return model, processor


def save_bench_llava(out_dir: Path, size: BenchSize = BenchSize(), seed: int = 0,
                     progress: Callable[[str], None] = lambda line: None) -> dict[str, int]:
    """Build the model and write a ``save_pretrained`` directory (llava-hf layout) to
    ``out_dir``; returns its parameter counts."""
    from models.shapes.train import to_llava_hf_layout

    started = time.monotonic()
    elapsed = lambda: f"{time.monotonic() - started:6.1f}s"  # noqa: E731
    counts = parameter_counts(bench_config(size))
    progress(f"{elapsed()}  sizes {json.dumps(dataclasses.asdict(size))}")
    progress(f"{elapsed()}  parameters: language model {counts['language_model']:,}, vision "
             f"tower {counts['vision_tower']:,}, projector {counts['projector']:,}, total "
             f"{counts['total']:,} ({counts['total'] * 4 / 2**20:,.0f} MiB float32)")
    progress(f"{elapsed()}  initializing random weights (seed {seed}) ...")
    model, processor = build_bench_llava(size, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    progress(f"{elapsed()}  writing {out_dir} ...")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    del model
    to_llava_hf_layout(out_dir)  # vision_tower.vision_model.*: what vLLM's loader reads
    progress(f"{elapsed()}  saved ({sum(p.stat().st_size for p in out_dir.iterdir()):,} bytes)")
    return counts


def build_bench_clip(size: BenchSize = BenchSize(), seed: int = 0):
    """A randomly initialized CLIP (seeded) whose image tower has the bench LLaVA's vision
    sizes, with the shapes CLIP tokenizer; and its CLIPProcessor."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
    )

    from models.shapes.build import BOS, CLIP_TEXT_POSITIONS, EOS, PAD, build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS)}
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=CLIP_TEXT_POSITIONS,
        projection_dim=CLIP_PROJECTION, pad_token_id=ids[PAD], bos_token_id=ids[BOS],
        eos_token_id=ids[EOS], **CLIP_TEXT)
    config = CLIPConfig(text_config=text.to_dict(),
                        vision_config=bench_config(size).vision_config.to_dict(),
                        projection_dim=CLIP_PROJECTION)
    torch.manual_seed(seed)
    model = CLIPModel(config).to(torch.float32).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size.image_size},
            crop_size={"height": size.image_size, "width": size.image_size},
        ),
        tokenizer=tokenizer,
    )
    return model, processor


def save_bench_clip(out_dir: Path, size: BenchSize = BenchSize(), seed: int = 0) -> int:
    """Build the bench CLIP and write a ``save_pretrained`` directory; returns its parameter
    count."""
    model, processor = build_bench_clip(size, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return sum(p.numel() for p in model.parameters())
