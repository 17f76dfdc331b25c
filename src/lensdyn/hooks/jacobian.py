"""Matrix-free Jacobian spectra of one transformer block at one position.

The map is ``f(z) = block_l(x)[p]`` where ``x`` holds the block's input states of one prompt
with position ``p`` replaced by ``z``:

- ``mode="context"``: the other positions stay fixed (the block sees its real context; with
  a causal mask later positions cannot matter, so the sequence is cut after ``p``; an encoder
  keeps every position).
- ``mode="single-token"``: the block runs on ``z`` alone as a length-1 sequence (no cross-token
  mixing: the StateLens write-up's setting).

``norms="frozen"`` detaches every norm's scale inside the block (``ln{1,2}[_post].hook_scale``): the
norm divides by the value it had at the base point and stops projecting out the radial
direction, so comparing live and frozen spectra tests "stability emerges from LayerNorm".

Only Jacobian-vector products are formed (``torch.func.linearize`` once, then one cheap jvp per
product; ``vjp`` for ``J^T``). In context mode with live norms on a Hugging Face decoder layer
that takes ``past_key_values`` (Llama, Gemma, Qwen, ...), the other positions' keys and values
are computed once and each product runs the layer on the one target token (``_prefix_map``),
checked against the full-context map at the base point before use. This module builds the
operator (``jacobian_operator``, a scipy ``LinearOperator``); the solvers are the core's
(``lensdyn.spectra``): the leading eigenvalues by Arnoldi, the largest singular value by power
iteration on ``J^T J``, both from a seeded random start.
Precision follows the model's dtype (load it with ``dtype=torch.float64`` for float64).
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
from jaxtyping import Float
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

from lensdyn.errors import ArgumentError, UnsupportedArchitectureError
from lensdyn.fastpath import agrees, unavailable, verdict
from lensdyn.hooks.compat import cache_keyword, route_cache_keyword
from lensdyn.hooks.iterate import block_inputs
from lensdyn.models import block_layout
from lensdyn.spectra import Spectrum, largest_singular_value, leading_eigenvalues

MODES = ("context", "single-token")
# Forward-mode AD levels are global to the process, not per thread: two threads inside a jvp at once
# fail with "Nested forward mode AD is not supported" (the report measures a model and its control
# side by side). Every forward-mode product holds this lock.
FORWARD_AD = threading.RLock()
PREFIX_CACHE = "jacobian prefix cache"  # the fast path's name in warnings and ``lensdyn.fastpath.fast_paths``


def block_map(
    model, layer: int, states: Float[Tensor, "pos d_model"], position: int, mode: str = "context", norms: str = "live",
    prefix_cache: bool = True,
) -> tuple[Callable[[Tensor], Tensor], Float[Tensor, " d_model"]]:
    """``(f, z0)``: the block as a function of one position's input, and that input's actual value.

    ``prefix_cache=False`` forces the general path (the whole context through the bridge block).
    """
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {MODES}, not {mode!r}")
    if norms not in ("live", "frozen"):
        raise ArgumentError(f"norms must be 'live' or 'frozen', not {norms!r}")
    if not 0 <= layer < model.cfg.n_layers:
        raise ArgumentError(f"layer must be in 0..{model.cfg.n_layers - 1}, not {layer}")
    n = states.shape[0]
    position = position % n
    param = next(model.parameters())
    states = states.to(param.device, param.dtype)
    causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
    if mode == "single-token":
        context, target = states[position : position + 1], 0
    elif causal:  # later positions cannot reach position p through a causal mask
        context, target = states[: position + 1], position
    else:  # an encoder's position p attends to every position, before and after it
        context, target = states, position
    args, kwargs = block_inputs(model, layer, context.shape[0])
    frozen = []
    if norms == "frozen":
        # Every norm the block has (pre, post-sublayer or post: lensdyn.layouts) divides by its base-point value.
        scales = [f"blocks.{layer}.{ln}.hook_scale" for ln in block_layout(model).norms]
        hook_names = set(model.hook_dict)
        frozen = [(name, lambda s, hook: s.detach()) for name in scales if name in hook_names]
        if not frozen:
            raise UnsupportedArchitectureError(f"block {layer} exposes no norm scale (hook_scale) to freeze")
    z0 = context[target].detach().clone()

    def f(z: Tensor) -> Tensor:
        x = torch.cat([context[:target], z[None], context[target + 1:]], dim=0)[None]
        with model.hooks(fwd_hooks=frozen) if norms == "frozen" else nullcontext():
            out = model.blocks[layer](x, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return out[0, target]

    if (prefix_cache and causal and mode == "context" and norms == "live" and target > 0
            and verdict(model, PREFIX_CACHE) is not False):
        fast = _prefix_map(model, layer, context, kwargs.get("position_embeddings"))
        if fast is not None:
            # Every base point is checked (one block call each way, cheap next to the hundreds of products).
            with torch.no_grad():
                reference, candidate = f(z0), fast(z0)
            if agrees(model, PREFIX_CACHE, candidate, reference, tolerance=1e-4):
                return fast, z0
    return f, z0


class _Prefix:
    """A stand-in cache: the other positions' keys and values, fixed; the target's are appended per call."""

    def __init__(self, keys: Tensor | None = None, values: Tensor | None = None):
        self.keys, self.values = keys, values

    def update(self, keys: Tensor, values: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.keys is None:  # recording pass
            self.keys, self.values = keys, values
            return keys, values
        return torch.cat([self.keys, keys], dim=-2), torch.cat([self.values, values], dim=-2)


def _prefix_map(model, layer: int, context: Tensor, position_embeddings) -> Callable[[Tensor], Tensor] | None:
    """The target row of the Hugging Face layer with the context's keys/values precomputed; None if unsupported."""
    layers = getattr(getattr(getattr(model, "original_model", None), "model", None), "layers", None)
    if layers is None or position_embeddings is None:
        unavailable(model, PREFIX_CACHE, "no Hugging Face decoder layers taking rotary position_embeddings", warn=False)
        return None
    route_cache_keyword(model)
    hf_layer = layers[layer]
    keyword = cache_keyword(hf_layer)
    recording = _Prefix()
    try:
        with torch.no_grad():
            hf_layer(context[None], position_embeddings=position_embeddings, **{keyword: recording}, use_cache=True,
                     attention_mask=None)
    except TypeError as err:
        unavailable(model, PREFIX_CACHE, f"the decoder layer refuses a cache: {err}", warn=True)
        return None
    if recording.keys is None:  # the layer takes a cache but its attention never wrote to it
        unavailable(model, PREFIX_CACHE, "the key/value cache never reached the attention", warn=True)
        return None
    prefix = _Prefix(recording.keys[..., :-1, :].detach(), recording.values[..., :-1, :].detach())
    last = tuple(t[:, -1:] for t in position_embeddings)

    def g(z: Tensor) -> Tensor:
        out = hf_layer(z[None, None], position_embeddings=last, **{keyword: prefix}, use_cache=True, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        return out[0, -1]

    return g


def _linear_map(f: Callable[[Tensor], Tensor], z0: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> J v``: traced once by ``linearize``; else a jvp per call; else reverse mode twice.

    Tracing can fail on exotic modules, and forward mode cannot pass an ``autograd.Function``
    without ``setup_context`` (BLOOM's GeLU): there ``J v`` is the vjp of the linear map
    ``u -> J^T u`` (``torch.autograd.functional.jvp``'s double-backward), exact and about 2x slower.
    """
    probe = torch.zeros_like(z0)
    try:
        with FORWARD_AD, torch.enable_grad():
            _, linear = torch.func.linearize(f, z0)
            linear(probe)
        return linear
    except Exception:  # noqa: BLE001 - any failure here means: try the next way
        pass

    def forward_mode(t: Tensor) -> Tensor:
        with FORWARD_AD, torch.enable_grad():
            return torch.func.jvp(f, (z0,), (t,))[1]

    try:
        forward_mode(probe)
        return forward_mode
    except Exception:  # noqa: BLE001
        pass

    def reverse_mode(t: Tensor) -> Tensor:
        with torch.enable_grad():
            return torch.autograd.functional.jvp(f, z0.detach(), t)[1]

    return reverse_mode


def jacobian_operator(f: Callable[[Tensor], Tensor], z0: Float[Tensor, " d"]) -> LinearOperator:
    """``J = df/dz`` at ``z0`` as a scipy ``LinearOperator`` (``matvec`` by jvp, ``rmatvec`` by vjp), counting calls.

    >>> op = jacobian_operator(lambda z: z * z, torch.tensor([1.0, 3.0], dtype=torch.float64))     # J = diag(2 z)
    >>> op.matvec(np.ones(2)), op.rmatvec(np.ones(2)), op.counter
    (array([2., 6.]), array([2., 6.]), {'matvec': 1})
    """
    d = z0.shape[0]
    dtype = z0.dtype
    counter = {"matvec": 0}
    linear = _linear_map(f, z0)

    def apply(part: np.ndarray) -> np.ndarray:
        tangent = torch.as_tensor(np.ascontiguousarray(part).reshape(-1), dtype=dtype, device=z0.device)
        with FORWARD_AD:
            return linear(tangent).detach().double().cpu().numpy()

    def matvec(v: np.ndarray) -> np.ndarray:
        counter["matvec"] += 1
        out = apply(np.real(v))
        if np.iscomplexobj(v):  # J is real: apply it to the real and imaginary parts
            out = out + 1j * apply(np.imag(v))
        return out

    def rmatvec(v: np.ndarray) -> np.ndarray:
        cotangent = torch.as_tensor(np.real(v).reshape(-1), dtype=dtype, device=z0.device)
        with torch.enable_grad():
            _, pullback = torch.func.vjp(f, z0)
            return pullback(cotangent)[0].detach().double().cpu().numpy()

    op = LinearOperator((d, d), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)
    op.counter = counter
    return op


def jacobian_spectrum(
    model,
    states: Float[Tensor, "pos d_model"],
    layer: int,
    position: int = -1,
    mode: str = "context",
    norms: str = "live",
    k: int = 6,
    sigma: bool = True,
    seed: int = 0,
) -> Spectrum:
    """Spectrum of block ``layer``'s Jacobian at ``position`` of one prompt's block-input ``states``.

    >>> cap = ld.capture(model, ["Some text."], streams=("resid",), exclude=())        # doctest: +SKIP
    >>> jacobian_spectrum(model, cap.resid[2, 0], layer=2).spectral_radius            # doctest: +SKIP
    """
    f, z0 = block_map(model, layer, states, position, mode, norms)
    op = jacobian_operator(f, z0)
    values, residuals, converged = leading_eigenvalues(op, k=k, seed=seed)
    matvecs = op.counter["matvec"]
    s_max, s_iter, s_ok = largest_singular_value(op, seed=seed) if sigma else (float("nan"), 0, False)
    return Spectrum(
        eigenvalues=values, residuals=residuals, spectral_radius=float(np.abs(values).max()),
        sigma_max=s_max, sigma_iterations=s_iter, sigma_converged=s_ok, matvecs=matvecs, converged=converged,
    )


def dense_jacobian(f: Callable[[Tensor], Tensor], z0: Float[Tensor, " d"]) -> Float[Tensor, "d d"]:
    """The full ``d x d`` Jacobian, only when asked (tests, tiny models), by reverse mode: one vjp per output,
    independent of the forward-mode products the spectra use."""
    with torch.enable_grad():
        return torch.autograd.functional.jacobian(f, z0.detach()).detach()
