"""The bench-size LLaVA (models/bench.py): the full size is what README.md says (counted on the
meta device), and a reduced variant built by the same code is reproducible, keeps the shapes
tokenizer and chat template, and loads in the vision encoder and the transformers engine with
as many image tokens in the prompt as the tower gives features; the bench CLIP beside it has the
same tower sizes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from models.bench import HEAD_DIM, BenchSize, bench_config, parameter_counts, save_bench_llava
from models.shapes import LLAVA_DIR
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

# The same code path at a size that builds in a second: 2 heads of 64 on both sides.
REDUCED = BenchSize(hidden=128, layers=2, intermediate=256, vision_hidden=128, vision_layers=2,
                    vision_intermediate=256)


@pytest.fixture(scope="module")
def reduced_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "llava"
    save_bench_llava(out, REDUCED, seed=0)
    return out


def models_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Models\n", 1)[1].split("\n## ", 1)[0]


def test_full_size_is_what_the_readme_says():
    config = bench_config()
    text, vision = config.text_config, config.vision_config
    assert text.hidden_size // text.num_attention_heads == HEAD_DIM == text.head_dim
    assert vision.hidden_size // vision.num_attention_heads == HEAD_DIM
    assert (text.hidden_size, text.num_attention_heads, text.num_hidden_layers,
            text.intermediate_size) == (768, 12, 12, 2560)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size,
            vision.image_size, vision.patch_size) == (768, 12, 3072, 224, 16)
    assert config.image_seq_length == 196
    assert text.max_position_embeddings >= 2048  # configs/default.yaml's llm.max_model_len
    counts = parameter_counts(config)
    assert 95e6 < counts["language_model"] < 105e6, counts
    section = models_section()
    for part in ("language_model", "vision_tower", "projector", "total"):
        assert f"{counts[part]:,}" in section, (part, counts[part])


def test_sizes_keep_heads_64_wide():
    with pytest.raises(ValueError, match="multiple of 64"):
        BenchSize(hidden=96)
    with pytest.raises(ValueError, match="multiple of 64"):
        BenchSize(vision_hidden=100)
    assert REDUCED.heads == 2 and REDUCED.vision_heads == 2


def test_reduced_counts_match_the_built_model(reduced_dir):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(reduced_dir)
    counts = parameter_counts(bench_config(REDUCED))
    assert sum(p.numel() for p in model.parameters()) == counts["total"]
    assert all(p.dtype.is_floating_point and p.element_size() == 4 for p in model.parameters())


def test_same_seed_same_bytes_other_seed_other_weights(reduced_dir, tmp_path):
    save_bench_llava(tmp_path / "again", REDUCED, seed=0)
    save_bench_llava(tmp_path / "other", REDUCED, seed=1)
    weights = (reduced_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == weights
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != weights


def test_llava_hf_layout_and_shapes_tokenizer(reduced_dir):
    from safetensors import safe_open

    with safe_open(reduced_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    tower = [k for k in keys if k.startswith("vision_tower.")]
    assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower)
    vocab = lambda d: json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]  # noqa: E731
    assert vocab(reduced_dir) == vocab(LLAVA_DIR)
    template = (reduced_dir / "chat_template.jinja").read_text()
    assert template == (LLAVA_DIR / "chat_template.jinja").read_text()


def test_processor_tokens_equal_tower_features_and_the_engine_loads(reduced_dir):
    from transformers import AutoProcessor

    from lmm.encoders import LlavaVisionEncoder
    from runners.engines.transformers_engine import TransformersEngine

    processor = AutoProcessor.from_pretrained(reduced_dir)
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": "What shape is this?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(ROOT / "examples" / "red-circle-left.png").convert("RGB")
    inputs = processor(text=prompt, images=[image], return_tensors="np")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    ids = inputs["input_ids"][0].tolist()
    assert "<unk>" not in processor.tokenizer.convert_ids_to_tokens(ids)

    encoder = LlavaVisionEncoder(str(reduced_dir), device="cpu", dtype="float32")
    features = encoder(inputs["pixel_values"])
    assert features.shape == (1, REDUCED.image_tokens, REDUCED.hidden)
    assert ids.count(encoder.config.image_token_id) == features.shape[1] == 196
    assert np.isfinite(features).all()

    engine = TransformersEngine(str(reduced_dir), device="cpu", dtype="float32")
    engine.load()
    assert engine.hidden_size == REDUCED.hidden
    assert engine.image_token_id == encoder.config.image_token_id
    assert engine.eos_ids == {processor.tokenizer.eos_token_id}
    assert engine.text_config.num_hidden_layers == REDUCED.layers


def test_the_bench_clip_has_the_llavas_tower_sizes_and_embeds_to_unit_vectors(tmp_path):
    from transformers import CLIPProcessor

    from lmm.encoders import ClipEmbedder
    from models.bench import CLIP_PROJECTION, save_bench_clip

    parameters = save_bench_clip(tmp_path / "clip", REDUCED, seed=0)
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    vision = config["vision_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["image_size"],
            vision["patch_size"]) == (REDUCED.vision_hidden, REDUCED.vision_layers,
                                      REDUCED.image_size, REDUCED.patch_size)
    embedder = ClipEmbedder(str(tmp_path / "clip"), "cpu", "float32")
    assert sum(p.numel() for p in embedder.model.parameters()) == parameters
    processor = CLIPProcessor.from_pretrained(tmp_path / "clip")
    pixels = processor.image_processor([Image.new("RGB", (300, 200), (200, 30, 30))],
                                       return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, REDUCED.image_size, REDUCED.image_size)
    vectors = embedder.embed_images(np.asarray(pixels, np.float32))
    assert vectors.shape == (1, CLIP_PROJECTION)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
