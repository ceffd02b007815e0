"""An independent float64 reference for UniPC in data-prediction form, derived from the paper's math.

Zhao, Bai, Rao, Zhou & Lu (2023), "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", arXiv:2302.04867. Nothing here is taken from an implementation: the formulas are
re-derived below for the conventions of `diffusers_helper.sampling` (α ≡ 1, λ = −log σ, the model
returns x̂₀), and the style deliberately differs from the package's (the exponential integrals come from
their definition by quadrature, not from a φ recursion; each step is turned into explicit weights on the
stored x̂₀ values).

Derivation
----------
With α ≡ 1 the sampler integrates dx/dσ = (x − x̂₀(x, σ))/σ. In λ = −log σ (dσ = −σ dλ) this reads
dx/dλ = x̂₀ − x, whose variation-of-constants solution from λ_s to λ_t = λ_s + h is

    x_t = e^{−h} x_s + ∫_0^h e^{−(h−τ)} x̂₀(λ_s + τ) dτ                                        (E)

(the data-prediction exponential-integrator form the paper starts from, with α_t = 1, σ_t/σ_s = e^{−h}).
Taylor-expanding x̂₀(λ_s + τ) = Σ_k x̂₀^{(k)}(λ_s) τ^k/k! turns (E) into

    x_t = e^{−h} x_s + Σ_{k≥0} x̂₀^{(k)}(λ_s) I_k(h),    I_k(h) = ∫_0^h e^{−(h−τ)} τ^k/k! dτ.

The paper's update (UniP-p predictor, UniC-p corrector, here in data-prediction form) is

    x_t = e^{−h} x_s + I_0(h) x̂₀_s + B(h) Σ_m a_m D_m / r_m,     D_m = x̂₀(λ_s + r_m h) − x̂₀_s,

over older points r_m < 0 (and, for the corrector only, the new point r = 1, whose x̂₀ is the model's
output at the predicted x̃_t). The k = 0 term is the DDIM / DPM-Solver++(1) step. Because
D_m / r_m = Σ_{k≥1} x̂₀^{(k)} r_m^{k−1} h^k / k!, matching the x̂₀^{(k)} terms against the exact solution
for k = 1 … q gives the paper's linear order conditions (its Theorem 3.1 for UniC, Corollary 3.2 for UniP)

    Σ_m a_m r_m^{k−1} = k! I_k(h) / (B(h) h^k),   k = 1 … q,       i.e.  R(r) a = g(h) / B(h),

with q = p − 1 for UniP-p (p − 1 older points) and q = p for UniC-p (those points plus the new one).
B(h) is any non-zero function with B(h) = Θ(h); the two named choices are bh1: B = h and bh2: the
data-prediction counterpart of the paper's e^h − 1, i.e. the first-order coefficient I_0(h) = 1 − e^{−h}
(the package writes both with hh = −h and a minus sign in front: −hh = h, −expm1(hh) = 1 − e^{−h}).

Where R is square and solved, B cancels: the weight B a_m / r_m on D_m solves the B-free moment system
Σ_m c_m (r_m h)^k / k! = I_k(h). So bh1 and bh2 differ only where a is *fixed* instead of solved:
the one-equation systems of the order-2 predictor and the order-1 corrector, where a = 1/2. The paper's
1×1 condition gives a = I_1(h)/(B(h) h) = 1/2 + O(h) for either B, and the O(h) change moves the update
by B·O(h)·D/r = O(h³), inside the local error of a second-order step, so the fixed value keeps the order.
The fixed values themselves come from the authors' released code (github.com/wl-zhao/UniPC, uni_pc.py:
a = 1/2 for the order-2 predictor, "a simplified version", and for the order-1 corrector), which
FramePack's reference sampler keeps; the paper states the solved conditions, and the limit above is
why fixing them is admissible.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(40)


def exp_integral(k: int, h: float) -> float:
    """I_k(h) = ∫_0^h e^{−(h−τ)} τ^k/k! dτ, by 40-point Gauss–Legendre quadrature of the definition."""
    tau = 0.5 * h * (_GL_NODES + 1.0)
    integrand = np.exp(-(h - tau)) * tau**k / math.factorial(k)
    return float(0.5 * h * np.dot(_GL_WEIGHTS, integrand))


def exp_integral_closed_form(k: int, h: float) -> float:
    """I_k(h) = (−1)^k (Σ_{j≤k} (−h)^j/j! − e^{−h}), from k integrations by parts (cancels for small h)."""
    partial = sum((-h) ** j / math.factorial(j) for j in range(k + 1))
    return (-1) ** k * (partial - math.exp(-h))


def exp_integral_series(k: int, h: float, terms: int = 40) -> float:
    """I_k(h) = Σ_{n≥0} (−1)^n h^{k+1+n}/(k+1+n)!, the tail of the exponential series (good for h ≲ 2)."""
    return math.fsum((-1) ** n * h ** (k + 1 + n) / math.factorial(k + 1 + n) for n in range(terms))


def b_of_h(variant: str, h: float) -> float:
    """B(h) of the paper in the data-prediction sign convention: h (bh1) or 1 − e^{−h} (bh2)."""
    if variant == "bh1":
        return h
    if variant == "bh2":
        return -math.expm1(-h)
    raise ValueError(variant)


def order_condition_coefficients(ratios, h: float, b: float) -> np.ndarray:
    """Solve R a = g/B: rows k = 1 … q of r_m^{k−1}, right side k! I_k(h) / (B h^k)."""
    q = len(ratios)
    matrix = np.array([[r ** (k - 1) for r in ratios] for k in range(1, q + 1)], dtype=np.float64)
    rhs = np.array([math.factorial(k) * exp_integral(k, h) / (b * h**k) for k in range(1, q + 1)])
    return np.linalg.solve(matrix, rhs)


def step_weights(
    lambdas,
    lambda_t: float,
    variant: str,
    corrector: bool,
    fixed_half: bool = True,
    b_fn: Optional[Callable[[str, float], float]] = None,
) -> tuple[float, np.ndarray]:
    """One UniP (corrector=False) or UniC (True) step as x_t = decay·x_s + Σ_j w_j x̂₀_j.

    `lambdas` are the λ of the stored points, oldest first; the newest is the base point s. The weights
    w_j follow the same order, with one more entry (the new point at λ_t) for the corrector.
    `fixed_half` uses a = 1/2 for a one-equation system (order-2 predictor, order-1 corrector).
    """
    lambda_s = lambdas[-1]
    h = lambda_t - lambda_s
    b = (b_fn or b_of_h)(variant, h)
    ratios = [(lam - lambda_s) / h for lam in lambdas[:-1]] + ([1.0] if corrector else [])
    if not ratios:
        a = np.zeros(0)
    elif len(ratios) == 1 and fixed_half:
        a = np.array([0.5])
    else:
        a = order_condition_coefficients(ratios, h, b)
    # Unfold B Σ a_m (x̂₀_m − x̂₀_s)/r_m into weights: +B a_m/r_m on point m, −B a_m/r_m on the base s.
    older = len(lambdas) - 1
    weights = np.zeros(len(lambdas) + (1 if corrector else 0))
    weights[older] = exp_integral(0, h)
    for m, (a_m, r_m) in enumerate(zip(a, ratios)):
        index = m if m < older else len(lambdas)  # the new point (r = 1) sits last
        weights[index] += b * a_m / r_m
        weights[older] -= b * a_m / r_m
    return math.exp(-h), weights


def reference_unipc(
    denoise: Callable[[np.ndarray, float], np.ndarray],
    x: np.ndarray,
    sigmas,
    variant: str = "bh1",
    fixed_half_predictor: bool = True,
    fixed_half_corrector: bool = True,
    use_corrector: bool = True,
    max_order_cap: int = 3,
    b_fn: Optional[Callable[[str, float], float]] = None,
) -> tuple[np.ndarray, list[dict]]:
    """Multistep UniPC in float64: the result (last x̂₀) and per step {x, denoised, predicted}.

    Schedule as documented for the package: the model runs once per step at σ_0 … σ_{n−1}; step i ≥ 1
    uses order p = min(i, min(cap, n − 1)), predicting with UniP-p from the last p points, evaluating the
    model at the prediction, and correcting with UniC-p (the new x̂₀ is kept, not re-evaluated at the
    corrected x). The keyword switches build deliberately wrong variants for the mutation tests.
    """
    sig = [float(s) for s in sigmas]
    steps = len(sig) - 1
    max_order = min(max_order_cap, steps - 1)
    lam = [-math.log(s) for s in sig[:-1]]
    x = np.asarray(x, dtype=np.float64)
    denoised = [denoise(x, sig[0])]
    trace = [{"x": x, "denoised": denoised[0], "predicted": None}]
    for i in range(1, steps):
        p = min(i, max_order)
        points = list(range(i - p, i))
        lams = [lam[j] for j in points]
        decay, w = step_weights(
            lams, lam[i], variant, corrector=False, fixed_half=fixed_half_predictor or p != 2, b_fn=b_fn
        )
        predicted = decay * x + sum(w[n] * denoised[j] for n, j in enumerate(points))
        new = denoise(predicted, sig[i])
        if use_corrector:
            decay, w = step_weights(
                lams, lam[i], variant, corrector=True, fixed_half=fixed_half_corrector or p != 1, b_fn=b_fn
            )
            x = decay * x + sum(w[n] * denoised[j] for n, j in enumerate(points)) + w[-1] * new
        else:
            x = predicted
        denoised.append(new)
        trace.append({"x": x, "denoised": new, "predicted": predicted})
    return denoised[-1], trace
