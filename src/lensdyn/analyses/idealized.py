"""The idealized attention dynamics of Geshkovski, Letrouit, Polyanskiy and Rigollet (Q = K = V = I).

Tokens ``x_1..x_n`` live on the unit sphere ``S^{d-1}`` and move by self-attention with
identity weights,

    dx_i/dt = P_{x_i} ( sum_j exp(beta <x_i, x_j>) x_j / Z_i ),    Z_i = sum_j exp(beta <x_i, x_j>),

where ``P_x y = y - <x, y> x`` projects onto the tangent space at ``x``. Because
``grad_{x_i} E_beta = (1/n^2) P_{x_i} sum_j exp(beta <x_i, x_j>) x_j`` for the interaction energy
``E_beta = (1 / (2 beta n^2)) sum_ij exp(beta <x_i, x_j>)``, each token ascends ``E_beta`` at
its own positive speed ``n^2 / Z_i``: the energy never falls, and the tokens cluster. This is the
reference where the theorems hold; lensdyn runs the same metrics on it as on a real model.

``simulate`` integrates with explicit Euler steps of size ``dt`` followed by renormalisation onto
the sphere (first order: each step raises the energy for small ``dt``).

>>> states = simulate(n=32, d=3, beta=4.0, steps=50, seed=0)
>>> states.shape, bool(torch.allclose(states.norm(dim=-1), torch.ones(()).double()))
(torch.Size([51, 32, 3]), True)
"""
from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def attention_velocity(x: Float[Tensor, "n d"], beta: float) -> Float[Tensor, "n d"]:
    """``P_{x_i}(sum_j softmax_j(beta <x_i, x_j>) x_j)`` for every token (float64)."""
    weights = torch.softmax(beta * (x @ x.T), dim=-1)
    pulled = weights @ x
    return pulled - (pulled * x).sum(-1, keepdim=True) * x


def simulate(
    n: int, d: int, beta: float, steps: int, dt: float = 0.1, seed: int = 0
) -> Float[Tensor, "step n d"]:
    """``steps + 1`` states of ``n`` tokens drawn uniformly on ``S^{d-1}`` under the Q=K=V=I flow."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    states = [x]
    for _ in range(steps):
        x = torch.nn.functional.normalize(x + dt * attention_velocity(x, beta), dim=-1)
        states.append(x)
    return torch.stack(states)
