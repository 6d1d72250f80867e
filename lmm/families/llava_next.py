"""LLaVA-NeXT (LLaVA-1.6, ``LlavaNextForConditionalGeneration``) on the split path.

Any-resolution tiling: the processor picks a grid from ``image_grid_pinpoints`` for each image,
cuts the resized image into tiles and adds a base tile of the whole image, so one image is
``[crops, 3, tile, tile]`` pixels plus its ``image_sizes`` (height, width). The model's own
``get_image_features`` runs the tower and projector over every crop and ``pack_image_features``
unpads the grid and appends the learned ``image_newline`` after each feature row, so an image
gives ``tokens`` feature rows, a number that depends on its size; the processor put exactly as
many ``<image>`` tokens in the prompt. Positions are plain 1-D and the mask is the padding mask,
as for LLaVA-1.5.

vLLM 0.32 (``vllm/model_executor/models/llava_next.py``) takes the packed features as
``LlavaNextImageEmbeddingInputs`` (``image_embeds``, one ``[tokens, hidden]`` per image; a list
when their lengths differ) and returns them unchanged from ``embed_multimodal``; its multimodal
processor (``BaseLlavaMultiModalProcessor._get_prompt_updates`` in ``llava.py``) replaces each
single ``<image>`` token of the prompt with ``tokens`` of them, ``tokens`` being the embedding's
length. So the prompt goes to vLLM with each image's run collapsed to one token.

That schema, though, declares no dynamic length, so two images of different sizes in one
engine step (one prompt or two) fail its check in the worker and the engine dies; an engine for
this family names ``VLLM_WORKER_EXTENSION`` as vLLM's ``worker_extension_cls``, which marks the
length dynamic in the worker (``allow_vllm_embeds_of_any_length``). With
``limit_mm_per_prompt={"image": 0}`` the worker holds no tower and no projector (only the
``image_newline`` vector, a plain parameter vLLM still allocates and the embeddings path never
reads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmm.families import ImageFeatures, ImageInput, load_whole_keeping
from lmm.transfer import from_wire, to_wire

if TYPE_CHECKING:
    import torch

# Module roots of each part in the transformers checkpoint (``model.safetensors`` keys).
PARTS = {
    "vision": ("model.vision_tower", "model.multi_modal_projector", "model.image_newline"),
    "language": ("model.language_model", "lm_head"),
}


def num_crops(image_size: Sequence[int], config) -> int:
    """Crops the processor made for an image of ``image_size`` (height, width): the grid the
    pinpoints select plus the base tile (the model's own ``image_size_to_num_patches``)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    return int(image_size_to_num_patches(
        image_size=[int(s) for s in image_size],
        grid_pinpoints=config.image_grid_pinpoints,
        patch_size=config.vision_config.image_size,
    ))


class LlavaNextVision:
    """Tower + projector + ``image_newline``: pixels of any number of crops -> packed features."""

    def __init__(self, model_path: str | Path, device: str, dtype: torch.dtype):
        import torch

        model = load_whole_keeping(model_path, "vision", PARTS, device, dtype)
        self.model = model
        self.config = model.config
        self.device, self.dtype = torch.device(device), dtype

    def encode(self, images: Sequence[ImageInput]) -> list[ImageFeatures]:
        """Every crop of every image is a [3, tile, tile] tower input, whatever the image's
        crop count, so all images run as one forward pass (``get_image_features`` takes the
        crops flattened to 4-D with the images' sizes and splits them back per image)."""
        import torch

        if not images:
            return []
        pixels = torch.cat([torch.as_tensor(im.arrays["pixel_values"]) for im in images])
        sizes = torch.stack([torch.as_tensor(im.arrays["image_sizes"]) for im in images])
        with torch.inference_mode():
            out = self.model.model.get_image_features(
                pixel_values=pixels.to(self.device, self.dtype),
                image_sizes=sizes.to(self.device),
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            )
        return [ImageFeatures(embeds=to_wire(f)) for f in out.pooler_output]


class LlavaNextLanguage:
    """The Llama (or Mistral, ...) decoder and head; features replace the ``<image>`` rows."""

    def __init__(self, model_path: str | Path, device: str, dtype: torch.dtype):
        model = load_whole_keeping(model_path, "language", PARTS, device, dtype)
        self.model = model
        self.embed = model.get_input_embeddings()
        self.decoder = model.model.language_model
        self.lm_head = model.lm_head
        self.text_config = model.config.text_config
        self.image_token_id = model.config.image_token_id

    def inputs_embeds(self, token_ids: torch.Tensor, images: Sequence[ImageFeatures]
                      ) -> torch.Tensor:
        embeds = self.embed(token_ids)
        if not images:
            if bool((token_ids == self.image_token_id).any()):
                raise ValueError("the prompt has image tokens but no image features were sent")
            return embeds
        features = torch_cat_features(images, embeds)
        # The model's own placeholder check (token count == feature rows) and scatter.
        mask = self.model.model.get_placeholder_mask(
            token_ids, inputs_embeds=embeds, image_features=features
        )
        return embeds.masked_scatter(mask, features)

    def positions(self, token_ids: torch.Tensor, images: Sequence[ImageFeatures]
                  ) -> tuple[torch.Tensor, int]:
        import torch

        return torch.arange(token_ids.shape[-1], device=token_ids.device)[None], 0

    def attention(self, mask: torch.Tensor, token_ids: torch.Tensor) -> Any:
        return mask


def torch_cat_features(images: Sequence[ImageFeatures], like: torch.Tensor) -> torch.Tensor:
    """The images' feature rows in prompt order, on ``like``'s device and in its dtype."""
    import torch

    return torch.cat([from_wire(im.embeds, like.dtype, like.device) for im in images])


def collapse_image_runs(token_ids: Sequence[int], image_token_id: int, lengths: Sequence[int]
                        ) -> list[int]:
    """One ``<image>`` token per image, as vLLM's multimodal processor wants the prompt: image
    ``i`` of the prompt must be a run of ``lengths[i]`` tokens (runs of adjacent images are
    split by the lengths). ValueError when the runs and the lengths disagree."""
    out: list[int] = []
    index, left = 0, 0
    for token in token_ids:
        if token != image_token_id:
            if left:
                raise ValueError(f"image {index - 1} takes {lengths[index - 1]} prompt tokens; "
                                 f"its run ended {left} short")
            out.append(token)
            continue
        if left:
            left -= 1
            continue
        if index == len(lengths):
            raise ValueError(f"the prompt has more image tokens than its {len(lengths)} "
                             f"image(s) take ({sum(lengths)})")
        out.append(token)
        left = lengths[index] - 1
        index += 1
    if left or index != len(lengths):
        raise ValueError(f"the prompt's image tokens do not match its {len(lengths)} image(s) "
                         f"of {list(lengths)} tokens")
    return out


class LlavaNextFamily:
    name = "llava_next"
    architectures = ("LlavaNextForConditionalGeneration",)
    takes_images = True
    stacked = False  # images differ in shape: per image

    def __init__(self, config) -> None:
        """``config``: the checkpoint's ``LlavaNextConfig`` (pinpoints and tile size say how
        many of the processor's padded crops are an image's own)."""
        self.config = config
        self.image_token_id = config.image_token_id

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> LlavaNextFamily:
        from transformers import AutoConfig

        return cls(AutoConfig.from_pretrained(str(model_path)))

    def image_inputs(self, processed: Mapping[str, np.ndarray], n_images: int
                     ) -> list[ImageInput]:
        """``pixel_values`` [n, most crops, 3, H, W] is padded to the prompt's largest crop
        count; each image keeps only its own crops, so its bytes depend on it alone."""
        pixels = np.asarray(processed["pixel_values"])
        sizes = np.asarray(processed["image_sizes"])
        if len(pixels) != n_images or len(sizes) != n_images:
            raise ValueError(f"{n_images} image(s), but the processor made {len(pixels)} "
                             f"pixel_values and {len(sizes)} image_sizes")
        return [
            ImageInput({
                "pixel_values": np.ascontiguousarray(pixels[i, : num_crops(sizes[i], self.config)]),
                "image_sizes": np.ascontiguousarray(sizes[i])})
            for i in range(n_images)
        ]

    def vision(self, model_path: str | Path, device: str, dtype: torch.dtype) -> LlavaNextVision:
        return LlavaNextVision(model_path, device, dtype)

    def language(self, model_path: str | Path, device: str, dtype: torch.dtype
                 ) -> LlavaNextLanguage:
        return LlavaNextLanguage(model_path, device, dtype)

    def vllm_prompt(self, token_ids: list[int], images: Sequence[ImageFeatures]) -> dict:
        lengths = [im.embeds.shape[0] for im in images]
        prompt: dict = {"prompt_token_ids": collapse_image_runs(
            token_ids, self.image_token_id, lengths)}
        if images:
            # A list of [tokens, hidden]: vLLM takes one 2-D tensor per image (lengths differ).
            prompt["multi_modal_data"] = {"image": [from_wire(im.embeds) for im in images]}
        return prompt


def allow_vllm_embeds_of_any_length() -> None:
    """vLLM 0.32's ``LlavaNextImageEmbeddingInputs`` declares ``data`` as ("bn", "ifs", "hs")
    with no dynamic dimension, so a batch of image embeddings of different lengths (any two
    images of different sizes, in one prompt or in two prompts of one step) fails its schema
    check in the worker ("data contains inconsistent shapes") and the engine dies. Its pixel
    path already takes per-image lengths; marking ``ifs`` dynamic lets the embeddings through
    unchanged (``_process_image_input`` returns them as they are)."""
    from typing import get_type_hints

    from vllm.model_executor.models.llava_next import LlavaNextImageEmbeddingInputs

    hint = get_type_hints(LlavaNextImageEmbeddingInputs, include_extras=True)["data"]
    shape = hint.__metadata__[0]
    shape.dynamic_dims = set(shape.dynamic_dims) | {"ifs"}


class _VllmEmbedsOfAnyLength:
    """A vLLM worker extension: naming it applies the fix in the worker."""

    def lmm_vision_parameters(self) -> dict[str, int]:
        """Parameters the worker's model holds for each vision module (vLLM's names)."""
        model = self.model_runner.get_model()
        roots = ("vision_tower", "multi_modal_projector", "image_newline")
        return {root: sum(p.numel() for name, p in model.named_parameters()
                          if name.split(".")[0] == root) for root in roots}


def __getattr__(name: str):
    # Resolved by vLLM in its worker process (``worker_extension_cls=VLLM_WORKER_EXTENSION``),
    # so the fix is applied where the schema is checked, and never on import elsewhere.
    if name == "VllmEmbedsOfAnyLength":
        allow_vllm_embeds_of_any_length()
        return _VllmEmbedsOfAnyLength
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


VLLM_WORKER_EXTENSION = f"{__name__}.VllmEmbedsOfAnyLength"
