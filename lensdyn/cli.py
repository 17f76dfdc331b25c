"""The ``lensdyn`` command.

    lensdyn models                                   list embedded models and how to install them
    lensdyn norms --model smollm2-135m --prompts diverse --out reports/norms

Exit status: 0 on success, 2 on bad input (with a one-line reason on stderr).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from lensdyn.errors import LensdynError

EPILOG = """examples:
  lensdyn models
  lensdyn norms --model smollm2-135m --prompts diverse --out reports/norms
  lensdyn norms --model minilm-l6 --prompts my_texts/ --exclude special --control none --out reports/bert

Prompts are a built-in set (diverse, repeated), a .txt file (one prompt), a .jsonl file
(one {"text": ...} per line) or a directory of .txt files. Models are the embedded names shown
by `lensdyn models`, a local Hugging Face checkpoint directory, or a hub id (needs the hub).
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except LensdynError as err:
        print(f"lensdyn: error: {err}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lensdyn",
        description="Measure how token representations move through a transformer, layer by layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(command=None)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    models = sub.add_parser("models", help="list the embedded offline models and whether each is installed")
    models.set_defaults(command="models", run=_models)

    norms = sub.add_parser(
        "norms",
        help="per-layer residual-stream norms: JSON + self-contained HTML",
        description="Per-layer residual-stream norms of a model (and its untrained control) on a prompt set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_run_options(norms)
    norms.set_defaults(command="norms", run=_norms)
    return parser


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from lensdyn.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, local checkpoint dir, or hub id")
    p.add_argument("--prompts", default="diverse", help="built-in set name, .txt/.jsonl file, or directory of .txt")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained")
    p.add_argument(
        "--control", choices=("random", "none"), default="random",
        help="also measure the same architecture with random weights, side by side",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random weights")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--exclude", nargs="*", default=["first"], choices=("first", "bos", "special"),
        help="positions left out of aggregates (none: pass --exclude with no value)",
    )
    p.add_argument("--truncate", action="store_true", help="cut prompts longer than the context instead of failing")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")


def _models(args) -> int:
    from lensdyn.models import available_models

    rows = available_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        status = "installed" if r["installed"] else f"not installed ({r['install']})"
        default = " [default]" if r["default"] else ""
        print(f"{r['name']:<{width}}  {status}{default}\n{'':<{width}}  {r['description']}")
    return 0


def _norms(args) -> int:
    import torch

    from lensdyn.analyses import norms
    from lensdyn.hooks.capture import capture
    from lensdyn.models import load_model
    from lensdyn.prompts import resolve_prompts
    from lensdyn.report import Section, write_html

    torch.set_num_threads(os.cpu_count() or 1)
    prompts = resolve_prompts(args.prompts, allow_literal=False)
    runs = [("model", args.weights)] + ([("control", "random")] if args.control == "random" and args.weights != "random" else [])
    results = {}
    for role, weights in runs:
        started = time.perf_counter()
        model = load_model(args.model, weights=weights, seed=args.seed, device=args.device)
        cap = capture(
            model, prompts, exclude=tuple(args.exclude), batch_size=args.batch_size,
            streams=("resid",), truncate=args.truncate, progress=True,
        )
        results[role] = norms.measure(cap)
        print(f"{role}: {args.model} ({weights}) measured in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        del model, cap

    args.out.mkdir(parents=True, exist_ok=True)
    written = [results["model"].to_json(args.out / "norms.json")]
    if "control" in results:
        written.append(results["control"].to_json(args.out / "norms_control.json"))
    text = "\n\n".join(r.summary() for r in results.values())
    written.append(
        write_html(
            args.out / "norms.html",
            title=f"lensdyn: residual norms of {args.model}",
            subtitle=f"prompts {prompts.name!r} ({len(prompts)}), excluded positions {args.exclude}, raw weights",
            sections=[Section(
                f"{args.model}" + (" beside its untrained control" if "control" in results else ""),
                results["model"].figure(control=results.get("control")),
                text,
            )],
        )
    )
    print(results["model"].summary())
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
