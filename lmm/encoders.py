"""Vision-side compute as plain objects (the vision runner wraps them; tests call them directly).

Heavy imports stay inside the functions so the CPU API service never imports torch for them.
"""

from __future__ import annotations

import numpy as np

from lmm.transfer import to_wire


class LlavaVisionEncoder:
    """Vision tower + projector of a LLaVA-family checkpoint: pixels -> LLM-space features."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto"):
        import torch

        from lmm.device import resolve_device_dtype
        from lmm.loading import load_part

        self.device, self.dtype = resolve_device_dtype(device, dtype)
        # Only the tower and projector are read from the checkpoint (lmm.loading); the language
        # model lives in the LLM runner and is never materialised here.
        self.model = load_part(model_path, "vision", self.dtype, self.device)
        self.config = self.model.config
        self.torch = torch

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        """[N, 3, H, W] float pixels -> [N, image_tokens, hidden] features in the tower's dtype,
        as they travel (``lmm.transfer``: bfloat16 as its bits in uint16)."""
        torch = self.torch
        with torch.inference_mode():
            pixels = torch.as_tensor(pixel_values).to(self.device, self.dtype)
            out = self.model.model.get_image_features(
                pixel_values=pixels,
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            )
            features = out.pooler_output if hasattr(out, "pooler_output") else out
            if isinstance(features, (list, tuple)):
                features = torch.stack(list(features))
            return to_wire(features)


class ClipEmbedder:
    """CLIP image and text towers with projections; vectors are L2-normalized."""

    def __init__(self, model_path: str, device: str = "auto", dtype: str = "auto"):
        import torch
        from transformers import CLIPModel

        from lmm.device import resolve_device_dtype

        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.model = CLIPModel.from_pretrained(model_path, dtype=self.dtype).eval().to(self.device)
        self.pad_id = self.model.config.text_config.pad_token_id or 0
        self.torch = torch

    def _normalize(self, vectors) -> np.ndarray:
        vectors = vectors.float()
        return (vectors / vectors.norm(dim=-1, keepdim=True).clamp(min=1e-12)).cpu().numpy()

    def embed_images(self, pixel_values: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            pixels = torch.as_tensor(pixel_values).to(self.device, self.dtype)
            out = self.model.get_image_features(pixel_values=pixels)
            return self._normalize(getattr(out, "pooler_output", out))

    def embed_texts(self, input_ids: list[list[int]]) -> np.ndarray:
        """Token ids of different lengths are right-padded with a mask, as CLIP was trained."""
        torch = self.torch
        longest = max(len(ids) for ids in input_ids)
        ids = torch.full((len(input_ids), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(input_ids):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        with torch.inference_mode():
            out = self.model.get_text_features(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            )
            return self._normalize(getattr(out, "pooler_output", out))
