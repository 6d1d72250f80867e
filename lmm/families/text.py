"""Text-only decoder LLMs (any ``*ForCausalLM``: Llama, Qwen2, Mistral, ...).

No vision part: the vision runner loads nothing of the checkpoint (it still serves CLIP for
``/embed``) and the API service refuses images with a 400. The API service builds prompts with
the checkpoint's tokenizer and its chat template. The transformers engine runs the model's own
decoder (``base_model``) and ``lm_head`` with plain positions and the padding mask; vLLM takes
the token ids alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from lmm.families import ImageFeatures, ImageInput

NO_IMAGES = "this model takes no images (a text-only LLM): send the request without images"


class TextLanguage:
    def __init__(self, model_path: str | Path, device, dtype, device_map=None, max_memory=None,
                 offload_folder=None):
        import torch
        from transformers import AutoModelForCausalLM

        placed = {}
        if device_map is not None:
            placed = dict(device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder)
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, **placed)
        if device_map is None:
            model = model.to(device)
        model.eval()
        self.model = model
        self.embed = model.get_input_embeddings()
        self.device = self.embed.weight.device if device_map is not None else torch.device(device)
        self.decoder = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.text_config = model.config.get_text_config()
        self.image_token_id = None
        self.generation_config = model.generation_config

    def inputs_embeds(self, token_ids, images: Sequence[ImageFeatures]):
        if images:
            raise ValueError(NO_IMAGES)
        return self.embed(token_ids.to(self.device))

    def positions(self, token_ids, images: Sequence[ImageFeatures]):
        import torch

        return torch.arange(token_ids.shape[-1], device=self.device)[None], 0

    def attention(self, mask, token_ids) -> Any:
        return mask


class TextFamily:
    name = "text"
    architectures = ("*ForCausalLM",)
    takes_images = False
    stacked = False
    image_token_id = None

    def image_inputs(self, processed: Mapping[str, np.ndarray], n_images: int
                     ) -> list[ImageInput]:
        if n_images:
            raise ValueError(NO_IMAGES)
        return []

    def vision(self, model_path, device, dtype):
        raise ValueError("a text-only model has no vision part")

    def language(self, model_path: str | Path, device, dtype, **placement) -> TextLanguage:
        return TextLanguage(model_path, device, dtype, **placement)

    def vllm_prompt(self, token_ids: list[int], images: Sequence[ImageFeatures]) -> dict:
        if images:
            raise ValueError(NO_IMAGES)
        return {"prompt_token_ids": list(token_ids)}
