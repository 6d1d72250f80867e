"""LoRA adapter overhead inside the LLM engine: output tok/s with every sequence on the base model
against half of them on an adapter, on each engine; and the base model on an engine with no
adapter loaded.

    python bench/lora.py --adapter DIR [--backend transformers vllm] [--concurrency 16] \
        [-n 64] [--max-tokens 32] [--repeats 3] [--json lora.json]

The engine runs in this process with the adapter loaded (as the LLM runner builds it), fed
prompts with one shapes image each (features from the vision tower, computed before the clock
starts), greedy, exactly ``--max-tokens`` tokens (``ignore_eos``), ``--concurrency`` sequences in
flight (each sent as the previous one ends), ``-n`` per run. Two engines of a backend run side
by side, one without adapters, one with the adapter; runs alternate (no adapters loaded: all
base; adapter loaded: all base, then half on the adapter) ``--repeats`` times so that all three
see the same machine state; the table has every run and the median. The transformers engine
also reports the CPU seconds of this process per 1000 output tokens (its scheduler thread does
all the model work here; vLLM's runs in other processes). No HTTP and no API service: only the
engine's share of the cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python bench/...`

from lmm.protocol import SamplingParams  # noqa: E402

ADAPTER = "adapter"


def make(backend: str, llava: str, adapter: str | None, seqs: int, rank: int, threads: int):
    adapters = {ADAPTER: adapter} if adapter else {}
    if backend == "vllm":
        from runners.engines.vllm_engine import VLLMEngine

        return VLLMEngine(llava, device="cpu", dtype="float32", max_num_seqs=seqs,
                          max_model_len=512, enforce_eager=True, cpu_kvcache_space_gib=1,
                          torch_threads=threads, adapters=adapters, max_lora_rank=rank)
    from runners.engines.transformers_engine import TransformersEngine

    return TransformersEngine(llava, "cpu", "float32", max_num_seqs=seqs, max_model_len=512,
                              torch_threads=threads, adapters=adapters)


def prompts(llava: str, count: int):
    from transformers import AutoProcessor

    from lmm.encoders import LlavaVisionEncoder
    from lmm.pipeline import user_messages
    from models.shapes.data import make_samples

    processor = AutoProcessor.from_pretrained(llava)
    encoder = LlavaVisionEncoder(llava, "cpu", "float32")
    out = []
    for sample in make_samples(count, seed=1234):
        text = processor.apply_chat_template(user_messages(sample.question, 1),
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(text=text, images=[sample.image], return_tensors="np",
                           add_special_tokens=False)
        out.append((inputs["input_ids"][0].tolist(), encoder(inputs["pixel_values"])))
    return out


async def run(engine, jobs, concurrency: int, max_tokens: int, mixed: bool) -> dict:
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int, ids, feats):
        nonlocal tokens
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                adapter=ADAPTER if mixed and i % 2 else None)
        async with sem:
            async for out in engine.generate(f"r{i}-{time.monotonic_ns()}", ids, feats, params):
                tokens += len(out.token_ids)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*[one(i, ids, feats) for i, (ids, feats) in enumerate(jobs)])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"mode": "half on the adapter" if mixed else "all base", "tokens": tokens,
            "wall_s": wall, "tok_per_s": tokens / wall,
            "cpu_s_per_1k_tokens": 1000 * cpu / tokens}


async def bench(args) -> list[dict]:
    from lmm.lora import check_adapter

    rank = check_adapter(ADAPTER, args.adapter).rank
    rank = min(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)  # vLLM's sizes
    jobs = prompts(args.llava, args.n)
    results = []
    for backend in args.backend:
        plain = make(backend, args.llava, None, args.concurrency, rank, args.torch_threads)
        lora = make(backend, args.llava, args.adapter, args.concurrency, rank, args.torch_threads)
        await plain.start()
        await lora.start()
        try:
            warm = jobs[: args.concurrency]
            await run(plain, warm, args.concurrency, args.max_tokens, False)
            await run(lora, warm, args.concurrency, args.max_tokens, True)
            for repeat in range(args.repeats):
                for engine, loaded, mixed in ((plain, False, False), (lora, True, False),
                                              (lora, True, True)):
                    r = await run(engine, jobs, args.concurrency, args.max_tokens, mixed)
                    r.update(backend=backend, adapter_loaded=loaded, repeat=repeat)
                    print(json.dumps(r), file=sys.stderr, flush=True)
                    results.append(r)
        finally:
            await plain.shutdown()
            await lora.shutdown()
    return results


def table(results: list[dict]) -> str:
    lines = ["| engine | adapter loaded | requests | out tok/s, each run | median | "
             "CPU s / 1k tokens (median) |", "|---|---|---|---|---|---|"]
    for backend, loaded, mode in dict.fromkeys(
            (r["backend"], r["adapter_loaded"], r["mode"]) for r in results):
        rows = [r for r in results if (r["backend"], r["adapter_loaded"], r["mode"]) == (
            backend, loaded, mode)]
        if rows:
            rates = [r["tok_per_s"] for r in rows]
            cpu = statistics.median(r["cpu_s_per_1k_tokens"] for r in rows)
            lines.append(f"| {backend} | {'yes' if loaded else 'no'} | {mode} | "
                         f"{' / '.join(f'{x:.0f}' for x in rates)} | "
                         f"{statistics.median(rates):.0f} | "
                         f"{f'{cpu:.2f}' if backend == 'transformers' else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a PEFT LoRA directory")
    parser.add_argument("--llava", default="models/shapes/weights/llava")
    parser.add_argument("--backend", nargs="+", choices=("transformers", "vllm"),
                        default=["transformers", "vllm"])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("-n", type=int, default=64, help="requests per run")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="the engines' torch_threads (0: torch's default)")
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args(argv)
    results = asyncio.run(bench(args))
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
