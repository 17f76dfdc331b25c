"""The ``lensdyn`` command.

    lensdyn models                                   list embedded models and how to install them
    lensdyn report --model smollm2-135m --prompts diverse --out reports/demo
        verdict table + every default analysis, beside the untrained control (--compare MODEL: beside
        another model; --json-only: no HTML; --static png svg: figures as images too)
    lensdyn corpus --prompts my_corpus/ --out reports/corpus [--shard i/n]   streamed statistics, resumable
    lensdyn merge reports/corpus/shard-*.json --out reports/corpus          shards -> the single-run result
    lensdyn norms | expansion | ... --model ... --out DIR   one analysis: one command per analysis of the registry
        (lensdyn.analyses.registry), its options those of the analysis's parameters

Exit status: 0 on success, 2 on bad input (with a one-line reason on stderr), 130 when interrupted.
What can be checked without the model (options, --out, --prompts, --device) is checked before it
loads; what needs its tokenizer or depth (prompts too short, steering targets, block numbers) right
after, before any forward pass.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from lensdyn.analyses import registry
from lensdyn.app import parsing
from lensdyn.app.parsing import HelpFormatter, Values
from lensdyn.app.report import STATIC_SCALE
from lensdyn.app.run import CHECKPOINT_SECONDS, CONTROL_SEEDS
from lensdyn.errors import ArgumentError, LensdynError, PromptError, UnsupportedArchitectureError
from lensdyn.verdicts import N_BOOTSTRAP

EPILOG = """examples:
  lensdyn models
  lensdyn report --model smollm2-135m --prompts diverse --out reports/demo
  lensdyn expansion --model smollm2-135m --prompts diverse --fit-space linear --out reports/expansion
  lensdyn gains --model smollm2-135m --reference resid --tokens last --out reports/gains
  lensdyn norms --model smollm2-135m --prompts diverse --out reports/norms
  lensdyn steering --model smollm2-135m --contrast sentiment --transfer-layers 0 6 12 18 24 29 --out reports/steering
  lensdyn norms --model minilm-l6 --prompts my_texts/ --exclude special --control none --out reports/bert

Prompts are a built-in set (diverse, varied, repeated), a .txt file (one prompt), a .jsonl
file (one {"text": ...} per line) or a directory of .txt files. Models are the embedded names shown
by `lensdyn models`, a local Hugging Face checkpoint directory, or a hub id (needs the hub).
List options take space-separated values (--analyses norms gains, --exclude first bos); where an
empty list means something, `none` gives it (--exclude none).
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Help and --version read the analyses' options from a cache: no torch imported (lensdyn.app.parsing).
    quick = not argv or any(a in ("-h", "--help", "--version") for a in argv)
    parser = _parser(parsing.option_table(cached=quick))
    args = parser.parse_args(_joined_values(argv))
    if args.command is None:
        parser.print_help()
        return 2
    from lensdyn.progress import set_quiet

    set_quiet(args.quiet)
    args.stdout = sys.stdout  # --quiet: where the main file's path goes, while what else the libraries print is dropped
    try:
        with contextlib.redirect_stdout(io.StringIO()) if args.quiet else contextlib.nullcontext():
            return args.run(args)
    except LensdynError as err:
        return _fail(str(err))
    except OSError as err:
        # A file read or written after the up-front checks passed: a disk that filled, a directory removed meanwhile.
        return _fail(_os_reason(err))
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        chunk = " and --chunk" if args.command == "corpus" else ""
        return _fail(f"out of memory ({type(err).__name__}): lower --batch-size{chunk}, or use a smaller --dtype or "
                     "another --device")
    except KeyboardInterrupt:
        resume = ": run the same command again to resume" if args.command == "corpus" else ""
        print(f"lensdyn: interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        set_quiet(False)


def _joined_values(argv: list[str]) -> list[str]:
    """``--shard -1/2`` as ``--shard=-1/2``: argparse takes a value that starts with ``-`` (and is not a plain
    number) for an option, and would say ``--shard`` has no value instead of what is wrong with it."""
    out = []
    for arg in argv:
        if out and out[-1] == "--shard" and arg.startswith("-") and arg[1:2].isdigit():
            out[-1] = f"--shard={arg}"
        else:
            out.append(arg)
    return out


def _fail(reason: str) -> int:
    # One line whatever the message holds (a hub error quoted inside one spans several).
    print("lensdyn: error: " + " ".join(line.strip() for line in reason.splitlines() if line.strip()), file=sys.stderr)
    return 2


def _os_reason(err: OSError) -> str:
    if err.filename is None:
        return str(err)
    return f"{err.filename}: {err.strerror or err}"


def _out_of_memory(err: BaseException) -> bool:
    # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class) is a RuntimeError.
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are the CLI's one line (exit 2), pointing to the command's --help for the usage."""

    def error(self, message: str):
        given = re.search(r"invalid [\w ]+?: '([^']*)'", message)
        if given and "," in given.group(1):  # a comma-separated list
            message += "; list options take space-separated values (e.g. --exclude first bos)"
        self.exit(2, f"lensdyn: error: {message} (see {self.prog} --help)\n")


def _writes(*files: str) -> str:
    """A command's epilog: the files it writes into --out."""
    return "writes into OUT: " + "; ".join(files)


def _parser(table: dict | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``table``: the analyses' options (``parsing.option_table``; default: the registry's)."""
    table = parsing.option_table() if table is None else table
    defaults = ",".join(a["name"] for a in table["analyses"] if not a["opt_in"])
    names = ", ".join(a["name"] for a in table["analyses"])
    parser = _Parser(
        prog="lensdyn",
        description="Measure how token representations move through a transformer, layer by layer.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.set_defaults(command=None)
    parser.add_argument("--version", action="version", version=_versions(),
                        help="print the versions of lensdyn, torch, transformers and transformer-lens, and exit")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    def command(name: str, quiet: bool = True, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, formatter_class=HelpFormatter, **kwargs)
        if quiet:  # every command that measures or writes
            p.add_argument("--quiet", action="store_true",
                           help="no progress and no summaries: only errors and the path of the main file written")
        return p

    models = command("models", quiet=False, help="list the embedded offline models (or --check one checkpoint)",
                     description="List the embedded offline models, or check that a model opens in lensdyn: "
                     "its block layout, the self-test of its hook points, and the analyses it supports.")
    models.add_argument("--check", metavar="PATH_OR_ID", help="an embedded name, a checkpoint directory or a hub id to check")
    models.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                        help="check the checkpoint's weights or a random initialisation of its architecture")
    models.set_defaults(command="models", run=_models, quiet=False)  # what it prints is what it is for

    report = command(
        "report",
        help="every analysis from one capture per model: one JSON per analysis + report.html",
        description="Run several analyses on a model (and its untrained control) from one forward pass per batch.",
        epilog=_writes("ANALYSIS.json per analysis (ANALYSIS_reference.json: its reference run, where kept apart)",
                       "report.html (not with --json-only)", "report.json (verdicts, seeds, weights, timings, files)",
                       "figures/ANALYSIS.png|svg with --static"),
    )
    _add_run_options(report, table)
    report.add_argument("--analyses", action=Values, type=str, default=defaults.split(","), metavar="ANALYSIS",
                        help=f"the analyses to run, of {names}")
    report.set_defaults(command="report", run=_report)

    corpus = command(
        "corpus", help="stream a corpus through the model: per-layer statistics in float64 accumulators, resumable, sharded",
        description="Corpus-scale statistics (lensdyn.app.corpus): resumable; --shard i/n writes one shard, `lensdyn merge` "
        "combines them into what a single run gives.",
        epilog=_writes("shard-I-of-N.json (the shard's record, resumable)", "corpus.json and corpus.html (one shard: "
                       "at once; several: by lensdyn merge)", "metastability_subsample.json (shard 0, --subsample)"),
    )
    corpus.add_argument("--model", default=table["default_model"], help="embedded name, local checkpoint dir, or hub id")
    corpus.add_argument("--prompts", required=True, help="built-in set, .txt/.jsonl file, or directory of .txt files")
    corpus.add_argument("--out", required=True, type=Path, help="directory for shard records and the result")
    corpus.add_argument("--shard", default="0/1", help="i/n: this process takes prompts i, i+n, i+2n, ...")
    corpus.add_argument("--chunk", type=int, default=16, help="prompts per capture (peak memory grows with it)")
    corpus.add_argument("--checkpoint-every", type=float, default=CHECKPOINT_SECONDS, metavar="SECONDS",
                        help="write the record and accumulators after the chunk that ends this long after the last "
                             "write, and at the end; a stopped run resumes from its last write (0: every chunk)")
    corpus.add_argument("--batch-size", type=int, default=8,
                        help="prompts per forward pass; 1 makes every shard's activations identical to a single run's")
    corpus.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                        help="the checkpoint's weights or a random initialisation of its architecture (under --seed)")
    corpus.add_argument("--seed", type=int, default=0, help="seed of random weights")
    corpus.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="forward-pass dtype (statistics are float64 whatever it is)")
    corpus.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")
    _add_exclude(corpus, table)
    corpus.add_argument("--truncate", action="store_true", help="cut prompts longer than the context instead of failing")
    corpus.add_argument("--restart", action="store_true", help="ignore this shard's saved progress and start again")
    corpus.add_argument("--subsample", type=int, default=32,
                        help="prompts (seeded draw) on which shard 0 also runs clustering and CKA, which need every "
                        "token at once (0: none)")
    corpus.add_argument("--skip-short", action="store_true",
                        help="leave out prompts with fewer than 2 tokens after --exclude (recorded) instead of failing")
    corpus.add_argument("--covariance-states", action=Values, type=int, default=None, metavar="L",
                        help="the states whose residual covariance is accumulated, e.g. 0 8 16 (default: every state)")
    corpus.add_argument("--covariance-sketch", type=int, default=None, metavar="ELL",
                        help="a Frequent Directions sketch of ELL rows per state instead of the exact covariance "
                        "(memory states x ELL x d_model; top eigenvalues with a stated error bound)")
    corpus.add_argument("--distributed", action="store_true",
                        help="one rank of a torchrun job (implied by WORLD_SIZE > 1): rank r streams shard r/world, "
                        "the ranks reduce with torch.distributed, rank 0 writes the result")
    _add_threads_option(corpus)
    corpus.set_defaults(command="corpus", run=_corpus)

    merge = command("merge", help="merge corpus shards (their shard-*.json records) into one result",
                    description="Merge every shard of a `lensdyn corpus --shard i/n` run into corpus.json + corpus.html.",
                    epilog=_writes("corpus.json", "corpus.html"))
    merge.add_argument("records", nargs="+", type=Path, help="shard-i-of-n.json files (all n of them)")
    merge.add_argument("--out", required=True, type=Path, help="directory for corpus.json and corpus.html")
    merge.set_defaults(command="merge", run=_merge)

    study = command(
        "study", help="several models, each measured as `report` does: one claims x models table (study.json + study.html)",
        description="Measure each model and its untrained controls on one prompt set, one model at a time, and judge "
        "the claims per model and across models (H(l) invariance, last-MLP gain scaling, temperature response by "
        "attention type).", epilog=_writes("study.json", "study.html (not with --json-only)"))
    study.add_argument("--models", action=Values, required=True, metavar="MODEL",
                       help="embedded names, local checkpoint dirs or hub ids")
    study.add_argument("--prompts", default="diverse", help="built-in set name, .txt/.jsonl file, or directory of .txt")
    study.add_argument("--out", required=True, type=Path, help="output directory")
    study.add_argument("--control", choices=("random", "none"), default="random",
                       help="also measure each model's architecture with random weights")
    study.add_argument("--no-temperature", action="store_true",
                       help="skip the temperature sweep (the attention-type claim is then not testable)")
    study.add_argument("--json-only", action="store_true", help="write study.json only, no HTML")
    _add_measure_options(study, table)
    study.add_argument("--analyses", action=Values, type=str, default=defaults.split(","), metavar="ANALYSIS",
                       help=f"the analyses to run, of {names}")
    study.set_defaults(command="study", run=_study, weights="pretrained", compare=None, static=[])

    for analysis in table["analyses"]:  # each analysis's options go on its own command and on `report`
        name = analysis["name"]
        p = command(name, help=analysis["help"], description=analysis["help"],
                    epilog=_writes(f"{name}.json (the result)", f"{name}_reference.json (its reference run, where "
                                   "kept apart)", f"{name}.html (not with --json-only)",
                                   f"{name}_report.json (verdicts, seeds, weights, timings, files)",
                                   f"figures/{name}.png|svg with --static"))
        _add_run_options(p, table)
        p.set_defaults(command=name, run=_report, analyses=[name])
        _add_parameters(p, analysis)
        _add_parameters(report, analysis)
        _add_parameters(study, analysis)
    return parser


def _add_parameters(p: argparse.ArgumentParser, analysis: dict) -> None:
    """An analysis's options (``parsing.describe``) on ``p``, in a group named after it (how each reads:
    ``registry.option``).

    An option another analysis already put on ``p`` (``report`` holds every analysis's) is shared:
    one value for both, so the two declarations must agree (the contract test holds them to it).
    """
    group = p.add_argument_group(analysis["name"])
    taken = {action.dest: action for action in p._actions}
    for option in analysis["options"]:
        dest = option["flag"][2:].replace("-", "_")
        if dest in taken:
            taken[dest].help += f"; {analysis['name']}: {option['help']}"
            continue
        group.add_argument(option["flag"], dest=dest, default=option["default"], help=option["help"],
                           **parsing.argument(option["reading"]))


def _dest(f: dataclasses.Field) -> str:
    return registry.flag(f)[2:].replace("-", "_")


def _parameters(analysis, args):
    """``analysis.parameters`` as the command line gave them."""
    values = {f.name: getattr(args, _dest(f)) for f in dataclasses.fields(analysis.parameters)}
    return analysis.parameters(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _add_run_options(p: argparse.ArgumentParser, table: dict) -> None:
    p.add_argument("--model", default=table["default_model"], help="embedded name, local checkpoint dir, or hub id")
    p.add_argument("--prompts", action=Values, default=["diverse"], metavar="PROMPTS",
                   help="built-in set name, .txt/.jsonl file, or directory of .txt; several: the first is the report's, "
                   "and the verdict table shows whether the others agree")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                   help="the checkpoint's weights or a random initialisation of its architecture")
    p.add_argument(
        "--control", choices=("random", "none"), default="random",
        help="also measure the same architecture with random weights, side by side",
    )
    p.add_argument("--compare", default=None, metavar="MODEL",
                   help="measure a second (pretrained) model instead of the control and put it beside the first everywhere")
    p.add_argument("--json-only", action="store_true", help="write the JSON files only, no HTML")
    p.add_argument("--static", action=Values, empty=True, default=[], metavar="FORMAT",
                   help="also export every figure as png and/or svg into OUT/figures (needs kaleido and a Chromium)")
    p.add_argument("--static-scale", type=float, default=STATIC_SCALE, metavar="SCALE",
                   help="device pixels per layout pixel of a --static png, each figure at its own layout size "
                   "(2: 192 DPI when printed at that size)")
    _add_measure_options(p, table)


def _add_measure_options(p: argparse.ArgumentParser, table: dict) -> None:
    """How each model is measured and judged: the options ``report`` and ``study`` share."""
    p.add_argument("--seed", type=int, default=0, help="seed of the nulls and of the verdicts' bootstrap")
    p.add_argument("--control-seeds", action=Values, type=int, default=list(CONTROL_SEEDS), metavar="SEED",
                   help="one untrained control per seed (random weights); the first is drawn in the figures")
    p.add_argument("--bootstrap", type=int, default=N_BOOTSTRAP, metavar="N",
                   help="bootstrap resamples of the prompts behind each verdict's robustness (0: none)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (peak memory grows with it)")
    _add_exclude(p, table)
    p.add_argument("--truncate", action="store_true", help="cut prompts longer than the context instead of failing")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--serial", action="store_true",
                   help="measure the reference and the model one after the other, not side by side (half the peak memory)")
    _add_threads_option(p)


def _add_exclude(p: argparse.ArgumentParser, table: dict) -> None:
    p.add_argument("--exclude", action=Values, empty=True, default=["first"], choices=table["exclude_rules"],
                   metavar="RULE", help=f"positions left out of aggregates, of {', '.join(table['exclude_rules'])} "
                   "(none: keep every position)")


def _add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: OMP_NUM_THREADS, else the CPUs this process may use)")


def thread_count(requested: int | None = None) -> int:
    """Threads for torch: ``requested`` (--threads), else ``OMP_NUM_THREADS``, else the CPUs this process may
    run on (``os.sched_getaffinity``: what Slurm or taskset gave it), else every CPU of the machine.

    The whole machine is the wrong default on a shared node: ``os.cpu_count()`` counts CPUs the
    scheduler did not give us, and threads beyond them only contend.
    """
    if requested is not None:
        return requested
    # OpenMP's list form ("4,2") sets nested levels, the first is ours; a value it would ignore, we ignore too.
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def _set_threads(args) -> None:
    import torch

    torch.set_num_threads(thread_count(args.threads))


# The least value of each numeric option of the commands themselves (an analysis's options state their own
# bounds: registry.option), checked before any model loads.
AT_LEAST = {"batch_size": 1, "chunk": 1, "checkpoint_every": 0, "subsample": 0, "threads": 1, "seed": 0, "control_seeds": 0, "bootstrap": 0}


def _check_options(args) -> None:
    """The options that need no model: bounds, formats, --device, --out."""
    for dest, least in AT_LEAST.items():
        _check_bounds(_flag(dest), getattr(args, dest, None), {"at_least": least})
    for analysis in registry.analyses():  # `report` has every analysis's options, whichever it runs
        for f in dataclasses.fields(analysis.parameters):
            _check_bounds(registry.flag(f), getattr(args, _dest(f), None), f.metadata)
    _check_bounds("--static-scale", getattr(args, "static_scale", None), {"positive": True})
    static = set(getattr(args, "static", ()))
    if static - {"png", "svg"}:
        raise ArgumentError(f"--static takes png and/or svg, not {sorted(static - {'png', 'svg'})}")
    _check_device(getattr(args, "device", None))
    _check_out(args.out)


def _check_bounds(flag: str, value, metadata) -> None:
    """``value`` (of ``flag``) within the bounds ``metadata`` states: at_least, positive, distinct (``registry.option``)."""
    least = metadata.get("at_least", 0 if metadata.get("blocks") else None)
    for v in _values(value):
        if least is not None and v < least:
            raise ArgumentError(f"{flag} must be at least {least}, not {v}")
        if metadata.get("positive") and not (v > 0 and math.isfinite(v)):
            raise ArgumentError(f"{flag} takes positive numbers, not {v}")
    fewest = metadata.get("distinct")
    if fewest and value is not None and len(set(value)) < fewest:
        what = "blocks" if metadata.get("blocks") else "values"
        raise ArgumentError(f"{flag} needs at least {fewest} different {what}, not {value}")


def _values(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_device(spec: str | None) -> None:
    if spec is None:
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ArgumentError(f"--device {spec!r} is not a torch device: give e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ArgumentError(f"--device {spec}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ArgumentError(f"--device {spec}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ArgumentError(f"--device {spec}: MPS is not available here; use --device cpu")


def _check_out(out: Path) -> None:
    """``--out`` must be a directory this process can create or write into. Checked before the model loads
    (a run otherwise fails only when it writes, after all its measuring), without creating it."""
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"--out {out} is a file, not a directory: give a directory (new or existing)")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ArgumentError(f"--out {out}: {existing} is a file, so no directory can be made under it")
    try:
        # A real write, not os.access: as root os.access says yes even on a read-only file system.
        with tempfile.TemporaryDirectory(prefix=".lensdyn-probe-", dir=existing):
            pass
    except OSError as err:
        what = "is not writable" if existing == out else f"cannot be made under {existing}"
        raise ArgumentError(f"--out {out} {what}: {err.strerror or err}") from None


def _prompts(spec: str):
    """The --prompts set, read before any model loads; a file that is not UTF-8 text is named, not a traceback."""
    from lensdyn.prompts import resolve_prompts

    try:
        return resolve_prompts(spec, allow_literal=False)
    except UnicodeDecodeError as err:
        raise PromptError(f"--prompts {spec}: {_undecodable(Path(spec).expanduser())} is not UTF-8 text "
                          f"({err.reason} at byte {err.start}): save it as UTF-8") from None
    except OSError as err:
        raise PromptError(f"--prompts {spec}: cannot read it: {_os_reason(err)}") from None


def _undecodable(path: Path) -> Path:
    """The file of a prompt file or directory that does not decode (a directory's error does not say which)."""
    for f in sorted(path.glob("*.txt")) if path.is_dir() else [path]:
        try:
            f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            return f
    return path


def _contrast(flag: str, spec: str):
    """A contrast-set option's value (``option(contrast=True)``), read before any model loads; a malformed
    file is one line, not a traceback."""
    from lensdyn.analyses.steering import resolve_contrast

    try:
        return resolve_contrast(spec)
    except UnicodeDecodeError as err:
        raise PromptError(f"{flag} {spec} is not UTF-8 text ({err.reason} at byte {err.start}): "
                          "save it as UTF-8") from None
    except (TypeError, AttributeError) as err:  # JSON of the wrong shape (a number, a list of numbers)
        raise PromptError(f"{flag} {spec}: expected a JSON object whose positive, negative, evaluation, "
                          f"positive_targets and negative_targets are lists of texts ({err})") from None


def _options_marked(chosen, key: str):
    """``(analysis, flag, value)`` of every chosen analysis's parameter whose declaration sets ``key``."""
    for analysis, parameters in chosen:
        for f in dataclasses.fields(parameters):
            if f.metadata.get(key):
                yield analysis, registry.flag(f), getattr(parameters, f.name)


def _check_for_model(model, prompts, args, chosen=()) -> None:
    """What needs the loaded model (its tokenizer, its depth), before any forward pass.

    ``chosen``: ``(analysis, parameters)`` pairs; each analysis's declaration says what it needs
    (``min_tokens``, ``causal``, options of ``blocks`` and ``contrast``).
    """
    from lensdyn.app.corpus import describe_prompt, included_tokens
    from lensdyn.models import text_token_ids

    counts = included_tokens(model, prompts, tuple(args.exclude), args.truncate)
    if not any(counts):
        keep = "; or keep every position with --exclude and no value" if args.exclude else ""
        raise PromptError(f"no prompt of {prompts.name!r} keeps a token after excluding {list(args.exclude)} "
                          f"(e.g. {describe_prompt(prompts, 0)}): give longer prompts{keep}")
    for analysis, _ in chosen:
        short = [i for i, n in enumerate(counts) if n < analysis.min_tokens]
        if short:
            raise PromptError(f"{describe_prompt(prompts, short[0])} keeps {counts[short[0]]} token(s) after excluding "
                              f"{list(args.exclude)}, and {analysis.name} needs {analysis.min_tokens} per prompt: give "
                              f"longer prompts, or leave {analysis.name} out (--analyses)")
        if analysis.causal and getattr(model.cfg, "attention_dir", "causal") != "causal":
            raise UnsupportedArchitectureError(f"{args.model} is not a causal language model: {analysis.causal}")
    for analysis, flag, spec in _options_marked(chosen, "contrast"):
        contrast = _contrast(flag, spec)
        for targets in (contrast.positive_targets, contrast.negative_targets):
            text_token_ids(model, targets, f"{analysis.name} targets")  # each must be one token: its logit is one number
    for _, flag, blocks in _options_marked(chosen, "blocks"):
        outside = sorted({b for b in blocks or () if b >= model.cfg.n_layers})
        if outside:
            raise ArgumentError(f"{flag} {outside}: this model's blocks are 0..{model.cfg.n_layers - 1}")


def _truncation_line(truncated, n_prompts: int, model) -> str | None:
    """One line saying what --truncate cut, or None if nothing was."""
    if not truncated:
        return None
    from lensdyn.models import model_info

    return (f"lensdyn: truncated {len(truncated)} of {n_prompts} prompt(s) to their first {model.cfg.n_ctx} tokens, "
            f"the context of {model_info(model).name} (--truncate)")


def _versions() -> str:
    from lensdyn import __version__
    from lensdyn.results import library_versions

    versions = library_versions()
    return f"lensdyn {__version__} (" + ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "transformer-lens")) + ")"


def _models(args) -> int:
    from lensdyn.models import available_models

    if args.check is not None:
        return _check_model(args.check, args.weights)
    rows = available_models()
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        status = "installed" if r["installed"] else f"not installed ({r['install']})"
        default = " [default]" if r["default"] else ""
        print(f"{r['name']:<{width}}  {status}{default}\n{'':<{width}}  {r['description']}")
    print(_versions())
    return 0


def _check_model(name: str, weights: str) -> int:
    """``lensdyn models --check``: load, self-test on a short prompt, say which analyses apply. Exit 2 if refused."""
    import torch

    from lensdyn.errors import HookSemanticsError
    from lensdyn.hooks.selftest import SELF_TEST_TOKENS, self_test
    from lensdyn.models import block_layout, load_model

    model = load_model(name, weights=weights)
    layout = block_layout(model)
    print(f"{name}: {type(getattr(model, 'original_model', model)).__name__}, {model.cfg.n_layers} blocks, "
          f"d_model {model.cfg.d_model}, {getattr(model.cfg, 'attention_dir', 'causal')} attention")
    print(f"layout: {layout.describe()}")
    tokens = torch.randint(0, model.cfg.d_vocab, (SELF_TEST_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()
    report = self_test(model, tokens)
    print(report.summary())
    for analysis, why in supported_analyses(model).items():
        print(f"  {analysis:<14} {why}")
    if not report.passed:
        raise HookSemanticsError(f"{name} fails the self-test: lensdyn refuses to measure it")
    return 0


def supported_analyses(model) -> dict[str, str]:
    """Every registered analysis -> "yes" or why not (or what it leaves out) on this model."""
    from lensdyn.analyses.registry import analyses
    from lensdyn.errors import UnsupportedArchitectureError as Unsupported
    from lensdyn.hooks.circuits import unembedding
    from lensdyn.models import layout_of

    causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
    try:
        unembedding(model)
        reads_residual = ""
    except Unsupported as err:
        reads_residual = str(err)
    parallel = " (MLP measured against the block input: no mid state)" if layout_of(model) == "parallel" else ""
    notes = {  # what a layout or a head changes for one analysis; every other analysis applies as it is
        "expansion": f"no: {reads_residual}" if reads_residual else "yes" + parallel,
        "gains": "yes" + parallel,
        "curvature": "yes" if causal else "geometry only (an encoder has no next-token logits to patch)",
    }
    support = {}
    for analysis in analyses():
        if analysis.causal and not causal:
            support[analysis.name] = f"no: {analysis.causal}, and this model is an encoder"
        elif analysis.causal and getattr(model, "tokenizer", None) is None:
            support[analysis.name] = "no: needs a tokenizer"
        else:
            support[analysis.name] = notes.get(analysis.name, "yes")
    return support


def _corpus(args) -> int:
    from lensdyn.app.corpus import check_sketch, check_states, parse_shard, shard_lock, world_size

    shard = parse_shard(args.shard)
    args.distributed = args.distributed or world_size() > 1
    if args.distributed:
        if args.shard != "0/1":
            raise ArgumentError("--shard and a distributed run do not mix: each rank takes shard RANK/WORLD_SIZE")
        shard = (int(os.environ.get("RANK", "0")), world_size())
        if args.device == "cuda":  # one GPU per rank, the one torchrun numbers LOCAL_RANK
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    args.covariance_states = None if args.covariance_states is None else check_states(args.covariance_states)
    check_sketch(args.covariance_sketch)
    _check_options(args)
    prompts = _prompts(args.prompts)  # a bad corpus fails before the model loads
    _set_threads(args)
    with shard_lock(args.out, shard):  # held to the last file written; a second run of this shard stops here, at once
        return _corpus_locked(args, shard, prompts)


def _corpus_locked(args, shard: tuple[int, int], prompts) -> int:
    import torch

    from lensdyn.analyses import metastability
    from lensdyn.app.corpus import record_path, run_corpus, usable_subsample
    from lensdyn.models import DEFAULT_MODEL, load_model

    model = load_model(args.model or DEFAULT_MODEL, weights=args.weights, seed=args.seed,
                       dtype=getattr(torch, args.dtype), device=args.device)
    exclude = tuple(args.exclude)
    sample = None
    if shard[0] == 0 and args.subsample > 0:  # checked now: it runs only after the whole shard
        sample = usable_subsample(model, prompts, args.subsample, args.seed, exclude=exclude, truncate=args.truncate,
                                  skip_short=args.skip_short)
    stats, record = run_corpus(model, prompts, args.out, shard=(0, 1) if args.distributed else shard, chunk=args.chunk,
                               batch_size=args.batch_size, exclude=exclude, truncate=args.truncate,
                               resume=not args.restart, skip_short=args.skip_short,
                               covariance_states=args.covariance_states, covariance_sketch=args.covariance_sketch,
                               distributed=args.distributed, checkpoint_seconds=args.checkpoint_every)
    _say(args, f"shard {shard[0]}/{shard[1]}: {record['prompts_done']} prompts, {record['n_tokens']} tokens -> {args.out}")
    if record["skipped"]:
        print(f"lensdyn: left out {len(record['skipped'])} prompt(s) with fewer than 2 tokens after excluding "
              f"{list(exclude)} (--skip-short): {record['skipped'][:10]}", file=sys.stderr)
    line = _truncation_line(record["truncated"], record["n_prompts"], model)
    if line:
        print(line, file=sys.stderr)
    if sample is not None:
        result = metastability.measure(model, sample, control=None, repeated=False, exclude=exclude,
                                       truncate=args.truncate, batch_size=args.batch_size, progress=True)
        _say(args, f"wrote {result.to_json(args.out / SUBSAMPLE_FILE)} ({sample.name})")
    if shard[1] == 1 or (args.distributed and shard[0] == 0):  # rank 0 holds the reduced accumulators
        _write_corpus(stats, record, args.out, args)
    elif not args.distributed:
        _wrote(args, [], main=record_path(args.out, shard))
        _say(args, f"when every shard is done: lensdyn merge {args.out}/shard-*-of-{shard[1]}.json --out {args.out}")
    return 0


def _merge(args) -> int:
    from lensdyn.app.corpus import merge_shards

    _check_out(args.out)
    _write_corpus(*merge_shards(args.records), args.out, args)
    return 0


SUBSAMPLE_FILE = "metastability_subsample.json"


def _write_corpus(stats, record, out: Path, args) -> None:
    from lensdyn.app.corpus import corpus_result
    from lensdyn.app.report import Section, write_html

    result = corpus_result(stats, record)
    _say(args, result.summary())
    sections = [Section("Streamed statistics", result.figure(), result.summary())]
    if (out / SUBSAMPLE_FILE).exists():
        try:
            sample = registry.load_result(out / SUBSAMPLE_FILE)
        except ValueError as err:  # JSON cut short, or not UTF-8
            raise ArgumentError(f"{out / SUBSAMPLE_FILE} is damaged ({type(err).__name__}): delete it, or run shard 0 "
                                "again with --restart to write it again") from None
        sections.append(Section(f"Metastability on {sample.provenance.prompt_set}", sample.figure(), sample.summary()))
    written = [result.to_json(out / "corpus.json"),
               write_html(out / "corpus.html", title=f"lensdyn: corpus statistics of {record['model']}",
                          subtitle=f"prompts {record['prompt_set']!r} ({record['n_prompts']}), {record['n_tokens']} tokens",
                          sections=sections)]
    _wrote(args, written, main=written[-1])


def _report(args) -> int:
    import json

    from lensdyn.app import run
    from lensdyn.app.report import analysis_section, export_figures, write_html
    from lensdyn.app.study import split_causal
    from lensdyn.models import load_model, model_info, weights_note
    from lensdyn.progress import Progress
    from lensdyn.verdicts import verdict_table

    names = _analysis_names(args.analyses)
    _check_options(args)
    prompt_sets = [_prompts(spec) for spec in args.prompts]
    chosen = [(registry.get(name), _parameters(registry.get(name), args)) for name in names]
    for _, flag, spec in _options_marked(chosen, "contrast"):
        _contrast(flag, spec)  # a bad contrast set fails before any model loads
    _set_threads(args)
    streams = sorted({s for analysis, _ in chosen for s in analysis.streams})
    runs = run.reference_runs(args.model, args.weights, control=args.control, compare=args.compare,
                              control_seeds=tuple(dict.fromkeys(args.control_seeds)))
    timings: dict[str, dict[str, float]] = {r.role: {} for r in runs}
    models, sources = {}, {}
    note = weights_note(args.model, args.weights)
    # A default analysis that needs a causal LM is left out for an encoder, with its reason; one asked for by name is an error.
    by_default = names == [a.name for a in registry.analyses() if not a.opt_in]
    skipped: dict[str, str] = {}
    started = time.perf_counter()
    for r in runs:  # one after the other: random weights are drawn from the global RNG
        began = time.perf_counter()
        models[r.role] = load_model(r.model, weights=r.weights, seed=r.seed, device=args.device)
        timings[r.role]["load_s"] = round(time.perf_counter() - began, 3)
        sources[r.role] = model_info(models[r.role]).weights_source
        if by_default:
            chosen, left_out = split_causal(chosen, models[r.role])
            skipped.update(left_out)
        for prompts in prompt_sets:
            _check_for_model(models[r.role], prompts, args, chosen)
    for name, why in skipped.items():
        _say(args, f"{name}: {why}", file=sys.stderr)
    names = [analysis.name for analysis, _ in chosen]
    loaded = time.perf_counter()
    truncation: dict[str, str | None] = {}
    costs = _step_costs(chosen)
    bar = Progress(len(prompt_sets) * len(runs) * sum(costs.values()), "report", unit="captures")

    def step(role: str, analysis: str) -> None:
        bar.update(costs.get(analysis, 1.0), f"{role} {analysis}")

    measured = {prompts.name: run.measure_prompt_set(
        runs, models, prompts, chosen, exclude=tuple(args.exclude), batch_size=args.batch_size, truncate=args.truncate,
        seed=args.seed, side_by_side=not args.serial, timings=timings, on_step=step) for prompts in prompt_sets}
    for m in measured.values():
        truncation.update({role: _truncation_line(cut, n, models[role]) for role, (cut, n) in m.truncated.items()})
    bar.close()
    models.clear()  # free the models before judging and writing
    done = time.perf_counter()
    verdicts_by_set = {}
    for name, m in measured.items():
        verdicts_by_set[name] = run.judge_measured(m, names, n_bootstrap=args.bootstrap, seed=args.seed)
    judged = time.perf_counter()
    primary = measured[prompt_sets[0].name]
    verdicts = verdicts_by_set[prompt_sets[0].name]
    _say(args, f"loaded in {loaded - started:.1f} s, measured in {done - loaded:.1f} s"
          + (" (two runs side by side)" if len(runs) > 1 and not args.serial else "")
          + f", verdicts and their bootstrap in {judged - done:.1f} s", file=sys.stderr)
    for line in dict.fromkeys(line for line in truncation.values() if line):  # the control cuts what its model cuts
        print(line, file=sys.stderr)

    reference_label = _reference_label(args)
    args.out.mkdir(parents=True, exist_ok=True)
    written, sections, files = [], [], {}
    for name in names:
        result = primary.results[name]
        path = result.to_json(args.out / f"{name}.json")
        written.append(path)
        files[name] = path.name
        reference = primary.references[name][0] if primary.references[name] else None
        apart = reference if registry.get(name).keeps_reference_apart else None
        if apart is not None:
            written.append(reference.to_json(args.out / f"{name}_reference.json"))
            files[f"{name}_reference"] = written[-1].name
        result.to_csv(args.out / "csv" / f"{name}.csv", reference=apart)
        written.append(args.out / "csv" / f"{name}.csv")
        _say(args, result.summary(), end="\n\n")
    if verdicts:
        _say(args, verdict_table(verdicts, reference_label), end="\n\n")
    others = {k: v for k, v in verdicts_by_set.items() if k != prompt_sets[0].name}
    if not args.json_only:
        sections = [analysis_section(registry.get(name), model=primary.results[name],
                                     **({"reference": primary.references[name][0]} if primary.references[name] else {}))
                    for name in names]
        page = "report.html" if len(names) > 1 else f"{names[0]}.html"
        sets = ", ".join(f"{p.name!r} ({len(p)})" for p in prompt_sets)
        written.append(write_html(
            args.out / page,
            title=f"lensdyn: {', '.join(names)} of {args.model}",
            subtitle=f"prompts {sets}, excluded positions {args.exclude}; weights: {sources['model']} (raw: no fold_ln, "
            f"no centering){'; ' + note if note else ''}; reference: {reference_label} (grey)",
            sections=sections, verdicts=verdicts, reference_label=reference_label, other_sets=others,
        ))
        figures = {name: section.figure for name, section in zip(names, sections)}
        written += export_figures(figures, args.out / "figures", args.static, scale=args.static_scale)
    # Per-run steps overlap when runs go side by side; "wall" is what the whole report took.
    timings["wall"] = {"load_s": round(loaded - started, 3), "measure_s": round(done - loaded, 3),
                       "verdicts_s": round(judged - done, 3), "write_s": round(time.perf_counter() - judged, 3)}
    index = {
        "model": args.model, "weights": args.weights, "weights_source": sources, "reference": reference_label,
        "prompts": prompt_sets[0].name, "n_prompts": len(prompt_sets[0]), "excluded_positions": list(args.exclude),
        "analyses": names, "files": files,
        "seeds": {"nulls_and_bootstrap": args.seed,
                  "controls": [r.seed for r in runs if r.role != "model" and r.weights == "random"]},
        "bootstrap_resamples": args.bootstrap,
        "verdicts": [dataclasses.asdict(v) for v in verdicts],
        **({"verdicts_by_prompt_set": {k: [dataclasses.asdict(v) for v in vs] for k, vs in verdicts_by_set.items()},
            "agreement_across_prompt_sets": run.agreement(verdicts_by_set)} if others else {}),
        "timings_s": timings,
    }
    report_json = args.out / ("report.json" if len(names) > 1 else f"{names[0]}_report.json")
    report_json.write_text(json.dumps(index, indent=1, allow_nan=False), encoding="utf-8")
    written.append(report_json)
    _wrote(args, written, main=written[-1] if args.json_only else args.out / page)
    return 0


def _step_costs(chosen) -> dict[str, float]:
    """Each step of a run (its capture, then each chosen analysis) -> its cost in captures (``Analysis.cost``)."""
    return {"capture": 1.0} | {analysis.name: analysis.cost for analysis, _ in chosen}


def _say(args, *text, **kwargs) -> None:
    """``print``, unless --quiet."""
    if not args.quiet:
        print(*text, **kwargs)


def _wrote(args, paths, main: Path) -> None:
    """Every file written; with --quiet only ``main``, the one a caller opens."""
    if args.quiet:
        print(main, file=args.stdout)
    for path in [] if args.quiet else paths:
        print(f"wrote {path}")


def _analysis_names(values: list[str]) -> list[str]:
    """The --analyses list, each a registered analysis (the old comma-separated form too)."""
    names = parsing.split_commas(values)
    known = [a.name for a in registry.analyses()]
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        raise ArgumentError(f"unknown analysis {unknown or names}: choose from {', '.join(known)}")
    return names


def _study(args) -> int:
    import json

    from lensdyn.app import study
    from lensdyn.app.report import Section, matrix_html, verdict_html, write_html

    names = _analysis_names(args.analyses)
    _check_options(args)
    prompts = _prompts(args.prompts)
    chosen = [(registry.get(name), _parameters(registry.get(name), args)) for name in names]
    for _, flag, spec in _options_marked(chosen, "contrast"):
        _contrast(flag, spec)
    _set_threads(args)
    options = study.StudyOptions(
        exclude=tuple(args.exclude), batch_size=args.batch_size, truncate=args.truncate, seed=args.seed,
        control=args.control, control_seeds=tuple(dict.fromkeys(args.control_seeds)), n_bootstrap=args.bootstrap,
        device=args.device, side_by_side=not args.serial, temperature=not args.no_temperature)
    from lensdyn.progress import Progress

    columns = []
    for name in dict.fromkeys(args.models):
        began = time.perf_counter()
        n_runs = len(options.control_seeds) + 1 if args.control == "random" else 1
        costs = _step_costs(chosen)
        with Progress(n_runs * sum(costs.values()), name, unit="captures") as bar:
            columns.append(study.measure_model(
                name, prompts, chosen, options,
                check=lambda model, runnable, name=name: _check_for_model(
                    model, prompts, argparse.Namespace(**vars(args), model=name), runnable),
                on_step=lambda role, step, bar=bar: bar.update(costs.get(step, 1.0), f"{role} {step}")))
        _say(args, f"{name}: measured in {time.perf_counter() - began:.1f} s", file=sys.stderr)
    models = [c.model for c in columns]
    rows = study.verdict_matrix(columns, names)
    cross = study.cross_model_verdicts(columns)
    _say(args, study.matrix_text(rows, models), end="\n\n")
    for v in cross:
        _say(args, f"{v.claim}: {v.verdict}: {v.measured}")
    args.out.mkdir(parents=True, exist_ok=True)
    index = study.study_index(columns, names, rows, cross, prompts=prompts.name, n_prompts=len(prompts),
                              excluded_positions=list(args.exclude), bootstrap_resamples=args.bootstrap,
                              seeds={"nulls_and_bootstrap": args.seed, "controls": list(options.control_seeds)
                                     if args.control == "random" else []})
    written = [args.out / "study.json"]
    written[0].write_text(json.dumps(index, indent=1, allow_nan=False), encoding="utf-8")
    if not args.json_only:
        sections = [Section("H(l) on relative depth", study.hubble_figure(columns))]
        gain = study.gain_figure(columns)
        if gain is not None:
            sections.append(Section("Last-MLP gain against parameter count", gain))
        written.append(write_html(
            args.out / "study.html", title=f"lensdyn: study of {', '.join(models)}",
            subtitle=f"prompts {prompts.name!r} ({len(prompts)}), excluded positions {args.exclude}, raw weights",
            sections=sections,
            tables=[("Across models", verdict_html(cross, "reference")), ("Claims x models", matrix_html(rows, models))]))
    _wrote(args, written, main=written[-1])
    return 0


def _reference_label(args) -> str:
    if args.compare:
        return f"{args.compare} (compare)"
    if args.control == "random" and args.weights != "random":
        return "untrained control"
    return "none"


if __name__ == "__main__":
    sys.exit(main())
