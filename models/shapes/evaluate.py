"""Accuracy of the shapes models, in-process (HF objects) or against a running server."""

from __future__ import annotations

import base64
import functools
import io
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, LlavaForConditionalGeneration, LlavaProcessor

from models.shapes.data import QUESTION_TYPES, Sample, all_captions, normalize_answer

logger = logging.getLogger(__name__)

# Maps a batch of images to the `pixel_values` fed to the model; tests swap in broken ones.
Preprocess = Callable[[list[Image.Image]], torch.Tensor]


def user_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _per_type(samples: Sequence[Sample], answers: Sequence[str]) -> dict[str, float]:
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, text in zip(samples, answers, strict=True):
        hits[sample.qtype].append(normalize_answer(text) == normalize_answer(sample.answer))
    return {q: float(np.mean(hits[q])) for q in QUESTION_TYPES if hits[q]}


@torch.inference_mode()
def llava_generate(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    preprocess: Preprocess | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 12,
) -> list[str]:
    """Greedy answers, batched with left padding like a server would batch them."""
    answers: list[str] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        prompts = [
            processor.apply_chat_template(
                user_messages(s.question), add_generation_prompt=True, tokenize=False
            )
            for s in chunk
        ]
        images = [s.image for s in chunk]
        inputs = processor(
            text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt"
        )
        if preprocess is not None:
            inputs["pixel_values"] = preprocess(images)
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        answers += processor.batch_decode(new_tokens, skip_special_tokens=True)
    return answers


def llava_accuracy(
    model: LlavaForConditionalGeneration,
    processor: LlavaProcessor,
    samples: Sequence[Sample],
    preprocess: Preprocess | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Exact-match accuracy per question type (after answer normalisation)."""
    answers = llava_generate(model, processor, samples, preprocess, batch_size)
    return _per_type(samples, answers)


@torch.inference_mode()
def clip_retrieval_top1(
    model: CLIPModel, processor: CLIPProcessor, samples: Sequence[Sample]
) -> float:
    """Image->text top-1 over every caption the generator can produce."""
    captions = all_captions()
    text = processor.tokenizer(captions, padding=True, return_tensors="pt")
    text_emb = model.get_text_features(**text).pooler_output
    pixels = processor.image_processor([s.image for s in samples], return_tensors="pt")
    image_emb = model.get_image_features(pixel_values=pixels["pixel_values"]).pooler_output
    return _top1(samples, captions, image_emb.numpy(), text_emb.numpy())


def _top1(
    samples: Sequence[Sample], captions: list[str], image_emb: np.ndarray, text_emb: np.ndarray
) -> float:
    image_emb = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_emb = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    best = (image_emb @ text_emb.T).argmax(axis=1)
    return float(np.mean([captions[j] == s.caption for j, s in zip(best, samples, strict=True)]))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _ask_native(client: httpx.Client, url: str, sample: Sample) -> str:
    resp = client.post(
        f"{url}/generate",
        files={"images": ("image.png", png_bytes(sample.image), "image/png")},
        data={"prompt": sample.question, "max_tokens": "16"},
    )
    resp.raise_for_status()
    return str(resp.json()["text"])


def _ask_openai(client: httpx.Client, url: str, sample: Sample, model: str = "") -> str:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(sample.image)).decode()
    body = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": sample.question},
                ],
            }
        ],
        "max_tokens": 16,
        "temperature": 0,
    }
    resp = client.post(f"{url}/v1/chat/completions", json=body)
    resp.raise_for_status()
    return str(resp.json()["choices"][0]["message"]["content"])


def service_answers(
    url: str,
    samples: Sequence[Sample],
    concurrency: int = 16,
    route: str = "native",
    timeout: float = 60.0,
    transport: httpx.BaseTransport | None = None,
) -> list[str]:
    """Ask every sample's question about its image; `transport` lets tests stub the server."""
    asks = {"native": _ask_native, "openai": _ask_openai}
    if route not in asks:
        raise ValueError(f"route must be one of {sorted(asks)}, not {route!r}")
    ask = asks[route]
    url = url.rstrip("/")
    limits = httpx.Limits(max_connections=concurrency)
    # Concurrent requests so the server's batching is exercised, not just one-by-one calls.
    with (
        httpx.Client(timeout=timeout, limits=limits, transport=transport) as client,
        ThreadPoolExecutor(max_workers=concurrency) as pool,
    ):
        if route == "openai":  # the served chat model's name, as an OpenAI client finds it
            listed = client.get(f"{url}/v1/models").raise_for_status().json()["data"]
            model = next(m["id"] for m in listed if m.get("kind", "chat") == "chat")
            ask = functools.partial(_ask_openai, model=model)
        return list(pool.map(lambda s: ask(client, url, s), samples))


def service_accuracy(
    url: str,
    samples: Sequence[Sample],
    concurrency: int = 16,
    route: str = "native",
    transport: httpx.BaseTransport | None = None,
) -> dict[str, float]:
    """Exact-match accuracy per question type of a running server."""
    answers = service_answers(url, samples, concurrency, route, transport=transport)
    for sample, text in zip(samples, answers, strict=True):
        logger.debug("%s | %s -> %r (want %r)", sample.qtype, sample.question, text, sample.answer)
    return _per_type(samples, answers)


def service_retrieval_top1(
    url: str,
    samples: Sequence[Sample],
    chunk: int = 64,
    timeout: float = 60.0,
    transport: httpx.BaseTransport | None = None,
) -> float:
    """Image->text top-1 over every caption, with embeddings from the server's /embed."""
    captions = all_captions()
    image_embs: list[list[float]] = []
    text_emb: np.ndarray | None = None
    with httpx.Client(timeout=timeout, transport=transport) as client:
        for i in range(0, len(samples), chunk):
            images = [base64.b64encode(png_bytes(s.image)).decode() for s in samples[i : i + chunk]]
            resp = client.post(
                f"{url.rstrip('/')}/embed", json={"texts": captions, "images_b64": images}
            )
            resp.raise_for_status()
            body = resp.json()
            text_emb = np.asarray(body["text_embeddings"], dtype=np.float64)
            image_embs += body["image_embeddings"]
    if text_emb is None:
        return float("nan")
    return _top1(samples, captions, np.asarray(image_embs, dtype=np.float64), text_emb)
