"""CLI: `python -m models.shapes {train,train-lora,eval,eval-local,eval-lora}`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.shapes import WEIGHTS_DIR
from models.shapes.data import HELD_OUT_SEED, QUESTION_TYPES, make_samples

WEIGHTS = WEIGHTS_DIR


def _progress(name: str):
    def report(step: int, loss: float, elapsed: float) -> None:
        print(f"[{name}] step {step:5d}  loss {loss:.4f}  elapsed {elapsed:6.1f}s", flush=True)

    return report


def _report(title: str, acc: dict[str, float], minimum: float) -> bool:
    print(title)
    for qtype in QUESTION_TYPES:
        if qtype in acc:
            print(f"  {qtype:<10} {acc[qtype]:.3f}")
    ok = all(v >= minimum for v in acc.values())
    print(f"  {'PASS' if ok else 'FAIL'} (min {minimum})")
    return ok


def cmd_train(args: argparse.Namespace) -> int:
    from models.shapes.train import train_clip, train_llava

    out = Path(args.out)
    clip_dir = out / "clip"
    # CLIP first: LLaVA's vision tower starts from the trained CLIP tower, as in real LLaVA.
    if args.clip_steps > 0:
        r = train_clip(args.clip_steps, args.seed, clip_dir, progress=_progress("clip"))
        print(f"clip: {r.params} params, {r.seconds:.1f}s -> {r.out_dir}")
    if args.steps > 0:
        vision_from = clip_dir if (clip_dir / "config.json").is_file() else None
        if vision_from is None:
            print(f"no CLIP checkpoint in {clip_dir}: LLaVA's vision tower starts from scratch")
        r = train_llava(
            args.steps,
            args.seed,
            out / "llava",
            progress=_progress("llava"),
            vision_from=vision_from,
        )
        print(f"llava: {r.params} params, {r.seconds:.1f}s -> {r.out_dir}")
    return 0


def add_train_lora_args(p: argparse.ArgumentParser) -> None:
    """Options of `train-lora`, shared with `python -m models train-lora` (whose other commands
    should not pay for importing torch: hence no models.shapes.lora import here)."""
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default=str(WEIGHTS / "llava"), help="base LLaVA directory")
    p.add_argument("--out", default=str(WEIGHTS / "lora-terse"),
                   help="PEFT adapter directory to write")
    p.set_defaults(func=cmd_train_lora)


def cmd_train_lora(args: argparse.Namespace) -> int:
    from models.shapes.lora import train_lora

    r = train_lora(args.steps, args.seed, args.out, base_dir=args.base, rank=args.rank,
                   progress=_progress("lora"))
    print(f"lora: {r.params} adapter params, {r.seconds:.1f}s -> {r.out_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import httpx

    from models.shapes.evaluate import service_accuracy, service_retrieval_top1

    samples = make_samples(args.n, args.seed)
    ok = True
    try:
        if not args.embed_only:
            acc = service_accuracy(args.url, samples, args.concurrency, args.route)
            ok = _report(f"{args.url} ({args.route}), {args.n} samples", acc, args.min)
        if args.embed or args.embed_only:
            top1 = service_retrieval_top1(args.url, samples)
            print(f"  retrieval top-1 {top1:.3f}")
            ok = ok and top1 >= args.min
    except httpx.HTTPError as exc:
        print(f"request to {args.url} failed: {exc!r}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def cmd_eval_local(args: argparse.Namespace) -> int:
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    from models.shapes.evaluate import clip_retrieval_top1, llava_accuracy

    samples = make_samples(args.n, args.seed)
    weights = Path(args.weights)
    model = LlavaForConditionalGeneration.from_pretrained(weights / "llava")
    acc = llava_accuracy(model, AutoProcessor.from_pretrained(weights / "llava"), samples)
    ok = _report(f"llava {weights / 'llava'}, {args.n} samples", acc, args.min)
    clip = CLIPModel.from_pretrained(weights / "clip")
    top1 = clip_retrieval_top1(clip, AutoProcessor.from_pretrained(weights / "clip"), samples)
    print(f"clip {weights / 'clip'}: retrieval top-1 {top1:.3f}")
    return 0 if ok and top1 >= args.min else 1


def cmd_eval_lora(args: argparse.Namespace) -> int:
    from models.shapes.evaluate import llava_accuracy
    from models.shapes.lora import FORM, load_with_adapter

    model, processor = load_with_adapter(args.adapter, args.base)
    acc = llava_accuracy(model, processor, make_samples(args.n, args.seed, form=FORM))
    ok = _report(f"adapter {args.adapter} ({FORM} form), {args.n} samples", acc, args.min)
    with model.disable_adapter():  # the same images and questions, base form expected
        acc = llava_accuracy(model, processor, make_samples(args.n, args.seed))
    ok = _report(f"adapter disabled: base {args.base} (base form)", acc, args.min) and ok
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.shapes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train both models and save them")
    train.add_argument("--steps", type=int, default=3000, help="LLaVA steps (0 skips)")
    train.add_argument("--clip-steps", type=int, default=1200, help="CLIP steps (0 skips)")
    train.add_argument("--out", default=str(WEIGHTS))
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)

    add_train_lora_args(sub.add_parser("train-lora", help="train the LoRA adapter (terse form)"))

    for name, func, help_ in (
        ("eval", cmd_eval, "accuracy of a running server"),
        ("eval-local", cmd_eval_local, "in-process accuracy of saved weights"),
        ("eval-lora", cmd_eval_lora, "in-process accuracy of the adapter and of its base"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--n", type=int, default=200, help="held-out samples")
        p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
        p.add_argument("--min", type=float, default=0.98, help="fail below this accuracy")
        p.set_defaults(func=func)
    evaluate = sub.choices["eval"]
    evaluate.add_argument("--url", default="http://127.0.0.1:3000")
    evaluate.add_argument("--route", choices=("native", "openai"), default="native")
    evaluate.add_argument("--concurrency", type=int, default=16)
    evaluate.add_argument("--embed", action="store_true", help="also check /embed retrieval")
    evaluate.add_argument("--embed-only", action="store_true", help="only check /embed")
    sub.choices["eval-local"].add_argument("--weights", default=str(WEIGHTS))
    eval_lora = sub.choices["eval-lora"]
    eval_lora.add_argument("--adapter", default=str(WEIGHTS / "lora-terse"))
    eval_lora.add_argument("--base", default=str(WEIGHTS / "llava"))

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
