"""Corpus-scale statistics: prompts stream through in chunks, shards merge into the single-run result.

    stats, record = run_corpus(model, "my_corpus/", "out/")           # one run, resumable
    run_corpus(model, "my_corpus/", "out/", shard=(i, n))              # shard i of n (any scheduler)
    result = corpus_result(*merge_shards(sorted(Path("out").glob("shard-*.json"))))

Each chunk of prompts is captured (packed, ``lensdyn.hooks.capture``), folded into the float64
accumulators of ``lensdyn.streaming`` and dropped, so peak memory depends on the chunk and the
longest prompt, not on the number of prompts. After every chunk the shard's accumulators are
written to a new file and then its JSON record (what was run, how many prompts are done, which
accumulator file holds them) is replaced atomically: a run that stops at any moment resumes
where it stopped when started again with the same arguments, and no chunk is counted twice.
Shard ``i`` of ``n`` takes prompts ``i, i + n, i + 2n, ...``; ``merge_shards`` refuses shards of
different models, prompt sets or settings, and incomplete or missing shards.

A shard is held by one process at a time: ``run_corpus`` takes an exclusive lock on
``shard-i-of-n.lock`` (``fcntl.flock``, which the kernel drops when the holder dies, so a killed
run resumes) and a second run of the same shard is refused with the holder's pid. Shards of one
run lock different files, so a Slurm array can write them into one directory at once.

Every prompt must leave ``MIN_TOKENS`` tokens after the exclusions (each prompt's cloud on the
sphere needs two): a shorter one is refused before the run starts, named, or left out under
``skip_short=True`` (CLI ``--skip-short``), which the record keeps like every other setting.

What streams (every per-state or per-block statistic that can be accumulated): residual norms and the scale
factor ``a(l)`` under both aggregations and under the causal metric, the Hubble rate, attention
and MLP gains (``ln_output`` reference, ratio of means), the residual covariance per state
(participation ratio and top eigenvalues: isotropy), the inner-product histogram and the
interaction energy of each prompt's cloud on the sphere. Analyses that need every token at once
(clustering, CKA, curvature nulls) run on a stated subsample through ``lensdyn report``.
``corpus_result`` turns the merged accumulators into a ``CorpusResult`` (``lensdyn.corpus_result``,
in the core beside the other results, so loading one needs none of this workflow).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX (Windows): shards go unlocked
    fcntl = None

from lensdyn.app.run import CHECKPOINT_SECONDS
from lensdyn.corpus_result import CorpusResult
from lensdyn.errors import ArgumentError, PromptError
from lensdyn.progress import Progress
from lensdyn.prompts import PromptSet, resolve_prompts
from lensdyn.results import Conventions, Provenance
from lensdyn.streaming import (
    CovarianceStats,
    EnergyStats,
    FrequentDirectionsStats,
    GainStats,
    HistogramStats,
    NormStats,
    StreamingStats,
    load,
    merge_all,
    reduce_across_ranks,
)

STREAMS = ("resid", "attn_in", "attn_out", "mlp_in", "mlp_out")
RECORD_FORMAT = "lensdyn.app.corpus/1"
TOP_K = 10
CAUSAL_METRIC = "causal_inverse"  # the metric of resid_causal and causal_scale_factor (lensdyn.metric.METRICS)
MIN_TOKENS = 2  # per prompt: the histogram and energy accumulators read each prompt's cloud of included tokens


def new_stats(covariance_states: Sequence[int] | None = None, covariance_sketch: int | None = None) -> StreamingStats:
    """The accumulators one corpus run fills (``resid_causal`` is the residual seen through the causal metric's whitener).

    The covariance reads every state (``resid``) or only ``covariance_states`` (``resid_covariance``:
    those states of the residual), exactly (``CovarianceStats``) or as a Frequent Directions sketch of
    ``covariance_sketch`` rows per state (``FrequentDirectionsStats``).
    """
    covariance = CovarianceStats() if covariance_sketch is None else FrequentDirectionsStats(covariance_sketch)
    return StreamingStats({
        "norms": (NormStats(), "resid"),
        "causal_norms": (NormStats(), "resid_causal"),
        "attn_gain": (GainStats(), ("attn_out", "attn_in")),
        "mlp_gain": (GainStats(), ("mlp_out", "mlp_in")),
        "covariance": (covariance, "resid" if covariance_states is None else "resid_covariance"),
        "histogram": (HistogramStats(), "resid"),
        "energy": (EnergyStats(), "resid"),
    })


def check_states(states: Sequence[int], n_states: int | None = None) -> list[int]:
    """``states`` as a list, once it is non-empty, unique, increasing and (given ``n_states``) within ``0..n_states - 1``.

    >>> check_states([0, 31], 31)
    Traceback (most recent call last):
    ...
    lensdyn.errors.ArgumentError: covariance states [0, 31]: the model has states 0..30
    """
    states = [int(s) for s in states]
    if not states:
        raise ArgumentError("covariance states: give at least one state")
    if len(set(states)) != len(states) or states != sorted(states):
        raise ArgumentError(f"covariance states {states}: give each state once, in increasing order")
    if states[0] < 0:
        raise ArgumentError(f"covariance states {states}: states are numbered from 0 (the embeddings)")
    if n_states is not None and states[-1] >= n_states:
        raise ArgumentError(f"covariance states {states}: the model has states 0..{n_states - 1}")
    return states


def check_sketch(ell: int | None) -> int | None:
    """A sketch needs more rows than the ``TOP_K`` eigenvalues it reports (after a shrink it holds ``ell - 1``)."""
    if ell is not None and not (isinstance(ell, int) and ell > TOP_K):
        raise ArgumentError(f"--covariance-sketch takes a number of rows above {TOP_K} (the top {TOP_K} eigenvalues "
                            f"it reports), not {ell!r}")
    return ell


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``.

    >>> parse_shard("2/8")
    (2, 8)
    """
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ArgumentError(f"--shard takes i/n (e.g. 0/4), not {text!r}") from None
    if not 0 <= index < count:
        raise ArgumentError(f"shard {text!r}: need 0 <= i < n")
    return index, count


def subsample(prompts: PromptSet, k: int, seed: int = 0) -> PromptSet:
    """``k`` prompts drawn without replacement under ``seed``, in corpus order, named as such: what the
    analyses that need every token at once (clustering, CKA) run on.

    >>> subsample(PromptSet.from_texts(["a", "b", "c", "d"], name="c4"), 2).name
    'c4 (subsample of 2 of 4, seed 0)'
    """
    chosen = subsample_indices(len(prompts), k, seed)
    if len(chosen) == len(prompts):
        return prompts
    return subset(prompts, chosen, f"{prompts.name} (subsample of {k} of {len(prompts)}, seed {seed})")


def subsample_indices(n: int, k: int, seed: int = 0) -> list[int]:
    """The prompts ``subsample`` draws from ``n``, in order (all of them when ``k >= n``).

    >>> subsample_indices(4, 9)
    [0, 1, 2, 3]
    """
    if k < 1:
        raise ArgumentError(f"a subsample needs at least 1 prompt, not {k}")
    if k >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())


def subset(prompts: PromptSet, indices: Sequence[int], name: str | None = None) -> PromptSet:
    """The prompts at ``indices``, with their labels."""
    return PromptSet(name=prompts.name if name is None else name, texts=tuple(prompts.texts[i] for i in indices),
                     labels=tuple(prompts.labels[i] for i in indices))


def usable_subsample(model, prompts: PromptSet, k: int, seed: int = 0, *, exclude: Sequence[str] = ("first",),
                     truncate: bool = False, skip_short: bool = False) -> PromptSet:
    """``subsample(prompts, k, seed)`` checked like a corpus shard before anything runs: a prompt too short for
    its cloud is refused, named, or (``skip_short``) left out of the draw, which the name then says."""
    chosen = subsample_indices(len(prompts), k, seed)
    short = short_prompts(model, prompts, chosen, exclude, truncate)
    if short and not skip_short:
        raise short_prompt_error(prompts, short, exclude)
    kept = [i for i in chosen if i not in set(short)]
    if not kept:
        raise PromptError(f"every prompt of the subsample of {prompts.name!r} is too short: "
                          "give longer prompts or --subsample 0")
    if len(chosen) == len(prompts) and not short:
        return prompts
    name = f"{prompts.name} (subsample of {len(chosen)} of {len(prompts)}, seed {seed}"
    name += f"; {len(short)} short prompt(s) left out)" if short else ")"
    return subset(prompts, kept, name)


def included_tokens(model, prompts: PromptSet, exclude: Sequence[str] = ("first",), truncate: bool = False) -> list[int]:
    """How many tokens of each prompt a capture keeps after truncation and ``exclude``, without a forward pass.

    ``lensdyn.hooks.capture.included_counts``: the capture's own tokenisation and exclusion rules,
    so the count is the capture's. A prompt longer than the context raises ``PromptTooLongError``
    here already unless ``truncate``.
    """
    from lensdyn.hooks.capture import included_counts

    return included_counts(model, prompts, exclude, truncate)


def short_prompts(model, prompts: PromptSet, indices: Sequence[int], exclude: Sequence[str], truncate: bool) -> list[int]:
    """Those of ``indices`` whose prompts keep fewer than ``MIN_TOKENS`` tokens."""
    if not indices:
        return []
    counts = included_tokens(model, subset(prompts, indices), exclude, truncate)
    return [i for i, n in zip(indices, counts) if n < MIN_TOKENS]


def describe_prompt(prompts: PromptSet, i: int) -> str:
    """``prompt 3 ('b': 'Hi')``: a prompt by its index, its label and its start, for messages.

    >>> describe_prompt(PromptSet.from_texts(["Hi", "A long prompt " * 9], name="c"), 1)
    "prompt 1 ('c[1]': 'A long prompt A long prompt A long promp...')"
    """
    text = prompts.texts[i]
    start = text[:40].rstrip() + ("..." if len(text) > 40 else "")
    return f"prompt {i} ({prompts.labels[i]!r}: {start!r})"


def short_prompt_error(prompts: PromptSet, short: Sequence[int], exclude: Sequence[str]) -> PromptError:
    """Names the first short prompt and says how many more there are."""
    more = f" (and {len(short) - 1} more)" if len(short) > 1 else ""
    return PromptError(
        f"{describe_prompt(prompts, short[0])} of {prompts.name!r}{more} keeps fewer than {MIN_TOKENS} tokens after "
        f"excluding {list(exclude)}, and each prompt's cloud needs {MIN_TOKENS}: remove it from the corpus, "
        "or leave such prompts out with --skip-short (run_corpus(skip_short=True))"
    )


def fingerprint(prompts: PromptSet) -> str:
    """SHA-256 of the prompt texts in order: shards and resumed runs must see the same corpus."""
    digest = hashlib.sha256()
    for text in prompts.texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def record_path(out: Path, shard: tuple[int, int]) -> Path:
    """The JSON record of one shard (it names the accumulator file beside it)."""
    return out / f"shard-{shard[0]}-of-{shard[1]}.json"


def lock_path(out: Path, shard: tuple[int, int]) -> Path:
    """The file a run holds locked while it works on one shard."""
    return record_path(out, shard).with_suffix(".lock")


_HELD: set[Path] = set()  # shard locks this process holds: run_corpus inside the CLI's lock takes it again
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}  # the file system has no flock


@contextmanager
def shard_lock(out: str | Path, shard: tuple[int, int] = (0, 1)) -> Iterator[Path]:
    """Hold ``out/shard-i-of-n.lock`` exclusively for the body; a second holder is refused, by pid.

    ``flock`` is released by the kernel when the holder exits in any way (kill -9 included), so
    a stale lock file never blocks a resume; its content (pid and host) only names the holder.
    The file is left in place: deleting it would let a third run lock a new file while the
    second still holds the old one.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = lock_path(out, shard).resolve()
    if path in _HELD or fcntl is None:  # held here already; or no flock on this platform
        yield path
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if _flock(fd, path, shard):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            _HELD.add(path)
        try:
            yield path
        finally:
            _HELD.discard(path)
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _flock(fd: int, path: Path, shard: tuple[int, int]) -> bool:
    """Lock ``fd`` or refuse, naming the holder; False where the file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown pid"
        raise ArgumentError(f"shard {shard[0]}/{shard[1]} in {path.parent} is in use by another run ({holder}): "
                            "wait for it to finish, or give another --out") from None
    except OSError as err:
        if err.errno not in _NO_FLOCK:
            raise
        # Some cluster file systems (Lustre mounted without flock, some NFS) refuse every lock: run unguarded
        # rather than not at all, and say so.
        print(f"lensdyn: warning: cannot lock {path} ({err.strerror}): nothing stops a second run of shard "
              f"{shard[0]}/{shard[1]} there", file=sys.stderr)
        return False


def run_corpus(
    model,
    prompts,
    out: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    chunk: int = 16,
    batch_size: int = 8,
    exclude: Sequence[str] = ("first",),
    truncate: bool = False,
    progress: bool = True,
    resume: bool = True,
    skip_short: bool = False,
    covariance_states: Sequence[int] | None = None,
    covariance_sketch: int | None = None,
    distributed: bool | None = None,
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> tuple[StreamingStats | None, dict]:
    """Stream this shard's prompts through ``model`` chunk by chunk; returns ``(accumulators, record)``.

    Resumes from ``out/shard-i-of-n.json`` when that record matches this run (model, weights,
    corpus fingerprint, exclusions, covariance settings); a record that does not match is an error, not silently
    overwritten (pass ``resume=False`` to start again). ``batch_size`` is the capture's: with more than
    one prompt per forward pass, which prompts share a batch changes the float32 activations themselves
    (matmul shapes and summation order, about 1e-7 relative), so shards of a batched run agree with the
    single run to that; with ``batch_size=1`` every prompt's activations are the same in any shard and
    merged shards equal the single run to float64 round-off.

    Every prompt of the shard is tokenised first: one that keeps fewer than ``MIN_TOKENS`` tokens
    after ``exclude`` is an error naming it, or with ``skip_short`` is left out (its index in the
    record's ``"skipped"``). The record's ``"truncated"`` lists the prompts cut to the context.

    ``covariance_states`` (increasing state numbers) limits the covariance to those states
    (``len(states) x d_model^2`` floats); ``covariance_sketch`` (``ell`` rows) replaces it by a
    Frequent Directions sketch (``states x ell x d_model``; ``FrequentDirectionsStats`` states its
    error bound). Both are settings of the record, like the exclusions.

    The record and its accumulators are written after the chunk that ends ``checkpoint_seconds`` or more
    after the last write, and after the last chunk: a stopped run resumes from its last write (0: after
    every chunk). Each write is the whole accumulator set (82 MB for smollm2-135m, GBs at a wide d_model),
    so writing after every chunk of a fast model would cost more than it saves.

    ``distributed`` (default: ``WORLD_SIZE > 1``, as under ``torchrun``): this process is rank ``r``
    of ``w`` and streams shard ``(r, w)`` exactly as ``shard=(r, w)`` would (its own record and lock,
    so each rank resumes); the ranks then reduce their accumulators with ``torch.distributed``
    (``lensdyn.streaming.reduce_across_ranks``), and rank 0 returns the merged accumulators and the
    record ``merge_shards`` would give; the other ranks return ``(None, their shard's record)``.
    The process group (gloo, or nccl when the model is on CUDA) is started here unless one is
    already, and then destroyed here. A rank whose corpus or settings differ from rank 0's, or
    whose shard fails, is an error raised on every rank.
    """
    if chunk < 1:
        raise ArgumentError(f"chunk must be at least 1 prompt, not {chunk}")
    if batch_size < 1:
        raise ArgumentError(f"batch_size must be at least 1, not {batch_size}")
    if not 0 <= checkpoint_seconds < float("inf"):
        raise ArgumentError(f"checkpoint_seconds must be a finite number of seconds >= 0, not {checkpoint_seconds}")
    states = None if covariance_states is None else check_states(covariance_states, model_n_states(model))
    settings = dict(exclude=tuple(exclude), truncate=truncate, skip_short=skip_short, covariance_states=states,
                    covariance_sketch=check_sketch(covariance_sketch), checkpoint_seconds=checkpoint_seconds)
    prompt_set = resolve_prompts(prompts)
    if distributed is None:
        distributed = world_size() > 1
    if distributed:
        if shard != (0, 1):
            raise ArgumentError(f"a distributed run takes its shard from its rank: give no shard (got {shard[0]}/{shard[1]})")
        return _run_distributed(model, prompt_set, Path(out), chunk, batch_size, progress, resume, settings)
    with shard_lock(out, shard):
        return _run_locked(model, prompt_set, Path(out), shard, chunk, batch_size, progress, resume, settings)


def model_n_states(model) -> int:
    """The residual states a capture holds: the embeddings and each block's output."""
    return int(model.cfg.n_layers) + 1


def world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 outside torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ArgumentError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def _new_record(model, prompt_set: PromptSet, shard, settings: dict) -> dict:
    """What a record says of the run before any prompt is streamed (the settings every shard and rank share)."""
    from lensdyn.models import model_info

    info = model_info(model)
    return {
        "format": RECORD_FORMAT, "model": info.name, "weights": info.weights, "seed": info.seed, "layout": info.layout,
        "weights_source": info.weights_source, "n_params": info.n_params, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_set": prompt_set.name, "fingerprint": fingerprint(prompt_set), "n_prompts_total": len(prompt_set),
        "shard": list(shard), "exclude": list(settings["exclude"]), "truncate": settings["truncate"],
        "skip_short": settings["skip_short"], "covariance_states": settings["covariance_states"],
        "covariance_sketch": settings["covariance_sketch"],
    }


def _run_locked(model, prompt_set: PromptSet, out: Path, shard, chunk, batch_size, progress, resume,
                settings: dict) -> tuple[StreamingStats, dict]:
    from lensdyn.hooks.capture import capture
    from lensdyn.hooks.circuits import model_causal_metric

    exclude, truncate, skip_short = settings["exclude"], settings["truncate"], settings["skip_short"]
    states = settings["covariance_states"]
    mine = list(range(shard[0], len(prompt_set), shard[1]))
    short = short_prompts(model, prompt_set, mine, exclude, truncate)
    if skip_short:
        mine = [i for i in mine if i not in set(short)]
    record = _new_record(model, prompt_set, shard, settings) | {
        "n_prompts": len(mine), "skipped": short if skip_short else [],
        "prompts_done": 0, "n_tokens": 0, "truncated": [], "stats_file": None,
    }
    path = record_path(out, shard)
    stats = new_stats(states, settings["covariance_sketch"])
    if resume and path.exists():
        redo = f"run again with --restart (resume=False) to redo shard {shard[0]}/{shard[1]} from its start"
        previous = read_record(path, redo)
        _check_same_run(previous, record, path)
        record |= {k: previous[k] for k in ("prompts_done", "n_tokens", "stats_file")}
        record["truncated"] = list(previous.get("truncated", []))
        stats = _load_stats(path, record, redo)
    if short and not skip_short:  # after the resume check, so a changed --skip-short reads as a changed setting
        raise short_prompt_error(prompt_set, short, exclude)
    whitener = model_causal_metric(model, name=CAUSAL_METRIC).whitener
    texts = [prompt_set.texts[i] for i in mine]
    written = time.monotonic()
    with Progress(len(mine), f"corpus shard {shard[0]}/{shard[1]}", unit="prompt", initial=record["prompts_done"],
                  enabled=progress) as bar:
        for start in range(record["prompts_done"], len(mine), chunk):
            cap = capture(model, texts[start: start + chunk], streams=STREAMS, exclude=exclude, truncate=truncate,
                          batch_size=batch_size)
            resid = cap.tokens_of("resid")
            extra = {"resid_causal": resid @ whitener.to(resid.device, resid.dtype)}
            if states is not None:
                extra["resid_covariance"] = resid[states]
            stats.update_from_capture(cap, extra=extra)
            record["prompts_done"] = min(start + chunk, len(mine))
            record["n_tokens"] += cap.n_tokens
            record["truncated"] += [mine[start + i] for i in cap.truncated]
            if record["prompts_done"] == len(mine) or time.monotonic() - written >= settings["checkpoint_seconds"]:
                _checkpoint(stats, record, path)
                written = time.monotonic()
            bar.update(cap.n_prompts)
    return stats, record


REDUCE_TIMEOUT = timedelta(days=2)  # a rank waits for the slowest (a resumed one may be done hours before the rest)


def _run_distributed(model, prompt_set: PromptSet, out: Path, chunk, batch_size, progress, resume,
                     settings: dict) -> tuple[StreamingStats | None, dict]:
    import torch
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        if not all(k in os.environ for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
            raise ArgumentError("a distributed run needs torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, "
                                "MASTER_PORT): launch it with torchrun, or run without --distributed")
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=REDUCE_TIMEOUT)
    try:
        shard = (dist.get_rank(), dist.get_world_size())
        _same_on_every_rank(_new_record(model, prompt_set, shard, settings))
        stats, record, failure = None, None, None
        try:
            with shard_lock(out, shard):
                stats, record = _run_locked(model, prompt_set, out, shard, chunk, batch_size, progress, resume, settings)
        except Exception as err:  # every rank must hear of it, or the others would wait for this one forever
            failure = err
        _no_rank_failed(failure)
        records = [None] * shard[1]
        dist.all_gather_object(records, record)
        merged = reduce_across_ranks(stats)
        if shard[0] != 0:
            return None, record
        return merged, merged_record(records)
    finally:
        if owned:
            dist.destroy_process_group()


def _same_on_every_rank(record: dict) -> None:
    """Refuse, on every rank, a run whose ranks differ in corpus or settings (before any of them streams)."""
    import torch.distributed as dist

    mine = {k: record[k] for k in SETTINGS if k != "shard"} | {"n_prompts_total": record["n_prompts_total"]}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    for rank, theirs in enumerate(every[1:], start=1):
        changed = [k for k in mine if theirs[k] != every[0][k]]
        if changed:
            raise ArgumentError(f"rank {rank} of {len(every)} runs another corpus or settings than rank 0 "
                                f"({', '.join(changed)} differ): give every rank the same arguments and files")


def _no_rank_failed(failure: Exception | None) -> None:
    """After every rank's shard: a failure anywhere is raised everywhere (its own error on the rank it came from)."""
    import torch.distributed as dist

    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    for rank, message in enumerate(every):
        if message is not None:
            raise ArgumentError(f"rank {rank} failed ({message.splitlines()[0]}): nothing was reduced")


SETTINGS = ("format", "model", "weights", "seed", "dtype", "fingerprint", "shard", "exclude", "truncate", "skip_short",
            "covariance_states", "covariance_sketch")
# What a record written before a field existed meant by it.
RECORD_DEFAULTS = {"skip_short": False, "skipped": [], "truncated": [], "covariance_states": None,
                   "covariance_sketch": None}


def _check_same_run(previous: dict, record: dict, path: Path) -> None:
    changed = [k for k in SETTINGS if previous.get(k, RECORD_DEFAULTS.get(k)) != record.get(k, RECORD_DEFAULTS.get(k))]
    if changed:
        raise ArgumentError(f"{path} belongs to another run ({', '.join(changed)} differ): "
                            "use another --out, or start again (resume=False, CLI --restart)")


def read_record(path: Path, redo: str) -> dict:
    """A shard's JSON record; a missing, damaged or foreign file is an error naming it and ``redo``, the way out
    (a record a run stopped writing is never damaged: it is replaced atomically; a disk or a copy can damage it)."""
    if path.suffix == ".npz":
        raise ArgumentError(f"{path} holds a shard's accumulators, not its record: give the shard-i-of-n.json "
                            "files beside it")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArgumentError(f"no shard record {path}: give the shard-i-of-n.json files a corpus run wrote") from None
    except IsADirectoryError:
        raise ArgumentError(f"{path} is a directory: give its shard-*.json files") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArgumentError(f"{path} is damaged ({_reason(err)}): {redo}") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        found = record.get("format", record.get("kind")) if isinstance(record, dict) else type(record).__name__
        raise ArgumentError(f"{path} is not a corpus shard record (format {found!r}, not {RECORD_FORMAT!r}): "
                            "give the shard-i-of-n.json files a corpus run wrote")
    missing = [k for k in (*SETTINGS, "n_prompts", "n_prompts_total", "prompts_done", "n_tokens", "stats_file")
               if k not in record and k not in RECORD_DEFAULTS]
    if missing:
        raise ArgumentError(f"{path} is damaged (it lacks {', '.join(missing)}): {redo}")
    return record


def _load_stats(path: Path, record: dict, redo: str) -> StreamingStats:
    """The accumulators a record names; a missing or damaged file is an error naming it and the way out."""
    if record["stats_file"] is None:  # a shard with no prompts (or none left by --skip-short)
        return new_stats(record.get("covariance_states"), record.get("covariance_sketch"))
    stats_path = path.parent / record["stats_file"]
    if not stats_path.exists():
        raise ArgumentError(f"{stats_path}, which {path.name} names, is missing: {redo}")
    try:
        return load(stats_path)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ArgumentError(f"{stats_path} is damaged ({_reason(err)}): {redo}") from None


def _reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _checkpoint(stats: StreamingStats, record: dict, path: Path) -> None:
    # New accumulators go to a new file; only then does the record switch to it (os.replace is atomic).
    # Stopped anywhere, the record on disk names a complete file that holds exactly its prompts_done.
    # Both are on disk (fsync) before the switch: after a power cut the record never names a truncated file.
    old = record["stats_file"]
    record["stats_file"] = f"{path.stem}.{record['prompts_done']:08d}.npz"
    _fsync(stats.save(path.parent / record["stats_file"]))
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
    _fsync(temporary)
    os.replace(temporary, path)
    if old and old != record["stats_file"]:
        (path.parent / old).unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def merge_shards(paths: Sequence[str | Path]) -> tuple[StreamingStats, dict]:
    """Every shard of one run (their ``.json`` records), merged: ``(accumulators, record)`` equal to a single
    run's, to float64 round-off."""
    if not paths:
        raise ArgumentError("no shard files given")
    paths = [Path(p) for p in paths]
    records = [read_record(p, _redo(p)) for p in paths]
    first = records[0]
    for path, rec in zip(paths, records):
        _check_same_run(first | {"shard": rec["shard"]}, rec, path)
        if rec["prompts_done"] < rec["n_prompts"]:
            raise ArgumentError(f"{path} is incomplete ({rec['prompts_done']} of {rec['n_prompts']} prompts): "
                                "run that shard again to resume it")
    count = first["shard"][1]
    found = sorted(rec["shard"][0] for rec in records)
    if found != list(range(count)) or any(rec["shard"][1] != count for rec in records):
        raise ArgumentError(f"need shards 0..{count - 1} of {count} exactly once, got {found}")
    merged = merge_all(_load_stats(path, rec, _redo(path)) for path, rec in zip(paths, records))
    return merged, merged_record(records)


def merged_record(records: Sequence[dict]) -> dict:
    """The record of every shard of one run taken together (what a single run's would say, ``merged_from`` shards)."""
    n_prompts = sum(rec["n_prompts"] for rec in records)  # the total less the prompts --skip-short left out
    return records[0] | {"shard": [0, 1], "n_prompts": n_prompts, "prompts_done": n_prompts,
                         "n_tokens": sum(rec["n_tokens"] for rec in records), "merged_from": len(records),
                         "stats_file": None,
                         **{k: sorted(i for rec in records for i in rec.get(k, [])) for k in ("skipped", "truncated")}}


def _redo(path: Path) -> str:
    """How to redo the shard of ``path``, read off its file name (the record may be too damaged to say)."""
    found = re.fullmatch(r"shard-(\d+)-of-(\d+)\.json", path.name)
    shard = f"{found[1]}/{found[2]}" if found else "i/n"
    return f"redo that shard with `lensdyn corpus ... --out {path.parent} --shard {shard} --restart` (the run's other arguments)"


def _skipped_note(record: dict) -> str:
    skipped = record.get("skipped", [])
    if not skipped:
        return ""
    return f"; {len(skipped)} prompt(s) with fewer than {MIN_TOKENS} included tokens left out (skip_short)"


def corpus_result(stats: StreamingStats, record: dict) -> CorpusResult:
    """The final statistics of (merged) accumulators and their record."""
    from lensdyn import __version__

    norms = stats["norms"]
    spectrum = covariance_spectrum(stats["covariance"], record, len(norms.mean_norm))
    return CorpusResult(
        conventions=Conventions(
            aggregation="streamed over every included token of every prompt (float64 accumulators); a(l) and gains as "
            "ratio of means; histogram and energy averaged over prompts" + _skipped_note(record) + spectrum["note"],
            excluded_positions=tuple(record["exclude"]),
            causal_metrics=(CAUSAL_METRIC,),
        ),
        provenance=Provenance(
            model=record["model"], weights=record["weights"], seed=record["seed"], layout=record["layout"],
            prompt_set=record["prompt_set"], n_prompts=record["n_prompts"], n_tokens=record["n_tokens"],
            lensdyn_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            n_params=record["n_params"], weights_source=record.get("weights_source", ""),  # records before it: unsaid
        ),
        n_shards=int(record.get("merged_from", 1)),
        mean_norm=norms.mean_norm,
        std_norm=norms.std_norm,
        scale_factor=norms.scale_factor("ratio_of_means"),
        scale_factor_mean_of_ratios=norms.scale_factor("mean_of_ratios"),
        hubble_rate=norms.hubble_rate("ratio_of_means"),
        causal_scale_factor=stats["causal_norms"].scale_factor("ratio_of_means"),
        attn_gain=stats["attn_gain"].gain("ratio_of_means"),
        mlp_gain=stats["mlp_gain"].gain("ratio_of_means"),
        participation_ratio=spectrum["participation_ratio"],
        top_eigenvalues=spectrum["top_eigenvalues"],
        histogram=stats["histogram"].histogram,
        bins=np.asarray(stats["histogram"].bins, dtype=np.float64),
        energy=stats["energy"].mean_energy,
        betas=np.asarray(stats["energy"].betas, dtype=np.float64),
        covariance_states=np.asarray(spectrum["states"], dtype=np.int64),
        covariance_sketch=record.get("covariance_sketch"),
        eigenvalue_error=spectrum["eigenvalue_error"],
    )


def covariance_spectrum(covariance: CovarianceStats | FrequentDirectionsStats, record: dict, n_states: int) -> dict:
    """Participation ratio, top eigenvalues and their error bound per state, NaN at the states the covariance did not
    cover (``record["covariance_states"]``); under a sketch the participation ratio is NaN too (it needs every
    eigenvalue) and the error bound is the sketch's (``FrequentDirectionsStats.error_bound``), 0 where exact."""
    states = record.get("covariance_states") or list(range(n_states))
    sketch = isinstance(covariance, FrequentDirectionsStats)
    if sketch:
        eigenvalues, error = covariance.eigenvalues, covariance.error_bound
    else:
        eigenvalues = np.clip(np.linalg.eigvalsh(covariance.covariance)[:, ::-1], 0.0, None)
        error = np.zeros(len(states))
    out = {"states": states, "participation_ratio": np.full(n_states, np.nan), "top_eigenvalues": np.full(
        (n_states, min(TOP_K, eigenvalues.shape[1])), np.nan), "eigenvalue_error": np.full(n_states, np.nan)}
    out["top_eigenvalues"][states] = eigenvalues[:, :TOP_K]
    out["eigenvalue_error"][states] = error
    if not sketch:
        out["participation_ratio"][states] = eigenvalues.sum(1) ** 2 / (eigenvalues**2).sum(1)
    notes = []
    if len(states) < n_states:
        notes.append(f"covariance (participation ratio, top eigenvalues) at states {states} only, NaN at the others")
    if sketch:
        notes.append(f"covariance spectrum from a Frequent Directions sketch of {record['covariance_sketch']} rows per "
                     "state: each top eigenvalue under-estimated by at most eigenvalue_error; participation ratio NaN "
                     "(it needs every eigenvalue)")
    out["note"] = "".join(f"; {note}" for note in notes)
    return out
