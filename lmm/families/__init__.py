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
