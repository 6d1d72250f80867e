"""Model store commands.

    python -m models build                 # the default shapes models (offline)
    python -m models build-bench           # a random-weight bench-size LLaVA and CLIP (offline)
    python -m models import-hf ORG/NAME    # a Hugging Face checkpoint (needs the hub)
    python -m models import-hf DIR         # a local checkpoint directory
    python -m models train-lora            # retrain the shipped LoRA adapter (shapes/weights)
    python -m models import-adapter PATH --base TAG   # a PEFT LoRA directory, beside its base
    python -m models import-adapter --hub ORG/NAME --base TAG   # one from the hub
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.store import AdapterError, save_adapter_to_store, save_to_store

WEIGHTS = Path(__file__).parent / "shapes" / "weights"
# build-bench options, one per BenchSize field (models/bench.py), with the bench model's sizes
BENCH_SIZE_OPTIONS = ("hidden", "layers", "intermediate", "vision_hidden", "vision_layers",
                      "vision_intermediate", "image_size", "patch_size", "max_positions")
DEFAULTS = {
    "lmm-shapes-llava": ("llava", "LLaVA (CLIP tower + Llama) trained on synthetic shapes"),
    "lmm-shapes-clip": ("clip", "CLIP trained contrastively on synthetic shapes"),
}
# The shipped LoRA adapter over lmm-shapes-llava: store name -> (folder, answer form, description)
ADAPTERS = {
    "lmm-shapes-llava-terse": (
        "lora-terse", "terse",
        'LoRA (rank 8) on the shapes LLaVA\'s language model: terse answers ("circle red left")'),
}


def build(args: argparse.Namespace) -> int:
    stored: dict[str, str] = {}
    for name, (folder, what) in DEFAULTS.items():
        print(f"[models] {name}: {what} ...", flush=True)
        model = save_to_store(
            name, Path(args.weights) / folder,
            labels={"source": "bento-lmm/models/shapes", "trained": "synthetic-shapes",
                    "role": folder},
            metadata={"source": f"models/shapes/weights/{folder}", "description": what},
        )
        print(f"[models]   {model.tag}  {model.path}", flush=True)
        stored[name] = str(model.tag)
    for name, (folder, form, what) in ADAPTERS.items():
        directory = Path(args.weights) / folder
        if not (directory / "adapter_config.json").is_file():
            print(f"[models] {name}: no adapter in {directory}, skipped", flush=True)
            continue
        print(f"[models] {name}: {what} ...", flush=True)
        model = save_adapter_to_store(
            directory, stored["lmm-shapes-llava"], name,
            labels={"source": "bento-lmm/models/shapes", "trained": "synthetic-shapes",
                    "answer_form": form},
            metadata={"source": f"models/shapes/weights/{folder}", "description": what,
                      "answer_form": form},
        )
        print(f"[models]   {model.tag}  {model.path}", flush=True)
    return 0


def build_bench(args: argparse.Namespace) -> int:
    import dataclasses
    import tempfile

    from models.bench import BenchSize, save_bench_clip, save_bench_llava

    size = BenchSize(**{field: getattr(args, field) for field in BENCH_SIZE_OPTIONS})

    def progress(line: str) -> None:
        print(f"[models]   {line}", flush=True)

    def store(name: str, path: Path, role: str, what: str, parameters) -> None:
        progress("storing ...")
        model = save_to_store(
            name, path,
            labels={"source": "bento-lmm/models/bench", "trained": "no", "weights": "random",
                    "role": role},
            metadata={"source": "models/bench.py", "description": what, "seed": args.seed,
                      "sizes": dataclasses.asdict(size), "parameters": parameters},
        )
        progress(f"{model.tag}  {model.path}")

    what = "LLaVA (CLIP tower + Llama) with random weights, for benchmarks"
    print(f"[models] {args.name}: {what} ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="lmm-bench-") as scratch:
        out = Path(args.out) if args.out else Path(scratch) / "llava"
        store(args.name, out, "llava", what, save_bench_llava(out, size, args.seed, progress))
    if args.clip_name:
        what = "CLIP (the bench LLaVA's tower sizes, a small text tower) with random weights"
        print(f"[models] {args.clip_name}: {what} ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="lmm-bench-clip-") as scratch:
            parameters = save_bench_clip(Path(scratch), size, args.seed)
            progress(f"parameters: {parameters:,}")
            store(args.clip_name, Path(scratch), "clip", what, parameters)
    return 0


def import_hf(args: argparse.Namespace) -> int:
    from models.hub import import_checkpoint

    return import_checkpoint(args.model_id, args.name, args.revision)


def import_adapter(args: argparse.Namespace) -> int:
    import tempfile

    if (args.path is None) == (args.hub is None):
        print("[models] error: give either a local adapter directory (PATH) or --hub ORG/NAME",
              flush=True)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.path) if args.path else None
        labels = {"source": "local"}
        if args.hub:
            from models.hub import HubUnreachable, download

            print(f"[models] downloading {args.hub}@{args.revision} ...", flush=True)
            try:
                directory = download(args.hub, args.revision, Path(tmp) / args.hub.split("/")[-1])
            except HubUnreachable as exc:
                print(f"[models] error: {exc}", flush=True)
                return 2
            labels = {"source": "huggingface", "hf_id": args.hub}
        try:
            model = save_adapter_to_store(directory, args.base, args.name, labels=labels)
        except AdapterError as exc:
            print(f"[models] error: {exc}", flush=True)
            return 2
    print(f"[models] {model.tag}  (LoRA over {model.info.labels['base_model']})", flush=True)
    return 0


def train_lora(args: argparse.Namespace) -> int:
    from models.shapes.__main__ import cmd_train_lora

    return cmd_train_lora(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[models] %(message)s")
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="put the default models into the store")
    b.add_argument("--weights", default=str(WEIGHTS), help="folder with llava/ and clip/")
    b.set_defaults(func=build)
    bb = sub.add_parser(
        "build-bench", help="put a random-weight bench-size LLaVA (and CLIP) into the store",
        description="A seeded random-weight LLaVA (Llama + CLIP tower, heads of 64) with the "
        "shapes tokenizer and chat template; the defaults are the bench model (~100 M-parameter "
        "Llama, ViT-B/16 tower at 224 px). Smaller sizes build a reduced variant.")
    from models.bench import CLIP_STORE_NAME, STORE_NAME, BenchSize

    defaults = BenchSize()
    for field in BENCH_SIZE_OPTIONS:
        bb.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(defaults, field),
                        help=f"default {getattr(defaults, field)}")
    bb.add_argument("--seed", type=int, default=0, help="weight initialization seed")
    bb.add_argument("--name", default=STORE_NAME, help=f"store name (default {STORE_NAME})")
    bb.add_argument("--out", help="also keep the saved checkpoint directory here")
    bb.add_argument("--clip-name", default=CLIP_STORE_NAME,
                    help=f"store name of the bench CLIP built beside it, with the same tower "
                    f"sizes (default {CLIP_STORE_NAME}; empty: none)")
    bb.set_defaults(func=build_bench)
    hf = sub.add_parser("import-hf", help="import a Hugging Face checkpoint into the store")
    hf.add_argument("model_id", help="a hub id (e.g. llava-hf/llava-1.5-7b-hf) or a local "
                    "checkpoint directory (what from_pretrained reads)")
    hf.add_argument("--name", help="store name (default: derived from the id)")
    hf.add_argument("--revision", default="main")
    hf.set_defaults(func=import_hf)
    ad = sub.add_parser(
        "import-adapter", help="import a PEFT LoRA adapter into the store, beside its base",
        description="Store a PEFT LoRA directory (adapter_config.json + "
        "adapter_model.safetensors) as a model labelled role=lora with its base model's tag. "
        "Refused unless every adapted module exists in the base's language model with the same "
        "shape.")
    ad.add_argument("path", nargs="?", help="local adapter directory")
    ad.add_argument("--hub", help="Hugging Face adapter id instead of PATH (needs the hub)")
    ad.add_argument("--revision", default="main", help="hub revision (with --hub)")
    ad.add_argument("--base", required=True, help="base model tag in the store, e.g. "
                    "lmm-shapes-llava or lmm-shapes-llava:<version>")
    ad.add_argument("--name", help="store name (default: BASE-<directory name without lora->)")
    ad.set_defaults(func=import_adapter)
    from models.shapes.__main__ import add_train_lora_args

    tl = sub.add_parser("train-lora", help="train the shapes LoRA adapter (terse answers)",
                        description="Same as `python -m models.shapes train-lora`.")
    add_train_lora_args(tl)
    tl.set_defaults(func=train_lora)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
