"""Model-store entries: versioned by content, labelled, no duplicates; hub import errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.unit


def run_models(home, *args, **env):
    return subprocess.run(
        [sys.executable, "-m", "models", *args], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "BENTOML_HOME": str(home), **env}, timeout=120,
    )


def store_listing(home) -> str:
    return subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list"], capture_output=True, text=True,
        env={**os.environ, "BENTOML_HOME": str(home)}, check=True,
    ).stdout


def test_build_is_idempotent_and_versions_follow_the_weights(tmp_path, llava_dir):
    home, weights = tmp_path / "home", tmp_path / "weights"
    shutil.copytree(llava_dir.parent, weights)
    first = run_models(home, "build", "--weights", str(weights))
    assert first.returncode == 0, first.stderr
    assert "lmm-shapes-llava:" in first.stdout and "lmm-shapes-clip:" in first.stdout
    again = run_models(home, "build", "--weights", str(weights))
    assert "already in the store" in again.stderr
    assert store_listing(home).count("lmm-shapes-llava:") == 1

    config = weights / "llava" / "generation_config.json"
    config.write_text(config.read_text().replace("}", ', "bento_lmm_test": 1}', 1))
    run_models(home, "build", "--weights", str(weights))
    assert store_listing(home).count("lmm-shapes-llava:") == 2


def test_entries_carry_labels_and_metadata(bentoml_home, llava_dir):
    import json

    from models.store import content_hash

    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "get", "lmm-shapes-llava:latest", "-o", "json"],
        capture_output=True, text=True, env={**os.environ, "BENTOML_HOME": str(bentoml_home)},
        check=True,
    ).stdout
    info = json.loads(out)
    meta, digest = info["metadata"], content_hash(llava_dir)
    assert meta["architecture"] == "LlavaForConditionalGeneration"
    assert meta["weights_sha256"] == digest
    assert info["version"] == digest[:16]
    assert info["labels"]["source"] == "bento-lmm/models/shapes"


def test_hub_import_without_a_hub_fails_clearly(tmp_path):
    out = run_models(tmp_path / "home", "import-hf", "llava-hf/llava-1.5-7b-hf",
                     HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2",
                     HF_HUB_DOWNLOAD_TIMEOUT="2")
    assert out.returncode == 2
    assert "could not download llava-hf/llava-1.5-7b-hf" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
