"""The shipped LoRA adapter (models/shapes/weights/lora-terse) and `python -m models
import-adapter`: answers in its own form over the real HF model, the base form with the adapter
disabled, deterministic retraining, store entries and refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from models.shapes.data import (
    COLORS,
    HELD_OUT_SEED,
    POSITIONS,
    QUESTION_TYPES,
    SHAPES,
    answer,
    in_form,
    make_samples,
    terse_answer,
)
from models.shapes.evaluate import llava_generate
from models.shapes.lora import FORM, LORA_DIR, load_with_adapter, train_lora
from models.store import safetensors_shapes
from tests.conftest import ROOT

pytestmark = pytest.mark.unit

PER_TYPE = 50


def per_type_accuracy(samples, answers) -> dict[str, float]:
    hits: dict[str, list[bool]] = {q: [] for q in QUESTION_TYPES}
    for sample, text in zip(samples, answers, strict=True):
        hits[sample.qtype].append(text.strip() == sample.answer)
    return {q: sum(h) / len(h) for q, h in hits.items()}


def test_terse_form_is_distinct_and_spelt_with_the_vocabulary(llava_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llava_dir)
    assert terse_answer("describe", "circle", "red", "left") == "circle red left"
    seen = set()
    for qtype in QUESTION_TYPES:
        for shape in SHAPES:
            for color in COLORS:
                for position in POSITIONS:
                    terse = terse_answer(qtype, shape, color, position)
                    assert terse != answer(qtype, shape, color, position)
                    ids = tok(terse, add_special_tokens=False)["input_ids"]
                    assert tok.unk_token_id not in ids, terse
                    assert tok.decode(ids) == terse  # what a server's detokenizer gives back
                    seen.add((qtype, terse))
    # Deterministic and unambiguous: each question type maps attributes one-to-one.
    assert len(seen) == 4 + 4 * 6 + 4 * 5 + 4 * 6 * 5
    with pytest.raises(ValueError, match="answer form"):
        in_form(make_samples(1, 1)[0], "verbose")


@pytest.fixture(scope="module")
def adapted(llava_dir):
    return load_with_adapter(LORA_DIR, llava_dir)


def test_committed_adapter_is_a_standard_peft_lora_on_the_language_model():
    assert sorted(p.name for p in LORA_DIR.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((LORA_DIR / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["base_model_name_or_path"] == "models/shapes/weights/llava"
    keys = list(safetensors_shapes(LORA_DIR / "adapter_model.safetensors"))
    # 2 layers x 7 projections x (A, B); nothing in the vision tower or projector
    assert len(keys) == 28
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)


def test_adapter_answers_its_form_and_the_base_still_answers_the_base_form(adapted):
    model, processor = adapted
    samples = make_samples(PER_TYPE * len(QUESTION_TYPES), HELD_OUT_SEED)
    terse = [in_form(s, FORM) for s in samples]
    acc = per_type_accuracy(terse, llava_generate(model, processor, terse))
    assert min(acc.values()) >= 0.98, acc
    with model.disable_adapter():  # the same images and questions
        base_answers = llava_generate(model, processor, samples)
    acc = per_type_accuracy(samples, base_answers)
    assert min(acc.values()) >= 0.98, acc
    # and the adapter is back on after the block
    assert llava_generate(model, processor, terse[3:4])[0].strip() == terse[3].answer


def test_retraining_is_deterministic(tmp_path, llava_dir):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((first, 3), (second, 3), (other, 4)):
        r = train_lora(3, seed, out, base_dir=llava_dir, batch_size=4, log_every=3)
        assert r.params == 17408  # rank 8 over 2 x 7 projections of a 64-wide Llama
    weights = "adapter_model.safetensors"
    assert (first / weights).read_bytes() == (second / weights).read_bytes()
    assert (first / weights).read_bytes() != (other / weights).read_bytes()
    with pytest.raises(ValueError, match="held-out"):
        train_lora(1, HELD_OUT_SEED, tmp_path / "d", base_dir=llava_dir)


# --- the model store ---------------------------------------------------------------------


def run_models(home, *args, **env):
    return subprocess.run(
        [sys.executable, "-m", "models", *args], cwd=ROOT, capture_output=True, text=True,
        check=False,
        env={**os.environ, "BENTOML_HOME": str(home), **env}, timeout=120,
    )


def model_info(home, tag: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "get", tag, "-o", "json"],
        capture_output=True, text=True, env={**os.environ, "BENTOML_HOME": str(home)},
        check=True,
    ).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("adapter-home")
    out = run_models(home, "build")
    assert out.returncode == 0, out.stderr
    return home


def test_build_stores_the_shipped_adapter_beside_its_base(home):
    base = model_info(home, "lmm-shapes-llava:latest")
    info = model_info(home, "lmm-shapes-llava-terse:latest")
    base_tag = f"lmm-shapes-llava:{base['version']}"
    assert info["labels"]["role"] == "lora"
    assert info["labels"]["base_model"] == base_tag
    assert info["labels"]["answer_form"] == "terse"
    meta = info["metadata"]
    assert meta["base_model"] == base_tag and meta["rank"] == 8 and meta["hidden_size"] == 64
    assert meta["adapted_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                       "up_proj", "v_proj"]
    assert "language_model" in meta["target_modules"]
    assert meta["base_architecture"] == "LlavaForConditionalGeneration"


def test_import_adapter_stores_a_local_peft_directory(home, tmp_path):
    adapter = tmp_path / "lora-mine"
    shutil.copytree(LORA_DIR, adapter)
    out = run_models(home, "import-adapter", str(adapter), "--base", "lmm-shapes-llava")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "lmm-shapes-llava-mine:" in out.stdout
    info = model_info(home, "lmm-shapes-llava-mine:latest")
    assert info["labels"]["role"] == "lora" and info["labels"]["source"] == "local"
    out = run_models(home, "import-adapter", str(adapter), "--base", "lmm-shapes-llava",
                     "--name", "my-terse")
    assert out.returncode == 0 and "my-terse:" in out.stdout


def _refusal(home, adapter, base="lmm-shapes-llava") -> str:
    out = run_models(home, "import-adapter", str(adapter), "--base", base)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    return out.stdout


def test_import_adapter_refuses_what_is_not_a_lora_adapter(home, tmp_path, llava_dir):
    assert "has no adapter_config.json, so it is not a PEFT adapter" in _refusal(home, llava_dir)
    assert "is not a directory" in _refusal(home, tmp_path / "missing")

    ia3 = tmp_path / "ia3"
    shutil.copytree(LORA_DIR, ia3)
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert "is a PEFT IA3 adapter, not LoRA" in _refusal(home, ia3)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(LORA_DIR / "adapter_config.json", no_weights)
    assert "has no adapter_model.safetensors" in _refusal(home, no_weights)


def test_import_adapter_refuses_an_adapter_for_another_base(home, tmp_path):
    out = _refusal(home, LORA_DIR, base="lmm-shapes-clip")
    assert "trained on a LlavaForConditionalGeneration" in out and "CLIPModel" in out
    assert "is not in the store" in _refusal(home, LORA_DIR, base="no-such-model")

    # A LoRA of the same layout for a 128-wide language model (another model size).
    wide = tmp_path / "lora-wide"
    wide.mkdir()
    shutil.copy(LORA_DIR / "adapter_config.json", wide)
    prefix = "base_model.model.model.language_model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(8, 128),
               f"{prefix}.lora_B.weight": torch.zeros(128, 8)},
              wide / "adapter_model.safetensors")
    out = _refusal(home, wide)
    assert "is 128 -> 128 but lmm-shapes-llava:" in out and "hidden size 64" in out

    deep = tmp_path / "lora-deep"
    shutil.copytree(wide, deep)
    prefix = prefix.replace("layers.0", "layers.5")
    save_file({f"{prefix}.lora_A.weight": torch.zeros(8, 64),
               f"{prefix}.lora_B.weight": torch.zeros(64, 8)}, deep / "adapter_model.safetensors")
    assert "layers.5.self_attn.q_proj, which lmm-shapes-llava:" in _refusal(home, deep)

    vision = tmp_path / "lora-vision"
    shutil.copytree(wide, vision)
    prefix = "base_model.model.model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(8, 64),
               f"{prefix}.lora_B.weight": torch.zeros(64, 8)},
              vision / "adapter_model.safetensors")
    assert "outside the language model" in _refusal(home, vision)


def test_import_adapter_from_an_unreachable_hub_fails_clearly(tmp_path):
    out = run_models(tmp_path / "home", "import-adapter", "--hub", "someone/shapes-lora",
                     "--base", "lmm-shapes-llava", HF_ENDPOINT="http://127.0.0.1:9",
                     HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    assert out.returncode == 2
    assert "could not download someone/shapes-lora" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    both = run_models(tmp_path / "home", "import-adapter", str(LORA_DIR), "--hub", "a/b",
                      "--base", "lmm-shapes-llava")
    assert both.returncode == 2 and "either a local adapter directory" in both.stdout
