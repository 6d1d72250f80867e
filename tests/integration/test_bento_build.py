"""`bentoml build` from bentofile.yaml: offline, the three services and the pinned model versions in
bento.yaml, the config baked in, and a new version with the new code after a code change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import BENTOML, ROOT

pytestmark = pytest.mark.integration

SERVICES = {"lmm-api", "lmm-vision", "lmm-llm"}
MODELS = {"lmm-shapes-llava", "lmm-shapes-clip"}


def build_env(bentoml_home: Path) -> dict:
    # Offline: any HTTP(S) the build attempted would go to a closed loopback port and fail.
    dead = "http://127.0.0.1:9"
    return {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML_DO_NOT_TRACK": "True",
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "http_proxy": dead,
        "https_proxy": dead,
        "NO_PROXY": "",
        "no_proxy": "",
    }


def build(bentoml_home: Path, context: Path, config: str = "configs/test.yaml",
          bentofile: str = "bentofile.yaml") -> tuple[str, Path]:
    """`bentoml build` in `context`; the Bento tag and its folder in the store."""
    out = subprocess.run(
        [BENTOML, "build", "-f", bentofile, "-o", "tag", "--arg-file", config],
        cwd=context,
        env=build_env(bentoml_home),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    tag = next(
        line.removeprefix("__tag__:")
        for line in out.stdout.splitlines()
        if line.startswith("__tag__:")
    )
    name, version = tag.split(":")
    return tag, bentoml_home / "bentos" / name / version


def store_models(bentoml_home: Path) -> set[str]:
    return {
        f"{p.parent.name}:{p.name}" for p in (bentoml_home / "models").glob("*/*") if p.is_dir()
    }


@pytest.fixture(scope="module")
def built(bentoml_home):
    started = time.monotonic()
    tag, path = build(bentoml_home, ROOT)
    print(f"bentoml build: {time.monotonic() - started:.1f}s -> {tag}")
    return tag, path, yaml.safe_load((path / "bento.yaml").read_text())


def test_bento_yaml_names_the_three_services(built):
    tag, _, info = built
    assert info["service"] == "service:LMMService"
    assert info["entry_service"] == "lmm-api"
    assert {s["name"] for s in info["services"]} == SERVICES
    api = next(s for s in info["services"] if s["name"] == "lmm-api")
    assert {d["service"] for d in api["dependencies"]} == {"lmm-vision", "lmm-llm"}
    assert info["labels"]["project"] == "bento-lmm"
    assert f"{info['name']}:{info['version']}" == tag


def test_models_are_pinned_to_concrete_store_versions(built, bentoml_home):
    _, _, info = built
    tags = {m["tag"] for s in info["services"] for m in s["models"]}
    assert {t.split(":")[0] for t in tags} == MODELS
    # `lmm-shapes-llava:latest` in the config became the version in the store.
    assert tags <= store_models(bentoml_home)
    assert not any(t.endswith(":latest") for t in tags)
    by_service = {
        s["name"]: {m["tag"].split(":")[0] for m in s["models"]} for s in info["services"]
    }
    assert by_service["lmm-llm"] == {"lmm-shapes-llava"}


def test_config_is_baked_in_and_the_image_is_declared(built):
    _, path, info = built
    test_config = yaml.safe_load((ROOT / "configs/test.yaml").read_text())
    assert info["args"] == test_config
    assert info["spec"] == 2
    image = info["image"]
    assert image["base_image"] == "localhost/bento-lmm-base:bookworm"
    assert image["python_version"] == "3.11"
    requirements = (path / "env/python/requirements.txt").read_text().splitlines()
    assert "--find-links /wheels" in requirements  # where scripts/image.sh mounts the CPU torch
    pins = {
        line
        for line in (ROOT / "requirements/base.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert pins <= set(requirements)
    assert "FROM localhost/bento-lmm-base:bookworm" in (path / "env/docker/Dockerfile").read_text()


def test_sources_included_and_weights_and_tests_left_out(built):
    _, path, _ = built
    src = path / "src"
    for rel in (
        "service.py",
        "lmm/config.py",
        "runners/llm.py",
        "runners/vision.py",
        "runners/engines/transformers_engine.py",
        "configs/default.yaml",
        "lmm/postprocess.py",
        "runners/engines/vllm_engine.py",
    ):
        assert (src / rel).is_file(), rel
    files = [p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()]
    assert not [
        f
        for f in files
        if f.startswith(("tests/", "models/", ".venv/"))
        or "__pycache__" in f
        or f.endswith((".safetensors", ".pyc"))
    ]
    assert (path / "README.md").read_text() == (ROOT / "README.md").read_text()


def copy_project(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git",
        ".venv",
        "__pycache__",
        "weights",
        "tests",
        "*.pyc",
        ".bentoml-home",
        "build",
        "rendered",
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def test_code_change_gives_a_new_version_with_the_new_code(built, bentoml_home, tmp_path):
    tag, path, _ = built
    project = copy_project(tmp_path / "project")
    marker = "# code change for test_bento_build\n"
    with (project / "lmm/postprocess.py").open("a") as f:
        f.write(marker)
    started = time.monotonic()
    new_tag, new_path = build(bentoml_home, project)
    print(f"second bentoml build: {time.monotonic() - started:.1f}s -> {new_tag}")
    assert new_tag != tag and new_tag.split(":")[0] == tag.split(":")[0]
    assert (new_path / "src/lmm/postprocess.py").read_text().endswith(marker)
    assert not (path / "src/lmm/postprocess.py").read_text().endswith(marker)  # old one intact
    listed = subprocess.run(
        [BENTOML, "list", "-o", "json"],
        env=build_env(bentoml_home),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert tag in listed and new_tag in listed


def test_gpu_bento_builds_here_with_vllm_and_its_config(bentoml_home, tmp_path):
    """The README's GPU build: `bentoml build -f bentofile.gpu.yaml --arg-file configs/gpu.yaml`.
    Building needs no GPU, but the config's model must be in the store: the shapes LLaVA stands
    in under the name `import-hf llava-hf/llava-1.5-7b-hf` gives the real one (the build only
    pins the tag; the weights are not read)."""
    from models.shapes import LLAVA_DIR

    home = tmp_path / "home"
    shutil.copytree(bentoml_home / "models", home / "models", symlinks=True)
    gpu = yaml.safe_load((ROOT / "configs/gpu.yaml").read_text())
    env = {**os.environ, "BENTOML_HOME": str(home)}
    subprocess.run(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from models.store import save_to_store; "
         "save_to_store(sys.argv[1], Path(sys.argv[2]), labels={'source': 'stand-in'})",
         gpu["llm_model"].split(":")[0], str(LLAVA_DIR)],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )
    tag, path = build(home, ROOT, config="configs/gpu.yaml", bentofile="bentofile.gpu.yaml")
    info = yaml.safe_load((path / "bento.yaml").read_text())
    assert tag.startswith("bento-lmm-gpu:") and info["args"] == gpu
    assert info["args"]["llm"]["backend"] == "vllm"
    llm = next(s for s in info["services"] if s["name"] == "lmm-llm")
    assert llm["config"]["resources"]["gpu"] == 2
    assert {m["tag"].split(":")[0] for m in llm["models"]} == {"llava-hf-llava-1.5-7b-hf"}
    requirements = (path / "env/python/requirements.txt").read_text().splitlines()
    assert "vllm==0.33.0" in requirements and "torch==2.14.0" in requirements
    assert "torch==2.13.0" not in requirements and "--find-links /wheels" not in requirements
    assert not any(line.startswith("-r") for line in requirements)  # self-contained
    assert (path / "src/runners/engines/vllm_engine.py").is_file()
