"""The flow-matching schedule and the UniPC sampler, checked against exact solutions."""

import math

import pytest
import torch

from diffusers_helper.sampling import flow_shift_mu, get_sigmas_flow_shift, sample_unipc


def test_mu_is_the_line_through_the_two_anchor_points_capped_at_ln7():
    assert flow_shift_mu(256) == pytest.approx(0.5, abs=1e-12)
    assert flow_shift_mu(4096) == pytest.approx(1.15, abs=1e-12)
    assert flow_shift_mu(2176) == pytest.approx((0.5 + 1.15) / 2, abs=1e-12)
    # the 640 bucket with the default window is far past the cap
    assert flow_shift_mu(9 * 80 * 76 // 4) == math.log(7.0)


@pytest.mark.parametrize("steps", [1, 2, 25])
def test_sigmas_follow_the_time_shift_formula(steps):
    mu = 1.3
    sigmas = get_sigmas_flow_shift(steps, mu)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert sigmas[0].item() == pytest.approx(1.0, abs=1e-6) and sigmas[-1] == 0.0
    assert torch.all(sigmas[1:] < sigmas[:-1])
    for i in range(1, steps):
        t = 1 - i / steps
        expected = math.exp(mu) / (math.exp(mu) + 1 / t - 1)
        assert sigmas[i].item() == pytest.approx(expected, rel=1e-5)


class GaussianFlow:
    """Exact denoiser for data X ~ N(m, s²) per element under x_σ = (1−σ)X + σε."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std
        self.calls = []

    def __call__(self, x, sigma):
        self.calls.append(float(sigma[0]))
        s = sigma.view(-1, *([1] * (x.dim() - 1))).double()
        a = 1 - s
        var = a**2 * self.std**2 + s**2
        x0 = self.mean + a * self.std**2 / var * (x.double() - a * self.mean)
        return x0.to(x.dtype)

    def exact_x0(self, noise, sigma):
        """E[X | x_σ] on the exact probability-flow trajectory that starts at `noise` when σ = 1."""
        a = 1 - sigma
        r = math.sqrt(a**2 * self.std**2 + sigma**2)
        return self.mean + a * self.std**2 / r * noise.double()


def _sigmas_to(steps, last=0.2):
    """Uniform steps from 1 to `last`, then 0: the step size shrinks with the count while the final
    evaluated σ stays put (the shifted schedule keeps a ratio-2 last step however many steps it has)."""
    return torch.cat([torch.linspace(1.0, last, steps), torch.zeros(1)])


def _run(steps, variant="bh1", seed=0, sigmas=None):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn((1, 4, 2, 3, 3), generator=gen, dtype=torch.float64) * 0.5
    noise = torch.randn((1, 4, 2, 3, 3), generator=gen)
    model = GaussianFlow(mean, 0.7)
    sigmas = _sigmas_to(steps) if sigmas is None else sigmas
    out = sample_unipc(model, noise.clone(), sigmas, variant=variant)
    exact = model.exact_x0(noise, float(sigmas[-2]))
    return (out.double() - exact).abs().max().item(), model, sigmas


def _trajectory_error(steps, variant):
    """Largest distance between the sampler's x and the exact flow over all steps."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn((1, 4, 2, 3, 3), generator=gen, dtype=torch.float64) * 0.5
    noise = torch.randn((1, 4, 2, 3, 3), generator=gen)
    flow, errors = GaussianFlow(mean, 0.7), []

    def on_step(d):
        sigma = float(d["sigma"][0])
        exact = (1 - sigma) * mean + math.sqrt((1 - sigma) ** 2 * 0.49 + sigma**2) * noise.double()
        errors.append((d["x"].double() - exact).abs().max().item())

    sample_unipc(flow, noise.clone(), _sigmas_to(steps), callback=on_step, variant=variant)
    return max(errors)


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_follows_the_exact_flow_at_high_order(variant):
    errors = [_trajectory_error(steps, variant) for steps in (16, 32, 64)]
    # a first-order method would only halve the error when the step halves
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5
    assert errors[-1] < 1e-5


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc_result_converges_to_the_exact_denoised_value(variant):
    assert _run(64, variant)[0] < 1e-4


def test_unipc_beats_euler_at_equal_model_calls():
    steps = 10
    err_unipc, model, sigmas = _run(steps)
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn((1, 4, 2, 3, 3), generator=gen, dtype=torch.float64) * 0.5
    noise = torch.randn((1, 4, 2, 3, 3), generator=gen)
    flow = GaussianFlow(mean, 0.7)
    x = noise.clone()
    for i in range(steps - 1):  # Euler on the velocity (x − x̂₀)/σ, ending at σ_(n−1) like UniPC
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = flow(x, s.expand(1))
        x = x + (s_next - s) * (x - x0) / s
    x0 = flow(x, sigmas[steps - 1].expand(1))
    err_euler = (x0.double() - flow.exact_x0(noise, float(sigmas[-2]))).abs().max().item()
    assert err_unipc < err_euler / 10


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 25])
def test_model_is_evaluated_once_per_step_never_at_sigma_zero(steps):
    _, model, sigmas = _run(steps, sigmas=get_sigmas_flow_shift(steps, 1.0))
    assert model.calls == pytest.approx(sigmas[:-1].tolist())
    assert 0.0 not in model.calls


def test_result_is_the_last_denoised_estimate_and_callback_sees_each_step():
    seen = []
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn((1, 2, 1, 2, 2), generator=gen)
    model = GaussianFlow(torch.zeros(1, dtype=torch.float64), 0.5)
    sigmas = get_sigmas_flow_shift(6, 0.8)
    out = sample_unipc(model, noise, sigmas, callback=lambda d: seen.append((d["i"], d["denoised"].clone())))
    assert [i for i, _ in seen] == list(range(6))
    assert torch.equal(out, seen[-1][1])


def test_bad_variant_is_rejected():
    with pytest.raises(ValueError):
        sample_unipc(lambda x, s: x, torch.zeros(1, 1), get_sigmas_flow_shift(3, 1.0), variant="bh3")


def test_the_shift_from_diffusers_is_bit_identical_to_the_line_through_the_reference_points():
    """flow_shift_mu uses diffusers' calculate_shift; the same operations on the same constants give the same bits."""
    slope = (1.15 - 0.5) / (4096 - 256)
    intercept = 0.5 - slope * 256
    for tokens in (1, 255, 256, 257, 1000, 1520, 4096, 4097, 9000, 10**6):
        assert flow_shift_mu(tokens) == min(slope * tokens + intercept, math.log(7.0)), tokens
