"""The architecture layer's own pieces: the families registry, per-image features on the wire
(meta and bfloat16 bits kept), the feature cache per ImageInput, the vision micro-batcher, the
generalised request checks and the text family's refusal of images."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from lmm.engine import validate_request
from lmm.families import (
    ImageFeatures,
    ImageInput,
    as_image_features,
    entry_for,
    features_from_wire,
    features_to_wire,
    family_for,
)
from lmm.feature_cache import FeatureCache
from lmm.microbatch import MicroBatcher
from lmm.protocol import SamplingParams
from lmm.transfer import from_wire, to_wire
from tests.conftest import WEIGHTS

pytestmark = pytest.mark.unit


def test_the_registry_picks_the_family_from_config_architectures(tmp_path):
    from models.families import text

    assert family_for(WEIGHTS / "llava").name == "llava"
    assert family_for(text.build(tmp_path / "t", seed=0)).name == "text"
    assert entry_for("MistralForCausalLM").name == "text"
    assert entry_for("Qwen2VLForConditionalGeneration").name == "qwen2_5_vl"
    assert entry_for("T5ForConditionalGeneration") is None
    with pytest.raises(ValueError, match="served architectures"):
        family_for(_config_only(tmp_path / "t5", "T5ForConditionalGeneration"))


def _config_only(path, architecture):
    path.mkdir()
    (path / "config.json").write_text(f'{{"architectures": ["{architecture}"]}}')
    return path


def test_ragged_features_and_meta_cross_the_wire_bit_for_bit():
    sent = [ImageFeatures(to_wire(torch.randn(5, 8, dtype=torch.bfloat16)),
                          {"image_grid_thw": np.array([1, 4, 5])}),
            ImageFeatures(to_wire(torch.randn(3, 8)), {})]
    import pickle

    got = features_from_wire(pickle.loads(pickle.dumps(features_to_wire(sent))))
    assert got[0].embeds.dtype == np.uint16 and got[0].embeds.shape == (5, 8)
    assert torch.equal(from_wire(got[0].embeds), from_wire(sent[0].embeds))
    assert got[0].meta["image_grid_thw"].tolist() == [1, 4, 5] and got[1].meta == {}
    assert [f.embeds.shape[0] for f in as_image_features(np.zeros((2, 4, 8), np.float32))] == [4, 4]
    with pytest.raises(ValueError, match="embeds"):
        features_from_wire([{"image_grid_thw": np.array([1, 2, 2])}])


def test_request_checks_count_every_images_rows():
    params = SamplingParams(max_tokens=1)
    images = [ImageFeatures(np.zeros((3, 8), np.float32)), ImageFeatures(np.zeros((2, 8), np.float32))]
    assert len(validate_request([9] * 5 + [1], images, params, 9, 8, 64)) == 2
    with pytest.raises(ValueError, match=r"4 image tokens but 5 feature rows.*3, 2 per image"):
        validate_request([9] * 4, images, params, 9, 8, 64)
    with pytest.raises(ValueError, match="takes no images"):
        validate_request([1], images, params, None, 8, 64, takes_images=False)


def test_the_cache_keys_each_image_on_all_its_inputs():
    calls = []

    async def encode(todo):
        calls.append(len(todo))
        return [ImageFeatures(np.full((int(im.arrays["grid"].prod()), 2), float(im.arrays["grid"][0]),
                                      np.float32), {"grid": im.arrays["grid"]}) for im in todo]

    def image(grid, fill=0.0):
        return ImageInput({"pixel_values": np.full((int(np.prod(grid)), 3), fill, np.float32),
                           "grid": np.array(grid)})

    cache = FeatureCache(1 << 20)
    first = asyncio.run(cache.features_per_image([image([1, 2, 2]), image([2, 1, 2])], encode))
    # same pixel bytes, another grid: another image; a repeat is answered from the cache
    again = asyncio.run(cache.features_per_image([image([2, 1, 2]), image([1, 4, 1])], encode))
    assert calls == [2, 1] and (cache.hits, cache.misses) == (1, 3)
    assert again[0].meta["grid"].tolist() == [2, 1, 2] and float(again[0].embeds[0, 0]) == 2.0
    assert first[1].embeds.shape == again[0].embeds.shape == (4, 2)


def test_the_micro_batcher_runs_the_calls_that_waited_as_one_batch():
    release = threading.Event()
    batches = []

    def run(images):
        batches.append(list(images))
        if len(batches) == 1:
            release.wait(10)
        return [f"features of {im}" for im in images]

    async def main():
        batcher = MicroBatcher(run, max_images=16)
        first = asyncio.create_task(batcher.encode(["a"]))
        while not batches:
            await asyncio.sleep(0.01)
        rest = [asyncio.create_task(batcher.encode(names)) for names in (["b", "c"], ["d"])]
        while batcher._queue.qsize() < 2:
            await asyncio.sleep(0.01)
        release.set()
        return await first, [await t for t in rest]

    first, rest = asyncio.run(main())
    assert batches == [["a"], ["b", "c", "d"]]
    assert first == ["features of a"] and rest == [["features of b", "features of c"],
                                                    ["features of d"]]


def test_a_text_only_model_refuses_images_with_the_reason(tmp_path):
    from PIL import Image
    from transformers import AutoTokenizer

    from lmm.config import load_config
    from lmm.errors import BadRequest
    from lmm.pipeline import Pipeline, user_messages
    from models.families import text

    path = text.build(tmp_path / "t", seed=0)
    pipeline = Pipeline(load_config(), AutoTokenizer.from_pretrained(path), None, None, None,
                        family=family_for(path))
    prompt = pipeline.build_prompt(user_messages("what shape is it", 0), [])
    assert prompt.pixel_values is None and prompt.images is None and prompt.token_ids
    assert pipeline.image_tokens() == 0
    with pytest.raises(BadRequest, match="takes no images"):
        pipeline.build_prompt(user_messages("what shape", 1), [Image.new("RGB", (8, 8))])
