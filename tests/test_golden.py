"""Golden tests: UniPC and both context layouts pinned to values derived independently of the package.

The UniPC reference (tests/golden_reference.py) is re-derived from the paper's order conditions in
float64; the hand-computed coefficients and the layout index lists below are written out literally, so a
different-but-self-consistent sampler or packing would fail here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffusers_helper.packing import (
    HISTORY_1X,
    HISTORY_2X,
    HISTORY_4X,
    f1_layout,
    framepack_layout,
    section_paddings,
)
from diffusers_helper.sampling import get_sigmas_flow_shift, sample_unipc
from golden_reference import (
    b_of_h,
    exp_integral,
    exp_integral_closed_form,
    exp_integral_series,
    reference_unipc,
    step_weights,
)

# float32 sampler against the float64 reference; measured worst case is below 1e-6 absolute.
RTOL, ATOL = 1e-5, 1e-6
E = math.exp(-1.0)


# ---------------------------------------------------------------------------------------------------
# Test models, written once in torch so the float32 sampler and the float64 reference see the same map
# ---------------------------------------------------------------------------------------------------


def _per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ as a (batch, 1, …) tensor that broadcasts over x."""
    return sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def nonlinear_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth nonlinear x̂₀(x, σ) that mixes neighbouring elements, so no step is exact by accident."""
    s = _per_sample(sigma, x)
    return torch.tanh(1.5 * x) * (1 - 0.4 * s) + 0.3 * s * s * torch.sin(torch.roll(x, 1, dims=-1))


class GaussianVE:
    """Exact x̂₀ for data N(m, v) under x = x₀ + σε (α ≡ 1): linear in x, with a closed-form flow."""

    def __init__(self, mean: torch.Tensor, var: float):
        self.mean, self.var = mean, var

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = _per_sample(sigma, x)
        return (self.mean + self.var / (self.var + s * s) * (x - self.mean)).to(x.dtype)

    def exact_x(self, x_start: np.ndarray, sigma_start: float, sigma: float) -> np.ndarray:
        """ODE solution: dx/dσ = (x − x̂₀)/σ = σ(x − m)/(v + σ²) gives x − m ∝ √(v + σ²)."""
        mean = self.mean.double().numpy()
        return mean + (x_start - mean) * math.sqrt((self.var + sigma**2) / (self.var + sigma_start**2))


def _as_numpy_model(model):
    """The same model on float64 NumPy arrays and a float σ, for the reference."""

    def denoise(x: np.ndarray, sigma: float) -> np.ndarray:
        return model(torch.from_numpy(x), torch.tensor([sigma], dtype=torch.float64)).numpy()

    return denoise


def _run_ours(model, x, sigmas, variant):
    """Run the package's sampler, recording the model's inputs (the predictions) and each callback."""
    inputs, trace = [], []

    def recording(x_in, sigma):
        inputs.append(x_in.detach().clone())
        return model(x_in, sigma)

    out = sample_unipc(recording, x.clone(), sigmas, callback=lambda d: trace.append(d), variant=variant)
    return out, inputs, trace


def _start(seed=0, shape=(2, 3, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


MODELS = {
    "nonlinear": nonlinear_model,
    "gaussian": GaussianVE(torch.linspace(-0.8, 0.6, 4, dtype=torch.float64), 0.49),
}


# ---------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("h", [0.02, 0.3, 1.0, 2.0])
def test_exponential_integrals_agree_across_three_derivations(k, h):
    """Quadrature of the definition, the integration-by-parts closed form and the series agree."""
    quad = exp_integral(k, h)
    assert quad == pytest.approx(exp_integral_series(k, h), rel=1e-12)
    # the closed form cancels catastrophically for small h; compare it where it is well conditioned
    if h >= 0.3:
        assert quad == pytest.approx(exp_integral_closed_form(k, h), rel=1e-12)


def test_exponential_integrals_at_h_1_by_hand():
    """∫_0^1 e^{τ−1} τ^k/k! dτ by hand: 1 − 1/e, 1/e, 1/2 − 1/e, 1/e − 1/3."""
    assert [exp_integral(k, 1.0) for k in range(4)] == pytest.approx([1 - E, E, 0.5 - E, E - 1 / 3], rel=1e-13)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_reference_is_third_order_on_the_exact_gaussian_flow(variant):
    """The reference solves the linear flow with global error falling ~8x per halved step (order 3)."""
    model = MODELS["gaussian"]
    x = _start(3, (1, 4)).double().numpy()
    errors = []
    for steps in (12, 24, 48):
        # uniform in λ on [0, 3], so doubling the count about halves every step (the shifted schedule
        # would not: it keeps a ratio-2 last step however many steps it has)
        sigmas = np.append(np.exp(-np.linspace(0.0, 3.0, steps)), 0.0)
        _, trace = reference_unipc(_as_numpy_model(model), x, sigmas, variant)
        errors.append(max(np.abs(t["x"] - model.exact_x(x, 1.0, s)).max() for t, s in zip(trace, sigmas)))
    # order 3 gives a ratio near 8; an order-2 method (e.g. UniP without UniC here) gives about 4
    assert errors[0] / errors[1] > 6 and errors[1] / errors[2] > 6
    assert errors[-1] < 5e-5


def test_fixed_half_is_the_small_step_limit_of_the_one_equation_order_condition():
    """a = I_1(h)/(B(h) h) → 1/2 as h → 0 for both B, but differs from 1/2 at a finite step."""
    # at h = 1 by hand: bh1 gives I_1(1)/1 = 1/e, bh2 gives (1/e)/(1 − 1/e); neither is 1/2
    for variant, at_h_1 in (("bh1", E), ("bh2", E / (1 - E))):
        solved = [exp_integral(1, h) / (b_of_h(variant, h) * h) for h in (1e-3, 1e-2, 1.0)]
        assert solved[0] == pytest.approx(0.5, abs=1e-3) and solved[1] == pytest.approx(0.5, abs=1e-2)
        assert solved[2] == pytest.approx(at_h_1, rel=1e-13) and abs(solved[2] - 0.5) > 0.05


def test_b_cancels_wherever_the_order_conditions_are_solved():
    """With R square and solved, B·a is B-free, so bh1 and bh2 agree except at the fixed-½ steps."""
    lams = [0.0, 0.7, 1.5]
    for corrector in (False, True):
        for n_points in (1, 2, 3):
            one = step_weights(lams[-n_points:], 2.1, "bh1", corrector)[1]
            two = step_weights(lams[-n_points:], 2.1, "bh2", corrector)[1]
            fixed = (not corrector and n_points == 2) or (corrector and n_points == 1)
            if fixed:
                assert np.abs(one - two).max() > 1e-2
            else:
                np.testing.assert_allclose(one, two, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# The package's sampler against the reference
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("steps", [2, 3, 4, 25])  # max order 1, 2, 3, 3 (orders 1…3 all exercised)
@pytest.mark.parametrize("model_name", ["nonlinear", "gaussian"])
def test_sampler_matches_the_reference_at_every_step(variant, steps, model_name):
    """Every prediction, corrected x and x̂₀ of sample_unipc equals the float64 reference."""
    model = MODELS[model_name]
    x = _start(1)
    sigmas = get_sigmas_flow_shift(steps, math.log(7.0) if steps == 25 else 1.0)
    out, inputs, trace = _run_ours(model, x, sigmas, variant)
    ref_out, ref_trace = reference_unipc(_as_numpy_model(model), x.double().numpy(), sigmas.tolist(), variant)

    assert len(trace) == len(ref_trace) == steps and len(inputs) == steps
    for i, (ours, ref) in enumerate(zip(trace, ref_trace)):
        np.testing.assert_allclose(ours["x"].numpy(), ref["x"], rtol=RTOL, atol=ATOL, err_msg=f"x at step {i}")
        np.testing.assert_allclose(ours["denoised"].numpy(), ref["denoised"], rtol=RTOL, atol=ATOL)
        if i > 0:  # the model input at step i is the UniP prediction
            np.testing.assert_allclose(inputs[i].numpy(), ref["predicted"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=RTOL, atol=ATOL)


# Hand derivation for σ = 1, e^{−1}, e^{−2}, e^{−3} (then 0): λ = 0, 1, 2, 3, so every h = 1, older points
# sit at r = −1, −2, and with E = e^{−1}: I_0 = 1 − E, I_1 = E, I_2 = 1/2 − E, I_3 = E − 1/3; B = 1 (bh1)
# or 1 − E (bh2). The update is x_t = E x_s + I_0 x̂₀_s + B Σ a_m (x̂₀_m − x̂₀_s)/r_m with
# Σ_m a_m r_m^{k−1} = k! I_k/B. The model returns the unit vector e_j at σ_j, so x_t − E x_s lists the
# weights on (x̂₀ at σ_0, σ_1, σ_2, σ_3):
#   step 1 (order 1)  UniP-1: DDIM, [1 − E].   UniC-1: a = 1/2 on (e_1 − e_0):
#                     bh1 [1/2 − E, 1/2], bh2 [(1 − E)/2, (1 − E)/2].
#   step 2 (order 2)  UniP-2: a = 1/2 on (e_0 − e_1)/(−1):
#                     bh1 [−1/2, 3/2 − E], bh2 [−(1 − E)/2, 3(1 − E)/2].
#                     UniC-2: a_1 + a_2 = E, −a_1 + a_2 = 1 − 2E (bh1) ⇒ a_1 = (3E − 1)/2, a_2 = (1 − E)/2:
#                     [(1 − 3E)/2, E, (1 − E)/2]  (for bh2, B·a is the same: B cancels).
#   step 3 (order 3)  UniP-3: a_1 + a_2 = E, −a_1 − 2a_2 = 1 − 2E ⇒ a_1 = 1, a_2 = E − 1:
#                     [(1 − E)/2, −1, 3/2 − E/2].
#                     UniC-3: adds a_1 + 4a_2 + a_3 = 6E − 2 ⇒ a_1 = (1 − 2E)/2, a_2 = (5E − 2)/3,
#                     a_3 = (1 + 2E)/6: [(2 − 5E)/6, E − 1/2, 1 − 3E/2, (1 + 2E)/6].
HAND_SIGMAS = [1.0, E, E**2, E**3, 0.0]
_C2 = [(1 - 3 * E) / 2, E, (1 - E) / 2]
_P3 = [(1 - E) / 2, -1.0, 1.5 - E / 2]
_C3 = [(2 - 5 * E) / 6, E - 0.5, 1 - 1.5 * E, (1 + 2 * E) / 6]
HAND_WEIGHTS = {
    "bh1": {
        "predictor": [[1 - E], [-0.5, 1.5 - E], _P3],
        "corrector": [[0.5 - E, 0.5], _C2, _C3],
    },
    "bh2": {
        "predictor": [[1 - E], [-(1 - E) / 2, 1.5 * (1 - E)], _P3],
        "corrector": [[(1 - E) / 2, (1 - E) / 2], _C2, _C3],
    },
}


def _padded(weights, size=5):
    return np.array(list(weights) + [0.0] * (size - len(weights)))


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_hand_coefficients_are_consistent_and_match_the_reference(variant):
    """The hand-derived weights sum to I_0 = 1 − e^{−1} and equal the reference's solved systems."""
    lam = [0.0, 1.0, 2.0, 3.0]
    for kind in ("predictor", "corrector"):
        for i, expected in enumerate(HAND_WEIGHTS[variant][kind], start=1):
            # consistency: a constant x̂₀ must be reproduced exactly, so the weights sum to I_0(h)
            assert sum(expected) == pytest.approx(1 - E, abs=1e-14)
            p = min(i, 3)
            decay, w = step_weights(lam[i - p : i], lam[i], variant, corrector=kind == "corrector")
            assert decay == pytest.approx(E, rel=1e-15)
            np.testing.assert_allclose(_padded(w, 4), _padded(expected, 4)[:4], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_sampler_reproduces_the_hand_derived_coefficients(variant):
    """Unit-vector x̂₀ values expose sample_unipc's predictor and corrector weights; they match by hand."""
    calls = []

    def unit_vectors(x_in, sigma):
        # the j-th call happens at σ_j and answers e_j; slot 4 carries the starting x
        calls.append((x_in.clone(), float(sigma[0])))
        out = torch.zeros_like(x_in)
        out[:, len(calls) - 1] = 1.0
        return out

    trace = []
    x = torch.zeros(1, 5)
    x[0, 4] = 1.0
    sigmas = torch.tensor(HAND_SIGMAS, dtype=torch.float32)
    record = lambda d: trace.append(d["x"][0].double().numpy())  # noqa: E731
    out = sample_unipc(unit_vectors, x, sigmas, callback=record, variant=variant)

    assert [s for _, s in calls] == pytest.approx(HAND_SIGMAS[:4], rel=1e-6)
    assert np.array_equal(trace[0], x[0].double().numpy())
    for i in range(1, 4):
        base = E * trace[i - 1]
        predicted = calls[i][0][0].double().numpy()
        np.testing.assert_allclose(predicted - base, _padded(HAND_WEIGHTS[variant]["predictor"][i - 1]), atol=2e-6)
        np.testing.assert_allclose(trace[i] - base, _padded(HAND_WEIGHTS[variant]["corrector"][i - 1]), atol=2e-6)
    # the result is the last x̂₀, i.e. e_3
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("sigmas", [[1.0, 0.6, 0.0], [0.9, 0.55, 0.2, 0.0], [1.0, 0.97, 0.5, 0.1, 0.0]])
def test_first_step_prediction_is_the_ddim_step(sigmas):
    """Order-1 UniP is DDIM for α ≡ 1: x̃ = x̂₀ + σ_t ε̂ with ε̂ = (x − x̂₀)/σ_s."""
    x = _start(2)
    sigmas = torch.tensor(sigmas)
    out, inputs, _ = _run_ours(nonlinear_model, x, sigmas, "bh1")
    s0, s1 = sigmas[0].item(), sigmas[1].item()
    x0 = nonlinear_model(x.double(), torch.tensor([s0], dtype=torch.float64))
    ddim = x0 + (s1 / s0) * (x.double() - x0)
    np.testing.assert_allclose(inputs[1].numpy(), ddim.numpy(), rtol=RTOL, atol=ATOL)
    if len(sigmas) == 3:
        # with two steps the result is the model's x̂₀ at the DDIM point (σ = 0 is never evaluated)
        expected = nonlinear_model(ddim, torch.tensor([s1], dtype=torch.float64))
        np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------
# The comparison has teeth: plausible wrong samplers are far outside the tolerance
# ---------------------------------------------------------------------------------------------------

# Each is a reference sampler with one plausible mistake; run as "bh1" unless the mistake says otherwise.
MUTANTS = {
    "bh2 coefficients when bh1 is asked": dict(variant="bh2"),
    "order-2 predictor solved instead of rho = 1/2": dict(fixed_half_predictor=False),
    "order-1 corrector solved instead of rho = 1/2": dict(fixed_half_corrector=False),
    "predictor only (no UniC)": dict(use_corrector=False),
    "max order 2": dict(max_order_cap=2),
    "B with the wrong sign (hh = -h taken as B)": dict(b_fn=lambda variant, h: -h),
}


def _within(trace, ref_trace, margin: float) -> bool:
    """Whether every step's x agrees with the reference within `margin` times the golden tolerance."""
    return all(
        np.allclose(t["x"].numpy(), r["x"], rtol=margin * RTOL, atol=margin * ATOL) for t, r in zip(trace, ref_trace)
    )


@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_a_wrong_variant_would_be_caught(mutant):
    """Each wrong sampler's trajectory misses ours even at 10x the golden tolerance, so it would fail."""
    x = _start(4)
    # a realistic shifted schedule; 4 steps reach order 3 and keep the first (fixed-ρ) steps non-trivial
    sigmas = get_sigmas_flow_shift(4, 1.0)
    _, _, trace = _run_ours(nonlinear_model, x, sigmas, "bh1")
    kwargs = dict(variant="bh1") | MUTANTS[mutant]
    _, wrong = reference_unipc(_as_numpy_model(nonlinear_model), x.double().numpy(), sigmas.tolist(), **kwargs)
    assert not _within(trace, wrong, margin=10)


@pytest.mark.parametrize("steps", [3, 4])
def test_bh1_and_bh2_results_differ_once_order_2_is_reached(steps):
    """With three or four steps the two variants' results differ well beyond the golden tolerance."""
    x = _start(5)
    sigmas = get_sigmas_flow_shift(steps, 1.0)
    one = sample_unipc(nonlinear_model, x.clone(), sigmas, variant="bh1")
    two = sample_unipc(nonlinear_model, x.clone(), sigmas, variant="bh2")
    # B only enters the two fixed-ρ steps (1 and 2), so the gap is set by those first step sizes;
    # on a 25-step shifted schedule they are tiny and the variants agree to ~1e-6 (see the hand test)
    assert not np.allclose(one.numpy(), two.numpy(), rtol=10 * RTOL, atol=10 * ATOL)


def test_with_two_steps_bh1_and_bh2_differ_only_in_the_unused_corrected_x():
    """max order 1: the result comes from the UniP-1 (DDIM) point, shared; only UniC-1's x differs."""
    x = _start(6)
    sigmas = get_sigmas_flow_shift(2, 1.0)
    out1, _, trace1 = _run_ours(nonlinear_model, x, sigmas, "bh1")
    out2, _, trace2 = _run_ours(nonlinear_model, x, sigmas, "bh2")
    assert torch.equal(out1, out2)
    assert not np.allclose(trace1[1]["x"].numpy(), trace2[1]["x"].numpy(), rtol=10 * RTOL, atol=10 * ATOL)


# ---------------------------------------------------------------------------------------------------
# Context layouts
# ---------------------------------------------------------------------------------------------------


def test_context_sizes_are_the_released_checkpoints():
    """1x, 2x and 4x hold 1, 2 and 16 latent frames."""
    assert (HISTORY_1X, HISTORY_2X, HISTORY_4X) == (1, 2, 16)


@pytest.mark.parametrize(
    "sections, expected",
    [
        (1, [0]),
        (2, [1, 0]),
        (3, [2, 1, 0]),
        (4, [3, 2, 1, 0]),
        (5, [3, 2, 2, 1, 0]),
        (6, [3, 2, 2, 2, 1, 0]),
        (7, [3, 2, 2, 2, 2, 1, 0]),
        (8, [3, 2, 2, 2, 2, 2, 1, 0]),
    ],
)
def test_section_paddings_golden(sections, expected):
    """The inverted schedule: n−1 … 0 up to four sections, then 3, 2 …, 2, 1, 0."""
    assert section_paddings(sections) == expected


def _labelled_history(frames: int) -> torch.Tensor:
    """History of shape (2, 3, frames, 2, 1) whose value is 1000·batch + 100·channel + frame."""
    b = torch.arange(2).view(2, 1, 1, 1, 1) * 1000
    c = torch.arange(3).view(1, 3, 1, 1, 1) * 100
    t = torch.arange(frames).view(1, 1, frames, 1, 1)
    return (b + c + t).expand(2, 3, frames, 2, 1).to(torch.float32).clone()


def _assert_frames(sliced: torch.Tensor, frames: list[int]):
    """The slice holds exactly these history frames, in this order, for every batch, channel and pixel."""
    expected = _labelled_history(max(frames) + 1)[:, :, frames]
    assert sliced.shape == expected.shape
    assert torch.equal(sliced, expected)


def _assert_positions(layout, total: int, blank: list[int]):
    """Every RoPE position is used once, except the blank padding which nothing uses."""
    parts = [layout.latent_indices, layout.clean_indices, layout.indices_2x, layout.indices_4x]
    assert all(not p.is_floating_point() for p in parts)
    used = torch.cat(parts).tolist()
    assert sorted(used + blank) == list(range(total))


FRAMEPACK_GOLDEN = [
    # (window, padding, blank, latent, clean, 2x, 4x): [start 1 | blank p·w | noisy w | 1x 1 | 2x 2 | 4x 16]
    (
        9, 0, [],
        [1, 2, 3, 4, 5, 6, 7, 8, 9],
        [0, 10],
        [11, 12],
        [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28],
    ),
    (
        9, 1, [1, 2, 3, 4, 5, 6, 7, 8, 9],
        [10, 11, 12, 13, 14, 15, 16, 17, 18],
        [0, 19],
        [20, 21],
        [22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37],
    ),
    (
        9, 2, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
        [19, 20, 21, 22, 23, 24, 25, 26, 27],
        [0, 28],
        [29, 30],
        [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46],
    ),
    (
        9, 3, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27],
        [28, 29, 30, 31, 32, 33, 34, 35, 36],
        [0, 37],
        [38, 39],
        [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55],
    ),
    (
        3, 2, [1, 2, 3, 4, 5, 6],
        [7, 8, 9],
        [0, 10],
        [11, 12],
        [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28],
    ),
]


@pytest.mark.parametrize("window, padding, blank, latent, clean, idx_2x, idx_4x", FRAMEPACK_GOLDEN)
@pytest.mark.parametrize("history_frames", [19, 19 + 27])
def test_framepack_layout_golden(window, padding, blank, latent, clean, idx_2x, idx_4x, history_frames):
    """Inverted layout: literal positions, and the newest history frames (the front) as 1x, 2x, 4x."""
    layout = framepack_layout(_labelled_history(history_frames), window, padding)
    assert layout.latent_indices.tolist() == latent
    assert layout.clean_indices.tolist() == clean
    assert layout.indices_2x.tolist() == idx_2x
    assert layout.indices_4x.tolist() == idx_4x
    _assert_positions(layout, total=1 + padding * window + window + 1 + 2 + 16, blank=blank)
    _assert_frames(layout.clean_1x, [0])
    _assert_frames(layout.history_2x, [1, 2])
    _assert_frames(layout.history_4x, [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])


F1_GOLDEN = [
    # (window, latent): [start 1 | 4x 16 | 2x 2 | 1x 1 | noisy w]; the context positions never move
    (9, [20, 21, 22, 23, 24, 25, 26, 27, 28]),
    (3, [20, 21, 22]),
]


@pytest.mark.parametrize("window, latent", F1_GOLDEN)
@pytest.mark.parametrize(
    "history_frames, frames_4x, frames_2x, frames_1x",
    [
        # the first section: 19 zero frames then the start latent (20 frames)
        (20, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [17, 18], [19]),
        (29, [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25], [26, 27], [28]),
        (19, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [16, 17], [18]),
    ],
)
def test_f1_layout_golden(window, latent, history_frames, frames_4x, frames_2x, frames_1x):
    """Forward layout: literal positions, and the newest history frames (the end) as 1x, 2x, 4x."""
    layout = f1_layout(_labelled_history(history_frames), window)
    assert layout.indices_4x.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    assert layout.indices_2x.tolist() == [17, 18]
    assert layout.clean_indices.tolist() == [0, 19]
    assert layout.latent_indices.tolist() == latent
    _assert_positions(layout, total=1 + 16 + 2 + 1 + window, blank=[])
    _assert_frames(layout.history_4x, frames_4x)
    _assert_frames(layout.history_2x, frames_2x)
    _assert_frames(layout.clean_1x, frames_1x)
