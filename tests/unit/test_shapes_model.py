"""The bundled shapes models: accuracy of the committed weights, an oracle that notices broken
preprocessing, a smoke run of both trainers, and determinism of the synthetic data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    CLIPImageProcessorPil,
    CLIPModel,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from models.shapes import CLIP_DIR, LLAVA_DIR
from models.shapes.build import NUM_IMAGE_TOKENS
from models.shapes.data import HELD_OUT_SEED, QUESTION_TYPES, make_samples, normalize_answer
from models.shapes.evaluate import clip_retrieval_top1, llava_accuracy, user_messages
from models.shapes.train import train_clip, train_llava

pytestmark = pytest.mark.unit

PER_TYPE = 60


@pytest.fixture(scope="module")
def samples():
    return make_samples(PER_TYPE * len(QUESTION_TYPES), HELD_OUT_SEED)


@pytest.fixture(scope="module")
def llava():
    torch.set_num_threads(2)
    model = LlavaForConditionalGeneration.from_pretrained(LLAVA_DIR)
    return model.eval(), AutoProcessor.from_pretrained(LLAVA_DIR)


@pytest.fixture(scope="module")
def baseline(llava, samples):
    return llava_accuracy(*llava, samples)


# -- committed weights ---------------------------------------------------------------------


def test_llava_held_out_accuracy(baseline):
    assert set(baseline) == set(QUESTION_TYPES)
    assert all(acc >= 0.98 for acc in baseline.values()), baseline


def test_clip_held_out_retrieval(samples):
    model = CLIPModel.from_pretrained(CLIP_DIR).eval()
    assert clip_retrieval_top1(model, AutoProcessor.from_pretrained(CLIP_DIR), samples) >= 0.98


def test_processor_loads_like_a_hub_checkpoint(llava):
    model, processor = llava
    assert isinstance(processor, LlavaProcessor)
    # The PIL backend: no torchvision needed.
    assert isinstance(processor.image_processor, CLIPImageProcessorPil)
    assert processor.image_token_id == model.config.image_token_id
    prompt = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *user_messages("What shape is this?")],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert prompt == "USER: <image> What shape is this? ASSISTANT:"
    image = make_samples(1, 1, size=48)[0].image
    ids = processor(text=prompt, images=[image], return_tensors="pt")["input_ids"]
    assert int((ids == model.config.image_token_id).sum()) == NUM_IMAGE_TOKENS


def test_tokenizer_survives_arbitrary_text(llava):
    tok = llava[1].tokenizer
    ids = tok("Qu'est-ce que c'est? 🙂 What SHAPE is this?")["input_ids"]
    assert tok.unk_token_id in ids and max(ids) < len(tok)
    answer = tok("a red circle on the left", add_special_tokens=False)["input_ids"]
    assert tok.decode(answer + [tok.eos_token_id], skip_special_tokens=True) == (
        "a red circle on the left"
    )


# -- the oracle bites: broken preprocessing must show up -----------------------------------


def _no_normalization(processor):
    return lambda images: processor.image_processor(
        images, do_normalize=False, return_tensors="pt"
    )["pixel_values"]


def _bgr(processor):
    def preprocess(images: list[Image.Image]) -> torch.Tensor:
        swapped = [Image.merge("RGB", img.convert("RGB").split()[::-1]) for img in images]
        return processor.image_processor(swapped, return_tensors="pt")["pixel_values"]

    return preprocess


def _rotated_in_batch(processor):
    # Every prompt gets its neighbour's image: an off-by-one when batching requests.
    return lambda images: processor.image_processor(images, return_tensors="pt")[
        "pixel_values"
    ].roll(1, dims=0)


@pytest.mark.parametrize(
    ("breakage", "affected"),
    [
        (_no_normalization, ("color", "describe")),
        (_bgr, ("color", "describe")),
        (_rotated_in_batch, QUESTION_TYPES),
    ],
    ids=["no-normalization", "bgr", "rotated-in-batch"],
)
def test_broken_preprocessing_is_detected(llava, samples, baseline, breakage, affected):
    model, processor = llava
    broken = llava_accuracy(model, processor, samples, preprocess=breakage(processor))
    for qtype in affected:
        assert broken[qtype] < 0.8, (qtype, broken, baseline)


# -- the trainers still run ----------------------------------------------------------------


def _decreases(losses: list[float]) -> bool:
    return float(np.mean(losses[-5:])) < 0.8 * float(np.mean(losses[:5]))


def test_llava_trainer_smoke(tmp_path: Path):
    result = train_llava(30, seed=1, out_dir=tmp_path, batch_size=8, log_every=10)
    assert len(result.losses) == 30 and _decreases(result.losses), result.losses
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert model.config.image_token_id == processor.image_token_id
    assert llava_accuracy(model, processor, make_samples(4, 2))  # generates end to end


def test_clip_trainer_smoke(tmp_path: Path):
    result = train_clip(30, seed=1, out_dir=tmp_path, batch_size=16, log_every=10)
    assert len(result.losses) == 30 and _decreases(result.losses), result.losses
    model = CLIPModel.from_pretrained(tmp_path)
    clip_retrieval_top1(model, AutoProcessor.from_pretrained(tmp_path), make_samples(4, 2))


def test_training_is_deterministic(tmp_path: Path):
    for run in ("a", "b"):
        train_llava(3, seed=3, out_dir=tmp_path / run, batch_size=4, log_every=10)
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("a", "b")]
    assert weights[0] == weights[1]


# -- synthetic data ------------------------------------------------------------------------


def test_rendering_is_deterministic():
    first, second = make_samples(12, seed=5, size=48), make_samples(12, seed=5, size=48)
    for a, b in zip(first, second, strict=True):
        assert a.image.size == (48, 48)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert (a.question, a.answer, a.caption) == (b.question, b.answer, b.caption)
    other = make_samples(12, seed=6, size=48)
    assert not np.array_equal(np.asarray(first[0].image), np.asarray(other[0].image))


def test_dataset_is_balanced():
    counts = Counter(s.qtype for s in make_samples(400, seed=7))
    assert counts == {qtype: 100 for qtype in QUESTION_TYPES}


def test_answer_normalization():
    assert normalize_answer("  A Red circle on the left. ") == "a red circle on the left"
