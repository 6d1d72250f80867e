"""Image features on the wire (lmm.transfer): float32, float16 and bfloat16 tensors go through
BentoML's own inter-service serialization and come out as the tensor the engine would have
computed with, bit for bit; and the real vision encoder and engines speak it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _bentoml_impl.serde import PickleSerde

from lmm.encoders import LlavaVisionEncoder
from lmm.engine import validate_request
from lmm.protocol import SamplingParams
from lmm.transfer import from_wire, to_wire, wire_dtype

pytestmark = pytest.mark.unit


def across_services(array: np.ndarray) -> np.ndarray:
    """What the receiving service gets: BentoML's serde between services (pickle protocol 5,
    buffers out of band), through bytes as on the HTTP hop."""
    serde = PickleSerde()
    payload = serde.serialize_value({"image_features": array})
    wire = b"".join(bytes(part) for part in payload.data)
    received = type(payload)((wire,), payload.metadata)
    return serde.deserialize_value(received)["image_features"]


def features(dtype: torch.dtype) -> torch.Tensor:
    # LLaVA-shaped values: a wide range, tiny magnitudes, exact zeros, negative zero.
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(2, 16, 64, generator=generator) * 30
    values[0, 0, :4] = torch.tensor([0.0, -0.0, 1e-7, -3e-6])
    return values.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_features_arrive_bit_for_bit_in_their_own_dtype(dtype):
    sent = features(dtype)
    array = across_services(to_wire(sent))
    assert wire_dtype(array) == str(dtype).removeprefix("torch.")
    assert array.nbytes == sent.numel() * sent.element_size()  # no widening on the wire
    got = from_wire(array, dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       sent.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_bfloat16_travels_as_its_bits_in_uint16():
    sent = features(torch.bfloat16)
    array = to_wire(sent)
    assert array.dtype == np.uint16
    assert np.array_equal(array, sent.view(torch.int16).numpy().view(np.uint16))


@pytest.mark.parametrize("sent,engine", [(torch.bfloat16, torch.float32),
                                         (torch.float16, torch.float32),
                                         (torch.float32, torch.bfloat16)])
def test_the_engine_gets_its_own_dtype(sent, engine):
    tensor = features(sent)
    got = from_wire(across_services(to_wire(tensor)), engine)
    assert got.dtype == engine and torch.equal(got, tensor.to(engine))


def test_other_dtypes_are_refused_by_the_engines_checks():
    ids = [7] * 32  # 32 image tokens
    for bad in (np.zeros((2, 16, 64), np.int32), np.zeros((2, 16, 64), np.float64)):
        with pytest.raises(ValueError, match="dtype"):
            validate_request(ids, bad, SamplingParams(max_tokens=1), 7, 64, 512)
    validate_request(ids, np.zeros((2, 16, 64), np.uint16), SamplingParams(max_tokens=1),
                     7, 64, 512)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_vision_encoder_sends_its_dtype(llava_dir, dtype):
    """The real tower + projector in half precision: what it sends is what it computed."""
    encoder = LlavaVisionEncoder(str(llava_dir), "cpu", dtype)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    sent = encoder(pixels)
    assert sent.dtype == (np.float16 if dtype == "float16" else np.uint16)
    assert sent.shape == (2, 64, 64)
    with torch.inference_mode():
        out = encoder.model.model.get_image_features(
            pixel_values=torch.as_tensor(pixels).to(encoder.dtype),
            vision_feature_layer=encoder.config.vision_feature_layer,
            vision_feature_select_strategy=encoder.config.vision_feature_select_strategy)
    direct = getattr(out, "pooler_output", out)
    direct = torch.stack(list(direct)) if isinstance(direct, (list, tuple)) else direct
    assert torch.equal(from_wire(across_services(sent), getattr(torch, dtype)), direct)
