"""The bundled shapes models: accuracy of the committed weights, an oracle that notices broken
preprocessing, a smoke run of both trainers, and determinism of the synthetic data."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import threading
from collections import Counter
from email import policy
from email.parser import BytesParser
from pathlib import Path

import httpx
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
from models.shapes.build import NUM_IMAGE_TOKENS, build_clip, build_llava
from models.shapes.data import (
    HELD_OUT_SEED,
    QUESTION_TYPES,
    Sample,
    make_samples,
    normalize_answer,
)
from models.shapes.evaluate import (
    clip_retrieval_top1,
    llava_accuracy,
    llava_generate,
    service_accuracy,
    service_retrieval_top1,
    user_messages,
)
from models.shapes.train import copy_vision_tower, train_clip, train_llava

pytestmark = pytest.mark.unit

# 100 per type: one unlucky sample must not decide a 98 % threshold.
PER_TYPE = 100


@pytest.fixture(scope="module")
def samples():
    return make_samples(PER_TYPE * len(QUESTION_TYPES), HELD_OUT_SEED)


@pytest.fixture(scope="module")
def llava():
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
    # Without torchvision AutoProcessor must fall back to the PIL backend instead of failing.
    if importlib.util.find_spec("torchvision") is None:
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
    assert tok.decode([*answer, tok.eos_token_id], skip_special_tokens=True) == (
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


# Measured on the committed weights (400 held-out samples; shape/color/position/describe):
#   no normalisation  0.67 / 0.67 / 0.66 / 0.28
#   BGR               0.90 / 0.29 / 0.99 / 0.36  (red<->blue etc.: only colour breaks)
#   rotated in batch  0.23 / 0.20 / 0.18 / 0.01
# Asserted are the types that also stayed below 0.8 for an independently trained model, so a
# retrain does not turn this into a coin flip; colour and describe are always among them.
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


# -- the HTTP client, against an in-process stand-in for the server ------------------------


def _form_fields(request: httpx.Request) -> dict[str, bytes]:
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = BytesParser(policy=policy.default).parsebytes(head + request.read())
    return {
        part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
        for part in message.iter_parts()
    }


@pytest.fixture(scope="module")
def stub_server(llava):
    """The server's contract (routes, field names, response JSON) served by the HF models."""
    model, processor = llava
    clip = CLIPModel.from_pretrained(CLIP_DIR).eval()
    clip_processor = AutoProcessor.from_pretrained(CLIP_DIR)
    lock = threading.Lock()  # the client sends concurrently; the models are shared

    def answer(png: bytes, question: str) -> str:
        image = Image.open(io.BytesIO(png)).convert("RGB")
        with lock:
            return llava_generate(model, processor, [Sample(image, question, "", "", "")])[0]

    def embed(texts: list[str], images: list[Image.Image]) -> dict[str, list]:
        with lock, torch.inference_mode():
            t = clip.get_text_features(
                **clip_processor.tokenizer(texts, padding=True, return_tensors="pt")
            )
            pixels = clip_processor.image_processor(images, return_tensors="pt")["pixel_values"]
            i = clip.get_image_features(pixel_values=pixels)
        t, i = t.pooler_output, i.pooler_output
        return {
            "text_embeddings": (t / t.norm(dim=1, keepdim=True)).tolist(),
            "image_embeddings": (i / i.norm(dim=1, keepdim=True)).tolist(),
        }

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/generate":
            form = _form_fields(request)
            assert int(form["max_tokens"]) >= 8
            return httpx.Response(
                200, json={"text": answer(form["images"], form["prompt"].decode())}
            )
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "clip", "kind": "embedding"},
                                                      {"id": "shapes-llava", "kind": "chat"}]})
        body = json.loads(request.content)
        if request.url.path == "/v1/chat/completions":
            assert body["model"] == "shapes-llava"
            image_part, text_part = body["messages"][0]["content"]
            png = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
            message = {"role": "assistant", "content": answer(png, text_part["text"])}
            return httpx.Response(200, json={"choices": [{"index": 0, "message": message}]})
        assert request.url.path == "/embed"
        images = [Image.open(io.BytesIO(base64.b64decode(b))) for b in body["images_b64"]]
        return httpx.Response(200, json=embed(body["texts"], [im.convert("RGB") for im in images]))

    return httpx.MockTransport(handle)


@pytest.mark.parametrize("route", ["native", "openai"])
def test_service_accuracy_client(stub_server, route):
    samples = make_samples(40, HELD_OUT_SEED + 2)
    acc = service_accuracy(
        "http://stub", samples, concurrency=4, route=route, transport=stub_server
    )
    assert acc == {qtype: 1.0 for qtype in QUESTION_TYPES}


def test_service_retrieval_client(stub_server):
    samples = make_samples(40, HELD_OUT_SEED + 3)
    assert service_retrieval_top1("http://stub/", samples, chunk=16, transport=stub_server) == 1.0


# -- the trainers still run ----------------------------------------------------------------


def _decreases(losses: list[float]) -> bool:
    return float(np.mean(losses[-5:])) < 0.8 * float(np.mean(losses[:5]))


def test_trainers_smoke(tmp_path: Path):
    # Same order as `python -m models.shapes train`: CLIP, then LLaVA on CLIP's vision tower.
    clip = train_clip(30, seed=1, out_dir=tmp_path / "clip", batch_size=16, log_every=10)
    assert len(clip.losses) == 30 and _decreases(clip.losses), clip.losses
    clip_model = CLIPModel.from_pretrained(tmp_path / "clip")
    clip_processor = AutoProcessor.from_pretrained(tmp_path / "clip")
    clip_retrieval_top1(clip_model, clip_processor, make_samples(4, 2))

    llava = train_llava(
        30,
        seed=1,
        out_dir=tmp_path / "llava",
        batch_size=8,
        log_every=10,
        vision_from=tmp_path / "clip",
    )
    assert len(llava.losses) == 30 and _decreases(llava.losses), llava.losses
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava")
    processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    assert model.config.image_token_id == processor.image_token_id
    assert llava_accuracy(model, processor, make_samples(4, 2))  # generates end to end


def test_vision_tower_starts_from_clip():
    clip, _ = build_clip(seed=4)
    llava, _ = build_llava(seed=5)
    copy_vision_tower(llava, clip)
    for name, tensor in clip.vision_model.state_dict().items():
        assert torch.equal(llava.model.vision_tower.state_dict()[name], tensor), name


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
