"""/runner_stats counts the batches of every runner worker: two workers per runner, load spread
over both, and the totals equal what each worker process wrote to BentoML's metrics folder."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import httpx
import pytest

from lmm import stats
from tests.conftest import serve

pytestmark = pytest.mark.integration

WORKERS = 2
REQUESTS_PER_BURST = 12
SPREAD_WITHIN_S = 120
# Longer than the 5 s for which the API's runner clients (httpx) and the runners (uvicorn) keep an
# idle connection: the next burst opens new connections, which either worker may accept.
KEEP_ALIVE_S = 6


@pytest.fixture(scope="module")
def two_workers(bentoml_home, tmp_path_factory):
    logs = tmp_path_factory.mktemp("runner-stats")
    server = serve(bentoml_home, logs, extra=[
        "--arg", f"vision.workers={WORKERS}", "--arg", f"llm.workers={WORKERS}",
    ])
    try:
        server.wait_ready(300)
        # serve() gives each server a BENTOML_HOME of its own, holding its metrics folder
        server.metrics_dir = logs / f"home-{server.port}" / "prometheus_multiproc_dir"
        yield server
    finally:
        server.stop()


def png() -> bytes:
    from models.shapes.data import make_samples

    buffer = io.BytesIO()
    make_samples(1, seed=21)[0].image.save(buffer, format="PNG")
    return buffer.getvalue()


async def burst(url: str, image: bytes, n: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=300) as client:
        async def one() -> dict:
            r = await client.post(url + "/generate", data={"prompt": "What shape is this?",
                                                           "max_tokens": "8"},
                                  files=[("images", ("i.png", image, "image/png"))])
            assert r.status_code == 200, r.text
            return r.json()
        return await asyncio.gather(*[one() for _ in range(n)])


def per_process(folder: Path, service: str) -> dict[int, dict[int, int]]:
    """pid -> that process's own batch-size histogram, read from its file alone."""
    out = {}
    for path in folder.glob("histogram_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        one = Path(str(folder) + f"-pid{pid}")
        one.mkdir(exist_ok=True)
        (one / path.name).write_bytes(path.read_bytes())
        histogram = stats.runner_stats(service, str(one)).batch_size_histogram
        if histogram:
            out[pid] = histogram
    return out


def summed_sizes(got: dict) -> dict[int, int]:
    """A /runner_stats histogram with its JSON keys back to ints."""
    return {int(k): v for k, v in got["batch_size_histogram"].items()}


def test_stats_count_every_batch_of_every_worker(two_workers):
    url, image = two_workers.url, png()
    replies: list[dict] = []
    # Until both workers of each runner have run batches. /readyz answers once one worker of each
    # runner does, and the kernel gives a new connection to whichever worker accepts it first, so
    # the second worker may get nothing from the first bursts: it may still be loading its model,
    # and later bursts reuse the connections the first one opened unless they have expired.
    deadline = time.monotonic() + SPREAD_WITHIN_S
    while True:
        replies += asyncio.run(burst(url, image, REQUESTS_PER_BURST))
        workers = {s: per_process(two_workers.metrics_dir, s) for s in (stats.VISION, stats.LLM)}
        if all(len(w) == WORKERS for w in workers.values()) or time.monotonic() > deadline:
            break
        time.sleep(KEEP_ALIVE_S)
    print({s: {pid: sum(h.values()) for pid, h in w.items()} for s, w in workers.items()})
    assert {s: len(w) for s, w in workers.items()} == {stats.VISION: WORKERS, stats.LLM: WORKERS}

    body = httpx.post(url + "/runner_stats", json={}, timeout=30).json()
    for key, service in (("vision", stats.VISION), ("llm", stats.LLM)):
        got = body[key]
        summed: dict[int, int] = {}
        for histogram in workers[service].values():
            for size, count in histogram.items():
                summed[size] = summed.get(size, 0) + count
        # one call, answered by one worker, counts the batches of both
        assert summed_sizes(got) == summed, key
        assert got["batches"] == sum(summed.values())
        assert got["max_batch_size_seen"] == max(summed)
    # every image was encoded exactly once, in some batch of some vision worker
    images = sum(size * count for size, count in summed_sizes(body["vision"]).items())
    assert images == len(replies)
    # every generated token came from one sequence in one decode step of some LLM worker
    steps = sum(size * count for size, count in summed_sizes(body["llm"]).items())
    assert steps == sum(r["usage"]["completion_tokens"] for r in replies)
    assert body["llm"]["running"] == 0  # nothing in flight now


def test_sequential_requests_are_one_batch_each(two_workers):
    """Sent one at a time, each request is one vision batch of one image."""
    url, image = two_workers.url, png()
    before = httpx.post(url + "/runner_stats", json={}, timeout=30).json()["vision"]
    for _ in range(4):
        asyncio.run(burst(url, image, 1))
    after = httpx.post(url + "/runner_stats", json={}, timeout=30).json()["vision"]
    assert after["batches"] - before["batches"] == 4
    assert summed_sizes(after).get(1, 0) - summed_sizes(before).get(1, 0) == 4
