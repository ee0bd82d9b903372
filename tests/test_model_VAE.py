"""Tests for model_VAE: shapes, the Gaussian posterior, vector quantisation (losses, straight-through
gradient, EMA arithmetic, dead-code restarts, statistics, DDP replicas) and the config factory."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributions import Normal, kl_divergence

import numpy as np

from model_VAE import (VAE, VQVAE, DiagonalGaussian, FiniteScalarQuantizer, VectorQuantizer, build_autoencoder,
                       rotate_onto)
from module import ResBlock


def tiny(cls, resolution=32, ch_mult=(1, 2), **extra):
    """A very small autoencoder for fast CPU tests."""
    config = dict(resolution=resolution, ch=8, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=[resolution // 2],
                  z_channels=4, conditional=False)
    if cls is VQVAE:
        config.update(n_embed=16, embed_dim=3)
    config.update(extra)
    torch.manual_seed(0)
    return cls(**config)


SHAPE_CASES = [(32, (1, 2), False), (32, (1, 2), True), (64, (1, 2, 2), False), (64, (1, 2, 2), True)]


# ----------------------------------------------------------------------------------------------
# VAE


@pytest.mark.parametrize("resolution,ch_mult,conditional", SHAPE_CASES)
def test_vae_shapes(resolution, ch_mult, conditional):
    model = tiny(VAE, resolution, ch_mult, conditional=conditional)
    x = torch.randn(3, 1, resolution, resolution)
    z = torch.tensor([0, 31, -1])
    side = resolution // 2 ** (len(ch_mult) - 1)
    assert model.latent_shape == (4, side, side)
    posterior = model.encode(x, z)
    assert posterior.mean.shape == posterior.logvar.shape == (3, 4, side, side)
    assert posterior.sample().shape == (3, 4, side, side)
    out = model(x, z)
    assert out["recon"].shape == x.shape
    assert out["kl"].shape == (3,)
    assert out["latent"].shape == (3, 4, side, side)
    assert model.decode(out["latent"], z).shape == x.shape
    assert model.sample(2, torch.tensor([5, -1])).shape == (2, 1, resolution, resolution)
    assert torch.equal(model.encode_latent(x, z), posterior.mean)
    assert model.last_layer is model.decoder.conv_out.weight


@pytest.mark.parametrize("resolution,ch_mult", [(128, (1, 2, 2)), (256, (1, 1, 2, 2))])
def test_large_resolutions(resolution, ch_mult):
    for cls in (VAE, VQVAE):
        model = tiny(cls, resolution, ch_mult, attn_resolutions=[], conditional=True)
        x = torch.randn(1, 1, resolution, resolution)
        with torch.no_grad():
            out = model(x, torch.tensor([7]))
        assert out["recon"].shape == x.shape
        side = resolution // 2 ** (len(ch_mult) - 1)
        assert model.latent_shape[1:] == (side, side)


def test_vae_kl_matches_torch_distributions():
    torch.manual_seed(1)
    moments = torch.randn(4, 6, 5, 5)
    posterior = DiagonalGaussian(moments)
    mean, logvar = moments.chunk(2, dim=1)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert posterior.kl().shape == (4,)
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(posterior.std, torch.exp(0.5 * logvar))


def test_vae_kl_zero_for_standard_normal_posterior():
    posterior = DiagonalGaussian(torch.zeros(2, 8, 3, 3))
    torch.testing.assert_close(posterior.kl(), torch.zeros(2))


def test_logvar_is_clamped():
    mean = torch.zeros(1, 2, 2, 2)
    logvar = torch.tensor([-100.0, -5.0, 0.0, 100.0]).view(1, 2, 2, 1).expand(1, 2, 2, 2)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1), logvar_min=-30.0, logvar_max=20.0)
    assert posterior.logvar.min().item() == -30.0
    assert posterior.logvar.max().item() == 20.0
    assert torch.equal(posterior.logvar[0, 0, 1], torch.full((2,), -5.0))
    assert torch.isfinite(posterior.kl()).all()


def test_model_uses_configured_logvar_bounds():
    model = tiny(VAE, logvar_min=-2.0, logvar_max=1.0)
    with torch.no_grad():
        model.encoder.conv_out.bias[4:] = 50.0  # push every log-variance far above the bound
    posterior = model.encode(torch.randn(2, 1, 32, 32))
    assert posterior.logvar.max().item() == 1.0


def test_reparameterised_sample_gradients_and_generator():
    mean = torch.randn(2, 3, 4, 4, requires_grad=True)
    logvar = torch.randn(2, 3, 4, 4, requires_grad=True)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    sample = posterior.sample(torch.Generator().manual_seed(5))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample, mean + torch.exp(0.5 * logvar) * eps)
    sample.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)


def test_vae_forward_deterministic_without_sampling():
    model = tiny(VAE).eval()
    x = torch.randn(2, 1, 32, 32)
    a, b = model(x, sample_posterior=False), model(x, sample_posterior=False)
    assert torch.equal(a["recon"], b["recon"])
    assert torch.equal(a["latent"], model.encode(x).mean)


def test_condition_changes_output_only_when_conditional():
    x = torch.randn(2, 1, 32, 32)
    # ch=8: every GroupNorm group is one channel, where a condition added before the norm would vanish
    cond_model = tiny(VAE, conditional=True).eval()
    uncond_model = tiny(VAE, conditional=False).eval()
    with torch.no_grad():
        a = cond_model(x, torch.tensor([0, 3]), sample_posterior=False)["recon"]
        b = cond_model(x, torch.tensor([20, -1]), sample_posterior=False)["recon"]
        unknown = cond_model(x, torch.tensor([-1, -1]), sample_posterior=False)["recon"]
        as_none = cond_model(x, None, sample_posterior=False)["recon"]
        c = uncond_model(x, torch.tensor([0, 3]), sample_posterior=False)["recon"]
        d = uncond_model(x, None, sample_posterior=False)["recon"]
    assert (a - b).abs().max() > 1e-4
    assert torch.equal(unknown, as_none)
    assert torch.equal(c, d)


def test_every_resblock_receives_condition():
    model = tiny(VAE, conditional=True)
    resblocks = [m for m in model.modules() if m.__class__.__name__ == "ResBlock"]
    assert resblocks and all(m.cond_proj is not None for m in resblocks)
    assert model.z_embed.null is not None  # one shared embedding with a null token for index -1


def blocks_per_level(model):
    """ResBlocks in each decoder level, lowest resolution first."""
    return [sum(m.__class__.__name__ == "ResBlock" for m in level) for level in model.decoder.levels]


@pytest.mark.parametrize("cls", [VAE, VQVAE])
def test_decoder_extra_block_is_optional(cls):
    ldm, matched = tiny(cls, num_res_blocks=2), tiny(cls, num_res_blocks=2, decoder_extra_block=False)
    assert blocks_per_level(ldm) == [3, 3] and blocks_per_level(matched) == [2, 2]
    assert sum(p.numel() for p in matched.encoder.parameters()) == sum(p.numel() for p in ldm.encoder.parameters())
    rebuilt = build_autoencoder(cls.kind, matched.config)
    assert rebuilt.config["decoder_extra_block"] is False and blocks_per_level(rebuilt) == [2, 2]
    x = torch.randn(2, 1, 32, 32)
    assert matched(x)["recon"].shape == x.shape


@pytest.mark.parametrize("cls", [VAE, VQVAE])
def test_decoder_top_blocks_are_added_at_full_resolution_only(cls):
    base, top = tiny(cls), tiny(cls, decoder_top_blocks=2)
    assert blocks_per_level(base) == [2, 2] and blocks_per_level(top) == [2, 4]

    def count(module):
        return sum(p.numel() for p in module.parameters())
    # two ResBlocks of the full-resolution width (ch * ch_mult[0] = 8), unconditional as tiny() is
    assert count(top) - count(base) == 2 * count(ResBlock(8, 8, 0))
    assert count(top.encoder) == count(base.encoder)
    rebuilt = build_autoencoder(cls.kind, top.config)
    assert rebuilt.config["decoder_top_blocks"] == 2 and blocks_per_level(rebuilt) == [2, 4]
    x = torch.randn(2, 1, 32, 32)
    assert top(x)["recon"].shape == x.shape
    with pytest.raises(ValueError, match="decoder_top_blocks must be >= 0, got -1"):
        tiny(cls, decoder_top_blocks=-1)


@pytest.mark.parametrize("ch,channels_last", [(64, True), (8, False)])
def test_decoder_runs_channels_last_on_cpu_when_wide_with_unchanged_values(ch, channels_last):
    model = tiny(VAE, conditional=True, ch=ch).eval()  # decoder features 2 * ch wide after the mid block
    dec = model.decoder
    latent, z = torch.randn(3, 4, 16, 16), torch.tensor([0, 9, 31])
    cond = model.condition(z, 3, latent.device)
    layouts = []
    hook = dec.levels[0][0].register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        out = dec(latent, cond)
        # the same layers applied by hand on plain contiguous (NCHW) tensors
        h = dec.mid[0](dec.conv_in(latent), cond)
        for layer in dec.mid[1:]:
            h = layer(h, cond)
        for blocks, up in zip(dec.levels, dec.upsamples):
            for block in blocks:
                h = block(h.contiguous(), cond)
            h = up(h)
        ref = dec.conv_out(torch.nn.functional.silu(dec.norm_out(h.contiguous())))
    hook.remove()
    assert layouts == [channels_last, False]  # the decoder's first level, then the plain-layout reference
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# VQ-VAE model


@pytest.mark.parametrize("resolution,ch_mult,conditional", SHAPE_CASES)
def test_vqvae_shapes(resolution, ch_mult, conditional):
    model = tiny(VQVAE, resolution, ch_mult, conditional=conditional).eval()
    x = torch.randn(2, 1, resolution, resolution)
    z = torch.tensor([4, -1])
    side = resolution // 2 ** (len(ch_mult) - 1)
    assert model.latent_shape == (3, side, side)
    assert model.n_embed == 16
    quantized, indices, losses, stats = model.encode(x, z)
    assert quantized.shape == (2, 3, side, side)
    assert indices.shape == (2, side, side) and indices.dtype == torch.long
    assert set(losses) == {"codebook", "commit"} and set(stats) == {"perplexity", "usage"}
    out = model(x, z)
    assert out["recon"].shape == x.shape
    assert out["vq_loss"].dim() == 0
    assert torch.equal(out["indices"], indices)
    assert torch.equal(model.encode_indices(x, z), indices)
    codes = model.quantizer.codebook[indices].permute(0, 3, 1, 2)
    assert torch.equal(model.encode_latent(x, z), codes)  # stage two sees the exact code vectors
    torch.testing.assert_close(quantized, codes)  # equal up to the straight-through rounding
    torch.testing.assert_close(model.decode_indices(indices, z), model.decode(codes, z))


def test_vqvae_vq_loss_is_codebook_plus_beta_commit():
    model = tiny(VQVAE, beta=0.4).eval()
    x = torch.randn(2, 1, 32, 32)
    _, _, losses, _ = model.encode(x)
    out = model(x)
    torch.testing.assert_close(out["vq_loss"], losses["codebook"] + 0.4 * losses["commit"])
    assert losses["codebook"] > 0


def test_vqvae_trains_encoder_and_codebook():
    model = tiny(VQVAE, restart_dead=False)
    x = torch.randn(2, 1, 32, 32)
    out = model(x)
    (out["recon"].pow(2).mean() + out["vq_loss"]).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # reached through the straight-through path
    assert model.quantizer.codebook.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Vector quantizer


def brute_force_nearest(flat, codebook):
    """Index of the closest code by an explicit [N, K, D] squared-difference tensor."""
    return ((flat[:, None, :] - codebook[None, :, :]) ** 2).sum(-1).argmin(1)


def to_flat(z_e):
    """[B, D, h, w] -> [B*h*w, D] in the quantizer's row order."""
    return z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])


def test_nearest_code_matches_brute_force():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 5, restart_dead=False).eval()
    with torch.no_grad():
        vq.codebook.normal_()
    z_e = torch.randn(3, 5, 6, 7)
    quantized, indices, _, _ = vq(z_e)
    expected = brute_force_nearest(to_flat(z_e), vq.codebook.detach()).view(3, 6, 7)
    assert torch.equal(indices, expected)
    torch.testing.assert_close(quantized, vq.codebook.detach()[expected].permute(0, 3, 1, 2))


def test_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, restart_dead=False).eval()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    target = torch.randn(2, 4, 3, 3)

    def downstream(q):  # stands in for decoder + reconstruction loss (non-linear on purpose)
        return ((torch.tanh(q) - target) ** 2).sum()

    quantized, _, _, _ = vq(z_e)
    downstream(quantized).backward()
    codes = quantized.detach().clone().requires_grad_(True)
    downstream(codes).backward()
    torch.testing.assert_close(z_e.grad, codes.grad)
    torch.testing.assert_close(quantized.detach(), codes.detach())


def test_rotation_trick_gradient_is_the_planar_rotation_by_the_angle_between_them():
    # In 2-D the rotation taking e's direction onto q's is the rotation by atan2(q) - atan2(e): an independent
    # construction of R. The gradient reaching e must be |q| / |e| R^T g, and the value must be q's exactly.
    torch.manual_seed(0)
    e = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
    q = torch.randn(64, 2, dtype=torch.float64)
    g = torch.randn(64, 2, dtype=torch.float64)
    out = rotate_onto(e, q)
    assert torch.equal(out.detach(), q)
    (out * g).sum().backward()
    ed = e.detach()
    theta = torch.atan2(q[:, 1], q[:, 0]) - torch.atan2(ed[:, 1], ed[:, 0])
    c, s = torch.cos(theta), torch.sin(theta)
    rot_t_g = torch.stack([c * g[:, 0] + s * g[:, 1], -s * g[:, 0] + c * g[:, 1]], dim=1)  # R^T g
    torch.testing.assert_close(e.grad, (q.norm(dim=1) / ed.norm(dim=1))[:, None] * rot_t_g)


def test_rotation_trick_jacobian_is_a_scaled_proper_rotation_in_the_plane_of_e_and_q():
    torch.manual_seed(1)
    for _ in range(5):
        e, q = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(lambda x: rotate_onto(x[None], q[None])[0], e)
        rot = jac / (q.norm() / e.norm())
        torch.testing.assert_close(rot @ rot.T, torch.eye(6, dtype=torch.float64))  # orthogonal
        assert torch.linalg.det(rot) == pytest.approx(1.0)  # a rotation, not a reflection
        torch.testing.assert_close(rot @ (e / e.norm()), q / q.norm())  # e's direction onto q's
        basis = torch.linalg.svd(torch.stack([e, q]), full_matrices=True).Vh[2:]  # the complement of their plane
        torch.testing.assert_close(rot @ basis.T, basis.T)  # is left alone
    same = torch.randn(3, 6, dtype=torch.float64)  # q along e: the gradient is only rescaled
    x = same.clone().requires_grad_(True)
    rotate_onto(x, 2 * same).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_rotation_trick_passes_a_directionless_encoder_output_straight_through():
    e = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])
    out = rotate_onto(e, q)
    assert torch.equal(out.detach(), q)
    g = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    (out * g).sum().backward()
    torch.testing.assert_close(e.grad, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))  # copied; q = 0: none


@pytest.mark.parametrize("grad", ["ste", "rotation"])
def test_quantizer_gradient_modes_keep_the_codes_and_differ_only_in_the_encoder_gradient(grad):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, restart_dead=False, grad=grad).eval()
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, indices, _, _ = vq(z_e)
    codes = vq.lookup(indices).permute(0, 3, 1, 2)
    torch.testing.assert_close(quantized.detach(), codes, rtol=0, atol=1e-6)
    weight = torch.randn_like(z_e)
    (quantized * weight).sum().backward()
    flat_e = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    flat_q, flat_w = codes.permute(0, 2, 3, 1).reshape(-1, 4), weight.permute(0, 2, 3, 1).reshape(-1, 4)
    if grad == "ste":
        expected = flat_w
    else:  # per position: |q| / |e| R^T w, R from the explicit matrix I - 2 r r^T + 2 q^ e^T
        e_hat, q_hat = flat_e / flat_e.norm(dim=1, keepdim=True), flat_q / flat_q.norm(dim=1, keepdim=True)
        r = (e_hat + q_hat) / (e_hat + q_hat).norm(dim=1, keepdim=True)
        mats = torch.eye(4) - 2 * r[:, :, None] * r[:, None, :] + 2 * q_hat[:, :, None] * e_hat[:, None, :]
        scale = flat_q.norm(dim=1) / flat_e.norm(dim=1)
        expected = scale[:, None] * torch.einsum("nij,ni->nj", mats, flat_w)
    torch.testing.assert_close(z_e.grad.permute(0, 2, 3, 1).reshape(-1, 4), expected, rtol=1e-4, atol=1e-5)


def test_quantizer_refuses_an_unknown_gradient_mode():
    with pytest.raises(ValueError, match=r"grad must be one of \('ste', 'rotation'\), got 'stes'"):
        VectorQuantizer(8, 4, grad="stes")
    model = VQVAE(16, ch=8, ch_mult=(1, 2), num_res_blocks=1, grad="rotation")
    assert build_autoencoder("vqvae", model.config).quantizer.grad == "rotation"  # the config rebuilds it


def test_codebook_and_commitment_losses_by_hand():
    vq = VectorQuantizer(2, 2, beta=0.25, restart_dead=False).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    # vectors (0.1, 0.2) -> code 0, (0.9, 1.3) -> code 1; as [B=1, D=2, h=1, w=2]
    z_e = torch.tensor([[0.1, 0.2], [0.9, 1.3]]).t().reshape(1, 2, 1, 2).requires_grad_(True)
    _, indices, losses, _ = vq(z_e)
    assert indices.flatten().tolist() == [0, 1]
    squared = (0.1**2 + 0.2**2 + 0.1**2 + 0.3**2) / 4  # mean over the 4 elements
    assert losses["codebook"].item() == pytest.approx(squared, rel=1e-5)
    assert losses["commit"].item() == pytest.approx(squared, rel=1e-5)
    # the codebook loss moves only the codes, the commitment loss only the encoder output
    losses["codebook"].backward(retain_graph=True)
    assert z_e.grad is None and vq.codebook.grad.abs().sum() > 0
    losses["commit"].backward()
    assert z_e.grad.abs().sum() > 0


def test_ema_mode_drops_codebook_loss_and_codebook_is_a_buffer():
    vq = VectorQuantizer(4, 2, ema=True, restart_dead=False)
    _, _, losses, _ = vq(torch.randn(1, 2, 3, 3))
    assert losses["codebook"].item() == 0.0
    assert losses["commit"].item() > 0.0
    assert "codebook" not in dict(vq.named_parameters())
    assert "codebook" in dict(vq.named_buffers())


def test_ema_update_arithmetic():
    decay, eps = 0.9, 1e-5
    vq = VectorQuantizer(3, 2, ema=True, ema_decay=decay, restart_dead=False, laplace_eps=eps).train()
    codebook = torch.tensor([[0.0, 0.0], [2.0, 2.0], [10.0, -10.0]])
    sizes = torch.tensor([2.0, 1.0, 0.5])
    embed_sum = codebook * sizes[:, None]
    vq.codebook.copy_(codebook)
    vq.cluster_size.copy_(sizes)
    vq.embed_sum.copy_(embed_sum)
    vectors = torch.tensor([[0.4, 0.2], [0.2, 0.0], [1.6, 2.6], [0.0, 0.4]])  # codes 0, 0, 1, 0; code 2 unused
    vq(vectors.t().reshape(1, 2, 2, 2))

    # independent computation: EMA of counts and sums, Laplace smoothing, then their ratio
    counts = torch.tensor([3.0, 1.0, 0.0])
    sums = torch.stack([vectors[[0, 1, 3]].sum(0), vectors[2], torch.zeros(2)])
    new_sizes = decay * sizes + (1 - decay) * counts
    new_sum = decay * embed_sum + (1 - decay) * sums
    total = new_sizes.sum()
    smoothed = (new_sizes + eps) / (total + 3 * eps) * total
    expected = new_sum / smoothed[:, None]
    torch.testing.assert_close(vq.cluster_size, new_sizes)
    torch.testing.assert_close(vq.embed_sum, new_sum)
    torch.testing.assert_close(vq.codebook, expected)
    # used codes moved toward the mean of their assigned vectors
    means = torch.stack([vectors[[0, 1, 3]].mean(0), vectors[2]])
    for k in range(2):
        assert (vq.codebook[k] - means[k]).norm() < (codebook[k] - means[k]).norm()


def test_ema_update_only_in_training_mode():
    vq = VectorQuantizer(4, 2, ema=True, restart_dead=True, dead_threshold=10.0).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(2, 2, 3, 3))
    for key, value in vq.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_dead_codes_restart_from_encoder_outputs():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 3, ema=False, restart_dead=True, dead_threshold=0.5).train()
    with torch.no_grad():
        vq.codebook.copy_(torch.arange(18.0).view(6, 3) * 100)  # far from the data
    vq.cluster_size.copy_(torch.tensor([5.0, 5.0, 0.1, 5.0, 0.2, 5.0]))
    z_e = torch.randn(2, 3, 4, 4)
    before = vq.codebook.detach().clone()
    vq(z_e)
    flat = to_flat(z_e)
    for k in (2, 4):  # dead: replaced by one of this batch's encoder outputs, usage reset to one observation
        assert ((flat - vq.codebook[k].detach()).abs().max(dim=1).values < 1e-6).any()
        assert vq.cluster_size[k].item() == pytest.approx(1.0)
    for k in (0, 1, 3, 5):  # alive: untouched by the restart
        assert torch.equal(vq.codebook[k].detach(), before[k])


def test_first_training_batch_seeds_codes_from_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, ema=True, ema_decay=0.99, restart_dead=True, dead_threshold=0.1).train()
    z_e = torch.randn(1, 2, 4, 4) * 5  # far outside the tiny uniform init: all vectors pick one or two codes
    _, indices, _, _ = vq(z_e)
    counts = torch.bincount(indices.flatten(), minlength=8)
    flat = to_flat(z_e)
    for k in range(8):
        matches = (flat - vq.codebook[k]).abs().max(dim=1).values < 1e-5
        if counts[k] >= 10:  # (1 - decay) * count >= threshold: kept, moved to the mean of its vectors
            torch.testing.assert_close(vq.codebook[k], flat[indices.flatten() == k].mean(0), rtol=1e-3, atol=1e-4)
        else:  # barely used in the first batch: re-seeded from an encoder output
            assert matches.any()
    assert (counts < 10).sum() >= 6


def test_dead_code_restart_is_deterministic_under_torch_seed():
    def restarted():
        torch.manual_seed(3)
        vq = VectorQuantizer(8, 2, ema=True, restart_dead=True, dead_threshold=2.0).train()
        z_e = torch.randn(1, 2, 4, 4)
        vq(z_e)
        return vq.codebook.clone()

    assert torch.equal(restarted(), restarted())


def test_perplexity_and_usage_by_hand():
    vq = VectorQuantizer(4, 1, restart_dead=False).eval()
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0], [1.0], [2.0], [3.0]]))
    values = torch.tensor([0.0, 0.1, -0.1, 1.05, 0.9, 2.1])  # codes 0,0,0,1,1,2; code 3 unused
    _, indices, _, stats = vq(values.view(1, 1, 2, 3))
    assert indices.flatten().tolist() == [0, 0, 0, 1, 1, 2]
    probs = [3 / 6, 2 / 6, 1 / 6]
    assert stats["perplexity"].item() == pytest.approx(math.exp(-sum(p * math.log(p) for p in probs)), rel=1e-5)
    assert stats["usage"].item() == pytest.approx(3 / 4)


def _ddp_worker(rank, world_size, init_file, batches, result_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size)
    torch.manual_seed(rank)  # different RNG streams: restarts must still agree through the broadcast
    vq = VectorQuantizer(5, 2, ema=True, ema_decay=0.8, restart_dead=True, dead_threshold=0.95)
    with torch.no_grad():
        vq.codebook.copy_(torch.arange(10.0).view(5, 2) / 5)
        vq.embed_sum.copy_(vq.codebook)
    vq.train()(batches[rank])
    torch.save({k: v.clone() for k, v in vq.state_dict().items()}, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ema_statistics_all_reduced_across_processes(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3) + 1.0]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), batches, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # the replicas' EMA statistics equal those of one process seeing both batches
    single = VectorQuantizer(5, 2, ema=True, ema_decay=0.8, restart_dead=False)
    with torch.no_grad():
        single.codebook.copy_(torch.arange(10.0).view(5, 2) / 5)
        single.embed_sum.copy_(single.codebook)
    single.train()(torch.cat(batches, dim=0))
    alive = single.cluster_size >= 0.95
    torch.testing.assert_close(states[0]["cluster_size"][alive], single.cluster_size[alive])
    torch.testing.assert_close(states[0]["codebook"][alive], single.codebook[alive])


# ----------------------------------------------------------------------------------------------
# Factory and config


def test_build_autoencoder_round_trip():
    for cls in (VAE, VQVAE):
        model = tiny(cls, conditional=True)
        rebuilt = build_autoencoder(model.kind, model.config)
        assert type(rebuilt) is cls
        rebuilt.load_state_dict(model.state_dict())
        assert rebuilt.config == model.config


def test_config_is_json_serialisable():
    import json

    for cls in (VAE, VQVAE):
        config = tiny(cls).config
        assert json.loads(json.dumps(config)) == config


def test_build_autoencoder_rejects_bad_input():
    config = tiny(VAE).config
    with pytest.raises(ValueError, match="unknown autoencoder type 'gan'"):
        build_autoencoder("gan", config)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_embed'\]"):
        build_autoencoder("vae", {**config, "n_embed": 8})
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['resolution'\]"):
        build_autoencoder("vae", {k: v for k, v in config.items() if k != "resolution"})
    with pytest.raises(ValueError, match="not divisible"):
        build_autoencoder("vae", {**config, "resolution": 34, "ch_mult": [1, 2, 4]})


def test_input_validation():
    model = tiny(VAE)
    with pytest.raises(ValueError, match="expected images"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(1, 1, 33, 32))


def test_quantize_latent_snaps_to_nearest_code():
    from model_VAE import VQVAE

    model = VQVAE(resolution=32, ch=16, ch_mult=(1, 2), num_res_blocks=1, n_embed=8, embed_dim=4)
    codes = model.quantizer.codebook.detach()
    idx = torch.tensor([[[0, 3], [7, 5]]])
    exact = codes[idx].permute(0, 3, 1, 2)
    noisy = exact + 1e-4 * torch.randn_like(exact)
    torch.testing.assert_close(model.quantize_latent(noisy), exact)
    brute = ((noisy.permute(0, 2, 3, 1)[..., None, :] - codes) ** 2).sum(-1).argmin(-1)
    assert torch.equal(brute, idx)


# ----------------------------------------------------------------------------------------------
# Finite scalar quantisation


def test_fsq_codebook_is_the_grid_of_levels_indexed_in_mixed_radix():
    fsq = FiniteScalarQuantizer([8, 5, 3])
    assert (fsq.n_embed, fsq.embed_dim) == (120, 3) and fsq.codebook.shape == (120, 3)
    grids = [np.arange(8) / 4 - 1, np.arange(5) / 2 - 1, np.arange(3) - 1.0]  # {-4..3}/4, {-2..2}/2, {-1, 0, 1}
    for i, values in enumerate(grids):
        np.testing.assert_allclose(np.unique(fsq.codebook[:, i].numpy()), values)
    digits = np.stack(np.unravel_index(np.arange(120), (8, 5, 3)), axis=1)  # numpy's C order: the last digit fastest
    expected = np.stack([grid[d] for grid, d in zip(grids, digits.T)], axis=1)
    np.testing.assert_allclose(fsq.codebook.numpy(), expected, atol=1e-7)
    assert torch.equal(fsq.nearest(fsq.codebook), torch.arange(120))  # lookup and nearest are inverse
    assert not dict(fsq.state_dict())  # nothing learnt, nothing saved


def test_fsq_nearest_is_the_euclidean_nearest_grid_point():
    fsq = FiniteScalarQuantizer([4, 5, 3, 3])
    points = torch.rand(500, 4, generator=torch.Generator().manual_seed(0)) * 2.6 - 1.3  # also outside [-1, 1]
    brute = torch.cdist(points, fsq.codebook).argmin(dim=1)
    assert torch.equal(fsq.nearest(points), brute)


def test_fsq_forward_rounds_the_bounded_encoder_output_with_a_straight_through_gradient():
    levels = [8, 5, 3]
    fsq = FiniteScalarQuantizer(levels)
    z_e = (torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2).requires_grad_(True)
    quant, indices, losses, stats = fsq(z_e)
    assert quant.shape == z_e.shape and indices.shape == (2, 4, 4)
    torch.testing.assert_close(quant, fsq.lookup(indices).permute(0, 3, 1, 2))
    assert float(losses["codebook"]) == float(losses["commit"]) == 0.0
    # by hand: half range h = (L - 1)(1 + 1e-3) / 2, offset 1/2 for even L, value round(tanh(x + s) h - o) / (L // 2)
    x = z_e.detach().permute(0, 2, 3, 1).double().numpy()
    lv = np.array(levels, float)
    h, o = (lv - 1) * 1.001 / 2, (lv % 2 == 0) / 2
    t = np.tanh(x + np.arctanh(o / h))
    np.testing.assert_allclose(quant.detach().permute(0, 2, 3, 1).numpy(), np.round(t * h - o) / (lv // 2), atol=1e-6)
    quant.sum().backward()  # the rounding passes the gradient on: d/dx = (1 - tanh^2) h / (L // 2)
    np.testing.assert_allclose(z_e.grad.permute(0, 2, 3, 1).numpy(), (1 - t**2) * h / (lv // 2), rtol=1e-4, atol=1e-6)
    assert 0 < float(stats["usage"]) <= 1


def test_fsq_uses_every_level_of_every_channel_for_unit_gaussian_inputs():
    """An encoder output near N(0, 1) reaches each level of each channel often (none sits deep in one level)."""
    levels = [3, 4, 5, 8]
    fsq = FiniteScalarQuantizer(levels)
    z_e = torch.randn(1, 4, 100, 100, generator=torch.Generator().manual_seed(2))
    quant = fsq(z_e)[0]
    for i, n in enumerate(levels):
        values, counts = torch.unique(quant[0, i], return_counts=True)
        assert len(values) == n and int(counts.min()) > 100, (n, counts.tolist())


def test_vqvae_with_fsq_trains_its_encoder_and_rebuilds_from_config():
    model = tiny(VQVAE, quantizer="fsq", fsq_levels=[4, 3, 3], n_embed=36, embed_dim=3)
    assert isinstance(model.quantizer, FiniteScalarQuantizer) and model.n_embed == 36
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    out = model(x)
    assert float(out["vq_loss"]) == 0.0 and int(out["indices"].max()) < 36
    (out["recon"] - x).abs().mean().backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0  # the straight-through gradient reaches the encoder
    again = build_autoencoder("vqvae", model.config)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(again.decode_indices(out["indices"]), model.decode_indices(out["indices"]))
    with pytest.raises(ValueError, match="n_embed"):
        tiny(VQVAE, quantizer="fsq", fsq_levels=[4, 3, 3], n_embed=16, embed_dim=3)
    with pytest.raises(ValueError, match="quantizer"):
        tiny(VQVAE, quantizer="lfq")
    for bad in ([4, 2], []):
        with pytest.raises(ValueError, match="levels"):
            FiniteScalarQuantizer(bad)
