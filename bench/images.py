"""Deterministic image sets for bench/serve.py, sent as data URLs.

``shapes``  64 shapes images (drawn at 32 px, scaled to 64 px, PNG), cycled: the small case.
``large``   8 images of 336x336, 640x480, 1024x768 and 1024x1024 px, each size once as a shapes
            drawing (PNG) and once as a colour gradient with noise (JPEG), cycled: decoding and
            resizing cost what they cost in real traffic. The largest is about 1.2 MB, under the
            2 MB byte limit of configs/test.yaml.
``repeat``  64-px shapes images where every even-numbered request takes its images from a pool of
            4, and every odd-numbered one gets images drawn for it alone (new for each level), so
            half of the requests repeat an image an image-feature cache could hold.

``shapes`` and ``large`` draw new images for each level (``level``), so a later level of a sweep
gets no help from the prefix cache or the image-feature cache filled by an earlier one.
Each request carries ``per_request`` images; its question is the first image's shapes question.
"""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.shapes.data import QUESTION_TYPES, QUESTIONS, make_samples, random_sample

IMAGE_SETS = ("shapes", "large", "repeat")
LARGE_SIZES = ((336, 336), (640, 480), (1024, 768), (1024, 1024))
REPEAT_POOL = 4


@dataclass(frozen=True)
class Prompt:
    images: tuple[str, ...]  # data URLs
    question: str


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def _small(samples) -> list[tuple[str, str]]:
    return [(data_url(s.image.resize((64, 64))), s.question) for s in samples]


@functools.cache
def _shapes_pool(level: int = 0) -> tuple[tuple[str, str], ...]:
    return tuple(_small(make_samples(64, seed=11 + 7919 * level)))


def gradient(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A diagonal colour gradient with Gaussian noise (JPEG-like content, nothing to compress
    away)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 1, size=3) * 255
    base = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], -1)
    pixels = (base + phase) % 256 + rng.normal(0, 8, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@functools.cache
def _large_pool(level: int = 0) -> tuple[tuple[str, str], ...]:
    rng = np.random.default_rng(12 + 7919 * level)
    pool = []
    for i, (width, height) in enumerate(LARGE_SIZES):
        sample = random_sample(rng, QUESTION_TYPES[i % len(QUESTION_TYPES)], max(width, height))
        drawing = sample.image.resize((width, height)) if width != height else sample.image
        pool.append((data_url(drawing, "PNG"), sample.question))
        pool.append((data_url(gradient(width, height, rng), "JPEG"), QUESTIONS["describe"][0]))
    return tuple(pool)


def _cycled(pool, count: int, per_request: int) -> list[Prompt]:
    out = []
    for i in range(count):
        picked = [pool[(i * per_request + j) % len(pool)] for j in range(per_request)]
        out.append(Prompt(tuple(url for url, _ in picked), picked[0][1]))
    return out


def prompts(name: str, count: int, per_request: int = 1, level: int = 0) -> list[Prompt]:
    """``count`` requests' images and questions from set ``name``; ``level`` seeds the images
    (for ``repeat``, those drawn for one request alone), so no two levels share them."""
    if name == "shapes":
        return _cycled(_shapes_pool(level), count, per_request)
    if name == "large":
        return _cycled(_large_pool(level), count, per_request)
    if name != "repeat":
        raise ValueError(f"unknown image set {name!r}; one of {', '.join(IMAGE_SETS)}")
    pool = _shapes_pool()[:REPEAT_POOL]
    out = []
    for i in range(count):
        if i % 2 == 0:
            picked = [pool[(i // 2 * per_request + j) % REPEAT_POOL] for j in range(per_request)]
        else:
            picked = _small(make_samples(per_request, seed=1_000_003 * (level + 1) + i))
        out.append(Prompt(tuple(url for url, _ in picked), picked[0][1]))
    return out
