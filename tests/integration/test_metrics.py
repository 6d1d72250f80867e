"""/metrics of a real server, on both LLM engines: after a known set of requests through every
route (native and /v1, streamed or not, embeddings, one refused), each request histogram's
count grew by exactly the requests sent, the token counters by the usage the answers reported,
the engine's queue time by the sequences run, and its gauges are back to idle."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.shapes.data import make_samples

pytestmark = pytest.mark.integration
N = 2  # requests per route and mode
MAX_TOKENS = 6


def scrape(url: str) -> dict[tuple, float]:
    """(sample name, sorted labels) -> value."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def delta(before: dict, after: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(image) -> str:
    return "data:image/png;base64," + base64.b64encode(png(image)).decode()


def sse(response: httpx.Response) -> list:
    assert response.status_code == 200, response.text
    events = [line[len("data: "):] for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def send_every_route(url: str, images) -> dict[str, list[dict]]:
    """route label -> the usage of each request sent to it (None: the route reports none)."""
    used: dict[str, list] = {r: [] for r in ("generate", "generate_stream", "chat",
                                             "completions", "embed")}
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(N):
            image = png(images[i])
            form = {"prompt": "Describe the image.", "max_tokens": str(MAX_TOKENS)}
            upload = [("images", ("i.png", image, "image/png"))]
            r = client.post("/generate", data=form, files=upload)
            assert r.status_code == 200, r.text
            used["generate"].append(r.json()["usage"])
            events = sse(client.post("/generate_stream", data=form, files=upload))
            used["generate_stream"].append(events[-1]["usage"])
            chat = {"model": "shapes-llava", "max_tokens": MAX_TOKENS, "ignore_eos": True,
                    "temperature": 0, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": data_url(images[i])}},
                        {"type": "text", "text": "What shape is this?"}]}]}
            r = client.post("/v1/chat/completions", json=chat)
            assert r.status_code == 200, r.text
            used["chat"].append(r.json()["usage"])
            events = sse(client.post("/v1/chat/completions", json={
                **chat, "stream": True, "stream_options": {"include_usage": True}}))
            used["chat"].append(events[-1]["usage"])
            r = client.post("/v1/completions", json={
                "model": "shapes-llava", "prompt": "hi", "max_tokens": MAX_TOKENS,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            used["completions"].append(r.json()["usage"])
            r = client.post("/embed", data={"texts": json.dumps(["a red circle"])},
                            files=upload)
            assert r.status_code == 200, r.text
            used["embed"].append(None)
        # one refused request: counted with its outcome
        r = client.post("/generate", data={"prompt": "x"},
                        files=[("images", ("i.png", b"not an image", "image/png"))])
        assert r.status_code == 400, r.text
    return used


def idle(url: str) -> dict:
    """/metrics once the LLM engine's gauges say no sequence runs or waits (the engine writes
    them after its step; the answer may arrive first)."""
    deadline = time.monotonic() + 30
    while True:
        now = scrape(url)
        if (now.get(("lmm_num_requests_running", ()), 0) == 0
                and now.get(("lmm_num_requests_waiting", ()), 0) == 0) \
                or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_every_route_is_counted_exactly(server):
    url = server.url
    images = [s.image for s in make_samples(N, seed=4242)]
    before = scrape(url)
    used = send_every_route(url, images)
    after = idle(url)

    generation = ("generate", "generate_stream", "chat", "completions")
    with_images = ("generate", "generate_stream", "chat", "embed")
    for route, usages in used.items():
        sent = len(usages)
        d = lambda name, **labels: delta(before, after, name, route=route, **labels)  # noqa: E731
        assert d("lmm_e2e_request_latency_seconds_count", outcome="ok") == sent, route
        assert d("lmm_request_preprocess_seconds_count") == sent + (route == "generate"), route
        assert d("lmm_request_images_count") == sent, route
        assert d("lmm_request_images_sum") == (sent if route in with_images else 0), route
        assert d("lmm_request_encode_seconds_count") == (
            sent if route in with_images else 0), route
        per_sequence = sent if route in generation else 0
        assert d("lmm_time_to_first_token_seconds_count") == per_sequence, route
        assert d("lmm_time_per_output_token_seconds_count") == per_sequence, route
        if route in generation:
            prompt = sum(u["prompt_tokens"] for u in usages)
            completion = sum(u["completion_tokens"] for u in usages)
            assert d("lmm_request_prompt_tokens_count") == sent, route
            assert d("lmm_request_prompt_tokens_sum") == prompt, route
            assert d("lmm_request_completion_tokens_sum") == completion, route
            assert d("lmm_prompt_tokens_total") == prompt, route
            assert d("lmm_generation_tokens_total") == completion, route
        else:
            assert d("lmm_prompt_tokens_total") == 0 and d("lmm_generation_tokens_total") == 0
    assert delta(before, after, "lmm_e2e_request_latency_seconds_count", route="generate",
                 outcome="client_error") == 1
    for route in ("chat", "completions"):
        assert all(u["completion_tokens"] == MAX_TOKENS for u in used[route])

    # the LLM engine: one queue time per sequence it ran; idle again
    sequences = sum(len(used[r]) for r in generation)
    assert delta(before, after, "lmm_request_queue_time_seconds_count") == sequences
    assert after[("lmm_num_requests_running", ())] == 0
    assert after[("lmm_num_requests_waiting", ())] == 0
    assert 0 <= after[("lmm_kv_cache_usage_perc", ())] <= 1
    # configs/test.yaml has the feature cache off: no lookups
    assert delta(before, after, "lmm_image_cache_hits_total") == 0
    assert delta(before, after, "lmm_image_cache_misses_total") == 0
    if server.backend == "vllm":  # vLLM's own metrics, from the runner's engine, beside ours
        names = {name for name, _ in after}
        assert {"vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                "vllm:time_to_first_token_seconds_count"} <= names, sorted(
            n for n in names if n.startswith("vllm"))
