"""The API's image-feature cache on a real server (images.feature_cache_bytes on): a repeated
image is encoded once, by the vision runner's own count, and answered exactly as the first
time; a request mixing cached and new images sends only the new ones; concurrent requests with
one new image encode it once; CLIP image embeddings (/embed) are cached the same way, apart from
the LLM's features of the same pixels; and the hit/miss counters on /metrics say the same."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest

from models.shapes.data import HELD_OUT_SEED, make_samples
from tests.conftest import serve
from tests.integration.test_metrics import delta, scrape

pytestmark = pytest.mark.integration
CACHE_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def cached(bentoml_home, tmp_path_factory):
    srv = serve(bentoml_home, tmp_path_factory.mktemp("logs-feature-cache"),
                extra=["--arg", f"images.feature_cache_bytes={CACHE_BYTES}"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(url: str, question: str, *images: bytes) -> dict:
    r = httpx.post(url + "/generate", timeout=120,
                   data={"prompt": question, "max_tokens": "16"},
                   files=[("images", (f"{i}.png", image, "image/png"))
                          for i, image in enumerate(images)])
    assert r.status_code == 200, r.text
    return r.json()


def encoded(metrics: dict) -> float:
    """Images the vision runner's encode API has run, over all its workers."""
    return metrics.get(("lmm_vision_batch_size_sum", (("api", "encode"),)), 0.0)


def embedded(metrics: dict) -> float:
    """Images the vision runner's CLIP embed_images API has run."""
    return metrics.get(("lmm_vision_batch_size_sum", (("api", "embed_images"),)), 0.0)


def embed(url: str, *images: bytes) -> list[list[float]]:
    r = httpx.post(url + "/embed", timeout=120,
                   files=[("images", (f"{i}.png", image, "image/png"))
                          for i, image in enumerate(images)])
    assert r.status_code == 200, r.text
    return r.json()["image_embeddings"]


def test_a_repeated_image_is_encoded_once_and_answered_the_same(cached):
    url = cached.url
    samples = make_samples(6, seed=HELD_OUT_SEED + 7)
    before = scrape(url)
    # every image new: the runner encodes each (the path a server without the cache takes)
    first = [generate(url, s.question, png(s.image)) for s in samples]
    middle = scrape(url)
    assert encoded(middle) - encoded(before) == len(samples)
    # the same again: no image reaches the runner, and the answers are the same
    assert [generate(url, s.question, png(s.image)) for s in samples] == first
    after = scrape(url)
    assert encoded(after) - encoded(middle) == 0
    assert delta(before, after, "lmm_image_cache_misses_total") == len(samples)
    assert delta(before, after, "lmm_image_cache_hits_total") == len(samples)


def test_only_the_new_images_of_a_request_are_encoded(cached):
    url = cached.url
    a, b, c = (png(s.image) for s in make_samples(3, seed=HELD_OUT_SEED + 8))
    generate(url, "Describe the image.", a)
    before = scrape(url)
    generate(url, "Describe the image.", a, b, c, b)  # a cached, b twice, c new
    after = scrape(url)
    assert encoded(after) - encoded(before) == 2  # b and c, once each, in one call
    assert delta(before, after, "lmm_image_cache_misses_total") == 2
    assert delta(before, after, "lmm_image_cache_hits_total") == 2


def test_concurrent_requests_with_one_new_image_encode_it_once(cached):
    url = cached.url
    sample = make_samples(1, seed=HELD_OUT_SEED + 9)[0]
    image = png(sample.image)

    async def burst(n: int) -> list[dict]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            async def one():
                r = await client.post("/generate", data={"prompt": sample.question,
                                                         "max_tokens": "16"},
                                      files=[("images", ("i.png", image, "image/png"))])
                assert r.status_code == 200, r.text
                return r.json()
            return await asyncio.gather(*(one() for _ in range(n)))

    before = scrape(url)
    answers = asyncio.run(burst(8))
    after = scrape(url)
    assert encoded(after) - encoded(before) == 1
    assert len({a["text"] for a in answers}) == 1
    assert delta(before, after, "lmm_image_cache_misses_total") == 1
    assert delta(before, after, "lmm_image_cache_hits_total") == 7


def test_a_repeated_image_is_embedded_once_and_gets_the_same_vector(cached):
    url = cached.url
    a, b, c = (png(s.image) for s in make_samples(3, seed=HELD_OUT_SEED + 10))
    before = scrape(url)
    first = embed(url, a, b)
    middle = scrape(url)
    assert embedded(middle) - embedded(before) == 2
    again = embed(url, b, c, a)  # b and a from the cache, c new
    after = scrape(url)
    assert embedded(after) - embedded(middle) == 1
    assert again[0] == first[1] and again[2] == first[0]  # the very same vectors
    assert len(again[1]) == len(first[0]) and again[1] != first[0]
    assert delta(before, after, "lmm_image_cache_misses_total") == 3
    assert delta(before, after, "lmm_image_cache_hits_total") == 2
    # the LLM's features of the same pixels are another model's: a chat with ``a`` encodes it
    generate(url, "Describe the image.", a)
    assert encoded(scrape(url)) - encoded(after) == 1
