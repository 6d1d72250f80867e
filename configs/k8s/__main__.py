"""Render the Kubernetes manifests of a Bento.

    python -m configs.k8s --bento bento-lmm:VERSION --config configs/default.yaml --out DIR
    python -m configs.k8s --examples        # rewrite configs/k8s/rendered (the checked-in examples)

Apply with `kubectl apply -f DIR` after creating the API key Secret:
    kubectl create secret generic bento-lmm-api-key --from-literal=api-key=...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from configs.k8s import (
    DEFAULT_MAX_REPLICAS,
    EXAMPLE_BENTO,
    EXAMPLE_CONFIG,
    EXAMPLE_DIR,
    load_config,
    render,
    write,
)

ROOT = Path(__file__).resolve().parents[2]


def _counts(pairs: list[str], flag: str) -> dict[str, int]:
    counts = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not value.isdigit() or int(value) < 1:
            raise SystemExit(f"{flag} wants SERVICE=N with N >= 1, got {pair!r}")
        counts[name] = int(value)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m configs.k8s",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bento", help="Bento tag NAME:VERSION (the image tag is the version)")
    parser.add_argument(
        "--config",
        default="configs/default.yaml",
        help="deployment config (the same YAML as `--arg-file`)",
    )
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument(
        "--image",
        help="image reference (default: localhost/NAME:VERSION, as "
        "scripts/image.sh tags it; use your registry's)",
    )
    parser.add_argument("--namespace", help="metadata.namespace (default: none, kubectl's -n)")
    parser.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help="replicas and HPA minimum (default 1) of one BentoML service of the Bento, by name "
        "(lmm-api, ...)",
    )
    parser.add_argument(
        "--max-replicas",
        action="append",
        default=[],
        metavar="SERVICE=N",
        help=f"HPA maximum (default {DEFAULT_MAX_REPLICAS})",
    )
    parser.add_argument(
        "--examples",
        action="store_true",
        help=f"render {EXAMPLE_BENTO} with {EXAMPLE_CONFIG} into {EXAMPLE_DIR}",
    )
    args = parser.parse_args(argv)

    if args.examples:
        args.bento, args.config, args.out = EXAMPLE_BENTO, str(ROOT / EXAMPLE_CONFIG), EXAMPLE_DIR
        command = "--examples"
    elif not args.bento or not args.out:
        parser.error("--bento and --out are required (or --examples)")
    else:
        command = " ".join(sys.argv[1:] if argv is None else argv)
    config, text = load_config(args.config)
    try:
        files = render(
            config,
            text,
            args.bento,
            image=args.image,
            namespace=args.namespace,
            replicas=_counts(args.replicas, "--replicas"),
            max_replicas=_counts(args.max_replicas, "--max-replicas"),
        )
    except ValueError as exc:
        parser.error(str(exc))
    for path in write(files, args.out, command):
        print(f"[k8s] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
