"""Model store commands.

    python -m models build                 # the default shapes models (offline)
    python -m models build-bench           # a random-weight bench-size LLaVA (offline)
    python -m models import-hf ORG/NAME    # a Hugging Face checkpoint (needs the hub)
    python -m models import-hf DIR         # a local checkpoint directory
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.store import save_to_store

WEIGHTS = Path(__file__).parent / "shapes" / "weights"
# build-bench options, one per BenchSize field (models/bench.py), with the bench model's sizes
BENCH_SIZE_OPTIONS = ("hidden", "layers", "intermediate", "vision_hidden", "vision_layers",
                      "vision_intermediate", "image_size", "patch_size", "max_positions")
DEFAULTS = {
    "lmm-shapes-llava": ("llava", "LLaVA (CLIP tower + Llama) trained on synthetic shapes"),
    "lmm-shapes-clip": ("clip", "CLIP trained contrastively on synthetic shapes"),
}


def build(args: argparse.Namespace) -> int:
    for name, (folder, what) in DEFAULTS.items():
        print(f"[models] {name}: {what} ...", flush=True)
        model = save_to_store(
            name, Path(args.weights) / folder,
            labels={"source": "bento-lmm/models/shapes", "trained": "synthetic-shapes",
                    "role": folder},
            metadata={"source": f"models/shapes/weights/{folder}", "description": what},
        )
        print(f"[models]   {model.tag}  {model.path}", flush=True)
    return 0


def build_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import tempfile

    from models.bench import BenchSize, save_bench_llava

    size = BenchSize(**{field: getattr(args, field) for field in BENCH_SIZE_OPTIONS})
    what = "LLaVA (CLIP tower + Llama) with random weights, for benchmarks"
    print(f"[models] {args.name}: {what} ...", flush=True)

    def progress(line: str) -> None:
        print(f"[models]   {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="lmm-bench-") as scratch:
        out = Path(args.out) if args.out else Path(scratch) / "llava"
        counts = save_bench_llava(out, size, args.seed, progress)
        progress("storing ...")
        model = save_to_store(
            args.name, out,
            labels={"source": "bento-lmm/models/bench", "trained": "no", "weights": "random",
                    "role": "llava"},
            metadata={"source": "models/bench.py", "description": what, "seed": args.seed,
                      "sizes": dataclasses.asdict(size), "parameters": counts},
        )
    print(f"[models]   {model.tag}  {model.path}", flush=True)
    return 0


def import_hf(args: argparse.Namespace) -> int:
    from models.hub import import_checkpoint

    return import_checkpoint(args.model_id, args.name, args.revision)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[models] %(message)s")
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="put the default models into the store")
    b.add_argument("--weights", default=str(WEIGHTS), help="folder with llava/ and clip/")
    b.set_defaults(func=build)
    bb = sub.add_parser(
        "build-bench", help="put a random-weight bench-size LLaVA into the store",
        description="A seeded random-weight LLaVA (Llama + CLIP tower, heads of 64) with the "
        "shapes tokenizer and chat template; the defaults are the bench model (~100 M-parameter "
        "Llama, ViT-B/16 tower at 224 px). Smaller sizes build a reduced variant.")
    from models.bench import STORE_NAME, BenchSize

    defaults = BenchSize()
    for field in BENCH_SIZE_OPTIONS:
        bb.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(defaults, field),
                        help=f"default {getattr(defaults, field)}")
    bb.add_argument("--seed", type=int, default=0, help="weight initialization seed")
    bb.add_argument("--name", default=STORE_NAME, help=f"store name (default {STORE_NAME})")
    bb.add_argument("--out", help="also keep the saved checkpoint directory here")
    bb.set_defaults(func=build_bench)
    hf = sub.add_parser("import-hf", help="import a Hugging Face checkpoint into the store")
    hf.add_argument("model_id", help="a hub id (e.g. llava-hf/llava-1.5-7b-hf) or a local "
                    "checkpoint directory (what from_pretrained reads)")
    hf.add_argument("--name", help="store name (default: derived from the id)")
    hf.add_argument("--revision", default="main")
    hf.set_defaults(func=import_hf)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
