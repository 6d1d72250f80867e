"""Only architectures this build serves are served; local checkpoints enter the store like hub ones."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from lmm.architectures import GENERATIVE, UnsupportedModel, require
from tests.conftest import PY, ROOT, serve

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A tiny encoder-decoder checkpoint: a transformers model this project does not serve."""
    from transformers import T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("tiny-t5")
    T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                        num_heads=2)).save_pretrained(out)
    return out


def models_cli(bentoml_home, *args) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "models", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "BENTOML_HOME": str(bentoml_home)}, timeout=300)


def stored(bentoml_home, tag: str) -> dict:
    name, version = tag.split(":")
    return yaml.safe_load((bentoml_home / "models" / name / version / "model.yaml").read_text())


def test_a_local_checkpoint_enters_the_store_as_the_same_entry(bentoml_home, llava_dir):
    done = models_cli(bentoml_home, "import-hf", str(llava_dir), "--name", "copied-llava")
    assert done.returncode == 0, done.stdout + done.stderr
    tag = done.stdout.strip().splitlines()[-1].removeprefix("[models] ")
    built = (bentoml_home / "models" / "lmm-shapes-llava" / "latest").read_text()
    assert tag == f"copied-llava:{built}"  # content hash: the same weights, the same version
    info = stored(bentoml_home, tag)
    assert info["metadata"]["architecture"] == "LlavaForConditionalGeneration"
    assert info["labels"]["source"] == "local"


def test_a_directory_without_a_checkpoint_is_refused(bentoml_home, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    done = models_cli(bentoml_home, "import-hf", str(tmp_path))
    assert done.returncode == 2
    assert "no config.json" in done.stdout and "save_pretrained" in done.stdout


def test_the_architecture_check_names_the_supported_ones(llava_dir, t5_dir):
    assert require(llava_dir, "llm_model", "x", GENERATIVE) == "LlavaForConditionalGeneration"
    with pytest.raises(UnsupportedModel) as refused:
        require(t5_dir, "llm_model", "tiny-t5:latest", GENERATIVE)
    message = str(refused.value)
    assert "T5ForConditionalGeneration" in message
    assert all(name in message for name in GENERATIVE)


def test_every_family_of_the_registry_is_supported(tmp_path):
    """The supported list is the families registry: each family's architectures, and any
    text-only *ForCausalLM through the text family."""
    from lmm.families import REGISTRY, family_for
    from models.families import text

    assert {a for e in REGISTRY for a in e.architectures} == set(GENERATIVE)
    for name in ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                 "LlavaNextForConditionalGeneration", "Gemma3ForConditionalGeneration",
                 "LlavaForConditionalGeneration", "*ForCausalLM"):
        assert name in GENERATIVE
    path = text.build(tmp_path / "text", seed=0)
    assert require(path, "llm_model", "x", GENERATIVE) == "LlamaForCausalLM"
    assert family_for(path).name == "text" and not family_for(path).takes_images


def test_an_unsupported_model_is_refused_at_startup(bentoml_home, t5_dir, tmp_path):
    done = models_cli(bentoml_home, "import-hf", str(t5_dir), "--name", "tiny-t5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not served by this build" in done.stdout  # warned when it is stored

    srv = serve(bentoml_home, tmp_path, extra=["--arg", "llm_model=tiny-t5:latest"])
    try:
        code = srv.proc.wait(120)  # stops by itself, before any worker starts
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert code != 0
    assert "llm_model=tiny-t5:latest is a T5ForConditionalGeneration" in log
    assert "LlavaForConditionalGeneration" in log and "Traceback" not in log
