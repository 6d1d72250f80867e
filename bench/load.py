"""Latency and throughput of a running bento-lmm: `python bench/load.py --url URL`.

Sends shapes images with questions through /generate at a fixed concurrency and prints
p50/p90/p99 latency, throughput, status counts and the batch sizes the runners ran (/runner_stats:
summed over every worker of each runner, since the server started).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`
from models.shapes.data import make_samples  # noqa: E402


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


async def run(url: str, n: int, concurrency: int, max_tokens: int) -> None:
    samples = make_samples(min(n, 256), seed=1)
    images = [(png(s.image), s.question) for s in samples]
    sem = asyncio.Semaphore(concurrency)
    codes: collections.Counter[int] = collections.Counter()
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            image, question = images[i % len(images)]
            async with sem:
                t = time.perf_counter()
                r = await client.post(url + "/generate", data={"prompt": question,
                                      "max_tokens": str(max_tokens)},
                                      files=[("images", ("i.png", image, "image/png"))])
                latencies.append(time.perf_counter() - t)
                codes[r.status_code] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[one(i) for i in range(n)])
        elapsed = time.perf_counter() - t0
        stats = (await client.post(url + "/runner_stats")).json()
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000  # noqa: E731
    print(f"requests={n} concurrency={concurrency} status={dict(codes)}")
    print(f"elapsed={elapsed:.2f}s throughput={n / elapsed:.1f} req/s")
    print(f"latency p50={q(0.5):.0f}ms p90={q(0.9):.0f}ms p99={q(0.99):.0f}ms")
    for name in ("vision", "llm"):
        print(f"{name} batch sizes: {stats[name]['batch_size_histogram']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("-n", type=int, default=512)
    parser.add_argument("-c", "--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(run(args.url.rstrip("/"), args.n, args.concurrency, args.max_tokens))


if __name__ == "__main__":
    main()
