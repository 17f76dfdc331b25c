"""Small pure tensor functions shared by every analysis. Statistics run in float64.

>>> x = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
>>> token_norms(x)
tensor([ 5., 10.], dtype=torch.float64)
"""
from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def token_norms(x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead"]:
    """Euclidean norm of each vector over the last axis, in float64: ``||x|| = sqrt(sum_i x_i^2)``.

    >>> token_norms(torch.ones(2, 3, 4)).shape
    torch.Size([2, 3])
    """
    return torch.linalg.vector_norm(x.to(torch.float64), dim=-1)


def masked_tokens(values: Float[Tensor, "layer batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, "layer token"]:
    """Per layer, the values at positions where ``mask`` is True, flattened in (batch, pos) order.

    >>> v = torch.arange(8.).reshape(2, 2, 2)                 # 2 layers, 2 prompts, 2 positions
    >>> masked_tokens(v, torch.tensor([[False, True], [True, True]]))
    tensor([[1., 2., 3.],
            [5., 6., 7.]])
    """
    return values[:, mask]


def masked_mean(values: Float[Tensor, "layer batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, "layer batch"]:
    """Mean over the masked positions of each prompt: ``sum_p m_bp v_lbp / sum_p m_bp`` (NaN where a prompt has none).

    >>> masked_mean(torch.tensor([[[1., 3., 100.]]]), torch.tensor([[True, True, False]]))
    tensor([[2.]], dtype=torch.float64)
    """
    weights = mask.to(torch.float64)
    return (values.to(torch.float64) * weights).sum(-1) / weights.sum(-1)
