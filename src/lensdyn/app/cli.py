"""The ``lensdyn`` command.

    lensdyn models                                   list embedded models and how to install them
    lensdyn report --model smollm2-135m --prompts diverse --out reports/demo
        verdict table + every default analysis, beside the untrained control (--compare MODEL: beside
        another model; --json-only: no HTML; --static png svg: figures as images too)
    lensdyn corpus --prompts my_corpus/ --out reports/corpus [--shard i/n]   streamed statistics, resumable
    lensdyn merge reports/corpus/shard-*.json --out reports/corpus          shards -> the single-run result
    lensdyn norms | expansion | gains | metastability | curvature | stability | steering --model ... --out DIR   one analysis

Exit status: 0 on success, 2 on bad input (with a one-line reason on stderr), 130 when interrupted.
What can be checked without the model (options, --out, --prompts, --device) is checked before it
loads; what needs its tokenizer or depth (prompts too short, steering targets, block numbers) right
after, before any forward pass.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from lensdyn.errors import ArgumentError, LensdynError, PromptError, UnsupportedArchitectureError

EPILOG = """examples:
  lensdyn models
  lensdyn report --model smollm2-135m --prompts diverse --out reports/demo
  lensdyn expansion --model smollm2-135m --prompts diverse --fit-space linear --out reports/expansion
  lensdyn gains --model smollm2-135m --reference resid --tokens last --out reports/gains
  lensdyn norms --model smollm2-135m --prompts diverse --out reports/norms
  lensdyn steering --model smollm2-135m --contrast sentiment --transfer-layers 0 6 12 18 24 29 --out reports/steering
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
        self.exit(2, f"lensdyn: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lensdyn",
        description="Measure how token representations move through a transformer, layer by layer.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(command=None)
    parser.add_argument("--version", action="version", version=_versions(),
                        help="print the versions of lensdyn, torch, transformers and transformer-lens, and exit")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    models = sub.add_parser("models", help="list the embedded offline models (or --check one checkpoint)",
                            description="List the embedded offline models, or check that a model opens in lensdyn: "
                            "its block layout, the self-test of its hook points, and the analyses it supports.")
    models.add_argument("--check", metavar="PATH_OR_ID", help="an embedded name, a checkpoint directory or a hub id to check")
    models.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                        help="check the checkpoint's weights or a random initialisation of its architecture")
    models.set_defaults(command="models", run=_models)

    report = sub.add_parser(
        "report",
        help="every analysis from one capture per model: one JSON per analysis + report.html",
        description="Run several analyses on a model (and its untrained control) from one forward pass per batch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_run_options(report)
    report.add_argument(
        "--analyses", default=",".join(DEFAULT_REPORT), help=f"comma-separated subset of {', '.join(ANALYSES)}",
    )
    report.set_defaults(command="report", run=_report)

    corpus = sub.add_parser(
        "corpus", help="stream a corpus through the model: per-layer statistics in float64 accumulators, resumable, sharded",
        description="Corpus-scale statistics (lensdyn.app.corpus): resumable; --shard i/n writes one shard, `lensdyn merge` "
        "combines them into what a single run gives.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    corpus.add_argument("--model", default=None, help="embedded name, local checkpoint dir, or hub id (default: smollm2-135m)")
    corpus.add_argument("--prompts", required=True, help="built-in set, .txt/.jsonl file, or directory of .txt files")
    corpus.add_argument("--out", required=True, type=Path, help="directory for shard records and the result")
    corpus.add_argument("--shard", default="0/1", help="i/n: this process takes prompts i, i+n, i+2n, ...")
    corpus.add_argument("--chunk", type=int, default=16, help="prompts per capture (peak memory grows with it)")
    corpus.add_argument("--batch-size", type=int, default=8,
                        help="prompts per forward pass; 1 makes every shard's activations identical to a single run's")
    corpus.add_argument("--weights", choices=("pretrained", "random"), default="pretrained")
    corpus.add_argument("--seed", type=int, default=0, help="seed of random weights")
    corpus.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="forward-pass dtype (statistics are float64 whatever it is)")
    corpus.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")
    corpus.add_argument("--exclude", nargs="*", default=["first"], choices=("first", "bos", "special"))
    corpus.add_argument("--truncate", action="store_true", help="cut prompts longer than the context instead of failing")
    corpus.add_argument("--restart", action="store_true", help="ignore this shard's saved progress and start again")
    corpus.add_argument("--subsample", type=int, default=32,
                        help="prompts (seeded draw) on which shard 0 also runs clustering and CKA, which need every "
                        "token at once (0: none)")
    corpus.add_argument("--skip-short", action="store_true",
                        help="leave out prompts with fewer than 2 tokens after --exclude (recorded) instead of failing")
    _add_threads_option(corpus)
    corpus.set_defaults(command="corpus", run=_corpus)

    merge = sub.add_parser("merge", help="merge corpus shards (their shard-*.json records) into one result",
                           description="Merge every shard of a `lensdyn corpus --shard i/n` run into corpus.json + corpus.html.")
    merge.add_argument("records", nargs="+", type=Path, help="shard-i-of-n.json files (all n of them)")
    merge.add_argument("--out", required=True, type=Path)
    merge.set_defaults(command="merge", run=_merge)

    for name, help_text in ANALYSES.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_run_options(p)
        p.set_defaults(command=name, run=_report, analyses=name)
    # Each analysis's options go on its own command and on `report`.
    for name, add_options in (("expansion", _add_expansion_options), ("gains", _add_gains_options),
                              ("metastability", _add_metastability_options), ("curvature", _add_curvature_options),
                              ("stability", _add_stability_options), ("steering", _add_steering_options)):
        add_options(sub.choices[name])
        add_options(report)
    return parser


ANALYSES = {
    "norms": "per-layer residual-stream norms",
    "expansion": "scale factor a(l), Hubble rate, comoving CV with its null, causal metric, post-LN norms, covariance shape",
    "gains": "attention / MLP / residual gain per block, with MLP phases",
    "metastability": "clustering on the sphere, CKA plateaus, interaction energy and its violations, V/OV spectra",
    "curvature": "turning angles and length-to-chord against null walks; deflection and patching under context edits",
    "stability": "block Jacobian spectra (matrix-free), attention temperature and mixing time, K-theta, stability index",
    "steering": "difference-of-means steering per block against H(l); redshift vs norm-matching transfer between blocks",
}
# Jacobian spectra, temperature sweeps and steering sweeps run their own forward passes (seconds to minutes):
# they run when asked for (`--analyses ...,stability,steering`).
OPT_IN = ("stability", "steering")
DEFAULT_REPORT = tuple(name for name in ANALYSES if name not in OPT_IN)


def _add_expansion_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("expansion")
    g.add_argument("--aggregation", choices=("ratio_of_means", "mean_of_ratios"), default="ratio_of_means",
                   help="how a(l) (and gains) aggregate over tokens")
    g.add_argument("--fit-space", choices=("log", "linear"), default="log", help="space of the exponential fits")
    g.add_argument("--permutations", type=int, default=100, help="draws of the comoving-CV permutation null")


def _add_metastability_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("metastability")
    g.add_argument("--attention-graphs", action="store_true", help="Fiedler value of every head's attention graph (slow)")
    g.add_argument("--min-cluster-size", type=int, default=5, help="HDBSCAN min_cluster_size")


def _add_stability_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("stability")
    g.add_argument("--layers", type=int, nargs="*", default=None, help="blocks whose Jacobian to profile (default all)")
    g.add_argument("--profile-prompts", type=int, default=1, help="prompts the Jacobian profile uses")
    g.add_argument("--context", type=int, default=32, help="Jacobians at the last of each prompt's first CONTEXT tokens")
    g.add_argument("--betas", type=float, nargs="*", default=[0.25, 0.5, 1.0, 2.0, 4.0], help="attention temperatures")


def _add_steering_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering")
    g.add_argument("--contrast", default="sentiment", help="built-in contrast set (sentiment, formality) or a JSON file")
    g.add_argument("--steer-layers", type=int, nargs="*", default=None, help="blocks steered with their own vector (default all)")
    g.add_argument("--transfer-layers", type=int, nargs="*", default=None,
                   help="source/target blocks of the transfer test (default 6 spread over the steered blocks)")
    g.add_argument("--relative", type=float, nargs="*", default=[0.125, 0.25, 0.5, 1.0, 2.0],
                   help="sizes tried, as ||added vector|| / mean residual norm at the block")
    g.add_argument("--bootstrap", type=int, default=200, help="bootstrap draws over evaluation prompts")


def _add_curvature_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("curvature")
    g.add_argument("--null-draws", type=int, default=20, help="draws of each curvature null")
    g.add_argument("--patch-streams", nargs="*", default=["resid"], choices=("resid", "attn_out", "mlp_out"),
                   help="what to patch from the edited run into the clean one (none: no patching)")


def _add_gains_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gains")
    g.add_argument("--reference", choices=("ln_output", "resid"), default="ln_output",
                   help="what a sublayer's output is compared to")
    g.add_argument("--tokens", choices=("all", "last"), default="all", help="all included tokens or each prompt's last")
    if not any(a.dest == "aggregation" for a in p._actions):
        g.add_argument("--aggregation", choices=("ratio_of_means", "mean_of_ratios"), default="ratio_of_means")


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
    p.add_argument("--compare", default=None, metavar="MODEL",
                   help="measure a second (pretrained) model instead of the control and put it beside the first everywhere")
    p.add_argument("--json-only", action="store_true", help="write the JSON files only, no HTML")
    p.add_argument("--static", nargs="*", default=[], metavar="FORMAT",
                   help="also export every figure as png and/or svg into OUT/figures (needs kaleido and a Chromium)")
    p.add_argument("--seed", type=int, default=0, help="seed of random weights")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--exclude", nargs="*", default=["first"], choices=("first", "bos", "special"),
        help="positions left out of aggregates (none: pass --exclude with no value)",
    )
    p.add_argument("--truncate", action="store_true", help="cut prompts longer than the context instead of failing")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0")
    p.add_argument("--serial", action="store_true",
                   help="measure the reference and the model one after the other, not side by side (half the peak memory)")
    _add_threads_option(p)


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


# The least value of each numeric option (of the commands that have it), checked before any model loads.
AT_LEAST = {"batch_size": 1, "chunk": 1, "subsample": 0, "threads": 1, "seed": 0, "permutations": 1, "null_draws": 1,
            "bootstrap": 1, "min_cluster_size": 2, "profile_prompts": 1, "context": 2, "layers": 0, "steer_layers": 0,
            "transfer_layers": 0}
POSITIVE = ("relative", "betas")


def _check_options(args) -> None:
    """The options that need no model: bounds, formats, --device, --out."""
    for dest, least in AT_LEAST.items():
        for value in _values(getattr(args, dest, None)):
            if value < least:
                raise ArgumentError(f"{_flag(dest)} must be at least {least}, not {value}")
    for dest in POSITIVE:
        for value in _values(getattr(args, dest, None)):
            if not (value > 0 and math.isfinite(value)):
                raise ArgumentError(f"{_flag(dest)} takes positive numbers, not {value}")
    transfer = getattr(args, "transfer_layers", None)
    if transfer is not None and len(set(transfer)) < 2:
        raise ArgumentError(f"--transfer-layers needs at least 2 different blocks, not {transfer}")
    static = set(getattr(args, "static", ()))
    if static - {"png", "svg"}:
        raise ArgumentError(f"--static takes png and/or svg, not {sorted(static - {'png', 'svg'})}")
    _check_device(getattr(args, "device", None))
    _check_out(args.out)


def _values(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


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


def _contrast(spec: str):
    """The --contrast set, read before any model loads; a malformed file is one line, not a traceback."""
    from lensdyn.prompts import resolve_contrast

    try:
        return resolve_contrast(spec)
    except UnicodeDecodeError as err:
        raise PromptError(f"--contrast {spec} is not UTF-8 text ({err.reason} at byte {err.start}): "
                          "save it as UTF-8") from None
    except (TypeError, AttributeError) as err:  # JSON of the wrong shape (a number, a list of numbers)
        raise PromptError(f"--contrast {spec}: expected a JSON object whose positive, negative, evaluation, "
                          f"positive_targets and negative_targets are lists of texts ({err})") from None


def _check_for_model(model, prompts, args, chosen=()) -> None:
    """What needs the loaded model (its tokenizer, its depth), before any forward pass."""
    from lensdyn.app.corpus import MIN_TOKENS, describe_prompt, included_tokens

    counts = included_tokens(model, prompts, tuple(args.exclude), args.truncate)
    if not any(counts):
        keep = "; or keep every position with --exclude and no value" if args.exclude else ""
        raise PromptError(f"no prompt of {prompts.name!r} keeps a token after excluding {list(args.exclude)} "
                          f"(e.g. {describe_prompt(prompts, 0)}): give longer prompts{keep}")
    if "metastability" in chosen:
        short = [i for i, n in enumerate(counts) if n < MIN_TOKENS]
        if short:
            raise PromptError(f"{describe_prompt(prompts, short[0])} keeps {counts[short[0]]} token(s) after excluding "
                              f"{list(args.exclude)}, and metastability clusters each prompt's tokens (it needs "
                              f"{MIN_TOKENS}): give longer prompts, or leave metastability out (--analyses)")
    n_layers = model.cfg.n_layers
    if "stability" in chosen:
        _check_blocks(args.layers, n_layers, "--layers")
    if "steering" in chosen:
        _check_steering(model, args, n_layers)


def _check_blocks(blocks, n_layers: int, flag: str) -> None:
    outside = sorted({b for b in blocks or () if b >= n_layers})
    if outside:
        raise ArgumentError(f"{flag} {outside}: this model's blocks are 0..{n_layers - 1}")


def _check_steering(model, args, n_layers: int) -> None:
    from lensdyn.models import text_token_ids

    if getattr(model.cfg, "attention_dir", "causal") != "causal":
        raise UnsupportedArchitectureError(
            f"{args.model} is not a causal language model: steering effects are read off next-token logits")
    contrast = _contrast(args.contrast)
    text_token_ids(model, contrast.positive_targets, "steering targets")  # each must be one token: its logit is one number
    text_token_ids(model, contrast.negative_targets, "steering targets")
    _check_blocks(args.steer_layers, n_layers, "--steer-layers")
    _check_blocks(args.transfer_layers, n_layers, "--transfer-layers")


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
    """Analysis name -> "yes" or why not (or what it leaves out) on this model."""
    from lensdyn.errors import UnsupportedArchitectureError as Unsupported
    from lensdyn.hooks.circuits import unembedding
    from lensdyn.models import layout_of

    causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
    try:
        unembedding(model)
        metric = "yes"
    except Unsupported as err:
        metric = f"no: {err}"
    parallel = " (MLP measured against the block input: no mid state)" if layout_of(model) == "parallel" else ""
    return {
        "norms": "yes",
        "expansion": metric if metric != "yes" else "yes" + parallel,
        "gains": "yes" + parallel,
        "metastability": "yes",
        "curvature": "yes" if causal else "geometry only (an encoder has no next-token logits to patch)",
        "stability": "yes",
        "steering": "yes" if causal and getattr(model, "tokenizer", None) is not None else "no: needs a causal model with a tokenizer",
    }


def _corpus(args) -> int:
    from lensdyn.app.corpus import parse_shard, shard_lock

    shard = parse_shard(args.shard)
    _check_options(args)
    prompts = _prompts(args.prompts)  # a bad corpus fails before the model loads
    _set_threads(args)
    with shard_lock(args.out, shard):  # held to the last file written; a second run of this shard stops here, at once
        return _corpus_locked(args, shard, prompts)


def _corpus_locked(args, shard: tuple[int, int], prompts) -> int:
    import torch

    from lensdyn.analyses import metastability
    from lensdyn.app.corpus import run_corpus, usable_subsample
    from lensdyn.models import DEFAULT_MODEL, load_model

    model = load_model(args.model or DEFAULT_MODEL, weights=args.weights, seed=args.seed,
                       dtype=getattr(torch, args.dtype), device=args.device)
    exclude = tuple(args.exclude)
    sample = None
    if shard[0] == 0 and args.subsample > 0:  # checked now: it runs only after the whole shard
        sample = usable_subsample(model, prompts, args.subsample, args.seed, exclude=exclude, truncate=args.truncate,
                                  skip_short=args.skip_short)
    stats, record = run_corpus(model, prompts, args.out, shard=shard, chunk=args.chunk, batch_size=args.batch_size,
                               exclude=exclude, truncate=args.truncate, resume=not args.restart,
                               skip_short=args.skip_short)
    print(f"shard {shard[0]}/{shard[1]}: {record['prompts_done']} prompts, {record['n_tokens']} tokens -> {args.out}")
    if record["skipped"]:
        print(f"lensdyn: left out {len(record['skipped'])} prompt(s) with fewer than 2 tokens after excluding "
              f"{list(exclude)} (--skip-short): {record['skipped'][:10]}", file=sys.stderr)
    line = _truncation_line(record["truncated"], record["n_prompts"], model)
    if line:
        print(line, file=sys.stderr)
    if sample is not None:
        result = metastability.measure(model, sample, control=None, repeated=False, exclude=exclude,
                                       truncate=args.truncate, batch_size=args.batch_size, progress=True)
        print(f"wrote {result.to_json(args.out / SUBSAMPLE_FILE)} ({sample.name})")
    if shard[1] == 1:
        _write_corpus(stats, record, args.out)
    else:
        print(f"when every shard is done: lensdyn merge {args.out}/shard-*-of-{shard[1]}.json --out {args.out}")
    return 0


def _merge(args) -> int:
    from lensdyn.app.corpus import merge_shards

    _check_out(args.out)
    _write_corpus(*merge_shards(args.records), args.out)
    return 0


SUBSAMPLE_FILE = "metastability_subsample.json"


def _write_corpus(stats, record, out: Path) -> None:
    from lensdyn.app.corpus import corpus_result
    from lensdyn.app.report import Section, write_html
    from lensdyn.results import load_result

    result = corpus_result(stats, record)
    print(result.summary())
    sections = [Section("Streamed statistics", result.figure(), result.summary())]
    if (out / SUBSAMPLE_FILE).exists():
        try:
            sample = load_result(out / SUBSAMPLE_FILE)
        except ValueError as err:  # JSON cut short, or not UTF-8
            raise ArgumentError(f"{out / SUBSAMPLE_FILE} is damaged ({type(err).__name__}): delete it, or run shard 0 "
                                "again with --restart to write it again") from None
        sections.append(Section(f"Metastability on {sample.provenance.prompt_set}", sample.figure(), sample.summary()))
    for path in (result.to_json(out / "corpus.json"),
                 write_html(out / "corpus.html", title=f"lensdyn: corpus statistics of {record['model']}",
                            subtitle=f"prompts {record['prompt_set']!r} ({record['n_prompts']}), {record['n_tokens']} tokens",
                            sections=sections)):
        print(f"wrote {path}")


def _report(args) -> int:
    import json
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from lensdyn.hooks.capture import capture
    from lensdyn.models import load_model
    from lensdyn.app.report import export_figures, write_html
    from lensdyn.results import attach_control
    from lensdyn.verdicts import verdict_table

    chosen = [a.strip() for a in args.analyses.split(",") if a.strip()]
    unknown = sorted(set(chosen) - set(ANALYSES))
    if unknown or not chosen:
        raise ArgumentError(f"unknown analysis {unknown or chosen}: choose from {', '.join(ANALYSES)}")
    _check_options(args)
    prompts = _prompts(args.prompts)
    if "steering" in chosen:
        _contrast(args.contrast)  # a bad contrast set fails before any model loads
    _set_threads(args)
    streams = sorted({s for name in chosen for s in _analysis(name).STREAMS})
    runs = []
    if args.compare:
        runs.append(("reference", args.compare, "pretrained"))
    elif args.control == "random" and args.weights != "random":
        runs.append(("reference", args.model, "random"))
    runs.append(("model", args.model, args.weights))
    timings: dict[str, dict[str, float]] = {role: {} for role, _, _ in runs}
    models = {}
    started = time.perf_counter()
    for role, name, weights in runs:  # one after the other: random weights are drawn from the global RNG
        began = time.perf_counter()
        models[role] = load_model(name, weights=weights, seed=args.seed, device=args.device)
        timings[role]["load_s"] = round(time.perf_counter() - began, 3)
        _check_for_model(models[role], prompts, args, chosen)
    loaded = time.perf_counter()
    truncation: dict[str, str | None] = {}
    bar = tqdm(total=len(runs) * (1 + len(chosen)), desc="report", unit="step", disable=None)

    def measure_role(role: str) -> dict[str, object]:
        """Capture once, then every chosen analysis, without the control (attached below)."""
        model, steps, out = models[role], timings[role], {}
        began = time.perf_counter()
        cap = capture(model, prompts, exclude=tuple(args.exclude), batch_size=args.batch_size, streams=streams,
                      truncate=args.truncate, attention=_graphs(args, role))
        steps["capture_s"] = round(time.perf_counter() - began, 3)
        truncation[role] = _truncation_line(cap.truncated, cap.n_prompts, model)
        bar.update(1)
        for analysis in chosen:
            began = time.perf_counter()
            out[analysis] = _analysis(analysis).measure(cap, **_options(analysis, role, model, None, args))
            steps[analysis] = round(time.perf_counter() - began, 3)
            bar.set_postfix_str(f"{role} {analysis}")
            bar.update(1)
        return out

    roles = [role for role, _, _ in runs]
    if len(roles) > 1 and not args.serial:
        # The reference and the model share nothing until the end: measuring them side by side overlaps
        # one's Python-bound steps (clustering, nulls, hooks) with the other's matrix work.
        with ThreadPoolExecutor(max_workers=len(roles)) as pool:
            by_role = dict(zip(roles, pool.map(measure_role, roles)))
    else:
        by_role = {role: measure_role(role) for role in roles}
    bar.close()
    models.clear()  # free both models before writing
    results: dict[str, dict[str, object]] = {}
    for analysis in chosen:
        reference = by_role.get("reference", {}).get(analysis)
        result = by_role["model"][analysis]
        if reference is not None and any(f.name == "control" for f in dataclasses.fields(result)):
            result = attach_control(result, reference)  # norms keeps its reference apart
        results[analysis] = {"model": result, **({"reference": reference} if reference is not None else {})}
    measured = time.perf_counter()
    print(f"loaded in {loaded - started:.1f} s, measured in {measured - loaded:.1f} s"
          + (" (reference and model side by side)" if len(roles) > 1 and not args.serial else ""), file=sys.stderr)
    for line in dict.fromkeys(line for line in truncation.values() if line):  # the control cuts what its model cuts
        print(line, file=sys.stderr)

    reference_label = _reference_label(args)
    args.out.mkdir(parents=True, exist_ok=True)
    written, sections, verdicts, files = [], [], [], {}
    for name in chosen:
        result = results[name]["model"]
        path = result.to_json(args.out / f"{name}.json")
        written.append(path)
        files[name] = path.name
        if name == "norms" and "reference" in results[name]:
            written.append(results[name]["reference"].to_json(args.out / "norms_reference.json"))
            files["norms_reference"] = written[-1].name
        verdicts += result.verdicts()
        print(result.summary(), end="\n\n")
    if verdicts:
        print(verdict_table(verdicts, reference_label), end="\n\n")
    if not args.json_only:
        sections = [_section(name, results[name]) for name in chosen]
        page = "report.html" if len(chosen) > 1 else f"{chosen[0]}.html"
        written.append(write_html(
            args.out / page,
            title=f"lensdyn: {', '.join(chosen)} of {args.model}",
            subtitle=f"prompts {prompts.name!r} ({len(prompts)}), excluded positions {args.exclude}, raw weights; "
            f"reference: {reference_label} (grey)",
            sections=sections, verdicts=verdicts, reference_label=reference_label,
        ))
        figures = {name: section.figure for name, section in zip(chosen, sections)}
        written += export_figures(figures, args.out / "figures", args.static)
    # Per-role steps overlap when the roles run side by side; "wall" is what the whole report took.
    timings["wall"] = {"load_s": round(loaded - started, 3), "measure_s": round(measured - loaded, 3),
                       "write_s": round(time.perf_counter() - measured, 3)}
    index = {
        "model": args.model, "weights": args.weights, "reference": reference_label, "prompts": prompts.name,
        "n_prompts": len(prompts), "excluded_positions": list(args.exclude), "analyses": chosen, "files": files,
        "verdicts": [dataclasses.asdict(v) for v in verdicts], "timings_s": timings,
    }
    report_json = args.out / ("report.json" if len(chosen) > 1 else f"{chosen[0]}_report.json")
    report_json.write_text(json.dumps(index, indent=1), encoding="utf-8")
    written.append(report_json)
    for path in written:
        print(f"wrote {path}")
    return 0


def _reference_label(args) -> str:
    if args.compare:
        return f"{args.compare} (compare)"
    if args.control == "random" and args.weights != "random":
        return "untrained control"
    return "none"


def _section(name: str, by_role: dict):
    from lensdyn.app.report import Section

    model = by_role["model"]
    if name == "norms":
        control = by_role.get("reference")
        text = "\n\n".join(r.summary() for r in (model, control) if r is not None)
        return Section(f"Residual norms of {model.provenance.model}", model.figure(control=control), text)
    heading = {"expansion": "Expansion", "gains": "Sublayer gains", "metastability": "Metastability",
               "curvature": "Curvature and deflection", "stability": "Stability",
               "steering": "Steering across layers"}[name]
    return Section(f"{heading} of {model.provenance.model}", model.figure(), model.summary())


def _analysis(name: str):
    import importlib

    return importlib.import_module(f"lensdyn.analyses.{name}")


def _options(name: str, role: str, model, control, args) -> dict:
    """Keyword arguments of ``<analysis>.measure(capture, ...)`` from the command line."""
    if name == "expansion":
        return dict(model=model, control=control, aggregation=args.aggregation, fit_space=args.fit_space,
                    n_permutations=args.permutations, seed=args.seed)
    if name == "gains":
        return dict(control=control, reference=args.reference, aggregation=args.aggregation, tokens=args.tokens)
    if name == "stability":
        return dict(model=model, control=control, layers=args.layers, profile_prompts=args.profile_prompts,
                    context=args.context, betas=tuple(args.betas), seed=args.seed)
    if name == "steering":
        return dict(model=model, control=control, contrast=args.contrast, layers=args.steer_layers,
                    transfer_layers=args.transfer_layers, relative=tuple(args.relative), n_bootstrap=args.bootstrap,
                    seed=args.seed, progress=True)
    if name == "curvature":
        return dict(model=model, control=control, patch_streams=tuple(args.patch_streams), n_draws=args.null_draws,
                    seed=args.seed)
    if name == "metastability":
        # The repeated-token diagnostic and the attention graphs run for the model only.
        return dict(model=model, control=control, repeated=role == "model", attention_graphs=_graphs(args, role),
                    min_cluster_size=args.min_cluster_size)
    return {}


def _graphs(args, role: str) -> bool:
    return role == "model" and "metastability" in args.analyses and getattr(args, "attention_graphs", False)


if __name__ == "__main__":
    sys.exit(main())
