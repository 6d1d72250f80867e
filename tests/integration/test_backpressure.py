"""Overload is answered, not queued: with llm.max_waiting small, a burst over the LLM engine's
slots + wait queue gets 429s with Retry-After (the one error shape), while every request within
the bound completes."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import serve
from tests.helpers import assert_error

pytestmark = pytest.mark.integration
SLOTS, WAITING = 2, 2


@pytest.fixture(scope="module")
def small(bentoml_home, tmp_path_factory):
    srv = serve(bentoml_home, tmp_path_factory.mktemp("logs-backpressure"), extra=[
        "--arg", f"llm.max_num_seqs={SLOTS}", "--arg", f"llm.max_waiting={WAITING}",
        "--arg", "max_tokens_limit=1024", "--arg", "llm.max_model_len=2048"])
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


async def burst(url: str, n: int, max_tokens: int) -> list[httpx.Response]:
    body = {"model": "shapes-llava", "prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=body)
                                      for _ in range(n)))


def test_a_burst_over_the_bound_gets_429_with_retry_after(small):
    answers = asyncio.run(burst(small.url, 12, 600))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 429} and codes.count(200) >= SLOTS + WAITING, codes
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert_error(r, 429, text="at capacity")
        else:
            assert r.json()["usage"]["completion_tokens"] == 600


def test_every_request_within_the_bound_succeeds(small):
    answers = asyncio.run(burst(small.url, SLOTS + WAITING, 200))
    assert [r.status_code for r in answers] == [200] * (SLOTS + WAITING)
