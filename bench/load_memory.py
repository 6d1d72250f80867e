"""Peak memory while a runner loads its part of a LLaVA checkpoint, against loading it whole.

    python bench/load_memory.py                       # ~1.8 GB float16 model, cached in /tmp
    python bench/load_memory.py --json load_memory.json --layers 12 --dtype float16

Builds (offline, once; cached under the temp dir by its sizes) a random-weight LLaVA in the
llava-1.5 hub layout (``models/bench.py``): Llama hidden 2048, 12 layers, MLP 5504 (~0.6 B
parameters) beside a CLIP ViT-L/14-336-like tower (1024 wide, 24 layers, 576 patches), saved in
``--dtype``. Then, each case in a fresh interpreter, it loads and reports the process's peak
resident set (``ru_maxrss``: anonymous and file-backed pages, the safetensors mappings included)
and its resident set after the imports alone:

- ``vision``: ``LlavaVisionEncoder`` (lmm.loading, the vision runner's load);
- ``language``: ``TransformersEngine.load()`` (lmm.loading, the LLM runner's load);
- ``whole``: ``AutoModelForImageTextToText.from_pretrained``, what both runners did before.

Next to each: the bytes of the weights it materialises (elements x dtype size).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ("vision", "language", "whole")
DTYPES = ["float16", "bfloat16", "float32"]
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}

_CHILD = r"""
import json, sys
import psutil, torch
sys.path.insert(0, {root!r})
from lmm.encoders import LlavaVisionEncoder
from runners.engines.transformers_engine import TransformersEngine
from transformers import AutoModelForImageTextToText

case, path, dtype = sys.argv[1:4]
torch.set_num_threads(2)
imports = psutil.Process().memory_info().rss
if case == "vision":
    held = LlavaVisionEncoder(path, "cpu", dtype).model
elif case == "language":
    engine = TransformersEngine(path, "cpu", dtype)
    engine.load()
    held = engine.model
else:
    held = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
params = {{id(p): p for p in held.parameters()}}.values()
materialised = sum(p.numel() * p.element_size() for p in params if p.device.type != "meta")
loaded_rss = psutil.Process().memory_info().rss
with torch.no_grad():  # what the first forward does: every weight is read (mapped pages come in)
    for p in params:
        p.float().sum()


def hwm():  # this process's peak resident set (VmHWM is reset at exec; ru_maxrss is not)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024


print(json.dumps({{"case": case, "imports_rss": imports, "peak_rss": hwm(),
                  "loaded_rss": loaded_rss, "used_rss": psutil.Process().memory_info().rss,
                  "materialised_bytes": materialised}}))
"""


def build(out: Path, size, dtype: str) -> None:
    import torch

    from models.bench import build_bench_llava
    from models.shapes.train import to_llava_hf_layout

    model, processor = build_bench_llava(size)
    model = model.to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    del model
    to_llava_hf_layout(tmp)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> dict:
    from models.bench import BenchSize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--dtype", default="float16", choices=DTYPES,
                        help="the checkpoint's dtype (as stored)")
    parser.add_argument("--load-dtypes", nargs="+", default=["float16", "float32"], choices=DTYPES,
                        help="dtypes to load in: as stored, and float32 (dtype auto on CPU)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "lmm-load-memory")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args(argv)

    size = BenchSize(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                     vision_hidden=1024, vision_layers=24, vision_intermediate=4096,
                     image_size=336, patch_size=14)
    key = hashlib.sha256(json.dumps([dataclasses.asdict(size), args.dtype]).encode()).hexdigest()
    path = args.cache / key[:12]
    if not path.is_dir():
        print(f"building the model in {path} (once) ...", file=sys.stderr)
        path.parent.mkdir(parents=True, exist_ok=True)
        build(path, size, args.dtype)

    from lmm.loading import checkpoint_numel

    numel = checkpoint_numel(path)
    numel["whole"] = numel["vision"] + numel["language"]
    files = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    rows = []
    for load_dtype in args.load_dtypes:
        for case in CASES:
            out = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT)), case,
                                  str(path), load_dtype], capture_output=True, text=True,
                                 check=False)
            if out.returncode != 0:
                raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["dtype"] = load_dtype
            row["part_weight_bytes"] = numel[case] * ITEMSIZE[load_dtype]
            row["peak_over_imports"] = row["peak_rss"] - row["imports_rss"]
            rows.append(row)

    mib = lambda b: f"{b / 2**20:,.0f}"
    print(f"model: {path} ({mib(files)} MiB of safetensors, {args.dtype}, llava-1.5 layout; "
          f"vision {numel['vision']:,} + language {numel['language']:,} parameters)")
    print(f"{'case':<10}{'dtype':<9}{'weights':>9}{'peak RSS':>10}{'imports':>9}"
          f"{'peak-imports':>14}{'RSS in use':>12}   (MiB)")
    for r in rows:
        print(f"{r['case']:<10}{r['dtype']:<9}{mib(r['part_weight_bytes']):>9}"
              f"{mib(r['peak_rss']):>10}{mib(r['imports_rss']):>9}"
              f"{mib(r['peak_over_imports']):>14}{mib(r['used_rss']):>12}")
    result = {"model": str(path), "stored_dtype": args.dtype, "safetensors_bytes": files,
              "parameters": numel, "size": dataclasses.asdict(size), "cases": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
