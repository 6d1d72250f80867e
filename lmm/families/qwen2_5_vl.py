"""Qwen2.5-VL (and Qwen2-VL, the same code path) on the split path.

What differs from LLaVA:

- Dynamic resolution: the processor resizes each image to a multiple of patch * merge pixels and
  cuts it into patches, so an image's ``pixel_values`` is [patches, C*T*P*P] with its
  ``image_grid_thw`` [3], and it takes grid_t * grid_h * grid_w / merge**2 prompt tokens
  (``<|image_pad|>``, between ``<|vision_start|>`` and ``<|vision_end|>``).
- The vision tower takes a packed sequence: the patches of many images one after another, with
  per-image attention bounds from their grids. Images of different sizes therefore share one
  forward pass (HF ``generate()`` encodes a prompt's images that way too), so ``encode`` runs all
  its inputs at once instead of one pass per ``ImageInput.group()``.
- M-RoPE: positions are 3-D (temporal, height, width) from the grids, computed by the model's own
  ``get_rope_index``; generated tokens sit at ``L + rope_delta + t``. The grid travels with the
  features as ``meta["image_grid_thw"]``.
- vLLM takes ``{"image_embeds": [tokens, hidden], "image_grid_thw": [images, 3]}`` and expands
  each ``<|image_pad|>`` to its image's token count itself, so the prompt carries one per image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lmm.families import ImageFeatures, ImageInput, load_whole_keeping
from lmm.transfer import from_wire, to_wire

# Module roots of each part in the HF checkpoint (Qwen2_5_VLForConditionalGeneration and
# Qwen2VLForConditionalGeneration), for loading one part alone.
PARTS = {"vision": ("model.visual",), "language": ("model.language_model", "lm_head")}
GRID = "image_grid_thw"
# vLLM engine arguments for features as input: vLLM skips its vision tower only when every
# modality the tower serves is limited to 0, and Qwen's tower serves images and videos
# (vllm/model_executor/models/qwen2_5_vl.py: _mark_tower_model(vllm_config, {"image", "video"})).
VLLM_ENGINE_ARGS = {"enable_mm_embeds": True, "limit_mm_per_prompt": {"image": 0, "video": 0}}


def _grids(images: Sequence[ImageFeatures]):
    import torch

    return torch.tensor(np.stack([np.asarray(f.meta[GRID]).reshape(3) for f in images]),
                        dtype=torch.long)


def image_tokens(grid_thw: np.ndarray, merge_size: int) -> int:
    """Prompt tokens of an image with this patch grid (the processor's count)."""
    return int(np.prod(np.asarray(grid_thw))) // (merge_size * merge_size)


class Qwen2_5_VLVisionPart:
    """The vision tower with its patch merger: patches -> LLM-space features per image."""

    def __init__(self, model, device: str):
        import torch

        self.model = model
        self.device = device
        self.dtype = model.model.visual.dtype
        self.merge_size = model.config.vision_config.spatial_merge_size
        self.torch = torch

    def encode(self, images: Sequence[ImageInput]) -> list[ImageFeatures]:
        """All inputs in one packed forward pass (the tower bounds attention per image)."""
        torch = self.torch
        if not images:
            return []
        for i, image in enumerate(images):
            grid = np.asarray(image.arrays[GRID]).reshape(-1)
            patches = image.arrays["pixel_values"].shape[0]
            if grid.shape != (3,) or int(np.prod(grid)) != patches:
                raise ValueError(f"image {i}: {patches} patches do not fill its image_grid_thw "
                                 f"{grid.tolist()}; send the processor's outputs as they are")
        pixels = torch.as_tensor(np.concatenate([im.arrays["pixel_values"] for im in images]))
        grids = torch.as_tensor(np.stack([np.asarray(im.arrays[GRID]).reshape(3)
                                          for im in images])).long()
        with torch.inference_mode():
            out = self.model.model.get_image_features(
                pixel_values=pixels.to(self.device, self.dtype),
                image_grid_thw=grids.to(self.device), return_dict=True,
            )
        return [ImageFeatures(to_wire(f), {GRID: g.numpy().astype(np.int64)})
                for f, g in zip(out.pooler_output, grids)]


class Qwen2_5_VLLanguagePart:
    """The text decoder, its embeddings and lm_head; positions from the model's get_rope_index."""

    def __init__(self, model, lm_head, device: str):
        import torch

        self.model = model  # the *Model (visual dropped): get_placeholder_mask, get_rope_index
        self.device = device
        self.lm_head = lm_head
        self.embed = model.get_input_embeddings()
        self.decoder = model.language_model
        self.text_config = model.config.text_config
        self.image_token_id = model.config.image_token_id
        self.merge_size = model.config.vision_config.spatial_merge_size
        self.torch = torch

    def _check(self, token_ids, images: Sequence[ImageFeatures]) -> None:
        counts = [image_tokens(f.meta[GRID], self.merge_size) for f in images]
        placed = int((token_ids == self.image_token_id).sum())
        if placed != sum(counts):
            raise ValueError(f"the prompt has {placed} image tokens, its {len(images)} images "
                             f"take {sum(counts)} ({counts}); expand each image's placeholder "
                             "with the processor")
        for i, (f, n) in enumerate(zip(images, counts)):
            if f.embeds.shape[0] != n:
                raise ValueError(f"image {i}: {f.embeds.shape[0]} feature rows for a grid of "
                                 f"{n} tokens")

    def inputs_embeds(self, token_ids, images: Sequence[ImageFeatures]):
        torch = self.torch
        ids = token_ids.to(self.device).view(1, -1)
        self._check(ids, images)
        with torch.inference_mode():
            embeds = self.embed(ids)
            if images:
                features = torch.cat([from_wire(f.embeds, embeds.dtype, self.device)
                                      for f in images])
                mask, _ = self.model.get_placeholder_mask(ids, inputs_embeds=embeds,
                                                          image_features=features)
                embeds = embeds.masked_scatter(mask, features)
        return embeds[0]

    def positions(self, token_ids, images: Sequence[ImageFeatures]):
        """[3, L] M-RoPE positions and the rope delta (decode token t sits at L + delta + t)."""
        ids = token_ids.to(self.device).view(1, -1)
        self._check(ids, images)
        # the processor's mm_token_type_ids for images (1); this family takes no videos, so a
        # <|video_pad|> in the text stays text instead of asking for a video grid
        types = (ids == self.image_token_id).int()
        position_ids, deltas = self.model.get_rope_index(
            ids, mm_token_type_ids=types,
            image_grid_thw=_grids(images).to(self.device) if images else None,
        )
        return position_ids[:, 0, :], int(deltas.view(-1)[0])

    def attention(self, mask, token_ids):
        """The padding mask: the decoder builds its causal mask from it."""
        return mask


class Qwen2_5_VLFamily:
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
    takes_images = True
    stacked = False  # images differ in shape: per image

    def __init__(self, image_token_id: int | None = None, merge_size: int = 2):
        # Only vllm_prompt needs these; vision() and language() read them from the checkpoint.
        self.image_token_id = image_token_id
        self.merge_size = merge_size

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> Qwen2_5_VLFamily:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_path))
        return cls(config.image_token_id, config.vision_config.spatial_merge_size)

    def image_inputs(self, processed: Mapping[str, np.ndarray], n_images: int
                     ) -> list[ImageInput]:
        if n_images == 0:
            return []
        pixels = np.asarray(processed["pixel_values"])
        grids = np.asarray(processed[GRID]).reshape(-1, 3).astype(np.int64)
        sizes = grids.prod(-1)
        if len(grids) != n_images or int(sizes.sum()) != pixels.shape[0]:
            raise ValueError(f"processor outputs hold {len(grids)} images and {pixels.shape[0]} "
                             f"patches; expected {n_images} images")
        bounds = np.cumsum(sizes)[:-1]
        return [ImageInput({"pixel_values": p, GRID: g})
                for p, g in zip(np.split(pixels, bounds), grids)]

    def vision(self, model_path: str | Path, device: str, dtype) -> Qwen2_5_VLVisionPart:
        model = load_whole_keeping(model_path, "vision", PARTS, device, dtype)
        return Qwen2_5_VLVisionPart(model, device)

    def language(self, model_path: str | Path, device: str, dtype) -> Qwen2_5_VLLanguagePart:
        model = load_whole_keeping(model_path, "language", PARTS, device, dtype)
        return Qwen2_5_VLLanguagePart(model.model, model.lm_head, device)

    def collapse(self, token_ids: list[int], images: Sequence[ImageFeatures]) -> list[int]:
        """One ``<|image_pad|>`` per image: each image's run of tokens, checked, becomes one."""
        if self.image_token_id is None:
            raise ValueError("Qwen2_5_VLFamily needs image_token_id for vLLM prompts "
                             "(Qwen2_5_VLFamily.from_pretrained reads it)")
        counts = [image_tokens(f.meta[GRID], self.merge_size) for f in images]
        out: list[int] = []
        i = image = 0
        while i < len(token_ids):
            if token_ids[i] != self.image_token_id:
                out.append(token_ids[i])
                i += 1
                continue
            if image == len(counts):
                raise ValueError(f"the prompt has image tokens beyond its {len(counts)} images")
            run = token_ids[i: i + counts[image]]
            if len(run) < counts[image] or any(t != self.image_token_id for t in run):
                raise ValueError(f"image {image} takes {counts[image]} prompt tokens; "
                                 "fewer were sent")
            out.append(self.image_token_id)
            i += counts[image]
            image += 1
        if image != len(counts):
            raise ValueError(f"the prompt places {image} of its {len(counts)} images")
        return out

    def vllm_prompt(self, token_ids: list[int], images: Sequence[ImageFeatures]) -> dict:
        import torch

        prompt: dict = {"prompt_token_ids": self.collapse(list(token_ids), images)}
        if images:
            prompt["multi_modal_data"] = {"image": {
                "image_embeds": torch.cat([from_wire(f.embeds) for f in images]),
                GRID: _grids(images),
            }}
        return prompt


FAMILY = Qwen2_5_VLFamily
