"""Model store commands.

    python -m models build                 # the default shapes models (offline)
    python -m models import-hf ORG/NAME    # a Hugging Face checkpoint (needs the hub)
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.store import save_to_store

WEIGHTS = Path(__file__).parent / "shapes" / "weights"
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
    hf = sub.add_parser("import-hf", help="import a Hugging Face checkpoint into the store")
    hf.add_argument("model_id", help="e.g. llava-hf/llava-1.5-7b-hf")
    hf.add_argument("--name", help="store name (default: derived from the id)")
    hf.add_argument("--revision", default="main")
    hf.set_defaults(func=import_hf)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
