"""The shipped LoRA adapter (models/shapes/weights/lora-terse) served beside its base model
under a real `bentoml serve`, on both LLM backends: it is a model of /v1/models and /model_info,
OpenAI chat and the native /generate choose it with `model`, each model answering held-out
images in its own form (base: "a red circle on the left", adapter: "circle red left"); an
unknown model is a 404 that names the served ones."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
import yaml

from models.shapes.data import HELD_OUT_SEED, make_samples, normalize_answer
from tests.conftest import BACKENDS, ROOT, TERSE, TERSE_STORE_TAG, serve
from tests.helpers import assert_error

pytestmark = pytest.mark.integration
BASE = "shapes-llava"
N = 8  # two of each question type


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=list(BACKENDS))
def lora_url(request, bentoml_home, tmp_path_factory):
    """configs/test.yaml serving the shipped adapter (`python -m models build` stores it), on
    each backend."""
    logs = tmp_path_factory.mktemp(f"lora-{request.param}")
    config = yaml.safe_load((ROOT / "configs" / "test.yaml").read_text())
    config["adapters"] = [{"name": TERSE, "model": TERSE_STORE_TAG}]
    (logs / "lora.yaml").write_text(yaml.safe_dump(config))
    srv = serve(bentoml_home, logs, config=str(logs / "lora.yaml"), extra=BACKENDS[request.param])
    try:
        srv.wait_ready()
        yield srv.url
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def samples():
    return make_samples(N, seed=HELD_OUT_SEED + 1)


@pytest.fixture(scope="module")
def adapter_answers():
    """The adapter's form of each sample's answer (models/shapes/data.py)."""
    return [normalize_answer(s.answer)
            for s in make_samples(N, seed=HELD_OUT_SEED + 1, form="terse")]


def chat(url: str, model: str, sample, **extra) -> httpx.Response:
    data = base64.b64encode(png(sample.image)).decode()
    body = {"model": model, "max_tokens": 16, "temperature": 0, **extra, "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
            {"type": "text", "text": sample.question}]}]}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def generate(url: str, sample, route: str = "/generate", **fields) -> httpx.Response:
    data = {"prompt": sample.question, "max_tokens": "16", **fields}
    return httpx.post(url + route, data=data, timeout=120,
                      files=[("images", ("i.png", png(sample.image), "image/png"))])


def test_the_adapter_is_a_model_with_its_base_as_parent(lora_url):
    models = {m["id"]: m for m in httpx.get(lora_url + "/v1/models").json()["data"]}
    assert TERSE in models and BASE in models
    assert models[TERSE]["parent"] == BASE and models[BASE]["parent"] is None
    tag = models[TERSE]["tag"]
    assert models[TERSE]["root"] == tag and tag.startswith("lmm-shapes-llava-terse:")
    assert httpx.get(f"{lora_url}/v1/models/{TERSE}").json()["parent"] == BASE
    info = httpx.post(lora_url + "/model_info").json()
    [card] = info["adapters"]
    assert (card["served_name"], card["parent"], card["tag"]) == (TERSE, BASE, tag)
    assert card["labels"]["role"] == "lora"


def test_chat_answers_in_the_form_of_the_model_it_names(lora_url, samples, adapter_answers):
    for sample, adapted in zip(samples, adapter_answers):
        r = chat(lora_url, TERSE, sample)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == TERSE
        assert normalize_answer(r.json()["choices"][0]["message"]["content"]) == adapted
        r = chat(lora_url, BASE, sample)
        assert normalize_answer(r.json()["choices"][0]["message"]["content"]) == (
            normalize_answer(sample.answer))


def test_generate_and_its_stream_take_model(lora_url, samples, adapter_answers):
    for sample, adapted in zip(samples, adapter_answers):
        body = generate(lora_url, sample, model=TERSE).json()
        assert (body["model"], normalize_answer(body["text"])) == (TERSE, adapted)
        body = generate(lora_url, sample).json()  # no model: the base
        assert body["model"] == BASE
        assert normalize_answer(body["text"]) == normalize_answer(sample.answer)
    sample, adapted = samples[0], adapter_answers[0]
    r = generate(lora_url, sample, "/generate_stream", model=TERSE)
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert normalize_answer("".join(e.get("text", "") for e in events)) == adapted


def test_concurrent_base_and_adapter_chats_each_keep_their_form(lora_url, samples,
                                                                 adapter_answers):
    """Base and adapter requests in flight together (they share the LLM's steps)."""
    import asyncio

    async def both():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(model, sample):
                data = base64.b64encode(png(sample.image)).decode()
                r = await client.post(lora_url + "/v1/chat/completions", json={
                    "model": model, "max_tokens": 16, "temperature": 0, "messages": [
                        {"role": "user", "content": [
                            {"type": "image_url",
                             "image_url": {"url": f"data:image/png;base64,{data}"}},
                            {"type": "text", "text": sample.question}]}]})
                return r.json()["choices"][0]["message"]["content"]

            return await asyncio.gather(*[one(model, s) for s in samples
                                          for model in (BASE, TERSE)])

    texts = asyncio.run(both())
    assert [normalize_answer(t) for t in texts[1::2]] == adapter_answers
    assert [normalize_answer(t) for t in texts[0::2]] == [
        normalize_answer(s.answer) for s in samples]


def test_an_unknown_model_is_a_404_naming_the_served_ones(lora_url, samples):
    for response in (chat(lora_url, "ghost", samples[0]),
                     generate(lora_url, samples[0], model="ghost"),
                     generate(lora_url, samples[0], "/generate_stream", model="ghost")):
        error = assert_error(response, 404, "model")
        assert "'ghost'" in error["message"]
        assert repr(BASE) in error["message"] and repr(TERSE) in error["message"]


def test_bench_serve_takes_several_models_in_turn(lora_url, tmp_path):
    """bench/serve.py --model A B: the requests ask A and B in turn; a model the target does
    not list stops the run (exit 2) naming it."""
    import subprocess

    from tests.conftest import PY

    def bench(*models: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, "bench/serve.py", "--target", f"ours={lora_url}", "--model", *models,
             "--concurrency", "2", "--mode", "plain", "-n", "4", "--warmup", "0",
             "--max-tokens", "4", "--out", str(tmp_path / "b.json")],
            cwd=ROOT, capture_output=True, text=True, timeout=300)

    p = bench(BASE, TERSE)
    assert p.returncode == 0, p.stderr[-2000:]
    [level] = json.loads((tmp_path / "b.json").read_text())["results"]
    assert level["model"] == f"{BASE}+{TERSE}"
    assert (level["completed"], level["failed"], level["total_output_tokens"]) == (4, 0, 16)
    p = bench(BASE, "ghost")
    assert p.returncode == 2 and "ghost" in p.stderr and TERSE in p.stderr, p.stderr
