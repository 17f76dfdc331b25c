"""Small pure tensor functions shared by every analysis. Statistics run in float64.

>>> x = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
>>> token_norms(x)
tensor([ 5., 10.], dtype=torch.float64)
"""
from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lensdyn.errors import ArgumentError


def to_numpy(x: Tensor) -> np.ndarray:
    """``x`` as a numpy array, from whatever device it is on: ``x.detach().cpu().numpy()``.

    ``Tensor.numpy()`` refuses a CUDA tensor (and one that requires grad); results leave torch
    through here once reduced, so a capture can stay on its device until then. A CPU tensor
    comes back as a view, without a copy.

    >>> to_numpy(torch.tensor([1.5, 2.0]))
    array([1.5, 2. ], dtype=float32)
    """
    return x.detach().cpu().numpy()


def token_norms(x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead"]:
    """Euclidean norm of each vector over the last axis, returned in float64: ``||x|| = sqrt(sum_i x_i^2)``.

    Each norm accumulates in ``x``'s dtype, at least float32 (bfloat16 activations are summed in
    float32): torch's blocked summation over ``d_model`` terms is exact to about 1e-7 relative,
    far below anything lensdyn reports, and 15x faster on CPU than float64 accumulation. Every
    statistic *over* tokens, states or blocks is taken from these float64 values.

    >>> token_norms(torch.ones(2, 3, 4)).shape
    torch.Size([2, 3])
    """
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.promote_types(x.dtype, torch.float32)).to(torch.float64)


def masked_tokens(
    values: Float[Tensor, "depth batch pos *rest"], mask: Bool[Tensor, "batch pos"]
) -> Float[Tensor, "depth token *rest"]:
    """Per state or block (the leading ``depth`` axis), the values (scalars or vectors) where ``mask``
    is True, flattened in (batch, pos) order.

    >>> v = torch.arange(8.).reshape(2, 2, 2)                 # 2 states, 2 prompts, 2 positions
    >>> masked_tokens(v, torch.tensor([[False, True], [True, True]]))
    tensor([[1., 2., 3.],
            [5., 6., 7.]])
    """
    return values[:, mask]


def masked_mean(values: Float[Tensor, "depth batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, "depth batch"]:
    """Mean over the masked positions of each prompt: ``sum_p m_bp v_lbp / sum_p m_bp`` (NaN where a prompt has none).

    >>> masked_mean(torch.tensor([[[1., 3., 100.]]]), torch.tensor([[True, True, False]]))
    tensor([[2.]], dtype=torch.float64)
    """
    weights = mask.to(values.device, torch.float64)
    return (values.to(torch.float64) * weights).sum(-1) / weights.sum(-1)


AGGREGATIONS = ("ratio_of_means", "mean_of_ratios")  # the ways aggregate_ratio pools tokens


def aggregate_ratio(
    numerator: Float[Tensor, "depth token"],
    denominator: Float[Tensor, "depth token"],
    aggregation: str = "ratio_of_means",
) -> Float[Tensor, " depth"]:
    """How much larger ``numerator`` is than ``denominator`` per state or block, over tokens.

    ``"ratio_of_means"``: ``sum_t n_lt / sum_t d_lt`` (large tokens weigh more).
    ``"mean_of_ratios"``: ``mean_t (n_lt / d_lt)`` (every token weighs the same).

    >>> n, d = torch.tensor([[2., 9.]]), torch.tensor([[1., 3.]])
    >>> aggregate_ratio(n, d), aggregate_ratio(n, d, "mean_of_ratios")
    (tensor([2.7500], dtype=torch.float64), tensor([2.5000], dtype=torch.float64))
    """
    num, den = numerator.to(torch.float64), denominator.to(torch.float64)
    if num.shape[-1] == 0:
        raise ArgumentError("no tokens left after masking: every position is padding or excluded")
    if aggregation == "ratio_of_means":
        return num.mean(dim=-1) / den.mean(dim=-1)
    if aggregation == "mean_of_ratios":
        return (num / den).mean(dim=-1)
    raise ArgumentError(f"aggregation must be 'ratio_of_means' or 'mean_of_ratios', not {aggregation!r}")


def prompt_index(mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, " token"]:
    """The prompt of each masked token, in (prompt, position) order: the packed tokens' owners (on ``mask``'s device).

    >>> prompt_index(torch.tensor([[True, False], [True, True]]))
    tensor([0, 1, 1])
    """
    return torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]


def last_token_mask(token_mask: Bool[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos"]:
    """True only at each prompt's last real token (right padding).

    >>> last_token_mask(torch.tensor([[True, True, False], [True, True, True]]))
    tensor([[False,  True, False],
            [False, False,  True]])
    """
    last = token_mask.sum(dim=1) - 1
    out = torch.zeros_like(token_mask)
    out[torch.arange(token_mask.shape[0], device=token_mask.device), last.clamp(min=0)] = True
    return out & token_mask


# Sun, Chen, Kolter and Liu 2024 ("Massive Activations in Large Language Models"): magnitude above
# 100 and about 1,000 times the median magnitude of its hidden state (lensdyn.conventions, 9).
MASSIVE_THRESHOLD = 100.0
MASSIVE_RATIO = 1000.0


def median_magnitude(x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead"]:
    """``median_i |x_i|`` of each vector, in float64; for an even ``d_model`` the mean of the two middle values.

    >>> median_magnitude(torch.tensor([[1., -4., 2., 3.], [0., 5., -5., 7.]]))
    tensor([2.5000, 5.0000], dtype=torch.float64)
    """
    ordered = x.abs().sort(dim=-1).values.to(torch.float64)
    d = x.shape[-1]
    return (ordered[..., (d - 1) // 2] + ordered[..., d // 2]) / 2


def massive_mask(
    states: Float[Tensor, "*lead d_model"], threshold: float = MASSIVE_THRESHOLD, ratio: float = MASSIVE_RATIO
) -> Bool[Tensor, "*lead d_model"]:
    """Which coordinates are massive activations: ``|x_i| > threshold`` and ``|x_i| >= ratio * median_j |x_j|``,
    the median taken over the same vector's ``d_model`` coordinates (``median_magnitude``).

    Sun et al. state both conditions ("exceed 100", "about 1,000 times the median"); lensdyn takes
    them as hard bounds, so a coordinate of 20,000 in a vector whose median is 40 (ratio 500) is not
    massive. Sorting every vector for its median would cost seconds on a capture, so exact medians
    are computed only for the vectors that can hold one: a coordinate above ``threshold``, and a
    lower middle value (which the median is at least) at most ``max_i |x_i| / ratio``.

    >>> x = torch.ones(2, 8)
    >>> x[0, 3], x[1, 5] = 5000., 500.     # 5000 >= 1000 x median 1; 500 is under 1000 x 1
    >>> massive_mask(x).nonzero().tolist()
    [[0, 3]]
    """
    if not threshold >= 0 or not ratio >= 0:
        raise ArgumentError(f"massive activations need threshold >= 0 and ratio >= 0, not {threshold} and {ratio}")
    magnitude = states.abs()
    top = magnitude.max(dim=-1).values
    candidates = top > threshold
    # Rounded up (nextafter), so that the bound never drops a vector the exact float64 test below would keep.
    bound = top[candidates].to(torch.float64) / ratio
    bound = torch.nextafter(bound.to(magnitude.dtype), torch.tensor(float("inf"), dtype=magnitude.dtype, device=bound.device))
    lower_middle_below = (magnitude[candidates] <= bound[:, None]).sum(dim=-1) > (states.shape[-1] - 1) // 2
    candidates[candidates.clone()] = lower_middle_below
    rows = magnitude[candidates]
    out = torch.zeros(magnitude.shape, dtype=torch.bool, device=magnitude.device)
    out[candidates] = (rows > threshold) & (rows.to(torch.float64) >= ratio * median_magnitude(rows)[:, None])
    return out


class Scratch:
    """Named tensors reused across the iterations of a loop, for its large temporaries.

    A fresh CPU tensor of tens of MB is mapped anew by the allocator, and every page of it is
    faulted in on first touch: ~20 ms per 50 MB here, as long as the arithmetic on it. A loop
    that writes each temporary into ``scratch.like(name, x)`` (with ``out=``) pays that once.
    A request of another shape or dtype replaces the held tensor. Do not keep what it returns
    past the next request of the same name.

    >>> scratch = Scratch()
    >>> a = scratch.like("shifted", torch.zeros(2, 3))
    >>> scratch.like("shifted", torch.ones(2, 3)) is a, scratch.like("shifted", torch.ones(2, 3), torch.bool) is a
    (True, False)
    """

    def __init__(self) -> None:
        self._held: dict[str, Tensor] = {}

    def like(self, name: str, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised tensor with ``x``'s shape and device, in ``dtype`` (default ``x``'s)."""
        dtype = x.dtype if dtype is None else dtype
        held = self._held.get(name)
        if held is None or held.shape != x.shape or held.dtype != dtype or held.device != x.device:
            held = self._held[name] = torch.empty(x.shape, dtype=dtype, device=x.device)
        return held
