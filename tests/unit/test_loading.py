"""Part loading (lmm.loading): each runner materialises only its half of the LLaVA checkpoint,
counted on the modules it loaded (transformers backend: vision encoder and TransformersEngine;
vLLM backend: inside vLLM's worker), in both checkpoint layouts, sharded or not; a checkpoint
that does not match its config is refused by name; tied embeddings stay tied; a device_map
over cpu and disk offload (accelerate's hooks) gives the whole model's greedy tokens."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lmm.encoders import LlavaVisionEncoder
from lmm.loading import (
    CheckpointError,
    CheckpointIndex,
    checkpoint_numel,
    load_part,
    parameter_numel,
)
from lmm.pipeline import user_messages
from lmm.protocol import SamplingParams
from models.shapes.data import make_samples
from runners.engines.transformers_engine import TransformersEngine

pytestmark = pytest.mark.unit
LAYERS = "model.language_model.layers"


@pytest.fixture(scope="module")
def whole(llava_dir):
    """The whole model as transformers loads it (today's reference) and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(llava_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(llava_dir)


@pytest.fixture(scope="module")
def layouts(llava_dir, whole, tmp_path_factory):
    """The shapes checkpoint in each layout the loader reads: llava-hf (as stored), the model's
    own transformers 5 names (model.language_model.*, ...), what this transformers'
    save_pretrained writes, and that sharded (model.safetensors.index.json)."""
    import shutil

    model, _ = whole
    own = tmp_path_factory.mktemp("own-names")
    shutil.copytree(llava_dir, own, dirs_exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              own / "model.safetensors", metadata={"format": "pt"})
    saved = tmp_path_factory.mktemp("saved")
    sharded = tmp_path_factory.mktemp("sharded")
    for path, shard in ((saved, "50GB"), (sharded, "100KB")):
        shutil.copytree(llava_dir, path, dirs_exist_ok=True)
        (path / "model.safetensors").unlink()
        model.save_pretrained(path, max_shard_size=shard)
    return {"llava-hf": llava_dir, "own-names": own, "save_pretrained": saved,
            "sharded": sharded}


def test_the_checkpoint_layouts_are_the_ones_described(layouts):
    def tops(name):
        return {".".join(k.split(".")[:2]) for k in load_file(layouts[name] / "model.safetensors")}

    assert tops("llava-hf") >= {"language_model.model", "vision_tower.vision_model"}
    assert tops("own-names") == {"model.language_model", "model.vision_tower",
                                 "model.multi_modal_projector", "lm_head.weight"}
    index = json.loads((layouts["sharded"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert not (layouts["sharded"] / "model.safetensors").exists()


def test_the_vision_encoder_loads_no_language_model(llava_dir):
    """Counted on the encoder's loaded modules: the tower and projector, every one of their
    checkpoint elements, and not one language-model parameter."""
    counts = parameter_numel(LlavaVisionEncoder(str(llava_dir), "cpu", "float32").model)
    stored = checkpoint_numel(llava_dir)
    assert stored["vision"] > 0 and stored["language"] > 0
    assert counts == {"vision": stored["vision"], "language": 0, "other": 0}


def test_the_transformers_engine_loads_no_vision_tower(llava_dir):
    engine = TransformersEngine(str(llava_dir), "cpu", "float32")
    engine.load()
    counts = parameter_numel(engine.model)
    assert counts == {"vision": 0, "language": checkpoint_numel(llava_dir)["language"], "other": 0}
    assert engine.model.model.vision_tower is None
    assert engine.model.model.multi_modal_projector is None
    assert not [n for n, p in engine.model.named_parameters() if p.device.type == "meta"]


def test_the_vllm_worker_loads_no_vision_tower(llava_dir):
    """Inside vLLM's worker process (collective_rpc): the tower and projector are empty
    stage-missing layers, and the language model holds the checkpoint's language part."""
    from runners.engines.vllm_engine import VLLMEngine

    async def scenario():
        engine = VLLMEngine(str(llava_dir), device="cpu", dtype="float32", max_model_len=512,
                            enforce_eager=True, cpu_kvcache_space_gib=1)
        await engine.start()
        try:
            return await engine.loaded_parameters()
        finally:
            await engine.shutdown()

    (worker,) = asyncio.run(scenario())  # one rank: tensor_parallel_size 1
    empty = {"class": "StageMissingLayer", "numel": 0, "weights": 0, "methods": []}
    assert worker["vision_tower"] == worker["multi_modal_projector"] == empty
    assert "UnquantizedLinearMethod" in worker["language_model"]["methods"]
    assert worker["language_model"]["weights"] == checkpoint_numel(llava_dir)["language"]
    assert set(worker) == {"vision_tower", "multi_modal_projector", "language_model"}


@pytest.mark.parametrize("layout", ["llava-hf", "own-names", "save_pretrained", "sharded"])
def test_each_part_equals_the_whole_models_tensors_in_every_layout(layout, layouts, llava_dir,
                                                                   whole):
    path = layouts[layout]
    reference = whole[0].state_dict()
    assert checkpoint_numel(path) == checkpoint_numel(llava_dir)
    for part in ("vision", "language"):
        model = load_part(path, part, torch.float32)
        state = model.state_dict()
        assert state and all(k.startswith(("model.vision_tower", "model.multi_modal_projector"))
                             == (part == "vision") for k in state)
        for name, tensor in state.items():
            assert torch.equal(tensor, reference[name]), name


def test_the_part_is_cast_to_the_configured_dtype(llava_dir):
    model = load_part(llava_dir, "language", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _rewrite(src, dst, change) -> None:
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_refused_by_name(llava_dir, tmp_path):
    _rewrite(llava_dir, tmp_path / "missing",
             lambda t: t.pop("language_model.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing 1: model\.language_model\.layers\.1\.mlp"):
        load_part(tmp_path / "missing", "language", torch.float32)
    load_part(tmp_path / "missing", "vision", torch.float32)  # the vision part is whole

    _rewrite(llava_dir, tmp_path / "extra",
             lambda t: t.update({"multi_modal_projector.linear_3.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected 1: model\.multi_modal_projector\.linear_3"):
        load_part(tmp_path / "extra", "vision", torch.float32)

    _rewrite(llava_dir, tmp_path / "stray", lambda t: t.update({"image_newline": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match="in no part 1: image_newline"):
        load_part(tmp_path / "stray", "language", torch.float32)

    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointIndex.read(tmp_path)


def test_tied_embeddings_are_one_parameter_and_match_the_whole_model(llava_dir, tmp_path):
    """tie_word_embeddings: lm_head is not stored; the loaded head is the embedding itself."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(llava_dir)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = True
    torch.manual_seed(0)
    tied = AutoModelForImageTextToText.from_config(config).eval()
    tied.save_pretrained(tmp_path)
    assert not [k for k in load_file(tmp_path / "model.safetensors") if k.startswith("lm_head")]
    part = load_part(tmp_path, "language", torch.float32)
    assert part.lm_head.weight is part.model.language_model.embed_tokens.weight
    ids = torch.tensor([[2, 5, 6, 7, 9]])
    with torch.no_grad():
        expected = tied(input_ids=ids).logits
        got = part.lm_head(part.model.language_model(input_ids=ids).last_hidden_state)
    assert torch.equal(got, expected)
    assert parameter_numel(part)["language"] == checkpoint_numel(tmp_path)["language"]


def test_an_explicit_device_map_places_every_module_or_is_refused(llava_dir, tmp_path):
    with pytest.raises(ValueError, match="places no module holding lm_head.weight"):
        load_part(llava_dir, "language", torch.float32,
                  device_map={"model.language_model": "cpu"})
    # the rotary table is in no map entry: it goes where the inputs enter
    model = load_part(llava_dir, "language", torch.float32,
                      device_map={"model.language_model.embed_tokens": "cpu",
                                  LAYERS: "cpu", "model.language_model.norm": "cpu",
                                  "lm_head": "cpu"})
    assert model.hf_device_map["model.language_model.rotary_emb"] == "cpu"
    with pytest.raises(ValueError, match="set offload_folder"):
        load_part(llava_dir, "language", torch.float32,
                  device_map={"model.language_model": "cpu", "lm_head": "disk"})


def _cases(processor, encoder):
    samples = make_samples(6, seed=7)
    cases = [(s.question, [s.image]) for s in samples[:4]]
    cases += [("Describe the image.", [samples[4].image, samples[5].image]),
              ("What shape is this?", [])]
    out = []
    for question, images in cases:
        text = processor.apply_chat_template(user_messages(question, len(images)),
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=images or None, return_tensors="pt",
                           add_special_tokens=False)
        features = encoder(inputs["pixel_values"].numpy()) if images else None
        out.append((inputs, features))
    return out


def test_a_cpu_and_disk_device_map_gives_the_whole_models_greedy_tokens(llava_dir, whole,
                                                                        tmp_path):
    """Decoder layer 0 and the embeddings in RAM, layer 1 and lm_head offloaded to disk
    (accelerate's hooks bring them in per forward): the engine's greedy tokens are those of
    the unsplit model's generate()."""
    model, processor = whole
    device_map = {
        "model.language_model.embed_tokens": "cpu",
        f"{LAYERS}.0": "cpu",
        f"{LAYERS}.1": "disk",
        "model.language_model.norm": "cpu",
        "model.language_model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    engine = TransformersEngine(str(llava_dir), "cpu", "float32", max_model_len=512,
                                device_map=device_map, offload_folder=str(tmp_path))
    cases = _cases(processor, LlavaVisionEncoder(str(llava_dir), "cpu", "float32"))
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    expected = []
    for inputs, _ in cases:
        with torch.no_grad():
            ref = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        expected.append([t for t in ref[0, inputs["input_ids"].shape[1]:].tolist()
                         if t not in eos and t != model.generation_config.pad_token_id])

    async def scenario():
        await engine.start()
        try:
            async def one(i, inputs, features):
                tokens = []
                async for out in engine.generate(f"r{i}", inputs["input_ids"][0].tolist(),
                                                 features, SamplingParams(max_tokens=12)):
                    tokens += out.token_ids
                return tokens
            return await asyncio.gather(*[one(i, *case) for i, case in enumerate(cases)])
        finally:
            await engine.shutdown()

    got = asyncio.run(scenario())
    assert got == expected and any(expected)
    # the offloaded weights are not in the modules: accelerate's hooks hold them on disk
    assert engine.lm_head.weight.device.type == "meta"
    assert engine.decoder.layers[1].mlp.up_proj.weight.device.type == "meta"
    assert engine.decoder.layers[0].mlp.up_proj.weight.device.type == "cpu"
    offloaded = list(tmp_path.glob("lmm-offload-*/lm_head.weight.dat"))
    assert len(offloaded) == 1
    assert parameter_numel(engine.model)["language"] == checkpoint_numel(llava_dir)["language"]


def test_a_device_map_strategy_is_worked_out_on_the_meta_model(llava_dir):
    """auto with a CPU budget (no GPU here): accelerate's plan, every tensor loaded on cpu."""
    model = load_part(llava_dir, "language", torch.float32, device_map="auto",
                      max_memory={"cpu": "1GiB"})
    assert set(model.hf_device_map.values()) == {"cpu"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
