"""The API's image-feature cache (lmm.feature_cache) as the real class: its byte bound and LRU
order, only new images sent to the encoder, concurrent misses coalesced, failures not cached,
and the pipeline answering the same with and without it."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from lmm.config import LMMConfig
from lmm.feature_cache import FeatureCache, image_key
from lmm.pipeline import Pipeline, user_messages

pytestmark = pytest.mark.unit
TOKENS, HIDDEN = 4, 8
ENTRY = TOKENS * HIDDEN * 2  # bytes of one image's float16 features


def pixels(*seeds: int) -> np.ndarray:
    """One [3, 6, 6] image per seed; the same seed, the same pixels."""
    return np.stack([np.random.default_rng(s).random((3, 6, 6), np.float32) for s in seeds])


class Encoder:
    """The vision runner's contract: features per image, a function of its pixels alone."""

    def __init__(self, gate: asyncio.Event | None = None, fail: bool = False):
        self.calls: list[int] = []
        self.gate, self.fail = gate, fail

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise RuntimeError("runner down")
        means = batch.reshape(len(batch), -1).mean(1)
        return np.broadcast_to(means[:, None, None], (len(batch), TOKENS, HIDDEN)
                               ).astype(np.float16)


def test_key_is_the_content_with_its_shape_and_dtype():
    a = pixels(1)[0]
    assert image_key(a) == image_key(a.copy())
    assert image_key(a) != image_key(pixels(2)[0])
    assert image_key(a) != image_key(a.reshape(3, 36))
    assert image_key(a) != image_key(a.astype(np.float16))


def test_bound_in_bytes_and_least_recently_used_goes_first():
    cache = FeatureCache(3 * ENTRY)
    blocks = {k: np.full((TOKENS, HIDDEN), k, np.float16) for k in range(5)}
    for k in (0, 1, 2):
        cache.put(bytes([k]), blocks[k])
    assert cache.bytes == 3 * ENTRY and len(cache) == 3
    assert cache.get(bytes([0])) is not None  # 0 is now the most recently used
    cache.put(bytes([3]), blocks[3])  # evicts 1, the least recently used
    assert [bytes([k]) in cache for k in range(4)] == [True, False, True, True]
    cache.put(bytes([4]), np.zeros((2 * TOKENS, HIDDEN), np.float16))  # two entries' worth
    assert [bytes([k]) in cache for k in (0, 2, 3, 4)] == [False, False, True, True]
    assert cache.bytes == 3 * ENTRY <= cache.max_bytes
    cache.put(bytes([5]), np.zeros((4 * TOKENS, HIDDEN), np.float16))  # larger than the cache
    assert bytes([5]) not in cache and cache.bytes == 3 * ENTRY
    cache.put(bytes([3]), blocks[3])  # the same key again: replaced, not counted twice
    assert cache.bytes == 3 * ENTRY and len(cache) == 2


def test_stored_features_are_a_read_only_copy():
    cache = FeatureCache(10 * ENTRY)
    block = np.ones((TOKENS, HIDDEN), np.float16)
    cache.put(b"k", block)
    block[:] = 7  # the runner's buffer reused
    stored = cache.get(b"k")
    assert (stored == 1).all() and not stored.flags.writeable


def test_refuses_a_negative_bound():
    with pytest.raises(ValueError):
        FeatureCache(-1)


def test_only_new_images_go_to_the_encoder_in_one_call():
    cache, encoder = FeatureCache(100 * ENTRY), Encoder()
    first = asyncio.run(cache.features(pixels(1, 2), encoder))
    mixed = asyncio.run(cache.features(pixels(2, 3, 1, 3), encoder))  # 3 twice in one request
    assert encoder.calls == [2, 1]  # then only image 3, once
    assert (cache.hits, cache.misses) == (3, 3)
    expected = asyncio.run(Encoder()(pixels(2, 3, 1, 3)))
    assert mixed.dtype == np.float16 and np.array_equal(mixed, expected)
    assert np.array_equal(first, expected[[2, 0]])


def test_concurrent_misses_of_one_image_encode_it_once():
    async def scenario():
        gate = asyncio.Event()
        cache, encoder = FeatureCache(100 * ENTRY), Encoder(gate)
        tasks = [asyncio.create_task(cache.features(pixels(5, 6 + i), encoder))
                 for i in range(4)]
        await asyncio.sleep(0.01)
        gate.set()
        return encoder, cache, await asyncio.gather(*tasks)

    encoder, cache, results = asyncio.run(scenario())
    assert sorted(encoder.calls) == [1, 1, 1, 2]  # image 5 in the first call only
    assert (cache.hits, cache.misses) == (3, 5)
    for i, got in enumerate(results):
        assert np.array_equal(got, asyncio.run(Encoder()(pixels(5, 6 + i))))


def test_a_failed_encode_is_not_cached_and_its_waiters_encode_themselves():
    async def scenario():
        gate = asyncio.Event()
        cache = FeatureCache(100 * ENTRY)
        failing, working = Encoder(gate, fail=True), Encoder()
        leader = asyncio.create_task(cache.features(pixels(9), failing))
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(cache.features(pixels(9), working))
        await asyncio.sleep(0.01)
        gate.set()
        with pytest.raises(RuntimeError):
            await leader
        return cache, working, await waiter

    cache, working, got = asyncio.run(scenario())
    assert working.calls == [1] and len(cache) == 1
    assert np.array_equal(got, asyncio.run(Encoder()(pixels(9))))


def test_a_cancelled_encode_leaves_nothing_pending():
    async def scenario():
        gate = asyncio.Event()
        cache = FeatureCache(100 * ENTRY)
        task = asyncio.create_task(cache.features(pixels(4), Encoder(gate)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not cache._pending
        return await cache.features(pixels(4), Encoder())

    assert asyncio.run(scenario()).shape == (1, TOKENS, HIDDEN)


# -- in the pipeline ----------------------------------------------------------------------
class Vision:
    def __init__(self):
        self.encoded = 0

    async def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        self.encoded += len(pixel_values)
        return await Encoder()(pixel_values)


@pytest.fixture(scope="module")
def processor(llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(llava_dir)


@pytest.mark.parametrize("cache_bytes", [0, 1 << 20])
def test_the_pipeline_gets_the_same_features_with_and_without_the_cache(processor, cache_bytes):
    vision = Vision()
    pipe = Pipeline(LMMConfig(images={"feature_cache_bytes": cache_bytes}), processor, None,
                    vision, None)
    assert (pipe.cache is None) == (cache_bytes == 0)
    red, blue = Image.new("RGB", (40, 40), (200, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 200))
    results = []
    for images in ([red], [red, blue], [blue, red], [red]):
        prompt = pipe.build_prompt(user_messages("x", len(images)), images)
        results.append(asyncio.run(pipe.encode(prompt)))
        assert np.array_equal(results[-1], asyncio.run(Encoder()(prompt.pixel_values)))
    assert vision.encoded == (6 if cache_bytes == 0 else 2)


def test_the_config_refuses_a_negative_size():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="feature_cache_bytes"):
        LMMConfig(images={"feature_cache_bytes": -1})
    assert LMMConfig().images.feature_cache_bytes == 256 * 1024 * 1024
