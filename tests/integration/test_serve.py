"""The three services under a real `bentoml serve` on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import re
import time

import httpx
import psutil
import pytest
from PIL import Image

from models.shapes.data import make_samples, normalize_answer
from tests.helpers import assert_error

pytestmark = pytest.mark.integration


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def ask(url: str, image: bytes, prompt: str, **fields) -> httpx.Response:
    data = {"prompt": prompt, **{k: str(v) for k, v in fields.items()}}
    return httpx.post(url + "/generate", files=[("images", ("i.png", image, "image/png"))],
                      data=data, timeout=120)


def test_three_worker_processes_with_distinct_service_names(server):
    names = []
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        cmd = child.cmdline()
        if "--service-name" in cmd:
            names.append(cmd[cmd.index("--service-name") + 1])
    assert sorted(names) == ["lmm-api", "lmm-llm", "lmm-vision"]


def test_image_and_prompt_give_the_right_answer(url):
    sample = next(s for s in make_samples(8, seed=4242) if s.qtype == "describe")
    r = ask(url, png(sample.image), sample.question, max_tokens=16)
    assert r.status_code == 200, r.text
    body = r.json()
    assert normalize_answer(body["text"]) == normalize_answer(sample.answer)
    assert body["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] > 64  # the image tokens are in the prompt
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


def test_stream_delivers_the_answer_then_usage_and_done(url):
    sample = next(s for s in make_samples(8, seed=7) if s.qtype == "describe")
    events = []
    with httpx.stream("POST", url + "/generate_stream", data={"prompt": sample.question},
                      files=[("images", ("i.png", png(sample.image), "image/png"))],
                      timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    import json

    parsed = [json.loads(e) for e in events[:-1]]
    texts = [p["text"] for p in parsed if "text" in p]
    assert normalize_answer("".join(texts)) == normalize_answer(sample.answer)
    assert parsed[-1]["usage"]["completion_tokens"] >= 3


def test_a_long_stream_arrives_in_several_chunks_over_time(url):
    """200 tokens take 200 engine steps, and the client sees them as they come: in several
    chunks, fewer than 200 when lines that queued up while the API was busy go out together."""
    body = {"model": "shapes-llava", "max_tokens": 200, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "Describe the image."}]}
    import json

    contents, arrivals, usage = [], [], None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                if choice["delta"].get("content"):
                    contents.append(choice["delta"]["content"])
                    arrivals.append(time.monotonic())
    assert usage["completion_tokens"] == 200
    assert 3 <= len(contents) <= 200
    assert arrivals[-1] > arrivals[0]
    plain = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=120)
    assert "".join(contents) == plain.json()["choices"][0]["message"]["content"]


def test_openapi_lists_every_endpoint_and_swagger_ui_is_served(url):
    spec = httpx.get(url + "/docs.json").json()
    assert {"/generate", "/generate_stream", "/embed", "/model_info"} <= set(spec["paths"])
    ui = httpx.get(url + "/")
    assert ui.status_code == 200 and "swagger" in ui.text.lower()


def test_model_info_names_the_store_versions(server, url, bentoml_home):
    import os
    import subprocess
    import sys

    info = httpx.post(url + "/model_info").json()
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "models", "list", "-o", "json"],
        env={**os.environ, "BENTOML_HOME": str(bentoml_home)}, capture_output=True, text=True,
        check=True,
    ).stdout
    assert info["llm"]["tag"] in out and info["embedding"]["tag"] in out
    assert info["image_tokens"] == 64
    assert info["llm"]["architecture"] == "LlavaForConditionalGeneration"
    assert info["llm"]["backend"] == server.backend


def _hist(metrics: str, name: str, selector: str = "") -> tuple[float, float]:
    """(observations in the le=1 bucket, all observations) of a Prometheus histogram."""
    ones = total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name) or selector not in line:
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "_bucket") and 'le="1.0"' in line:
            ones += value
        elif line.startswith(name + "_count"):
            total += value
    return ones, total


async def _burst(url: str, n: int, concurrency: int, image: bytes) -> list[int]:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        async def one(i: int) -> int:
            async with sem:
                r = await client.post(
                    url + "/generate", data={"prompt": "What shape is this?", "max_tokens": "8"},
                    files=[("images", ("i.png", image, "image/png"))],
                )
                return r.status_code
        return await asyncio.gather(*[one(i) for i in range(n)])


def test_adaptive_batching_seen_from_the_outside(url):
    image = png(make_samples(1, seed=11)[0].image)
    assert asyncio.run(_burst(url, 48, 48, image)) == [200] * 48
    metrics = httpx.get(url + "/metrics").text
    ones, total = _hist(metrics, "bentoml_service_adaptive_batch_size", 'method_name="encode"')
    assert total > ones, "vision runner never ran a batch larger than 1"
    ones, total = _hist(metrics, "lmm_llm_batch_size")
    assert total > ones, "LLM engine never decoded more than one sequence at a time"
    stats = httpx.post(url + "/runner_stats").json()
    assert stats["vision"]["max_batch_size_seen"] > 1 and stats["llm"]["max_batch_size_seen"] > 1


def test_load_512_requests_at_concurrency_64_all_succeed(url):
    image = png(make_samples(1, seed=12)[0].image)
    codes = asyncio.run(_burst(url, 512, 64, image))
    assert codes.count(200) == 512, {c: codes.count(c) for c in set(codes)}


@pytest.mark.parametrize(
    "case",
    ["not-an-image", "truncated-png", "max-tokens-too-big", "max-tokens-zero", "bad-base64",
     "too-many-images", "too-many-pixels"],
)
def test_bad_input_gets_a_clear_4xx(url, case):
    good = png(make_samples(1, seed=3)[0].image)
    files = [("images", ("i.png", good, "image/png"))]
    data = {"prompt": "What shape is this?"}
    expect, message = 400, ""
    if case == "not-an-image":
        files, message = [("images", ("x.txt", b"hello, world", "text/plain"))], "not a readable image"
    elif case == "truncated-png":
        files, message = [("images", ("t.png", good[: len(good) // 2], "image/png"))], "truncated"
    elif case == "max-tokens-too-big":
        data["max_tokens"], message = "100000", "less than or equal to 256"
    elif case == "max-tokens-zero":
        data["max_tokens"], message = "0", "greater than or equal to 1"
    elif case == "bad-base64":
        files, data["images_b64"], message = [], ["not base64!"], "not valid base64"
    elif case == "too-many-images":
        files, message = files * 5, "at most 4"
    elif case == "too-many-pixels":
        big = io.BytesIO()
        Image.new("RGB", (2100, 2100)).save(big, format="PNG")
        files, expect, message = [("images", ("b.png", big.getvalue(), "image/png"))], 413, "pixel"
    if files:
        r = httpx.post(url + "/generate", files=files, data=data, timeout=60)
    else:
        r = httpx.post(url + "/generate", json=data, timeout=60)
    assert_error(r, expect, text=message)


def test_readme_first_example_answers_as_documented(url):
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"curl -s -F images=@(\S+) -F prompt=\"([^\"]+)\"", readme)
    shown = re.search(r'"text": "([^"]+)"', readme)
    image, prompt = command.groups()
    r = ask(url, (ROOT / image).read_bytes(), prompt)
    assert r.status_code == 200 and r.json()["text"] == shown.group(1)


def test_a_url_in_the_upload_field_is_refused_not_fetched(url):
    r = httpx.post(url + "/generate", files=[("x", ("x", b"", "text/plain"))],
                   data={"prompt": "hi", "images": "http://example.com/cat.png"})
    assert_error(r, 400, "images", "images_b64")


# Every error path of both APIs, one body shape: (method, path, keyword arguments, status, param).
ERROR_PATHS = [
    ("POST", "/generate", {"json": {}}, 400, "prompt"),
    ("POST", "/generate", {"content": b"{bad", "headers": {"content-type": "application/json"}},
     400, "body"),
    ("POST", "/generate_stream", {"json": {"prompt": "x", "images_b64": ["!"]}}, 400,
     "images_b64"),
    ("POST", "/generate_stream", {"json": {"prompt": "x", "max_tokens": 0}}, 400, "max_tokens"),
    ("POST", "/embed", {"json": {}}, 400, "texts"),
    ("POST", "/embed", {"json": {"images_b64": ["data:text/plain;base64,aGk="]}}, 400,
     "images_b64"),
    ("POST", "/rank", {"json": {"candidates": ["a"]}}, 400, "query"),
    ("POST", "/rank", {"json": {"query": "a"}}, 400, "candidates"),
    ("POST", "/rank", {"files": [("query_image", ("q", b"", "text/plain"))],
                       "data": {"candidate_images": "http://example.com/x.png"}}, 400,
     "candidate_images"),
    ("GET", "/generate", {}, 405, None),
    ("GET", "/no-such-route", {}, 404, None),
    ("POST", "/v1/chat/completions", {"json": {"model": "shapes-llava"}}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"json": {"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]}}, 404, "model"),
    ("POST", "/v1/completions", {"json": {"model": "shapes-llava", "prompt": "hi",
                                          "echo": True}}, 400, "echo"),
    ("POST", "/v1/embeddings", {"json": {"model": "shapes-llava", "input": []}}, 400, "input"),
    ("GET", "/v1/models/nope", {}, 404, "model"),
    ("GET", "/v1/no-such-route", {}, 404, None),
]


@pytest.mark.parametrize("method, path, kwargs, status, param", ERROR_PATHS,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in ERROR_PATHS])
def test_every_error_has_the_one_shape(url, method, path, kwargs, status, param):
    assert_error(httpx.request(method, url + path, timeout=60, **kwargs), status, param)
