"""Soak benchmark: many mixed requests at a fixed concurrency, then what was lost and what grew.

    python bench/soak.py --url http://127.0.0.1:3000 --pid PID_OF_BENTOML_SERVE
    python bench/soak.py --serve configs/test.yaml --requests 500 --json soak.json

Sends ``--requests`` requests (default 10,000) at ``--concurrency`` (default 64), the routes
mixed in equal parts: /generate (multipart, 1-4 shapes images as uploads), /generate_stream (the
same, streamed), /embed (1-4 uploads and a text), /v1/chat/completions non-streamed and streamed
(1-4 images as data URLs). ``--warmup`` requests go first and are not counted.

Reports, per route: answers by HTTP status, stream error events and streams that ended without
``[DONE]``, lost requests (no answer: connection errors, timeouts), p50/p99 latency of the 200s;
and the RSS of every worker of the three services (lmm-api, lmm-vision, lmm-llm: the processes of
the `bentoml serve` tree with that ``--service-name``, each with its own child processes) after
the warm-up and at the end, with the growth. ``--pid`` names the root of a running
`bentoml serve`; ``--serve CONFIG`` starts one (on a free loopback port, idle connections kept
75 s as the pods keep them, with a BENTOML_HOME of its own that shares the store's models) and
stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/...`
from models.shapes.data import make_samples  # noqa: E402
from configs.k8s import KEEP_ALIVE_S  # noqa: E402  (as the pods and ./dev serve keep them)
from tests.conftest import serve  # noqa: E402  (the test suite's server harness)

SERVICES = ("lmm-api", "lmm-vision", "lmm-llm")
ROUTES = ("generate", "generate_stream", "embed", "chat", "chat_stream")
QUESTIONS = ("What shape is this?", "What color is the shape?", "Describe the image.")


# -- the server's processes -------------------------------------------------------------------
def service_workers(root: int) -> dict[str, list[psutil.Process]]:
    """The worker processes of each service under the process ``root`` (by --service-name)."""
    found: dict[str, list[psutil.Process]] = {name: [] for name in SERVICES}
    for child in psutil.Process(root).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "--service-name" in cmd and cmd.index("--service-name") + 1 < len(cmd):
            found.setdefault(cmd[cmd.index("--service-name") + 1], []).append(child)
    return found


def rss(workers: dict[str, list[psutil.Process]]) -> dict[str, dict]:
    """MiB per service: each worker's own RSS ("workers", by pid), their sum ("total"), and the
    sum with the workers' own child processes ("total_with_children": vLLM's engine core is
    the LLM worker's child)."""
    out: dict[str, dict] = {}
    for name, procs in workers.items():
        own, tree = {}, 0.0
        for proc in procs:
            try:
                mine = proc.memory_info().rss
                kids = sum(k.memory_info().rss for k in proc.children(recursive=True))
            except psutil.Error:
                continue
            own[str(proc.pid)] = round(mine / 2**20, 1)
            tree += (mine + kids) / 2**20
        out[name] = {"workers": own, "total": round(sum(own.values()), 1),
                     "total_with_children": round(tree, 1)}
    return out


# -- the requests ---------------------------------------------------------------------------------
@dataclass
class Tally:
    statuses: collections.Counter = field(default_factory=collections.Counter)
    lost: collections.Counter = field(default_factory=collections.Counter)  # exception names
    stream_error_events: int = 0
    streams_without_done: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, the 200s
    examples: list[str] = field(default_factory=list)  # a few non-200 answers

    def note(self, what: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(what[:300])


class Mix:
    def __init__(self, max_tokens: int, seed: int):
        samples = make_samples(256, seed=seed)
        self.pngs, self.urls = [], []
        for s in samples:
            buffer = io.BytesIO()
            s.image.save(buffer, format="PNG")
            self.pngs.append(buffer.getvalue())
            self.urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
        self.max_tokens = max_tokens
        self.rng = random.Random(seed)

    def pick(self, i: int) -> tuple[str, dict]:
        """Route ``i`` of the mix and its request (keyword arguments of httpx's request)."""
        route = ROUTES[i % len(ROUTES)]
        chosen = self.rng.sample(range(len(self.pngs)), self.rng.randint(1, 4))
        question = self.rng.choice(QUESTIONS)
        uploads = [("images", (f"{k}.png", self.pngs[k], "image/png")) for k in chosen]
        if route in ("generate", "generate_stream"):
            return route, {"method": "POST", "url": "/" + route, "files": uploads,
                           "data": {"prompt": question, "max_tokens": str(self.max_tokens)}}
        if route == "embed":
            return route, {"method": "POST", "url": "/embed", "files": uploads,
                           "data": {"texts": json.dumps([question])}}
        content = [{"type": "text", "text": question}] + [
            {"type": "image_url", "image_url": {"url": self.urls[k]}} for k in chosen]
        body = {"model": "shapes-llava", "max_tokens": self.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": content}],
                "stream": route == "chat_stream"}
        return route, {"method": "POST", "url": "/v1/chat/completions", "json": body}


async def one(client: httpx.AsyncClient, route: str, request: dict, tally: Tally) -> None:
    started = time.perf_counter()
    streamed = route.endswith("_stream")
    try:
        async with client.stream(**request) as r:
            if streamed and r.status_code == 200:
                events = []
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                errors = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
                tally.stream_error_events += len(errors)
                if errors:
                    tally.note(f"stream error event: {errors[0]}")
                if not events or events[-1] != "[DONE]":
                    tally.streams_without_done += 1
                    tally.note(f"stream without [DONE]: {events[-1:]}")
            else:
                body = await r.aread()
                if r.status_code != 200:
                    tally.note(f"HTTP {r.status_code}: {body[:200].decode(errors='replace')}")
        tally.statuses[r.status_code] += 1
        if r.status_code == 200:
            tally.latencies.append(time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - a lost request, counted by kind
        tally.lost[type(exc).__name__] += 1
        tally.note(f"lost: {exc!r}")


async def drive(url: str, n: int, concurrency: int, mix: Mix, timeout: float, offset: int = 0,
                progress: bool = False) -> tuple[dict[str, Tally], float]:
    tallies = {route: Tally() for route in ROUTES}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(offset, offset + n):
            queue.put_nowait(i)
        done = 0
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal done
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                route, request = mix.pick(i)
                await one(client, route, request, tallies[route])
                done += 1
                if progress and done % max(1, n // 10) == 0:
                    rate = done / (time.perf_counter() - started)
                    print(f"[soak] {done}/{n} ({rate:.1f} req/s)", file=sys.stderr, flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tallies, time.perf_counter() - started


def quantile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def summary(tallies: dict[str, Tally]) -> dict:
    routes = {}
    for route, t in tallies.items():
        p50, p99 = quantile(t.latencies, 0.5), quantile(t.latencies, 0.99)
        routes[route] = {
            "requests": sum(t.statuses.values()) + sum(t.lost.values()),
            "statuses": {str(k): v for k, v in sorted(t.statuses.items())},
            "lost": dict(t.lost),
            "stream_error_events": t.stream_error_events,
            "streams_without_done": t.streams_without_done,
            "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
            "examples": t.examples,
        }
    return routes


def growth(before: dict, after: dict) -> dict[str, float | None]:
    out = {}
    for name in SERVICES:
        a, b = before.get(name, {}).get("total"), after.get(name, {}).get("total")
        out[name] = round(100 * (b - a) / a, 1) if a and b is not None else None
    return out


def report(result: dict) -> None:
    print(f"requests={result['requests']} concurrency={result['concurrency']} "
          f"elapsed={result['elapsed_s']:.1f}s throughput={result['req_per_s']:.1f} req/s "
          f"lost={result['lost']} non_200={result['non_200']}")
    print(f"{'route':<16}{'requests':>9}  {'statuses':<22}{'lost':>5}{'err ev':>7}"
          f"{'no DONE':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for route, r in result["routes"].items():
        statuses = ",".join(f"{k}:{v}" for k, v in r["statuses"].items())
        print(f"{route:<16}{r['requests']:>9}  {statuses:<22}{sum(r['lost'].values()):>5}"
              f"{r['stream_error_events']:>7}{r['streams_without_done']:>8}"
              f"{r['p50_ms'] or 0:>9.0f}{r['p99_ms'] or 0:>9.0f}")
        for example in r["examples"]:
            print(f"    {example}")
    if result.get("rss_mib"):
        print(f"{'service':<12}{'RSS after warm-up MiB':>23}{'at end MiB':>12}{'growth %':>10}")
        for name in SERVICES:
            before = result["rss_mib"]["after_warmup"].get(name, {}).get("total")
            after = result["rss_mib"]["end"].get(name, {}).get("total")
            print(f"{name:<12}{before or 0:>23.0f}{after or 0:>12.0f}"
                  f"{result['rss_growth_pct'][name] or 0:>10.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:3000")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request")
    parser.add_argument("--seed", type=int, default=1)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--pid", type=int, help="root pid of the `bentoml serve` at --url")
    where.add_argument("--serve", metavar="CONFIG", help="start `bentoml serve --arg-file CONFIG`")
    parser.add_argument("--serve-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="with --serve: a `--arg KEY=VALUE` override (repeatable)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = parser.parse_args()

    server = None
    if args.serve:
        extra = ["--timeout-keep-alive", str(KEEP_ALIVE_S),
                 *(a for kv in args.serve_arg for a in ("--arg", kv))]
        store = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml"))
        server = serve(store, Path(tempfile.mkdtemp(prefix="soak-")), args.serve, extra)
        print(f"[soak] starting bentoml serve on {server.url} (log {server.log})",
              file=sys.stderr, flush=True)
    try:
        if server:
            server.wait_ready(timeout=300)
        url = server.url if server else args.url.rstrip("/")
        root = server.proc.pid if server else args.pid
        workers = service_workers(root) if root else {}
        if root and not all(workers.get(name) for name in SERVICES):
            print(f"[soak] not every service found under pid {root}: "
                  f"{ {k: [p.pid for p in v] for k, v in workers.items()} }", file=sys.stderr)
        mix = Mix(args.max_tokens, args.seed)
        if args.warmup:
            print(f"[soak] warm-up: {args.warmup} requests", file=sys.stderr, flush=True)
            asyncio.run(drive(url, args.warmup, args.concurrency, mix, args.timeout))
        rss_warm = rss(workers) if workers else {}
        tallies, elapsed = asyncio.run(drive(url, args.requests, args.concurrency, mix,
                                             args.timeout, offset=args.warmup, progress=True))
        rss_end = rss(workers) if workers else {}
    finally:
        if server:
            server.stop()

    routes = summary(tallies)
    result = {
        "url": url, "requests": args.requests, "concurrency": args.concurrency,
        "warmup": args.warmup, "max_tokens": args.max_tokens,
        "elapsed_s": round(elapsed, 1), "req_per_s": round(args.requests / elapsed, 2),
        "lost": sum(sum(r["lost"].values()) + r["streams_without_done"] for r in routes.values()),
        "non_200": sum(v for r in routes.values() for k, v in r["statuses"].items() if k != "200"),
        "stream_error_events": sum(r["stream_error_events"] for r in routes.values()),
        "routes": routes,
        "rss_mib": {"after_warmup": rss_warm, "end": rss_end} if workers else None,
        "rss_growth_pct": growth(rss_warm, rss_end) if workers else None,
    }
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not result["lost"] and not result["non_200"] else 1


if __name__ == "__main__":
    sys.exit(main())
