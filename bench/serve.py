"""Side-by-side serving benchmark over OpenAI-compatible endpoints (ours, plain vLLM, any other).

    python bench/serve.py --target ours-vllm=http://127.0.0.1:3000 \
        --target vllm=http://127.0.0.1:8000 --concurrency 1 16 64 -n 128 --out bench.json

Every request is a /v1/chat/completions call with one shapes image (a 64-px PNG as a data URL)
and a question, greedy, exactly ``--max-tokens`` output tokens (``ignore_eos``, which both
bento-lmm and vLLM accept). For each target, concurrency level and mode (non-streamed and
streamed) it sends ``--warmup`` requests, then ``-n`` timed ones, and reports req/s, output
tok/s, p50/p90 latency, p50 time to first token (streamed) and the failures. Targets are measured
one after another, level by level, so they see the same machine state; the ratios between
targets in one run are what the figures are for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`
from models.shapes.data import make_samples  # noqa: E402


@dataclass
class Level:
    target: str
    concurrency: int
    stream: bool
    requests: int
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    req_per_s: float = 0.0
    output_tok_per_s: float = 0.0
    latency_p50_ms: float = 0.0
    latency_p90_ms: float = 0.0
    ttft_p50_ms: float | None = None


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class Target:
    def __init__(self, name: str, url: str, client: httpx.AsyncClient):
        self.name, self.url, self.client = name, url.rstrip("/"), client
        self.model = ""

    async def discover(self) -> None:
        models = (await self.client.get(self.url + "/v1/models")).json()["data"]
        self.model = models[0]["id"]

    def body(self, image: str, question: str, max_tokens: int, stream: bool) -> dict:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": question},
            ]}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def one(self, body: dict) -> tuple[float, float | None, int]:
        """(latency s, time to first token s or None, output tokens) of one request."""
        started = time.perf_counter()
        if not body["stream"]:
            r = await self.client.post(self.url + "/v1/chat/completions", json=body)
            r.raise_for_status()
            return time.perf_counter() - started, None, r.json()["usage"]["completion_tokens"]
        first, tokens = None, 0
        async with self.client.stream("POST", self.url + "/v1/chat/completions",
                                      json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message", "stream error"))
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return time.perf_counter() - started, first, tokens


async def level(target: Target, prompts: list[tuple[str, str]], n: int, warmup: int,
                concurrency: int, stream: bool, max_tokens: int) -> Level:
    result = Level(target.name, concurrency, stream, n)
    sem = asyncio.Semaphore(concurrency)
    timings: list[tuple[float, float | None, int]] = []

    async def send(i: int, record: bool) -> None:
        image, question = prompts[i % len(prompts)]
        async with sem:
            try:
                timing = await target.one(target.body(image, question, max_tokens, stream))
            except Exception as exc:  # counted and reported, never hidden
                if record:
                    result.failed += 1
                    result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            if record:
                timings.append(timing)

    await asyncio.gather(*[send(i, False) for i in range(warmup)])
    started = time.perf_counter()
    await asyncio.gather(*[send(i, True) for i in range(n)])
    result.seconds = time.perf_counter() - started
    latencies = [t[0] for t in timings]
    ttfts = [t[1] for t in timings if t[1] is not None]
    result.req_per_s = len(timings) / result.seconds
    result.output_tok_per_s = sum(t[2] for t in timings) / result.seconds
    result.latency_p50_ms = statistics.median(latencies) * 1000 if latencies else 0.0
    result.latency_p90_ms = quantile(latencies, 0.9) * 1000
    result.ttft_p50_ms = statistics.median(ttfts) * 1000 if ttfts else None
    return result


def table(results: list[Level]) -> str:
    rows = ["| target | conc. | stream | req/s | out tok/s | p50 ms | p90 ms | TTFT p50 ms | failed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ttft = "" if r.ttft_p50_ms is None else f"{r.ttft_p50_ms:.0f}"
        rows.append(f"| {r.target} | {r.concurrency} | {'yes' if r.stream else 'no'} | "
                    f"{r.req_per_s:.1f} | {r.output_tok_per_s:.0f} | {r.latency_p50_ms:.0f} | "
                    f"{r.latency_p90_ms:.0f} | {ttft} | {r.failed} |")
    return "\n".join(rows)


async def run(args) -> list[Level]:
    samples = make_samples(64, seed=11)
    prompts = [(data_url(s.image.resize((64, 64))), s.question) for s in samples]
    results: list[Level] = []
    limits = httpx.Limits(max_connections=max(args.concurrency) + 8)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        targets = [Target(*spec.split("=", 1), client) for spec in args.target]
        for target in targets:
            await target.discover()
        for concurrency in args.concurrency:
            for stream in (False, True):
                for target in targets:
                    r = await level(target, prompts, args.n, args.warmup, concurrency, stream,
                                    args.max_tokens)
                    print(table([r]).splitlines()[-1], flush=True)
                    results.append(r)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, metavar="NAME=URL",
                        help="an OpenAI-compatible server (its /v1 is appended); repeatable")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("-n", type=int, default=128, help="timed requests per level")
    parser.add_argument("--warmup", type=int, default=16, help="untimed requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    for spec in args.target:
        if "=" not in spec:
            parser.error(f"--target wants NAME=URL, got {spec!r}")
    results = asyncio.run(run(args))
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "results": [asdict(r) for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
