"""Tests for model_discriminator: PatchGAN shapes and conditioning, GAN losses, the adaptive GAN weight
and the perceptual-loss builder (LPIPS-style path with a stand-in torchvision, MS-SSIM fallback)."""
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model_discriminator as md
from model_discriminator import (
    LeCamAnchors, MSSSIMLoss, PatchDiscriminator, SSIMLoss, VGGFeatureDistance, adaptive_gan_weight, build_perceptual_loss, d_loss,
    feature_matching_loss, focal_frequency_loss, generator_loss, high_frequencies, hinge_d_loss, nonsaturating_d_loss,
    r1_penalty)
from util import UserError, ms_ssim


# ----------------------------------------------------------------------------------------------
# PatchGAN


@pytest.mark.parametrize("size,n_layers", [(32, 3), (64, 3), (64, 2)])
def test_patch_discriminator_shape(size, n_layers):
    torch.manual_seed(0)
    disc = PatchDiscriminator(in_channels=1, ch=8, n_layers=n_layers)
    logits = disc(torch.randn(2, 1, size, size))
    # n_layers stride-2 4x4 convs halve the size; the two stride-1 4x4 convs (padding 1) each remove one pixel
    side = size // 2**n_layers - 2
    assert logits.shape == (2, 1, side, side)


def test_discriminator_condition_changes_output():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ch=8, conditional=True).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        a = disc(x, torch.tensor([0, 10]))
        b = disc(x, torch.tensor([25, 10]))
        unknown = disc(x, torch.tensor([-1, -1]))
        as_none = disc(x, None)
    assert (a[0] - b[0]).abs().max() > 1e-3  # different z, different judgement
    torch.testing.assert_close(a[1], b[1])  # same z, same judgement (per-sample, no batch coupling)
    assert torch.equal(unknown, as_none)
    assert (unknown - a).abs().max() > 1e-3  # -1 is the learned null token, not slice 0


def test_unconditional_discriminator_ignores_z():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ch=8, conditional=False)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(disc(x, torch.tensor([0, 1])), disc(x, None))


def test_discriminator_features_are_its_hidden_activations_and_feature_matching_by_hand():
    torch.manual_seed(0)
    d = PatchDiscriminator(1, ch=8, n_layers=2, conditional=True, num_z=32).eval()
    x, z = torch.randn(2, 1, 32, 32), torch.tensor([3, 9])
    logits, taps = d(x, z, features=True)
    assert torch.equal(logits, d(x, z)) and [t.shape[1] for t in taps] == [8, 16, 32]
    assert torch.equal(d.head(taps[-1]), logits)  # the last tap is what the head reads
    other = d(torch.randn(2, 1, 32, 32), z, features=True)[1]
    expected = sum((a - b).abs().mean() for a, b in zip(other, taps)) / 3
    torch.testing.assert_close(feature_matching_loss(other, taps), expected)
    assert feature_matching_loss(taps, taps) == 0
    fake = torch.randn(2, 1, 32, 32, requires_grad=True)
    real = torch.randn(2, 1, 32, 32, requires_grad=True)
    feature_matching_loss(d(fake, z, features=True)[1], d(real, z, features=True)[1]).backward()
    assert fake.grad.abs().sum() > 0 and real.grad is None  # the real side is a fixed target


def test_discriminator_is_per_sample():
    torch.manual_seed(0)
    disc = PatchDiscriminator(ch=8, conditional=True).train()
    x = torch.randn(3, 1, 32, 32)
    z = torch.tensor([1, 2, 3])
    torch.testing.assert_close(disc(x, z)[:1], disc(x[:1], z[:1]))  # GroupNorm: no batch statistics


# ----------------------------------------------------------------------------------------------
# GAN losses


REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def test_hinge_d_loss_by_hand():
    real_term = (0.0 + 0.5 + 2.0) / 3  # relu(1 - real)
    fake_term = (0.0 + 1.0 + 2.5) / 3  # relu(1 + fake)
    assert hinge_d_loss(REAL, FAKE).item() == pytest.approx(0.5 * (real_term + fake_term))


def test_nonsaturating_d_loss_by_hand():
    def softplus(v):
        return torch.log1p(torch.exp(torch.tensor(v))).item()

    real_term = sum(softplus(-v) for v in REAL.tolist()) / 3
    fake_term = sum(softplus(v) for v in FAKE.tolist()) / 3
    assert nonsaturating_d_loss(REAL, FAKE).item() == pytest.approx(0.5 * (real_term + fake_term), rel=1e-6)


def test_generator_losses_by_hand():
    assert generator_loss(FAKE, "hinge").item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)
    expected = sum(torch.log1p(torch.exp(-torch.tensor(v))).item() for v in FAKE.tolist()) / 3
    assert generator_loss(FAKE, "nonsat").item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="unknown GAN loss"):
        generator_loss(FAKE, "wgan")


def test_d_loss_dispatch():
    assert d_loss("hinge", REAL, FAKE).item() == hinge_d_loss(REAL, FAKE).item()
    assert d_loss("nonsat", REAL, FAKE).item() == nonsaturating_d_loss(REAL, FAKE).item()
    with pytest.raises(ValueError, match="unknown GAN loss"):
        d_loss("lsgan", REAL, FAKE)


# ----------------------------------------------------------------------------------------------
# Adaptive GAN weight


def linear_setup(g_scale):
    """W [2, 3]; rec = sum((W a - t)^2), g = -g_scale * sum(W b): gradients known in closed form."""
    torch.manual_seed(0)
    weight = torch.randn(2, 3, requires_grad=True)
    a, b, t = torch.randn(3), torch.randn(3), torch.randn(2)
    rec = ((weight @ a - t) ** 2).sum()
    g = -g_scale * (weight @ b).sum()
    rec_grad = 2 * torch.outer(weight.detach() @ a - t, a)
    g_grad = -g_scale * torch.outer(torch.ones(2), b)
    return weight, rec, g, rec_grad, g_grad


def test_adaptive_weight_matches_manual_gradient_norms():
    weight, rec, g, rec_grad, g_grad = linear_setup(g_scale=0.7)
    value = adaptive_gan_weight(rec, g, weight, eps=1e-4)
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    torch.testing.assert_close(value, expected)
    assert not value.requires_grad
    rec.backward()  # the graph was retained for the generator's own backward pass
    torch.testing.assert_close(weight.grad, rec_grad)


def test_adaptive_weight_is_clamped():
    weight, rec, g, rec_grad, _ = linear_setup(g_scale=1e-9)
    assert rec_grad.norm() / 1e-4 > 50.0  # unclamped ratio would exceed the limit below
    assert adaptive_gan_weight(rec, g, weight, max_weight=50.0).item() == 50.0


def test_adaptive_weight_uses_decoder_last_layer():
    from model_VAE import VAE

    torch.manual_seed(0)
    model = VAE(32, ch=8, ch_mult=(1, 2), num_res_blocks=1, z_channels=4)
    disc = PatchDiscriminator(ch=8)
    x = torch.randn(2, 1, 32, 32)
    recon = model(x)["recon"]
    value = adaptive_gan_weight((recon - x).abs().mean(), generator_loss(disc(recon)), model.last_layer)
    assert value.dim() == 0 and torch.isfinite(value) and 0 < value.item() <= 1e4


# ----------------------------------------------------------------------------------------------
# Perceptual losses


def block_torchvision(monkeypatch):
    """Make `import torchvision` fail whatever is installed."""
    monkeypatch.setitem(sys.modules, "torchvision", None)


def test_msssim_loss_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(0)
    loss, description = build_perceptual_loss("msssim")
    assert isinstance(loss, MSSSIMLoss) and "MS-SSIM" in description
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    same = loss(x, x.clone())
    assert same.shape == (3,)
    torch.testing.assert_close(same, torch.zeros(3), atol=1e-5, rtol=0)
    noisy = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    different = loss(x, noisy)
    assert (different > 0.01).all()
    torch.testing.assert_close(different, 1 - ms_ssim(x, noisy))


def test_ssim_loss_is_one_minus_skimage_ssim_per_sample():
    from skimage.metrics import structural_similarity

    loss, description = build_perceptual_loss("ssim")
    assert isinstance(loss, SSIMLoss) and "SSIM" in description and "MS-SSIM" not in description
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 40, 40, generator=gen) * 2 - 1
    y = (x + 0.4 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    expected = [1 - structural_similarity(a[0].double().numpy(), b[0].double().numpy(), gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False, data_range=2.0)
                for a, b in zip(y, x)]
    torch.testing.assert_close(loss(y, x).double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss(x, x.clone()), torch.zeros(3), atol=1e-5, rtol=0)


def test_none_and_unknown_kinds():
    assert build_perceptual_loss("none") == (None, "perceptual: none")
    with pytest.raises(ValueError, match="unknown perceptual loss"):
        build_perceptual_loss("vgg19")


def test_auto_falls_back_to_msssim_without_torchvision(monkeypatch):
    block_torchvision(monkeypatch)
    loss, description = build_perceptual_loss("auto")
    assert isinstance(loss, MSSSIMLoss)
    assert description.startswith("perceptual: MS-SSIM (LPIPS unavailable: torchvision import failed")


def test_auto_in_this_environment_reports_what_it_used():
    loss, description = build_perceptual_loss("auto")
    if isinstance(loss, VGGFeatureDistance):
        assert "LPIPS-style" in description and "calibration" in description
    else:
        assert isinstance(loss, MSSSIMLoss) and "LPIPS unavailable: " in description


def test_explicit_lpips_without_torchvision_is_a_clear_error(monkeypatch):
    block_torchvision(monkeypatch)
    with pytest.raises(UserError, match=r"--perceptual lpips: unavailable \(torchvision import failed"):
        build_perceptual_loss("lpips")


def tiny_vgg_features():
    """A VGG-shaped feature stack (conv-ReLU(inplace)-pool) small enough for a test."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


def fake_torchvision(monkeypatch, tmp_path, save_weights=True):
    """Install a stand-in torchvision whose vgg16() is `tiny_vgg_features`, with weights in a temporary hub cache."""
    torch.manual_seed(0)
    reference = tiny_vgg_features()

    def vgg16(weights=None):
        assert weights is None  # never ask torchvision to fetch weights
        net = nn.Module()
        net.features = tiny_vgg_features()
        return net

    module = types.ModuleType("torchvision")
    module.models = types.SimpleNamespace(vgg16=vgg16)
    monkeypatch.setitem(sys.modules, "torchvision", module)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    if save_weights:
        (tmp_path / "checkpoints").mkdir()
        state = {f"features.{key}": value for key, value in reference.state_dict().items()}
        torch.save(state, tmp_path / "checkpoints" / md.VGG16_WEIGHTS_FILE)
    return reference


def manual_lpips_like(features, x, y):
    """Independent computation: taps after ReLU #2 and #3 of `tiny_vgg_features`, unit-normalised."""
    mean = torch.tensor(md.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(md.IMAGENET_STD).view(1, 3, 1, 1)

    def taps(img):
        h = ((img.repeat(1, 3, 1, 1) + 1) / 2 - mean) / std
        h = F.relu(features[0](h))
        first = F.relu(features[2](h))
        second = F.relu(features[5](F.max_pool2d(first, 2)))
        return [f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for f in (first, second)]

    per_layer = [((a - b) ** 2).sum(1).mean((1, 2)) for a, b in zip(taps(x), taps(y))]
    return (per_layer[0] + per_layer[1]) / 2


def test_lpips_path_with_cached_weights(monkeypatch, tmp_path):
    reference = fake_torchvision(monkeypatch, tmp_path)
    loss, description = build_perceptual_loss("lpips")
    assert isinstance(loss, VGGFeatureDistance)
    assert "calibration weights are not available offline" in description and str(tmp_path) in description
    torch.manual_seed(1)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_(True)
    value = loss(x, y)
    assert value.shape == (2,)
    with torch.no_grad():
        torch.testing.assert_close(value, manual_lpips_like(reference, x, y))
    torch.testing.assert_close(loss(x, x.clone()), torch.zeros(2))
    value.sum().backward()
    assert y.grad.abs().sum() > 0  # gradients reach the reconstruction ...
    assert all(p.grad is None and not p.requires_grad for p in loss.parameters())  # ... not the frozen VGG
    loss.train()
    assert not loss.features.training


def test_auto_picks_lpips_when_available(monkeypatch, tmp_path):
    fake_torchvision(monkeypatch, tmp_path)
    loss, description = build_perceptual_loss("auto")
    assert isinstance(loss, VGGFeatureDistance) and description.startswith("perceptual: LPIPS-style")


def test_missing_weights_fall_back_without_downloading(monkeypatch, tmp_path):
    fake_torchvision(monkeypatch, tmp_path, save_weights=False)
    loss, description = build_perceptual_loss("auto")
    assert isinstance(loss, MSSSIMLoss)
    assert "not in the local torch hub cache" in description and "nothing is downloaded" in description
    with pytest.raises(UserError, match="not in the local torch hub cache"):
        build_perceptual_loss("lpips")


# ----------------------------------------------------------------------------------------------
# Focal frequency loss


def _ffl_numpy(recon, target, alpha):
    """Jiang et al. 2021 written out with numpy's FFT, one image and channel at a time."""
    out = []
    for r, t in zip(recon, target):
        per_channel = []
        for rc, tc in zip(r, t):
            d = np.fft.fft2(rc, norm="ortho") - np.fft.fft2(tc, norm="ortho")
            dist = np.abs(d) ** 2
            w = np.abs(d) ** alpha
            per_channel.append((w / w.max() * dist).mean())
        out.append(np.mean(per_channel))
    return np.array(out)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.0])
def test_focal_frequency_loss_matches_numpy_fft(alpha):
    gen = torch.Generator().manual_seed(0)
    recon, target = torch.rand(3, 2, 16, 12, generator=gen) * 2 - 1, torch.rand(3, 2, 16, 12, generator=gen) * 2 - 1
    got = focal_frequency_loss(recon, target, alpha)
    assert got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), _ffl_numpy(recon.double().numpy(), target.double().numpy(), alpha),
                               rtol=1e-4)
    if alpha == 0:  # weight 1 everywhere: Parseval makes it the pixel MSE
        torch.testing.assert_close(got, (recon - target).square().mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-7)


def test_focal_frequency_loss_is_zero_for_identical_images_and_its_weight_is_detached():
    x = torch.rand(2, 1, 8, 8)
    assert focal_frequency_loss(x, x.clone()).abs().max() == 0
    recon = (x + 0.1 * torch.randn(2, 1, 8, 8)).requires_grad_(True)
    focal_frequency_loss(recon, x, 1.0).sum().backward()
    # with the weight w held fixed, d/d(recon) of mean(w |D|^2) is a linear map of D; check it by hand
    d = torch.fft.fft2(recon.detach(), norm="ortho") - torch.fft.fft2(x, norm="ortho")
    w = d.abs() / d.abs().amax(dim=(-2, -1), keepdim=True)
    expected = 2 * torch.fft.ifft2(w * d, norm="ortho").real / d[0, 0].numel()
    torch.testing.assert_close(recon.grad, expected, rtol=1e-4, atol=1e-6)


def test_highpass_discriminator_ignores_brightness_and_sees_the_finest_band():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    band = high_frequencies(x)
    # independent computation: each pixel minus the mean of its in-image 3x3 neighbourhood
    padded = np.pad(x.numpy()[0, 0], 1, constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3))
    assert np.allclose(band.numpy()[0, 0], x.numpy()[0, 0] - np.nanmean(windows, axis=(-2, -1)), atol=1e-6)
    disc = PatchDiscriminator(ch=8, n_layers=2, highpass=True).eval()
    with torch.no_grad():
        assert torch.allclose(disc(x + 0.3), disc(x), atol=1e-5)  # a constant offset has no finest band
        plain = PatchDiscriminator(ch=8, n_layers=2).eval()
        assert not torch.allclose(plain(x + 0.3), plain(x), atol=1e-5)



# ----------------------------------------------------------------------------------------------
# Discriminator regularisers


def test_r1_penalty_of_a_linear_discriminator_is_its_weight_norm_and_trains_the_weight():
    """D(x) = mean over a 2x2 patch map of <W_p, x>: the gradient of the mean logit is the mean of the W_p,
    so R1 = ||mean W_p||^2 for every image, and its gradient with respect to W follows by hand."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 1, 6, 6, generator=g).requires_grad_(True)  # one weight map per patch logit
    x = torch.randn(3, 1, 6, 6, generator=g).requires_grad_(True)
    logits = torch.einsum("pchw,bchw->bp", weight, x).reshape(3, 1, 2, 2)
    r1 = r1_penalty(logits, x)
    mean_w = weight.detach().mean(dim=0)
    torch.testing.assert_close(r1, mean_w.square().sum(), rtol=1e-5, atol=1e-6)
    grad, = torch.autograd.grad(r1, weight)  # d ||mean W||^2 / d W_p = 2 mean W / 4
    torch.testing.assert_close(grad, (2 * mean_w / 4).expand(4, 1, 6, 6), rtol=1e-5, atol=1e-6)


def test_r1_penalty_is_zero_where_the_discriminator_ignores_its_input():
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    logits = (x * 0).sum(dim=(2, 3), keepdim=True) + 1.5
    assert float(r1_penalty(logits, x)) == 0.0


def test_lecam_anchors_are_debiased_averages_and_the_penalty_is_one_sided():
    lecam = LeCamAnchors(decay=0.9)
    torch.testing.assert_close(lecam.anchors(), torch.zeros(2))
    batches = [(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -2.0])), (torch.tensor([0.0, 0.5]), torch.tensor([0.5]))]
    biased, penalties = np.zeros(2), []
    for t, (real, fake) in enumerate(batches, start=1):
        penalties.append(float(lecam(real, fake)))
        biased = 0.9 * biased + 0.1 * np.array([real.mean().item(), fake.mean().item()])
        anchor_real, anchor_fake = biased / (1 - 0.9**t)
        expected = (np.maximum(real.numpy() - anchor_fake, 0) ** 2).mean() + \
            (np.maximum(anchor_real - fake.numpy(), 0) ** 2).mean()
        assert penalties[-1] == pytest.approx(expected, rel=1e-6)
        np.testing.assert_allclose(lecam.anchors().numpy(), biased / (1 - 0.9**t), rtol=1e-6)
    assert penalties[0] == pytest.approx(((1 + 1.5) ** 2 + (3 + 1.5) ** 2) / 2 + ((2 + 1) ** 2 + (2 + 2) ** 2) / 2)
    assert int(lecam.count) == 2 and set(lecam.state_dict()) == {"sums", "count"}
    # real logits below the fake anchor and fake logits above the real one are not penalised
    assert float(LeCamAnchors()(torch.tensor([-5.0]), torch.tensor([5.0]))) == 0.0


def test_lecam_penalty_pulls_the_logits_only():
    lecam = LeCamAnchors()
    real = torch.tensor([2.0, 1.0], requires_grad=True)
    fake = torch.tensor([-2.0], requires_grad=True)
    lecam(real, fake).backward()
    # the first step's anchors are the batch means (real 1.5, fake -2): d/dD(real) = 2 (D - (-2)) / 2
    torch.testing.assert_close(real.grad, torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(fake.grad, torch.tensor([-2 * 3.5]))
