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

What streams (every per-layer statistic that can be accumulated): residual norms and the scale
factor ``a(l)`` under both aggregations and under the causal metric, the Hubble rate, attention
and MLP gains (``ln_output`` reference, ratio of means), the residual covariance per state
(participation ratio and top eigenvalues: isotropy), the inner-product histogram and the
interaction energy of each prompt's cloud on the sphere. Analyses that need every token at once
(clustering, CKA, curvature nulls) run on a stated subsample through ``lensdyn report``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from jaxtyping import Float
from tqdm.auto import tqdm

from lensdyn.errors import ArgumentError
from lensdyn.prompts import PromptSet, resolve_prompts
from lensdyn.results import Conventions, Provenance, Result
from lensdyn.streaming import (
    CovarianceStats,
    EnergyStats,
    GainStats,
    HistogramStats,
    NormStats,
    StreamingStats,
    load,
    merge_all,
)

STREAMS = ("resid", "attn_in", "attn_out", "mlp_in", "mlp_out")
RECORD_FORMAT = "lensdyn.corpus/1"
TOP_K = 10


def new_stats() -> StreamingStats:
    """The accumulators one corpus run fills (``resid_causal`` is the residual seen through the causal metric's whitener)."""
    return StreamingStats({
        "norms": (NormStats(), "resid"),
        "causal_norms": (NormStats(), "resid_causal"),
        "attn_gain": (GainStats(), ("attn_out", "attn_in")),
        "mlp_gain": (GainStats(), ("mlp_out", "mlp_in")),
        "covariance": (CovarianceStats(), "resid"),
        "histogram": (HistogramStats(), "resid"),
        "energy": (EnergyStats(), "resid"),
    })


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
    if k < 1:
        raise ArgumentError(f"a subsample needs at least 1 prompt, not {k}")
    if k >= len(prompts):
        return prompts
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(prompts), size=k, replace=False).tolist())
    return PromptSet(name=f"{prompts.name} (subsample of {k} of {len(prompts)}, seed {seed})",
                     texts=tuple(prompts.texts[i] for i in chosen), labels=tuple(prompts.labels[i] for i in chosen))


def fingerprint(prompts: PromptSet) -> str:
    """SHA-256 of the prompt texts in order: shards and resumed runs must see the same corpus."""
    digest = hashlib.sha256()
    for text in prompts.texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def record_path(out: Path, shard: tuple[int, int]) -> Path:
    """The JSON record of one shard (it names the accumulator file beside it)."""
    return out / f"shard-{shard[0]}-of-{shard[1]}.json"


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
) -> tuple[StreamingStats, dict]:
    """Stream this shard's prompts through ``model`` chunk by chunk; returns ``(accumulators, record)``.

    Resumes from ``out/shard-i-of-n.json`` when that record matches this run (model, weights,
    corpus fingerprint, exclusions); a record that does not match is an error, not silently
    overwritten (pass ``resume=False`` to start again). ``batch_size`` is the capture's: with more than
    one prompt per forward pass, which prompts share a batch changes the float32 activations themselves
    (matmul shapes and summation order, about 1e-7 relative), so shards of a batched run agree with the
    single run to that; with ``batch_size=1`` every prompt's activations are the same in any shard and
    merged shards equal the single run to float64 round-off.
    """
    from lensdyn.hooks.capture import capture
    from lensdyn.hooks.circuits import model_causal_metric
    from lensdyn.models import model_info

    if chunk < 1:
        raise ArgumentError(f"chunk must be at least 1 prompt, not {chunk}")
    prompt_set = resolve_prompts(prompts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = model_info(model)
    mine = list(range(shard[0], len(prompt_set), shard[1]))
    record = {
        "format": RECORD_FORMAT, "model": info.name, "weights": info.weights, "seed": info.seed, "layout": info.layout,
        "n_params": info.n_params, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_set": prompt_set.name, "fingerprint": fingerprint(prompt_set), "n_prompts_total": len(prompt_set),
        "shard": list(shard), "n_prompts": len(mine), "exclude": list(exclude), "truncate": truncate,
        "prompts_done": 0, "n_tokens": 0, "stats_file": None,
    }
    path = record_path(out, shard)
    stats = new_stats()
    if resume and path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        _check_same_run(previous, record, path)
        record |= {k: previous[k] for k in ("prompts_done", "n_tokens", "stats_file")}
        if record["stats_file"]:
            stats = load(out / record["stats_file"])
    whitener = model_causal_metric(model).whitener
    texts = [prompt_set.texts[i] for i in mine]
    with tqdm(total=len(mine), initial=record["prompts_done"], unit="prompt", desc=f"corpus shard {shard[0]}/{shard[1]}",
              disable=not progress) as bar:
        for start in range(record["prompts_done"], len(mine), chunk):
            cap = capture(model, texts[start: start + chunk], streams=STREAMS, exclude=exclude, truncate=truncate,
                          batch_size=batch_size)
            resid = cap.tokens_of("resid")
            stats.update_from_capture(cap, extra={"resid_causal": resid @ whitener.to(resid.dtype)})
            record["prompts_done"] = min(start + chunk, len(mine))
            record["n_tokens"] += cap.n_tokens
            _checkpoint(stats, record, path)
            bar.update(cap.n_prompts)
    return stats, record


def _check_same_run(previous: dict, record: dict, path: Path) -> None:
    keys = ("format", "model", "weights", "seed", "dtype", "fingerprint", "shard", "exclude", "truncate")
    changed = [k for k in keys if previous.get(k) != record[k]]
    if changed:
        raise ArgumentError(f"{path} belongs to another run ({', '.join(changed)} differ): "
                            "use another --out, or start again (resume=False, CLI --restart)")


def _checkpoint(stats: StreamingStats, record: dict, path: Path) -> None:
    # New accumulators go to a new file; only then does the record switch to it (os.replace is atomic).
    # Stopped anywhere, the record on disk names a complete file that holds exactly its prompts_done.
    old = record["stats_file"]
    record["stats_file"] = f"{path.stem}.{record['prompts_done']:08d}.npz"
    stats.save(path.parent / record["stats_file"])
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(temporary, path)
    if old and old != record["stats_file"]:
        (path.parent / old).unlink(missing_ok=True)


def merge_shards(paths: Sequence[str | Path]) -> tuple[StreamingStats, dict]:
    """Every shard of one run (their ``.json`` records), merged: ``(accumulators, record)`` equal to a single
    run's, to float64 round-off."""
    if not paths:
        raise ArgumentError("no shard files given")
    paths = [Path(p) for p in paths]
    records = [json.loads(p.read_text(encoding="utf-8")) for p in paths]
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
    merged = merge_all(load(path.parent / rec["stats_file"]) for path, rec in zip(paths, records))
    record = first | {"shard": [0, 1], "n_prompts": first["n_prompts_total"], "prompts_done": first["n_prompts_total"],
                      "n_tokens": sum(rec["n_tokens"] for rec in records), "merged_from": count, "stats_file": None}
    return merged, record


@dataclass(frozen=True, eq=False)
class CorpusResult(Result):
    """Streamed per-layer statistics of a corpus. ``state`` indexes ``0..n_layers``, ``block`` the blocks."""

    n_shards: int
    mean_norm: Float[np.ndarray, " state"]
    std_norm: Float[np.ndarray, " state"]
    scale_factor: Float[np.ndarray, " state"]  # ratio of means
    scale_factor_mean_of_ratios: Float[np.ndarray, " state"]
    hubble_rate: Float[np.ndarray, " block"]
    causal_scale_factor: Float[np.ndarray, " state"]
    attn_gain: Float[np.ndarray, " block"]
    mlp_gain: Float[np.ndarray, " block"]
    participation_ratio: Float[np.ndarray, " state"]
    top_eigenvalues: Float[np.ndarray, "state k"]
    histogram: Float[np.ndarray, "state bin"]
    bins: Float[np.ndarray, " edge"]
    energy: Float[np.ndarray, "beta state"]
    betas: Float[np.ndarray, " beta"]

    def summary(self) -> str:
        p = self.provenance
        lines = [f"Corpus statistics: {p.model} ({p.weights}), prompts {p.prompt_set!r}: {p.n_prompts} prompts, "
                 f"{p.n_tokens} tokens, {self.n_shards} shard(s); {self.conventions.aggregation}",
                 f"{'state':>5} {'mean norm':>11} {'a(l)':>8} {'a_causal':>9} {'PR':>7}"]
        for l in range(len(self.mean_norm)):
            lines.append(f"{l:>5} {self.mean_norm[l]:>11.3f} {self.scale_factor[l]:>8.3f} "
                         f"{self.causal_scale_factor[l]:>9.3f} {self.participation_ratio[l]:>7.2f}")
        return "\n".join(lines)

    def figure(self):
        from plotly.subplots import make_subplots

        states = np.arange(len(self.mean_norm))
        fig = make_subplots(rows=2, cols=2, subplot_titles=(
            "scale factor a(l)", "sublayer gains", "participation ratio of the residual covariance",
            "inner products on the sphere (histogram per state)"))
        fig.add_scatter(x=states, y=self.scale_factor, name="a(l), Euclidean", row=1, col=1)
        fig.add_scatter(x=states, y=self.causal_scale_factor, name="a(l), causal metric", row=1, col=1)
        fig.add_scatter(x=states[:-1], y=self.attn_gain, name="attention gain", row=1, col=2)
        fig.add_scatter(x=states[:-1], y=self.mlp_gain, name="MLP gain", row=1, col=2)
        fig.add_scatter(x=states, y=self.participation_ratio, name="participation ratio", row=2, col=1)
        centres = (self.bins[:-1] + self.bins[1:]) / 2
        fig.add_heatmap(x=centres, y=states, z=self.histogram, colorscale="Viridis", showscale=False, row=2, col=2)
        fig.update_yaxes(type="log", row=1, col=1)
        fig.update_layout(template="plotly_white", height=700,
                          title=f"{self.provenance.model}: {self.provenance.n_prompts} prompts, "
                          f"{self.provenance.n_tokens} tokens")
        return fig


def corpus_result(stats: StreamingStats, record: dict) -> CorpusResult:
    """The final statistics of (merged) accumulators and their record."""
    from lensdyn import __version__

    norms, cov = stats["norms"], stats["covariance"].covariance
    eigenvalues = np.clip(np.linalg.eigvalsh(cov)[:, ::-1], 0.0, None)
    return CorpusResult(
        conventions=Conventions(
            aggregation="streamed over every included token of every prompt (float64 accumulators); a(l) and gains as "
            "ratio of means; histogram and energy averaged over prompts",
            excluded_positions=tuple(record["exclude"]),
        ),
        provenance=Provenance(
            model=record["model"], weights=record["weights"], seed=record["seed"], layout=record["layout"],
            prompt_set=record["prompt_set"], n_prompts=record["n_prompts"], n_tokens=record["n_tokens"],
            lensdyn_version=__version__, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            n_params=record["n_params"],
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
        participation_ratio=eigenvalues.sum(1) ** 2 / (eigenvalues**2).sum(1),
        top_eigenvalues=eigenvalues[:, :TOP_K],
        histogram=stats["histogram"].histogram,
        bins=np.asarray(stats["histogram"].bins, dtype=np.float64),
        energy=stats["energy"].mean_energy,
        betas=np.asarray(stats["energy"].betas, dtype=np.float64),
    )

