"""Building blocks shared by the autoencoders, the discriminator and the latent UNet.

Everything here is a plain nn.Module that knows nothing about data or files:
- `sinusoidal_embedding` / `ConditionEmbedding`: the Transformer paper's sinusoidal code followed by
  an MLP; used for the slice z-index (stage one, stage two) and the diffusion time step.
- `ResBlock`: GroupNorm -> SiLU (Swish) -> conv, twice, with an optional conditioning vector applied
  as a scale and shift between the two convolutions, dropout, and a 1x1 shortcut when the width changes.
- `SelfAttention2d`: single-head self-attention over the pixels of a feature map through
  `torch.nn.functional.scaled_dot_product_attention` (flash/efficient kernels where available).
- `Downsample` / `Upsample`: stride-2 conv and nearest-neighbour upsampling followed by a conv.
- `all_reduce_sum`: a tensor summed over processes under torch.distributed (statistics every replica must share).
"""
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def group_norm(channels):
    """GroupNorm with 32 groups where the width allows it, else the largest divisor of `channels` <= 32."""
    groups = min(32, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


def sinusoidal_embedding(positions, dim, max_period=10000.0):
    """Sinusoidal code of Vaswani et al.: emb[p, 2i] = sin(p / T^(2i/dim)), emb[p, 2i+1] = cos(...).

    `positions` is a 1-D tensor (ints or floats); returns a float tensor [len(positions), dim] with sines
    and cosines interleaved exactly as in the paper's formula.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=positions.device, dtype=torch.float32) * 2 / dim)
    angles = positions.float()[:, None] * freqs[None, :]
    emb = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)  # [N, half, 2] -> interleave
    return emb.reshape(positions.shape[0], dim)


class ConditionEmbedding(nn.Module):
    """Sinusoidal code of a scalar condition (z-index or time step) followed by a two-layer SiLU MLP.

    With `null_token=True` an extra learned vector stands for "no condition" (index -1), which
    classifier-free guidance and unconditional data (plain image folders) use.
    """

    def __init__(self, out_dim, base_dim=None, null_token=False):
        super().__init__()
        self.base_dim = base_dim or max(32, out_dim // 4)
        self.base_dim += self.base_dim % 2
        self.mlp = nn.Sequential(nn.Linear(self.base_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.null = nn.Parameter(torch.zeros(out_dim)) if null_token else None

    def forward(self, positions):
        emb = self.mlp(sinusoidal_embedding(positions.clamp(min=0), self.base_dim))
        if self.null is not None:
            emb = torch.where((positions < 0)[:, None], self.null.to(emb.dtype)[None, :], emb)
        return emb


class ResBlock(nn.Module):
    """Pre-activation residual block; `cond` (a [B, cond_dim] vector) modulates the features between the convs.

    The condition enters as a scale and shift applied *after* the second GroupNorm (FiLM, as in
    improved-diffusion's use_scale_shift_norm). Adding it before the norm, as DDPM does, is silently
    undone whenever a group holds a single channel: the norm subtracts each channel's constant again.
    """

    def __init__(self, in_ch, out_ch=None, cond_dim=0, dropout=0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.cond_proj = nn.Linear(cond_dim, 2 * out_ch) if cond_dim else None
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, cond=None):
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.cond_proj is not None and cond is not None:
            scale, shift = self.cond_proj(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.shortcut(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels, heads=1):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention channels {channels} not divisible by heads {heads}")
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x, cond=None):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, heads, HW, C/heads]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution (asymmetric padding as in LDM)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling then a 3x3 convolution (no checkerboard)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def all_reduce_sum(tensor):
    """Sum a tensor in place over processes when torch.distributed is running (keeps running statistics, e.g.
    EMA codebooks and LeCam anchors, identical on every replica); the tensor as it is otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
