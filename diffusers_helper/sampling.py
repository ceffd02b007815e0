"""Flow-matching sigma schedules and the UniPC sampler, as pure functions.

A sampler takes `model(x, sigma, **extra_args) -> x0` (the denoised estimate) and follows the
signature `sample_x(model, x, sigmas, extra_args=None, callback=None)`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

# Resolution-dependent shift of the schedule (the flux-style linear fit in token count).
SHIFT_BASE_TOKENS, SHIFT_BASE_MU = 256, 0.5
SHIFT_MAX_TOKENS, SHIFT_MAX_MU = 4096, 1.15
SHIFT_MU_CAP = math.log(7.0)


def flow_shift_mu(tokens: int) -> float:
    """Shift μ as a line through (256, 0.5) and (4096, 1.15) in the token count, capped at ln 7."""
    # diffusers' flux helper computes this line with the same operations, so the same bits
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    line = calculate_shift(tokens, SHIFT_BASE_TOKENS, SHIFT_MAX_TOKENS, SHIFT_BASE_MU, SHIFT_MAX_MU)
    return min(line, SHIFT_MU_CAP)


def get_sigmas_flow_shift(steps: int, mu: float) -> torch.Tensor:
    """Time-shifted flow-matching sigmas σ(t) = e^μ / (e^μ + 1/t − 1) on t = linspace(1, 0, steps + 1), float32."""
    t = torch.linspace(1, 0, steps=steps + 1)
    shift = math.exp(mu)
    # at t = 0, 1/t is inf and σ comes out as exactly 0
    return shift / (shift + (1 / t - 1))


def sample_unipc(
    model: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: Optional[dict] = None,
    callback: Optional[Callable[[dict], None]] = None,
    variant: str = "bh1",
) -> torch.Tensor:
    """UniPC multistep predictor-corrector, data-prediction form (Zhao et al., 2023, arXiv:2302.04867).

    With α ≡ 1 and λ = −log σ. The model is evaluated once per step at σ_0 … σ_(n−1); the result is
    the last denoised estimate x̂₀ (σ = 0 is never evaluated).
    """
    extra_args = {} if extra_args is None else extra_args
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', not {variant!r}.")
    steps = len(sigmas) - 1
    if steps < 1:
        raise ValueError("UniPC needs at least one step.")
    max_order = min(3, steps - 1)

    def denoise(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return model(x_in, sigma, **extra_args)

    batch = x.shape[0]
    past_x0: list[torch.Tensor] = []
    past_sigma: list[torch.Tensor] = []
    for i in range(steps):
        sigma = sigmas[i].expand(batch)
        if i == 0:
            x0 = denoise(x, sigma)
        else:
            order = min(i, max_order)
            x, x0 = _unipc_update(denoise, x, past_x0, past_sigma, sigma, order, variant)
        past_x0 = (past_x0 + [x0])[-max(max_order, 1):]
        past_sigma = (past_sigma + [sigma])[-max(max_order, 1):]
        if callback is not None:
            callback({"x": x, "i": i, "denoised": x0, "sigma": sigma})
    return past_x0[-1]


def _bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Give a per-sample (or scalar) value trailing singleton dims so it broadcasts over x."""
    return v[(...,) + (None,) * (ndim - 1)]


def _unipc_update(denoise, x, past_x0, past_sigma, sigma_t, order, variant):
    """One UniPC step from the newest past point to sigma_t: predictor (UniP), model call, corrector (UniC)."""
    ndim = x.dim()
    sigma_s = past_sigma[-1]
    x0_s = past_x0[-1]
    lambda_s = -torch.log(sigma_s)
    lambda_t = -torch.log(sigma_t)
    h = lambda_t - lambda_s

    # Ratios r_k of older step sizes and the divided differences D_k of the denoised estimates.
    ratios, diffs = [], []
    for k in range(1, order):
        lambda_k = -torch.log(past_sigma[-(k + 1)])
        r_k = ((lambda_k - lambda_s) / h)[0]
        ratios.append(r_k)
        diffs.append((past_x0[-(k + 1)] - x0_s) / r_k)
    ratios.append(1.0)
    ratios = torch.tensor(ratios, device=x.device)

    # In the authors' sign convention hh = -h; the φ functions are built by the recursion
    # φ_{k+1}(hh) = φ_k(hh)/hh − 1/(k+1)!, starting from φ_1 = expm1(hh)/hh − 1.
    hh = -h[0]
    phi_1 = torch.expm1(hh)
    phi_k = phi_1 / hh - 1
    b_h = hh if variant == "bh1" else torch.expm1(hh)

    rows, rhs = [], []
    factorial = 1
    for k in range(1, order + 1):
        rows.append(torch.pow(ratios, k - 1))
        rhs.append(phi_k * factorial / b_h)
        factorial *= k + 1
        phi_k = phi_k / hh - 1 / factorial
    system = torch.stack(rows)
    rhs = torch.tensor(rhs, device=x.device)

    if diffs:
        diffs = torch.stack(diffs, dim=1)
        # A second-order predictor uses the fixed ρ = 1/2 of the paper instead of solving a 1×1 system.
        rho_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(system[:-1, :-1], rhs[:-1])
    else:
        diffs = None
        rho_p = None
    rho_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(system, rhs)

    # First-order (DPM-Solver++ style) part shared by predictor and corrector.
    x_base = _bcast(sigma_t / sigma_s, ndim) * x - _bcast(phi_1, ndim) * x0_s

    predicted = x_base if diffs is None else x_base - _bcast(b_h, ndim) * torch.tensordot(diffs, rho_p, dims=([1], [0]))
    x0_t = denoise(predicted, sigma_t)

    correction = 0 if diffs is None else torch.tensordot(diffs, rho_c[:-1], dims=([1], [0]))
    d_t = x0_t - x0_s
    x_t = x_base - _bcast(b_h, ndim) * (correction + rho_c[-1] * d_t)
    return x_t, x0_t
