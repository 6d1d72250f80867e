"""LLaVA-1.5 (``LlavaForConditionalGeneration``) on the split path.

Every image is resized and cropped to the tower's size, so its vision inputs are one
``[3, H, W]`` pixel array and it takes the same number of ``<image>`` tokens and feature rows
(576 for the 336 px checkpoints). Images of all requests therefore stack into one array: the
vision runner keeps BentoML's adaptive batching for them (``encode``, ``[N, 3, H, W]`` in,
``[N, tokens, hidden]`` out) and the features travel stacked. Both parts are read alone from
the checkpoint (``lmm.loading``), the language part with the configured placement.
Positions are plain 1-D, the mask is the padding mask. vLLM takes the features as image
embeddings, ``[images, tokens, hidden]``, with one ``<image>`` per image in the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lmm.families import ImageFeatures, ImageInput
from lmm.transfer import from_wire


class LlavaVision:
    """Tower + projector (``lmm.encoders.LlavaVisionEncoder``) as a VisionPart."""

    def __init__(self, model_path: str | Path, device: str, dtype):
        from lmm.encoders import LlavaVisionEncoder

        self.encoder = LlavaVisionEncoder(str(model_path), device, dtype)

    def encode(self, images: Sequence[ImageInput]) -> list[ImageFeatures]:
        if not images:
            return []
        features = self.encoder(np.stack([im.arrays["pixel_values"] for im in images]))
        return [ImageFeatures(f) for f in features]


class LlavaLanguage:
    """The language model of the checkpoint, alone (``lmm.loading.load_part``)."""

    def __init__(self, model_path: str | Path, device, dtype, **placement):
        from lmm.loading import load_part

        model = load_part(str(model_path), "language", dtype, device, **placement)
        self.model = model
        self.device = model.lmm_input_device  # where the embeddings run: inputs go there
        self.embed = model.get_input_embeddings()
        self.decoder = model.model.language_model
        self.lm_head = model.lm_head
        self.text_config = model.config.get_text_config()
        self.image_token_id = model.config.image_token_id
        self.generation_config = model.generation_config

    def inputs_embeds(self, token_ids, images: Sequence[ImageFeatures]):
        import torch

        ids = token_ids.to(self.device)
        embeds = self.embed(ids)
        if images:
            features = torch.cat([from_wire(f.embeds, embeds.dtype, self.device)
                                  for f in images])
            positions = (ids == self.image_token_id).nonzero(as_tuple=True)[0]
            embeds = embeds.clone()
            embeds[positions] = features
        return embeds

    def positions(self, token_ids, images: Sequence[ImageFeatures]):
        import torch

        return torch.arange(token_ids.shape[-1], device=self.device)[None], 0

    def attention(self, mask, token_ids) -> Any:
        return mask


def collapse_image_tokens(ids: list[int], image_token_id: int, per_image: int) -> list[int]:
    """One image token per image, as vLLM's multimodal processor wants its prompt.

    The API service expands each image to its ``per_image`` tokens (the HF processor does), and
    vLLM expands every image placeholder it finds again: given the expanded prompt it would
    replace the first token of the run and keep the rest as text, so the features would land
    in the wrong place. Runs are checked: every image is exactly ``per_image`` tokens.
    """
    out: list[int] = []
    run = 0
    for token in ids:
        if token == image_token_id:
            if run % per_image == 0:
                out.append(token)
            run += 1
            continue
        if run % per_image:
            raise ValueError(f"an image takes {per_image} prompt tokens; a run of {run} was sent")
        run = 0
        out.append(token)
    if run % per_image:
        raise ValueError(f"an image takes {per_image} prompt tokens; a run of {run} was sent")
    return out


class LlavaFamily:
    name = "llava"
    architectures = ("LlavaForConditionalGeneration",)
    takes_images = True
    stacked = True  # every image the same shape: adaptive batching, stacked features

    def __init__(self, image_token_id: int | None = None):
        self.image_token_id = image_token_id

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> "LlavaFamily":
        from lmm.engine import read_generation_info

        return cls(read_generation_info(model_path).image_token_id)

    def image_inputs(self, processed: Mapping[str, np.ndarray], n_images: int
                     ) -> list[ImageInput]:
        if not n_images:
            return []
        pixels = np.asarray(processed["pixel_values"], dtype=np.float32)
        if len(pixels) != n_images:
            raise ValueError(f"{n_images} image(s), but the processor made {len(pixels)}")
        return [ImageInput({"pixel_values": p}) for p in pixels]

    def vision(self, model_path: str | Path, device: str, dtype) -> LlavaVision:
        return LlavaVision(model_path, device, dtype)

    def language(self, model_path: str | Path, device, dtype, **placement) -> LlavaLanguage:
        return LlavaLanguage(model_path, device, dtype, **placement)

    def vllm_prompt(self, token_ids: list[int], images: Sequence[ImageFeatures]) -> dict:
        if not images:
            return {"prompt_token_ids": list(token_ids)}
        import torch

        # One [tokens, hidden] block per image, stacked (a 2-D tensor would be taken for an
        # image, and images are not accepted), and one placeholder per image in the prompt. In
        # the dtype sent (lmm.transfer): vLLM casts them to its model's dtype itself.
        return {
            "prompt_token_ids": collapse_image_tokens(
                list(token_ids), self.image_token_id, images[0].embeds.shape[0]),
            "multi_modal_data": {"image": torch.stack([from_wire(f.embeds) for f in images])},
        }
