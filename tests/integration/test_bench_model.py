"""`python -m models build-bench` puts a (reduced) bench LLaVA and CLIP into a fresh store, and
a real `bentoml serve` of them, with the configs README.md shows for each engine, answers a chat
request with one image with exactly the requested number of tokens (``ignore_eos``) and embeds
an image with the bench CLIP."""

from __future__ import annotations

import base64
import os
import subprocess

import httpx
import pytest

from tests.conftest import PY, ROOT, serve

pytestmark = pytest.mark.integration

# Same code path as the bench model, at a size that serves in seconds (heads of 64 throughout).
REDUCED = ["--hidden", "128", "--layers", "2", "--intermediate", "256", "--vision-hidden", "128",
           "--vision-layers", "2", "--vision-intermediate", "256"]
CONFIGS = {"transformers": "configs/default.yaml", "vllm": "configs/vllm.yaml"}


@pytest.fixture(scope="module")
def bench_home(tmp_path_factory):
    """A store with the default models (the CLIP model is served beside) and the bench model."""
    home = tmp_path_factory.mktemp("bench-home")
    env = {**os.environ, "BENTOML_HOME": str(home)}
    subprocess.run([PY, "-m", "models", "build"], cwd=ROOT, env=env, check=True)
    done = subprocess.run([PY, "-m", "models", "build-bench", *REDUCED], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True)
    print(done.stdout)
    assert "parameters: language model" in done.stdout and "saved (" in done.stdout
    version = (home / "models" / "lmm-bench-llava" / "latest").read_text().strip()
    assert f"lmm-bench-llava:{version}" in done.stdout
    store_yaml = (home / "models" / "lmm-bench-llava" / version / "model.yaml").read_text()
    assert "role: llava" in store_yaml and "source: bento-lmm/models/bench" in store_yaml
    clip = (home / "models" / "lmm-bench-clip" / "latest").read_text().strip()
    assert f"lmm-bench-clip:{clip}" in done.stdout
    assert "role: clip" in (home / "models" / "lmm-bench-clip" / clip / "model.yaml").read_text()
    return home


@pytest.mark.parametrize("backend", list(CONFIGS))
def test_serves_the_reduced_bench_model(backend, bench_home, tmp_path):
    server = serve(bench_home, tmp_path, config=CONFIGS[backend],
                   extra=["--arg", "llm_model=lmm-bench-llava:latest",
                          "--arg", "clip_model=lmm-bench-clip:latest"])
    try:
        server.wait_ready(timeout=240)
        info = httpx.post(server.url + "/model_info", json={}, timeout=30).json()
        assert info["llm"]["backend"] == backend, info
        png = base64.b64encode((ROOT / "examples" / "red-circle-left.png").read_bytes()).decode()
        body = {
            "model": "shapes-llava",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "text", "text": "What shape is this?"},
            ]}],
            "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        }
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["usage"]["completion_tokens"] == 8, answer
        assert answer["choices"][0]["finish_reason"] == "length", answer
        # One 224-px image is 196 prompt tokens, plus the question and the template's words.
        assert answer["usage"]["prompt_tokens"] > 196, answer
        assert answer["system_fingerprint"].startswith("lmm-bench-llava:"), answer
        # /embed runs the bench CLIP: its projection, not the shapes CLIP's 64
        r = httpx.post(server.url + "/embed", json={"images_b64": [png]}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["dim"] == 512 and len(r.json()["image_embeddings"][0]) == 512
    finally:
        server.stop()
