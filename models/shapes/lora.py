"""A LoRA adapter over the trained shapes LLaVA that answers in another form (PEFT).

The adapter adapts only the Llama attention and MLP projections of ``model.language_model``;
the vision tower, the projector, the embeddings and the LM head stay frozen and untouched, so
the adapter is a standard PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``)
that loads over the unchanged base checkpoint. It answers in the "terse" form of
`models.shapes.data` ("circle red left" where the base model says "a red circle on the left";
"circle", "circle red", "circle left" for the one-attribute questions).

Training reuses train.py's machinery: freshly rendered batches through the real processor, loss
on the answer tokens + EOS, AdamW with warm-up and cosine decay, `deterministic_torch`. Same seed,
same thread count -> byte-identical adapter weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from models.shapes import LLAVA_DIR, WEIGHTS_DIR
from models.shapes.data import in_form
from models.shapes.train import (
    ProgressFn,
    TrainResult,
    _check_seed,
    _fit,
    _samples,
    deterministic_torch,
    llava_batch,
)

logger = logging.getLogger(__name__)

LORA_DIR = WEIGHTS_DIR / "lora-terse"
FORM = "terse"
# Full-match regex over module names: the Llama projections only. A plain list of names
# ("q_proj", ...) would also hit the CLIP tower's q/k/v projections.
TARGET_MODULES = (
    r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)
# Recorded as the adapter's base_model_name_or_path (relative: the checkout may live anywhere).
BASE_REF = "models/shapes/weights/llava"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def lora_config(rank: int = 8, alpha: int = 16):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
        target_modules=TARGET_MODULES,
    )


def load_base(base_dir: str | Path = LLAVA_DIR):
    """The base LLaVA and its processor, in eval mode."""
    model = LlavaForConditionalGeneration.from_pretrained(base_dir)
    return model.eval(), AutoProcessor.from_pretrained(base_dir)


def load_with_adapter(adapter_dir: str | Path = LORA_DIR, base_dir: str | Path = LLAVA_DIR):
    """(PeftModel over the base LLaVA, processor); `model.disable_adapter()` gives the base."""
    from peft import PeftModel

    base, processor = load_base(base_dir)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval(), processor


def train_lora(
    steps: int = 300,
    seed: int = 0,
    out_dir: str | Path = LORA_DIR,
    *,
    base_dir: str | Path = LLAVA_DIR,
    rank: int = 8,
    alpha: int = 16,
    form: str = FORM,
    batch_size: int = 32,
    lr: float = 5e-3,
    log_every: int = 50,
    threads: int = 2,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train a LoRA adapter on `base_dir`'s language model to answer in `form`; save it to
    `out_dir`. `TrainResult.params` counts the adapter's (trainable) parameters."""
    from peft import get_peft_model

    _check_seed(seed)
    with deterministic_torch(seed, threads):
        base, processor = load_base(base_dir)
        model = get_peft_model(base, lora_config(rank, alpha))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("LoRA rank %d: %d trainable parameters", rank, trainable)

        def step_loss(rng: np.random.Generator) -> torch.Tensor:
            samples = [in_form(s, form) for s in _samples(rng, batch_size)]
            return model(**llava_batch(processor, samples, rng)).loss

        rng = np.random.default_rng(seed)
        losses, seconds = _fit(model, step_loss, rng, steps, lr, log_every, progress)
    save_adapter(model, Path(out_dir))
    return TrainResult(Path(out_dir), trainable, seconds, losses)


def save_adapter(model, out_dir: Path) -> None:
    """Only the two standard PEFT files: the model card PEFT writes beside them names the
    local base path, which would differ from checkout to checkout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # Relative, not the absolute path the base was loaded from (differs between checkouts).
    for config in model.peft_config.values():
        config.base_model_name_or_path = BASE_REF
    model.save_pretrained(out_dir)
    (out_dir / "README.md").unlink(missing_ok=True)
    logger.info("saved the LoRA adapter to %s", out_dir)
