"""Stage-one autoencoders: a KL-regularised VAE and a VQ-VAE, both LDM/VQGAN style and optionally
conditioned on the slice z-index.

- `Encoder` / `Decoder`: conv_in, per resolution level `num_res_blocks` ResBlocks (the decoder one more
  unless `decoder_extra_block=False`, which matches MONAI's AutoencoderKL, and `decoder_top_blocks` more at
  full resolution) (plus self-attention
  at `attn_resolutions`), stride-2 Downsample / nearest Upsample between levels, a mid block
  ResBlock-Attention-ResBlock and GroupNorm-SiLU-conv_out. Every ResBlock receives the z-index vector.
- `DiagonalGaussian`: the VAE posterior (clamped log-variance, reparameterised sampling, closed-form KL).
- `VectorQuantizer`: nearest-code lookup with straight-through gradients, codebook/commitment losses,
  optional EMA codebook updates and dead-code restarts (all-reduced under torch.distributed).
- `VAE`, `VQVAE`, and `build_autoencoder(model_type, config)`.

Constructor arguments are plain values; `model.config` returns them so that a checkpoint can rebuild
the model with `build_autoencoder(model.kind, model.config)`.
"""
import inspect
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from module import ConditionEmbedding, Downsample, ResBlock, SelfAttention2d, Upsample, all_reduce_sum, group_norm


# ----------------------------------------------------------------------------------------------
# Encoder / decoder


def _validate_common(resolution, ch, ch_mult, num_res_blocks, z_channels, in_channels):
    """Raise ValueError for a configuration that cannot build a working encoder/decoder."""
    if not ch_mult:
        raise ValueError("ch_mult must list at least one channel multiplier")
    factor = 2 ** (len(ch_mult) - 1)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by the downsampling factor {factor} "
                         f"implied by ch_mult={list(ch_mult)}")
    for name, value in (("ch", ch), ("num_res_blocks", num_res_blocks), ("z_channels", z_channels),
                        ("in_channels", in_channels), ("resolution", resolution)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _run_blocks(blocks, h, cond):
    """Apply ResBlocks and attention layers in order; both accept the conditioning vector."""
    for block in blocks:
        h = block(h, cond)
    return h


def _mid_block(channels, cond_dim, dropout):
    """ResBlock - self-attention - ResBlock at the lowest resolution."""
    return nn.ModuleList([ResBlock(channels, channels, cond_dim, dropout), SelfAttention2d(channels),
                          ResBlock(channels, channels, cond_dim, dropout)])


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> feature map [B, out_channels, H/f, W/f], f = 2**(len(ch_mult)-1)."""

    def __init__(self, resolution, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, out_channels,
                 dropout=0.0, cond_dim=0):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        width, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width, ch * mult, cond_dim, dropout))
                width = ch * mult
                if res in attn_resolutions:
                    blocks.append(SelfAttention2d(width))
            self.levels.append(blocks)
            is_last = level == len(ch_mult) - 1
            self.downsamples.append(nn.Identity() if is_last else Downsample(width))
            res = res if is_last else res // 2
        self.mid = _mid_block(width, cond_dim, dropout)
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x, cond=None):
        h = self.conv_in(x)
        for blocks, down in zip(self.levels, self.downsamples):
            h = down(_run_blocks(blocks, h, cond))
        h = _run_blocks(self.mid, h, cond)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, in_channels, h, w] -> image [B, out_channels, h*f, w*f]; mirrors `Encoder`."""

    def __init__(self, resolution, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, out_channels,
                 dropout=0.0, cond_dim=0, extra_block=True, top_blocks=0):
        super().__init__()
        if int(top_blocks) < 0:
            raise ValueError(f"decoder_top_blocks must be >= 0, got {top_blocks}")
        width = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.mid = _mid_block(width, cond_dim, dropout)
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            blocks = nn.ModuleList()
            # by default one block more than the encoder, as in LDM: the decoder does the harder job
            # top_blocks more at full resolution, where the finest texture is drawn
            for _ in range(num_res_blocks + int(extra_block) + (int(top_blocks) if level == 0 else 0)):
                blocks.append(ResBlock(width, ch * ch_mult[level], cond_dim, dropout))
                width = ch * ch_mult[level]
                if res in attn_resolutions:
                    blocks.append(SelfAttention2d(width))
            self.levels.append(blocks)
            self.upsamples.append(nn.Identity() if level == 0 else Upsample(width))
            res = res if level == 0 else res * 2
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    @property
    def last_layer(self):
        """Weight of the final convolution (where VQGAN's adaptive GAN weight compares gradients)."""
        return self.conv_out.weight

    def forward(self, latent, cond=None):
        h = _run_blocks(self.mid, self.conv_in(latent), cond)
        if h.device.type == "cpu" and h.shape[1] >= 128:
            # oneDNN's 3x3 convolutions at >= 128 channels run faster channels-last, at 16-64 channels
            # (the demo model) slower; both measured (README, Performance)
            h = h.contiguous(memory_format=torch.channels_last)
        for blocks, up in zip(self.levels, self.upsamples):
            h = up(_run_blocks(blocks, h, cond))
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Shared autoencoder plumbing (config, conditioning)


class _Autoencoder(nn.Module):
    """Config bookkeeping and z-index conditioning shared by `VAE` and `VQVAE`."""

    kind = None

    def _init_common(self, resolution, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
                     dropout, conditional, num_z):
        _validate_common(resolution, ch, ch_mult, num_res_blocks, z_channels, in_channels)
        self.resolution = int(resolution)
        self.in_channels = int(in_channels)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.conditional = bool(conditional)
        self.num_z = int(num_z)
        self.cond_dim = 4 * ch if self.conditional else 0
        # one embedding for encoder and decoder: both see the same notion of "slice position"
        self.z_embed = ConditionEmbedding(self.cond_dim, null_token=True) if self.conditional else None
        self.arch = dict(resolution=self.resolution, in_channels=self.in_channels, ch=ch, ch_mult=list(ch_mult),
                         num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions), dropout=dropout,
                         cond_dim=self.cond_dim)

    @property
    def config(self):
        """Constructor keyword arguments (JSON-serialisable) that rebuild this model."""
        return dict(self._config)

    @property
    def latent_shape(self):
        """(channels, height, width) of the latent at the configured resolution."""
        side = self.resolution // self.downsample_factor
        return (self.latent_channels, side, side)

    @property
    def last_layer(self):
        """Decoder's final convolution weight (for the adaptive GAN weight)."""
        return self.decoder.last_layer

    def condition(self, z, batch, device):
        """Conditioning vector [B, cond_dim] for z-indices `z` (None/int/tensor; -1 = unknown), or None."""
        if not self.conditional:
            return None
        if z is None:
            z = -1
        if not torch.is_tensor(z):
            z = torch.full((batch,), int(z), dtype=torch.long, device=device)
        z = z.to(device=device, dtype=torch.long).reshape(-1)
        if z.shape[0] == 1 and batch > 1:
            z = z.expand(batch)
        if z.shape[0] != batch:
            raise ValueError(f"z has {z.shape[0]} entries for a batch of {batch}")
        return self.z_embed(z)

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % self.downsample_factor or x.shape[-1] % self.downsample_factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor "
                             f"{self.downsample_factor}")


# ----------------------------------------------------------------------------------------------
# KL-regularised VAE


class DiagonalGaussian:
    """Diagonal Gaussian posterior q(latent | x) from a [B, 2C, h, w] tensor of means and log-variances."""

    def __init__(self, moments, logvar_min=-30.0, logvar_max=20.0):
        # fp32 even under bf16 autocast: the KL sums thousands of terms per sample
        self.mean, logvar = moments.float().chunk(2, dim=1)
        # clamping keeps exp(logvar) finite early in training, when the encoder output is arbitrary
        self.logvar = logvar.clamp(logvar_min, logvar_max)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        """Reparameterised sample mean + std * eps, so gradients reach mean and logvar."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                          device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self):
        """The posterior mean (its most likely latent)."""
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample, summed over all latent elements: [B]."""
        return 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar).flatten(1).sum(dim=1)


class VAE(_Autoencoder):
    """KL-regularised autoencoder (LDM's AutoencoderKL) with optional z-index conditioning."""

    kind = "vae"

    def __init__(self, resolution, in_channels=1, ch=64, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(),
                 z_channels=4, dropout=0.0, conditional=False, num_z=32, logvar_min=-30.0, logvar_max=20.0,
                 decoder_extra_block=True, decoder_top_blocks=0):
        super().__init__()
        self._config = dict(resolution=resolution, in_channels=in_channels, ch=ch, ch_mult=list(ch_mult),
                            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                            z_channels=z_channels, dropout=dropout, conditional=bool(conditional), num_z=num_z,
                            logvar_min=logvar_min, logvar_max=logvar_max,
                            decoder_extra_block=bool(decoder_extra_block),
                            decoder_top_blocks=int(decoder_top_blocks))
        if logvar_min >= logvar_max:
            raise ValueError(f"logvar_min {logvar_min} must be < logvar_max {logvar_max}")
        self._init_common(resolution, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
                          dropout, conditional, num_z)
        self.latent_channels = int(z_channels)
        self.logvar_min, self.logvar_max = float(logvar_min), float(logvar_max)
        self.encoder = Encoder(**self.arch, out_channels=2 * z_channels)
        self.decoder = Decoder(**{**self.arch, "in_channels": z_channels}, out_channels=in_channels,
                               extra_block=decoder_extra_block, top_blocks=decoder_top_blocks)

    def encode(self, x, z=None):
        """Posterior `DiagonalGaussian` over the latent for images `x` with z-indices `z`."""
        self._check_input(x)
        cond = self.condition(z, x.shape[0], x.device)
        return DiagonalGaussian(self.encoder(x, cond), self.logvar_min, self.logvar_max)

    def decode(self, latent, z=None):
        """Images from latents [B, z_channels, h, w]."""
        return self.decoder(latent, self.condition(z, latent.shape[0], latent.device))

    def forward(self, x, z=None, sample_posterior=True):
        """Reconstruct `x`: dict(recon, kl [B], latent, stats)."""
        posterior = self.encode(x, z)
        latent = posterior.sample() if sample_posterior else posterior.mode()
        return dict(recon=self.decode(latent, z), kl=posterior.kl(), latent=latent, stats={})

    def sample(self, n, z=None, generator=None):
        """Decode `n` latents drawn from the prior N(0, I) (only meaningful for a well-regularised VAE)."""
        device = next(self.parameters()).device
        latent = torch.randn((n, *self.latent_shape), generator=generator,
                             device=generator.device if generator is not None else device)
        return self.decode(latent.to(device), z)

    def encode_latent(self, x, z=None):
        """The latent that stage two models: the posterior mean."""
        return self.encode(x, z).mode()

    def reconstruct(self, x, z=None):
        """Deterministic reconstruction: the decoded posterior mean."""
        return self.decode(self.encode(x, z).mode(), z)


# ----------------------------------------------------------------------------------------------
# Vector quantisation


def _broadcast_from_first(tensor):
    """Give every process rank 0's copy (random restarts must pick the same encoder outputs everywhere)."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def code_statistics(counts):
    """Perplexity exp(H(p)) and used fraction of a code-count histogram [K]."""
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum()
    return dict(perplexity=entropy.exp(), usage=(counts > 0).float().mean())


def rotate_onto(e, q, eps=1e-6):
    """The rotation trick (Fifty et al. 2024): the value of `q`, as a function of `e` (rows [N, D]) whose gradient
    is the incoming one turned by the rotation that takes e's direction onto q's and scaled by |q| / |e|.

    The straight-through estimator copies the decoder's gradient to the encoder output unchanged, so every point
    of a code's cell gets the same push; turned with the cell's own rotation, the push depends on where in the
    cell the point lies (the angle and norm to its code), which the paper found to sharpen reconstructions and
    use more of the codebook. R = I - 2 r r^T + 2 q^ e^T with r = (e^ + q^) / |e^ + q^|, applied without forming
    it; R, the scale and the returned value carry no gradient. A row with |e| < eps (no direction to turn, and a
    scale that would blow its gradient up) passes the gradient straight through; q = 0 gets none (scale 0).
    """
    with torch.no_grad():
        e_norm = e.norm(dim=1, keepdim=True)
        directionless = e_norm < eps
        e_norm = e_norm.clamp_min(eps)
        q_norm = q.norm(dim=1, keepdim=True)
        e_hat, q_hat = e / e_norm, q / q_norm.clamp_min(eps)
        r = e_hat + q_hat
        r = r / r.norm(dim=1, keepdim=True).clamp_min(eps)  # e^ = -q^ leaves r = 0, and R e^ = e^ + 2 q^ = q^ still
        scale = q_norm / e_norm
    turned = scale * (e - 2 * r * (r * e).sum(1, keepdim=True) + 2 * q_hat * (e_hat * e).sum(1, keepdim=True))
    turned = torch.where(directionless, e, turned)
    return q.detach() + (turned - turned.detach())  # exactly q's value; the gradient is turned's


QUANTIZER_GRADIENTS = ("ste", "rotation")


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser (van den Oord et al. 2017) with optional EMA codebook and restarts.

    Losses are means over all elements: codebook = ||sg[z_e] - e||^2 (zero with `ema=True`, where the
    codebook follows moving averages instead of gradients), commit = ||z_e - sg[e]||^2.
    """

    def __init__(self, n_embed, embed_dim, beta=0.25, ema=False, ema_decay=0.99, restart_dead=True,
                 dead_threshold=0.1, laplace_eps=1e-5, grad="ste"):
        super().__init__()
        if n_embed < 2 or embed_dim < 1:
            raise ValueError(f"need n_embed >= 2 and embed_dim >= 1, got {n_embed}, {embed_dim}")
        if grad not in QUANTIZER_GRADIENTS:
            raise ValueError(f"grad must be one of {QUANTIZER_GRADIENTS}, got {grad!r}")
        self.grad = grad
        if not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.n_embed, self.embed_dim = int(n_embed), int(embed_dim)
        self.beta, self.ema, self.decay = float(beta), bool(ema), float(ema_decay)
        self.restart_dead, self.dead_threshold, self.laplace_eps = bool(restart_dead), float(dead_threshold), laplace_eps
        init = torch.empty(n_embed, embed_dim).uniform_(-1.0 / n_embed, 1.0 / n_embed)
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", torch.zeros(n_embed, embed_dim))
        else:
            self.codebook = nn.Parameter(init)
        # EMA of per-batch assignment counts: drives the EMA codebook and the dead-code test. Starting
        # at zero makes the first training batch a k-means step (sums and counts share the (1 - decay)
        # factor, so their ratio is the batch mean) and, with restart_dead, re-seeds every code that
        # batch barely used from encoder outputs: a data-dependent init instead of the tiny uniform one.
        self.register_buffer("cluster_size", torch.zeros(n_embed))

    def nearest(self, flat):
        """Index of the closest code (squared Euclidean distance) for each row of `flat` [N, D]."""
        codebook = self.codebook.detach().float()
        dist2 = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
        return dist2.argmin(dim=1)

    def lookup(self, indices):
        """Code vectors for integer indices [...] -> [..., D]."""
        return F.embedding(indices, self.codebook)

    def forward(self, z_e):
        """Quantise [B, D, h, w]: (quantized (straight-through), indices [B, h, w], losses, stats)."""
        b, d, h, w = z_e.shape
        if d != self.embed_dim:
            raise ValueError(f"quantizer expects {self.embed_dim} channels, got {d}")
        # distances and code statistics in fp32 even under autocast: bf16 would mis-assign near ties
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z_e = z_e.float()
            flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
            with torch.no_grad():
                indices = self.nearest(flat)
            quant = self.lookup(indices).view(b, h, w, d).permute(0, 3, 1, 2)
            commit = F.mse_loss(z_e, quant.detach())
            codebook_loss = torch.zeros((), device=z_e.device) if self.ema else F.mse_loss(quant, z_e.detach())
            counts = torch.bincount(indices, minlength=self.n_embed).float()
            stats = {k: v.detach() for k, v in code_statistics(counts).items()}
            if self.training:
                self._update(flat.detach(), indices, counts)
            if self.grad == "rotation":
                quantized = rotate_onto(flat, quant.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w, d)
                quantized = quantized.permute(0, 3, 1, 2)
            else:  # straight-through: decoder gradients reach the encoder as they are
                quantized = z_e + (quant - z_e).detach()
        return quantized, indices.view(b, h, w), dict(codebook=codebook_loss, commit=commit), stats

    @torch.no_grad()
    def _update(self, flat, indices, counts):
        """Training-mode bookkeeping: usage EMA, EMA codebook (if enabled) and dead-code restarts."""
        sums = torch.zeros(self.n_embed, self.embed_dim, device=flat.device).index_add_(0, indices, flat)
        # one collective for both statistics; summed over processes so every replica updates identically
        totals = all_reduce_sum(torch.cat([counts[:, None], sums], dim=1))
        counts, sums = totals[:, 0], totals[:, 1:]
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            self.codebook.copy_(self.embed_sum / self._smoothed_sizes()[:, None])
        if self.restart_dead:
            self._restart_dead_codes(flat)

    def _smoothed_sizes(self):
        """Laplace-smoothed cluster sizes (no division by ~0 for unused codes), same total as the raw ones."""
        n = self.cluster_size.sum()
        return (self.cluster_size + self.laplace_eps) / (n + self.n_embed * self.laplace_eps) * n

    def _restart_dead_codes(self, flat):
        """Replace codes whose usage EMA fell below `dead_threshold` with random encoder outputs of this batch."""
        # a candidate for every code (not only dead ones): fixed RNG use and no host sync on the dead count
        candidates = flat[torch.randint(flat.shape[0], (self.n_embed,), device=flat.device)]
        candidates = _broadcast_from_first(candidates.contiguous())
        dead = self.cluster_size < self.dead_threshold
        codebook = self.codebook.data if isinstance(self.codebook, nn.Parameter) else self.codebook
        codebook.copy_(torch.where(dead[:, None], candidates.to(codebook.dtype), codebook))
        # a restarted code gets one pseudo-observation, i.e. a grace period before it can be declared dead again
        self.cluster_size.copy_(torch.where(dead, torch.ones_like(self.cluster_size), self.cluster_size))
        if self.ema:
            self.embed_sum.copy_(torch.where(dead[:, None], candidates, self.embed_sum))


class FiniteScalarQuantizer(nn.Module):
    """Finite scalar quantisation (Mentzer et al. 2024): each of the D = len(levels) channels is bounded and
    rounded to one of its L_i levels, so the codebook is the fixed grid of prod(L_i) points: nothing learnt, no
    codebook or commitment loss, no restarts (how much of the grid is used still depends on the encoder). A code's
    index spells its digits in mixed radix (channel 0 the most significant). Every channel needs at least 3
    levels: with 2, the even-level shift atanh(1/2 / h) is about 3.8, so z = 0 sits deep inside one level and the
    channel barely moves (the paper's level sets start at 5).

    Channel i is squashed as tanh(x + shift) * (1 + eps) (L_i - 1) / 2 - offset (offset 1/2 and the
    matching shift for even L_i, which puts the levels on the integers -L_i/2 .. L_i/2 - 1, as in the authors'
    code), rounded with a straight-through gradient, then divided by L_i // 2 so that every code lies in [-1, 1].
    The same interface as VectorQuantizer: `codebook` [K, D], `nearest`, `lookup`, forward.
    """

    def __init__(self, levels, eps=1e-3):
        super().__init__()
        levels = [int(v) for v in levels]
        if not levels or min(levels) < 3:
            raise ValueError(f"FSQ levels must be a list of whole numbers >= 3, got {levels}")
        self.levels = levels
        self.n_embed, self.embed_dim = math.prod(levels), len(levels)
        lv = torch.tensor(levels, dtype=torch.float32)
        # (1 + eps): the outermost levels lie inside tanh's range, as in the authors' code
        self.register_buffer("_half_levels", (lv - 1) * (1 + eps) / 2, persistent=False)
        self.register_buffer("_offsets", (lv % 2 == 0).float() / 2, persistent=False)
        self.register_buffer("_half_width", (lv // 2), persistent=False)
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)
        radix = torch.cumprod(torch.tensor([1] + levels[:0:-1]), 0).flip(0)  # [prod(L[1:]), ..., L[-1], 1]
        self.register_buffer("_radix", radix, persistent=False)
        self.register_buffer("codebook", self.lookup(torch.arange(self.n_embed)), persistent=False)

    def bound(self, x):
        """Channels last [..., D] squashed into each level range, before rounding."""
        shift = torch.atanh(self._offsets / self._half_levels)
        return torch.tanh(x + shift) * self._half_levels - self._offsets

    def digits(self, values):
        """Grid values [..., D] (in [-1, 1]) -> per-channel digits 0 .. L_i - 1, rounding to the nearest level."""
        steps = torch.round(values * self._half_width) + self._half_width
        return steps.clamp(min=0).minimum(self._levels - 1).long()

    def nearest(self, flat):
        """Index of the closest grid point for each row of `flat` [N, D] (per channel: the grid is a product)."""
        return (self.digits(flat.float()) * self._radix).sum(-1)

    def lookup(self, indices):
        """Grid points for integer indices [...] -> [..., D]."""
        digits = (indices[..., None] // self._radix) % self._levels
        return (digits - self._half_width).float() / self._half_width

    def forward(self, z_e):
        """Quantise [B, D, h, w]: (quantized (straight-through), indices [B, h, w], zero losses, stats)."""
        b, d, h, w = z_e.shape
        if d != self.embed_dim:
            raise ValueError(f"quantizer expects {self.embed_dim} channels, got {d}")
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            bounded = self.bound(z_e.float().permute(0, 2, 3, 1))
            rounded = bounded + (torch.round(bounded) - bounded).detach()
            quant = rounded / self._half_width
            indices = self.nearest(quant.detach())
            counts = torch.bincount(indices.reshape(-1), minlength=self.n_embed).float()
            stats = {k: v.detach() for k, v in code_statistics(counts).items()}
            zero = torch.zeros((), device=z_e.device)
        return quant.permute(0, 3, 1, 2), indices, dict(codebook=zero, commit=zero), stats


QUANTIZERS = ("vq", "fsq")


class VQVAE(_Autoencoder):
    """VQ-VAE / VQGAN generator: encoder -> 1x1 conv -> vector quantiser -> 1x1 conv -> decoder."""

    kind = "vqvae"

    def __init__(self, resolution, in_channels=1, ch=64, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(),
                 z_channels=4, dropout=0.0, conditional=False, num_z=32, n_embed=512, embed_dim=4, beta=0.25,
                 ema=False, ema_decay=0.99, restart_dead=True, dead_threshold=0.1, decoder_extra_block=True,
                 grad="ste", decoder_top_blocks=0, quantizer="vq", fsq_levels=(8, 5, 5, 5)):
        super().__init__()
        self._config = dict(resolution=resolution, in_channels=in_channels, ch=ch, ch_mult=list(ch_mult),
                            num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
                            z_channels=z_channels, dropout=dropout, conditional=bool(conditional), num_z=num_z,
                            n_embed=n_embed, embed_dim=embed_dim, beta=beta, ema=bool(ema), ema_decay=ema_decay,
                            restart_dead=bool(restart_dead), dead_threshold=dead_threshold,
                            decoder_extra_block=bool(decoder_extra_block), grad=grad,
                            decoder_top_blocks=int(decoder_top_blocks), quantizer=quantizer,
                            fsq_levels=list(fsq_levels))
        if quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        if quantizer == "fsq" and (n_embed, embed_dim) != (math.prod(fsq_levels), len(fsq_levels)):
            raise ValueError(f"an FSQ code has len(fsq_levels) = {len(fsq_levels)} channels and prod(fsq_levels) "
                             f"= {math.prod(fsq_levels)} values, not embed_dim {embed_dim} and n_embed {n_embed}")
        self._init_common(resolution, in_channels, ch, ch_mult, num_res_blocks, attn_resolutions, z_channels,
                          dropout, conditional, num_z)
        self.latent_channels = int(embed_dim)
        self.n_embed = int(n_embed)
        self.beta = float(beta)
        self.encoder = Encoder(**self.arch, out_channels=z_channels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, 1)
        if quantizer == "fsq":
            self.quantizer = FiniteScalarQuantizer(fsq_levels)
        else:
            self.quantizer = VectorQuantizer(n_embed, embed_dim, beta, ema, ema_decay, restart_dead, dead_threshold,
                                             grad=grad)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.decoder = Decoder(**{**self.arch, "in_channels": z_channels}, out_channels=in_channels,
                               extra_block=decoder_extra_block, top_blocks=decoder_top_blocks)

    def encode_pre_quant(self, x, z=None):
        """Continuous encoder output projected to the code dimension, [B, embed_dim, h, w]."""
        self._check_input(x)
        return self.quant_conv(self.encoder(x, self.condition(z, x.shape[0], x.device)))

    def encode(self, x, z=None):
        """(quantized [B, embed_dim, h, w], indices [B, h, w], losses dict, stats dict)."""
        return self.quantizer(self.encode_pre_quant(x, z))

    def decode(self, quantized, z=None):
        """Images from quantized latents [B, embed_dim, h, w]."""
        cond = self.condition(z, quantized.shape[0], quantized.device)
        return self.decoder(self.post_quant_conv(quantized), cond)

    def decode_indices(self, indices, z=None):
        """Images from code indices [B, h, w] (what the PixelCNN samples)."""
        return self.decode(self.quantizer.lookup(indices).permute(0, 3, 1, 2), z)

    def forward(self, x, z=None):
        """Reconstruct `x`: dict(recon, vq_loss = codebook + beta * commit, losses, indices, stats)."""
        quantized, indices, losses, stats = self.encode(x, z)
        vq_loss = losses["codebook"] + self.beta * losses["commit"]
        return dict(recon=self.decode(quantized, z), vq_loss=vq_loss, losses=losses, indices=indices, stats=stats)

    def encode_latent(self, x, z=None):
        """The latent that a stage-two diffusion model sees: the chosen code vectors [B, embed_dim, h, w]."""
        # the exact code vectors, not z_e + (e - z_e) whose rounding differs from e in the last bits
        return self.quantizer.lookup(self.encode_indices(x, z)).permute(0, 3, 1, 2)

    def encode_indices(self, x, z=None):
        """Code indices [B, h, w] (the PixelCNN's data)."""
        return self.encode(x, z)[1]

    def reconstruct(self, x, z=None):
        """Deterministic reconstruction: the decoded nearest codes."""
        return self(x, z)["recon"]

    def quantize_latent(self, latent):
        """Snap continuous latents [B, embed_dim, h, w] (e.g. diffusion samples) to their nearest codes."""
        b, d, h, w = latent.shape
        idx = self.quantizer.nearest(latent.float().permute(0, 2, 3, 1).reshape(-1, d))
        return self.quantizer.lookup(idx.view(b, h, w)).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------------------------
# Factory


AUTOENCODERS = {"vae": VAE, "vqvae": VQVAE}


def build_autoencoder(model_type, config):
    """Build a 'vae' or 'vqvae' from a plain config dict; ValueError names unknown types and bad keys."""
    if model_type not in AUTOENCODERS:
        raise ValueError(f"unknown autoencoder type {model_type!r}; expected one of {sorted(AUTOENCODERS)}")
    cls = AUTOENCODERS[model_type]
    params = inspect.signature(cls.__init__).parameters
    allowed = [name for name in params if name != "self"]
    unknown = sorted(set(config) - set(allowed))
    if unknown:
        raise ValueError(f"{model_type} config: unknown key(s) {unknown}; allowed keys are {allowed}")
    missing = [name for name in allowed if params[name].default is inspect.Parameter.empty and name not in config]
    if missing:
        raise ValueError(f"{model_type} config: missing required key(s) {missing}")
    try:
        return cls(**config)
    except TypeError as err:  # e.g. a string where a number belongs
        raise ValueError(f"{model_type} config: {err}") from None
