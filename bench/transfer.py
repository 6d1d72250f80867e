"""Image features between services: bytes and milliseconds per hop, float32 against the model's
own dtype (float16; bfloat16 as uint16 bits, ``lmm.transfer``).

    python bench/transfer.py                      # 1 and 4 images, every dtype, both topologies
    python bench/transfer.py --images 1 4 16 --repeats 50 --json transfer.json

LLaVA-1.5-7B-shaped features (576 tokens x 4096 per image, random values) cross real hops
between two BentoML processes, with BentoML's own inter-service client and serialization (the
``bentoml.depends`` proxy: pickle protocol 5, buffers out of band, over httpx). Two tiny services
stand in for ours: ``TransferApi`` (the API service) holds ``TransferRunner`` (a runner) as a
dependency and times its calls to it:

- vision runner -> API: ``TransferRunner.features`` answers with the features (as ``encode``);
- API -> LLM runner: ``TransferRunner.consume`` takes them as its argument (as ``generate``),
  and converts them to the engine's dtype (``--engine-dtype``, bfloat16 as in configs/gpu.yaml)
  as the LLM runner does, timed there.

Both topologies run: ``uds``, one ``bentoml serve`` (the runner reached over a Unix socket, as
``./dev serve`` and one pod run it), and ``tcp``, one ``start-http-server`` process per service
on loopback ports (as the Kubernetes manifests run them, ``--depends`` naming the runner's URL).
Per hop: the median wall time of a call less the median of an empty call (the fixed cost of a
request), and the bytes of the body.

The time to first token they are held against is an estimate, printed with its assumptions (no
GPU here): a compute-bound prefill of the 7B over the image tokens and a 64-token prompt, plus
the CLIP ViT-L/336 tower, at ``--tflops`` effective bf16 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bentoml
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/...`
from lmm.config import RUNNER_CONNECTION  # noqa: E402
from lmm.transfer import from_wire, to_wire  # noqa: E402

TOKENS, HIDDEN = 576, 4096  # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px -> 576 tokens, Llama-7B width
DTYPES = ("float32", "float16", "bfloat16")
LLM_PARAMS, VISION_PARAMS = 6.74e9, 0.30e9  # Llama-2-7B; the CLIP ViT-L/14 tower
PROMPT_TOKENS = 64
IMAGE_TOKEN = 32000


def features(images: int, dtype: str) -> np.ndarray:
    """Random features as the vision runner sends them (``lmm.transfer.to_wire``)."""
    import torch

    generator = torch.Generator().manual_seed(images)
    tensor = torch.randn(images, TOKENS, HIDDEN, generator=generator)
    return to_wire(tensor.to(getattr(torch, dtype)))


@bentoml.service(name="lmm-transfer-runner", traffic={"timeout": 300},
                 runner_connection=RUNNER_CONNECTION)
class TransferRunner:
    """Stands in for a runner: answers with features, or takes them as an argument."""

    def __init__(self) -> None:
        self.made: dict[tuple[int, str], np.ndarray] = {}

    @bentoml.api
    def features(self, images: int, dtype: str) -> np.ndarray:
        """[images, 576, 4096] features on the wire in ``dtype`` (made once, then reused)."""
        key = (images, dtype)
        if key not in self.made:
            self.made[key] = features(images, dtype)
        return self.made[key]

    @bentoml.api
    def consume(self, prompt_token_ids: list[int], image_features: np.ndarray,
                engine_dtype: str = "") -> float:
        """Take features as the LLM runner's ``generate`` does; with ``engine_dtype``, convert
        them as it does and answer how long that took (ms)."""
        if not engine_dtype:
            return 0.0
        import torch

        started = time.perf_counter()
        from_wire(image_features, getattr(torch, engine_dtype))
        return (time.perf_counter() - started) * 1e3

    @bentoml.api
    def ping(self) -> int:
        return 0


@bentoml.service(name="lmm-transfer-api", traffic={"timeout": 600})
class TransferApi:
    """Stands in for the API service: times its calls to the runner."""

    runner = bentoml.depends(TransferRunner)

    @bentoml.api
    async def measure(self, images: list[int], repeats: int = 30,
                      engine_dtype: str = "bfloat16") -> list[dict]:
        runner = self.runner.to_async
        empty = await median_ms(runner.ping, repeats)
        rows = []
        for n in images:
            for dtype in DTYPES:
                rows.append(await hop(runner, n, dtype, repeats, empty, engine_dtype))
        return rows


async def median_ms(call, repeats: int) -> float:
    await call()  # warm: connections, first-time allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


async def hop(runner, images: int, dtype: str, repeats: int, empty: float,
              engine_dtype: str) -> dict:
    sent = features(images, dtype)
    received = await runner.features(images=images, dtype=dtype)
    assert received.dtype == sent.dtype and np.array_equal(received, sent)
    ids = list(range(PROMPT_TOKENS)) + [IMAGE_TOKEN] * (images * TOKENS)
    down = await median_ms(lambda: runner.features(images=images, dtype=dtype), repeats)
    up = await median_ms(lambda: runner.consume(prompt_token_ids=ids, image_features=sent),
                         repeats)
    converts = [await runner.consume(prompt_token_ids=ids, image_features=sent,
                                     engine_dtype=engine_dtype) for _ in range(5)]
    return {
        "images": images, "dtype": dtype, "array_bytes": int(sent.nbytes),
        "vision_to_api_bytes": body_bytes(sent),
        "api_to_llm_bytes": body_bytes({"prompt_token_ids": ids, "image_features": sent}),
        "vision_to_api_ms": round(down - empty, 2),
        "api_to_llm_ms": round(up - empty, 2),
        "to_engine_dtype_ms": round(statistics.median(converts), 2),
        "empty_call_ms": round(empty, 2),
    }


def body_bytes(value) -> int:
    """Bytes BentoML's inter-service serialization puts in the HTTP body for ``value``."""
    from _bentoml_impl.serde import PickleSerde

    return PickleSerde().serialize_value(value).total_bytes()


def ttft_estimate_ms(images: int, tflops: float) -> float:
    """A compute-bound time to first token for LLaVA-1.5-7B (2 FLOPs per parameter and token)."""
    prefill = 2 * LLM_PARAMS * (images * TOKENS + PROMPT_TOKENS)
    vision = 2 * VISION_PARAMS * (TOKENS + 1) * images
    return (prefill + vision) / (tflops * 1e12) * 1e3


# -- running it ----------------------------------------------------------------------------
def topologies():
    """(name, servers to start: (name, cmd, port), the API's port), per topology."""
    from tests.conftest import BENTOML, free_port

    api = free_port()
    yield "uds", [("serve", [BENTOML, "serve", "bench.transfer:TransferApi", "--host",
                             "127.0.0.1", "--port", str(api)], api)], api
    runner, api = free_port(), free_port()
    start = [sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server",
             "--host", "127.0.0.1"]
    yield "tcp", [
        ("runner", [*start, "--service-name", "lmm-transfer-runner", "--port", str(runner),
                    "bench.transfer:TransferApi"], runner),
        ("api", [*start, "--service-name", "lmm-transfer-api", "--port", str(api), "--depends",
                 f"lmm-transfer-runner=http://127.0.0.1:{runner}",
                 "bench.transfer:TransferApi"], api),
    ], api


def run(args) -> list[dict]:
    import httpx

    from tests.conftest import Server

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for topology, specs, api_port in topologies():
            home = Path(tmp) / topology
            home.mkdir()
            env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True",
                   "PYTHONPATH": str(ROOT)}
            servers = [Server(cmd, env, port, home / f"{name}.log")
                       for name, cmd, port in specs]
            try:
                for server in servers:
                    server.wait_ready(180)
                answer = httpx.post(f"http://127.0.0.1:{api_port}/measure", timeout=1200,
                                    json={"images": args.images, "repeats": args.repeats,
                                          "engine_dtype": args.engine_dtype})
                answer.raise_for_status()
            finally:
                for server in servers:
                    server.stop()
            for row in answer.json():
                rows.append({"topology": topology, **row})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def report(rows: list[dict], tflops: float, engine_dtype: str) -> str:
    lines = [
        f"| hop | images | dtype | bytes per hop | vision→API ms | API→LLM ms | to {engine_dtype}"
        f" ms | transfer ms | est. TTFT ms | share of TTFT | 10% at TTFT ≥ |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        total = r["vision_to_api_ms"] + r["api_to_llm_ms"] + r["to_engine_dtype_ms"]
        ttft = ttft_estimate_ms(r["images"], tflops)
        lines.append(
            f"| {r['topology']} | {r['images']} | {r['dtype']} "
            f"| {r['vision_to_api_bytes'] / 1e6:.1f} MB | {r['vision_to_api_ms']:.1f} "
            f"| {r['api_to_llm_ms']:.1f} | {r['to_engine_dtype_ms']:.1f} | {total:.1f} "
            f"| {ttft:.0f} | {100 * total / (ttft + total):.0f}% | {10 * total:.0f} ms |")
    lines.append(f"\nEstimated TTFT: 2 FLOPs x 6.74e9 parameters x (576 per image + "
                 f"{PROMPT_TOKENS}) tokens, + the CLIP tower, at {tflops:g} TFLOP/s; the share "
                 "counts the transfer in (transfer / (estimate + transfer)); the last column is "
                 "the TTFT at which the transfer is 10% of it.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--engine-dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="effective bf16 TFLOP/s of the GPU for the TTFT estimate "
                        "(400: ~40%% of an H100 SXM's dense peak)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = run(args)
    print(report(rows, args.tflops, args.engine_dtype))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "tflops": args.tflops}, indent=2))


if __name__ == "__main__":
    main()
