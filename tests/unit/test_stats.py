"""Runner statistics over every worker process (lmm.stats): samples that separate processes
write into one Prometheus multiprocess folder, as BentoML's workers do, add up exactly."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmm import stats

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# A runner worker: makes the runners' metrics, observes what it is told, then exits or waits.
WORKER = """
import json, sys
from lmm import stats
job = json.loads(sys.argv[1])
vision = stats.vision_batch_size(8)
llm = stats.llm_batch_size(4)
running = stats.llm_running()
for api, size in job["vision"]:
    vision.labels(api=api).observe(size)
for size in job["llm"]:
    llm.observe(size)
running.inc(job["running"])
print("observed", flush=True)
if job["stay"]:
    sys.stdin.readline()
"""


def start_worker(folder: Path, job: dict) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(job)], cwd=ROOT, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert proc.stdout.readline().strip() == "observed"
    return proc


def test_two_workers_add_up_and_a_dead_one_is_not_running(tmp_path):
    gone = start_worker(tmp_path, {"vision": [["encode", 1], ["encode", 3], ["embed_texts", 8]],
                                   "llm": [1, 2, 2], "running": 5, "stay": False})
    assert gone.wait(30) == 0  # exited without marking itself dead: its gauge file stays
    live = start_worker(tmp_path, {"vision": [["encode", 3], ["embed_images", 2]],
                                   "llm": [4, 2], "running": 2, "stay": True})
    try:
        assert len(list(tmp_path.glob("*.db"))) >= 4  # histograms and gauges of both processes
        vision = stats.runner_stats(stats.VISION, str(tmp_path))
        llm = stats.runner_stats(stats.LLM, str(tmp_path))
    finally:
        live.communicate("\n", timeout=30)
    assert vision.model_dump() == {
        "service": "lmm-vision",
        "batches": 5,
        "max_batch_size_seen": 8,
        "batch_size_histogram": {1: 1, 2: 1, 3: 2, 8: 1},  # every API, both workers
        "running": 0,
    }
    assert llm.model_dump() == {
        "service": "lmm-llm",
        "batches": 5,  # the exited worker's batches did run
        "max_batch_size_seen": 4,
        "batch_size_histogram": {1: 1, 2: 3, 4: 1},
        "running": 2,  # only the live worker's sequences
    }


def test_an_empty_folder_reads_as_nothing_run(tmp_path):
    assert stats.runner_stats(stats.LLM, str(tmp_path)).model_dump() == {
        "service": "lmm-llm", "batches": 0, "max_batch_size_seen": 0,
        "batch_size_histogram": {}, "running": 0,
    }


def test_one_process_without_a_folder_reads_its_registry(monkeypatch):
    from prometheus_client import CollectorRegistry

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    registry = CollectorRegistry()
    hist = stats.vision_batch_size(4, registry=registry)
    for size in (1, 4, 4):
        hist.labels(api="encode").observe(size)
    got = stats.runner_stats(stats.VISION, registry=registry)
    assert (got.batches, got.max_batch_size_seen, got.batch_size_histogram) == (3, 4, {1: 1, 4: 2})


class StreamingEngine:
    """The Engine surface LLM.generate uses: two outputs per sequence, or a refusal."""

    def generate(self, request_id, prompt_token_ids, features, params):
        async def outputs():
            from lmm.protocol import EngineOutput

            if not prompt_token_ids:
                raise ValueError("empty prompt")
            yield EngineOutput(token_ids=[5])
            yield EngineOutput(token_ids=[6], finish_reason="length")

        return outputs()


def test_the_llm_runner_counts_its_open_streams(monkeypatch):
    """lmm_llm_running goes up while a stream is open and back down when it ends, is closed
    early or is refused."""
    import numpy as np

    from lmm.errors import BadRequest
    from lmm.protocol import SamplingParams
    from runners.llm import LLM

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    runner = LLM.inner.__new__(LLM.inner)
    runner.engine = StreamingEngine()
    none = np.zeros((0, 0, 0), dtype=np.float32)

    def running() -> int:
        return stats.runner_stats(stats.LLM).running

    async def scenario() -> None:
        before = running()
        first = runner.generate([1, 2], none, SamplingParams(max_tokens=2))
        await anext(first)
        second = runner.generate([1, 2], none, SamplingParams(max_tokens=2))
        await anext(second)
        assert running() == before + 2
        await first.aclose()  # the caller went away
        assert running() == before + 1
        assert len([line async for line in second]) == 1  # ran to its end
        assert running() == before
        with pytest.raises(BadRequest):
            await anext(runner.generate([], none, SamplingParams(max_tokens=2)))
        assert running() == before

    asyncio.run(scenario())
