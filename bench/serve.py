"""Serving benchmark over OpenAI-compatible endpoints (ours, plain vLLM, any other), side by side.

    python bench/serve.py --target ours=http://127.0.0.1:3000 --target vllm=http://127.0.0.1:8000 \
        --concurrency 1 16 64 --request-rate 4 16 inf --images shapes large -n 128 \
        --out bench.json --plot bench.png

Every request is a /v1/chat/completions call with ``--images-per-request`` images (data URLs from
the ``--images`` set, see bench/images.py) and a question, greedy, exactly ``--max-tokens`` output
tokens (``ignore_eos``, which bento-lmm and vLLM accept); the model is the first one each target's
/v1/models lists, or ``--model``'s: with several names the requests take them in turn (request i
the (i mod k)-th), e.g. a base model and a LoRA adapter, half each.

Load shapes: a concurrency sweep (``--concurrency``: that many requests in flight, each sent as
the previous one ends) and Poisson arrivals (``--request-rate``, req/s: exponential gaps between
request starts from a seeded RNG, the same schedule for every target; ``inf`` sends all at once;
``--max-concurrency`` caps the requests in flight). Each load runs non-streamed, streamed or both
(``--mode``), or, with ``--mode embed``, as /v1/embeddings requests of the same images
(bento-lmm's CLIP image embeddings; img/s and latency, no tokens). A level is one (image set,
load, mode); for each level every target gets ``--warmup`` untimed requests, then ``-n`` timed
ones, one target after another, so they see the same machine state. The ratios between targets
in one run are what the figures are for.

Per target and level: req/s, output tok/s, img/s, end-to-end latency, and when streamed time to
first token (TTFT), time per output token after the first (TPOT, per request) and inter-token
latency (ITL, the gaps between content chunks), each as mean/p50/p90/p99 in ms; the failed
requests (count, and status and message of the first ``--keep-errors``). Token counts come from
``usage`` (streamed: the final chunk, asked for with ``stream_options.include_usage``), else from
the number of content chunks. ``short_outputs`` counts completed requests with fewer than
``--max-tokens`` output tokens (a server that ignored ``ignore_eos``).

Output: each level's row on stderr as it is measured, the markdown table on stdout at the end,
``--out`` JSON (a header with the command line, date, targets and the client machine's load
average before and after; one record per target and level with every field, null where a figure
does not apply), ``--plot`` PNG (output tok/s and TTFT p50 against the load, one line per target
and mode).
A target that does not answer /v1/models stops the run before any request, with exit code 2.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`
from bench.images import IMAGE_SETS, Prompt, prompts  # noqa: E402

PERCENTILES = (50, 90, 99)
JSON_HEADERS = {"Content-Type": "application/json"}


class TargetError(Exception):
    """A target that cannot be benchmarked (exit code 2)."""


# --- statistics ---------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 of durations in seconds, in ms (None for no values)."""
    out: dict[str, float | None] = {
        "mean": sum(values_s) / len(values_s) * 1000 if values_s else None}
    for q in PERCENTILES:
        p = percentile(values_s, q)
        out[f"p{q}"] = None if p is None else p * 1000
    return out


def gaps(times: list[float]) -> list[float]:
    """Inter-token latencies: the gaps between successive chunk arrival times."""
    return [b - a for a, b in zip(times, times[1:])]


def tpot(latency: float, ttft: float, output_tokens: int) -> float | None:
    """Time per output token after the first, of one request."""
    return (latency - ttft) / (output_tokens - 1) if output_tokens > 1 else None


# --- one request --------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    latency: float = 0.0
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # content chunks, from the start
    output_tokens: int = 0
    input_tokens: int = 0
    tokens_from: str = "usage"
    status: int | None = None
    message: str = ""


def error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message", error) if isinstance(error, dict) else error
        return str(message)[:300]
    except ValueError:
        return raw.decode(errors="replace")[:300]


# What a failed request raises in send/send_embed: a transport error, a timeout, an answer that
# is not the JSON it should be.
REQUEST_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError)


async def send(client: aiohttp.ClientSession, url: str, body: bytes, stream: bool) -> Outcome:
    """One /v1/chat/completions request; failures are returned, not raised."""
    started = time.perf_counter()
    try:
        async with client.post(url, data=body, headers=JSON_HEADERS) as r:
            if r.status != 200:
                return Outcome(False, status=r.status, message=error_message(await r.read()))
            if not stream:
                answer = json.loads(await r.read())
                latency = time.perf_counter() - started
                usage = answer.get("usage") or {}
                if "completion_tokens" not in usage:
                    return Outcome(False, status=200,
                                   message="answer has no usage.completion_tokens")
                return Outcome(True, latency, output_tokens=usage["completion_tokens"],
                               input_tokens=usage.get("prompt_tokens") or 0)
            usage, times, done, buffer = None, [], False, b""
            async for data in r.content.iter_any():  # whatever has arrived, as it arrives
                if done:  # read to the end, so that the connection goes back to the pool
                    continue
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        return Outcome(False, status=200,
                                       message="stream error event: " + error_message(payload))
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    choices = chunk.get("choices") or []
                    if choices and (choices[0].get("delta") or {}).get("content"):
                        times.append(time.perf_counter() - started)
        latency = time.perf_counter() - started
        if not done:
            return Outcome(False, status=200, message="stream ended without data: [DONE]")
        if not times:
            return Outcome(False, status=200, message="stream had no content chunk")
        from_usage = bool(usage and "completion_tokens" in usage)
        return Outcome(True, latency, ttft=times[0], chunk_times=times,
                       output_tokens=usage["completion_tokens"] if from_usage else len(times),
                       input_tokens=(usage or {}).get("prompt_tokens") or 0,
                       tokens_from="usage" if from_usage else "chunks")
    except REQUEST_ERRORS as exc:  # counted, never hidden
        return Outcome(False, message=f"{type(exc).__name__}: {exc}"[:300])


async def send_embed(client: aiohttp.ClientSession, url: str, body: bytes, images: int
                     ) -> Outcome:
    """One /v1/embeddings request of ``images`` images; failures are returned, not raised."""
    started = time.perf_counter()
    try:
        async with client.post(url, data=body, headers=JSON_HEADERS) as r:
            raw = await r.read()
        latency = time.perf_counter() - started
        if r.status != 200:
            return Outcome(False, status=r.status, message=error_message(raw))
        data = json.loads(raw).get("data") or []
        if len(data) != images or not all(d.get("embedding") for d in data):
            return Outcome(False, status=200,
                           message=f"answer has {len(data)} embeddings for {images} images")
        return Outcome(True, latency)
    except REQUEST_ERRORS as exc:  # counted, never hidden
        return Outcome(False, message=f"{type(exc).__name__}: {exc}"[:300])


# --- targets and levels -------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, url: str, client: aiohttp.ClientSession,
                 models: list[str] | None = None):
        self.name, self.url, self.client = name, url.rstrip("/"), client
        self.models = list(models or [])  # the requests take them in turn
        self.model = "+".join(self.models)

    async def discover(self) -> None:
        """The first model of /v1/models, or checks that it lists every ``--model``;
        TargetError naming the target if not."""
        where = f"target {self.name} ({self.url})"
        try:
            async with self.client.get(self.url + "/v1/models",
                                       timeout=aiohttp.ClientTimeout(total=10)) as r:
                status, raw = r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise TargetError(f"{where} does not answer /v1/models: "
                              f"{type(exc).__name__}: {exc or 'no answer'}") from None
        if status != 200:
            raise TargetError(f"{where}: /v1/models answered {status}: {error_message(raw)}")
        try:
            listed = [m["id"] for m in json.loads(raw)["data"]]
            listed[0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise TargetError(f"{where}: /v1/models lists no model: {raw[:200]!r}") from None
        missing = [m for m in self.models if m not in listed]
        if missing:
            raise TargetError(f"{where}: /v1/models lists no {', '.join(missing)} (it lists "
                              f"{', '.join(listed)})")
        self.models = self.models or listed[:1]
        self.model = "+".join(self.models)

    def body(self, prompt: Prompt, max_tokens: int, stream: bool, model: str = "") -> bytes:
        parts = [{"type": "image_url", "image_url": {"url": url}} for url in prompt.images]
        body = {
            "model": model or self.models[0],
            "messages": [{"role": "user",
                          "content": [*parts, {"type": "text", "text": prompt.question}]}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return json.dumps(body).encode()

    def embed_body(self, prompt: Prompt, model: str = "") -> bytes:
        """A /v1/embeddings request for the prompt's images (bento-lmm's image inputs)."""
        return json.dumps({"model": model or self.models[0],
                           "input": [{"image": url} for url in prompt.images]}).encode()


@dataclass
class Load:
    kind: str  # "concurrency" or "request_rate"
    value: float  # requests in flight, or req/s (inf: all at once)
    max_concurrency: int | None = None  # request_rate only

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"c={int(self.value)}"
        return "rate=inf" if math.isinf(self.value) else f"rate={self.value:g}"


@dataclass
class Level:
    """One target at one level: every field is present, None where it does not apply."""

    target: str
    url: str
    model: str
    images: str
    images_per_request: int
    load: str  # "concurrency" or "request_rate"
    concurrency: int | None  # requests in flight (request_rate: the --max-concurrency cap)
    request_rate: float | str | None  # req/s, "inf" for all at once; None for concurrency
    mode: str  # "plain", "stream" or "embed" (/v1/embeddings of the images)
    max_tokens: int
    warmup: int
    requests: int
    completed: int = 0
    failed: int = 0
    errors: list[dict] = field(default_factory=list)  # {"request", "status", "message"}
    short_outputs: int = 0
    tokens_from: str = "usage"  # "usage", "chunks" or "usage+chunks"
    duration_s: float = 0.0
    req_per_s: float = 0.0
    output_tok_per_s: float = 0.0
    input_tok_per_s: float = 0.0
    img_per_s: float = 0.0
    total_output_tokens: int = 0
    total_input_tokens: int = 0
    peak_in_flight: int = 0
    e2e_ms: dict = field(default_factory=dict)
    ttft_ms: dict | None = None
    tpot_ms: dict | None = None
    itl_ms: dict | None = None


def summarize(level: Level, outcomes: list[tuple[int, Outcome]], duration: float,
              keep_errors: int) -> Level:
    done = [o for _, o in outcomes if o.ok]
    level.completed, level.failed = len(done), len(outcomes) - len(done)
    level.errors = [{"request": i, "status": o.status, "message": o.message}
                    for i, o in outcomes if not o.ok][:keep_errors]
    if level.mode != "embed":
        level.short_outputs = sum(o.output_tokens < level.max_tokens for o in done)
    level.tokens_from = "+".join(sorted({o.tokens_from for o in done})) or "usage"
    level.duration_s = duration
    level.total_output_tokens = sum(o.output_tokens for o in done)
    level.total_input_tokens = sum(o.input_tokens for o in done)
    level.req_per_s = len(done) / duration if duration else 0.0
    level.output_tok_per_s = level.total_output_tokens / duration if duration else 0.0
    level.input_tok_per_s = level.total_input_tokens / duration if duration else 0.0
    level.img_per_s = level.req_per_s * level.images_per_request
    level.e2e_ms = summary_ms([o.latency for o in done])
    if level.mode == "stream":
        level.ttft_ms = summary_ms([o.ttft for o in done])
        level.tpot_ms = summary_ms([t for o in done
                                    if (t := tpot(o.latency, o.ttft, o.output_tokens)) is not None])
        level.itl_ms = summary_ms([g for o in done for g in gaps(o.chunk_times)])
    return level


async def measure(target: Target, batch: list[Prompt], load: Load, mode: str, args,
                  images: str) -> Level:
    """--warmup untimed then -n timed requests of ``batch`` (warmup first) at ``load``."""
    level = Level(
        target.name, target.url, target.model, images, args.images_per_request, load.kind,
        int(load.value) if load.kind == "concurrency" else load.max_concurrency,
        None if load.kind == "concurrency" else ("inf" if math.isinf(load.value) else load.value),
        mode, 0 if mode == "embed" else args.max_tokens, args.warmup, args.n)
    stream = mode == "stream"
    url = target.url + ("/v1/embeddings" if mode == "embed" else "/v1/chat/completions")
    bodies: dict[tuple[Prompt, str], bytes] = {}
    models = [target.models[i % len(target.models)] for i in range(len(batch))]
    for prompt, model in zip(batch, models):  # encoded before the clock starts; shared
        if (prompt, model) not in bodies:
            bodies[prompt, model] = (target.embed_body(prompt, model) if mode == "embed" else
                                     target.body(prompt, args.max_tokens, stream, model))
    limit = int(load.value) if load.kind == "concurrency" else load.max_concurrency
    sem = asyncio.Semaphore(limit or len(batch))
    in_flight = 0

    async def one(i: int) -> tuple[int, Outcome]:
        nonlocal in_flight
        async with sem:
            in_flight += 1
            level.peak_in_flight = max(level.peak_in_flight, in_flight)
            try:
                body = bodies[batch[i], models[i]]
                if mode == "embed":
                    return i, await send_embed(target.client, url, body, len(batch[i].images))
                return i, await send(target.client, url, body, stream)
            finally:
                in_flight -= 1

    await asyncio.gather(*[one(i) for i in range(args.warmup)])
    level.peak_in_flight = 0
    timed = range(args.warmup, args.warmup + args.n)
    started = time.perf_counter()
    if load.kind == "concurrency":
        outcomes = await asyncio.gather(*[one(i) for i in timed])
    else:
        rng = random.Random(args.seed)  # the same arrival times for every target
        tasks, due = [], started
        for i in timed:
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(i)))
            if not math.isinf(load.value):
                due += rng.expovariate(load.value)
        outcomes = await asyncio.gather(*tasks)
    duration = time.perf_counter() - started
    return summarize(level, [(i - args.warmup, o) for i, o in outcomes], duration,
                     args.keep_errors)


# --- output -------------------------------------------------------------------------------------


def _ms(stats: dict | None) -> str:
    if not stats or stats.get("p50") is None:
        return ""
    return " / ".join(f"{stats[f'p{q}']:.0f}" for q in PERCENTILES)


def _load_label(r: Level) -> str:
    if r.load == "concurrency":
        return f"c={r.concurrency}"
    rate = r.request_rate if r.request_rate == "inf" else f"{r.request_rate:g}"
    return f"rate={rate}" + (f" (c≤{r.concurrency})" if r.concurrency else "")


TABLE_HEAD = (
    "| target | images | load | mode | req/s | out tok/s | img/s | TTFT ms p50/p90/p99 "
    "| TPOT ms p50/p90/p99 | ITL ms p50/p90/p99 | E2E ms p50/p90/p99 | failed |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_row(r: Level) -> str:
    images = r.images + (f" ×{r.images_per_request}" if r.images_per_request > 1 else "")
    return (f"| {r.target} | {images} | {_load_label(r)} | {r.mode} | {r.req_per_s:.1f} | "
            f"{r.output_tok_per_s:.0f} | {r.img_per_s:.1f} | {_ms(r.ttft_ms)} | "
            f"{_ms(r.tpot_ms)} | {_ms(r.itl_ms)} | {_ms(r.e2e_ms)} | {r.failed} |")


def table(results: list[Level]) -> str:
    return "\n".join([TABLE_HEAD, *map(table_row, results)])


def plot(results: list[Level], path: str) -> None:
    """Output tok/s and TTFT p50 against the load: a row of two panels per load kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("concurrency", "request_rate") if any(r.load == k for r in results)]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 4.5 * len(kinds)), squeeze=False)
    several_sets = len({(r.images, r.images_per_request) for r in results}) > 1
    for row, kind in zip(axes, kinds):
        rows = [r for r in results if r.load == kind]
        xs = list(dict.fromkeys(r.concurrency if kind == "concurrency" else r.request_rate
                                for r in rows))
        lines: dict[str, list[Level]] = {}
        for r in rows:
            name = f"{r.target} {r.mode}" + (f" {r.images}×{r.images_per_request}"
                                              if several_sets else "")
            lines.setdefault(name, []).append(r)
        for name, points in lines.items():
            at = [xs.index(p.concurrency if kind == "concurrency" else p.request_rate)
                  for p in points]
            row[0].plot(at, [p.img_per_s if p.mode == "embed" else p.output_tok_per_s
                             for p in points], marker="o", label=name)
            if points[0].mode == "stream":
                row[1].plot(at, [p.ttft_ms["p50"] if p.ttft_ms["p50"] is not None
                                 else float("nan") for p in points], marker="o", label=name)
        xlabel = "concurrency" if kind == "concurrency" else "request rate (req/s)"
        for ax, ylabel in zip(row, ("output tok/s (embed: img/s)", "TTFT p50 (ms)")):
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.get_lines():
                ax.legend(fontsize=8)
        if not row[1].get_lines():
            row[1].text(0.5, 0.5, "TTFT is measured on streamed requests (--mode stream|both)",
                        ha="center", va="center", transform=row[1].transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the run ------------------------------------------------------------------------------------


def loads(args) -> list[Load]:
    out = [Load("concurrency", c) for c in args.concurrency or []]
    return out + [Load("request_rate", r, args.max_concurrency) for r in args.request_rate or []]


async def run(args) -> tuple[list[Target], list[Level]]:
    sweep = loads(args)
    most = max(int(ld.value) if ld.kind == "concurrency" else (ld.max_concurrency or
               args.n + args.warmup) for ld in sweep)
    # aiohttp, as vLLM's own benchmark: a streamed request costs its client about half the CPU
    # that httpx takes, and the client shares the machine with the servers it measures.
    connector = aiohttp.TCPConnector(limit=most + 8, keepalive_timeout=2)  # < uvicorn's 5 s
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    results: list[Level] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        targets = [Target(*spec.split("=", 1), client, args.model) for spec in args.target]
        for target in targets:
            await target.discover()
            print(f"# {target.name}: {target.url} model {target.model}", file=sys.stderr)
        print(TABLE_HEAD, file=sys.stderr, flush=True)  # progress; the table goes to stdout
        modes = {"both": ["plain", "stream"]}.get(args.mode, [args.mode])
        number = 0  # levels so far: seeds each level's images (bench/images.py)
        for images in args.images:
            for load in sweep:
                for mode in modes:
                    batch = prompts(images, args.warmup + args.n, args.images_per_request,
                                    number)
                    number += 1
                    for target in targets:
                        r = await measure(target, batch, load, mode, args, images)
                        print(table_row(r), file=sys.stderr, flush=True)
                        results.append(r)
    return targets, results


def rate(value: str) -> float:
    r = float(value)
    if not r > 0:
        raise argparse.ArgumentTypeError(f"request rate must be > 0 or inf, got {value}")
    return r


def positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return n


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", required=True, metavar="NAME=URL",
                        help="an OpenAI-compatible server (its /v1 is appended); repeatable")
    parser.add_argument("--concurrency", type=positive, nargs="+", metavar="C",
                        help="requests in flight per level (default 1 16 64 when no "
                             "--request-rate is given)")
    parser.add_argument("--request-rate", type=rate, nargs="+", metavar="R",
                        help="Poisson arrivals at R req/s per level; inf: all at once")
    parser.add_argument("--max-concurrency", type=positive, metavar="C",
                        help="with --request-rate: at most C requests in flight")
    parser.add_argument("--model", nargs="+", metavar="NAME",
                        help="models to ask (default: the first of each target's /v1/models); "
                             "several: the requests take them in turn")
    parser.add_argument("--mode", choices=("stream", "plain", "both", "embed"), default="both",
                        help="chat streamed, not streamed, or both; embed: /v1/embeddings of "
                        "each request's images (bento-lmm's CLIP image embeddings)")
    parser.add_argument("--images", nargs="+", choices=IMAGE_SETS, default=["shapes"],
                        help="image sets, one sweep each (bench/images.py)")
    parser.add_argument("--images-per-request", type=positive, default=1, metavar="K")
    parser.add_argument("-n", type=positive, default=128, help="timed requests per level")
    parser.add_argument("--warmup", type=int, default=16, help="untimed requests per level")
    parser.add_argument("--max-tokens", type=positive, default=32)
    parser.add_argument("--seed", type=int, default=0, help="of the Poisson arrival times")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request")
    parser.add_argument("--keep-errors", type=int, default=10, metavar="N",
                        help="failed requests listed per level (all are counted)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--plot", metavar="FILE.png", help="write a plot of the results here")
    args = parser.parse_args(argv)
    for spec in args.target:
        name, _, url = spec.partition("=")
        if not name or not url.startswith(("http://", "https://")):
            parser.error(f"--target wants NAME=http(s)://HOST:PORT, got {spec!r}")
    if len({spec.split("=", 1)[0] for spec in args.target}) < len(args.target):
        parser.error("--target names must differ")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.concurrency is None and args.request_rate is None:
        args.concurrency = [1, 16, 64]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()  # other work on the machine moves every figure
    try:
        targets, results = asyncio.run(run(args))
    except TargetError as exc:
        print(f"bench/serve.py: {exc}", file=sys.stderr)
        return 2
    print(table(results))
    failed = sum(r.failed for r in results)
    if failed:
        print(f"\n{failed} request(s) failed; see the errors in --out", file=sys.stderr)
    if args.out:
        header = {
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "date": started.isoformat(timespec="seconds"),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "targets": [{"name": t.name, "url": t.url, "model": t.model} for t in targets],
            "args": {k: (["inf" if math.isinf(x) else x for x in v]
                         if k == "request_rate" and v else v) for k, v in vars(args).items()},
            "client": {"host": platform.node(), "cpus": os.cpu_count(),
                       "python": platform.python_version(), "aiohttp": aiohttp.__version__,
                       "loadavg_start": list(load_before), "loadavg_end": list(os.getloadavg())},
        }
        with open(args.out, "w") as f:
            json.dump({"header": header, "results": [asdict(r) for r in results]}, f,
                      indent=1, allow_nan=False)
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
