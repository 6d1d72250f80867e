"""Every model family served for real: its tiny offline checkpoint imported into the test store
with ``python -m models import-hf DIR``, ``bentoml serve --arg llm_model=...`` on each LLM
backend, and a chat completion with two images of different sizes (text only for the text
family) answering with the greedy text HF ``generate()`` of the whole model gives for the same
prompt. One server per (family, backend), module-scoped one after another."""

from __future__ import annotations

import base64
import importlib
import io
import os
import subprocess

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import BACKENDS, PY, ROOT, WEIGHTS, serve

pytestmark = pytest.mark.integration
MAX_TOKENS = 8
SIZES = [(64, 64), (96, 48)]  # (width, height): two images of different sizes
QUESTION = "Which of the two images shows a circle on the left?"
TEXT_QUESTION = "what shape is on the left"


def _llava(out_dir, seed):
    return WEIGHTS / "llava"  # the shapes model as it is


def _builder(name):
    def build(out_dir, seed):
        return importlib.import_module(f"models.families.{name}").build(out_dir, seed=seed)
    return build


# family -> checkpoint builder; (family, backend) pairs served: transformers for every family,
# vLLM for those whose vLLM path takes image embeddings (and the text family). Gemma 3 is not
# served with images on vLLM: vLLM 0.32 takes no image embeddings for it (lmm/families/gemma3.py).
FAMILIES = {"llava": _llava, "text": _builder("text"), "qwen2_5_vl": _builder("qwen2_5_vl"),
            "llava_next": _builder("llava_next"), "gemma3": _builder("gemma3")}
CASES = [(family, "transformers") for family in FAMILIES] + [
    (family, "vllm") for family in ("llava", "qwen2_5_vl", "llava_next", "text")
    if family in FAMILIES]


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_image(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def chat_messages(n_images: int, text: str) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def hf_answer(path, images: list[Image.Image], text: str) -> str:
    """Greedy text of the whole model's generate() on the prompt the API service builds."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
    from transformers import AutoTokenizer

    if images:
        processor = AutoProcessor.from_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        chat = processor.apply_chat_template(chat_messages(len(images), text), tokenize=False,
                                             add_generation_prompt=True)
        inputs = processor(text=chat, images=images, return_tensors="pt",
                           add_special_tokens=False)
        tokenizer = processor.tokenizer
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(chat, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i, token in enumerate(new):
        if token in eos:
            new = new[:i]
            break
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{b}" for f, b in CASES])
def served(request, bentoml_home, tmp_path_factory):
    family, backend = request.param
    path = FAMILIES[family](tmp_path_factory.mktemp(f"ckpt-{family}"), 0)
    name = f"family-{family.replace('_', '-')}"
    done = subprocess.run([PY, "-m", "models", "import-hf", str(path), "--name", name],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "BENTOML_HOME": str(bentoml_home)})
    assert done.returncode == 0, done.stdout + done.stderr
    srv = serve(bentoml_home, tmp_path_factory.mktemp(f"logs-{family}-{backend}"),
                extra=[*BACKENDS[backend], "--arg", f"llm_model={name}:latest",
                       "--arg", f"served_model_name={name}"])
    try:
        srv.wait_ready(300)
        srv.family, srv.backend, srv.path, srv.name = family, backend, path, name
        yield srv
    finally:
        srv.stop()


def chat(srv, content) -> httpx.Response:
    return httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={
        "model": srv.name, "max_tokens": MAX_TOKENS, "temperature": 0,
        "messages": [{"role": "user", "content": content}]})


def test_the_answer_equals_the_whole_models_generate(served):
    if served.family == "text":
        r = chat(served, TEXT_QUESTION)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == hf_answer(
            served.path, [], TEXT_QUESTION)
        return
    images = [make_image(size, seed) for seed, size in enumerate(SIZES)]
    content = [{"type": "image_url", "image_url": {"url": png_data_url(im)}} for im in images]
    r = chat(served, content + [{"type": "text", "text": QUESTION}])
    assert r.status_code == 200, r.text
    body = r.json()
    expected = hf_answer(served.path, images, QUESTION)
    assert body["choices"][0]["message"]["content"] == expected
    assert body["usage"]["completion_tokens"] >= 1


def test_model_info_and_models_name_the_architecture_and_family(served):
    info = httpx.post(served.url + "/model_info", timeout=30).json()
    assert info["llm"]["family"] == served.family
    assert info["llm"]["architecture"]
    models = httpx.get(served.url + "/v1/models", timeout=30).json()["data"]
    chat_model = next(m for m in models if m["id"] == served.name)
    assert chat_model["family"] == served.family
    assert chat_model["architecture"] == info["llm"]["architecture"]


def test_one_image_is_taken_or_refused_with_the_reason(served):
    """An image family answers one image too; the text family refuses it with a 400."""
    content = [{"type": "image_url", "image_url": {"url": png_data_url(make_image((32, 32), 1))}},
               {"type": "text", "text": TEXT_QUESTION}]
    r = chat(served, content)
    if served.family == "text":
        assert r.status_code == 400, r.text
        assert "takes no images" in r.json()["error"]["message"]
    else:
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == hf_answer(
            served.path, [make_image((32, 32), 1)], TEXT_QUESTION)
