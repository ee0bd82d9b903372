"""Tests of the latent diffusion model: schedule, forward process, posterior, loss, guidance, samplers, UNet.

The samplers are checked against exact denoisers: for a single known x0 (every sampler must return it)
and for Gaussian data, whose posterior mean E[eps | x_t] is closed-form, so the samples' spread checks
the noise levels and the solver's accuracy.
"""
import math

import numpy as np
import pytest
import torch

from model_diffusion import (LatentUNet, NoiseSchedule, ddim_sample, ddim_sigma, ddim_step, ddpm_sample,
                             diffusion_loss, dpmpp_2m_sample, guided, min_snr_weights, respaced_posterior, sample,
                             sampling_timesteps)

T = 1000


def rng(seed):
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def tiny_unet(channels=4, conditional=True, perturb=True, seed=0, dropout=0.0):
    """A small UNet for 8x8 latents; `perturb` makes the zero-initialised output conv nonzero."""
    torch.manual_seed(seed)
    model = LatentUNet(channels, model_channels=64, channel_mult=(1, 1), num_res_blocks=1,
                       attn_resolutions=(4,), resolution=8, conditional=conditional, heads=2, dropout=dropout)
    if perturb:
        with torch.no_grad():
            model.conv_out.weight.normal_(0.0, 0.05)
    return model.eval()


def point_oracle(schedule, x0):
    """Exact eps for data that is always `x0`: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return lambda x_t, t, z: schedule.predict_eps_from_x0(x_t, t, x0.expand_as(x_t))


def gaussian_oracle(schedule, mu, sd):
    """Exact E[eps | x_t] for data ~ N(mu, sd^2): sqrt(1-abar) (x_t - sqrt(abar) mu) / (abar sd^2 + 1 - abar)."""
    def eps_fn(x_t, t, z):
        abar = schedule.alphas_cumprod[t].float().view(-1, *([1] * (x_t.dim() - 1)))
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * mu) / (abar * sd ** 2 + 1 - abar)
    return eps_fn


# ----------------------------------------------------------------------------------------------
# Schedule


def test_linear_schedule_endpoints_and_monotone():
    s = NoiseSchedule("linear", T)
    assert s.betas.dtype == torch.float64 and s.betas.shape == (T,)
    assert s.betas[0].item() == pytest.approx(1e-4, abs=1e-12)
    assert s.betas[-1].item() == pytest.approx(0.02, abs=1e-12)
    abar = s.alphas_cumprod
    assert torch.all(abar[1:] < abar[:-1]) and abar.min() > 0 and abar.max() < 1
    np.testing.assert_allclose(abar.numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, T)), rtol=1e-12)


def test_cosine_schedule_matches_formula_and_ends():
    s = NoiseSchedule("cosine", T)
    abar = s.alphas_cumprod.numpy()
    assert abar[0] > 0.9999 and abar[-1] < 1e-6
    assert np.all(np.diff(abar) < 0) and abar.min() > 0
    assert s.betas.max().item() == pytest.approx(0.999)  # the clip is reached at the very end
    # Before the clip the product of the betas gives back f(t) / f(0) of Nichol & Dhariwal.
    steps = np.arange(1, T) / T
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(abar[:-1], f(steps) / f(0.0), rtol=1e-9)


def test_unknown_schedule_rejected():
    with pytest.raises(ValueError):
        NoiseSchedule("quadratic")


def test_q_sample_statistics():
    s = NoiseSchedule("linear", T)
    x0 = torch.tensor([1.5, -0.7, 0.0]).repeat(20000, 1)
    t = torch.full((x0.shape[0],), 300)
    x_t = s.q_sample(x0, t, torch.randn(x0.shape, generator=rng(0)))
    assert x_t.dtype == torch.float32
    abar = s.alphas_cumprod[300].item()
    np.testing.assert_allclose(x_t.mean(0).numpy(), math.sqrt(abar) * np.array([1.5, -0.7, 0.0]), atol=0.02)
    np.testing.assert_allclose(x_t.std(0).numpy(), math.sqrt(1 - abar), rtol=0.03)


def test_posterior_matches_bayes_rule():
    """Mean/variance of q(x_{t-1} | x_t, x0) vs. the product of q(x_t | x_{t-1}) and q(x_{t-1} | x0) in numpy."""
    s = NoiseSchedule("linear", T)
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1 - betas)
    gen = rng(1)
    t = torch.tensor([0, 1, 2, 10, 500, 999])
    x0 = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    x_t = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    mean, var, log_var = s.posterior_mean_variance(x0, x_t, t)
    for i, k in enumerate(t.tolist()):
        if k == 0:  # q(x_{t-1} | x0) is the point x0 itself
            want_mean, want_var = x0[i].numpy(), 0.0
        else:
            prior_mean, prior_var = np.sqrt(abar[k - 1]) * x0[i].numpy(), 1 - abar[k - 1]
            # Likelihood of x_{t-1} from x_t = sqrt(alpha) x_{t-1} + sqrt(beta) eps.
            precision = (1 - betas[k]) / betas[k] + 1 / prior_var
            want_var = 1 / precision
            want_mean = want_var * (np.sqrt(1 - betas[k]) * x_t[i].numpy() / betas[k] + prior_mean / prior_var)
        np.testing.assert_allclose(mean[i].numpy(), want_mean, rtol=1e-9, atol=1e-12)
        assert var[i].item() == pytest.approx(want_var, rel=1e-9, abs=1e-15)
    assert var.shape == (6, 1, 1, 1) and var.dtype == torch.float64
    np.testing.assert_allclose(log_var[1:].flatten().numpy(), np.log(var[1:].flatten().numpy()), rtol=1e-12)
    assert log_var[0].item() == pytest.approx(math.log(s.posterior_variance[1].item()))


def test_conversions_round_trip():
    for kind in ("linear", "cosine"):
        s = NoiseSchedule(kind, T)
        gen = rng(2)
        x0 = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
        eps = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
        t = torch.tensor([0, 100, 500, 900, 998])
        x_t = s.q_sample(x0, t, eps)
        torch.testing.assert_close(s.predict_x0_from_eps(x_t, t, eps), x0)
        torch.testing.assert_close(s.predict_eps_from_x0(x_t, t, x0), eps)
        v = s.v_target(x0, eps, t)
        a, b = s.sqrt_alphas_cumprod[500].item(), s.sqrt_one_minus_alphas_cumprod[500].item()
        torch.testing.assert_close(v[2], a * eps[2] - b * x0[2])
        torch.testing.assert_close(s.predict_x0_from_v(x_t, t, v), x0)
        torch.testing.assert_close(s.predict_eps_from_v(x_t, t, v), eps)
        e, x = s.eps_and_x0(x_t, t, v, "v")
        torch.testing.assert_close((e, x), (eps, x0))
    assert s.to("cpu") is s  # tables move lazily, per device
    # The data dtype is kept (the tables are float64).
    assert s.q_sample(x0.float(), t, eps.float()).dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# Samplers


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_sampling_timesteps_distinct_and_complete(kind, spacing):
    s = NoiseSchedule(kind, T)
    for n in (2, 7, 20, 50, 333, T):
        ts = sampling_timesteps(s, n, spacing)
        assert len(ts) == n and ts[0] == T - 1 and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    assert sampling_timesteps(s, 1, spacing) == [T - 1]
    with pytest.raises(ValueError):
        sampling_timesteps(s, T + 1, spacing)


def test_ddim_eta1_step_is_the_ddpm_posterior():
    """sigma(eta=1, t -> t-1) is beta_tilde_t, and the DDIM mean is the posterior mean for consistent eps."""
    s = NoiseSchedule("linear", T)
    for t in (1, 2, 50, 500, 999):
        assert ddim_sigma(s, t, t - 1, 1.0) ** 2 == pytest.approx(s.posterior_variance[t].item(), rel=1e-9)
        assert ddim_sigma(s, t, t - 1, 0.0) == 0.0
    assert ddim_sigma(s, 0, -1, 1.0) == 0.0
    gen = rng(3)
    x0 = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    for t in (1, 300, 999):
        tt = torch.full((2,), t)
        x_t = s.q_sample(x0, tt, eps)
        mean, _, _ = s.posterior_mean_variance(x0, x_t, tt)
        torch.testing.assert_close(ddim_step(s, eps, x0, t, t - 1, eta=1.0), mean)


def reference_ddpm(eps_fn, s, shape, generator):
    """Ho et al.'s sampler written out over all T steps with the schedule's own posterior tables."""
    x = torch.randn(shape, generator=generator)
    for t in range(s.timesteps - 1, -1, -1):
        tt = torch.full((shape[0],), t)
        x0 = s.predict_x0_from_eps(x, tt, eps_fn(x, tt, None))
        mean, var, _ = s.posterior_mean_variance(x0, x, tt)
        x = mean + var.sqrt() * torch.randn(shape, generator=generator) if t > 0 else mean
    return x


def test_respaced_posterior_is_the_schedule_posterior_one_step_apart():
    s = NoiseSchedule("cosine", T)
    for t in (1, 2, 50, 500, 999):
        c1, c2, var = respaced_posterior(s, t, t - 1)
        assert c1 == pytest.approx(s.posterior_mean_coef1[t].item(), rel=1e-9)
        assert c2 == pytest.approx(s.posterior_mean_coef2[t].item(), rel=1e-9)
        assert var == pytest.approx(s.posterior_variance[t].item(), rel=1e-9)
    assert respaced_posterior(s, 0, -1)[2] == 0.0  # the last step lands on the clean data


def test_ddpm_with_all_steps_matches_the_written_out_sampler():
    s = NoiseSchedule("linear", 50)
    eps_fn = lambda x, t, z: 0.3 * x + 0.01 * t.view(-1, 1, 1, 1)  # any smooth eps model
    shape = (3, 2, 4, 4)
    want = reference_ddpm(eps_fn, s, shape, rng(5))
    for steps in (None, 50):
        torch.testing.assert_close(ddpm_sample(eps_fn, s, shape, None, steps=steps, generator=rng(5)), want,
                                   rtol=1e-5, atol=1e-5)


def test_respaced_ddpm_is_ddim_with_eta_one():
    """Over the same respaced steps, ancestral sampling with the respaced betas and DDIM at eta = 1 are one
    process (Song et al. sec. 4.1), written in two different forms here."""
    s = NoiseSchedule("linear", T)
    eps_fn = lambda x, t, z: 0.2 * x
    shape = (3, 2, 4, 4)
    for steps in (10, 37):
        a = ddpm_sample(eps_fn, s, shape, None, steps=steps, generator=rng(2))
        b = ddim_sample(eps_fn, s, shape, None, steps=steps, eta=1.0, generator=rng(2))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_respaced_ddpm_reproduces_gaussian_data_with_an_exact_denoiser():
    """Each long ancestral step drops the x0 uncertainty c1^2 Var(x0 | x_t), so the spread shrinks with
    fewer steps: 7% at 100 steps, 4% at 200 (as DDIM at eta 1, the same process)."""
    s = NoiseSchedule("linear", T)
    x = ddpm_sample(gaussian_oracle(s, 0.5, 0.5), s, (4000, 2), None, steps=200, generator=rng(0))
    assert x.mean().item() == pytest.approx(0.5, abs=0.03) and x.std().item() == pytest.approx(0.5, rel=0.04)
    few = ddpm_sample(gaussian_oracle(s, 0.5, 0.5), s, (4000, 2), None, steps=10, generator=rng(0))
    assert few.std().item() < 0.9 * 0.5


def test_ddim_eta0_is_deterministic_given_initial_noise():
    s = NoiseSchedule("linear", T)
    model = tiny_unet()
    eps_fn = guided(model, 2.0)
    z = torch.tensor([3, -1])
    x_init = torch.randn(2, 4, 8, 8, generator=rng(0))
    a = ddim_sample(eps_fn, s, (2, 4, 8, 8), z, steps=5, eta=0.0, x_init=x_init, generator=rng(1))
    b = ddim_sample(eps_fn, s, (2, 4, 8, 8), z, steps=5, eta=0.0, x_init=x_init, generator=rng(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = ddim_sample(eps_fn, s, (2, 4, 8, 8), z, steps=5, eta=1.0, x_init=x_init, generator=rng(1))
    d = ddim_sample(eps_fn, s, (2, 4, 8, 8), z, steps=5, eta=1.0, x_init=x_init, generator=rng(2))
    assert not torch.allclose(c, d)
    # The generator alone makes a run repeatable.
    e = ddim_sample(eps_fn, s, (2, 4, 8, 8), z, steps=5, eta=1.0, generator=rng(7))
    f = ddim_sample(eps_fn, s, (2, 4, 8, 8), z, steps=5, eta=1.0, generator=rng(7))
    torch.testing.assert_close(e, f, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_samplers_return_the_single_data_point_with_an_exact_denoiser(kind):
    s = NoiseSchedule(kind, T)
    x0 = torch.randn(1, 2, 4, 4, generator=rng(4)).clamp(-2, 2)
    eps_fn = point_oracle(s, x0)
    shape = (3, 2, 4, 4)
    runs = {
        "ddpm": ddpm_sample(eps_fn, s, shape, None, generator=rng(0)),
        "ddim": ddim_sample(eps_fn, s, shape, None, steps=10, generator=rng(0)),
        "ddim_eta1": ddim_sample(eps_fn, s, shape, None, steps=10, eta=1.0, generator=rng(0)),
        "dpmpp": dpmpp_2m_sample(eps_fn, s, shape, None, steps=8, generator=rng(0)),
    }
    for name, x in runs.items():
        torch.testing.assert_close(x, x0.expand(shape), atol=2e-3, rtol=0, msg=name)


def test_clip_x0_option():
    """With clipping at 1, data at 3 comes back at 1 from every sampler (no clipping by default)."""
    s = NoiseSchedule("linear", 50)
    eps_fn = point_oracle(s, torch.full((1, 1, 2, 2), 3.0))
    shape = (2, 1, 2, 2)
    few_step = (lambda *a, **k: ddim_sample(*a, steps=5, **k), lambda *a, **k: dpmpp_2m_sample(*a, steps=5, **k))
    for fn in (ddpm_sample, *few_step):
        torch.testing.assert_close(fn(eps_fn, s, shape, None, clip_x0=1.0, generator=rng(0)), torch.ones(shape))
        unclipped = fn(eps_fn, s, shape, None, generator=rng(0))
        torch.testing.assert_close(unclipped, torch.full(shape, 3.0), atol=1e-3, rtol=0)


def test_samplers_reproduce_gaussian_data_with_an_exact_denoiser():
    """DDPM needs the right posterior noise; DDIM/DPM-Solver++ the right ODE steps to keep the spread."""
    s = NoiseSchedule("linear", T)
    mu, sd = 0.5, 0.5
    eps_fn = gaussian_oracle(s, mu, sd)
    shape = (4000, 2)

    def check(x, std_tol):
        assert x.mean().item() == pytest.approx(mu, abs=0.03)
        assert x.std().item() == pytest.approx(sd, rel=std_tol)

    check(ddpm_sample(eps_fn, s, shape, None, generator=rng(0)), 0.03)
    check(ddim_sample(eps_fn, s, shape, None, steps=100, eta=0.0, generator=rng(0)), 0.04)
    check(ddim_sample(eps_fn, s, shape, None, steps=200, eta=1.0, generator=rng(0)), 0.04)
    check(dpmpp_2m_sample(eps_fn, s, shape, None, steps=20, generator=rng(0)), 0.03)
    # A few-step DDIM visibly shrinks the spread: the check above can tell a good solver from a poor one.
    few = ddim_sample(eps_fn, s, shape, None, steps=5, generator=rng(0))
    assert few.std().item() < 0.8 * sd


def test_dpmpp_first_order_step_equals_ddim():
    """DPM-Solver++'s first (first-order) step is the DDIM step in lambda = log(alpha / sigma) time."""
    s = NoiseSchedule("cosine", T)
    eps_fn = lambda x, t, z: torch.tanh(x) * 0.7 + 0.1 * (t.float() / T).view(-1, 1, 1, 1)
    shape = (2, 3, 4, 4)
    a = dpmpp_2m_sample(eps_fn, s, shape, None, steps=2, spacing="time", generator=rng(5))
    b = ddim_sample(eps_fn, s, shape, None, steps=2, generator=rng(5))
    torch.testing.assert_close(a, b)
    # With more steps the second-order correction makes the two differ.
    a = dpmpp_2m_sample(eps_fn, s, shape, None, steps=4, spacing="time", generator=rng(5))
    b = ddim_sample(eps_fn, s, shape, None, steps=4, generator=rng(5))
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp"])
def test_callback_sees_every_step(name):
    s = NoiseSchedule("linear", 30)
    x0 = torch.ones(1, 1, 2, 2)
    seen = []
    callback = lambda i, n, x_t, x0_pred: seen.append((i, n, x_t.shape, x0_pred.shape))
    fn = {"ddpm": lambda **k: ddpm_sample(**k), "ddim": lambda **k: ddim_sample(steps=6, **k),
          "dpmpp": lambda **k: dpmpp_2m_sample(steps=6, **k)}[name]
    fn(eps_fn=point_oracle(s, x0), schedule=s, shape=(2, 1, 2, 2), z=None, callback=callback)
    n = 30 if name == "ddpm" else 6
    assert [c[:2] for c in seen] == [(i, n) for i in range(n)]
    assert all(c[2] == c[3] == (2, 1, 2, 2) for c in seen)


class CountingModel(torch.nn.Module):
    """Wraps a model, recording the batch size of each call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls, self.conditional = model, [], model.conditional

    def forward(self, x_t, t, z):
        self.calls.append(x_t.shape[0])
        return self.model(x_t, t, z)


def test_guidance_one_is_one_conditional_pass():
    model = CountingModel(tiny_unet())
    x = torch.randn(3, 4, 8, 8)
    t, z = torch.tensor([10, 500, 900]), torch.tensor([0, 12, 31])
    with torch.no_grad():
        want = model.model(x, t, z)
        got = guided(model, 1.0)(x, t, z)
    assert model.calls == [3]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    model.calls.clear()
    with torch.no_grad():
        guided(model, 4.0)(x, t, torch.full((3,), -1))
    assert model.calls == [3]  # all unconditional: nothing to guide


def test_guidance_formula_and_v_objective():
    model = tiny_unet()
    s = NoiseSchedule("linear", T)
    x = torch.randn(3, 4, 8, 8)
    t, z = torch.tensor([10, 500, 900]), torch.tensor([0, 12, 31])
    with torch.no_grad():
        cond, uncond = model(x, t, z), model(x, t, torch.full_like(z, -1))
        assert not torch.allclose(cond, uncond)
        # One doubled batch vs. two separate calls: equal up to float32 rounding.
        want = uncond + 3.0 * (cond - uncond)
        torch.testing.assert_close(guided(model, 3.0)(x, t, z), want, rtol=1e-4, atol=2e-5)
        got = guided(model, 3.0, "v", s)(x, t, z)
        torch.testing.assert_close(got, s.predict_eps_from_v(x, t, want), rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError):
        guided(model, 2.0, "v")  # v needs the schedule


def test_sample_dispatcher():
    s = NoiseSchedule("cosine", 40)
    model = tiny_unet(dropout=0.5)  # dropout would make the two runs differ if sampling left train mode on
    model.train()
    for name, steps in (("ddpm", None), ("ddim", 5), ("dpmpp", 5)):
        a = sample(model, s, (2, 4, 8, 8), 7, sampler=name, steps=steps, guidance=2.0, generator=rng(0))
        b = sample(model, s, (2, 4, 8, 8), 7, sampler=name, steps=steps, guidance=2.0, generator=rng(0))
        assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert model.training  # mode restored
    respaced = sample(model, s, (2, 4, 8, 8), 7, sampler="ddpm", steps=10, generator=rng(0))
    assert respaced.shape == (2, 4, 8, 8) and torch.isfinite(respaced).all()
    with pytest.raises(ValueError):
        sample(model, s, (2, 4, 8, 8), 7, sampler="euler")


# ----------------------------------------------------------------------------------------------
# UNet


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("channels", [1, 3, 8])
def test_unet_shapes_and_zero_start(size, channels):
    model = LatentUNet(channels, model_channels=64, channel_mult=(1, 1, 1), num_res_blocks=1,
                       attn_resolutions=(8,), resolution=16, heads=2)
    x = torch.randn(2, channels, size, size)
    out = model(x, torch.tensor([0, 999]), torch.tensor([-1, 31]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer


def test_unet_config_rebuilds_the_model():
    model = tiny_unet()
    import json
    config = json.loads(json.dumps(model.config))
    clone = LatentUNet(**config)
    clone.load_state_dict(model.state_dict())
    x, t, z = torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.tensor([5, -1])
    with torch.no_grad():
        torch.testing.assert_close(clone(x, t, z), model(x, t, z))


def test_unet_condition_and_null_token():
    model = tiny_unet()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([200, 200])
    with torch.no_grad():
        x = x[:1].expand(2, -1, -1, -1)
        out = model(x, t, torch.tensor([2, 25]))
        assert not torch.allclose(out[0], out[1], atol=1e-4)  # z matters
        out = model(x, torch.tensor([100, 700]), torch.tensor([2, 2]))
        assert not torch.allclose(out[0], out[1], atol=1e-4)  # and so does t
        before_null, before_z = model(x, t, torch.tensor([-1, -1])), model(x, t, torch.tensor([5, 5]))
        torch.testing.assert_close(model(x, t, None), before_null)  # None means "no condition"
        model.z_embed.null.normal_()
        after_null, after_z = model(x, t, torch.tensor([-1, -1])), model(x, t, torch.tensor([5, 5]))
    assert not torch.allclose(before_null, after_null, atol=1e-5)  # z = -1 reads the null vector
    torch.testing.assert_close(before_z, after_z, rtol=0, atol=0)  # and nothing else does


@pytest.mark.parametrize("width", [16, 32])
def test_narrow_unet_still_conditions(width):
    """At widths of one channel per GroupNorm group, t and z must still reach the output (a condition
    added before the norm would be subtracted away again; module.ResBlock applies it after the norm)."""
    model = LatentUNet(4, model_channels=width, channel_mult=(1, 1), num_res_blocks=1, attn_resolutions=(),
                       resolution=8, heads=1)
    with torch.no_grad():
        model.conv_out.weight.normal_(0.0, 0.05)
        x = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1)
        out = model(x, torch.tensor([100, 100]), torch.tensor([2, 25]))
        assert not torch.allclose(out[0], out[1], atol=1e-4)
        out = model(x, torch.tensor([100, 700]), torch.tensor([2, 2]))
        assert not torch.allclose(out[0], out[1], atol=1e-4)


def test_unconditional_unet_ignores_z():
    model = tiny_unet(conditional=False)
    assert model.z_embed is None
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, torch.tensor([0, 30])), model(x, t, None), rtol=0, atol=0)


def test_unet_rejects_bad_inputs():
    model = tiny_unet()
    with pytest.raises(ValueError):
        model(torch.randn(1, 4, 7, 8), torch.tensor([1]), torch.tensor([0]))


# ----------------------------------------------------------------------------------------------
# Loss


class RecordingZero(torch.nn.Module):
    """Predicts 0 and records its inputs, so the loss equals the mean square of the target."""

    def __init__(self):
        super().__init__()
        self.seen = None

    def forward(self, x_t, t, z):
        self.seen = (x_t, t, z)
        return torch.zeros_like(x_t)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_loss_shapes_and_targets(objective):
    s = NoiseSchedule("linear", T)
    model = RecordingZero()
    x0 = torch.randn(16, 4, 8, 8, generator=rng(6), dtype=torch.float64)
    z = torch.randint(0, 32, (16,))
    loss, per_sample, t = diffusion_loss(model, s, x0, z, objective, p_uncond=0.0, generator=rng(0))
    assert per_sample.shape == (16,) and t.shape == (16,) and t.dtype == torch.long
    assert 0 <= t.min() and t.max() < T and len(set(t.tolist())) > 1
    x_t, t_seen, z_seen = model.seen
    assert torch.equal(t_seen, t) and torch.equal(z_seen, z)
    noise = s.predict_eps_from_x0(x_t, t, x0)  # the noise the loss drew
    target = noise if objective == "eps" else s.v_target(x0, noise, t)
    torch.testing.assert_close(per_sample, target.pow(2).flatten(1).mean(1).float())
    assert loss.item() == pytest.approx(per_sample.mean().item())
    again = diffusion_loss(model, s, x0, z, objective, p_uncond=0.0, generator=rng(0))
    torch.testing.assert_close(again[1], per_sample, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_min_snr_weights_against_the_schedule_in_numpy(objective):
    s = NoiseSchedule("linear", T)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))  # Ho et al.'s linear betas, computed apart
    snr = abar / (1 - abar)
    t = torch.tensor([0, 10, 200, 500, 999])
    expected = np.minimum(snr, 5.0)[t.numpy()] / (snr[t.numpy()] + (objective == "v"))
    np.testing.assert_allclose(min_snr_weights(s, t, objective, 5.0).numpy(), expected, rtol=1e-5)
    assert min_snr_weights(s, t, objective, 5.0)[-1] == pytest.approx(1.0 if objective == "eps" else
                                                                      snr[-1] / (snr[-1] + 1), rel=1e-5)


def test_min_snr_loss_weights_the_mean_and_keeps_the_per_sample_mse():
    s = NoiseSchedule("linear", T)
    x0, z = torch.randn(32, 4, 8, 8, generator=rng(1)), torch.randint(0, 32, (32,))
    plain, per_plain, t = diffusion_loss(RecordingZero(), s, x0, z, "v", p_uncond=0.0, generator=rng(0))
    weighted, per, t2 = diffusion_loss(RecordingZero(), s, x0, z, "v", p_uncond=0.0, generator=rng(0),
                                       min_snr_gamma=5.0)
    assert torch.equal(t, t2) and torch.equal(per, per_plain)
    assert weighted.item() == pytest.approx((per * min_snr_weights(s, t, "v", 5.0)).mean().item(), rel=1e-6)
    assert weighted.item() < plain.item()  # every weight is below 1 for v


def test_loss_condition_dropout():
    s = NoiseSchedule("linear", T)
    model = RecordingZero()
    x0, z = torch.randn(64, 4, 8, 8), torch.randint(0, 32, (64,))
    diffusion_loss(model, s, x0, z, p_uncond=1.0)
    assert torch.all(model.seen[2] == -1)
    diffusion_loss(model, s, x0, z, p_uncond=0.5, generator=rng(0))
    dropped = model.seen[2] == -1
    assert 0 < dropped.sum() < 64 and torch.equal(model.seen[2][~dropped], z[~dropped])


def test_loss_trains_the_unet():
    """Gradients reach every parameter (after the first step moves the zero output layer) and are finite."""
    s = NoiseSchedule("cosine", T)
    model = tiny_unet(perturb=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, z = torch.randn(8, 4, 8, 8), torch.randint(0, 32, (8,))
    gen = rng(0)
    for _ in range(2):
        opt.zero_grad()
        loss, _, _ = diffusion_loss(model, s, x0, z, "v", generator=gen)
        loss.backward()
        opt.step()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert sum(p.grad.abs().sum().item() > 0 for p in model.parameters()) > 0.9 * len(list(model.parameters()))
