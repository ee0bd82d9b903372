"""Stage two: a DDPM in the latent space of the frozen autoencoder, conditioned on the slice z-index.

- `LatentUNet`: the denoiser. Time step and z-index are each embedded (sinusoidal code + MLP, see
  `module.ConditionEmbedding`) and summed into one vector that every ResBlock receives; z = -1 selects a
  learned "no condition" vector, which classifier-free guidance (Ho & Salimans 2022) trains and samples with.
- `NoiseSchedule`: the variance-preserving forward process q(x_t | x0) of Ho et al. 2020 with the linear
  or the cosine (Nichol & Dhariwal 2021) schedule, and the conversions between eps, x0 and v (Salimans &
  Ho 2022) predictions.
- `diffusion_loss`: the simple MSE objective on eps or v, with condition dropout, optionally min-SNR-gamma
  weighted (`min_snr_weights`).
- Samplers as plain functions of an `eps_fn(x_t, t, z)` callable (as in NVlabs/edm): `ddpm_sample`
  (ancestral, Ho et al.), `ddim_sample` (Song et al. 2021), `dpmpp_2m_sample` (DPM-Solver++(2M),
  Lu et al. 2022). `guided` builds the callable from a model with classifier-free guidance, `sample`
  chains the two. For a v-prediction model the callable also carries `eps_and_x0(x_t, t, z)`, which the
  samplers prefer: x0 = alpha x_t - sigma v directly, where going through eps would divide by alpha
  (~6.6e-3 at t = T-1 of the linear schedule) and amplify float32 rounding. Every sampler calls `callback(i, num_steps, x, x0_pred)` after step i with the new
  state and the x0 predicted at that step (e.g. for a GIF of decoded predictions).

Time steps are integer indices 0..T-1; index t stands for step t+1 of the papers, so betas[0] is beta_1
and "t = -1" below means the clean data (alpha_bar = 1). The latents are the autoencoder's times a scale
factor (1 / their std), hence of about unit variance; x0 predictions are clipped only when `clip_x0` is given
(stable_diffusion.py passes the training latents' range by default).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from module import ConditionEmbedding, Downsample, ResBlock, SelfAttention2d, Upsample, group_norm

SCHEDULES = ("linear", "cosine")
OBJECTIVES = ("eps", "v")
SAMPLERS = ("ddpm", "ddim", "dpmpp")


# ----------------------------------------------------------------------------------------------
# The denoiser


class _Stage(nn.Module):
    """One UNet stage: a conditioned ResBlock, optionally followed by self-attention."""

    def __init__(self, in_ch, out_ch, cond_dim, dropout, attention, heads):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, cond_dim=cond_dim, dropout=dropout)
        self.attn = SelfAttention2d(out_ch, heads=heads) if attention else None

    def forward(self, x, cond):
        h = self.res(x, cond)
        return self.attn(h) if self.attn is not None else h


class LatentUNet(nn.Module):
    """UNet denoiser of latents conditioned on the time step and the slice z-index (-1 = no condition).

    Down path: `num_res_blocks` stages per level of `channel_mult`, a stride-2 Downsample between levels;
    middle: ResBlock, attention, ResBlock; up path: `num_res_blocks + 1` stages per level, each taking the
    matching down-path activation concatenated to its input. Self-attention follows the stages whose
    feature map is one of `attn_resolutions` for an input of side `resolution`; other input sides work
    too (attention stays at the same levels) as long as they divide by 2^(levels - 1).
    """

    def __init__(self, in_channels, model_channels=128, channel_mult=(1, 2, 2), num_res_blocks=2,
                 attn_resolutions=(8,), resolution=16, dropout=0.0, num_z=32, conditional=True, heads=4,
                 context_channels=0):
        super().__init__()
        self.config = dict(in_channels=int(in_channels), model_channels=int(model_channels),
                           channel_mult=[int(m) for m in channel_mult], num_res_blocks=int(num_res_blocks),
                           attn_resolutions=[int(r) for r in attn_resolutions], resolution=int(resolution),
                           dropout=float(dropout), num_z=int(num_z), conditional=bool(conditional),
                           heads=int(heads), context_channels=int(context_channels))
        self.conditional = bool(conditional)
        self.context_channels = int(context_channels)
        self.num_z = int(num_z)
        self.levels = len(channel_mult)
        cond_dim = 4 * model_channels
        self.time_embed = ConditionEmbedding(cond_dim, base_dim=model_channels)
        self.z_embed = ConditionEmbedding(cond_dim, null_token=True) if conditional else None
        # Context channels (a neighbouring slice's latent, see `neighbour_context`) enter beside x_t.
        self.conv_in = nn.Conv2d(in_channels + self.context_channels, model_channels, 3, padding=1)

        def stage(cin, cout, res):
            return _Stage(cin, cout, cond_dim, dropout, res in attn_resolutions, heads)

        ch, res, skips = model_channels, resolution, [model_channels]
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, model_channels * mult, res))
                ch = model_channels * mult
                skips.append(ch)
            if level < self.levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([_Stage(ch, ch, cond_dim, dropout, True, heads),
                                  _Stage(ch, ch, cond_dim, dropout, False, heads)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(ch + skips.pop(), model_channels * mult, res))
                ch = model_channels * mult
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2
        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, in_channels, 3, padding=1)
        # A zero output layer makes the untrained net predict 0, the mean of the eps and v targets, so the
        # first loss is the target variance (about 1) instead of a large random error whose gradients
        # would shake every layer at once; the first step trains the output layer alone.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def condition(self, t, z):
        """The conditioning vector [B, 4 * model_channels]: time embedding plus z-index embedding."""
        cond = self.time_embed(t)
        if self.z_embed is not None:
            if z is None:
                z = torch.full_like(t, -1)
            cond = cond + self.z_embed(z)
        return cond

    def forward(self, x_t, t, z=None, context=None):
        """Predict eps or v (whatever it was trained on) for noisy latents x_t [B, C, H, W] at steps t [B];
        `context` [B, context_channels, H, W] where the net has context channels (None: zeros, no context)."""
        factor = 2 ** (self.levels - 1)
        if x_t.shape[-1] % factor or x_t.shape[-2] % factor:
            raise ValueError(f"latent size {tuple(x_t.shape[-2:])} must be divisible by {factor}")
        cond = self.condition(t, z)
        if self.context_channels:
            if context is None:
                context = x_t.new_zeros((x_t.shape[0], self.context_channels, *x_t.shape[2:]))
            x_t = torch.cat([x_t, context.to(x_t.dtype)], dim=1)
        elif context is not None:
            raise ValueError("this UNet was built without context channels")
        h = self.conv_in(x_t)
        skips = [h]
        for block in self.down:
            h = block(h, cond) if isinstance(block, _Stage) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, cond)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), cond) if isinstance(block, _Stage) else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Neighbour conditioning: slices that belong to one subject

NEIGHBOURS = ("none", "below", "either")  # what a UNet may see of the next slice: nothing, z-1, z-1 or z+1


def neighbour_context(neighbour, side):
    """The context channels of a neighbour-conditioned UNet: the neighbour's latent [B, C, h, w] (zeroed where
    side is 0) and one constant channel with side [B] = +1 (the neighbour is slice z-1), -1 (z+1) or 0 (none)."""
    s = side.to(device=neighbour.device, dtype=neighbour.dtype).view(-1, 1, 1, 1)
    return torch.cat([neighbour * (s != 0), s.expand(-1, 1, *neighbour.shape[-2:])], dim=1)


def pick_neighbours(below, above, mode, p_drop, generator=None):
    """Which neighbour each training slice sees: (side [B], index [B]) from the indices of the slices at z-1
    (`below`) and z+1 (`above`) of the same subject, -1 where there is none. 'below' takes z-1; 'either' takes
    one of the two at random (the only one at the ends of a stack); either is dropped (side 0) with
    probability p_drop, so the same net also draws a first slice, or independent slices, alone."""
    if mode not in NEIGHBOURS[1:]:
        raise ValueError(f"unknown neighbour mode {mode!r}, expected one of {NEIGHBOURS[1:]}")
    where = generator.device if generator is not None else below.device
    coin, drop = torch.rand(2, len(below), generator=generator, device=where).to(below.device)
    has_below, has_above = below >= 0, above >= 0
    take_above = has_above & (~has_below | (coin < 0.5)) if mode == "either" else torch.zeros_like(has_above)
    side = torch.where(take_above, -1, torch.where(has_below, 1, 0))
    side = torch.where(drop < p_drop, 0, side)
    index = torch.where(side > 0, below, torch.where(side < 0, above, 0)).clamp(min=0)
    return side, index


# ----------------------------------------------------------------------------------------------
# The forward process


class NoiseSchedule:
    """Variance-preserving forward process q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I), float64 tables.

    Index t = 0..T-1 is step t + 1 of Ho et al.; `alphas_cumprod_prev[0] = 1` is the clean data.
    """

    def __init__(self, kind="linear", timesteps=1000):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}, expected one of {SCHEDULES}")
        if int(timesteps) < 2:
            raise ValueError(f"need at least 2 time steps, got {timesteps}")
        self.kind, self.timesteps = kind, int(timesteps)
        self._tables = {}
        betas = linear_betas(self.timesteps) if kind == "linear" else cosine_betas(self.timesteps)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # log SNR = log(abar / (1 - abar)); DPM-Solver's lambda = log(alpha / sigma) is half of it.
        self.log_snr = torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)
        # Ho et al. eq. 7: q(x_{t-1} | x_t, x0) = N(c1 x0 + c2 x_t, beta_tilde_t I).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde at the first step is 0; its log is taken from the next step (as Ho et al.'s code does).
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        one_minus_abar = 1.0 - self.alphas_cumprod
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus_abar
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / one_minus_abar

    def _at(self, name, t, like):
        """Table `name` at steps t ([B] tensor or int), shaped [B, 1, ...] to broadcast over `like`, in its dtype."""
        # Tables are cast and moved once per device and dtype (casting on the CPU first: MPS has no
        # float64), so indexing during training needs no host-device copies.
        key = (name, like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = getattr(self, name).to(like.dtype).to(like.device)
        if not torch.is_tensor(t):
            t = torch.full((like.shape[0],), int(t), dtype=torch.long)
        return self._tables[key][t.to(like.device)].reshape(-1, *([1] * (like.dim() - 1)))

    def to(self, device):
        """Return self: the float64 tables stay on the CPU and `_at` moves each to a device on first use."""
        return self

    @property
    def config(self):
        """Plain keyword values that rebuild this schedule (saved next to a checkpoint)."""
        return {"kind": self.kind, "timesteps": self.timesteps}

    def alpha_bar(self, t):
        """abar at an integer step as a Python float; t = -1 is the clean data (1.0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def signal_noise(self, t, like):
        """(sqrt(abar_t), sqrt(1 - abar_t)) shaped to broadcast over `like`: x_t = a x0 + s eps."""
        return self._at("sqrt_alphas_cumprod", t, like), self._at("sqrt_one_minus_alphas_cumprod", t, like)

    def q_sample(self, x0, t, noise):
        """Draw x_t ~ q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a, s = self.signal_noise(t, x0)
        return a * x0 + s * noise

    def predict_x0_from_eps(self, x_t, t, eps):
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        a, s = self.signal_noise(t, x_t)
        return (x_t - s * eps) / a

    def predict_eps_from_x0(self, x_t, t, x0):
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        a, s = self.signal_noise(t, x_t)
        return (x_t - a * x0) / s

    def v_target(self, x0, noise, t):
        """Velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022)."""
        a, s = self.signal_noise(t, x0)
        return a * noise - s * x0

    def predict_x0_from_v(self, x_t, t, v):
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        a, s = self.signal_noise(t, x_t)
        return a * x_t - s * v

    def predict_eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
        a, s = self.signal_noise(t, x_t)
        return s * x_t + a * v

    def eps_and_x0(self, x_t, t, output, objective="eps"):
        """Both eps and x0 from a model output of the given objective ('eps' or 'v')."""
        if objective == "eps":
            return output, self.predict_x0_from_eps(x_t, t, output)
        if objective == "v":
            return self.predict_eps_from_v(x_t, t, output), self.predict_x0_from_v(x_t, t, output)
        raise ValueError(f"unknown objective {objective!r}, expected one of {OBJECTIVES}")

    def posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0) (Ho et al. eq. 6-7)."""
        mean = self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._at("posterior_variance", t, x_t), self._at("posterior_log_variance_clipped", t, x_t)


def linear_betas(timesteps, start=1e-4, end=0.02):
    """Ho et al.'s linear betas from 1e-4 to 0.02 (float64)."""
    return torch.linspace(start, end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal's betas from abar(t) = cos^2((t/T + s) / (1 + s) * pi/2), clipped at 0.999 (float64)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    abar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1.0 - abar[1:] / abar[:-1]).clamp(max=max_beta)


# ----------------------------------------------------------------------------------------------
# Training objective


def _randn(shape, generator, device, dtype=torch.float32):
    """Standard normal draws from `generator` (on its own device), moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)


def min_snr_weights(schedule, t, objective, gamma):
    """Min-SNR-gamma loss weights (Hang et al. 2023) at steps t [B]: min(SNR, gamma) / SNR for eps, / (SNR + 1)
    for v, i.e. the x0-MSE weight clipped at gamma, expressed for the network's own target. Low-noise steps,
    whose SNR is far above gamma, then stop dominating the gradient."""
    snr = torch.exp(schedule.log_snr.to(t.device)[t])
    clipped = snr.clamp(max=gamma)
    return (clipped / snr if objective == "eps" else clipped / (snr + 1)).float()


def diffusion_loss(model, schedule, x0, z, objective="eps", p_uncond=0.1, generator=None, context=None,
                   min_snr_gamma=0.0):
    """Simple DDPM loss: MSE to eps or v at uniform t; z set to -1 with prob. p_uncond; `context` goes to the
    model unchanged; `min_snr_gamma` > 0 weights the mean by `min_snr_weights` (the per-sample MSE returned stays
    unweighted, so validation losses compare across weightings). -> (mean, [B], t [B])."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}, expected one of {OBJECTIVES}")
    b, device = x0.shape[0], x0.device
    where = generator.device if generator is not None else device
    t = torch.randint(0, schedule.timesteps, (b,), generator=generator, device=where).to(device)
    noise = _randn(x0.shape, generator, device, x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    if z is not None and p_uncond > 0:
        drop = torch.rand(b, generator=generator, device=where).to(device) < p_uncond
        z = torch.where(drop, torch.full_like(z, -1), z)
    target = noise if objective == "eps" else schedule.v_target(x0, noise, t)
    output = model(x_t, t, z) if context is None else model(x_t, t, z, context=context)
    per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma > 0:
        return (per_sample * min_snr_weights(schedule, t, objective, min_snr_gamma)).mean(), per_sample, t
    return per_sample.mean(), per_sample, t


# ----------------------------------------------------------------------------------------------
# Sampling


def guided(model, guidance=1.0, objective="eps", schedule=None, context=None):
    """eps_fn(x_t, t, z) -> eps from `model` with classifier-free guidance eps_u + g (eps_c - eps_u).

    Guidance is applied to the raw output; for v-prediction that equals guidance on eps, because eps is
    the same affine function of v for both branches. `schedule` is needed only to turn v into eps; for v the
    returned function also has `eps_and_x0(x_t, t, z)` (x0 without dividing by alpha; see the module). With
    g == 1, an unconditional model, or every z = -1, the model runs once; otherwise once on a doubled batch.
    `context` (a neighbour's latent, see `neighbour_context`) goes to both branches: guidance is on z only.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}, expected one of {OBJECTIVES}")
    if objective == "v" and schedule is None:
        raise ValueError("v-prediction needs the noise schedule to convert v to eps")
    conditional = getattr(model, "conditional", True)

    def eps_fn(x_t, t, z):
        """Guided eps prediction at (x_t, t) for condition z."""
        out = _guided_output(model, conditional, guidance, x_t, t, z, context)
        return out if objective == "eps" else schedule.predict_eps_from_v(x_t, t, out)

    if objective == "v":
        def eps_and_x0(x_t, t, z):
            """(eps, x0) from v directly: x0 = alpha x_t - sigma v. Through eps and x0 = (x_t - sigma eps) / alpha
            instead, dividing by alpha = sqrt(abar) ~ 6.6e-3 at t = T-1 would amplify float32 rounding ~150x."""
            out = _guided_output(model, conditional, guidance, x_t, t, z, context)
            return schedule.eps_and_x0(x_t, t, out.float(), "v")

        eps_fn.eps_and_x0 = eps_and_x0  # `_predict` prefers it over eps_fn
    return eps_fn


class ContextGuided(nn.Module):
    """A UNet with classifier-free guidance on the last `channels` context channels (a tissue map): the output
    u + scale (c - u), c with the context as given, u with those channels zeroed (the map hidden, as in training).
    It composes with guidance on z: `guided` may hand it a doubled batch."""

    def __init__(self, model, scale, channels):
        super().__init__()
        self.model, self.scale, self.channels = model, float(scale), int(channels)
        self.conditional = getattr(model, "conditional", True)

    def forward(self, x_t, t, z=None, context=None):
        hidden = context.clone()
        hidden[:, -self.channels:] = 0
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), None if z is None else torch.cat([z, z]),
                          context=torch.cat([context, hidden]))
        cond, uncond = both.float().chunk(2)
        return uncond + self.scale * (cond - uncond)


def _guided_output(model, conditional, guidance, x_t, t, z, context=None):
    """The model's raw output (eps or v) with classifier-free guidance u + g (c - u) applied."""
    extra = {} if context is None else {"context": context}
    if guidance == 1.0 or z is None or not conditional or bool((z < 0).all()):
        return model(x_t, t, z, **extra)
    if context is not None:
        extra["context"] = torch.cat([context, context])
    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([z, torch.full_like(z, -1)]), **extra)
    cond, uncond = both.float().chunk(2)  # combine in float32 even under autocast
    return uncond + guidance * (cond - uncond)


def sampling_timesteps(schedule, steps, spacing="time"):
    """`steps` distinct integer steps from T-1 down to 0, evenly spaced in t ('time') or in log SNR ('logsnr')."""
    T, steps = schedule.timesteps, int(steps)
    if not 1 <= steps <= T:
        raise ValueError(f"number of sampling steps must be in 1..{T}, got {steps}")
    if spacing == "time":
        # Spacing >= 1 keeps the rounded steps strictly decreasing.
        return [int(t) for t in np.linspace(T - 1, 0, steps).round()]
    if spacing != "logsnr":
        raise ValueError(f"unknown time step spacing {spacing!r}, expected 'time' or 'logsnr'")
    log_snr = schedule.log_snr.numpy()
    # The grid starts no lower than log SNR -5 (abar ~ 0.007): below it the x0 prediction hardly changes
    # (the cosine schedule's last steps fall to -20), so steps spent there are wasted; the first step
    # then jumps from T-1 to that level. On Gaussian data with an exact denoiser this floor roughly
    # halves the 20-step error of no floor for both schedules.
    targets = np.linspace(max(log_snr[-1], -5.0), log_snr[0], steps)
    ts = [int(np.abs(log_snr - v).argmin()) for v in targets]
    ts[0] = T - 1  # always start from pure noise
    # Near t = 0 one index spans a wide log-SNR range, so several targets can share a step: push
    # duplicates down, then back up from 0, to keep `steps` distinct decreasing steps.
    for i in range(1, steps):
        ts[i] = min(ts[i], ts[i - 1] - 1)
    ts[-1] = max(ts[-1], 0)
    for i in range(steps - 2, -1, -1):
        ts[i] = max(ts[i], ts[i + 1] + 1)
    return ts


def _start(shape, z, generator, x_init, device):
    """Initial noise x_T (or a copy of x_init) and the device the sampler runs on."""
    device = torch.device(device) if device is not None else (z.device if torch.is_tensor(z) else torch.device("cpu"))
    if x_init is not None:
        return x_init.to(device=device, dtype=torch.float32).clone(), device
    return _randn(tuple(shape), generator, device), device


def _predict(eps_fn, schedule, x, t, z, clip_x0):
    """eps and x0 predictions at integer step t; x0 optionally clamped to +-clip_x0 (eps made to match)."""
    tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
    if hasattr(eps_fn, "eps_and_x0"):  # `guided` on a v model: x0 in the model's own parameterisation
        eps, x0 = eps_fn.eps_and_x0(x, tt, z)
    else:
        eps = eps_fn(x, tt, z).float()
        x0 = schedule.predict_x0_from_eps(x, tt, eps)
    if clip_x0 is not None:
        x0 = x0.clamp(-clip_x0, clip_x0)
        eps = schedule.predict_eps_from_x0(x, tt, x0)
    return eps, x0, tt


def respaced_posterior(schedule, t, t_prev):
    """(c1, c2, variance) of q(x_{t_prev} | x_t, x0) = N(c1 x0 + c2 x_t, variance) for any t_prev < t.

    The steps ts of a respaced sampler form a shorter chain of their own whose betas are
    1 - abar_t / abar_t_prev (Nichol & Dhariwal's respacing); Ho et al.'s eq. 7 then holds with those betas.
    At t_prev = t - 1 these are the schedule's own posterior tables, t_prev = -1 is the clean data.
    """
    abar, abar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    beta = 1.0 - abar / abar_prev
    c1 = beta * math.sqrt(abar_prev) / (1.0 - abar)
    c2 = (1.0 - abar_prev) * math.sqrt(1.0 - beta) / (1.0 - abar)
    return c1, c2, beta * (1.0 - abar_prev) / (1.0 - abar)


@torch.no_grad()
def ddpm_sample(eps_fn, schedule, shape, z, steps=None, generator=None, callback=None, clip_x0=None, x_init=None,
                device=None, spacing="time"):
    """Ancestral sampling (Ho et al.): x_{t_prev} ~ N(posterior mean given predicted x0, beta_tilde), over all T
    steps or over `steps` respaced ones (see `respaced_posterior`)."""
    x, device = _start(shape, z, generator, x_init, device)
    ts = sampling_timesteps(schedule, steps or schedule.timesteps, spacing)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        _, x0, _ = _predict(eps_fn, schedule, x, t, z, clip_x0)
        c1, c2, variance = respaced_posterior(schedule, t, t_prev)
        # The last step returns the mean: its posterior variance is 0.
        x = c1 * x0 + c2 * x
        if t_prev >= 0:
            x = x + math.sqrt(variance) * _randn(x.shape, generator, device)
        if callback is not None:
            callback(i, len(ts), x, x0)
    return x


def ddim_sigma(schedule, t, t_prev, eta):
    """DDIM noise scale from step t to t_prev (Song et al. eq. 16); eta = 1, t_prev = t - 1 is DDPM's beta_tilde."""
    abar, abar_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    return eta * math.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))


def ddim_step(schedule, eps, x0, t, t_prev, eta=0.0, noise=None):
    """x_{t_prev} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise (Song et al. eq. 12)."""
    abar_prev = schedule.alpha_bar(t_prev)
    sigma = ddim_sigma(schedule, t, t_prev, eta)
    x = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
    return x + sigma * noise if noise is not None and sigma > 0 else x


@torch.no_grad()
def ddim_sample(eps_fn, schedule, shape, z, steps=50, eta=0.0, generator=None, callback=None, clip_x0=None,
                x_init=None, device=None, spacing="time"):
    """DDIM (Song et al. 2021) on `steps` evenly spaced steps; eta = 0 is deterministic given x_T."""
    x, device = _start(shape, z, generator, x_init, device)
    ts = sampling_timesteps(schedule, steps, spacing)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps, x0, _ = _predict(eps_fn, schedule, x, t, z, clip_x0)
        noise = _randn(x.shape, generator, device) if eta > 0 and t_prev >= 0 else None
        x = ddim_step(schedule, eps, x0, t, t_prev, eta, noise)
        if callback is not None:
            callback(i, len(ts), x, x0)
    return x


@torch.no_grad()
def dpmpp_2m_sample(eps_fn, schedule, shape, z, steps=20, generator=None, callback=None, clip_x0=None,
                    x_init=None, device=None, spacing="logsnr"):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep second order on the x0 prediction in lambda time.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda = log(alpha / sigma) and h the lambda
    increment, each step is x_s = (sigma_s / sigma_t) x_t - alpha_s (exp(-h) - 1) D, where D is the x0
    prediction (first step) or its linear extrapolation from the last two predictions. The final step goes
    to the clean data (lambda = inf), where the update reduces to D; it stays first order there because the
    step ratio r = h_prev / h vanishes. Steps are evenly spaced in log SNR by default (Lu et al.'s choice
    for low resolutions): evenly spaced t puts one long lambda step at the end of the linear schedule,
    where the extrapolated D overshoots (on Gaussian data with an exact denoiser, 20 steps give a 12% too
    wide spread with 'time' spacing, under 1% with 'logsnr').
    """
    x, _ = _start(shape, z, generator, x_init, device)
    ts = sampling_timesteps(schedule, steps, spacing)
    x0_prev = h_prev = None
    for i, t in enumerate(ts):
        _, x0, _ = _predict(eps_fn, schedule, x, t, z, clip_x0)
        if i + 1 == len(ts):
            x = x0
        else:
            s = ts[i + 1]
            h = 0.5 * float(schedule.log_snr[s] - schedule.log_snr[t])
            if x0_prev is None:
                d = x0
            else:
                r = h_prev / h
                d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            ratio = math.sqrt((1.0 - schedule.alpha_bar(s)) / (1.0 - schedule.alpha_bar(t)))
            x = ratio * x - math.sqrt(schedule.alpha_bar(s)) * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
        if callback is not None:
            callback(i, len(ts), x, x0)
    return x


def _as_z(z, batch, device):
    """z as a long tensor [batch] on `device` (an int is repeated; None stays None)."""
    if z is None:
        return None
    if not torch.is_tensor(z):
        z = torch.full((batch,), int(z), dtype=torch.long)
    if z.shape != (batch,):
        raise ValueError(f"z must have shape ({batch},), got {tuple(z.shape)}")
    return z.to(device=device, dtype=torch.long)


def sample(model, schedule, shape, z, sampler="ddpm", steps=None, eta=0.0, guidance=1.0, objective="eps",
           generator=None, callback=None, clip_x0=None, x_init=None, spacing=None, context=None):
    """Draw latents of `shape` from `model` with one of 'ddpm', 'ddim', 'dpmpp' (model in eval mode meanwhile);
    `context`: the model's context channels for every step (see `neighbour_context`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}, expected one of {SAMPLERS}")
    device = next(model.parameters()).device
    z = _as_z(z, shape[0], device)
    eps_fn = guided(model, guidance, objective, schedule, context)
    common = dict(generator=generator, callback=callback, clip_x0=clip_x0, x_init=x_init, device=device)
    if spacing is not None:
        common["spacing"] = spacing
    was_training = model.training
    model.eval()
    try:
        if sampler == "ddpm":
            return ddpm_sample(eps_fn, schedule, shape, z, steps=steps, **common)
        if sampler == "ddim":
            return ddim_sample(eps_fn, schedule, shape, z, steps=steps or 50, eta=eta, **common)
        return dpmpp_2m_sample(eps_fn, schedule, shape, z, steps=steps or 20, **common)
    finally:
        model.train(was_training)
