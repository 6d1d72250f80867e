"""Model families: for one architecture, what each service computes and what travels between them.

The split path is the same for every family:

- API service: the family's HF processor turns the chat text and images into prompt token ids
  (each image's placeholder token repeated once per feature row it will get) and, through
  ``Family.image_inputs``, one ``ImageInput`` per image: that image's processor outputs.
- Vision runner: ``Family.vision(...)`` loads only the vision part (tower, projector, whatever
  the family's own ``get_image_features`` runs) and ``VisionPart.encode`` turns a list of
  ``ImageInput`` (from many requests: it is batched) into one ``ImageFeatures`` per image. Inputs
  with the same ``group()`` are stacked into one forward pass; different groups run one after
  another.
- LLM runner: the prompt ids and the request's ``ImageFeatures`` (in prompt order). On the
  transformers engine ``Family.language(...)`` loads only the language model and says how to
  build a prompt's input embeddings, positions and attention; on vLLM ``Family.vllm_prompt``
  makes the prompt dict vLLM takes (embeddings as ``multi_modal_data``, never pixels).

The families this build serves are ``REGISTRY`` (below): ``family_for(model_path)`` picks one
from the checkpoint's config.json ``architectures`` and ``lmm.architectures`` refuses any other at
startup. What travels: LLaVA-1.5's images all take the same tokens, so its pixels and features
stay stacked arrays (BentoML's adaptive batching); every other family's go per image, as a list
of ``{"embeds": ..., **meta}`` arrays (``features_to_wire``), which BentoML's runner clients pickle
as they are.

A family reuses the model's own code (its ``get_image_features``, its position and mask logic)
rather than re-writing it, so greedy tokens from the split path equal the whole model's
``generate()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class ImageInput:
    """One image's vision inputs as the processor made them, batch axis removed (numpy).

    LLaVA-1.5: ``{"pixel_values": [3, H, W]}``; LLaVA-NeXT: ``{"pixel_values": [crops, 3, H, W],
    "image_sizes": [2]}``; Qwen2.5-VL: ``{"pixel_values": [patches, C*T*P*P],
    "image_grid_thw": [3]}``. Their bytes are the image's identity for the feature cache.
    """

    arrays: dict[str, np.ndarray]

    def group(self) -> tuple:
        """Inputs of one group can be stacked into one forward pass (same shapes)."""
        return tuple(sorted((name, a.shape, str(a.dtype)) for name, a in self.arrays.items()))


@dataclass
class ImageFeatures:
    """One image's features as they travel vision runner -> API -> LLM runner.

    ``embeds`` is [tokens, hidden] in the wire dtype (``lmm.transfer``), ``tokens`` being the
    number of placeholder tokens the processor put in the prompt for this image. ``meta`` is
    what the LLM runner needs besides (Qwen2.5-VL: ``image_grid_thw`` [3] for M-RoPE positions).
    """

    embeds: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)


class VisionPart(Protocol):
    def encode(self, images: Sequence[ImageInput]) -> list[ImageFeatures]:
        """One ImageFeatures per input, in order; same-group inputs in one forward pass."""


class LanguagePart(Protocol):
    """The language model of a family as the transformers engine drives it."""

    embed: Any  # the input embedding module (get_input_embeddings())
    decoder: Any  # the text decoder: takes inputs_embeds, attention_mask, position_ids, cache
    lm_head: Any
    text_config: Any
    image_token_id: int | None

    def inputs_embeds(self, token_ids: "torch.Tensor", images: Sequence[ImageFeatures]
                      ) -> "torch.Tensor":
        """[L, hidden]: the prompt's embeddings with each image's rows at its placeholders."""

    def positions(self, token_ids: "torch.Tensor", images: Sequence[ImageFeatures]
                  ) -> tuple["torch.Tensor", int]:
        """The prompt's position ids, [P, L] (P = 1 for plain RoPE, 3 for M-RoPE), and the
        offset of the first generated token's position from the prompt length (Qwen's rope
        delta; 0 for plain positions). Token t of the output sits at L + offset + t."""

    def attention(self, mask: "torch.Tensor", token_ids: "torch.Tensor") -> Any:
        """What the decoder takes as ``attention_mask`` for a left-padded prefill batch: the
        [B, L] padding mask as it is, unless the family attends otherwise (Gemma 3: image
        tokens attend to each other both ways)."""


class Family(Protocol):
    name: str  # "llava", "llava_next", "qwen2_5_vl", "gemma3", "text"
    architectures: tuple[str, ...]  # config.json architectures it serves
    takes_images: bool
    # Every image the same shape: the API sends one stacked [N, 3, H, W] array (the vision
    # runner's ``encode``, BentoML's adaptive batching) and the LLM runner gets ``image_features``
    # [N, tokens, hidden]; otherwise per image (``encode_images``, ``ImageFeatures``).
    stacked: bool

    def image_inputs(self, processed: Mapping[str, np.ndarray], n_images: int
                     ) -> list[ImageInput]:
        """The processor's batch outputs (one prompt, ``n_images`` images) split per image."""

    def vision(self, model_path: str | Path, device: str, dtype: "torch.dtype") -> VisionPart:
        """Load only the vision part."""

    def language(self, model_path: str | Path, device: str, dtype: "torch.dtype"
                 ) -> LanguagePart:
        """Load only the language model."""

    def vllm_prompt(self, token_ids: list[int], images: Sequence[ImageFeatures]) -> dict:
        """vLLM's prompt: ``prompt_token_ids`` as vLLM's processor wants them (placeholders
        collapsed where it expands them itself) and ``multi_modal_data`` with embeddings."""


def load_whole_keeping(model_path: str | Path, keep: str, parts: Mapping[str, Sequence[str]],
                       device, dtype):
    """The checkpoint loaded whole (``from_pretrained``), then every module root of the parts
    other than ``keep`` set to None (the other runner holds them), in eval mode on ``device``.
    ``parts`` is a family's ``PARTS``: part -> module roots (``lmm.loading`` reads only a part's
    tensors, for LLaVA-1.5)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(model_path), dtype=dtype)
    for part, roots in parts.items():
        if part == keep:
            continue
        for root in roots:
            owner, _, attr = root.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, None)
    return model.eval().to(device)


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One family as this build serves it; the module is imported only when it is used."""

    name: str
    architectures: tuple[str, ...]  # config.json architectures; "*ForCausalLM" matches a suffix
    module: str
    attr: str  # a Family instance, or a class (built with from_pretrained(model_path) or ())
    what: str  # what the checkpoint is, for messages and /model_info
    vllm_args: tuple = ()  # (name, value) pairs of vLLM engine args the family needs
    vllm_worker_setup: str = ""  # "module:function" run in each vLLM worker before it loads

    def matches(self, architecture: str) -> bool:
        return any(architecture == a or (a.startswith("*") and architecture.endswith(a[1:])
                                         and len(architecture) > len(a) - 1)
                   for a in self.architectures)


REGISTRY: tuple[Entry, ...] = (
    Entry("llava", ("LlavaForConditionalGeneration",), "lmm.families.llava", "LlavaFamily",
          "LLaVA-1.5 layout: CLIP vision tower + projector + a Llama-family language model"),
    Entry("qwen2_5_vl", ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration"),
          "lmm.families.qwen2_5_vl", "Qwen2_5_VLFamily",
          "Qwen2.5-VL / Qwen2-VL: dynamic-resolution ViT with patch merger, M-RoPE language model",
          vllm_args=(("limit_mm_per_prompt", {"image": 0, "video": 0}),)),
    Entry("llava_next", ("LlavaNextForConditionalGeneration",), "lmm.families.llava_next",
          "LlavaNextFamily",
          "LLaVA-NeXT (1.6): any-resolution tiles + CLIP tower + projector + image_newline",
          vllm_worker_setup="lmm.families.llava_next:allow_vllm_embeds_of_any_length"),
    Entry("gemma3", ("Gemma3ForConditionalGeneration",), "lmm.families.gemma3", "FAMILY",
          "Gemma 3: SigLIP tower + pooling projector, image blocks attended both ways"),
    Entry("text", ("*ForCausalLM",), "lmm.families.text", "TextFamily",
          "a text-only decoder LLM (Llama, Qwen2, Mistral, ...): no images"),
)


def entry_for(architecture: str) -> Entry | None:
    for entry in REGISTRY:
        if entry.matches(architecture):
            return entry
    return None


def supported() -> dict[str, str]:
    """Architecture (or pattern) -> what serves it, every family of the registry."""
    return {a: e.what for e in REGISTRY for a in e.architectures}


def family_for(model_path: str | Path) -> "Family":
    """The family serving the checkpoint at ``model_path`` (from config.json architectures);
    ValueError naming the supported architectures when none does."""
    import importlib

    from lmm.architectures import architecture_of

    found = architecture_of(model_path)
    entry = entry_for(found)
    if entry is None:
        raise ValueError(f"{model_path} is a {found or 'checkpoint without architectures'}; "
                         f"served architectures: {', '.join(supported())}")
    obj = getattr(importlib.import_module(entry.module), entry.attr)
    if isinstance(obj, type):
        obj = obj.from_pretrained(model_path) if hasattr(obj, "from_pretrained") else obj()
    return obj


# -- what travels between the services -------------------------------------------------------
EMBEDS = "embeds"


def features_to_wire(images: Sequence[ImageFeatures]) -> list[dict[str, np.ndarray]]:
    """Per image ``{"embeds": [tokens, hidden], **meta}``: a list of arrays, which BentoML's
    runner client carries as they are (pickled, buffers out of band; bfloat16 as uint16)."""
    out = []
    for f in images:
        if EMBEDS in f.meta:
            raise ValueError(f"image meta may not be named {EMBEDS!r}")
        out.append({EMBEDS: f.embeds, **f.meta})
    return out


def features_from_wire(items: Sequence[Mapping[str, np.ndarray]]) -> list[ImageFeatures]:
    out = []
    for i, item in enumerate(items):
        if EMBEDS not in item:
            raise ValueError(f"image {i}: no {EMBEDS!r} array sent")
        meta = {k: np.asarray(v) for k, v in item.items() if k != EMBEDS}
        out.append(ImageFeatures(np.asarray(item[EMBEDS]), meta))
    return out


def as_image_features(images) -> list[ImageFeatures]:
    """An engine's images: a list of ImageFeatures as they are, or a [images, tokens, hidden]
    array (the fixed-size families' stacked form; empty: none) split per image."""
    if images is None:
        return []
    if isinstance(images, np.ndarray):
        if not images.size:
            return []
        if images.ndim != 3:
            raise ValueError(f"image features must be [images, tokens, hidden], got "
                             f"{images.shape}")
        return [ImageFeatures(images[i]) for i in range(images.shape[0])]
    return list(images)
